"""Fixtures of the fault tier: a throwaway PostgreSQL (session-wide; a test that stops it gets it
back running for the next one), a fresh database on it per test, a TCP proxy the test controls,
and the CLI processes a test starts (killed at teardown). After each test that used `fault_db`,
the invariants are checked (tests/faults/invariants.py).

    def test_x(fault_db, proxy, consumers, genesis_home):
        ids = fault_db.send_rules(100)
        c = consumers.start("--queues", RULES, env=cli_env(genesis_home, fault_db.dsn_via(proxy)))
        proxy.cut(); ...; proxy.restore()
        fault_db.wait_answered(ids)
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from genesis_pgflow.testing import wait_until

from .consumers import GENESIS, Consumers, cli_env, run_cli
from .invariants import assert_invariants
from .proxy import Proxy
from .server import ThrowawayServer

RULES, RULES_RESULTS = "genesis_rule_updates", "genesis_rule_updates_results"
CODE, CODE_RESULTS = "code_execution_requests", "code_execution_results"
TEMPLATE = "genesis_faults_template"
TEST_APP = "genesis-faults-test"   # the application_name of the test's own sessions, left out of counts


def rule(i: int | str) -> dict[str, Any]:
    return {"type": "genesis_rule_update", "namespace": "faults", "rule_id": f"r{i}", "version": 1,
            "confidence": 0.95, "rule": {"when": "x", "then": "y"}}


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawayServer]:
    """The tier's own PostgreSQL 15, with a template database brought to the current schema by
    `genesis db upgrade` (pgmq's SQL-only install, every queue, the genesis schema)."""
    server = ThrowawayServer.create()
    try:
        server.execute(f'CREATE DATABASE "{TEMPLATE}"')
        home = tmp_path_factory.mktemp("faults-home")
        upgraded = run_cli("db", "upgrade", env=cli_env(home, server.dsn(TEMPLATE)), script=GENESIS)
        assert upgraded.returncode == 0, upgraded.stderr
        yield server
    finally:
        server.destroy()


_counter = itertools.count()


@dataclass
class FaultDb:
    """A fresh database on the throwaway server, and what the test sent to it."""

    server: ThrowawayServer
    name: str
    sent: dict[str, list[int]] = field(default_factory=dict)
    checked: bool = False

    @property
    def dsn(self) -> str:
        return self.server.dsn(self.name)

    def dsn_via(self, proxy: Proxy) -> str:
        """The DSN a consumer uses to reach this database through the proxy."""
        return self.server.dsn(self.name, port=str(proxy.port))

    def sql(self, statement: str, params: Any = None) -> list[dict[str, Any]]:
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row, connect_timeout=10,
                             application_name=TEST_APP) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, statement: str, params: Any = None) -> Any:
        return next(iter(self.sql(statement, params)[0].values()))

    def send(self, queue: str, bodies: Sequence[dict[str, Any]]) -> list[int]:
        """pgmq.send_batch with plain SQL, as producers do."""
        rows = self.sql("SELECT pgmq.send_batch(%s, %s::jsonb[]) AS msg_id", (queue, [json.dumps(b) for b in bodies]))
        ids = [r["msg_id"] for r in rows]
        self.sent.setdefault(queue, []).extend(ids)
        return ids

    def send_rules(self, n: int, start: int = 0) -> list[int]:
        return self.send(RULES, [rule(i) for i in range(start, start + n)])

    def answered(self, queue: str = RULES_RESULTS) -> int:
        return int(self.scalar(f"SELECT count(*) FROM pgmq.q_{queue}"))

    def answered_ids(self, results_queue: str = RULES_RESULTS) -> list[int]:
        return [r["id"] for r in self.sql(
            f"SELECT (message->'request'->>'msg_id')::bigint AS id FROM pgmq.q_{results_queue} ORDER BY msg_id")]

    def results(self, results_queue: str = RULES_RESULTS) -> list[dict[str, Any]]:
        return [r["message"] for r in self.sql(f"SELECT message FROM pgmq.q_{results_queue} ORDER BY msg_id")]

    def wait_answered(self, ids: Sequence[int], results_queue: str = RULES_RESULTS, timeout: float = 120) -> None:
        wanted = set(ids)
        wait_until(lambda: wanted <= set(self.answered_ids(results_queue)), timeout=timeout, interval=0.1,
                   what=f"answers to {len(wanted)} request(s)")

    def held(self, queue: str = RULES) -> int:
        """Messages leased right now (invisible, not yet archived)."""
        return int(self.scalar(f"SELECT count(*) FROM pgmq.q_{queue} WHERE vt > clock_timestamp()"))

    def sessions(self, state: str | None = None) -> list[dict[str, Any]]:
        """The client sessions on this database but the test's own (pg_stat_activity), optionally
        in one state."""
        return self.sql("SELECT pid, state, application_name, query FROM pg_stat_activity "
                        "WHERE datname = current_database() AND application_name <> %s "
                        "AND backend_type = 'client backend' AND (%s::text IS NULL OR state = %s::text)",
                        (TEST_APP, state, state))

    def terminate_backends(self) -> int:
        """pg_terminate_backend on every session of this database but the test's own."""
        return self.server.terminate_backends(self.name, spare_application=TEST_APP)

    def check(self) -> None:
        """The invariants of every request this test sent (and that nothing else was archived)."""
        self.checked = True
        assert_invariants(self.dsn, self.sent)


@pytest.fixture
def fault_db(pg_server: ThrowawayServer) -> Iterator[FaultDb]:
    """A fresh database cloned from the template; the invariants are checked after the test."""
    pg_server.ensure_running()
    name = f"faults_{next(_counter)}_{uuid.uuid4().hex[:8]}"
    pg_server.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    db = FaultDb(pg_server, name)
    yield db
    pg_server.ensure_running()
    try:
        if not db.checked:
            db.check()
    finally:
        pg_server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def proxy(pg_server: ThrowawayServer) -> Iterator[Proxy]:
    with Proxy(pg_server.port) as proxied:
        yield proxied


@pytest.fixture
def consumers(fault_db: FaultDb) -> Iterator[Consumers]:
    """start(*args, env=...) runs genesis-consume in the background; killed at teardown, before
    the database's invariants are checked (hence the dependency on fault_db)."""
    started = Consumers()
    yield started
    started.kill_all()
