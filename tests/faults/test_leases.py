"""Leases and sessions: a consumer that stalls past its lease loses its messages to another consumer
without any request answered twice; no transaction stays open while handlers run; connections stay
within --parallel + 3 per process."""

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


def _sleeping_test(seconds: float, ident: str) -> dict:
    code = f"import time\n\n\ndef test_sleeps():\n    time.sleep({seconds})\n    assert True\n"
    return {"type": "code_execution_request", "id": ident, "language": "python", "analysis_type": "testing",
            "code": code, "timeout_ms": 120_000}


@pytest.mark.sandbox
@pytest.mark.slow
def test_a_stalled_consumer_loses_its_lease_to_another_and_nothing_is_answered_twice(
        fault_db: FaultDb, consumers: Consumers, genesis_home) -> None:
    """Consumer A is frozen (SIGSTOP: a GC pause, a stalled VM) while its handlers run, so it cannot
    renew their leases; they expire and consumer B answers those requests. When A thaws, its late
    outcomes must not publish a second result.

    The requests are sandboxed tests that sleep, so A holds their leases for seconds with no
    transaction open: a gate the test controls, where fast rule updates left A holding leases only
    for moments the test had to catch."""
    ids = fault_db.send(CODE, [_sleeping_test(6, f"stalled-{i}") for i in range(2)])
    env = cli_env(genesis_home, fault_db.dsn, GENESIS_LEASE_S="2")
    a = consumers.start(*FAST, "--queues", CODE, "--parallel", "2", "--timeout-ms", "120000", env=env)
    wait_until(lambda: fault_db.held(CODE) == 2 and any("pytest" in p.cmdline for p in a.descendants()),
               timeout=120, what="A to run the sandboxed tests")

    def frozen_outside_a_transaction() -> bool:
        """Frozen inside a transaction on the queue (renewing its leases, or polling), A would hold
        row locks that pgmq.read skips, so nobody could take those messages whatever the lease."""
        a.signal(signal.SIGSTOP)
        queue_locked = fault_db.scalar(
            "SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND pid <> pg_backend_pid()",
            (f"pgmq.q_{CODE}",))
        if queue_locked == 0:
            return True
        a.signal(signal.SIGCONT)          # inside a transaction: again in a moment
        return False
    wait_until(frozen_outside_a_transaction, timeout=60, interval=0.05, what="A frozen outside a transaction")
    try:
        b = consumers.start(*FAST, "--queues", CODE, "--parallel", "2", "--timeout-ms", "120000", env=env)
        fault_db.wait_answered(ids, CODE_RESULTS, timeout=180)       # after A's leases ran out
    finally:
        a.signal(signal.SIGCONT)
    # thawed, A finishes its runs and finds B has answered them: it sends nothing
    wait_until(lambda: "finished elsewhere (lease lost)" in a.stderr(), timeout=120,
               what="A to find its outcomes late")
    for consumer in (a, b):
        consumer.signal(signal.SIGTERM)
        assert consumer.wait(timeout=60) == 0, consumer.stderr()

    results = fault_db.results(CODE_RESULTS)
    assert sorted(r["request"]["msg_id"] for r in results) == sorted(ids), "one result per request"
    assert all(r["consumer"].endswith(f":{b.pid}") for r in results), "B answered what A had held"
    assert all(r["request"]["attempt"] >= 2 for r in results)
    assert all(r["status"] == "completed" for r in results), results
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


@pytest.mark.parametrize(("parallel", "processes"), [(4, 1), (16, 1), (4, 2)],
                         ids=["4", "16", "4-over-2-processes"])
def test_connections_stay_within_parallel_plus_3_per_process_and_no_transaction_idles(
        parallel: int, processes: int, fault_db: FaultDb, consumers: Consumers, genesis_home) -> None:
    ids = fault_db.send_rules(2000)
    consumer = consumers.start(*FAST, "--queues", RULES, "--parallel", str(parallel), "--batch-size", "20",
                               env=cli_env(genesis_home, fault_db.dsn, GENESIS_PROCESSES=str(processes)))
    with _Sampler(fault_db) as sampler:
        wait_until(lambda: fault_db.answered() >= 500, timeout=120, what="500 answers")
        fault_db.terminate_backends()          # reconnecting must not overshoot
        fault_db.wait_answered(ids, timeout=180)
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(timeout=60) == 0, consumer.stderr()
    assert sampler.samples >= 5
    # each process: its workers' connections (its share of --parallel), plus 3 of its own
    assert 1 <= sampler.max_sessions <= parallel + 3 * processes, "\n".join(
        f"{r['application_name']!r} {r['state']}: {r['query']}" for r in sampler.at_peak)
    assert sampler.long_idle_in_transaction == []
    fault_db.check()


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
