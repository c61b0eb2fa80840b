"""`schema.upgrade` and `schema.problems` on a real PostgreSQL: pgmq, the 13 queues, the genesis schema."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from genesis_pgflow.errors import SchemaBehind
from genesis_pgflow.messages import REQUEST_QUEUES, all_queue_names
from genesis_pgflow.store import schema

pytestmark = pytest.mark.db

QUEUE_NAMES = {
    "genesis_rule_updates", "genesis_rule_updates_results", "genesis_rule_updates_dlq",
    "genesis_llm_config_updates", "genesis_llm_config_updates_results", "genesis_llm_config_updates_dlq",
    "code_execution_requests", "code_execution_results", "code_execution_requests_dlq",
    "genesis_experiment_requests", "genesis_experiment_results", "genesis_experiment_requests_dlq",
    "genesis_reports",
}


def _scalar(dsn: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
        return None if row is None else row[0]


def _rows(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def _extension_available(dsn: str) -> bool:
    return bool(_scalar(dsn, "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq')"))


def _fingerprint(dsn: str) -> dict[str, Any]:
    """Everything an upgrade may create: relations of pgmq and genesis, queues, revision, notify setup."""
    return {
        "relations": _rows(dsn, """
            SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname IN ('pgmq', 'genesis') ORDER BY 1, 2"""),
        "queues": _rows(dsn, "SELECT queue_name, is_partitioned, is_unlogged FROM pgmq.meta ORDER BY 1"),
        "revision": _rows(dsn, "SELECT version_num FROM genesis.alembic_version"),
        "notify": _rows(dsn, "SELECT queue_name, throttle_interval_ms FROM pgmq.notify_insert_throttle ORDER BY 1"),
        "triggers": _rows(dsn, """
            SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgmq' AND NOT t.tgisinternal
            ORDER BY 1, 2"""),
    }


def _assert_at_head(dsn: str) -> None:
    queues = {row[0] for row in _rows(dsn, "SELECT queue_name FROM pgmq.meta")}
    assert queues == QUEUE_NAMES
    assert _rows(dsn, "SELECT version_num FROM genesis.alembic_version") == [(schema.head_revision(),)]
    for name in QUEUE_NAMES:  # every queue has its table and its archive
        assert _scalar(dsn, "SELECT to_regclass(%s) IS NOT NULL", (f"pgmq.q_{name}",)), name
        assert _scalar(dsn, "SELECT to_regclass(%s) IS NOT NULL", (f"pgmq.a_{name}",)), name
    # inserts into request queues wake LISTENing consumers
    # (a statement-level trigger of genesis; not pgmq's own throttled notify, see schema.py)
    woken = {row[0] for row in _rows(dsn, "SELECT substr(c.relname, 3) FROM pg_trigger t JOIN pg_class c "
                                          "ON c.oid = t.tgrelid WHERE t.tgname = 'genesis_wakeup'")}
    assert woken == set(REQUEST_QUEUES)
    assert _rows(dsn, "SELECT queue_name FROM pgmq.notify_insert_throttle") == []
    health = _rows(dsn, "SELECT queue, type, depth, in_flight, completed, failed, dead_lettered "
                        "FROM genesis.queue_health ORDER BY queue")
    assert sorted(row[0] for row in health) == sorted(REQUEST_QUEUES)
    assert all(row[2:] == (0, 0, 0, 0, 0) for row in health), health
    assert schema.problems(dsn) == []
    schema.require_current(dsn)


def test_the_contract_names_thirteen_queues() -> None:
    assert set(all_queue_names()) == QUEUE_NAMES
    assert len(all_queue_names()) == 13


def test_upgrade_of_an_empty_database_installs_pgmq_queues_and_schema(empty_db_dsn: str) -> None:
    expected_pgmq = "extension" if _extension_available(empty_db_dsn) else "sql"

    report = schema.upgrade(empty_db_dsn)

    assert report.pgmq == expected_pgmq
    assert sorted(report.queues_created) == sorted(QUEUE_NAMES)
    assert report.revision_before is None
    assert report.revision_after == schema.head_revision()
    installed_as_extension = _scalar(empty_db_dsn, "SELECT count(*) FROM pg_extension WHERE extname = 'pgmq'")
    assert installed_as_extension == (1 if expected_pgmq == "extension" else 0)
    _assert_at_head(empty_db_dsn)
    # pgmq works: a producer needs nothing but SQL
    msg_id = _scalar(empty_db_dsn, "SELECT pgmq.send('genesis_rule_updates', %s::jsonb)", ('{"type": "x"}',))
    assert msg_id == 1
    assert _scalar(empty_db_dsn, "SELECT depth FROM genesis.queue_health WHERE queue = 'genesis_rule_updates'") == 1


def test_a_second_upgrade_is_a_no_op(empty_db_dsn: str) -> None:
    schema.upgrade(empty_db_dsn)
    _scalar(empty_db_dsn, "SELECT pgmq.send('genesis_rule_updates', '{\"keep\": true}'::jsonb)")
    before = _fingerprint(empty_db_dsn)

    report = schema.upgrade(empty_db_dsn)

    assert report.pgmq == "present"
    assert report.queues_created == []
    assert report.revision_before == report.revision_after == schema.head_revision()
    assert _fingerprint(empty_db_dsn) == before
    # data already queued survives
    assert _scalar(empty_db_dsn, "SELECT message FROM pgmq.q_genesis_rule_updates") == {"keep": True}
    assert schema.problems(empty_db_dsn) == []


def test_four_concurrent_upgrades_of_one_empty_database_all_succeed(empty_db_dsn: str) -> None:
    start = threading.Barrier(4)
    reports: list[schema.UpgradeReport] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def upgrade() -> None:
        try:
            start.wait(timeout=10)
            report = schema.upgrade(empty_db_dsn)
            with lock:
                reports.append(report)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=upgrade, name=f"upgrade-{i}") for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "an upgrade hung"
    assert errors == []
    assert len(reports) == 4

    # exactly one of them did the work, the others found it done
    assert sorted(r.pgmq for r in reports).count("present") == 3
    created = [q for r in reports for q in r.queues_created]
    assert sorted(created) == sorted(QUEUE_NAMES)  # each queue created once
    assert [r.revision_before for r in reports].count(None) == 1
    assert all(r.revision_after == schema.head_revision() for r in reports)
    _assert_at_head(empty_db_dsn)


def test_problems_of_an_empty_database(empty_db_dsn: str) -> None:
    found = schema.problems(empty_db_dsn)
    assert found and any("pgmq" in problem for problem in found)
    with pytest.raises(SchemaBehind, match="genesis db upgrade"):
        schema.require_current(empty_db_dsn)


def test_problems_name_missing_queues_and_an_old_revision(db_dsn: str) -> None:
    assert schema.problems(db_dsn) == []
    _scalar(db_dsn, "SELECT pgmq.drop_queue('genesis_rule_updates_dlq')")
    _scalar(db_dsn, "SELECT pgmq.drop_queue('code_execution_results')")

    found = schema.problems(db_dsn)
    assert len(found) == 1
    assert "genesis_rule_updates_dlq" in found[0] and "code_execution_results" in found[0]
    with pytest.raises(SchemaBehind, match="genesis db upgrade"):
        schema.require_current(db_dsn)

    report = schema.upgrade(db_dsn)
    assert sorted(report.queues_created) == ["code_execution_results", "genesis_rule_updates_dlq"]
    assert schema.problems(db_dsn) == []

    _scalar(db_dsn, "UPDATE genesis.alembic_version SET version_num = 'older' RETURNING 1")
    found = schema.problems(db_dsn)
    assert len(found) == 1 and "older" in found[0] and schema.head_revision() in found[0]


def test_problems_of_a_database_with_pgmq_but_no_genesis_schema(db_dsn: str) -> None:
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE genesis.alembic_version")
    found = schema.problems(db_dsn)
    assert len(found) == 1 and "none" in found[0] and schema.head_revision() in found[0]
    with pytest.raises(SchemaBehind, match="genesis db upgrade"):
        schema.require_current(db_dsn)


def test_rule_lookups_use_the_index_though_statistics_were_taken_of_an_empty_table(db_dsn: str) -> None:
    """PL/pgSQL keeps a plan per session: one made while statistics say genesis.rule_versions is
    empty would scan the whole table for every rule update, for as long as the session lives
    (quadratic in the rules applied). Migration 0012 makes the index the only plan."""
    import uuid

    from psycopg.types.json import Jsonb

    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("ANALYZE genesis.rule_versions")   # statistics of an empty table
        assert _scalar(db_dsn, "SELECT reltuples FROM pg_class WHERE oid = 'genesis.rule_versions'::regclass") == 0
        with conn.transaction():
            for batch in range(10):     # enough calls for the plan cache to settle on a generic plan
                updates = [{"namespace": "ns", "rule_id": f"r{batch}-{i}", "version": 1, "confidence": 0.9,
                            "rule": {}, "workflow_id": str(uuid.uuid4())} for i in range(20)]
                decided = conn.execute("SELECT decision FROM genesis.apply_rule_versions(%s)",
                                       [Jsonb(updates)]).fetchall()
                assert [d for (d,) in decided] == ["applied"] * 20
            # this transaction's own scans of the table (pg_stat_xact_*: no other session counts)
            seq_scan, idx_scan = conn.execute(
                "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables "
                "WHERE schemaname = 'genesis' AND relname = 'rule_versions'").fetchone()
    assert seq_scan == 0 and idx_scan >= 200


def test_llm_config_lookups_use_the_index_though_statistics_were_taken_of_an_empty_table(db_dsn: str) -> None:
    """As above, for the active LLM configuration (migration 0014): a prepared lookup whose plan was
    made while genesis.llm_config_versions looked empty read the whole table for every update."""
    import uuid

    from genesis_pgflow.store.database import Database
    from genesis_pgflow.store.state import LlmConfig, PgStateStore

    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("ANALYZE genesis.llm_config_versions")
    db = Database(db_dsn, max_size=1).open()
    try:
        store = PgStateStore(db)

        def apply_all(conn: Any) -> tuple[int, int]:
            for i in range(30):     # past psycopg's prepare threshold and the plan cache's first five
                decided = store.bound(conn).apply_llm_config(LlmConfig("p", "simple", [f"m{i}"], [], {}),
                                                             str(uuid.uuid4()))
                assert decided == ("applied", i + 1)
            # this transaction's own scans of the table (pg_stat_xact_*: no other session counts)
            row = conn.execute("SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables "
                               "WHERE schemaname = 'genesis' AND relname = 'llm_config_versions'").fetchone()
            return row["seq_scan"], row["idx_scan"]

        seq_scan, idx_scan = db.run(apply_all)
    finally:
        db.close()
    assert seq_scan == 0 and idx_scan >= 30


def _index_entries(dsn: str, index: str) -> float:
    """The entries of an index of genesis.workflow_runs as ANALYZE counts them (pg_class.reltuples;
    exact here, where it samples every row)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE genesis.workflow_runs")
        row = conn.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", (f"genesis.{index}",)).fetchone()
    assert row is not None
    return row[0]


def test_migration_0016_indexes_only_the_runs_not_finished_and_back(db_dsn: str) -> None:
    """Finished runs (almost every run written) are no longer entries of the (status, type)
    index; the runs still pending or running are, and a lookup of them uses it."""
    _scalar(db_dsn, "INSERT INTO genesis.workflow_runs (queue, msg_id, type, status, started_at, finished_at) "
                    "SELECT 'genesis_rule_updates', g, 'genesis_rule_update', "
                    "CASE WHEN g <= 2 THEN 'pending' WHEN g = 3 THEN 'running' WHEN g % 2 = 0 THEN 'completed' "
                    "ELSE 'failed' END, now(), now() FROM generate_series(1::bigint, 100::bigint) g RETURNING 1")
    assert _index_entries(db_dsn, "workflow_runs_unfinished_idx") == 3
    with psycopg.connect(db_dsn) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT msg_id FROM genesis.workflow_runs WHERE status = 'pending'").fetchall())
        assert "workflow_runs_unfinished_idx" in plan
        assert [r[0] for r in conn.execute(
            "SELECT msg_id FROM genesis.workflow_runs WHERE status = 'pending' ORDER BY 1").fetchall()] == [1, 2]
    schema.migrate_to(db_dsn, "0015", down=True)
    assert _index_entries(db_dsn, "workflow_runs_status_idx") == 100
    assert _scalar(db_dsn, "SELECT to_regclass('genesis.workflow_runs_unfinished_idx')") is None
    schema.migrate_to(db_dsn, "head")
    assert _index_entries(db_dsn, "workflow_runs_unfinished_idx") == 3
    assert _scalar(db_dsn, "SELECT to_regclass('genesis.workflow_runs_status_idx')") is None


def test_a_pgmq_too_old_for_the_consumers_statements_is_named_not_run_against(db_dsn: str) -> None:
    """The consumer runs pgmq's own statements on the queue tables (sql/queue.sql), which use
    `headers` (pgmq 1.5) and `last_read_at` (pgmq 1.10). A pgmq whose messages lack one (here the
    column taken off pgmq's message record, as an older release has it) stops `genesis db upgrade`
    and the consumer's start with the column named, instead of failing on every read."""
    assert schema.problems(db_dsn) == []
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("ALTER TYPE pgmq.message_record DROP ATTRIBUTE last_read_at")
    with pytest.raises(SchemaBehind, match=r"pgmq is too old: its messages have no last_read_at "
                                           r"\(pgmq 1\.10 or newer"):
        schema.upgrade(db_dsn)
    [problem] = schema.problems(db_dsn)
    assert "no last_read_at" in problem and "ALTER EXTENSION pgmq UPDATE" in problem
    with pytest.raises(SchemaBehind, match="pgmq is too old"):
        schema.require_current(db_dsn)
