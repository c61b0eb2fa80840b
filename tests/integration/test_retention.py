"""Retention on a real PostgreSQL: what `genesis prune` deletes and keeps, one pruner at a time, and
a database that has seen many requests pruned while a consumer keeps archiving into the same tables."""

from __future__ import annotations

import json
import threading
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from genesis_pgflow.app import App
from genesis_pgflow.cli import admin_main
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.retention import RETENTION_JOB, PgRetention, RetentionPolicy

pytestmark = pytest.mark.db

RULES = "genesis_rule_updates"
RESULTS = "genesis_rule_updates_results"
DLQ = "genesis_rule_updates_dlq"
# far above the queue's own sequence, so a live archive never collides with generated rows
BASE = 10_000_000


def query(dsn: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def count(dsn: str, table: str, where: str = "true") -> int:
    return query(dsn, f"SELECT count(*) AS n FROM {table} WHERE {where}")[0]["n"]


def archive_rows(dsn: str, n: int, *, age: str, start: int = BASE, queue: str = RULES) -> None:
    query(dsn, f"""
        INSERT INTO pgmq.a_{queue} (msg_id, read_ct, enqueued_at, archived_at, vt, message)
        SELECT i, 1, now() - interval '{age}', now() - interval '{age}', now() - interval '{age}',
               jsonb_build_object('type', 'genesis_rule_update', 'rule_id', 'r' || i, 'rule', jsonb_build_object('n', i))
        FROM generate_series(%s::bigint, %s::bigint) AS i""", (start, start + n - 1))


def run_rows(dsn: str, n: int, *, age: str, status: str = "completed", start: int = BASE) -> None:
    query(dsn, f"""
        INSERT INTO genesis.workflow_runs (queue, msg_id, workflow_id, type, status, attempts, enqueued_at,
                                           started_at, finished_at, updated_at, result)
        SELECT %s, i, gen_random_uuid(), 'genesis_rule_update', %s, 1, now() - interval '{age}',
               now() - interval '{age}',
               CASE WHEN %s IN ('completed', 'failed') THEN now() - interval '{age}' END, now() - interval '{age}',
               '{{"status": "applied"}}'::jsonb
        FROM generate_series(%s::bigint, %s::bigint) AS i""", (RULES, status, status, start, start + n - 1))


def result_rows(dsn: str, n: int, *, age: str, leased: bool = False, queue: str = RESULTS) -> None:
    vt = "now() + interval '1 hour'" if leased else f"now() - interval '{age}'"
    query(dsn, f"""
        INSERT INTO pgmq.q_{queue} (enqueued_at, vt, read_ct, message)
        SELECT now() - interval '{age}', {vt}, {int(leased)}, jsonb_build_object('status', 'completed', 'n', i)
        FROM generate_series(1, %s) AS i""", (n,))


@pytest.fixture
def db(db_dsn: str) -> Any:
    database = Database(db_dsn, max_size=4).open()
    yield database
    database.close()


def test_prune_deletes_what_is_old_and_keeps_the_rest(db_dsn: str, db: Database) -> None:
    archive_rows(db_dsn, 1200, age="10 days")
    archive_rows(db_dsn, 50, age="1 day", start=BASE + 5000)
    archive_rows(db_dsn, 30, age="10 days", start=BASE, queue=DLQ)     # a requeued dead letter's archived copy
    run_rows(db_dsn, 700, age="40 days")
    run_rows(db_dsn, 20, age="40 days", status="failed", start=BASE + 1000)
    run_rows(db_dsn, 10, age="40 days", status="pending", start=BASE + 2000)
    run_rows(db_dsn, 10, age="40 days", status="running", start=BASE + 3000)
    run_rows(db_dsn, 40, age="2 days", start=BASE + 4000)
    query(db_dsn, """INSERT INTO genesis.run_errors (queue, msg_id, attempt, outcome, error)
                     SELECT queue, msg_id, 1, 'failed', '{"code": "x"}' FROM genesis.workflow_runs WHERE status = 'failed'""")
    result_rows(db_dsn, 300, age="8 days")
    result_rows(db_dsn, 5, age="8 days", leased=True)       # a producer is reading these right now
    result_rows(db_dsn, 25, age="1 hour")
    dead = [query(db_dsn, "SELECT pgmq.send(%s, %s::jsonb) AS id", (DLQ, json.dumps({"n": i})))[0]["id"] for i in range(3)]
    query(db_dsn, f"UPDATE pgmq.q_{DLQ} SET enqueued_at = now() - interval '400 days'")
    live = query(db_dsn, "SELECT pgmq.send(%s, '{\"type\": \"genesis_rule_update\"}') AS id", (RULES,))[0]["id"]
    query(db_dsn, f"UPDATE pgmq.q_{RULES} SET enqueued_at = now() - interval '400 days'")

    retention = PgRetention(db, sleep=lambda s: None)
    policy = RetentionPolicy(archive_days=7, runs_days=30, results_days=7, batch_size=100)
    planned = retention.prune(policy, dry_run=True)
    assert planned.ran and planned.dry_run
    assert planned.deleted[f"pgmq.a_{RULES}"] == 1200 and planned.deleted[f"pgmq.a_{DLQ}"] == 30
    assert planned.deleted[f"pgmq.q_{RESULTS}"] == 300 and planned.deleted["genesis.workflow_runs"] == 720
    assert count(db_dsn, f"pgmq.a_{RULES}") == 1250, "a dry run deletes nothing"

    report = retention.prune(policy)
    assert report.ran and report.complete
    assert report.deleted == planned.deleted
    assert report.total == 1200 + 30 + 300 + 720
    assert report.batches >= 12 + 7 + 1, "bounded batches of 100 rows"
    assert count(db_dsn, f"pgmq.a_{RULES}") == 50 and count(db_dsn, f"pgmq.a_{RULES}", "archived_at < now() - interval '7 days'") == 0
    assert count(db_dsn, f"pgmq.a_{DLQ}") == 0
    assert count(db_dsn, "genesis.workflow_runs", "status = 'completed'") == 40
    assert count(db_dsn, "genesis.workflow_runs", "status = 'failed'") == 0
    assert count(db_dsn, "genesis.workflow_runs", "status IN ('pending', 'running')") == 20, "unfinished runs stay"
    assert count(db_dsn, "genesis.run_errors") == 0, "a pruned run's errors go with it"
    assert count(db_dsn, f"pgmq.q_{RESULTS}") == 30, "recent and leased results stay"
    assert count(db_dsn, f"pgmq.q_{RESULTS}", "vt > now()") == 5
    assert [r["msg_id"] for r in query(db_dsn, f"SELECT msg_id FROM pgmq.q_{DLQ} ORDER BY msg_id")] == dead, \
        "dead letters are never pruned"
    assert [r["msg_id"] for r in query(db_dsn, f"SELECT msg_id FROM pgmq.q_{RULES}")] == [live], \
        "a live request queue is never touched"

    again = retention.prune(policy)
    assert again.total == 0


def test_zero_days_keeps_forever(db_dsn: str, db: Database) -> None:
    archive_rows(db_dsn, 100, age="1000 days")
    run_rows(db_dsn, 100, age="1000 days")
    result_rows(db_dsn, 100, age="1000 days")
    report = PgRetention(db).prune(RetentionPolicy(archive_days=0, runs_days=0, results_days=0))
    assert report.ran and report.total == 0 and report.deleted == {}
    assert report.cutoffs == {"archive": None, "results": None, "runs": None}
    assert count(db_dsn, f"pgmq.a_{RULES}") == count(db_dsn, "genesis.workflow_runs") == 100


def test_one_pruner_at_a_time(db_dsn: str, db: Database) -> None:
    archive_rows(db_dsn, 10, age="10 days")
    with psycopg.connect(db_dsn, autocommit=True) as other:
        assert other.execute("SELECT pg_try_advisory_lock(hashtext('genesis.maintenance'), hashtext(%s))",
                             (RETENTION_JOB,)).fetchone()[0]
        report = PgRetention(db).prune(RetentionPolicy())
        assert not report.ran and report.total == 0
        assert count(db_dsn, f"pgmq.a_{RULES}") == 10
        # released in this session, not by closing it (the server ends a closed session when it gets to it)
        other.execute("SELECT pg_advisory_unlock(hashtext('genesis.maintenance'), hashtext(%s))", (RETENTION_JOB,))
    assert PgRetention(db).prune(RetentionPolicy()).deleted[f"pgmq.a_{RULES}"] == 10


def test_a_time_budget_stops_between_batches(db_dsn: str, db: Database) -> None:
    archive_rows(db_dsn, 1000, age="10 days")
    clock = iter(range(1000))       # each look at the clock is one second later
    retention = PgRetention(db, sleep=lambda s: None, monotonic=lambda: float(next(clock)))
    report = retention.prune(RetentionPolicy(batch_size=100), budget_s=3)
    assert report.ran and not report.complete
    assert 0 < report.deleted[f"pgmq.a_{RULES}"] < 1000
    assert PgRetention(db, sleep=lambda s: None).prune(RetentionPolicy(batch_size=100)).complete
    assert count(db_dsn, f"pgmq.a_{RULES}") == 0


@pytest.mark.slow
def test_a_busy_database_is_pruned_while_a_consumer_keeps_archiving(db_dsn: str, db: Database) -> None:
    """200,000 archived requests and 200,000 runs, backdated; while they are pruned, a consumer's
    statements (send, read, archive into the same archive table, record the run) run under
    lock_timeout 1 s and never fail."""
    n = 200_000
    archive_rows(db_dsn, n, age="30 days")
    run_rows(db_dsn, n, age="60 days")
    query(db_dsn, f"ANALYZE pgmq.a_{RULES}; ANALYZE genesis.workflow_runs")
    retention = PgRetention(db)
    before = retention.table_bytes()

    done = threading.Event()
    outcome: dict[str, Any] = {}

    def prune() -> None:
        try:
            outcome["report"] = retention.prune(RetentionPolicy(batch_size=5000))
        finally:
            done.set()

    thread = threading.Thread(target=prune)
    consumed, during = 0, 0
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '1s'")
        thread.start()
        while not done.is_set() or consumed < 20:
            with conn.transaction():
                msg_id = conn.execute("SELECT pgmq.send(%s, '{\"type\": \"genesis_rule_update\"}')", (RULES,)).fetchone()[0]
                assert conn.execute("SELECT msg_id FROM pgmq.read(%s, 30, 1)", (RULES,)).fetchone()[0] == msg_id
                conn.execute("""INSERT INTO genesis.workflow_runs (queue, msg_id, type, status, attempts, finished_at)
                                VALUES (%s, %s, 'genesis_rule_update', 'completed', 1, now())""", (RULES, msg_id))
                assert conn.execute("SELECT pgmq.archive(%s, %s::bigint)", (RULES, msg_id)).fetchone()[0]
            consumed += 1
            during += not done.is_set()
    thread.join()
    report = outcome["report"]
    after = retention.table_bytes()
    assert report.deleted[f"pgmq.a_{RULES}"] == n and report.deleted["genesis.workflow_runs"] == n
    assert count(db_dsn, f"pgmq.a_{RULES}") == consumed == count(db_dsn, "genesis.workflow_runs")
    assert during > 0, "the consumer's statements ran while the prune was under way"
    rate = 2 * n / max(report.seconds, 1e-3)
    print(f"\npruned {2 * n} rows in {report.seconds:.1f} s ({rate:,.0f} rows/s, {report.batches} batches); "
          f"{during} consumer transactions meanwhile; bytes before {before[f'pgmq.a_{RULES}']:,} (archive) "
          f"{before['genesis.workflow_runs']:,} (runs), after {after[f'pgmq.a_{RULES}']:,} / "
          f"{after['genesis.workflow_runs']:,} (space reused, not returned, until VACUUM FULL)")


def test_genesis_prune_on_the_command_line(db_dsn: str, genesis_home: Any, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    archive_rows(db_dsn, 30, age="10 days")
    run_rows(db_dsn, 20, age="40 days")
    monkeypatch.setenv("GENESIS_HOME", str(genesis_home))
    monkeypatch.setenv("GENESIS_RETENTION_RUNS_DAYS", "0")      # keep runs forever
    assert admin_main(["--dsn", db_dsn, "prune", "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["dry_run"] and planned["total"] == 30 and planned["cutoffs"]["runs"] is None
    assert count(db_dsn, f"pgmq.a_{RULES}") == 30
    assert admin_main(["prune", "--dsn", db_dsn]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deleted 30 row(s)") and f"pgmq.a_{RULES}: 30" in out
    assert count(db_dsn, f"pgmq.a_{RULES}") == 0 and count(db_dsn, "genesis.workflow_runs") == 20


def test_every_consumer_schedules_the_prune(db_dsn: str, genesis_home: Any) -> None:
    archive_rows(db_dsn, 10, age="10 days")
    app = App.open(Settings(dsn=db_dsn, home=genesis_home, retention_interval_s=3600))
    try:
        jobs = {name: (interval, job) for name, interval, job in app.consumer().periodic}
        interval, job = jobs[RETENTION_JOB]
        assert interval == 3600
        report = job()
        assert report.ran and report.deleted[f"pgmq.a_{RULES}"] == 10
    finally:
        app.close()
