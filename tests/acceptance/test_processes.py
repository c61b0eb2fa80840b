"""`genesis-consume --processes N`: N real consumer processes run as one command. Every request is
answered once between them, --parallel is shared, signals reach every process, and none outlives
the command (a kill -9 of it included) or keeps running when another has died. Processes are
checked on the host (/proc), not only in the database. No speed is asserted."""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from faults.consumers import Proc, descendants

from genesis_pgflow.errors import ConfigurationError
from genesis_pgflow.processes import exit_code, how_many, shares, usable_cores
from genesis_pgflow.testing import wait_until

from .conftest import Background
from .test_cli import (
    FAST,
    GENESIS,
    GENESIS_CONSUME,
    RULES,
    RULES_RESULTS,
    UNREACHABLE,
    cli_env,
    count,
    ok,
    one_line,
    query,
    results,
    rule,
    run_cli,
)


@pytest.fixture
def env(db_dsn: str, genesis_home: Path) -> dict[str, str]:
    return cli_env(genesis_home, db_dsn, GENESIS_HEARTBEAT_INTERVAL_S="1")


def registered(dsn: str) -> dict[int, dict[str, Any]]:
    """pid -> genesis.consumers row."""
    return {r["pid"]: r for r in query(dsn, "SELECT id, pid, parallel, state FROM genesis.consumers")}


def start_group(background: Callable[..., Background], env: dict[str, str], dsn: str,
                *args: str) -> tuple[Background, list[Proc]]:
    """A `--processes 2` command, once both of its processes are consuming (registered running)."""
    command = background(GENESIS_CONSUME, "--processes", "2", "--queues", RULES, *FAST, *args, env=env)
    def both_running() -> list[Proc]:
        children = [p for p in descendants(command.pid) if "consume_main" in p.cmdline]
        running = {pid for pid, row in registered(dsn).items() if row["state"] == "running"}
        return children if len(children) == 2 and {p.pid for p in children} <= running else []
    return command, wait_until(both_running, 60, what="two consumer processes registered and running")


def test_parallel_is_shared_and_the_exit_code_is_the_worst() -> None:
    assert shares(4, 2) == [2, 2] and shares(5, 2) == [3, 2] and shares(3, 3) == [1, 1, 1]
    assert exit_code([0, 0]) == 0
    assert exit_code([0, 1]) == 1 and exit_code([1, 2, 0]) == 2


def test_auto_is_one_process_per_usable_core_at_most_parallel_and_one_with_a_metrics_port() -> None:
    assert how_many("auto", 4, None, cores=2)[0] == 2
    assert how_many("auto", 4, None, cores=8)[0] == 4
    assert how_many("auto", 1, None, cores=2)[0] == 1
    n, why = how_many("auto", 4, 9100, cores=2)
    assert n == 1 and "--metrics-port" in why
    assert how_many(3, 4, None, cores=1)[0] == 3        # asked for: not lowered to the cores
    assert how_many(1, 4, 9100, cores=2)[0] == 1
    with pytest.raises(ConfigurationError, match="--metrics-port"):
        how_many(2, 4, 9100, cores=2)


@pytest.mark.parametrize(("argv", "mentions"), [
    (("--processes", "3", "--parallel", "2"), "--processes 3 needs --parallel of at least 3"),
    (("--processes", "2", "--metrics-port", "0"), "--metrics-port"),
    (("--processes", "0"), "processes"),
    (("--processes", "many"), "must be auto or a whole number"),
], ids=["more-processes-than-parallel", "with-a-metrics-port", "zero", "not-a-number"])
def test_bad_usage_exits_2_with_one_line_before_connecting(argv: tuple[str, ...], mentions: str,
                                                           genesis_home: Path) -> None:
    proc = run_cli(GENESIS_CONSUME, *argv, env=cli_env(genesis_home, UNREACHABLE), timeout=30)
    assert proc.returncode == 2, proc
    assert mentions in one_line(proc.stderr)


@pytest.mark.db
def test_two_processes_drain_the_queue_answering_each_request_once(env: dict[str, str], db_dsn: str) -> None:
    total = 1500
    bodies = [json.dumps(rule(i)) for i in range(total)] + ['{"type": "genesis_rule_update"}']
    sent = [r["msg_id"] for r in query(db_dsn, "SELECT pgmq.send_batch(%s, %s::jsonb[]) AS msg_id", (RULES, bodies))]

    done = ok(run_cli(GENESIS_CONSUME, "--processes", "2", "--parallel", "3", "--batch-size", "50", "--drain",
                      "--queues", RULES, *FAST, env=env, timeout=180))

    assert "started 2 consumer processes" in done.stderr
    answered = Counter(m["request"]["msg_id"] for m in results(db_dsn, RULES_RESULTS))
    assert sorted(answered) == sent and set(answered.values()) == {1}
    statuses = Counter(m["status"] for m in results(db_dsn, RULES_RESULTS))
    assert statuses == {"completed": total, "failed": 1}
    assert count(db_dsn, f"pgmq.q_{RULES}") == 0 and count(db_dsn, f"pgmq.a_{RULES}") == total + 1
    # two consumers of their own, --parallel 3 shared as 2 + 1, both stopped; the results name only them
    consumers = list(registered(db_dsn).values())
    assert sorted(c["parallel"] for c in consumers) == [1, 2]
    assert all(c["state"] == "stopped" for c in consumers)
    assert {m["consumer"] for m in results(db_dsn, RULES_RESULTS)} <= {c["id"] for c in consumers}


@pytest.mark.db
def test_by_default_a_command_runs_one_process_per_usable_core(env: dict[str, str], db_dsn: str) -> None:
    """No --processes: as many consumers as this machine lets the command use (at most --parallel 4),
    each registered with its share, every request answered once between them."""
    expected = min(usable_cores(), 4)
    bodies = [json.dumps(rule(i)) for i in range(200)]
    query(db_dsn, "SELECT pgmq.send_batch(%s, %s::jsonb[])", (RULES, bodies))

    done = ok(run_cli(GENESIS_CONSUME, "--drain", "--queues", RULES, *FAST, env=env, timeout=180))

    consumers = list(registered(db_dsn).values())
    assert len(consumers) == expected and sum(c["parallel"] for c in consumers) == 4
    assert ("--processes auto" in done.stderr) and (("started" in done.stderr) == (expected > 1))
    answered = Counter(m["request"]["msg_id"] for m in results(db_dsn, RULES_RESULTS))
    assert len(answered) == 200 and set(answered.values()) == {1}


@pytest.mark.db
def test_stopping_one_process_by_its_id_stops_the_command(env: dict[str, str], db_dsn: str,
                                                          background: Callable[..., Background]) -> None:
    """`genesis consumers stop ID` names one process of the command: the command stops as a whole
    (the others told as on SIGTERM) and exits 0, rather than running on with part of --parallel."""
    command, (victim, survivor) = start_group(background, env, db_dsn)
    ok(run_cli(GENESIS, "consumers", "stop", str(registered(db_dsn)[victim.pid]["id"]), env=env))

    assert command.wait(timeout=60) == 0, command.stderr()
    assert f"consumer process {victim.pid} stopped: stopping the others" in command.stderr()
    assert not survivor.alive() and not victim.alive()
    assert {registered(db_dsn)[p.pid]["state"] for p in (victim, survivor)} == {"stopped"}


@pytest.mark.db
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_command_stops_every_process_and_it_exits_0(
        signum: int, env: dict[str, str], db_dsn: str, background: Callable[..., Background]) -> None:
    command, children = start_group(background, env, db_dsn)
    # the DSN reaches them in the environment, never on the process list
    assert all(db_dsn not in p.cmdline for p in children)
    # the second takes only what the first leaves waiting (50 ms), the first everything
    environs = [Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0") for p in children]
    assert sorted(b"GENESIS_TAKE_AFTER_MS=50" in environ for environ in environs) == [False, True]

    command.signal(signum)
    assert command.wait(timeout=60) == 0, command.stderr()
    assert not any(p.alive() for p in children)
    assert {registered(db_dsn)[p.pid]["state"] for p in children} == {"stopped"}
    assert "Traceback" not in command.stderr()


@pytest.mark.db
def test_a_signal_while_the_processes_are_still_starting_exits_0(env: dict[str, str], db_dsn: str,
                                                                 background: Callable[..., Background]) -> None:
    """SIGTERM right after the processes are started, while they import (before their own signal
    handlers): each stops as a consumer does in start-up, and the command exits 0, not 1."""
    command = background(GENESIS_CONSUME, "--processes", "2", "--queues", RULES, *FAST, env=env)
    command.wait_for_line("started 2 consumer processes")
    children = [p for p in descendants(command.pid) if "consume_main" in p.cmdline]
    assert len(children) == 2

    command.signal(signal.SIGTERM)
    assert command.wait(timeout=60) == 0, command.stderr()
    assert not any(p.alive() for p in children)
    assert "Traceback" not in command.stderr()


@pytest.mark.db
def test_kill_9_of_the_command_takes_its_processes_with_it(env: dict[str, str], db_dsn: str,
                                                          background: Callable[..., Background]) -> None:
    command, children = start_group(background, env, db_dsn)
    command.kill()
    wait_until(lambda: not any(p.alive() for p in children), 30, what="the processes dying with the command")


@pytest.mark.db
def test_a_process_that_dies_stops_the_others_and_the_command_exits_1(
        env: dict[str, str], db_dsn: str, background: Callable[..., Background]) -> None:
    command, (victim, survivor) = start_group(background, env, db_dsn)
    subprocess.run(["kill", "-9", str(victim.pid)], check=True)

    assert command.wait(timeout=60) == 1, command.stderr()
    assert f"consumer process {victim.pid} was killed by signal 9: stopping the others" in command.stderr()
    assert not survivor.alive()
    assert registered(db_dsn)[survivor.pid]["state"] == "stopped"    # it stopped as on SIGTERM, not killed
