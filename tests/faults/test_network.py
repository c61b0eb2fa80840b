"""The network between the consumer and PostgreSQL fails (a TCP proxy the test controls): refused
(every connection cut, new ones refused) or blackholed (connections open, nothing answers). Within
the outage budget (GENESIS_MAX_OUTAGE_S) the consumer waits quietly and comes back on its own; past
it, it exits 2 with one line; SIGTERM is honoured whatever the network does."""

from __future__ import annotations

import signal
import time

import pytest

from genesis_pgflow.testing import wait_until

from .conftest import RULES, FaultDb
from .consumers import Consumer, Consumers, cli_env
from .proxy import Proxy

pytestmark = [pytest.mark.faults, pytest.mark.db]

RECOVERY_BOUND_S = 60        # see test_database_faults: tells a recovery from a hang
EXIT_BOUND_S = 120           # a 5 s budget, then one exit: generous for a busy machine
FAST = ("--poll-interval-ms", "100", "--no-migrate", "--queues", RULES)
QUIET_LINES = 6              # one when the database goes, one when it is back, a summary a minute


def _start(consumers: Consumers, fault_db: FaultDb, proxy: Proxy, home, **env: str) -> Consumer:
    consumer = consumers.start(*FAST, env=cli_env(home, fault_db.dsn_via(proxy), **env))
    consumer.wait_for_line("consuming")
    fault_db.wait_answered(fault_db.send_rules(1, start=10_000))    # working through the proxy
    return consumer


def _stays_up(consumer: Consumer, seconds: float) -> None:
    """The outage lasts `seconds` (the test controls it), and the consumer must live through it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert consumer.running(), f"the consumer exited during the outage:\n{consumer.stderr()}"
        time.sleep(0.1)


def _final_line(consumer: Consumer) -> str:
    lines = [line for line in consumer.stderr().splitlines() if line.strip()]
    assert lines, "no output at all"
    return lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_an_outage_past_the_budget_exits_2_with_one_line(fault: str, fault_db: FaultDb, proxy: Proxy,
                                                         consumers: Consumers, genesis_home) -> None:
    consumer = _start(consumers, fault_db, proxy, genesis_home, GENESIS_MAX_OUTAGE_S="5")
    before = consumer.line_count()
    getattr(proxy, fault)()

    code = consumer.wait(timeout=EXIT_BOUND_S)
    assert code == 2, f"exit {code}:\n{consumer.stderr()}"
    last = _final_line(consumer)
    assert last.startswith("error:") and "database" in last, last
    assert "Traceback" not in consumer.stderr()
    during = consumer.lines[before:]
    assert len(during) <= QUIET_LINES, "an outage of a few seconds flooded the log:\n" + "\n".join(during)
    proxy.restore()
    fault_db.check()


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_an_outage_within_the_budget_is_waited_out(fault: str, fault_db: FaultDb, proxy: Proxy,
                                                   consumers: Consumers, genesis_home) -> None:
    consumer = _start(consumers, fault_db, proxy, genesis_home, GENESIS_MAX_OUTAGE_S="120")
    ids = fault_db.send_rules(200)
    wait_until(lambda: fault_db.answered() >= 20, timeout=60, what="the batch to be under way")
    getattr(proxy, fault)()
    more = fault_db.send_rules(5, start=1000)
    # a few seconds: long enough for the loop, the pool and the LISTEN session to meet the outage
    _stays_up(consumer, 4)

    proxy.restore()
    fault_db.wait_answered(ids + more, timeout=RECOVERY_BOUND_S * 2)
    assert consumer.running(), consumer.stderr()
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(timeout=60) == 0, consumer.stderr()
    fault_db.check()


def test_a_refused_network_is_logged_in_a_few_lines(fault_db: FaultDb, proxy: Proxy, consumers: Consumers,
                                                    genesis_home) -> None:
    """No flood: the LISTEN session and the loop back off; one line out, one line back."""
    consumer = _start(consumers, fault_db, proxy, genesis_home, GENESIS_MAX_OUTAGE_S="300")
    before = consumer.line_count()
    proxy.cut()
    # ten seconds of outage: a reconnect loop without backoff writes thousands of lines in that time
    _stays_up(consumer, 10)
    proxy.restore()
    fault_db.wait_answered(fault_db.send_rules(1), timeout=RECOVERY_BOUND_S)
    during = consumer.lines[before:]
    assert len(during) <= QUIET_LINES, f"{len(during)} lines for a 10 s outage:\n" + "\n".join(during[:40])
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(timeout=60) == 0, consumer.stderr()
    fault_db.check()


def test_sigterm_is_honoured_during_a_blackhole(fault_db: FaultDb, proxy: Proxy, consumers: Consumers,
                                                genesis_home) -> None:
    consumer = _start(consumers, fault_db, proxy, genesis_home, GENESIS_MAX_OUTAGE_S="600",
                      GENESIS_SHUTDOWN_GRACE_S="5")
    ids = fault_db.send_rules(300)
    wait_until(lambda: fault_db.answered() >= 20, timeout=60, what="the batch to be under way")
    proxy.blackhole()
    # the consumer's next statement now hangs; give it time to send one
    _stays_up(consumer, 2)
    consumer.signal(signal.SIGTERM)
    code = consumer.wait(timeout=EXIT_BOUND_S)
    assert code == 0, f"exit {code}:\n{consumer.stderr()}"

    proxy.restore()
    # what it held comes back after its lease; a second consumer finishes the work
    finisher = consumers.start(*FAST, "--drain", env=cli_env(genesis_home, fault_db.dsn, GENESIS_LEASE_S="2"))
    assert finisher.wait(timeout=120) == 0, finisher.stderr()
    fault_db.wait_answered(ids)
    fault_db.check()
