"""/metrics, /healthz and /readyz of a consumer on a real PostgreSQL over real HTTP; the CLI's metrics
port and JSON logs in a subprocess."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from genesis_pgflow import metrics
from genesis_pgflow.app import App
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.metrics import DatabaseReading, PgDatabaseProbe
from genesis_pgflow.testing import wait_until

pytestmark = pytest.mark.db

RULES = "genesis_rule_updates"
GENESIS_CONSUME = Path(sys.executable).parent / "genesis-consume"


def rule(i: int, **extra: Any) -> dict[str, Any]:
    return {"type": "genesis_rule_update", "namespace": "m", "rule_id": f"r{i}", "confidence": 0.95,
            "rule": {"when": "x"}, **extra}


def send(dsn: str, queue: str, body: Any) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgmq.send(%s, %s::jsonb)", (queue, json.dumps(body)))


def execute(dsn: str, sql: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


class CountingProbe(PgDatabaseProbe):
    """The real probe, counting its readings."""

    reads = 0

    def read(self) -> DatabaseReading:
        self.reads += 1
        return super().read()


@pytest.fixture
def app(db_dsn: str, genesis_home: Path) -> Iterator[App]:
    opened = App.open(Settings(dsn=db_dsn, home=genesis_home, drain=True, poll_interval_ms=50, parallel=2))
    yield opened
    opened.close()


def test_queue_figures_health_and_readiness_over_http(app: App, db_dsn: str) -> None:
    for i in range(3):
        send(db_dsn, RULES, rule(i))
    consumer = app.consumer()
    probe = CountingProbe(db_dsn)
    watched = metrics.ConsumerMetrics(consumer, probe=probe, db=app.db, cache_s=3600)
    server = metrics.serve(watched, "127.0.0.1", 0)
    port = server.server_address[1]
    try:
        found = scrape(port)
        assert sample(found, "genesis_queue_depth", queue=RULES) == 3
        assert sample(found, "genesis_queue_in_flight", queue=RULES) == 0
        assert sample(found, "genesis_queue_depth", queue="genesis_rule_updates_dlq") == 0
        assert (sample(found, "genesis_queue_oldest_message_age_seconds", queue=RULES) or 0) >= 0
        assert sample(found, "genesis_database_up") == 1
        assert sample(found, "genesis_db_pool_max_connections") == app.settings.parallel + 1
        assert sample(found, "genesis_db_pool_connections", state="idle") is not None
        assert get(port, "/healthz")[0] == 200
        assert get(port, "/readyz") == (200, "ok: database reachable, schema current\n")
        send(db_dsn, RULES, rule(9))
        again = scrape(port)                      # within cache_s: the same figures, no second reading
        assert sample(again, "genesis_queue_depth", queue=RULES) == 3
        assert probe.reads == 1
    finally:
        server.shutdown()
        server.server_close()
        watched.close()


def test_a_failed_reading_keeps_the_last_figures_and_says_the_database_is_down(app: App, db_dsn: str,
                                                                            server_dsn: str) -> None:
    send(db_dsn, RULES, rule(1))
    watched = metrics.ConsumerMetrics(app.consumer(), probe=PgDatabaseProbe(db_dsn), db=app.db, cache_s=0)
    server = metrics.serve(watched, "127.0.0.1", 0)
    port = server.server_address[1]
    name = conninfo_to_dict(db_dsn)["dbname"]
    try:
        assert sample(scrape(port), "genesis_queue_depth", queue=RULES) == 1
        # The database refuses new connections and the probe's own session is cut.
        execute(server_dsn, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        execute(server_dsn, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' "
                            "AND application_name = 'genesis-metrics'")
        found = scrape(port)
        assert sample(found, "genesis_database_up") == 0
        assert sample(found, "genesis_queue_depth", queue=RULES) == 1
        assert get(port, "/readyz") == (503, "not ready: the database is unreachable\n")
        assert get(port, "/healthz")[0] == 200      # an outage is no reason to restart the consumer
        execute(server_dsn, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        assert sample(scrape(port), "genesis_database_up") == 1
        assert get(port, "/readyz")[0] == 200
    finally:
        execute(server_dsn, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        server.shutdown()
        server.server_close()
        watched.close()


def test_readyz_is_503_for_a_missing_or_unmigrated_database(app: App, db_dsn: str, empty_db_dsn: str) -> None:
    missing = make_conninfo(db_dsn, dbname="genesis_no_such_database")
    for dsn, reason in ((missing, "not ready: the database is unreachable\n"),
                        (empty_db_dsn, "not ready: pgmq is not installed: run `genesis db upgrade`\n")):
        watched = metrics.ConsumerMetrics(app.consumer(), probe=PgDatabaseProbe(dsn), db=app.db)
        server = metrics.serve(watched, "127.0.0.1", 0)
        port = server.server_address[1]
        try:
            assert get(port, "/readyz") == (503, reason)
            found = scrape(port)                   # the scrape itself still works
            assert sample(found, "genesis_database_up") == (0 if dsn == missing else 1)
            assert sample(found, "genesis_queue_depth", queue=RULES) is None
        finally:
            server.shutdown()
            server.server_close()
            watched.close()


def test_a_drained_burst_is_counted_by_queue_type_and_status(app: App, db_dsn: str) -> None:
    send(db_dsn, RULES, rule(1))
    send(db_dsn, RULES, rule(2, confidence=0.1))                       # below the minimum: low_confidence
    send(db_dsn, RULES, {"type": 'x"}\ngenesis_forged 1\n#'})         # unknown type, forged label text
    consumer = app.consumer()
    with metrics.serving(app, consumer, "127.0.0.1", 0) as watched:
        consumer.run()                                                  # --drain: returns once empty
        found = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for f in text_string_to_metric_families(watched.exposition().decode()) for s in f.samples}
        assert watched.health()[0]
    assert sample(found, "genesis_results_total", queue=RULES, type="genesis_rule_update", status="completed") == 1
    assert sample(found, "genesis_results_total", queue=RULES, type="genesis_rule_update", status="failed") == 1
    assert sample(found, "genesis_results_total", queue=RULES, type="other", status="failed") == 1
    assert sample(found, "genesis_handler_duration_seconds_count", type="genesis_rule_update") == 2
    assert sample(found, "genesis_queue_depth", queue="genesis_rule_updates_results") == 3
    assert not [name for name, _labels in found if "forged" in name]


# --- the real CLI ---------------------------------------------------------------------------


def cli_env(home: Path, dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENESIS_", "DATABASE_URL"))}
    return {**env, "GENESIS_HOME": str(home), "GENESIS_DATABASE_URL": dsn}


def test_a_taken_metrics_port_exits_2_with_one_line(db_dsn: str, genesis_home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([str(GENESIS_CONSUME), "--drain", "--metrics-port", str(port)],
                              env=cli_env(genesis_home, db_dsn), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: metrics port {port} on 127.0.0.1 is already in use"], proc.stderr


def test_json_logs_are_one_object_a_line_with_an_iso_utc_timestamp(db_dsn: str, genesis_home: Path) -> None:
    send(db_dsn, RULES, rule(1))
    send(db_dsn, "genesis_llm_config_updates", {"type": "genesis_llm_config_update", "provider": "p",
                                                "complexity": "simple", "models": ["m"],
                                                "settings": {"api_key": "sk-never-logged"}})
    proc = subprocess.run([str(GENESIS_CONSUME), "--drain", "--log-format", "json", "--metrics-port", "0",
                           "--poll-interval-ms", "100"], env={**cli_env(genesis_home, db_dsn),
                                                            "GENESIS_LOG_LEVEL": "DEBUG"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    assert len(entries) >= 3 and "sk-never-logged" not in proc.stderr
    for entry in entries:
        assert {"ts", "level", "logger", "message"} <= set(entry)
        assert dt.datetime.fromisoformat(entry["ts"]).utcoffset() == dt.timedelta(0)
        assert entry["ts"].endswith("+00:00")
    assert any(e["message"].startswith("metrics on http://127.0.0.1:") for e in entries)


def probe_waits_on_a_lock(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = 'genesis-metrics' "
                            "AND wait_event_type = 'Lock'").fetchone() is not None


def test_a_scrape_does_not_wait_for_another_scrapes_reading(app: App, db_dsn: str) -> None:
    send(db_dsn, RULES, rule(1))
    watched = metrics.ConsumerMetrics(app.consumer(), probe=PgDatabaseProbe(db_dsn, statement_timeout_ms=120_000),
                                      db=app.db, cache_s=0)
    server = metrics.serve(watched, "127.0.0.1", 0)
    port = server.server_address[1]
    blocked: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []
    try:
        assert sample(scrape(port), "genesis_queue_depth", queue=RULES) == 1
        send(db_dsn, RULES, rule(2))
        with psycopg.connect(db_dsn) as locker:        # a DBA's lock holds the next reading up
            locker.execute("LOCK TABLE genesis.alembic_version IN ACCESS EXCLUSIVE MODE")
            first = threading.Thread(target=lambda: blocked.append(scrape(port)))
            first.start()
            wait_until(lambda: probe_waits_on_a_lock(db_dsn), what="the probe waiting on the lock")
            found = scrape(port)                        # answered at once, from the previous reading
            assert sample(found, "genesis_queue_depth", queue=RULES) == 1
            assert sample(found, "genesis_database_up") == 1
            assert first.is_alive() and not blocked
            locker.rollback()
        first.join(timeout=60)
        assert sample(blocked[0], "genesis_queue_depth", queue=RULES) == 2
    finally:
        server.shutdown()
        server.server_close()
        watched.close()
