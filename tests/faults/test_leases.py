"""Leases and sessions: a consumer that stalls past its lease loses its messages to another consumer
without any request answered twice; no transaction stays open while handlers run; connections stay
within --parallel + 3."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import psycopg
import pytest

from genesis_pgflow.testing import wait_until

from .conftest import CODE, CODE_RESULTS, RULES, TEST_APP, FaultDb
from .consumers import Consumers, cli_env

pytestmark = [pytest.mark.faults, pytest.mark.db]
FAST = ("--poll-interval-ms", "100", "--no-migrate")


@pytest.mark.slow
def test_a_stalled_consumer_loses_its_lease_to_another_and_nothing_is_answered_twice(
        fault_db: FaultDb, consumers: Consumers, genesis_home) -> None:
    """Consumer A is frozen (SIGSTOP: a GC pause, a stalled VM) while it holds leases, so it cannot
    renew them; they expire and consumer B answers those requests. When A thaws, its late
    outcomes must not publish a second result."""
    # enough that A, which answers a batch of 100 in a few milliseconds, is still under way when frozen
    ids = fault_db.send_rules(4000)
    env = cli_env(genesis_home, fault_db.dsn, GENESIS_LEASE_S="2")
    a = consumers.start(*FAST, "--queues", RULES, "--parallel", "4", "--batch-size", "100", env=env)
    wait_until(lambda: fault_db.answered() >= 50, timeout=120, what="A to be under way")

    def frozen_holding_leases() -> bool:
        """Frozen outside any transaction on the queue: one frozen inside holds its row locks too,
        and pgmq.read skips locked rows, so nobody could take those messages whatever the lease.
        (Its handlers' own transactions on other tables do not matter here.)"""
        a.signal(signal.SIGSTOP)
        queue_locked = fault_db.scalar(
            "SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND pid <> pg_backend_pid()",
            (f"pgmq.q_{RULES}",))
        if fault_db.held() > 0 and queue_locked == 0:
            return True
        a.signal(signal.SIGCONT)          # between batches or inside a transaction: again in a moment
        return False
    wait_until(frozen_holding_leases, timeout=120, interval=0.05, what="A frozen while holding leases")
    held = fault_db.sql(f"SELECT msg_id FROM pgmq.q_{RULES} WHERE vt > clock_timestamp()")
    stolen = {r["msg_id"] for r in held}

    b = consumers.start(*FAST, "--queues", RULES, "--parallel", "4", env=env)
    fault_db.wait_answered(sorted(stolen), timeout=150)       # after A's leases ran out
    a.signal(signal.SIGCONT)
    fault_db.wait_answered(ids, timeout=180)
    for consumer in (a, b):
        consumer.signal(signal.SIGTERM)
        assert consumer.wait(timeout=60) == 0, consumer.stderr()

    by = {m["request"]["msg_id"]: m for m in fault_db.results()}
    assert all(by[i]["consumer"].endswith(f":{b.pid}") for i in stolen), "B answered what A had held"
    assert all(by[i]["request"]["attempt"] >= 2 for i in stolen)
    fault_db.check()


class _Sampler:
    """Samples pg_stat_activity of one database in a thread while a test runs."""

    def __init__(self, fault_db: FaultDb):
        self.fault_db = fault_db
        self.max_sessions = 0
        self.at_peak: list[dict] = []
        self.long_idle_in_transaction: list[dict] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rows = self._sessions()
            except psycopg.OperationalError:      # the database is away for a moment: sample again
                self._stop.wait(0.05)
                continue
            self.samples += 1
            if len(rows) > self.max_sessions:
                self.max_sessions, self.at_peak = len(rows), rows
            # a gap between two statements of one transaction is fine; one open across a
            # handler's run (more than a second with nothing else happening) is not
            self.long_idle_in_transaction += [r for r in rows if (r["state"] or "").startswith("idle in transaction")
                                              and r["long"]]
            self._stop.wait(0.05)

    def _sessions(self) -> list[dict]:
        return self.fault_db.sql(
                "SELECT pid, state, application_name, left(query, 60) AS query, "
                "now() - state_change > interval '1 second' AS long "
                "FROM pg_stat_activity WHERE datname = current_database() AND application_name <> %s "
                "AND backend_type = 'client backend'", (TEST_APP,))


@pytest.mark.parametrize("parallel", [4, 16])
def test_connections_stay_within_parallel_plus_3_and_no_transaction_idles(
        parallel: int, fault_db: FaultDb, consumers: Consumers, genesis_home) -> None:
    ids = fault_db.send_rules(2000)
    consumer = consumers.start(*FAST, "--queues", RULES, "--parallel", str(parallel), "--batch-size", "20",
                               env=cli_env(genesis_home, fault_db.dsn))
    with _Sampler(fault_db) as sampler:
        wait_until(lambda: fault_db.answered() >= 500, timeout=120, what="500 answers")
        fault_db.terminate_backends()          # reconnecting must not overshoot
        fault_db.wait_answered(ids, timeout=180)
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(timeout=60) == 0, consumer.stderr()
    assert sampler.samples >= 5
    assert 1 <= sampler.max_sessions <= parallel + 3, "\n".join(
        f"{r['application_name']!r} {r['state']}: {r['query']}" for r in sampler.at_peak)
    assert sampler.long_idle_in_transaction == []
    fault_db.check()


def _sleeping_test(seconds: float, ident: str) -> dict:
    code = f"import time\n\n\ndef test_sleeps():\n    time.sleep({seconds})\n    assert True\n"
    return {"type": "code_execution_request", "id": ident, "language": "python", "analysis_type": "testing",
            "code": code, "timeout_ms": 120_000}


@pytest.mark.sandbox
@pytest.mark.slow
def test_no_transaction_stays_open_while_a_long_handler_runs(fault_db: FaultDb, consumers: Consumers,
                                                             genesis_home) -> None:
    [msg_id] = fault_db.send(CODE, [_sleeping_test(6, "long")])
    consumer = consumers.start(*FAST, "--queues", CODE, "--parallel", "2", "--timeout-ms", "120000",
                               env=cli_env(genesis_home, fault_db.dsn))
    running: Callable[[], bool] = lambda: any(  # noqa: E731
        "time.sleep" in p.cmdline or "pytest" in p.cmdline for p in consumer.descendants())
    wait_until(running, timeout=90, what="the sandboxed test to run")
    with _Sampler(fault_db) as sampler:
        fault_db.wait_answered([msg_id], CODE_RESULTS, timeout=120)
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(timeout=60) == 0, consumer.stderr()
    assert sampler.samples >= 10, "the handler ran too briefly to sample"
    assert sampler.long_idle_in_transaction == []
    [result] = fault_db.results(CODE_RESULTS)
    assert result["status"] == "completed", result
    fault_db.check()
