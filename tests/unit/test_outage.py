"""Outages against the in-memory store and a fake clock: backoff, quiet logging, the outage budget,
refused writes waited out, bugs not, and a shutdown that kills what it gives back."""

from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest

from genesis_pgflow.consumer import Backoff, Consumer, ConsumerOptions, Outage
from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.errors import DatabaseUnavailable
from genesis_pgflow.store.database import is_connection_error, is_transient
from genesis_pgflow.testing import FakeClock, MemoryQueueStore, wait_until

from .test_consumer import RESULTS, Handler, Q, rule

REFUSED = psycopg.OperationalError("connection failed: connection refused")


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(clock):
    return MemoryQueueStore(clock=clock)


def make(store, clock, handler=None, *, max_outage_s=300.0, max_attempts=3, grace=0.0, give_back_wait_s=10.0,
         parallel=2) -> Consumer:
    handler = handler or Handler()
    dispatcher = Dispatcher({handler.payload_type: handler}, timeout_s=5.0, max_attempts=max_attempts,
                            retry_base_s=2.0, retry_max_s=60.0, clock=lambda: clock.utc(), rand=lambda: 0.0)
    options = ConsumerOptions(queues=(Q,), parallel=parallel, batch_size=10, poll_interval_s=0.01, lease_s=10,
                              shutdown_grace_s=grace, max_outage_s=max_outage_s, give_back_wait_s=give_back_wait_s)
    return Consumer(store, dispatcher, options, monotonic=clock, rand=lambda: 0.0)


def lines(caplog, level=logging.WARNING, contains=""):
    return [r.getMessage() for r in caplog.records if r.levelno == level and contains in r.getMessage()]


# --- the pieces -----------------------------------------------------------------------------


def test_backoff_doubles_from_a_tenth_of_a_second_to_one_second_with_jitter():
    backoff = Backoff()
    assert [backoff.delay(n, 0.0) for n in range(1, 7)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    assert [round(backoff.delay(n, 1.0), 6) for n in (1, 4, 5, 1000)] == [0.1, 0.8, 1.0, 1.0]


@pytest.mark.parametrize("exc", [
    REFUSED,
    psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
    psycopg.errors.CannotConnectNow("the database system is starting up"),
])
def test_connection_trouble_is_a_connection_error(exc):
    assert is_connection_error(exc) and is_transient(exc)


@pytest.mark.parametrize("exc", [
    psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction"),
    psycopg.errors.InsufficientPrivilege("permission denied for table q_x"),
    psycopg.errors.DiskFull("could not extend file"),
    psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
    psycopg.errors.LockNotAvailable("could not obtain lock"),
    psycopg.errors.SerializationFailure("could not serialize access"),
    psycopg.errors.TooManyConnections("sorry, too many clients already"),
])
def test_refused_writes_are_waited_out(exc):
    assert is_transient(exc) and not is_connection_error(exc)


@pytest.mark.parametrize("exc", [
    psycopg.errors.SyntaxError("syntax error at or near"),
    psycopg.errors.UndefinedColumn("column x does not exist"),
    psycopg.errors.UndefinedTable("relation does not exist"),
    psycopg.errors.NumericValueOutOfRange("out of range"),
])
def test_bugs_are_not_transient(exc):
    assert not is_transient(exc)


def test_an_outage_logs_once_then_once_a_minute_then_once_when_back(clock, caplog):
    caplog.set_level(logging.INFO, logger="genesis_pgflow.consumer")
    outage = Outage(300.0, monotonic=clock, rand=lambda: 0.0)
    for _ in range(50):                     # 50 attempts in the first minute: one line
        clock.advance(outage.failed(REFUSED))
    assert outage.down and len(lines(caplog)) == 1
    assert lines(caplog)[0].startswith("database unavailable (connection failed: connection refused)")
    clock.advance(60.0)
    outage.failed(REFUSED)
    outage.failed(REFUSED)
    assert len(lines(caplog, contains="still unavailable")) == 1
    assert "51 failed attempt(s), last error: connection failed: connection refused" in lines(caplog)[1]
    clock.advance(3.0)
    outage.recovered()
    outage.recovered()
    back = lines(caplog, logging.INFO, "database back")
    assert back == [f"database back after {clock.now - (1000.0):.1f} s (52 failed attempt(s))"]
    assert not outage.down and outage.count == 1


def test_past_its_budget_an_outage_gives_up_with_one_line(clock):
    outage = Outage(300.0, monotonic=clock, rand=lambda: 0.99)
    delays = []
    with pytest.raises(DatabaseUnavailable) as raised:
        while True:
            delays.append(outage.failed(REFUSED))
            clock.advance(delays[-1])
    assert str(raised.value) == ("database unreachable for 300 s (last error: connection failed: connection "
                                 "refused); giving up")
    assert max(delays) < 1.0 and len(delays) > 250     # short steps, ending on the budget itself
    assert clock.now - 1000.0 == pytest.approx(300.0)


# --- the loop -------------------------------------------------------------------------------


def test_the_loop_waits_an_outage_out_quietly_and_answers_once_it_is_back(store, clock, caplog):
    caplog.set_level(logging.INFO)
    msg_id = store.send(Q, rule(1))
    consumer = make(store, clock)
    store.failure = REFUSED
    pauses = []
    for _ in range(100):
        pauses.append(consumer.turn())
        clock.advance(pauses[-1])
    assert consumer.outage.down and all(0 < p <= 1.0 for p in pauses)
    assert consumer.stats.store_errors == 100
    assert len(lines(caplog)) + len(lines(caplog, logging.ERROR)) == 1     # went away
    clock.advance(60.0)
    consumer.turn()
    assert len(lines(caplog, contains="still unavailable after")) == 1     # a minute's summary
    store.failure = None
    wait_until(lambda: consumer.turn() is not None and store.messages(RESULTS), what="the answer")
    assert [m["request"]["msg_id"] for m in store.messages(RESULTS)] == [msg_id]
    assert not consumer.outage.down and len(lines(caplog, logging.INFO, "database back after")) == 1


@pytest.mark.parametrize("refusal", [
    psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction"),
    psycopg.errors.InsufficientPrivilege("permission denied for schema pgmq"),
    psycopg.errors.DiskFull("could not extend file: No space left on device"),
])
def test_a_refusing_database_is_waited_out_within_the_budget(store, clock, refusal):
    consumer = make(store, clock, max_outage_s=30.0)
    store.failure = refusal
    turns = 0
    with pytest.raises(DatabaseUnavailable, match="database unreachable for 30 s"):
        while True:
            clock.advance(consumer.turn())
            turns += 1
    assert turns > 25


def test_a_bug_in_a_query_still_ends_the_consumer(store, clock):
    consumer = make(store, clock)
    store.failure = psycopg.errors.UndefinedColumn('column "nope" does not exist')
    with pytest.raises(psycopg.errors.UndefinedColumn):
        consumer.turn()


def test_run_exits_with_database_unavailable_past_the_budget():
    store = MemoryQueueStore(clock=time.monotonic)
    store.failure = REFUSED
    dispatcher = Dispatcher({"genesis_rule_update": Handler()}, timeout_s=5.0, max_attempts=3,
                            retry_base_s=2.0, retry_max_s=60.0)
    consumer = Consumer(store, dispatcher, ConsumerOptions(queues=(Q,), poll_interval_s=0.01, max_outage_s=0.3))
    with pytest.raises(DatabaseUnavailable, match=r"giving up$"):
        consumer.run()
    assert consumer.stopping.is_set()


def test_the_listener_backs_off_and_says_so_once(caplog):
    caplog.set_level(logging.INFO, logger="genesis_pgflow.consumer")

    class NoListen(MemoryQueueStore):
        calls = 0

        def wait_for_messages(self, queues, timeout_s):
            NoListen.calls += 1
            raise REFUSED

    store = NoListen(clock=time.monotonic)
    dispatcher = Dispatcher({"genesis_rule_update": Handler()}, timeout_s=5.0, max_attempts=3,
                            retry_base_s=2.0, retry_max_s=60.0)
    consumer = Consumer(store, dispatcher, ConsumerOptions(queues=(Q,), poll_interval_s=0.05))
    thread = threading.Thread(target=consumer.run)
    started = time.monotonic()
    thread.start()
    try:
        wait_until(lambda: NoListen.calls >= 6, what="six LISTEN attempts")
    finally:
        consumer.stop()
        thread.join(10)
    elapsed = time.monotonic() - started
    assert not thread.is_alive()
    # a busy loop makes thousands of attempts a second; the backoff at most 20
    assert NoListen.calls <= 20 * elapsed + 5
    assert len(lines(caplog, logging.INFO, "LISTEN connection lost")) == 1
    assert lines(caplog) == []


# --- shutdown -------------------------------------------------------------------------------


class Recorder(MemoryQueueStore):
    """The in-memory store, noting what had happened by the time each give-back was written."""

    def __init__(self, *args, returned: threading.Event, **kwargs):
        super().__init__(*args, **kwargs)
        self.returned = returned
        self.released: list[tuple[list[int], bool]] = []

    def release(self, queue, msg_ids, read_cts=None):
        self.released.append((list(msg_ids), self.returned.is_set()))
        super().release(queue, msg_ids, read_cts)


def test_shutdown_waits_for_cancelled_work_to_return_before_giving_it_back(clock):
    returned = threading.Event()
    started = threading.Event()

    def sandboxed(payload, ctx):                # like sandbox.run: noticing the cancel, it kills, then returns
        started.set()
        ctx.cancelled.wait(10)
        time.sleep(0.2)
        returned.set()
        return {"killed": True}

    store = Recorder(clock=clock, returned=returned)
    msg_id = store.send(Q, rule(1))
    consumer = make(store, clock, Handler(sandboxed), max_attempts=1)
    consumer.run_once()
    assert started.wait(5)
    consumer.stop()
    consumer.shutdown()
    assert store.released == [([msg_id], True)]
    assert store.messages(RESULTS) == []
    # a give-back spends no attempt: with max_attempts=1 the message still runs (not dead-lettered)
    again = make(store, clock, max_attempts=1)
    wait_until(lambda: again.run_once(wait_s=0.05) is not None and store.messages(RESULTS))
    [result] = store.messages(RESULTS)
    assert result["status"] == "completed" and result["request"]["attempt"] == 1


def test_work_that_ignores_its_cancel_is_not_given_back(clock, caplog):
    never = threading.Event()
    started = threading.Event()

    def stubborn(payload, ctx):
        started.set()
        never.wait(10)
        return {}

    store = Recorder(clock=clock, returned=never)
    store.send(Q, rule(1))
    consumer = make(store, clock, Handler(stubborn), give_back_wait_s=0.1)
    consumer.run_once()
    assert started.wait(5)
    consumer.stop()
    consumer.shutdown()
    never.set()
    assert store.released == []
    assert len(lines(caplog, contains="did not return within")) == 1


def test_shutdown_during_an_outage_does_not_wait_on_the_database(clock, caplog):
    started = threading.Event()

    def until_cancelled(payload, ctx):
        started.set()
        ctx.cancelled.wait(10)
        return {}

    store = MemoryQueueStore(clock=clock)
    store.send(Q, rule(1))
    consumer = make(store, clock, Handler(until_cancelled), grace=0.0)
    consumer.run_once()
    assert started.wait(5)
    store.failure = REFUSED
    clock.advance(consumer.turn())
    assert consumer.outage.down
    consumer.stop()
    consumer.shutdown()
    assert lines(caplog, contains="database unavailable at shutdown") == [
        "database unavailable at shutdown: 0 outcome(s) not stored, 1 message(s) not given back; "
        "they come back when their lease expires"]


def _periodic_once(consumer: Consumer) -> None:
    """Run the scheduler through its first round (every job is due at once with rand 0)."""
    looks = []
    clock = consumer.monotonic
    consumer.monotonic = lambda: (looks.append(1), clock())[1]
    threads = [threading.Thread(target=consumer._run_periodic, args=job) for job in consumer.periodic]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(looks) >= 3 * len(threads), what="the scheduler past its first round")
    consumer.stopping.set()
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()


def test_a_periodic_job_meeting_an_outage_logs_one_line_without_a_traceback(store, clock, caplog):
    calls = []

    def heartbeat():
        calls.append(1)
        raise REFUSED

    consumer = make(store, clock)
    consumer.periodic = [("heartbeat", 5.0, heartbeat)]
    _periodic_once(consumer)
    assert calls == [1]
    # the outage begins (one line); the loop's own attempts carry it on, and the job waits meanwhile
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in records] == [
        "database unavailable (connection failed: connection refused); retrying quietly, giving up after 300 s"]
    assert records[0].exc_info is None and consumer.outage.down


def test_an_outage_a_periodic_job_meets_wakes_the_loop_from_a_long_poll():
    """Only the loop's attempts end an outage, and the LISTEN thread waits while one lasts: so an
    outage a periodic job noticed must wake a loop sleeping out its poll (an hour here), or the
    consumer would hear nothing until that poll ends."""
    store = MemoryQueueStore(clock=time.monotonic)
    beats: list[bool] = []

    def heartbeat():
        beats.append(True)
        if len(beats) == 1:
            raise REFUSED

    dispatcher = Dispatcher({"genesis_rule_update": Handler()}, timeout_s=5.0, max_attempts=3,
                            retry_base_s=2.0, retry_max_s=60.0)
    consumer = Consumer(store, dispatcher, ConsumerOptions(queues=(Q,), poll_interval_s=3600.0),
                        periodic=[("heartbeat", 0.05, heartbeat)])
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        wait_until(lambda: consumer.outage.count == 1, what="the heartbeat to meet the outage")
        wait_until(lambda: not consumer.outage.down, what="the loop to end the outage")
    finally:
        consumer.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_periodic_jobs_wait_while_the_database_is_away(store, clock):
    calls = []
    consumer = make(store, clock)
    consumer.periodic = [("heartbeat", 5.0, lambda: calls.append(1))]
    consumer.outage.failed(REFUSED)
    _periodic_once(consumer)
    assert calls == []


def test_a_long_periodic_job_never_holds_up_the_heartbeat(store, clock):
    """Each periodic job has a thread of its own: a prune still running does not delay the beat
    that keeps this consumer from being shown as gone."""
    prune_started, prune_may_end, beat = threading.Event(), threading.Event(), threading.Event()

    def prune():
        prune_started.set()
        prune_may_end.wait(30)

    consumer = make(store, clock)
    consumer.periodic = [("prune", 60.0, prune), ("heartbeat", 5.0, beat.set)]
    threads = [threading.Thread(target=consumer._run_periodic, args=job) for job in consumer.periodic]
    for thread in threads:
        thread.start()
    try:
        assert prune_started.wait(10)
        assert beat.wait(10)
        assert not prune_may_end.is_set()     # the beat came while the prune still held its thread
    finally:
        prune_may_end.set()
        consumer.stopping.set()
        for thread in threads:
            thread.join(5)
