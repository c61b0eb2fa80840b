"""One conformance suite, run against the PostgreSQL stores and their in-memory twins."""

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from genesis_pgflow.messages import Failure, Outcome, RunStart
from genesis_pgflow.store.control import ControlState
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.queue import PgQueueStore
from genesis_pgflow.store.state import LlmConfig, PgStateStore, RuleVersion
from genesis_pgflow.testing import FakeClock, MemoryQueueStore, MemoryStateStore, wait_until

Q = "genesis_rule_updates"
NOW = dt.datetime(2026, 11, 21, tzinfo=dt.timezone.utc)


@dataclass
class Twin:
    queues: object
    state: object
    advance: Callable[[float], None]
    results: Callable[[str], list]
    headers: Callable[[str], list]
    run_status: Callable[[str, int], str | None]     # None: no run recorded
    queue_names: Callable[[], set]


def _pg_column(db: Database, column: str) -> Callable[[str], list]:
    def values(queue: str) -> list:
        return db.run(lambda conn: [r[column] for r in conn.execute(
            f"SELECT {column} FROM pgmq.q_{queue} ORDER BY msg_id")])
    return values


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.db)])
def twin(request):
    if request.param == "memory":
        clock = FakeClock()
        store = MemoryQueueStore(clock=clock)
        yield Twin(store, MemoryStateStore(), clock.advance, store.messages, store.headers,
                   lambda queue, msg_id: store.runs.get((queue, msg_id), {}).get("status"), store.queue_names)
        return
    db = Database(request.getfixturevalue("db_dsn")).open()
    yield Twin(PgQueueStore(db, "test:1"), PgStateStore(db), time.sleep, _pg_column(db, "message"),
               _pg_column(db, "headers"), lambda queue, msg_id: (db.run(lambda conn: conn.execute(
                   "SELECT status FROM genesis.workflow_runs WHERE queue = %s AND msg_id = %s",
                   (queue, msg_id)).fetchone()) or {}).get("status"),
               lambda: db.run(lambda conn: {r["queue_name"] for r in conn.execute("SELECT * FROM pgmq.list_queues()")}))
    db.close()


def outcome(msg, kind="completed", **kw):
    return Outcome(msg, kind, NOW, NOW, **kw)


def test_read_leases_in_order_and_counts_reads(twin):
    ids = [twin.queues.send(Q, {"n": i}) for i in range(3)]
    first = twin.queues.read(Q, 2, lease_s=30)
    assert [m.msg_id for m in first] == ids[:2] and [m.read_ct for m in first] == [1, 1]
    assert first[0].body == {"n": 0} and first[0].queue == Q
    assert [m.msg_id for m in twin.queues.read(Q, 5, lease_s=30)] == ids[2:]
    assert twin.queues.read(Q, 5, lease_s=30) == []
    assert twin.queues.depth([Q]) == 3


def test_a_read_for_messages_that_have_waited_leaves_younger_ones(twin):
    """waited_s (a command's second process): only what has been visible that long is leased."""
    msg_id = twin.queues.send(Q, {"n": 1})
    assert twin.queues.read(Q, 5, lease_s=30, waited_s=3600) == []
    twin.advance(0.3)
    assert [m.msg_id for m in twin.queues.read(Q, 5, lease_s=30, waited_s=0.2)] == [msg_id]
    assert twin.queues.read(Q, 5, lease_s=30) == []


def test_an_expired_lease_makes_the_message_visible_again(twin):
    msg_id = twin.queues.send(Q, {"n": 1})
    twin.queues.read(Q, 1, lease_s=1)
    twin.advance(1.2)
    again = twin.queues.read(Q, 1, lease_s=30)
    assert [(m.msg_id, m.read_ct) for m in again] == [(msg_id, 2)]


def test_complete_publishes_archives_once(twin):
    twin.queues.send(Q, {"type": "genesis_rule_update"})
    [msg] = twin.queues.read(Q, 1, lease_s=30)
    done = outcome(msg, result={"status": "applied"})
    assert twin.queues.complete([done]) == [done]
    assert twin.queues.complete([done]) == []            # already archived: not published twice
    [result] = twin.results("genesis_rule_updates_results")
    assert result["status"] == "completed" and result["request"]["msg_id"] == msg.msg_id
    assert twin.queues.depth([Q]) == 0


def test_dead_letters_are_copied_to_the_dlq(twin):
    twin.queues.send(Q, {"type": "genesis_rule_update", "rule_id": "x"})
    [msg] = twin.queues.read(Q, 1, lease_s=30)
    twin.queues.complete([outcome(msg, "dead_letter", error=Failure("max_attempts_exceeded", "m"))])
    assert twin.results("genesis_rule_updates_dlq") == [{"type": "genesis_rule_update", "rule_id": "x"}]
    assert twin.results("genesis_rule_updates_results")[0]["error"]["code"] == "max_attempts_exceeded"


def test_retry_hides_the_message_for_its_delay(twin):
    msg_id = twin.queues.send(Q, {"n": 1})
    [msg] = twin.queues.read(Q, 1, lease_s=30)
    twin.queues.retry([outcome(msg, "retry", error=Failure("retryable_error", "x"), retry_after_s=1.0)])
    assert twin.queues.read(Q, 1, lease_s=30) == []
    twin.advance(1.2)
    assert [m.msg_id for m in twin.queues.read(Q, 1, lease_s=30)] == [msg_id]


WF = "00000000-0000-0000-0000-00000000000a"


def test_a_run_is_written_when_it_ends_or_recorded_running_while_its_read_holds_it(twin):
    a, b = (twin.queues.send(Q, {"type": "genesis_rule_update", "n": i}) for i in range(2))
    read = {m.msg_id: m for m in twin.queues.read(Q, 2, lease_s=30)}
    assert (twin.run_status(Q, a), twin.run_status(Q, b)) == (None, None)      # a read writes no run
    twin.queues.record_running([RunStart(read[a], WF, NOW)])
    assert (twin.run_status(Q, a), twin.run_status(Q, b)) == ("running", None)
    twin.queues.complete([outcome(read[a]), outcome(read[b], "failed", error=Failure("invalid_payload", "x"))])
    assert (twin.run_status(Q, a), twin.run_status(Q, b)) == ("completed", "failed")
    twin.queues.record_running([RunStart(read[a], WF, NOW), RunStart(read[b], WF, NOW)])   # late: both over
    assert (twin.run_status(Q, a), twin.run_status(Q, b)) == ("completed", "failed")


def test_a_read_whose_lease_was_lost_records_no_running_run(twin):
    msg_id = twin.queues.send(Q, {"n": 1})
    [first] = twin.queues.read(Q, 1, lease_s=1)
    twin.advance(1.5)
    [second] = twin.queues.read(Q, 1, lease_s=30)
    twin.queues.record_running([RunStart(first, WF, NOW)])
    assert twin.run_status(Q, msg_id) is None                  # the message is the second read's now
    twin.queues.record_running([RunStart(second, WF, NOW)])
    assert twin.run_status(Q, msg_id) == "running"


def test_a_retry_records_a_run_that_was_never_recorded_running(twin):
    msg_id = twin.queues.send(Q, {"type": "genesis_rule_update"})
    [msg] = twin.queues.read(Q, 1, lease_s=30)
    twin.queues.retry([outcome(msg, "retry", error=Failure("retryable_error", "x"), retry_after_s=60.0)])
    assert twin.run_status(Q, msg_id) == "pending"


def test_extend_and_release_leases(twin):
    a = twin.queues.send(Q, {"n": 1})
    twin.queues.read(Q, 1, lease_s=1)
    assert twin.queues.extend_leases(Q, [a, 999999], lease_s=30) == {a}
    twin.advance(1.2)
    assert twin.queues.read(Q, 1, lease_s=30) == []
    twin.queues.release(Q, [a])
    assert [m.msg_id for m in twin.queues.read(Q, 1, lease_s=30)] == [a]


def test_rule_versions(twin):
    rule = RuleVersion("ns", "r", 2, 0.9, {"a": 1})
    assert twin.state.apply_rule(rule, "00000000-0000-0000-0000-000000000001") == ("applied", 2)
    assert twin.state.apply_rule(rule, "00000000-0000-0000-0000-000000000002") == ("unchanged", 2)
    older = RuleVersion("ns", "r", 1, 0.9, {"a": 0})
    assert twin.state.apply_rule(older, "00000000-0000-0000-0000-000000000003") == ("stale", 2)
    newer = RuleVersion("ns", "r", 3, 0.95, {"a": 2})
    assert twin.state.apply_rule(newer, "00000000-0000-0000-0000-000000000004") == ("applied", 3)
    [active] = twin.state.rules("ns")
    assert (active["rule_id"], active["version"], active["rule"]) == ("r", 3, {"a": 2})
    assert twin.state.rules("other") == []


def test_batches_of_rule_versions_are_decided_as_one_by_one_in_the_order_given(twin):
    """apply_writes (genesis.apply_rule_versions: locks, then one set-based statement) decides each
    update as if the batch's updates were made one by one, in order, against what is stored:
    random batches holding several versions of the same rules, repeats and older ones."""
    import random
    import uuid

    rng = random.Random(9)
    active: dict[str, int] = {}                 # the reference: rule id -> active version
    for _round in range(12):
        batch = [RuleVersion("diff", f"r{rng.randrange(5)}", rng.randrange(1, 8), 0.9, {"n": i})
                 for i in range(rng.randrange(1, 25))]
        expected = []
        for rule in batch:
            before = active.get(rule.rule_id)
            if before is None or rule.version > before:
                active[rule.rule_id] = rule.version
                expected.append(("applied", rule.version))
            else:
                expected.append(("unchanged" if rule.version == before else "stale", before))
        decided = twin.state.apply_writes([(rule, str(uuid.uuid4())) for rule in batch])
        assert [tuple(d) for d in decided] == expected
    assert {r["rule_id"]: r["version"] for r in twin.state.rules("diff")} == active


def test_llm_config_versions(twin):
    config = LlmConfig("claude", "simple", ["m1"], ["chat"], {"api_key": "sk-1"})
    wf = "00000000-0000-0000-0000-000000000001"
    assert twin.state.apply_llm_config(config, wf) == ("applied", 1)
    assert twin.state.apply_llm_config(config, wf) == ("unchanged", 1)
    changed = LlmConfig("claude", "simple", ["m1", "m2"], ["chat"], {"api_key": "sk-1"})
    assert twin.state.apply_llm_config(changed, wf) == ("applied", 2)
    [active] = twin.state.llm_configs("claude")
    assert active["version"] == 2 and active["models"] == ["m1", "m2"]
    assert active["settings"] == {"api_key": "sk-1"}       # stored; redaction is the readers' job


def test_a_results_headers_are_its_requests_and_a_dead_letter_names_its_original(twin):
    headers = {"correlation_id": "c-42", "api_key": "sk-secret"}
    done_id = twin.queues.send(Q, {"n": 1}, headers)
    dead_id = twin.queues.send(Q, {"n": 2}, {"correlation_id": "c-43"})
    plain_id = twin.queues.send(Q, {"n": 3})
    read = {m.msg_id: m for m in twin.queues.read(Q, 3, lease_s=30)}
    assert read[done_id].headers == headers and read[plain_id].headers is None
    twin.queues.complete([outcome(read[done_id]), outcome(read[plain_id]),
                          outcome(read[dead_id], "dead_letter", error=Failure("max_attempts_exceeded", "x"))])
    by_request = dict(zip([r["request"]["msg_id"] for r in twin.results(f"{Q}_results")],
                          twin.headers(f"{Q}_results"), strict=True))
    assert by_request == {done_id: {"correlation_id": "c-42", "api_key": "[redacted]"},
                          dead_id: {"correlation_id": "c-43"}, plain_id: None}
    assert twin.results(f"{Q}_dlq") == [{"n": 2}]
    assert twin.headers(f"{Q}_dlq") == [{"original_queue": Q, "original_msg_id": dead_id, "attempts": 1,
                                          "request_headers": {"correlation_id": "c-43"}}]


def test_a_late_retry_from_a_lost_lease_touches_neither_the_message_nor_its_run(twin):
    """Consumer 1's lease expires and consumer 2 reads the message again; consumer 1's handler then
    fails transiently. Its retry must neither hide the message for its delay nor reopen the run."""
    msg_id = twin.queues.send(Q, {"n": 1})
    [first] = twin.queues.read(Q, 1, lease_s=1)
    twin.advance(1.5)
    [second] = twin.queues.read(Q, 1, lease_s=2)
    assert second.msg_id == msg_id and second.read_ct == 2
    twin.queues.retry([outcome(first, "retry", error=Failure("db", "lost"), retry_after_s=3600)])
    twin.advance(2.5)
    [third] = twin.queues.read(Q, 1, lease_s=30)       # consumer 2's lease ran out, not a 3600 s delay
    assert third.msg_id == msg_id and third.read_ct == 3
    assert twin.queues.complete([outcome(third)])
    twin.queues.retry([outcome(second, "retry", error=Failure("db", "lost"), retry_after_s=3600)])
    assert twin.run_status(Q, msg_id) == "completed"
    [result] = twin.results(f"{Q}_results")
    assert result["request"]["msg_id"] == msg_id and result["status"] == "completed"


def test_a_give_back_of_a_lost_lease_leaves_the_new_holders_read_alone(twin):
    msg_id = twin.queues.send(Q, {"n": 1})
    [first] = twin.queues.read(Q, 1, lease_s=1)
    twin.advance(1.5)
    [second] = twin.queues.read(Q, 1, lease_s=30)
    twin.queues.release(Q, [msg_id], [first.read_ct])     # consumer 1 shutting down, late
    assert twin.queues.read(Q, 1, lease_s=30) == []       # still consumer 2's
    twin.queues.release(Q, [msg_id], [second.read_ct])    # consumer 2's own give-back
    [again] = twin.queues.read(Q, 1, lease_s=30)
    assert again.msg_id == msg_id and again.read_ct == second.read_ct   # its read not counted


C = "code_execution_requests"


def test_a_reply_to_sends_the_result_to_its_own_queue_created_on_first_use(twin):
    """Payload field or pgmq header; one batch answers three producers in three queues."""
    before = twin.queue_names()
    assert "code_execution_results_sing1" not in before
    one = twin.queues.send(C, {"id": "a", "reply_to": "code_execution_results_sing1"}, {"correlation_id": "c-1"})
    two = twin.queues.send(C, {"id": "b"}, {"reply_to": "code_execution_results_sing2"})
    plain = twin.queues.send(C, {"id": "c"})
    same = twin.queues.send(C, {"id": "d", "reply_to": "code_execution_results"})
    read = {m.msg_id: m for m in twin.queues.read(C, 4, lease_s=30)}
    assert len(twin.queues.complete([outcome(m) for m in read.values()])) == 4
    assert twin.queue_names() - before == {"code_execution_results_sing1", "code_execution_results_sing2"}
    assert [r["request"]["msg_id"] for r in twin.results("code_execution_results_sing1")] == [one]
    assert twin.headers("code_execution_results_sing1") == [{"correlation_id": "c-1"}]
    assert [r["request"]["msg_id"] for r in twin.results("code_execution_results_sing2")] == [two]
    assert twin.headers("code_execution_results_sing2") == [{"reply_to": "code_execution_results_sing2"}]
    assert [r["request"]["msg_id"] for r in twin.results("code_execution_results")] == [plain, same]
    # the second use of a queue finds it there
    again = twin.queues.send(C, {"id": "e", "reply_to": "code_execution_results_sing1"})
    [msg] = twin.queues.read(C, 1, lease_s=30)
    twin.queues.complete([outcome(msg, "dead_letter", error=Failure("max_attempts_exceeded", "x"))])
    assert [r["request"]["msg_id"] for r in twin.results("code_execution_results_sing1")] == [one, again]
    assert twin.results(f"{C}_dlq") == [{"id": "e", "reply_to": "code_execution_results_sing1"}]


@pytest.mark.parametrize("where", ["payload", "headers"])
def test_a_refused_reply_to_is_answered_in_the_paired_queue_and_creates_nothing(twin, where):
    before = twin.queue_names()
    hostile = ["genesis_rule_updates_results_x", "code_execution_requests_dlq", "code_execution_requests",
               "code_execution_results_dlq", "Code_Execution_Results_X", "code_execution_results_x'; DROP TABLE x; --",
               "code_execution_results_" + "x" * 40, "code_execution_results_\u017f", 7]
    for name in hostile:
        body, headers = ({"id": "h", "reply_to": name}, None) if where == "payload" else ({"id": "h"}, {"reply_to": name})
        twin.queues.send(C, body, headers)
    read = twin.queues.read(C, len(hostile), lease_s=30)
    twin.queues.complete([outcome(m, "failed", error=Failure("invalid_payload", "reply_to")) for m in read])
    assert twin.queue_names() == before
    assert len(twin.results("code_execution_results")) == len(hostile)


# --- steering the fleet: paused queues and consumer commands (genesis.fleet_control) --------


@dataclass
class Steered:
    queues: object      # QueueStore
    admin: object       # pause_queue, resume_queue, paused_queues
    control: object     # ControlStore of the consumer "test:1"
    tell: Callable[[str], object]      # address drain or stop to "test:1"


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.db)])
def steered(request):
    if request.param == "memory":
        store = MemoryQueueStore(clock=FakeClock())
        yield Steered(store, store, store, lambda command: store.command_consumer("test:1", command))
        return
    from genesis_pgflow.store.admin import ConsumerPresence, PgAdminStore
    from genesis_pgflow.store.control import PgControlStore

    db = Database(request.getfixturevalue("db_dsn")).open()
    ConsumerPresence(db, "test:1", (Q,), 1, 5.0, 3600.0).register()
    admin = PgAdminStore(db)
    control = PgControlStore(db, "test:1")
    yield Steered(PgQueueStore(db, "test:1"), admin, control,
                  lambda command: admin.command_consumers(command, ["test:1"]))
    control.close()
    db.close()


def test_a_paused_queue_is_read_for_nothing_until_it_is_resumed(steered):
    ids = [steered.queues.send(Q, {"n": i}) for i in range(2)]
    [held] = steered.queues.read(Q, 1, lease_s=30)
    assert steered.admin.pause_queue(Q) is True
    assert steered.admin.pause_queue(Q) is False                     # paused already
    assert [p["queue"] for p in steered.admin.paused_queues()] == [Q]
    assert steered.control.control_state().paused == {Q}
    assert steered.queues.read(Q, 5, lease_s=30) == []               # whatever the reader believes
    assert steered.queues.read("genesis_llm_config_updates", 5, lease_s=30) == []   # others unaffected (empty)
    # what was in flight finishes normally
    done = outcome(held, result={"ok": True})
    assert steered.queues.complete([done]) == [done]

    assert steered.admin.resume_queue(Q) is True
    assert steered.admin.resume_queue(Q) is False                    # not paused
    assert steered.admin.paused_queues() == [] and steered.control.control_state().paused == frozenset()
    assert [m.msg_id for m in steered.queues.read(Q, 5, lease_s=30)] == ids[1:]


def test_a_change_to_the_control_table_wakes_its_listener(steered):
    # a fresh channel says so (what came before it listened was not heard): drain that first
    wait_until(lambda: not steered.control.wait_for_control(timeout_s=0.05), 10, what="a quiet channel")
    steered.admin.pause_queue(Q)
    assert wait_until(lambda: steered.control.wait_for_control(timeout_s=0.5), 10, what="the notification")
    steered.admin.resume_queue(Q)
    assert wait_until(lambda: steered.control.wait_for_control(timeout_s=0.5), 10, what="the notification")


def test_a_command_is_addressed_to_one_consumer_and_a_stop_is_never_turned_into_a_drain(steered):
    assert steered.control.control_state().command is None
    steered.tell("drain")
    assert steered.control.control_state().command == "drain"
    steered.control.command_honoured("drain")
    steered.tell("stop")
    assert steered.control.control_state().command == "stop"
    steered.tell("drain")
    assert steered.control.control_state() == ControlState(frozenset(), "stop")


def test_a_batch_with_several_versions_of_one_rule_is_decided_in_message_order(twin):
    """RuleEngine's writes are deferred to the batch's completion (issue 9): within one batch, the
    versions of one rule are decided in the order their messages came, and a request finished
    elsewhere meanwhile is neither answered nor written again."""
    from genesis_pgflow.dispatcher import Dispatcher
    from genesis_pgflow.handlers.rules import RuleEngine

    dispatcher = Dispatcher({"genesis_rule_update": RuleEngine(twin.state)}, timeout_s=30, max_attempts=3,
                            retry_base_s=1.0, retry_max_s=1.0)

    def rule(rule_id: str, version: int) -> dict:
        return {"type": "genesis_rule_update", "namespace": "batch", "rule_id": rule_id, "version": version,
                "confidence": 0.9, "rule": {"v": version}}

    sent = [twin.queues.send(Q, body) for body in (rule("a", 2), rule("b", 1), rule("a", 3), rule("a", 3),
                                                    rule("a", 1), rule("lost", 1))]
    messages = twin.queues.read(Q, 10, lease_s=30)
    assert [m.msg_id for m in messages] == sent
    outcomes = []
    for message in messages:
        task = dispatcher.prepare(message)
        done = dispatcher.execute(task, dispatcher.context(task, float("inf")))
        assert done.deferred is not None and done.result is None     # nothing written yet
        outcomes.append(done)
    assert twin.state.rules("batch") == []
    twin.queues.complete([outcomes[-1]])                               # "lost" finished by someone else
    applied = twin.queues.complete(outcomes)

    assert [o.message.msg_id for o in applied] == sent[:-1]
    assert [(o.kind, (o.result or {}).get("status"), o.error.code if o.error else None) for o in applied] == [
        ("completed", "applied", None), ("completed", "applied", None), ("completed", "applied", None),
        ("completed", "unchanged", None), ("failed", None, "stale_version")]
    assert {(r["rule_id"], r["version"]) for r in twin.state.rules("batch")} == {("a", 3), ("b", 1), ("lost", 1)}
    results = {r["request"]["msg_id"]: r for r in twin.results("genesis_rule_updates_results")}
    assert results[sent[4]]["error"]["details"]["active_version"] == 3
    assert results[sent[3]]["result"]["status"] == "unchanged"
    assert [twin.run_status(Q, i) for i in sent] == ["completed"] * 4 + ["failed", "completed"]
