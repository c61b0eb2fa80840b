"""Steering a fleet of three real `genesis-consume` processes from single `genesis` commands: pause a
queue (nothing sent afterwards is read while paused, checked in SQL), resume it (consumed, no
restart), drain them all (each exits 0, nothing lost), and stop one by its id. Conditions are
waited for with generous deadlines; no speed is asserted."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from genesis_pgflow.testing import wait_until

from .conftest import Background
from .test_cli import FAST, GENESIS, GENESIS_CONSUME, RULES, RULES_RESULTS, cli_env, ok, one_line, query, rule, run_cli

pytestmark = [pytest.mark.db, pytest.mark.slow]


@pytest.fixture
def env(db_dsn: str, genesis_home: Path) -> dict[str, str]:
    # a short heartbeat: the consumers' rows, and the fallback re-read of the control table, come round fast
    return cli_env(genesis_home, db_dsn, GENESIS_HEARTBEAT_INTERVAL_S="1")


def send(dsn: str, n: int, start: int) -> list[int]:
    """n rules as a producer sends them (one statement, not n `genesis send` processes)."""
    return [r["msg_id"] for r in query(dsn, "SELECT pgmq.send(%s, m) AS msg_id FROM unnest(%s::jsonb[]) AS m",
                                       (RULES, [json.dumps(rule(i)) for i in range(start, start + n)]))]


def answered(dsn: str) -> Counter[int]:
    """request msg_id -> how many results it has."""
    return Counter(r["id"] for r in query(dsn, f"""
        SELECT (message -> 'request' ->> 'msg_id')::bigint AS id FROM pgmq.q_{RULES_RESULTS}"""))


def consumers(env: dict[str, str]) -> dict[int, dict[str, Any]]:
    """pid -> row of `genesis consumers --json`."""
    return {c["pid"]: c for c in json.loads(ok(run_cli(GENESIS, "consumers", "--json", env=env)).stdout)}


def start_consumers(background: Callable[..., Background], env: dict[str, str], dsn: str, n: int) -> list[Background]:
    # one consumer process per command (by default a command runs one per core): each is a fleet member
    fleet = [background(GENESIS_CONSUME, "--queues", RULES, "--processes", "1", *FAST, env=env) for _ in range(n)]
    for consumer in fleet:
        consumer.wait_for_line("consuming")
    pids = {c.proc.pid for c in fleet}
    wait_until(lambda: pids <= {pid for pid, c in consumers(env).items() if c["state"] == "running"}, 60,
               what="every consumer registered")
    # each has its control channel open (a pause reaches them by NOTIFY; the SQL refuses reads anyway)
    wait_until(lambda: len(query(dsn, """
        SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %%genesis_control%%'
          AND application_name LIKE '%%:control'""")) >= n, 60, what="every control channel")
    return fleet


def test_an_operator_pauses_resumes_and_drains_three_consumers_from_one_command_each(
        env: dict[str, str], db_dsn: str, background: Callable[..., Background]) -> None:
    fleet = start_consumers(background, env, db_dsn, 3)
    warm = send(db_dsn, 6, 0)
    wait_until(lambda: set(warm) <= set(answered(db_dsn)), 60, what="the first answers")

    # --- pause: one command, every consumer hears it, nothing sent afterwards is read
    paused = ok(run_cli(GENESIS, "queues", "pause", RULES, env=env)).stdout
    assert paused.startswith(f"paused {RULES}")
    for consumer in fleet:
        consumer.wait_for_line(f"paused: {RULES}", 60)
    held_back = send(db_dsn, 10, 100)
    # every consumer has kept running (two heartbeats after the sends) with the messages there to read
    [sent_at] = query(db_dsn, "SELECT now() + interval '1 second' AS t")
    pids = [c.proc.pid for c in fleet]
    wait_until(lambda: query(db_dsn, "SELECT count(*) AS n FROM genesis.consumers WHERE pid = ANY(%s) "
                                     "AND last_heartbeat > %s", (pids, sent_at["t"]))[0]["n"] == 3, 60,
               what="heartbeats of each after the sends")
    unread = query(db_dsn, f"SELECT msg_id, read_ct, vt <= clock_timestamp() AS visible FROM pgmq.q_{RULES} "
                           "ORDER BY msg_id")
    assert [r["msg_id"] for r in unread] == sorted(held_back)
    assert all(r["read_ct"] == 0 and r["visible"] for r in unread)
    assert query(db_dsn, "SELECT msg_id FROM genesis.workflow_runs WHERE msg_id = ANY(%s)", (held_back,)) == []

    status = json.loads(ok(run_cli(GENESIS, "status", "--json", env=env)).stdout)
    assert [p["queue"] for p in status["paused_queues"]] == [RULES] and status["queues"][RULES]["paused"] is True
    assert f"paused queues: {RULES} (since" in ok(run_cli(GENESIS, "status", env=env)).stdout
    listed = {r["queue"]: r for r in json.loads(ok(run_cli(GENESIS, "queues", "list", "--json", env=env)).stdout)}
    assert listed[RULES]["paused"] is True and listed[RULES]["depth"] == 10
    assert not any(row["paused"] for name, row in listed.items() if name != RULES)

    # --- resume: consumed by the same processes, no restart
    assert ok(run_cli(GENESIS, "queues", "resume", RULES, env=env)).stdout.startswith(f"resumed {RULES}")
    wait_until(lambda: set(held_back) <= set(answered(db_dsn)), 60, what="the held-back messages answered")
    assert all(c.proc.poll() is None for c in fleet)
    assert json.loads(ok(run_cli(GENESIS, "status", "--json", env=env)).stdout)["paused_queues"] == []

    # --- drain --all while work is queued: each finishes what it holds and exits 0
    rest = send(db_dsn, 40, 200)
    drained = ok(run_cli(GENESIS, "consumers", "drain", "--all", env=env)).stdout
    assert "told 3 consumer(s) to drain" in drained
    for consumer in fleet:
        assert consumer.wait(timeout=120) == 0, consumer.stderr()
        assert "drain requested" in consumer.stderr()
    assert all(c["state"] == "stopped" and c["command"] is None for c in consumers(env).values())
    # what they did not take is still there, unleased; a later consumer answers it
    ok(run_cli(GENESIS_CONSUME, "--drain", "--queues", RULES, *FAST, env=env))
    counts = answered(db_dsn)
    assert {msg_id: counts[msg_id] for msg_id in warm + held_back + rest} == dict.fromkeys(warm + held_back + rest, 1)
    assert query(db_dsn, f"SELECT count(*) AS n FROM pgmq.q_{RULES}")[0]["n"] == 0


def test_one_consumer_is_stopped_by_its_id_and_unknown_targets_are_refused(
        env: dict[str, str], db_dsn: str, background: Callable[..., Background]) -> None:
    keep, victim = start_consumers(background, env, db_dsn, 2)
    victim_id = consumers(env)[victim.proc.pid]["id"]

    stopped = ok(run_cli(GENESIS, "consumers", "stop", victim_id, env=env)).stdout
    assert f"{victim_id}: stop" in stopped
    assert victim.wait(timeout=120) == 0, victim.stderr()
    assert "stop requested" in victim.stderr()
    rows = consumers(env)
    assert rows[victim.proc.pid]["state"] == "stopped" and rows[keep.proc.pid]["state"] == "running"
    assert keep.proc.poll() is None

    # the one left still consumes
    [msg_id] = send(db_dsn, 1, 0)
    wait_until(lambda: answered(db_dsn)[msg_id] == 1, 60, what="the answer of the consumer left")

    for argv, reason in ((("consumers", "stop", victim_id), "no running consumer"),
                         (("consumers", "drain", "nosuch:1"), "no running consumer nosuch:1"),
                         (("consumers", "drain"), "ids or --all"),
                         (("queues", "pause", "nosuch"), "invalid choice")):
        refused = run_cli(GENESIS, *argv, env=env)
        assert refused.returncode == 2 and reason in one_line(refused.stderr), refused.stderr
    assert keep.proc.poll() is None and consumers(env)[keep.proc.pid]["command"] is None
