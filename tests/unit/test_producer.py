"""The producer reads a queue only when it may hold something: never known empty, a NOTIFY heard
since its last short read, or a poll interval gone by. Each read is a round trip that costs the
consumer as much CPU as a small message's work, so a job finishing or a batch written must not
cost a read of an empty queue. Without a LISTEN connection every queue is read every turn."""

from __future__ import annotations

import threading

from genesis_pgflow.consumer import Consumer, ConsumerOptions
from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.testing import FakeClock, MemoryQueueStore, wait_until

from .test_consumer import RESULTS, Handler, Q, rule

OTHER = "genesis_llm_config_updates"


class CountedReads(MemoryQueueStore):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[str] = []
        self.during_read = lambda queue: None     # what happens while a read is under way

    def read(self, queue, qty, lease_s, *, waited_s=0.0):
        self.reads.append(queue)
        messages = super().read(queue, qty, lease_s, waited_s=waited_s)
        self.during_read(queue)
        return messages


def consumer_for(store, clock, poll_interval_s=1.0) -> Consumer:
    dispatcher = Dispatcher({"genesis_rule_update": Handler()}, timeout_s=5.0, max_attempts=3,
                            retry_base_s=2.0, retry_max_s=60.0)
    options = ConsumerOptions(queues=(Q, OTHER), parallel=2, batch_size=10, poll_interval_s=poll_interval_s)
    return Consumer(store, dispatcher, options, monotonic=clock, rand=lambda: 0.5)


def reads_of(store, fetch) -> list[str]:
    before = len(store.reads)
    fetch()
    return sorted(store.reads[before:])     # the queues are taken in turn: the order rotates


def test_a_queue_read_short_is_read_again_only_after_a_notify_or_a_poll_interval():
    clock = FakeClock()
    store = CountedReads(clock=clock)
    consumer = consumer_for(store, clock)
    producer = consumer.producer
    producer.listening = True
    assert reads_of(store, consumer.fetch) == sorted([Q, OTHER])           # nothing known yet: both read
    assert reads_of(store, consumer.fetch) == []                   # both came back short (empty)

    store.send(Q, rule(1))          # not heard yet: still not read (the NOTIFY is what tells)
    assert reads_of(store, consumer.fetch) == []
    producer.notified({Q})
    assert reads_of(store, consumer.fetch) == [Q]                  # only the queue notified
    # the job runs, its outcome is written, the loop turns: no read follows
    wait_until(lambda: consumer.run_once() >= 0 and len(store.messages(RESULTS)) == 1, timeout=10,
               what="the message to be answered")
    assert store.reads.count(Q) == 2

    clock.advance(1.0)              # a poll interval: messages back from a lost
    assert reads_of(store, consumer.fetch) == sorted([Q, OTHER])           # lease or a retry delay are found


def test_a_full_read_is_followed_by_another_and_a_notify_during_a_read_is_not_lost():
    clock = FakeClock()
    store = CountedReads(clock=clock)
    consumer = consumer_for(store, clock)
    producer = consumer.producer
    producer.listening = True
    for i in range(3):
        store.send(Q, rule(i))
    assert reads_of(store, lambda: producer._read(Q, 2)) == [Q]
    assert producer.worth_reading(Q)        # it was full: there may be more

    assert len(producer._read(Q, 2)) == 1   # short now, but a NOTIFY arrived while it ran
    assert producer.worth_reading(Q) is False
    store.during_read = lambda queue: producer.notified({queue})
    producer._read(Q, 2)
    assert producer.worth_reading(Q), "the NOTIFY heard during the read was taken for old news"


def test_without_listen_every_queue_is_read_every_turn_and_a_resumed_queue_at_once():
    clock = FakeClock()
    store = CountedReads(clock=clock)
    consumer = consumer_for(store, clock)
    producer = consumer.producer
    assert not producer.listening           # no listener thread: nothing would tell of new messages
    for _ in range(3):
        assert reads_of(store, consumer.fetch) == sorted([Q, OTHER])

    producer.listening = True
    assert reads_of(store, consumer.fetch) == []
    assert reads_of(store, lambda: producer.fetch(frozenset({Q}))) == []      # paused: never read
    assert reads_of(store, consumer.fetch) == [Q]                            # resumed: read at once


def test_the_running_consumer_listens_and_skips_the_queue_that_is_not_sent_to():
    """Consumer.run with the in-memory store's LISTEN twin: messages on one queue are all
    answered, and the other queue, empty throughout, is read only at the start and on polls."""
    store = CountedReads()      # its own clock does not move: no poll interval ever passes
    consumer = consumer_for(store, FakeClock(), poll_interval_s=0.05)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: consumer.producer.listening, timeout=10, what="the consumer to listen")
        for i in range(50):
            store.send(Q, rule(i))
        wait_until(lambda: len(store.messages(RESULTS)) == 50, timeout=30, what="50 answers")
    finally:
        consumer.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert store.reads.count(OTHER) <= 2, store.reads.count(OTHER)


def test_a_consumer_that_takes_what_has_waited_leaves_a_fresh_message_to_the_first():
    """take_after_s (a command's second process): a message just sent is not taken; once it has
    waited that long, it is (the first process did not keep up)."""
    clock = FakeClock()
    store = CountedReads(clock=clock)
    dispatcher = Dispatcher({"genesis_rule_update": Handler()}, timeout_s=5.0, max_attempts=3,
                            retry_base_s=2.0, retry_max_s=60.0)
    options = ConsumerOptions(queues=(Q,), parallel=2, batch_size=10, take_after_s=0.05)
    consumer = Consumer(store, dispatcher, options, monotonic=clock, rand=lambda: 0.5)
    store.send(Q, rule(1))
    assert consumer.fetch() == 0 and store.reads == [Q]      # read, and nothing taken
    clock.advance(0.06)
    consumer.producer.notified({Q})
    assert consumer.fetch() == 1
