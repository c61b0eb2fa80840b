"""The tallies behind `genesis status` and genesis.queue_health (migration 0009) agree with a count
over the tables after every kind of write the project and a DBA make: the consumer's reads, retries
and completions, prune's deletes, a queue created again, compaction while writers go on."""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from genesis_pgflow.app import App
from genesis_pgflow.cli import admin_main
from genesis_pgflow.messages import REQUEST_QUEUES
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.admin import PgAdminStore
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.retention import PgRetention, RetentionPolicy
from genesis_pgflow.store.tallies import compact

pytestmark = pytest.mark.db

RULES = "genesis_rule_updates"


def query(dsn: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def counted(dsn: str) -> tuple[Counter[tuple[str, str | None, str]], Counter[str]]:
    runs = Counter({(r["queue"], r["type"], r["status"]): r["n"] for r in query(
        dsn, "SELECT queue, type, status, count(*) AS n FROM genesis.workflow_runs GROUP BY 1, 2, 3")})
    archives = Counter({q: query(dsn, f"SELECT count(*) AS n FROM pgmq.a_{q}")[0]["n"] for q in REQUEST_QUEUES})
    return runs, +archives


def tallied(dsn: str) -> tuple[Counter[tuple[str, str | None, str]], Counter[str]]:
    runs = Counter({(r["queue"], r["type"], r["status"]): r["n"] for r in query(
        dsn, "SELECT queue, type, status, sum(n)::bigint AS n FROM genesis.run_tallies GROUP BY 1, 2, 3")})
    archives = Counter({r["queue"]: r["n"] for r in query(
        dsn, "SELECT queue, sum(n)::bigint AS n FROM genesis.archive_tallies GROUP BY 1")})
    return +runs, +archives


def assert_agree(dsn: str) -> None:
    assert tallied(dsn) == counted(dsn)
    health = {r["queue"]: r for r in query(dsn, "SELECT * FROM genesis.queue_health")}
    runs, archives = counted(dsn)
    for queue in REQUEST_QUEUES:
        for status, column in (("completed", "completed"), ("failed", "failed"), ("pending", "retrying")):
            assert health[queue][column] == sum(n for (q, _t, s), n in runs.items() if q == queue and s == status)
    with Database(dsn, max_size=1).open() as db:
        status = PgAdminStore(db).status()
    for queue in REQUEST_QUEUES:
        assert status["queues"][queue]["archived"] == archives.get(queue, 0)


def send(dsn: str, body: dict[str, Any]) -> int:
    return query(dsn, "SELECT pgmq.send(%s, %s::jsonb) AS id", (RULES, json.dumps(body)))[0]["id"]


def rule(i: int, **extra: Any) -> dict[str, Any]:
    return {"type": "genesis_rule_update", "namespace": "t", "rule_id": f"r{i}", "confidence": 0.9,
            "rule": {"n": i}, **extra}


def drain(dsn: str, home: Any) -> None:
    app = App.open(Settings(dsn=dsn, home=home, queues=(RULES,), drain=True, poll_interval_ms=50,
                            retry_base_s=0.0, retry_max_s=0.0))
    try:
        app.consumer().run()
    finally:
        app.close()


def test_the_tallies_follow_the_consumer_prune_and_a_dba(db_dsn: str, genesis_home: Any) -> None:
    assert_agree(db_dsn)
    for i in range(30):
        send(db_dsn, rule(i))
    send(db_dsn, {"type": "genesis_rule_update", "rule_id": "bad"})      # invalid: failed at once
    send(db_dsn, {"type": "no_such_type"})
    drain(db_dsn, genesis_home)
    assert_agree(db_dsn)
    assert tallied(db_dsn)[1][RULES] == 32

    # a run a DBA deletes, one whose type a DBA fixes, one set back to pending
    query(db_dsn, "DELETE FROM genesis.workflow_runs WHERE msg_id = (SELECT min(msg_id) FROM genesis.workflow_runs)")
    query(db_dsn, "UPDATE genesis.workflow_runs SET type = 'fixed' WHERE type = 'no_such_type'")
    query(db_dsn, "UPDATE genesis.workflow_runs SET status = 'pending' WHERE msg_id = "
                  "(SELECT max(msg_id) FROM genesis.workflow_runs WHERE status = 'completed')")
    assert_agree(db_dsn)

    before = query(db_dsn, "SELECT count(*) AS n FROM genesis.run_tallies")[0]["n"]
    with Database(db_dsn, max_size=2).open() as db:
        report = compact(db)
        assert report.ran and report.rows_before >= before and report.rows_after < report.rows_before
        assert_agree(db_dsn)
        # prune: everything older than now, archives and runs
        query(db_dsn, "UPDATE genesis.workflow_runs SET finished_at = now() - interval '30 days'")
        query(db_dsn, f"UPDATE pgmq.a_{RULES} SET archived_at = now() - interval '30 days'")
        PgRetention(db).prune(RetentionPolicy(archive_days=1, runs_days=1, results_days=1), budget_s=None)
    assert_agree(db_dsn)
    assert tallied(db_dsn)[1][RULES] == 0

    query(db_dsn, "TRUNCATE genesis.workflow_runs")
    assert_agree(db_dsn)


def test_a_queue_created_again_is_tallied_from_its_rows_after_db_upgrade(db_dsn: str) -> None:
    query(db_dsn, "SELECT pgmq.drop_queue(%s)", (RULES,))
    query(db_dsn, "SELECT pgmq.create(%s)", (RULES,))
    for i in range(3):
        query(db_dsn, "SELECT pgmq.archive(%s, %s::bigint)", (RULES, send(db_dsn, rule(i))))
    assert admin_main(["db", "upgrade", "--dsn", db_dsn]) == 0
    assert_agree(db_dsn)
    assert tallied(db_dsn)[1][RULES] == 3


def test_compaction_while_writers_go_on_loses_nothing(db_dsn: str) -> None:
    """Compaction is one statement: deltas committed by others meanwhile stay for the next one."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            with psycopg.connect(db_dsn, autocommit=True) as conn:
                i = offset
                while not stop.is_set():
                    conn.execute("INSERT INTO genesis.workflow_runs (queue, msg_id, type, status) "
                                 "SELECT %s, g, 'genesis_rule_update', 'running' FROM generate_series(%s::bigint, %s::bigint) g",
                                 (RULES, i, i + 9))
                    conn.execute("UPDATE genesis.workflow_runs SET status = 'completed' "
                                 "WHERE queue = %s AND msg_id BETWEEN %s AND %s", (RULES, i, i + 4))
                    i += 10
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(n * 10_000_000,)) for n in range(2)]
    for t in writers:
        t.start()
    try:
        with Database(db_dsn, max_size=2).open() as db:
            compacted = 0
            while compacted < 20:
                if compact(db).ran:
                    compacted += 1
    finally:
        stop.set()
        for t in writers:
            t.join(timeout=60)
    assert not errors, errors
    assert query(db_dsn, "SELECT count(*) AS n FROM genesis.workflow_runs")[0]["n"] > 0
    assert_agree(db_dsn)
