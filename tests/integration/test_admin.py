"""The operators' store (store/admin.py) and the DBA views of migration 0005 on a real PostgreSQL:
consumers and their heartbeats, errors recorded per attempt, dead letters joined back to their
originals, all-or-nothing requeue, and read-only access through pg_monitor."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from genesis_pgflow.errors import ConfigurationError
from genesis_pgflow.messages import Failure, Outcome, ReadMessage
from genesis_pgflow.store.admin import ConsumerPresence, PgAdminStore, shown_dsn
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.queue import PgQueueStore

pytestmark = pytest.mark.db

RULES, RULES_DLQ = "genesis_rule_updates", "genesis_rule_updates_dlq"


def query(dsn: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def db(db_dsn: str) -> Iterator[Database]:
    with Database(db_dsn) as database:
        yield database


def rule(i: int) -> dict[str, Any]:
    return {"type": "genesis_rule_update", "namespace": "adm", "rule_id": f"r{i}", "confidence": 0.9, "rule": {}}


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def outcome(message: ReadMessage, kind: Any, code: str, text: str, **extra: Any) -> Outcome:
    return Outcome(message, kind, now(), now(), error=Failure(code, text, {"rule_id": "x"}), **extra)


# --- consumers ------------------------------------------------------------------------------


def test_a_consumer_registers_beats_stops_and_a_silent_one_is_gone_then_forgotten(db: Database, db_dsn: str) -> None:
    admin = PgAdminStore(db)
    alive = ConsumerPresence(db, "host-a:1", (RULES,), 4, heartbeat_s=60, retention_s=3600)
    alive.register()
    alive.beat(in_flight=3)
    [row] = admin.consumers()
    assert (row["id"], row["state"], row["in_flight"], row["queues"], row["parallel"]) == (
        "host-a:1", "running", 3, [RULES], 4)
    assert row["pid"] > 0 and row["version"]

    silent = ConsumerPresence(db, "host-b:2", (RULES,), 1, heartbeat_s=1, retention_s=3600)
    silent.register()
    query(db_dsn, "UPDATE genesis.consumers SET last_heartbeat = now() - interval '5 seconds' WHERE id = 'host-b:2'")
    states = {c["id"]: c["state"] for c in admin.consumers()}
    assert states == {"host-a:1": "running", "host-b:2": "gone"}   # shown as gone before anyone marks it
    alive.beat(in_flight=0)
    assert query(db_dsn, "SELECT state FROM genesis.consumers WHERE id = 'host-b:2'") == [{"state": "gone"}]

    # gone for longer than a live consumer's retention: that consumer's heartbeat deletes it
    keeper = ConsumerPresence(db, "host-a:1", (RULES,), 4, heartbeat_s=60, retention_s=30)
    keeper.beat(in_flight=0)
    assert {c["id"] for c in admin.consumers()} == {"host-a:1", "host-b:2"}
    query(db_dsn, "UPDATE genesis.consumers SET last_heartbeat = now() - interval '1 minute' WHERE id = 'host-b:2'")
    keeper.beat(in_flight=0)
    assert [c["id"] for c in admin.consumers()] == ["host-a:1"]

    alive.stopped()
    alive.beat(in_flight=1)   # a late heartbeat of its periodic thread does not bring it back
    [row] = admin.consumers()
    assert row["state"] == "stopped"


# --- errors, failures, one run's history --------------------------------------------------


def test_each_retry_and_the_dead_letter_are_recorded_and_joined_back(db: Database, db_dsn: str) -> None:
    queues, admin = PgQueueStore(db, "test:1"), PgAdminStore(db)
    same = rule(1)
    twins = [queues.send(RULES, same), queues.send(RULES, same)]   # identical bodies, one transaction
    other = queues.send(RULES, rule(2))

    [first, *_] = messages = queues.read(RULES, 3, 30)
    assert [m.msg_id for m in messages] == [*twins, other]
    queues.retry([outcome(m, "retry", "database_busy", f"try {m.msg_id} again") for m in messages])
    query(db_dsn, f"UPDATE pgmq.q_{RULES} SET vt = now()")
    held = queues.read(RULES, 3, 30)
    queues.release(RULES, [first.msg_id])   # a graceful give-back is no error
    [again] = queues.read(RULES, 3, 30)
    assert again.msg_id == first.msg_id and again.read_ct == 2
    applied = queues.complete([outcome(m, "dead_letter", "max_attempts_exceeded", f"gave up on {m.msg_id}")
                               for m in reversed([again, *held[1:]])])
    assert len(applied) == 3

    history = admin.run_history(RULES, twins[1])
    assert history is not None
    assert [(e["outcome"], e["error"]["code"]) for e in history["errors"]] == [
        ("retry", "database_busy"), ("failed", "max_attempts_exceeded")]
    assert history["errors"][0]["retry_at"] is not None and history["errors"][0]["attempt"] == 1
    assert history["run"]["status"] == "failed" and history["run"]["attempts"] == 2
    assert history["archived"]["msg_id"] == twins[1] and history["in_queue"] is None
    [result] = history["results_waiting"]
    assert result["message"]["error"]["code"] == "max_attempts_exceeded"
    assert history["dead_letter"]["queue"] == RULES_DLQ

    letters = admin.dead_letters(RULES)
    assert sorted(letter["original_msg_id"] for letter in letters) == sorted([*twins, other])
    for letter in letters:
        assert letter["error"]["message"] == f"gave up on {letter['original_msg_id']}"
        assert letter["attempts"] == 2 and letter["original_queue"] == RULES

    failures = admin.failures(since_s=3600, queue=RULES)
    assert {f["msg_id"] for f in failures} == {*twins, other}
    assert {f["code"] for f in failures} == {"max_attempts_exceeded"}
    assert admin.failures(since_s=3600, type="code_execution_request") == []
    assert admin.run_history(RULES, 999_999) is None


def test_retries_in_a_row_are_each_recorded_though_no_read_wrote_a_run_between_them(db: Database,
                                                                                     db_dsn: str) -> None:
    """A quick run is written only when it ends, so a second retry finds the first one's row:
    each is an error of its own, and a give-back is none."""
    queues, admin = PgQueueStore(db, "test:1"), PgAdminStore(db)
    msg_id = queues.send(RULES, rule(4))
    for attempt in (1, 2):
        [message] = queues.read(RULES, 1, 30)
        assert message.read_ct == attempt
        queues.retry([outcome(message, "retry", "database_busy", f"attempt {attempt}", retry_after_s=60.0)])
        query(db_dsn, f"UPDATE pgmq.q_{RULES} SET vt = now()")
    [message] = queues.read(RULES, 1, 30)
    queues.release(RULES, [message.msg_id])
    history = admin.run_history(RULES, msg_id)
    assert history is not None and history["run"]["status"] == "pending"
    assert [(e["attempt"], e["outcome"], e["error"]["message"]) for e in history["errors"]] == [
        (1, "retry", "attempt 1"), (2, "retry", "attempt 2")]


def test_a_dead_letter_naming_its_original_in_its_headers_is_joined_by_them(db: Database, db_dsn: str) -> None:
    queues, admin = PgQueueStore(db, "test:1"), PgAdminStore(db)
    msg_id = queues.send(RULES, rule(3))
    [message] = queues.read(RULES, 1, 30)
    queues.complete([outcome(message, "dead_letter", "max_attempts_exceeded", "gave up")])
    # a producer's own copy, named by headers (what store/queue.py may write one day)
    query(db_dsn, "SELECT pgmq.send(%s, %s::jsonb, %s::jsonb)",
          (RULES_DLQ, json.dumps({"copy": True}), json.dumps({"original_msg_id": str(msg_id)})))
    letters = admin.dead_letters(RULES)
    assert [letter["original_msg_id"] for letter in letters] == [msg_id, msg_id]


def test_requeue_of_an_id_that_is_not_there_moves_nothing(db: Database, db_dsn: str) -> None:
    queues, admin = PgQueueStore(db, "test:1"), PgAdminStore(db)
    queues.send(RULES, rule(4))
    [message] = queues.read(RULES, 1, 30)
    queues.complete([outcome(message, "dead_letter", "max_attempts_exceeded", "gave up")])
    [letter] = admin.dead_letters(RULES)

    with pytest.raises(ConfigurationError, match="no dead letter 424242 in genesis_rule_updates_dlq"):
        admin.requeue_dead_letters(RULES, [letter["msg_id"], 424242])
    assert [r["msg_id"] for r in query(db_dsn, f"SELECT msg_id FROM pgmq.q_{RULES_DLQ}")] == [letter["msg_id"]]
    assert query(db_dsn, f"SELECT count(*) AS n FROM pgmq.q_{RULES}") == [{"n": 0}]

    [(old, new)] = admin.requeue_dead_letters(RULES, [letter["msg_id"]])
    assert old == letter["msg_id"]
    assert [r["msg_id"] for r in query(db_dsn, f"SELECT msg_id FROM pgmq.q_{RULES}")] == [new]


def test_a_requeued_dead_letter_goes_back_with_its_requests_headers(db: Database, db_dsn: str) -> None:
    queues, admin = PgQueueStore(db, "test:1"), PgAdminStore(db)
    msg_id = queues.send(RULES, rule(5), {"correlation_id": "c-5"})
    [message] = queues.read(RULES, 1, 30)
    queues.complete([outcome(message, "dead_letter", "max_attempts_exceeded", "gave up")])
    [letter] = admin.dead_letters(RULES)
    assert letter["original_msg_id"] == msg_id
    [(_, new)] = admin.requeue_dead_letters(RULES)
    [again] = query(db_dsn, f"SELECT msg_id, headers, message FROM pgmq.q_{RULES}")
    assert again == {"msg_id": new, "headers": {"correlation_id": "c-5"}, "message": rule(5)}


def test_status_adds_throughput_failures_by_code_and_consumers(db: Database) -> None:
    queues, admin = PgQueueStore(db, "test:1"), PgAdminStore(db)
    for i in range(3):
        queues.send(RULES, rule(i))
    done, failed, _ = queues.read(RULES, 3, 30)
    queues.complete([Outcome(done, "completed", now(), now(), result={"status": "applied"}),
                     outcome(failed, "failed", "low_confidence", "too low")])
    ConsumerPresence(db, "host-c:3", (RULES,), 2, heartbeat_s=5, retention_s=60).register()

    status = admin.status()
    assert status["queues"][RULES]["completed"] == 1 and status["queues"][RULES]["in_flight"] == 1
    assert status["throughput"]["last_minute"]["completed"] == 1
    assert status["throughput"]["last_hour"]["queues"][RULES]["failed"] == 1
    assert status["failures_by_code_last_hour"] == {"low_confidence": 1}
    assert [c["id"] for c in status["consumers"]] == ["host-c:3"]


def test_shown_dsn_hides_the_password_unless_asked() -> None:
    url = "postgresql://ops:hunter2@db.example:6543/genesis?sslmode=require"
    assert "hunter2" not in shown_dsn(url)
    assert psycopg.conninfo.conninfo_to_dict(shown_dsn(url)) == {
        "user": "ops", "host": "db.example", "port": "6543", "dbname": "genesis", "sslmode": "require"}
    assert "password=hunter2" in shown_dsn(url, show_password=True)


# --- the DBA views, read by a monitoring role without write rights -----------------------------


READER_GRANTS = """
    GRANT USAGE ON SCHEMA genesis TO {role};
    GRANT SELECT ON genesis.queue_health, genesis.recent_failures, genesis.throughput_per_minute,
                    genesis.consumers TO {role};
    GRANT EXECUTE ON FUNCTION genesis.queue_metrics(text) TO {role};
"""


@pytest.fixture(params=["pg_monitor", "granted"])
def reader_dsn(request: pytest.FixtureRequest, db_dsn: str) -> Iterator[tuple[str, str]]:
    """A login role of this test's own: a member of pg_monitor, or one given the README's grants."""
    role = f"genesis_test_reader_{uuid.uuid4().hex[:8]}"
    if request.param == "pg_monitor":
        query(db_dsn, f'CREATE ROLE "{role}" LOGIN IN ROLE pg_monitor')
    else:
        query(db_dsn, f'CREATE ROLE "{role}" LOGIN')
        query(db_dsn, READER_GRANTS.format(role=f'"{role}"'))
    try:
        yield request.param, make_conninfo(db_dsn, user=role)
    finally:
        query(db_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        query(db_dsn, f'DROP OWNED BY "{role}"')
        query(db_dsn, f'DROP ROLE "{role}"')


def test_a_reader_reads_the_views_and_writes_nothing(db: Database, reader_dsn: tuple[str, str]) -> None:
    kind, dsn = reader_dsn
    queues = PgQueueStore(db, "test:1")
    queues.send(RULES, {**rule(5), "api_key": "sk-secret"})
    [message] = queues.read(RULES, 1, 30)
    queues.complete([outcome(message, "failed", "low_confidence", "too low")])
    ConsumerPresence(db, "host-d:4", (RULES,), 2, heartbeat_s=5, retention_s=60).register()

    health = {r["queue"]: r for r in query(dsn, "SELECT * FROM genesis.queue_health")}
    assert health[RULES]["failed"] == 1 and health[RULES]["depth"] == 0
    [failure] = query(dsn, "SELECT queue, msg_id, code, message FROM genesis.recent_failures")
    assert failure == {"queue": RULES, "msg_id": message.msg_id, "code": "low_confidence", "message": "too low"}
    [minute] = query(dsn, "SELECT queue, completed, failed FROM genesis.throughput_per_minute")
    assert minute == {"queue": RULES, "completed": 0, "failed": 1}
    assert [c["id"] for c in query(dsn, "SELECT id FROM genesis.consumers")] == ["host-d:4"]
    if kind == "pg_monitor":    # the tallies' counts, past the horizon too (migration 0017), not the rows
        assert query(dsn, "SELECT sum(n)::int AS n FROM genesis.run_tallies WHERE queue = %s AND status = 'failed'",
                     (RULES,))[0]["n"] == 1
        assert query(dsn, "SELECT sum(n)::int AS n FROM genesis.archive_tallies WHERE queue = %s",
                     (RULES,))[0]["n"] == 1

    forbidden = ["SELECT * FROM genesis.workflow_runs", "SELECT settings FROM genesis.llm_config_versions",
                 "DELETE FROM genesis.consumers", "INSERT INTO genesis.run_errors VALUES ('q', 1, 1, 'retry', '{}')",
                 "UPDATE genesis.rule_versions SET confidence = 0"]
    if kind == "granted":   # pgmq itself lets pg_monitor read its tables; a role given only our grants cannot
        forbidden.append(f"SELECT message FROM pgmq.a_{RULES}")
    for statement in forbidden:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            query(dsn, statement)
