"""One conformance suite, run against the PostgreSQL stores and their in-memory twins."""

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from genesis_pgflow.messages import Failure, Outcome
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.queue import PgQueueStore
from genesis_pgflow.store.state import LlmConfig, PgStateStore, RuleVersion
from genesis_pgflow.testing import FakeClock, MemoryQueueStore, MemoryStateStore

Q = "genesis_rule_updates"
NOW = dt.datetime(2026, 11, 21, tzinfo=dt.timezone.utc)


@dataclass
class Twin:
    queues: object
    state: object
    advance: Callable[[float], None]
    results: Callable[[str], list]


def _pg_results(db: Database) -> Callable[[str], list]:
    def results(queue: str) -> list:
        return db.run(lambda conn: [r["message"] for r in conn.execute(
            f"SELECT message FROM pgmq.q_{queue} ORDER BY msg_id")])
    return results


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.db)])
def twin(request):
    if request.param == "memory":
        clock = FakeClock()
        store = MemoryQueueStore(clock=clock)
        yield Twin(store, MemoryStateStore(), clock.advance, store.messages)
        return
    db = Database(request.getfixturevalue("db_dsn")).open()
    yield Twin(PgQueueStore(db, "test:1"), PgStateStore(db), time.sleep, _pg_results(db))
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
