"""The consumer against PgQueueStore on a real PostgreSQL with pgmq: every row of the contract's
section 3, the result envelope of section 4, leases, concurrency, LISTEN/NOTIFY and secrets."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from genesis_pgflow.consumer import Consumer, ConsumerOptions
from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.errors import PermanentError, RetryableError
from genesis_pgflow.handlers.base import Handler, WorkContext
from genesis_pgflow.handlers.llm_config import LlmConfigManager
from genesis_pgflow.handlers.rules import RuleEngine
from genesis_pgflow.messages import Outcome, ReadMessage
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.queue import PgQueueStore
from genesis_pgflow.store.state import PgStateStore
from genesis_pgflow.testing import wait_until

pytestmark = pytest.mark.db

RULES = "genesis_rule_updates"
RULES_RESULTS = "genesis_rule_updates_results"
RULES_DLQ = "genesis_rule_updates_dlq"
LLM = "genesis_llm_config_updates"
LLM_RESULTS = "genesis_llm_config_updates_results"
ENVELOPE_FIELDS = {"workflow_id", "request", "status", "result", "error", "started_at", "finished_at",
                   "execution_ms", "consumer"}


# --- waiting on conditions, never on fixed sleeps ------------------------------------------


def drive(consumer: Consumer, until: Callable[[], Any], timeout: float = 10.0, what: str = "the condition") -> Any:
    """Run the consumer's loop one iteration at a time, in this thread, until the condition holds."""
    def step() -> Any:
        consumer.run_once(wait_s=0.05)
        return until()
    return wait_until(step, timeout, interval=0.02, what=what)


# --- SQL the way a DBA or a producer would write it -----------------------------------------


def query(dsn: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def send_sql(dsn: str, queue: str, body: Any) -> int:
    """Enqueue like a producer: plain SQL, the body given as JSON text."""
    text = body if isinstance(body, str) else json.dumps(body)
    return query(dsn, "SELECT pgmq.send(%s, %s::jsonb) AS msg_id", (queue, text))[0]["msg_id"]


def results(dsn: str, results_queue: str) -> list[dict[str, Any]]:
    return [r["message"] for r in query(dsn, f"SELECT message FROM pgmq.q_{results_queue} ORDER BY msg_id")]


def results_for(dsn: str, results_queue: str, msg_id: int) -> list[dict[str, Any]]:
    return [m for m in results(dsn, results_queue) if m["request"]["msg_id"] == msg_id]


def in_queue(dsn: str, queue: str) -> list[dict[str, Any]]:
    return query(dsn, f"SELECT msg_id, read_ct, vt, message, vt > clock_timestamp() AS invisible "
                      f"FROM pgmq.q_{queue} ORDER BY msg_id")


def archived_ids(dsn: str, queue: str) -> list[int]:
    return [r["msg_id"] for r in query(dsn, f"SELECT msg_id FROM pgmq.a_{queue} ORDER BY msg_id")]


def run_row(dsn: str, queue: str, msg_id: int) -> dict[str, Any] | None:
    rows = query(dsn, "SELECT * FROM genesis.workflow_runs WHERE queue = %s AND msg_id = %s", (queue, msg_id))
    return rows[0] if rows else None


def bump_read_count(dsn: str, queue: str, times: int) -> None:
    """What consumers killed mid-work leave behind: the message read `times` times, never finished."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(times):
            assert conn.execute("SELECT msg_id FROM pgmq.read(%s, 0, 1)", (queue,)).fetchall()


def rule(i: int | str, **extra: Any) -> dict[str, Any]:
    return {"type": "genesis_rule_update", "namespace": "ns", "rule_id": f"r{i}", "version": 1,
            "confidence": 0.9, "rule": {"when": "x", "then": "y"}, **extra}


# --- checking one message's fate ---------------------------------------------------------


def parse_ts(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text)
    assert value.tzinfo is not None, f"{text} has no time zone"
    return value


def check_envelope(envelope: dict[str, Any], *, queue: str, msg_id: int, type_: str | None, attempt: int,
                   status: str, consumer: str) -> None:
    assert ENVELOPE_FIELDS <= set(envelope), envelope
    uuid.UUID(envelope["workflow_id"])
    assert envelope["request"] == {"queue": queue, "msg_id": msg_id, "type": type_, "attempt": attempt}
    assert envelope["status"] == status
    if status == "completed":
        assert isinstance(envelope["result"], dict) and envelope["error"] is None
    else:
        assert envelope["result"] is None
        error = envelope["error"]
        assert isinstance(error, dict) and {"code", "message", "details"} <= set(error)
        assert isinstance(error["code"], str) and error["message"] and isinstance(error["details"], dict)
    started, finished = parse_ts(envelope["started_at"]), parse_ts(envelope["finished_at"])
    assert started <= finished
    assert isinstance(envelope["execution_ms"], (int, float)) and envelope["execution_ms"] >= 0
    assert envelope["execution_ms"] == pytest.approx((finished - started).total_seconds() * 1000, abs=1.0)
    assert envelope["consumer"] == consumer


def check_finished(dsn: str, queue: str, results_queue: str, msg_id: int, *, status: str, attempt: int,
                   consumer: str, type_: str | None = "genesis_rule_update") -> dict[str, Any]:
    """Exactly one result, the request archived, the run recorded; returns the result envelope."""
    found = results_for(dsn, results_queue, msg_id)
    assert len(found) == 1, f"{len(found)} results for {queue}/{msg_id}"
    envelope = found[0]
    check_envelope(envelope, queue=queue, msg_id=msg_id, type_=type_, attempt=attempt, status=status,
                   consumer=consumer)
    assert msg_id in archived_ids(dsn, queue)
    assert msg_id not in [m["msg_id"] for m in in_queue(dsn, queue)]
    run = run_row(dsn, queue, msg_id)
    assert run is not None
    assert run["status"] == status
    assert run["attempts"] == attempt
    assert str(run["workflow_id"]) == envelope["workflow_id"]
    assert run["type"] == type_
    assert run["finished_at"] is not None and run["consumer"] == consumer
    assert run["started_at"] == parse_ts(envelope["started_at"])
    assert run["finished_at"] == parse_ts(envelope["finished_at"])
    [archived] = query(dsn, f"SELECT enqueued_at, read_ct, last_read_at, vt, archived_at FROM pgmq.a_{queue} "
                            "WHERE msg_id = %s", (msg_id,))
    assert run["enqueued_at"] == archived["enqueued_at"]
    # the archive keeps the request's row as its last read left it (pgmq's columns, as pgmq.archive does)
    assert archived["read_ct"] == attempt and archived["last_read_at"] is not None, archived
    assert archived["enqueued_at"] <= archived["last_read_at"] <= archived["archived_at"]
    assert archived["vt"] > archived["last_read_at"], "leased by that read"
    # SQL NULL, not a JSON null: the DBA views and the error triggers test IS NULL
    [nulls] = query(dsn, "SELECT error IS NULL AS no_error, result IS NULL AS no_result FROM genesis.workflow_runs "
                         "WHERE queue = %s AND msg_id = %s", (queue, msg_id))
    if status == "completed":
        assert run["result"] == envelope["result"] and nulls == {"no_error": True, "no_result": False}
    else:
        assert run["error"] == envelope["error"] and nulls == {"no_error": False, "no_result": True}
    return envelope


# --- handlers for the tests --------------------------------------------------------------


class ProbeHandler:
    """A genesis_rule_update handler that records its calls and does what `action` says."""

    def __init__(self, action: Callable[[Any, WorkContext], dict[str, Any] | None] | None = None,
                 payload_type: str = "genesis_rule_update"):
        self.payload_type = payload_type
        self.action = action
        self.calls: list[tuple[int, float]] = []    # (attempt, monotonic time)
        self.contexts: list[WorkContext] = []
        self.entered = threading.Event()
        self.returned = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, payload: Any, ctx: WorkContext) -> dict[str, Any]:
        with self._lock:
            self.calls.append((ctx.attempt, time.monotonic()))
            self.contexts.append(ctx)
        self.entered.set()
        try:
            result = self.action(payload, ctx) if self.action else None
            return result if result is not None else {"status": "applied", **payload.identifiers()}
        finally:
            self.returned.set()


class Flaky(RetryableError):
    """The downstream service hiccuped."""

    code = "flaky"


class Forbidden(PermanentError):
    """This rule may never be applied."""

    code = "forbidden_rule"


# --- building consumers the way app.App does -------------------------------------------------


class Harness:
    """Builds PgQueueStore-backed consumers on one test database and tears them all down."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._databases: list[Database] = []
        self._stores: list[PgQueueStore] = []
        self._consumers: list[Consumer] = []
        self._threads: list[threading.Thread] = []
        self._gates: list[threading.Event] = []
        self.thread_errors: list[BaseException] = []

    def database(self) -> Database:
        db = Database(self.dsn, max_size=8, retry_for_s=5.0).open()
        self._databases.append(db)
        return db

    def store(self, name: str = "test-host:1", store_class: type[PgQueueStore] = PgQueueStore) -> PgQueueStore:
        store = store_class(self.database(), name)
        self._stores.append(store)
        return store

    def gate(self) -> threading.Event:
        """An event a handler blocks on; set at teardown at the latest, so no thread is left waiting."""
        event = threading.Event()
        self._gates.append(event)
        return event

    def consumer(self, handlers: list[Handler], *, name: str = "test-host:1", store: PgQueueStore | None = None,
                 queues: tuple[str, ...] = (RULES,), parallel: int = 2, batch_size: int = 10, lease_s: int = 10,
                 timeout_s: float = 30.0, max_attempts: int = 3, retry_base_s: float = 0.5,
                 retry_max_s: float = 60.0, poll_interval_s: float = 0.05, drain: bool = False,
                 shutdown_grace_s: float = 2.0, rand: Callable[[], float] = lambda: 1.0) -> Consumer:
        store = store or self.store(name)
        dispatcher = Dispatcher({h.payload_type: h for h in handlers}, timeout_s=timeout_s,
                                max_attempts=max_attempts, retry_base_s=retry_base_s, retry_max_s=retry_max_s,
                                rand=rand)
        options = ConsumerOptions(queues=queues, parallel=parallel, batch_size=batch_size,
                                  poll_interval_s=poll_interval_s, lease_s=lease_s, drain=drain,
                                  shutdown_grace_s=shutdown_grace_s)
        consumer = Consumer(store, dispatcher, options, rand=rand)
        self._consumers.append(consumer)
        return consumer

    def run_in_thread(self, consumer: Consumer) -> threading.Thread:
        def target() -> None:
            try:
                consumer.run()
            except BaseException as exc:  # noqa: BLE001 - asserted by the test
                self.thread_errors.append(exc)

        thread = threading.Thread(target=target, name="test-consumer", daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def close(self) -> None:
        for gate in self._gates:
            gate.set()
        for consumer in self._consumers:
            consumer.stop()
        for thread in self._threads:
            # generous: a consumer slow to stop is the business of test_stop_* below, not of teardown
            thread.join(timeout=45)
        for consumer in self._consumers:
            consumer.pool.stop()
        for store in self._stores:
            store.close()
        for db in self._databases:
            db.close()
        assert not [t for t in self._threads if t.is_alive()], "a consumer did not stop"
        assert self.thread_errors == []


@pytest.fixture
def harness(db_dsn: str) -> Iterator[Harness]:
    h = Harness(db_dsn)
    yield h
    h.close()


# --- section 3, row by row ---------------------------------------------------------------


def test_a_handler_that_succeeds_completes_the_message(harness: Harness) -> None:
    state = PgStateStore(harness.database())
    consumer = harness.consumer([RuleEngine(state)])
    msg_id = send_sql(harness.dsn, RULES, rule(1, version=2, extra_field="ignored"))

    drive(consumer, lambda: results(harness.dsn, RULES_RESULTS), what="a result")

    envelope = check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="completed", attempt=1,
                              consumer="test-host:1")
    assert envelope["result"] == {"status": "applied", "namespace": "ns", "rule_id": "r1", "version": 2,
                                  "confidence": 0.9}
    assert state.rules("ns")[0]["version"] == 2
    assert consumer.stats.outcomes["completed"] == 1


@pytest.mark.parametrize("body", ['[1, 2, 3]', '"a string"', '42', 'null'], ids=["array", "string", "number", "null"])
def test_a_body_that_is_not_a_json_object_fails_as_invalid_payload(harness: Harness, body: str) -> None:
    handler = ProbeHandler()
    consumer = harness.consumer([handler])
    msg_id = send_sql(harness.dsn, RULES, body)

    drive(consumer, lambda: results(harness.dsn, RULES_RESULTS), what="a result")

    envelope = check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="failed", attempt=1,
                              consumer="test-host:1", type_=None)
    assert envelope["error"]["code"] == "invalid_payload"
    assert "JSON object" in envelope["error"]["message"]
    assert not handler.calls


def test_a_missing_field_fails_as_invalid_payload_naming_the_field(harness: Harness) -> None:
    handler = ProbeHandler()
    consumer = harness.consumer([handler])
    body = rule(7)
    del body["confidence"]
    msg_id = send_sql(harness.dsn, RULES, body)

    drive(consumer, lambda: results(harness.dsn, RULES_RESULTS), what="a result")

    envelope = check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="failed", attempt=1,
                              consumer="test-host:1")
    error = envelope["error"]
    assert error["code"] == "invalid_payload"
    assert "confidence" in error["message"]
    assert "confidence" in json.dumps(error["details"])
    assert error["details"]["rule_id"] == "r7"  # identifiers echoed for correlation
    assert not handler.calls


def test_an_invalid_field_fails_naming_the_field_and_what_was_wrong(harness: Harness) -> None:
    consumer = harness.consumer([ProbeHandler()])
    msg_id = send_sql(harness.dsn, RULES, rule(8, confidence=1.5))

    drive(consumer, lambda: results(harness.dsn, RULES_RESULTS), what="a result")

    error = check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="failed", attempt=1,
                           consumer="test-host:1")["error"]
    assert error["code"] == "invalid_payload"
    assert "confidence" in error["message"] and "1" in error["message"]


def test_an_unknown_type_fails_as_unknown_type(harness: Harness) -> None:
    handler = ProbeHandler()
    consumer = harness.consumer([handler])
    msg_id = send_sql(harness.dsn, RULES, {"type": "genesis_teleport_request", "id": "t-1"})

    drive(consumer, lambda: results(harness.dsn, RULES_RESULTS), what="a result")

    envelope = check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="failed", attempt=1,
                              consumer="test-host:1", type_="genesis_teleport_request")
    assert envelope["error"]["code"] == "unknown_type"
    assert "genesis_teleport_request" in envelope["error"]["message"]
    assert envelope["error"]["details"].get("id") == "t-1"
    assert not handler.calls


def test_a_handler_past_its_timeout_fails_at_once_and_keeps_its_slot_until_it_returns(harness: Harness) -> None:
    release = harness.gate()
    handler = ProbeHandler(lambda payload, ctx: (release.wait(20), None)[1])
    consumer = harness.consumer([handler], parallel=2, timeout_s=0.3)
    msg_id = send_sql(harness.dsn, RULES, rule(1))

    drive(consumer, lambda: results(harness.dsn, RULES_RESULTS), what="the timeout result")

    # reported while the handler is still running
    assert handler.entered.is_set() and not handler.returned.is_set()
    envelope = check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="failed", attempt=1,
                              consumer="test-host:1")
    assert envelope["error"]["code"] == "timeout"
    assert envelope["error"]["details"]["rule_id"] == "r1"
    assert handler.contexts[0].cancelled.is_set()
    # the thread still runs, so its slot is still counted
    assert consumer.free_slots() == 1
    consumer.run_once(wait_s=0.05)
    assert consumer.free_slots() == 1

    release.set()
    wait_until(handler.returned.is_set, what="the handler to return")
    drive(consumer, lambda: consumer.free_slots() == 2, what="the slot to be freed")
    # what the overrunning handler returned is discarded: still one result
    assert len(results(harness.dsn, RULES_RESULTS)) == 1
    assert run_row(harness.dsn, RULES, msg_id)["status"] == "failed"


def test_a_permanent_error_fails_with_the_handlers_own_code_and_is_not_retried(harness: Harness) -> None:
    def refuse(payload: Any, ctx: WorkContext) -> None:
        raise Forbidden("rule r3 touches production", details={"reason": "policy"})

    handler = ProbeHandler(refuse)
    consumer = harness.consumer([handler])
    msg_id = send_sql(harness.dsn, RULES, rule(3))

    drive(consumer, lambda: results(harness.dsn, RULES_RESULTS), what="a result")

    envelope = check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="failed", attempt=1,
                              consumer="test-host:1")
    assert envelope["error"]["code"] == "forbidden_rule"
    assert envelope["error"]["message"] == "rule r3 touches production"
    assert envelope["error"]["details"] == {"namespace": "ns", "rule_id": "r3", "version": 1, "reason": "policy"}
    assert len(handler.calls) == 1
    assert in_queue(harness.dsn, RULES_DLQ) == []


def test_low_confidence_is_a_permanent_failure_of_the_rule_engine(harness: Harness) -> None:
    consumer = harness.consumer([RuleEngine(PgStateStore(harness.database()))])
    msg_id = send_sql(harness.dsn, RULES, rule(4, confidence=0.5))

    drive(consumer, lambda: results(harness.dsn, RULES_RESULTS), what="a result")

    error = check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="failed", attempt=1,
                           consumer="test-host:1")["error"]
    assert error["code"] == "low_confidence"
    assert error["details"]["rule_id"] == "r4"


def test_a_transient_error_is_retried_with_backoff_then_dead_lettered(harness: Harness) -> None:
    def hiccup(payload: Any, ctx: WorkContext) -> None:
        raise Flaky(f"upstream busy on attempt {ctx.attempt}", details={"upstream": "rules-db"})

    handler = ProbeHandler(hiccup)
    base = 0.6  # rand() == 1.0: the delay after attempt n is exactly base * 2**(n-1)
    consumer = harness.consumer([handler], max_attempts=3, retry_base_s=base)
    body = rule(5)
    msg_id = send_sql(harness.dsn, RULES, body)
    other = harness.store("test-host:2")

    # attempt 1 fails: the run is pending, the message invisible for the backoff
    drive(consumer, lambda: (run_row(harness.dsn, RULES, msg_id) or {}).get("status") == "pending",
          what="the first retry to be scheduled")
    run = run_row(harness.dsn, RULES, msg_id)
    assert run["attempts"] == 1
    assert run["error"]["code"] == "flaky" and run["error"]["details"]["upstream"] == "rules-db"
    assert run["next_attempt_at"] is not None
    [queued] = in_queue(harness.dsn, RULES)
    assert queued["invisible"] and queued["read_ct"] == 1
    assert other.read(RULES, 10, 30) == []
    assert results(harness.dsn, RULES_RESULTS) == []

    # attempt 2 after the backoff, then attempt 3 (the last) dead-letters
    drive(consumer, lambda: results(harness.dsn, RULES_RESULTS), timeout=15, what="the final result")

    assert [attempt for attempt, _ in handler.calls] == [1, 2, 3]
    gaps = [later - earlier for (_, earlier), (_, later) in zip(handler.calls, handler.calls[1:], strict=False)]
    assert gaps[0] >= base * 0.9 and gaps[1] >= 2 * base * 0.9, gaps
    envelope = check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="failed", attempt=3,
                              consumer="test-host:1")
    error = envelope["error"]
    assert error["code"] == "max_attempts_exceeded"
    assert error["details"]["last_error_code"] == "flaky"
    assert error["details"]["attempts"] == 3
    assert error["details"]["rule_id"] == "r5"
    assert "upstream busy on attempt 3" in error["message"]
    [letter] = in_queue(harness.dsn, RULES_DLQ)
    assert letter["message"] == body
    assert consumer.stats.outcomes == {"retry": 2, "dead_letter": 1}


def test_an_unexpected_exception_is_retried_as_an_internal_error(harness: Harness) -> None:
    def crash(payload: Any, ctx: WorkContext) -> None:
        raise ValueError("bug in the handler")

    consumer = harness.consumer([ProbeHandler(crash)], max_attempts=3, retry_base_s=30)
    msg_id = send_sql(harness.dsn, RULES, rule(6))

    drive(consumer, lambda: (run_row(harness.dsn, RULES, msg_id) or {}).get("status") == "pending",
          what="the retry to be scheduled")
    run = run_row(harness.dsn, RULES, msg_id)
    assert run["error"]["code"] == "internal_error"
    assert "bug in the handler" in run["error"]["message"]
    assert in_queue(harness.dsn, RULES)[0]["invisible"]
    assert results(harness.dsn, RULES_RESULTS) == []


def test_a_message_read_more_than_max_attempts_times_is_dead_lettered_without_running(harness: Harness) -> None:
    handler = ProbeHandler()
    consumer = harness.consumer([handler], max_attempts=3)
    body = rule(9)
    msg_id = send_sql(harness.dsn, RULES, body)
    bump_read_count(harness.dsn, RULES, 3)  # three consumers took it and died

    drive(consumer, lambda: results(harness.dsn, RULES_RESULTS), what="a result")

    assert handler.calls == []
    envelope = check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="failed", attempt=4,
                              consumer="test-host:1")
    error = envelope["error"]
    assert error["code"] == "max_attempts_exceeded"
    assert error["details"]["attempts"] == 4
    assert error["details"]["rule_id"] == "r9"
    [letter] = in_queue(harness.dsn, RULES_DLQ)
    assert letter["message"] == body


@pytest.mark.parametrize("body", ['[1, 2]', 'null', '{"type": "genesis_rule_update"}'],
                         ids=["array", "null", "invalid-object"])
def test_a_poison_message_that_would_not_validate_is_dead_lettered_as_it_was(harness: Harness, body: str) -> None:
    consumer = harness.consumer([ProbeHandler()], max_attempts=2)
    msg_id = send_sql(harness.dsn, RULES, body)
    bump_read_count(harness.dsn, RULES, 2)

    drive(consumer, lambda: results(harness.dsn, RULES_RESULTS), what="a result")

    type_ = "genesis_rule_update" if body.startswith("{") else None
    envelope = check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="failed", attempt=3,
                              consumer="test-host:1", type_=type_)
    assert envelope["error"]["code"] == "max_attempts_exceeded"
    assert [letter["message"] for letter in in_queue(harness.dsn, RULES_DLQ)] == [json.loads(body)]


def test_a_message_on_its_last_read_still_runs(harness: Harness) -> None:
    handler = ProbeHandler()
    consumer = harness.consumer([handler], max_attempts=3)
    msg_id = send_sql(harness.dsn, RULES, rule(10))
    bump_read_count(harness.dsn, RULES, 2)

    drive(consumer, lambda: results(harness.dsn, RULES_RESULTS), what="a result")

    assert [attempt for attempt, _ in handler.calls] == [3]
    check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="completed", attempt=3, consumer="test-host:1")


# --- leases ----------------------------------------------------------------------------


@pytest.mark.slow
def test_lease_renewal_keeps_a_long_running_message_from_other_consumers(harness: Harness) -> None:
    release = harness.gate()
    handler = ProbeHandler(lambda payload, ctx: (release.wait(20), None)[1])
    consumer = harness.consumer([handler], lease_s=2, timeout_s=30, poll_interval_s=0.1)
    msg_id = send_sql(harness.dsn, RULES, rule(11))
    other = harness.store("test-host:2")
    harness.run_in_thread(consumer)
    assert handler.entered.wait(10)

    # 5 s is 2.5 leases: without renewal the message would be visible again after 2 s
    watch_until = time.monotonic() + 5.0
    while time.monotonic() < watch_until:
        assert other.read(RULES, 10, 30) == [], "a second consumer got a message that is still being worked on"
        time.sleep(0.1)
    release.set()

    wait_until(lambda: results(harness.dsn, RULES_RESULTS), what="the result")
    check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="completed", attempt=1, consumer="test-host:1")
    assert len(handler.calls) == 1


def test_a_lost_lease_still_gives_exactly_one_result(harness: Harness) -> None:
    release = harness.gate()
    slow = ProbeHandler(lambda payload, ctx: (release.wait(20), None)[1])
    fast = ProbeHandler()
    first = harness.consumer([slow], name="test-host:1", lease_s=1, timeout_s=60)
    second = harness.consumer([fast], name="test-host:2", lease_s=10)
    msg_id = send_sql(harness.dsn, RULES, rule(12))

    # the first consumer takes the message and then never renews its lease (a stalled process)
    assert first.fetch() == 1
    assert slow.entered.wait(10)
    wait_until(lambda: not in_queue(harness.dsn, RULES)[0]["invisible"], what="the lease to expire")

    drive(second, lambda: results(harness.dsn, RULES_RESULTS), what="the second consumer's result")
    assert [attempt for attempt, _ in fast.calls] == [2]

    # the first handler finally returns: its outcome is dropped by the archive-first guard
    release.set()
    wait_until(lambda: not first.pool.done.empty(), what="the slow handler to return")
    first.collect()
    first.complete()
    assert first.stats.outcomes["completed"] == 0

    check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="completed", attempt=2, consumer="test-host:2")
    assert len(results(harness.dsn, RULES_RESULTS)) == 1


def test_completing_the_same_outcomes_twice_sends_each_result_once(harness: Harness) -> None:
    store = harness.store("test-host:1")
    handler = ProbeHandler()
    dispatcher = Dispatcher({handler.payload_type: handler}, timeout_s=5, max_attempts=3, retry_base_s=1,
                            retry_max_s=1)
    ids = [send_sql(harness.dsn, RULES, rule(i)) for i in range(5)]
    ids.append(send_sql(harness.dsn, RULES, {"type": "nope"}))
    messages = store.read(RULES, 10, 30)
    assert [m.msg_id for m in messages] == ids

    outcomes: list[Outcome] = []
    for message in messages:
        prepared = dispatcher.prepare(message)
        if not isinstance(prepared, Outcome):
            prepared = dispatcher.execute(prepared, dispatcher.context(prepared, time.monotonic() + 5))
        outcomes.append(prepared)

    assert len(store.complete(outcomes)) == 6
    assert store.complete(outcomes) == []
    assert harness.store("test-host:2").complete(outcomes) == []

    sent = results(harness.dsn, RULES_RESULTS)
    assert sorted(m["request"]["msg_id"] for m in sent) == ids
    assert archived_ids(harness.dsn, RULES) == ids


# --- concurrency and waking -----------------------------------------------------------------


@pytest.mark.slow
def test_three_consumers_share_one_queue_without_duplicates(harness: Harness) -> None:
    handlers = [ProbeHandler() for _ in range(3)]
    consumers = [harness.consumer([h], name=f"test-host:{i}", parallel=4, batch_size=10, drain=True,
                                  poll_interval_s=0.05)
                 for i, h in enumerate(handlers)]
    bodies = [json.dumps(rule(i)) for i in range(300)]
    ids = [r["msg_id"] for r in query(harness.dsn, "SELECT pgmq.send_batch(%s, %s::jsonb[]) AS msg_id",
                                      (RULES, bodies))]
    assert len(ids) == 300

    threads = [harness.run_in_thread(c) for c in consumers]
    for thread in threads:
        thread.join(timeout=60)
    assert not [t for t in threads if t.is_alive()], "a draining consumer did not exit"

    sent = results(harness.dsn, RULES_RESULTS)
    assert len(sent) == 300
    assert sorted(m["request"]["msg_id"] for m in sent) == ids
    assert all(m["status"] == "completed" for m in sent)
    assert archived_ids(harness.dsn, RULES) == ids
    assert in_queue(harness.dsn, RULES) == []
    runs = query(harness.dsn, "SELECT status, count(*) AS n FROM genesis.workflow_runs GROUP BY status")
    assert runs == [{"status": "completed", "n": 300}]
    assert sum(c.stats.outcomes["completed"] for c in consumers) == 300
    assert sum(len(h.calls) for h in handlers) == 300


class ObservedStore(PgQueueStore):
    """PgQueueStore that tells the test when a read came back empty."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.empty_read = threading.Event()

    def read(self, queue: str, qty: int, lease_s: int, *, waited_s: float = 0.0) -> list[ReadMessage]:
        messages = super().read(queue, qty, lease_s, waited_s=waited_s)
        if not messages:
            self.empty_read.set()
        return messages


def test_notify_wakes_an_idle_consumer_long_before_its_poll_interval(harness: Harness) -> None:
    handler = ProbeHandler()
    store = harness.store("test-host:1", store_class=ObservedStore)
    assert isinstance(store, ObservedStore)
    consumer = harness.consumer([handler], store=store, poll_interval_s=120.0)
    harness.run_in_thread(consumer)

    assert store.empty_read.wait(30), "the consumer never polled"
    wait_until(lambda: query(harness.dsn, """
        SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle'
        AND query ILIKE 'LISTEN%%' AND pid <> pg_backend_pid()"""), what="the consumer to LISTEN")

    sent_at = time.monotonic()
    msg_id = send_sql(harness.dsn, RULES, rule(13))
    # generous bounds for a busy machine, far below the 120 s poll interval
    assert handler.entered.wait(30), "not woken by NOTIFY (the poll interval is 120 s)"
    assert time.monotonic() - sent_at < 30
    wait_until(lambda: results(harness.dsn, RULES_RESULTS), what="the result")
    check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="completed", attempt=1, consumer="test-host:1")


# --- secrets ------------------------------------------------------------------------------


def test_secrets_never_reach_results_or_recorded_runs(harness: Harness) -> None:
    secret = "sk-live-" + uuid.uuid4().hex
    state = PgStateStore(harness.database())
    consumer = harness.consumer([LlmConfigManager(state)], queues=(LLM,))
    good = {"type": "genesis_llm_config_update", "provider": "claude", "complexity": "complex",
            "models": ["claude-opus"], "settings": {"api_key": secret, "nested": {"token": secret}}}
    bad = {**good, "complexity": "galactic"}
    good_id = send_sql(harness.dsn, LLM, good)
    bad_id = send_sql(harness.dsn, LLM, bad)

    drive(consumer, lambda: len(results(harness.dsn, LLM_RESULTS)) == 2, what="two results")

    check_finished(harness.dsn, LLM, LLM_RESULTS, good_id, status="completed", attempt=1, consumer="test-host:1",
                   type_="genesis_llm_config_update")
    failed = check_finished(harness.dsn, LLM, LLM_RESULTS, bad_id, status="failed", attempt=1,
                            consumer="test-host:1", type_="genesis_llm_config_update")
    assert failed["error"]["code"] == "invalid_payload" and "complexity" in failed["error"]["message"]
    published = json.dumps(results(harness.dsn, LLM_RESULTS))
    recorded = json.dumps(query(harness.dsn, "SELECT result, error FROM genesis.workflow_runs"), default=str)
    assert secret not in published
    assert secret not in recorded
    # stored, though: the configuration keeps its secret
    assert state.llm_configs("claude")[0]["settings"]["api_key"] == secret


# --- shutdown -------------------------------------------------------------------------------


def _wait_idle_and_listening(harness: Harness, store: ObservedStore) -> None:
    assert store.empty_read.wait(30), "the consumer never polled"
    wait_until(lambda: query(harness.dsn, """
        SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle'
        AND query ILIKE 'LISTEN%%' AND pid <> pg_backend_pid()"""), what="the consumer to LISTEN")


def test_stop_of_an_idle_consumer_returns_promptly_despite_a_long_poll_interval(harness: Harness) -> None:
    store = harness.store("test-host:1", store_class=ObservedStore)
    assert isinstance(store, ObservedStore)
    consumer = harness.consumer([ProbeHandler()], store=store, poll_interval_s=120.0)
    thread = harness.run_in_thread(consumer)
    _wait_idle_and_listening(harness, store)

    stopped_at = time.monotonic()
    consumer.stop()
    thread.join(timeout=60)
    elapsed = time.monotonic() - stopped_at
    assert not thread.is_alive()
    assert elapsed < 60, f"stop() took {elapsed:.1f} s: shutdown waits out the LISTEN poll interval (120 s)"


class StopDuringRead(PgQueueStore):
    """PgQueueStore whose first read is interrupted by stop(), as a SIGTERM arriving mid-fetch would be."""

    consumer_to_stop: Consumer | None = None

    def read(self, queue: str, qty: int, lease_s: int, *, waited_s: float = 0.0) -> list[ReadMessage]:
        if self.consumer_to_stop is not None:
            self.consumer_to_stop.stop()
            self.consumer_to_stop = None
        return super().read(queue, qty, lease_s, waited_s=waited_s)


def test_a_stop_that_arrives_during_a_fetch_is_not_lost(harness: Harness) -> None:
    store = harness.store("test-host:1", store_class=StopDuringRead)
    assert isinstance(store, StopDuringRead)
    consumer = harness.consumer([ProbeHandler()], store=store, poll_interval_s=120.0)
    store.consumer_to_stop = consumer

    started = time.monotonic()
    thread = harness.run_in_thread(consumer)
    thread.join(timeout=60)

    assert not thread.is_alive(), (
        "run() went to sleep for the poll interval after stop(): the wakeup stop() set was cleared "
        "by run_once() and the idle wait does not look at `stopping` first")
    assert time.monotonic() - started < 60     # the poll interval is 120 s


def test_stop_lets_in_flight_work_finish(harness: Harness) -> None:
    release = harness.gate()
    handler = ProbeHandler(lambda payload, ctx: (release.wait(20), None)[1])
    consumer = harness.consumer([handler], shutdown_grace_s=10)
    msg_id = send_sql(harness.dsn, RULES, rule(20))
    thread = harness.run_in_thread(consumer)
    assert handler.entered.wait(10)

    consumer.stop()
    other = send_sql(harness.dsn, RULES, rule(21))  # arrives after stop(): not read any more
    release.set()
    thread.join(timeout=15)

    assert not thread.is_alive()
    check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="completed", attempt=1, consumer="test-host:1")
    assert [m["msg_id"] for m in in_queue(harness.dsn, RULES)] == [other]
    assert len(handler.calls) == 1


def test_stop_gives_back_work_that_outlives_the_grace_period(harness: Harness) -> None:
    # like a sandboxed run: it notices the cancel, kills its process group and returns
    stuck = ProbeHandler(lambda payload, ctx: (ctx.cancelled.wait(20), None)[1])
    consumer = harness.consumer([stuck], shutdown_grace_s=0.3, lease_s=30)
    msg_id = send_sql(harness.dsn, RULES, rule(22))
    thread = harness.run_in_thread(consumer)
    assert stuck.entered.wait(10)
    # held a second, it is recorded running for DBAs to see
    wait_until(lambda: (run_row(harness.dsn, RULES, msg_id) or {}).get("status") == "running", 30,
               what="the run recorded running")
    assert run_row(harness.dsn, RULES, msg_id)["attempts"] == 1

    consumer.stop()
    thread.join(timeout=15)

    assert not thread.is_alive()
    assert stuck.contexts[0].cancelled.is_set() and stuck.returned.is_set()
    [queued] = in_queue(harness.dsn, RULES)
    assert queued["msg_id"] == msg_id and not queued["invisible"], "given back: visible again at once"
    assert queued["read_ct"] == 0, "a give-back spends no attempt"
    assert run_row(harness.dsn, RULES, msg_id)["status"] == "pending"
    assert results(harness.dsn, RULES_RESULTS) == []

    successor = harness.consumer([ProbeHandler()], name="test-host:2")
    drive(successor, lambda: results(harness.dsn, RULES_RESULTS), what="the successor's result")
    check_finished(harness.dsn, RULES, RULES_RESULTS, msg_id, status="completed", attempt=1, consumer="test-host:2")


def test_the_read_leases_the_oldest_by_index_under_a_generic_plan(db_dsn: str) -> None:
    """The read is prepared (psycopg, after five calls) and its LIMIT is a parameter, so PostgreSQL
    may settle on a generic plan: one that joined the leased ids to the queue by hashing read the
    whole queue on every read (a drain at the defaults fell from 5,200 to 4,400 msg/s). Forced to
    the generic plan, 30 reads of 10 from 3,000 messages lease the oldest 300, as pgmq.read does,
    and never scan the queue's table."""
    from psycopg import sql as pgsql

    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("SELECT pgmq.send_batch(%s, array_fill(%s::jsonb, ARRAY[3000]))", (RULES, json.dumps(rule(1))))
        conn.execute(f"ANALYZE pgmq.q_{RULES}")
        conn.execute(pgsql.SQL("ALTER DATABASE {} SET plan_cache_mode = force_generic_plan")
                     .format(pgsql.Identifier(conn.info.dbname)))
    db = Database(db_dsn, max_size=1).open()
    try:
        store = PgQueueStore(db, "generic:1")
        leased = [m for _ in range(30) for m in store.read(RULES, 10, 60)]
        assert db.run(lambda conn: conn.execute("SHOW plan_cache_mode").fetchone())["plan_cache_mode"] == \
            "force_generic_plan"
    finally:
        db.close()      # its session's statistics reach pg_stat_user_tables when it ends
    assert [m.msg_id for m in leased] == list(range(1, 301))
    assert {m.read_ct for m in leased} == {1} and all(m.problem is None for m in leased)

    def scans() -> dict[str, Any] | None:
        [row] = query(db_dsn, "SELECT seq_scan, idx_scan FROM pg_stat_user_tables "
                              "WHERE schemaname = 'pgmq' AND relname = %s", (f"q_{RULES}",))
        return row if row["idx_scan"] >= 30 else None
    counted = wait_until(scans, 30, what="the reads' scans in pg_stat_user_tables")
    assert counted["seq_scan"] == 0, counted
    # after the statistics: this count is a scan of the queue's table
    rows = query(db_dsn, f"SELECT count(*) FILTER (WHERE vt > clock_timestamp() AND read_ct = 1 "
                         f"AND last_read_at IS NOT NULL) AS leased, count(*) AS held FROM pgmq.q_{RULES}")
    assert rows == [{"leased": 300, "held": 3000}]

