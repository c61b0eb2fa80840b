"""The database fails under a running consumer: its backends terminated, the server restarted (fast
and immediate) mid-batch and while idle, writes refused for a while. The consumer stays up, gets
back to work on its own, and every request ends with exactly one result."""

from __future__ import annotations

import json
import signal
import time

import psycopg
import pytest

from genesis_pgflow.testing import wait_until

from .conftest import RULES, FaultDb, rule
from .consumers import Consumer, Consumers, cli_env

pytestmark = [pytest.mark.faults, pytest.mark.db]

# How long a consumer may take to answer once the database is back. The aim is 2 s (measured by
# benchmarks/recovery.py); this bound only tells a recovery from a hang, on a busy machine.
RECOVERY_BOUND_S = 60
FAST = ("--poll-interval-ms", "100", "--no-migrate", "--queues", RULES)


def _start(consumers: Consumers, fault_db: FaultDb, home, *args: str, **env: str) -> Consumer:
    consumer = consumers.start(*FAST, *args, env=cli_env(home, fault_db.dsn, **env))
    consumer.wait_for_line("consuming")
    return consumer


def _wait_idle(fault_db: FaultDb) -> None:
    """Until the consumer's LISTEN session is up (it then waits for NOTIFY or its poll)."""
    wait_until(lambda: any(s["state"] == "idle" and s["query"].upper().startswith("LISTEN")
                           for s in fault_db.sessions()), timeout=60, what="a LISTENing consumer")


def _stop(consumer: Consumer) -> None:
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(timeout=120) == 0, consumer.stderr()


@pytest.mark.parametrize("parallel", [1, 4])
def test_backends_terminated_mid_batch_three_times(parallel: int, fault_db: FaultDb, consumers: Consumers,
                                                   genesis_home) -> None:
    ids = fault_db.send_rules(900)
    consumer = _start(consumers, fault_db, genesis_home, "--parallel", str(parallel), "--batch-size", "50")
    terminated = 0
    for round_ in range(1, 4):
        wait_until(lambda n=round_ * 150: fault_db.answered() >= n, timeout=120, what=f"{round_ * 150} answers")
        terminated += fault_db.terminate_backends()
    assert terminated >= 3
    fault_db.wait_answered(ids)
    assert consumer.running(), consumer.stderr()
    _stop(consumer)
    fault_db.check()


def test_backends_terminated_while_idle_then_a_message_is_answered(fault_db: FaultDb, consumers: Consumers,
                                                                    genesis_home) -> None:
    consumer = _start(consumers, fault_db, genesis_home)
    fault_db.wait_answered(fault_db.send_rules(1))
    _wait_idle(fault_db)
    assert fault_db.terminate_backends() >= 2     # the LISTEN session and a pooled one

    fault_db.wait_answered(fault_db.send_rules(1, start=1), timeout=RECOVERY_BOUND_S)
    assert consumer.running(), consumer.stderr()
    _stop(consumer)
    fault_db.check()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restart_mid_batch(mode: str, fault_db: FaultDb, consumers: Consumers, genesis_home) -> None:
    ids = fault_db.send_rules(5000)      # two processes at -p 4 answer thousands a second: the restart comes first
    consumer = _start(consumers, fault_db, genesis_home, "--parallel", "4", "--batch-size", "20",
                      GENESIS_LEASE_S="3")
    wait_until(lambda: fault_db.answered() >= 200, timeout=120, what="200 answers")
    fault_db.server.restart(mode)
    assert fault_db.answered() < len(ids), "drained before the restart: send more messages"

    fault_db.wait_answered(ids, timeout=180)
    assert consumer.running(), consumer.stderr()
    _stop(consumer)
    fault_db.check()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
@pytest.mark.parametrize("parallel", [4, 32])
def test_server_restart_while_idle_then_a_message_is_answered(mode: str, parallel: int, fault_db: FaultDb,
                                                               consumers: Consumers, genesis_home) -> None:
    consumer = _start(consumers, fault_db, genesis_home, "--parallel", str(parallel))
    fault_db.wait_answered(fault_db.send_rules(1))
    _wait_idle(fault_db)
    fault_db.server.restart(mode)

    fault_db.wait_answered(fault_db.send_rules(1, start=1), timeout=RECOVERY_BOUND_S)
    assert consumer.running(), consumer.stderr()
    _stop(consumer)
    fault_db.check()


@pytest.mark.slow
def test_wake_ups_survive_an_immediate_restart(fault_db: FaultDb, consumers: Consumers, genesis_home) -> None:
    """With a 60 s poll, only NOTIFY gets a message answered within the bound: after a crash
    restart the insert notifications must still fire and the consumer must LISTEN again."""
    consumer = consumers.start("--poll-interval-ms", "60000", "--no-migrate", "--queues", RULES,
                               env=cli_env(genesis_home, fault_db.dsn))
    consumer.wait_for_line("consuming")
    _wait_idle(fault_db)
    fault_db.wait_answered(fault_db.send_rules(1), timeout=RECOVERY_BOUND_S)
    fault_db.server.restart("immediate")
    _wait_idle(fault_db)

    fault_db.wait_answered(fault_db.send_rules(1, start=1), timeout=RECOVERY_BOUND_S)
    _stop(consumer)
    fault_db.check()


def test_read_only_database_is_waited_out(fault_db: FaultDb, consumers: Consumers, genesis_home) -> None:
    """A refused write (here: the database turned read-only) is a wait, not an exit."""
    consumer = _start(consumers, fault_db, genesis_home)
    fault_db.wait_answered(fault_db.send_rules(1))
    fault_db.server.execute(f'ALTER DATABASE "{fault_db.name}" SET default_transaction_read_only = on')
    fault_db.terminate_backends()        # new sessions pick the setting up
    ids = _send_bypassing_read_only(fault_db)
    # for four seconds every read (it records the run) fails with read_only_sql_transaction; the
    # consumer polls every 100 ms, so it meets the refusal many times
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert consumer.running(), f"the consumer exited on a refused write:\n{consumer.stderr()}"
        time.sleep(0.1)
    assert fault_db.answered() == 1, "nothing can be answered while writes are refused"

    fault_db.server.execute(f'ALTER DATABASE "{fault_db.name}" RESET default_transaction_read_only')
    fault_db.terminate_backends()
    fault_db.wait_answered(ids, timeout=RECOVERY_BOUND_S * 2)
    assert consumer.running(), consumer.stderr()
    _stop(consumer)
    fault_db.check()


def _send_bypassing_read_only(fault_db: FaultDb) -> list[int]:
    """A producer that still may write: its own session turns read-only off."""
    dsn = fault_db.dsn + " options='-c default_transaction_read_only=off'"
    with psycopg.connect(dsn, autocommit=True) as conn:
        msg_id = conn.execute("SELECT pgmq.send(%s, %s::jsonb)", (RULES, json.dumps(rule("ro")))).fetchone()[0]
    fault_db.sent.setdefault(RULES, []).append(msg_id)
    return [msg_id]
