"""SIGTERM while untrusted code runs in the sandbox: the consumer exits 0 within its grace period,
nothing it started is left running, and the given-back message has not spent an attempt."""

from __future__ import annotations

import signal

import pytest

from genesis_pgflow.testing import wait_until

from .conftest import CODE, CODE_RESULTS, FaultDb
from .consumers import Consumers, Proc, cli_env

pytestmark = [pytest.mark.faults, pytest.mark.db, pytest.mark.sandbox, pytest.mark.slow]
SANDBOX_UIDS = range(1_900_000_000, 1_900_000_256)     # the sandbox's uid pool (sandbox.Sandbox)


def _sleeper(seconds: int) -> dict:
    code = f"import time\n\n\ndef test_sleeps():\n    time.sleep({seconds})\n"
    return {"type": "code_execution_request", "id": "sleeper", "language": "python", "analysis_type": "testing",
            "code": code, "timeout_ms": 120_000}


def test_sigterm_with_long_sandboxed_work_leaves_nothing_running(fault_db: FaultDb, consumers: Consumers,
                                                                 genesis_home) -> None:
    [msg_id] = fault_db.send(CODE, [_sleeper(60)])
    env = cli_env(genesis_home, fault_db.dsn, GENESIS_SHUTDOWN_GRACE_S="2")
    consumer = consumers.start("--queues", CODE, "--poll-interval-ms", "100", "--no-migrate",
                               "--timeout-ms", "120000", env=env)

    def sandboxed() -> list[Proc]:
        return [p for p in consumer.descendants() if p.uid in SANDBOX_UIDS]
    wait_until(sandboxed, timeout=90, interval=0.1, what="the untrusted test to run under a sandbox uid")
    started = consumer.descendants()         # the whole tree this consumer runs, sandbox included

    consumer.signal(signal.SIGTERM)
    code = consumer.wait(timeout=120)
    assert code == 0, consumer.stderr()
    # what was killed may take a moment to be reaped; a survivor would run for the rest of its 60 s
    wait_until(lambda: not [p for p in started if p.alive()], timeout=5,
               what="every process of the consumer's tree to be gone: "
                    + "; ".join(f"{p.pid} uid {p.uid} {p.cmdline[:80]}" for p in started if p.alive()))

    [row] = fault_db.sql(f"SELECT read_ct, vt <= clock_timestamp() AS visible FROM pgmq.q_{CODE} WHERE msg_id = %s",
                         (msg_id,))
    assert row["visible"], "given back: visible again at once"
    assert row["read_ct"] == 0, "a graceful give-back must not spend an attempt"
    assert fault_db.answered(CODE_RESULTS) == 0

    # the next consumer allows 3 s per workflow: the 60 s sleeper is cut short, on attempt 1
    finisher = consumers.start("--queues", CODE, "--poll-interval-ms", "100", "--no-migrate", "--drain",
                               "--timeout-ms", "3000", env=env)
    assert finisher.wait(timeout=120) == 0, finisher.stderr()
    [result] = fault_db.results(CODE_RESULTS)
    assert result["status"] in ("completed", "failed"), result
    assert result["request"]["attempt"] == 1
    fault_db.check()
