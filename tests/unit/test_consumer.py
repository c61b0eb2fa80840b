"""The loop against the in-memory store and a fake clock: every outcome of contract section 3."""

import threading

import pytest

from genesis_pgflow.consumer import Consumer, ConsumerOptions
from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.errors import PermanentError, RetryableError
from genesis_pgflow.testing import FakeClock, MemoryQueueStore

Q = "genesis_rule_updates"
RESULTS = "genesis_rule_updates_results"


def rule(i=1, **extra):
    return {"type": "genesis_rule_update", "namespace": "ns", "rule_id": f"r{i}", "confidence": 0.9,
            "rule": {}, **extra}


class Handler:
    payload_type = "genesis_rule_update"

    def __init__(self, action=None):
        self.action = action or (lambda payload, ctx: {"status": "applied", "rule_id": payload.rule_id})
        self.calls = 0

    def __call__(self, payload, ctx):
        self.calls += 1
        return self.action(payload, ctx)


class Gate:
    """A handler that blocks until released; counts how many are inside."""

    payload_type = "genesis_rule_update"

    def __init__(self):
        self.release = threading.Event()
        self.inside = 0
        self.entered = threading.Semaphore(0)
        self.lock = threading.Lock()

    def __call__(self, payload, ctx):
        with self.lock:
            self.inside += 1
        self.entered.release()
        self.release.wait(10)
        with self.lock:
            self.inside -= 1
        return {"late": True}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(clock):
    return MemoryQueueStore(clock=clock)


def make(store, clock, handler, *, parallel=2, max_attempts=3, timeout_s=5.0, lease_s=10, grace=0.0):
    dispatcher = Dispatcher({handler.payload_type: handler}, timeout_s=timeout_s, max_attempts=max_attempts,
                            retry_base_s=2.0, retry_max_s=60.0, clock=lambda: clock.utc(), rand=lambda: 0.0)
    options = ConsumerOptions(queues=(Q,), parallel=parallel, batch_size=10, poll_interval_s=0.01,
                              lease_s=lease_s, shutdown_grace_s=grace)
    return Consumer(store, dispatcher, options, monotonic=clock, rand=lambda: 0.5)


def settle(consumer, until, rounds=200):
    for _ in range(rounds):
        consumer.run_once(wait_s=0.05)
        if until():
            return
    raise AssertionError("condition not reached")


def results(store):
    return store.messages(RESULTS)


def test_success_publishes_one_result_and_archives(store, clock):
    msg_id = store.send(Q, rule(1))
    consumer = make(store, clock, Handler())
    settle(consumer, lambda: results(store))
    [result] = results(store)
    assert result["status"] == "completed" and result["result"] == {"status": "applied", "rule_id": "r1"}
    assert result["request"] == {"queue": Q, "msg_id": msg_id, "type": "genesis_rule_update", "attempt": 1}
    assert store.archived(Q) == [msg_id] and store.messages(Q) == []
    assert store.runs[(Q, msg_id)]["status"] == "completed"


@pytest.mark.parametrize("body, code", [
    ([1, 2, 3], "invalid_payload"),
    (rule(1, confidence="high"), "invalid_payload"),
    ({"type": "genesis_nothing"}, "unknown_type"),
])
def test_bad_messages_fail_at_once_without_running_the_handler(store, clock, body, code):
    handler = Handler()
    store.send(Q, body)
    settle(make(store, clock, handler), lambda: results(store))
    [result] = results(store)
    assert result["status"] == "failed" and result["error"]["code"] == code
    assert handler.calls == 0 and store.messages(Q) == [] and len(store.archived(Q)) == 1


def test_a_permanent_error_fails_with_its_own_code_and_the_request_ids(store, clock):
    class Nope(PermanentError):
        code = "nope"

    def fail(payload, ctx):
        raise Nope("no way", details={"why": "because"})

    store.send(Q, rule(7))
    settle(make(store, clock, Handler(fail)), lambda: results(store))
    [result] = results(store)
    assert result["error"] == {"code": "nope", "message": "no way",
                               "details": {"namespace": "ns", "rule_id": "r7", "version": 1, "why": "because"}}


def test_transient_errors_retry_with_backoff_then_dead_letter(store, clock):
    handler = Handler(lambda p, c: (_ for _ in ()).throw(RetryableError("db hiccup")))
    msg_id = store.send(Q, rule(1))
    consumer = make(store, clock, handler, max_attempts=3)
    settle(consumer, lambda: handler.calls == 1 and not consumer.running and not consumer.retries)
    assert results(store) == [] and store.runs[(Q, msg_id)]["status"] == "pending"
    # backoff with rand=0: attempt 1 -> 1 s, attempt 2 -> 2 s; invisible until then
    consumer.run_once()
    assert handler.calls == 1
    clock.advance(1.0)
    settle(consumer, lambda: handler.calls == 2 and not consumer.running and not consumer.retries)
    clock.advance(1.9)
    consumer.run_once()
    assert handler.calls == 2
    clock.advance(0.1)
    settle(consumer, lambda: results(store))
    [result] = results(store)
    assert handler.calls == 3
    assert result["error"]["code"] == "max_attempts_exceeded"
    assert result["error"]["details"]["last_error_code"] == "retryable_error"
    assert result["request"]["attempt"] == 3
    assert store.messages("genesis_rule_updates_dlq") == [rule(1)]
    assert store.archived(Q) == [msg_id]


def test_unexpected_exceptions_are_retried_like_transient_ones(store, clock):
    handler = Handler(lambda p, c: 1 / 0)
    store.send(Q, rule(1))
    consumer = make(store, clock, handler, max_attempts=1)
    settle(consumer, lambda: results(store))
    assert results(store)[0]["error"]["details"]["last_error_code"] == "internal_error"


def test_a_message_read_more_than_max_attempts_is_dead_lettered_without_running(store, clock):
    handler = Handler()
    msg_id = store.send(Q, rule(1))
    for _ in range(3):                       # three consumers died holding it
        store.read(Q, 1, lease_s=0)
    settle(make(store, clock, handler, max_attempts=3), lambda: results(store))
    [result] = results(store)
    assert handler.calls == 0
    assert result["error"]["code"] == "max_attempts_exceeded" and result["request"]["attempt"] == 4
    assert store.messages("genesis_rule_updates_dlq") == [rule(1)] and store.archived(Q) == [msg_id]


def test_timeout_reports_at_once_and_keeps_the_slot_until_the_thread_returns(store, clock):
    gate = Gate()
    store.send(Q, rule(1))
    store.send(Q, rule(2))
    store.send(Q, rule(3))
    consumer = make(store, clock, gate, parallel=2, timeout_s=5.0)
    consumer.run_once()
    assert gate.entered.acquire(timeout=5) and gate.entered.acquire(timeout=5)
    assert consumer.free_slots() == 0
    clock.advance(5.0)
    consumer.run_once()
    assert [r["error"]["code"] for r in results(store)] == ["timeout", "timeout"]
    assert consumer.free_slots() == 0 and len(consumer.overrun) == 2   # threads still inside
    consumer.run_once()
    assert len(store.messages(Q)) == 1                                  # the third was not fetched
    gate.release.set()
    settle(consumer, lambda: len(results(store)) == 3)
    assert results(store)[2]["status"] == "completed"                   # late returns were discarded
    assert [r["status"] for r in results(store)[:2]] == ["failed", "failed"]


def test_never_holds_more_messages_than_free_slots(store, clock):
    gate = Gate()
    for i in range(10):
        store.send(Q, rule(i))
    consumer = make(store, clock, gate, parallel=3)
    consumer.run_once()
    consumer.run_once()
    leased = [m for m in store.queues[Q].values() if m.read_ct > 0]
    assert len(leased) == 3 and len(consumer.running) == 3
    gate.release.set()
    settle(consumer, lambda: len(results(store)) == 10)
    assert len(store.archived(Q)) == 10


def test_leases_are_renewed_while_work_runs(store, clock):
    gate = Gate()
    store.send(Q, rule(1))
    consumer = make(store, clock, gate, parallel=1, timeout_s=100.0, lease_s=3)
    consumer.run_once()
    assert gate.entered.acquire(timeout=5)
    for _ in range(10):              # 10 s pass in steps of 1 s, far beyond the 3 s lease
        clock.advance(1.0)
        consumer.run_once()
        assert store.read(Q, 1, lease_s=3) == []     # a second consumer sees nothing
    gate.release.set()
    settle(consumer, lambda: results(store))
    assert len(results(store)) == 1


def test_shutdown_gives_unfinished_work_back(store, clock):
    started = threading.Event()

    def until_cancelled(payload, ctx):
        started.set()
        ctx.cancelled.wait(10)
        return {"late": True}

    msg_id = store.send(Q, rule(1))
    consumer = make(store, clock, Handler(until_cancelled), parallel=1, grace=0.0)
    consumer.run_once()
    assert started.wait(5)
    clock.advance(1.0)
    consumer.run_once()                                          # held a second: recorded running
    assert store.runs[(Q, msg_id)]["status"] == "running" and store.runs[(Q, msg_id)]["attempts"] == 1
    consumer.stop()
    consumer.shutdown()
    assert results(store) == []                                  # what the cancelled run returned is dropped
    assert store.runs[(Q, msg_id)]["status"] == "pending" and store.runs[(Q, msg_id)]["attempts"] == 0
    [again] = store.read(Q, 1, lease_s=10)
    assert again.msg_id == msg_id and again.read_ct == 1         # visible again at once, the give-back uncounted


def test_a_run_is_recorded_running_only_once_it_has_been_held_a_second(store, clock):
    """A quick run is written once, when it ends; one held a second (running, or waiting for a
    worker) is recorded running, once, and then finished."""
    gate = Gate()
    quick = store.send(Q, rule(1))
    consumer = make(store, clock, Handler(), parallel=2)
    settle(consumer, lambda: len(results(store)) == 1)
    assert store.runs[(Q, quick)]["status"] == "completed"
    recorded: list[list[int]] = []
    record = store.record_running
    store.record_running = lambda runs: (recorded.append([r.message.msg_id for r in runs]), record(runs))[1]
    slow = store.send(Q, rule(2))
    consumer = make(store, clock, gate, parallel=1)
    consumer.run_once()
    assert gate.entered.acquire(timeout=5)
    clock.advance(0.9)
    consumer.run_once()
    assert (Q, slow) not in store.runs and recorded == []
    clock.advance(0.1)
    consumer.run_once()
    consumer.run_once()
    assert store.runs[(Q, slow)]["status"] == "running" and recorded == [[slow]]
    gate.release.set()
    settle(consumer, lambda: len(results(store)) == 2)
    assert store.runs[(Q, slow)]["status"] == "completed" and recorded == [[slow]]


class Inline(Handler):
    """An inline handler (handlers.base.Handler): the loop runs it itself as it reads."""

    inline = True

    def __init__(self, action=None):
        super().__init__(action)
        self.threads = set()

    def __call__(self, payload, ctx):
        self.threads.add(threading.current_thread().name)
        return super().__call__(payload, ctx)


def test_an_inline_handler_runs_on_the_loop_thread_and_takes_no_worker(store, clock):
    for i in range(5):
        store.send(Q, rule(i))
    handler = Inline()
    consumer = make(store, clock, handler, parallel=1)
    consumer.run_once()                     # one turn: read, run and answer all five
    consumer.complete()
    assert handler.threads == {threading.current_thread().name} and handler.calls == 5
    assert [r["status"] for r in results(store)] == ["completed"] * 5 and store.depth((Q,)) == 0
    assert consumer.free_slots() == 1 and not consumer.executor.running


def test_an_inline_handler_that_returns_past_its_deadline_is_a_timeout(store, clock):
    def slow(payload, ctx):
        clock.advance(6.0)
        return {"late": True}

    store.send(Q, rule(1))
    consumer = make(store, clock, Inline(slow), timeout_s=5.0)
    consumer.run_once()
    consumer.complete()
    [result] = results(store)
    assert result["status"] == "failed" and result["error"]["code"] == "timeout"


def test_an_inline_handler_that_raises_is_retried_like_any_other(store, clock):
    def boom(payload, ctx):
        raise RetryableError("not now")

    store.send(Q, rule(1))
    consumer = make(store, clock, Inline(boom))
    consumer.run_once()
    consumer.complete()
    assert results(store) == [] and store.runs[(Q, 1)]["status"] == "pending"


def test_drain_exits_once_everything_is_done(store, clock):
    for i in range(5):
        store.send(Q, rule(i))
    consumer = make(store, clock, Handler())
    consumer.options = ConsumerOptions(**{**vars(consumer.options), "drain": True})
    thread = threading.Thread(target=consumer.run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert len(results(store)) == 5 and store.depth((Q,)) == 0


def test_parallel_one_runs_one_at_a_time(store, clock):
    inside, peak, lock = [0], [0], threading.Lock()

    def work(payload, ctx):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        threading.Event().wait(0.01)
        with lock:
            inside[0] -= 1
        return {}

    for i in range(6):
        store.send(Q, rule(i))
    consumer = make(store, clock, Handler(work), parallel=1)
    settle(consumer, lambda: len(results(store)) == 6)
    assert peak[0] == 1


def test_a_handler_default_timeout_beats_the_consumer_default(store, clock):
    gate = Gate()
    gate.timeout_s = lambda payload: 50.0
    store.send(Q, rule(1))
    consumer = make(store, clock, gate, parallel=1, timeout_s=5.0)
    consumer.run_once()
    assert gate.entered.acquire(timeout=5)
    clock.advance(10.0)
    consumer.run_once()
    assert results(store) == []
    clock.advance(40.0)
    consumer.run_once()
    [timed_out] = results(store)
    assert timed_out["error"]["code"] == "timeout" and timed_out["error"]["details"]["timeout_ms"] == 50000
    gate.release.set()


def test_a_periodic_report_says_what_was_done(store, clock, caplog):
    store.send(Q, rule(1))
    store.send(Q, [1])
    consumer = make(store, clock, Handler())
    settle(consumer, lambda: len(results(store)) == 2)
    with caplog.at_level("INFO", logger="genesis_pgflow.consumer"):
        consumer.report()
        assert caplog.messages == []
        clock.advance(60)
        consumer.report()
    assert caplog.messages == ["last 60 s: 1 completed, 1 failed; 0 in flight"]


def test_each_failure_is_one_info_line_with_its_fields_and_observers_see_what_was_stored(store, clock, caplog):
    def refuse(payload, ctx):
        if payload.rule_id == "r2":
            raise PermanentError("no such thing")
        return {"status": "applied"}

    consumer = make(store, clock, Handler(refuse))
    seen = []
    consumer.observers.append(lambda outcomes: seen.extend(o.message.msg_id for o in outcomes))
    ids = [store.send(Q, rule(i)) for i in (1, 2)]
    caplog.set_level("DEBUG", logger="genesis_pgflow.consumer")
    settle(consumer, lambda: len(store.messages(RESULTS)) == 2)
    assert sorted(seen) == ids
    failures = [r for r in caplog.records if r.levelname == "INFO" and "permanent_error" in r.getMessage()]
    assert [(r.queue, r.msg_id, r.code, r.status, r.type) for r in failures] == [  # type: ignore[attr-defined]
        (Q, ids[1], "permanent_error", "failed", "genesis_rule_update")]
    done = [r for r in caplog.records if r.levelname == "DEBUG" and r.getMessage().startswith("completed")]
    assert [r.msg_id for r in done] == [ids[0]]  # type: ignore[attr-defined]
