"""The consumer split (producer -> executor -> completer) against the in-memory store, real threads
and real time: the write of one batch overlaps the read of the next, outcomes are batched, a
write the database refuses loses nothing, and a completer that is backed up stops the reading."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from genesis_pgflow.consumer import Consumer, ConsumerOptions
from genesis_pgflow.consumer.completer import write_most
from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.errors import DatabaseUnavailable
from genesis_pgflow.testing import MemoryQueueStore, wait_until

from .test_consumer import RESULTS, Handler, Q, rule

REFUSED = psycopg.OperationalError("connection failed: connection refused")


class HeldWrites(MemoryQueueStore):
    """The in-memory store whose complete() waits at a gate while `hold` is set, noting the reads
    made meanwhile and the size of each write."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold = threading.Event()
        self.gate = threading.Event()
        self.writing = threading.Event()
        self.reads_while_writing = 0
        self.writes: list[int] = []
        self.refuse_writes = 0          # the next n complete() calls fail as an outage would

    def read(self, queue, qty, lease_s, *, waited_s=0.0):
        if self.writing.is_set():
            self.reads_while_writing += 1
        return super().read(queue, qty, lease_s, waited_s=waited_s)

    def complete(self, outcomes):
        if self.refuse_writes:
            self.refuse_writes -= 1
            raise REFUSED
        if self.hold.is_set():
            self.writing.set()
            self.gate.wait(120)
            self.writing.clear()
        self.writes.append(len(outcomes))
        return super().complete(outcomes)


def consumer_for(store, *, batch_size=10, parallel=2, drain=True, max_outage_s=300.0) -> Consumer:
    dispatcher = Dispatcher({"genesis_rule_update": Handler()}, timeout_s=5.0, max_attempts=3,
                            retry_base_s=2.0, retry_max_s=60.0)
    options = ConsumerOptions(queues=(Q,), parallel=parallel, batch_size=batch_size, poll_interval_s=0.05,
                              drain=drain, max_outage_s=max_outage_s, shutdown_grace_s=5.0)
    return Consumer(store, dispatcher, options)


def running(consumer: Consumer) -> threading.Thread:
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    return thread


def answered(store) -> list[str]:
    """The rule ids of the results published, one per result."""
    return sorted(m["result"]["rule_id"] for m in store.messages(RESULTS))


def test_the_next_batch_is_read_while_the_last_one_is_written():
    store = HeldWrites(clock=time.monotonic)
    for i in range(40):
        store.send(Q, rule(i))
    store.hold.set()
    consumer = consumer_for(store)
    # backpressure apart (tested below): with two batches unwritten the producer would rightly wait
    consumer.producer.max_backlog = 10**6
    thread = running(consumer)
    try:
        wait_until(lambda: store.reads_while_writing > 0, what="a read during a held write")
    finally:
        store.hold.clear()
        store.gate.set()
    thread.join(30)
    assert not thread.is_alive()
    # every request answered once, and archived
    assert answered(store) == sorted(f"r{i}" for i in range(40))
    assert store.depth((Q,)) == 0 and len(store.archived(Q)) == 40


def test_outcomes_share_a_transaction_up_to_the_completers_most():
    store = HeldWrites(clock=time.monotonic)
    for i in range(60):
        store.send(Q, rule(i))
    consumer = consumer_for(store, batch_size=10, parallel=4)
    thread = running(consumer)
    thread.join(30)
    assert not thread.is_alive()
    assert sum(store.writes) == 60 and max(store.writes) <= write_most(10)
    assert len(store.writes) < 60           # batched: not one transaction per outcome


def test_a_backed_up_completer_stops_the_reading_then_writes_its_backlog_in_large_transactions():
    """While the database takes no writes, the consumer holds at most max_backlog outcomes and
    the messages of the workers: it does not lease the whole queue. Once writes are taken, the
    outcomes of several reads of 10 share a transaction, up to write_most (100), never more."""
    store = HeldWrites(clock=time.monotonic)
    for i in range(600):
        store.send(Q, rule(i))
    store.hold.set()
    consumer = consumer_for(store, batch_size=10, parallel=2, drain=False)
    thread = running(consumer)
    try:
        wait_until(lambda: consumer.completer.backlog() >= consumer.producer.max_backlog,
                   what="the completer's backlog to fill")
        leased = sum(1 for m in store.queues[Q].values() if m.read_ct > 0)
        # what is held, plus at most one read of a batch made before the backlog filled
        assert leased <= consumer.producer.max_backlog + consumer.options.batch_size + consumer.options.parallel
        assert leased < 600
    finally:
        store.hold.clear()
        store.gate.set()
        wait_until(lambda: store.depth((Q,)) == 0, what="the queue to drain once writes are taken")
        consumer.stop()
        thread.join(30)
    assert answered(store) == sorted(f"r{i}" for i in range(600))
    assert write_most(10) == 100 and write_most(100) == 200
    assert sum(store.writes) == 600 and max(store.writes) == write_most(10)


def test_a_refused_write_is_written_again_and_nothing_is_lost_or_doubled(caplog):
    store = HeldWrites(clock=time.monotonic)
    for i in range(30):
        store.send(Q, rule(i))
    store.refuse_writes = 3
    consumer = consumer_for(store)
    thread = running(consumer)
    thread.join(30)
    assert not thread.is_alive()
    assert answered(store) == sorted(f"r{i}" for i in range(30))
    assert consumer.outage.count == 1 and not consumer.outage.down
    assert consumer.stats.store_errors >= 3


def test_a_completer_past_the_outage_budget_ends_the_consumer():
    store = HeldWrites(clock=time.monotonic)
    for i in range(5):
        store.send(Q, rule(i))
    store.refuse_writes = 10**6
    consumer = consumer_for(store, drain=False, max_outage_s=0.3)
    with pytest.raises(DatabaseUnavailable, match=r"giving up$"):
        consumer.run()
    assert consumer.stopping.is_set()
    assert store.messages(RESULTS) == []
