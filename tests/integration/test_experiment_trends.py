"""Experiment trends (genesis.experiment_trends, `genesis experiments trends`), the daily report to
genesis_reports (sent once per day whoever races to send it), and `genesis experiments show` with
a decided experiment's classes, flaky tests and performance deltas. Real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import threading
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from genesis_pgflow.cli import admin_main
from genesis_pgflow.messages import REPORT_QUEUE
from genesis_pgflow.store import reports
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.experiments import ExperimentStart, PgExperimentRecords

pytestmark = pytest.mark.db


def query(dsn: str, statement: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def today(dsn: str) -> dt.date:
    return query(dsn, "SELECT (now() AT TIME ZONE 'UTC')::date AS d")[0]["d"]


def finished(records: PgExperimentRecords, experiment_id: str, *, kind: str = "refactor", instance: str = "s1",
             status: str = "success", recommendation: str = "merge", regression: float = 0.0) -> None:
    records.experiment_started(ExperimentStart(experiment_id, instance, kind, "", "low", "/r", "HEAD", "/s"))
    records.experiment_finished(experiment_id, {
        "status": status, "recommendation": recommendation, "rolled_back": status == "regressed",
        "metrics": {"success_rate": 1.0 - regression, "regression": regression, "baseline_success_rate": 1.0,
                    "test_count": 10, "failures": 0, "duration_ms": 1000.0}})


def on_day(dsn: str, experiment_id: str, day: dt.date) -> None:
    query(dsn, "UPDATE genesis.experiments SET finished_at = %s::date + time '12:00' AT TIME ZONE 'UTC' "
               "WHERE experiment_id = %s", (day, experiment_id))


@pytest.fixture
def history(db_dsn: str) -> dt.date:
    """Yesterday: 3 refactors by s1 (2 merged, 1 regressed at 0.5), 1 perf by s2 (review); the day
    before: 1 refactor by s1; today: 1 refactor by s1; one still running."""
    yesterday = today(db_dsn) - dt.timedelta(days=1)
    with Database(db_dsn, max_size=2) as db:
        records = PgExperimentRecords(db)
        finished(records, "a")
        finished(records, "b")
        finished(records, "c", status="regressed", recommendation="reject", regression=0.5)
        finished(records, "d", kind="performance", instance="s2", recommendation="merge_with_review", regression=0.1)
        finished(records, "e")
        finished(records, "f")
        records.experiment_started(ExperimentStart("g", "s1", "refactor", "", "low", "/r", "HEAD", "/s"))
    for name in "abcd":
        on_day(db_dsn, name, yesterday)
    on_day(db_dsn, "e", yesterday - dt.timedelta(days=1))
    return yesterday


def test_the_view_counts_per_day_type_and_instance(db_dsn: str, history: dt.date) -> None:
    rows = query(db_dsn, "SELECT * FROM genesis.experiment_trends WHERE day = %s "
                         "ORDER BY experiment_type, instance_id", (history,))
    assert rows == [
        {"day": history, "experiment_type": "performance", "instance_id": "s2", "experiments": 1, "succeeded": 1,
         "regressed": 0, "failed": 0, "success_rate": 1.0, "mean_regression": 0.1, "merge": 0,
         "merge_with_review": 1, "reject": 0, "mean_duration_ms": 1000.0},
        {"day": history, "experiment_type": "refactor", "instance_id": "s1", "experiments": 3, "succeeded": 2,
         "regressed": 1, "failed": 0, "success_rate": 0.6667, "mean_regression": 0.1667, "merge": 2,
         "merge_with_review": 0, "reject": 1, "mean_duration_ms": 1000.0}]
    # the running experiment counts nowhere; the other days have their own rows
    assert sum(r["experiments"] for r in query(db_dsn, "SELECT experiments FROM genesis.experiment_trends")) == 6


def test_the_trends_command(db_dsn: str, history: dt.date, capsys: pytest.CaptureFixture[str]) -> None:
    assert admin_main(["experiments", "trends", "--dsn", db_dsn, "--days", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["day"], r["experiment_type"], r["experiments"]) for r in rows] == [
        (str(history + dt.timedelta(days=1)), "refactor", 1),
        (str(history), "performance", 1), (str(history), "refactor", 3)]
    assert admin_main(["experiments", "trends", "--dsn", db_dsn, "--days", "3"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["day", "type", "instance", "experiments", "success_rate", "mean_regression", "merge",
                               "review", "reject"]
    assert text[-1].split() == [str(history - dt.timedelta(days=1)), "refactor", "s1", "1", "1", "0", "1", "0",
                                "0"]


def test_two_consumers_racing_send_one_report_a_day(db_dsn: str, history: dt.date) -> None:
    """Two stores (two consumers) run the daily job at once, then again after a "restart": one
    report reaches genesis_reports, for yesterday, with yesterday's trends."""
    with Database(db_dsn, max_size=2) as one, Database(db_dsn, max_size=2) as two:
        start = threading.Barrier(2)
        runs: list[reports.ReportRun] = []

        def job(db: Database, name: str) -> None:
            start.wait(timeout=10)
            runs.append(reports.send_due(db, name))

        threads = [threading.Thread(target=job, args=(db, f"consumer-{i}")) for i, db in enumerate((one, two))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        again = [reports.send_due(one, "consumer-0"), reports.send_due(two, "consumer-1")]

    assert sorted(len(r.days) for r in runs) == [0, 1] and all(r.days == [] for r in again)
    [message] = [r["message"] for r in query(db_dsn, f"SELECT message FROM pgmq.q_{REPORT_QUEUE}")]
    assert message["type"] == "genesis_experiment_report" and message["day"] == str(history)
    assert message["sent_by"] in {"consumer-0", "consumer-1"}
    assert message["totals"] == {"experiments": 4, "succeeded": 3, "regressed": 1, "failed": 0, "success_rate": 0.75,
                                 "mean_regression": 0.15,
                                 "recommendations": {"merge": 2, "merge_with_review": 1, "reject": 1}}
    assert [(r["experiment_type"], r["instance_id"], r["experiments"], r["recommendations"]["reject"])
            for r in message["by_type"]] == [("performance", "s2", 1, 0), ("refactor", "s1", 3, 1)]
    [mark] = query(db_dsn, "SELECT last_day, sent_by FROM genesis.scheduled_reports")
    assert mark == {"last_day": history, "sent_by": message["sent_by"]}


def test_missed_days_are_caught_up_once(db_dsn: str) -> None:
    """No consumer ran for three days: the next one sends each ended day's report, oldest first."""
    yesterday = today(db_dsn) - dt.timedelta(days=1)
    query(db_dsn, "INSERT INTO genesis.scheduled_reports (report, last_day) VALUES (%s, %s)",
          (reports.REPORT_NAME, yesterday - dt.timedelta(days=3)))
    with Database(db_dsn, max_size=2) as db:
        sent = reports.send_due(db, "c").days
        assert reports.send_due(db, "c").days == []
    assert sent == [str(yesterday - dt.timedelta(days=n)) for n in (2, 1, 0)]
    days = [r["message"]["day"] for r in query(db_dsn, f"SELECT message FROM pgmq.q_{REPORT_QUEUE} ORDER BY msg_id")]
    assert days == sent


def test_show_prints_classes_flaky_tests_and_performance(db_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = {"experiment_id": "x", "instance_id": "s1", "status": "success", "recommendation": "merge_with_review",
              "rolled_back": False, "baseline_commit": "b" * 40, "counted_by": "exunit-formatter",
              "metrics": {"success_rate": 0.99, "regression": 0.0, "baseline_success_rate": 0.99, "test_count": 250,
                          "failures": 2, "duration_ms": 5000.0},
              "classes": {"pass->pass": 246, "pass->fail": 0, "fail->pass": 1, "fail->fail": 1},
              "regressions": [], "fixed": ["test/a_test.exs:12"], "flaky": ["test/flaky_test.exs:7"], "reruns": 2,
              "performance": {"baseline": {"wall_ms": 1000.0, "cpu_ms": 800.0, "memory_peak_bytes": 1000},
                              "change": {"wall_ms": 1500.0, "cpu_ms": 800.0, "memory_peak_bytes": 1000},
                              "relative_change": {"wall_ms": 0.5, "cpu_ms": 0.0, "memory_peak_bytes": 0.0},
                              "slower_tests": [{"test": "test/slow_test.exs:3", "baseline_ms": 10.0,
                                                "change_ms": 30.0, "relative_change": 2.0}],
                              "metrics": {"llm_calls": {"baseline": 12, "change": 9, "relative_change": -0.25}}}}
    with Database(db_dsn, max_size=2) as db:
        records = PgExperimentRecords(db)
        records.experiment_started(ExperimentStart("x", "s1", "refactor", "", "low", "/r", "HEAD", "/s"))
        records.experiment_finished("x", result)
    assert admin_main(["experiments", "show", "x", "--dsn", db_dsn]) == 0
    text = capsys.readouterr().out
    assert "experiment x (refactor, instance s1, risk low): success, merge_with_review" in text
    assert "fail->pass      1" in text and "pass->pass    246" in text
    assert "flaky tests: test/flaky_test.exs:7" in text and "fixed: test/a_test.exs:12" in text
    assert "regressions: (none)" in text and "counted by exunit-formatter" in text
    perf = {line.split()[0] if not line.startswith("metric") else line.split()[1]: line.split()[-3:]
            for line in text.splitlines() if line.startswith(("wall_ms", "cpu_ms", "metric "))}
    assert perf == {"wall_ms": ["1000", "1500", "0.5"], "cpu_ms": ["800", "800", "0"],
                    "llm_calls": ["12", "9", "-0.25"]}
    assert "slower tests: test/slow_test.exs:3 10 -> 30 ms" in text
    assert "phases: decide (attempt 0)" in text
    assert admin_main(["experiments", "show", "x", "--dsn", db_dsn, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"] == result
