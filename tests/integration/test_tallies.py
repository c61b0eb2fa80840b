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
from genesis_pgflow.messages import REQUEST_QUEUES, Failure, Outcome
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.admin import PgAdminStore
from genesis_pgflow.store.dashboard import PgDashboardStore
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.queue import PgQueueStore
from genesis_pgflow.store.retention import PgRetention, RetentionPolicy
from genesis_pgflow.store.schema import migrate_to
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
    # the last hour's throughput, from the tallies, against the runs that finished in it
    # (what these tests write finishes now or days ago: the tallies' 10-second edge plays no part)
    recent = {r["queue"]: {"completed": r["completed"], "failed": r["failed"]} for r in query(
        dsn, "SELECT queue, count(*) FILTER (WHERE status = 'completed') AS completed, "
             "count(*) FILTER (WHERE status = 'failed') AS failed FROM genesis.workflow_runs "
             "WHERE finished_at >= now() - interval '1 hour' GROUP BY 1 "
             "HAVING count(*) FILTER (WHERE status IN ('completed', 'failed')) > 0")}
    shown = {q: {"completed": t["completed"], "failed": t["failed"]}
             for q, t in status["throughput"]["last_hour"]["queues"].items()}
    assert shown == recent


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

    with Database(db_dsn, max_size=2).open() as db:
        assert compact(db).ran
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
    """Folds and compactions while others insert, update and delete runs (folded or not yet) and
    archive messages and delete them from the archive."""
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
                    # a run written some statements ago, folded or not by now
                    conn.execute("UPDATE genesis.workflow_runs SET status = 'failed' "
                                 "WHERE queue = %s AND msg_id = %s", (RULES, i - 30))
                    conn.execute("DELETE FROM genesis.workflow_runs WHERE queue = %s AND msg_id = %s", (RULES, i - 29))
                    i += 10
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def archiver() -> None:
        """Archives messages and deletes some of the archive again, as prune does."""
        try:
            with psycopg.connect(db_dsn, autocommit=True) as conn:
                while not stop.is_set():
                    ids = [r[0] for r in conn.execute("SELECT pgmq.send_batch(%s, ARRAY['{}', '{}', '{}']::jsonb[])",
                                                      (RULES,))]
                    conn.execute("SELECT pgmq.archive(%s, %s::bigint[])", (RULES, ids))
                    conn.execute(f"DELETE FROM pgmq.a_{RULES} WHERE msg_id = %s", (ids[0],))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(n * 10_000_000,)) for n in range(2)]
    writers.append(threading.Thread(target=archiver))
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
    assert query(db_dsn, "SELECT count(*) AS n FROM genesis.workflow_runs WHERE status = 'failed'")[0]["n"] > 0
    assert_agree(db_dsn)


def test_throughput_comes_from_ten_second_buckets_folded_into_history_after_an_hour(db_dsn: str) -> None:
    """Migration 0015: the status's last minute and last hour are sums over the tallies' buckets
    (no run is read); compaction moves buckets older than 65 minutes into history, and leaves a
    group that is one row already as it is."""
    def runs(first: int, count: int, status: str, finished_ago: str, took_ms: int) -> None:
        query(db_dsn, "INSERT INTO genesis.workflow_runs (queue, msg_id, type, status, started_at, finished_at) "
                      "SELECT %s, g, 'genesis_rule_update', %s, now() - %s::interval - make_interval(secs => %s / 1000.0), "
                      "now() - %s::interval FROM generate_series(%s::bigint, %s::bigint) g",
              (RULES, status, finished_ago, took_ms, finished_ago, first, first + count - 1))

    runs(1, 4, "completed", "0 s", 20)          # in the last minute
    runs(10, 3, "failed", "30 minutes", 100)     # in the last hour only
    runs(20, 5, "completed", "3 hours", 50)      # history
    with Database(db_dsn, max_size=2).open() as db:
        throughput = PgAdminStore(db).status()["throughput"]
        assert throughput["last_minute"]["queues"] == {RULES: {"completed": 4, "failed": 0, "avg_ms": 20.0}}
        assert throughput["last_hour"]["queues"] == {RULES: {"completed": 4, "failed": 3, "avg_ms": 54.3}}

        assert compact(db).ran
        buckets = query(db_dsn, "SELECT bucket IS NULL AS history, sum(n)::int AS n FROM genesis.run_tallies "
                                "GROUP BY 1 ORDER BY 1")
        assert buckets == [{"history": False, "n": 7}, {"history": True, "n": 5}]
        assert PgAdminStore(db).status()["throughput"] == throughput
        assert_agree(db_dsn)
        # nothing new folded: the folded rows stay as they are (no dead row per run of the job)
        again = compact(db)
        assert again.rows_before == 0 or again.folded
        # an hour later, as far as the buckets go: into history, counted still (a folded bucket of
        # its own, so that the check does not wait for the horizon, which any transaction on the
        # server holds back)
        query(db_dsn, "INSERT INTO genesis.folded_run_tallies (queue, type, status, bucket, n, total_ms) "
                      "VALUES (%s, 'genesis_rule_update', 'completed', genesis.tally_bucket(now()) - interval '2 hours', "
                      "2, 40), (%s, 'genesis_rule_update', 'completed', NULL, -2, 0)", (RULES, RULES))
        assert compact(db).ran
        assert query(db_dsn, "SELECT count(*) AS n FROM genesis.folded_run_tallies "
                             "WHERE bucket < now() - interval '65 minutes'")[0]["n"] == 0
        assert PgAdminStore(db).status()["queues"][RULES]["completed"] == 9
        assert_agree(db_dsn)

    # runs written leave no tally row: they are counted where they are until a fold
    rows = query(db_dsn, "SELECT count(*) AS n FROM genesis.folded_run_tallies")[0]["n"]
    query(db_dsn, "INSERT INTO genesis.workflow_runs (queue, msg_id, type, status, started_at, finished_at) "
                  "SELECT %s, g, 'genesis_rule_update', 'completed', now() - interval '2 days' - make_interval(secs => g * 10), "
                  "now() - interval '2 days' - make_interval(secs => g * 10) FROM generate_series(1000::bigint, 1499::bigint) g",
          (RULES,))
    assert query(db_dsn, "SELECT count(*) AS n FROM genesis.folded_run_tallies")[0]["n"] == rows
    assert_agree(db_dsn)


def test_migration_0015_moves_the_last_hours_runs_into_buckets_and_back(db_dsn: str) -> None:
    """Runs recorded before 0015 count in the last hour after the upgrade; the downgrade keeps
    every count (they are sums over all rows, whatever their bucket)."""
    migrate_to(db_dsn, "0014", down=True)
    query(db_dsn, "INSERT INTO genesis.workflow_runs (queue, msg_id, type, status, started_at, finished_at) "
                  "SELECT %s, g, 'genesis_rule_update', CASE WHEN g %% 3 = 0 THEN 'failed' ELSE 'completed' END, "
                  "now() - make_interval(mins => g::int, secs => 30.01), now() - make_interval(mins => g::int, secs => 30) "
                  "FROM generate_series(1::bigint, 120::bigint) g", (RULES,))
    migrate_to(db_dsn, "head")
    assert_agree(db_dsn)
    with Database(db_dsn, max_size=1).open() as db:
        last_hour = PgAdminStore(db).status()["throughput"]["last_hour"]["queues"][RULES]
    # finished 1.5, 2.5, ... 119.5 minutes ago: 59 in the last hour, every third one failed
    assert last_hour == {"completed": 40, "failed": 19, "avg_ms": 10.0}
    migrate_to(db_dsn, "0014", down=True)
    assert tallied(db_dsn) == counted(db_dsn)
    migrate_to(db_dsn, "head")
    assert_agree(db_dsn)


def test_the_dashboards_minutes_come_from_the_buckets(db_dsn: str) -> None:
    query(db_dsn, "INSERT INTO genesis.workflow_runs (queue, msg_id, type, status, started_at, finished_at) "
                  "SELECT %s, g, 'genesis_rule_update', CASE WHEN g <= 3 THEN 'completed' ELSE 'failed' END, "
                  "date_trunc('minute', now()) - interval '5 minutes', "
                  "date_trunc('minute', now()) - interval '5 minutes' + interval '20 s' "
                  "FROM generate_series(1::bigint, 5::bigint) g", (RULES,))
    query(db_dsn, "INSERT INTO genesis.workflow_runs (queue, msg_id, type, status, started_at, finished_at) "
                  "VALUES (%s, 99, 'genesis_rule_update', 'completed', now(), now())", (RULES,))
    expected: dict[str, Counter[Any]] = {"completed": Counter(), "failed": Counter()}
    for r in query(db_dsn, "SELECT date_trunc('minute', finished_at) AS minute, status FROM genesis.workflow_runs"):
        expected[r["status"]][r["minute"]] += 1
    with Database(db_dsn, max_size=2).open() as db:
        compact(db)
        shown = PgDashboardStore(db).queues(10)
        # by the minutes the store returns (a minute may turn between the inserts and the read)
        for status in ("completed", "failed"):
            assert shown["queues"][RULES][f"{status}_series"] == [expected[status][m] for m in shown["minutes"]]
        assert (sum(shown["queues"][RULES]["completed_series"]), sum(shown["queues"][RULES]["failed_series"])) == (4, 2)
        with pytest.raises(ValueError, match="minutes must be 1 to 64"):
            PgDashboardStore(db).queues(120)


def waiting_on_a_lock(dsn: str, pid: int) -> bool:
    return bool(query(dsn, "SELECT wait_event_type = 'Lock' AS waiting FROM pg_stat_activity WHERE pid = %s",
                      (pid,))[0]["waiting"])


def test_a_write_that_meets_a_fold_waits_for_it_and_one_open_holds_the_fold_off(db_dsn: str) -> None:
    """Migration 0017: an update of runs while a fold is open waits for it and then counts against
    the horizon the fold left; a fold while such an update is open does nothing and says so."""
    query(db_dsn, "INSERT INTO genesis.workflow_runs (queue, msg_id, type, status) "
                  "SELECT %s, g, 'genesis_rule_update', 'running' FROM generate_series(1::bigint, 10::bigint) g", (RULES,))
    with psycopg.connect(db_dsn) as folding, psycopg.connect(db_dsn) as updating:
        assert folding.execute("SELECT genesis.fold_tallies()").fetchone() is not None    # open, holding the horizon
        done = threading.Event()

        def update() -> None:
            updating.execute("UPDATE genesis.workflow_runs SET status = 'completed' WHERE msg_id <= 5")
            updating.commit()
            done.set()

        thread = threading.Thread(target=update)
        thread.start()
        pid = updating.info.backend_pid
        for _ in range(600):
            if waiting_on_a_lock(db_dsn, pid):
                break
            done.wait(0.05)
        assert waiting_on_a_lock(db_dsn, pid) and not done.is_set()
        folding.commit()
        thread.join(timeout=60)
        assert done.is_set()
    assert_agree(db_dsn)

    with psycopg.connect(db_dsn) as updating, Database(db_dsn, max_size=3).open() as db:
        updating.execute("UPDATE genesis.workflow_runs SET status = 'failed' WHERE msg_id = 6")
        held = compact(db)
        assert held.ran and held.folded is None
        updating.commit()
        assert compact(db).folded is not None
    assert_agree(db_dsn)


def test_completions_leave_no_tally_row_and_a_restored_horizon_is_counted_again(db_dsn: str) -> None:
    """The consumer's writes (the archive, results and runs of each completion) add no row to the
    tallies, so there is none to delete: no dead row per message. A horizon ahead of the server's
    transactions (a database restored from a dump) makes the next fold count every row again."""
    def folded_rows() -> int:
        return int(query(db_dsn, "SELECT (SELECT count(*) FROM genesis.folded_run_tallies) "
                                 "+ (SELECT count(*) FROM genesis.folded_archive_tallies) AS n")[0]["n"])

    with Database(db_dsn, max_size=2).open() as db:
        queues = PgQueueStore(db, "test:1")
        for i in range(5):
            queues.send(RULES, rule(i))
        before = folded_rows()
        for _ in range(5):             # a completion per message, as at a low rate
            [message] = queues.read(RULES, 1, 30)
            now = message.enqueued_at
            kind = "dead_letter" if message.msg_id % 2 else "failed"
            assert queues.complete([Outcome(message, kind, now, now, error=Failure("invalid_payload", "no"))])
        assert folded_rows() == before
        assert_agree(db_dsn)

        query(db_dsn, "UPDATE genesis.tally_horizon SET folded_below = (pg_current_xact_id()::text::bigint + 1000000)::text::xid8")
        for i in range(3):
            query(db_dsn, "SELECT pgmq.archive(%s, %s::bigint)", (RULES, send(db_dsn, rule(100 + i))))
        assert compact(db).folded
        assert query(db_dsn, "SELECT folded_below < pg_current_xact_id() AS behind FROM genesis.tally_horizon")[0]["behind"]
    assert_agree(db_dsn)
    assert tallied(db_dsn)[1][RULES] == 8


def test_migration_0017_counts_what_was_tallied_before_and_back(db_dsn: str) -> None:
    """Runs and archived messages tallied by delta rows before 0017 keep their counts after it and
    after its downgrade, with what was written in between."""
    migrate_to(db_dsn, "0016", down=True)
    assert query(db_dsn, "SELECT count(*) AS n FROM pg_trigger WHERE tgname = 'genesis_tally_insert'")[0]["n"] == 4

    def write(first: int) -> None:
        query(db_dsn, "INSERT INTO genesis.workflow_runs (queue, msg_id, type, status, started_at, finished_at) "
                      "SELECT %s, g, 'genesis_rule_update', 'completed', now(), now() "
                      "FROM generate_series(%s::bigint, %s::bigint) g", (RULES, first, first + 9))
        for i in range(3):
            query(db_dsn, "SELECT pgmq.archive(%s, %s::bigint)", (RULES, send(db_dsn, rule(first + i))))

    write(1)
    assert tallied(db_dsn) == counted(db_dsn)
    migrate_to(db_dsn, "head")
    assert query(db_dsn, "SELECT count(*) AS n FROM pg_trigger WHERE tgname = 'genesis_tally_insert'")[0]["n"] == 0
    assert_agree(db_dsn)
    write(100)
    query(db_dsn, "UPDATE genesis.workflow_runs SET status = 'failed' WHERE msg_id IN (1, 100)")
    assert_agree(db_dsn)
    migrate_to(db_dsn, "0016", down=True)
    assert tallied(db_dsn) == counted(db_dsn)
    write(200)
    assert tallied(db_dsn) == counted(db_dsn)
    migrate_to(db_dsn, "head")
    assert_agree(db_dsn)


def test_a_trickle_is_folded_in_batches(db_dsn: str) -> None:
    """The consumer's job folds once FOLD_MIN_ROWS runs are past the horizon or FOLD_MAX_WAIT_S
    after the last fold: each fold leaves dead rows of its own, so a slow trickle waits."""
    def horizon() -> Any:
        return query(db_dsn, "SELECT folded_below::text AS x FROM genesis.tally_horizon")[0]["x"]

    query(db_dsn, "INSERT INTO genesis.workflow_runs (queue, msg_id, type, status) "
                  "SELECT %s, g, 'genesis_rule_update', 'completed' FROM generate_series(1::bigint, 5::bigint) g", (RULES,))
    with Database(db_dsn, max_size=2).open() as db:
        was = horizon()
        assert compact(db, min_rows=6, max_wait_s=3600).folded == 0
        assert horizon() == was
        assert_agree(db_dsn)
        query(db_dsn, "INSERT INTO genesis.workflow_runs (queue, msg_id, type, status) "
                      "VALUES (%s, 6, 'genesis_rule_update', 'failed')", (RULES,))
        # six past it now; or, however few, the last fold long enough ago
        for report in (compact(db, min_rows=6, max_wait_s=3600), compact(db, min_rows=10**6, max_wait_s=0)):
            assert report.ran and report.folded is not None
        assert horizon() != was
    assert_agree(db_dsn)


def plan_scans(dsn: str, statement: str) -> list[tuple[str, str, float]]:
    """(node type, relation, rows the planner expects) of every node of the statement's plan that
    reads a relation or a function."""
    [row] = query(dsn, f"EXPLAIN (FORMAT JSON) {statement}")
    found: list[tuple[str, str, float]] = []

    def walk(node: dict[str, Any]) -> None:
        if "Relation Name" in node or node["Node Type"] == "Function Scan":
            found.append((node["Node Type"], node.get("Relation Name") or node.get("Function Name", ""),
                          node["Plan Rows"]))
        for child in node.get("Plans", []):
            walk(child)
    walk(row["QUERY PLAN"][0]["Plan"])
    return found


def test_the_counts_read_the_runs_past_the_horizon_by_index_and_once(db_dsn: str) -> None:
    """Migration 0017: the views' part past the horizon is an index range scan (with one bound
    unknown at planning, a third of the table was expected: a parallel scan); queue_health reads
    it once, not three times per queue (twelve reads priced the view into JIT compilation)."""
    query(db_dsn, "INSERT INTO genesis.workflow_runs (queue, msg_id, type, status) "
                  "SELECT %s, g, 'genesis_rule_update', 'completed' FROM generate_series(1::bigint, 20000::bigint) g",
          (RULES,))
    with Database(db_dsn, max_size=2).open() as db:
        assert compact(db).ran
    query(db_dsn, "ANALYZE genesis.workflow_runs")
    for statement, reads in (("SELECT * FROM genesis.run_tallies", 1), ("SELECT * FROM genesis.queue_health", 1)):
        scans = plan_scans(db_dsn, statement)
        runs = [node for node, relation, _rows in scans if relation == "workflow_runs"]
        assert runs == ["Index Scan"] * reads, (statement, scans)
        # a narrow range expected (both bounds), not a third of the table (at 1M runs: a parallel scan)
        assert all(rows <= 20000 / 100 for _node, relation, rows in scans if relation == "workflow_runs"), scans
    assert_agree(db_dsn)
