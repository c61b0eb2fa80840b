"""A consumer killed with -9 in the middle of an experiment: the original repository is untouched,
nothing of the sandbox keeps running, and the next delivery of the request resumes at the first
unfinished phase, in the copy the killed attempt left, to exactly one result.

The kill lands at each phase boundary deterministically, without a sleep: the test holds, in an
open transaction, what the consumer must write next (the next phase's row of
genesis.experiment_phases, or, after the decide phase, the result queue), waits until the
consumer's write is blocked on it (pg_blocking_pids), kills the consumer, then rolls back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from genesis_pgflow.testing import wait_until

pytestmark = [pytest.mark.db, pytest.mark.sandbox, pytest.mark.slow]
BIN = Path(sys.executable).parent
QUEUE, RESULTS = "genesis_experiment_requests", "genesis_experiment_results"
SANDBOX_UIDS = range(1_900_000_000, 1_900_000_256)     # the sandbox's uid pool (sandbox.Sandbox)


def sql(dsn: str, statement: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def sandbox_processes(home: Path) -> list[str]:
    """The sandboxed processes of this test's own experiments: in the uid pool, with the copy (or
    its scratch) under `home` mounted as their /sandbox. Other runs on the machine share the pool."""
    ps = subprocess.run(["ps", "-eo", "uid=,pid=,args="], capture_output=True, text=True, check=True).stdout
    found = []
    for line in ps.splitlines():
        if line.split() and int(line.split()[0]) in SANDBOX_UIDS:
            try:
                mounts = Path(f"/proc/{line.split()[1]}/mountinfo").read_text()
            except OSError:
                continue
            if str(home) in mounts:
                found.append(line)
    return found


@pytest.fixture
def slow_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "slow"
    (repo / "tests").mkdir(parents=True)
    (repo / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    (repo / "tests" / "test_calc.py").write_text(
        "import time\nfrom calc import add\n\n\ndef test_add():\n    time.sleep(4)\n    assert add(2, 3) == 5\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    return repo


def test_a_consumer_killed_mid_experiment(db_dsn: str, genesis_home: Path, slow_repo: Path,
                                          background: Callable[..., Any]) -> None:
    head, status = git(slow_repo, "rev-parse", "HEAD"), git(slow_repo, "status", "--porcelain")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENESIS_", "DATABASE_URL"))}
    env.update(GENESIS_HOME=str(genesis_home), GENESIS_DATABASE_URL=db_dsn, GENESIS_LEASE_S="2",
               GENESIS_REPO_ALLOW=str(slow_repo.parent))
    request = {"type": "genesis_experiment_request", "experiment_id": "exp-kill", "instance_id": "s1",
               "experiment_type": "refactor", "description": "docstring", "risk_level": "high",
               "repo": str(slow_repo), "timeout_ms": 120000,
               "changes": {"files": [{"path": "calc.py", "content": '"""calc"""\ndef add(a, b):\n    return a + b\n'}]}}
    sql(db_dsn, "SELECT pgmq.send(%s, %s::jsonb)", (QUEUE, json.dumps(request)))

    victim = background(BIN / "genesis-consume", "--queues", QUEUE, "--poll-interval-ms", "100", env=env)
    wait_until(lambda: sandbox_processes(genesis_home), timeout=60, interval=0.1, what="the baseline test run to start")
    assert sql(db_dsn, "SELECT status FROM genesis.experiments")[0]["status"] == "running"
    victim.kill()

    wait_until(lambda: not sandbox_processes(genesis_home), timeout=10, what="the sandbox to die with its consumer")
    assert git(slow_repo, "rev-parse", "HEAD") == head and git(slow_repo, "status", "--porcelain") == status
    assert sql(db_dsn, f"SELECT count(*) AS n FROM pgmq.q_{RESULTS}")[0]["n"] == 0

    started = time.monotonic()
    finished = subprocess.run([str(BIN / "genesis-consume"), "--drain", "--queues", QUEUE, "--poll-interval-ms", "100"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert time.monotonic() - started < 110

    [result] = [r["message"] for r in sql(db_dsn, f"SELECT message FROM pgmq.q_{RESULTS}")]
    assert result["request"]["attempt"] == 2 and result["status"] == "completed"
    assert (result["result"]["status"], result["result"]["recommendation"]) == ("success", "merge_with_review")
    [experiment] = sql(db_dsn, "SELECT status, attempts FROM genesis.experiments WHERE experiment_id = 'exp-kill'")
    assert experiment == {"status": "success", "attempts": 2}
    assert git(slow_repo, "rev-parse", "HEAD") == head and git(slow_repo, "status", "--porcelain") == status
    assert not sandbox_processes(genesis_home)
    # the killed run's scratch (a tmpfs over the copy) was unmounted by the attempt that resumed
    assert not [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(genesis_home) in line]
    events = [r["event"] for r in sql(db_dsn, "SELECT event FROM genesis.sandbox_events "
                                              "WHERE experiment_id = 'exp-kill' ORDER BY id")]
    assert events == ["created"]   # the copy the killed attempt made, kept: the baseline ran again in it
    phases = sql(db_dsn, "SELECT phase, attempt FROM genesis.experiment_phases WHERE experiment_id = 'exp-kill'")
    assert {r["phase"]: r["attempt"] for r in phases} == {
        "copy": 1, "baseline": 2, "change": 2, "measure": 2, "decide": 2}
    runs = sql(db_dsn, "SELECT step, attempt FROM genesis.experiment_runs WHERE experiment_id = 'exp-kill' ORDER BY id")
    assert [(r["step"], r["attempt"]) for r in runs] == [("baseline", 2), ("change", 2)]


# --- a kill at each phase boundary --------------------------------------------------------------

CALC = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
TESTS = ("from calc import add, mul\n\n\ndef test_add():\n    assert add(2, 3) == 5\n\n\n"
         "def test_mul():\n    assert mul(2, 3) == 6\n")
NEXT = {"copy": "baseline", "baseline": "change", "change": "measure", "measure": "decide"}
# suite runs by the step that ran them: one rerun of the failing test at the change and one at the baseline
RUNS_PER_STEP = {"baseline": 1, "change": 1, "measure": 2}
# each phase's count of suite runs so far (each run's GENESIS_RUN_SEED is its number)
SEEDS = {"copy": 0, "baseline": 1, "change": 2, "measure": 4}


@pytest.fixture
def calc_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repos" / "calc"
    (repo / "tests").mkdir(parents=True)
    (repo / "calc.py").write_text(CALC)
    (repo / "tests" / "test_calc.py").write_text(TESTS)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    return repo


def hold_next_write(dsn: str, boundary: str) -> psycopg.Connection[Any]:
    """An open transaction holding what the consumer writes right after `boundary`: the next
    phase's row (the consumer's insert of the same key waits for it), or the result queue."""
    conn = psycopg.connect(dsn)
    if boundary == "decide":
        conn.execute(f"LOCK TABLE pgmq.q_{RESULTS} IN SHARE MODE")
    else:   # the phases' foreign key is checked at commit, so the row may precede its experiment
        conn.execute("INSERT INTO genesis.experiment_phases (experiment_id, phase, attempt) VALUES ('exp-b', %s, 0)",
                     (NEXT[boundary],))
    return conn


def blocked(dsn: str, blocker: int, boundary: str) -> bool:
    """A backend waits for the holding transaction (and, at the last boundary, the decide phase is
    recorded: only the result's send can wait then)."""
    waiting = sql(dsn, "SELECT count(*) AS n FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                  (blocker,))[0]["n"]
    return waiting > 0 and (boundary != "decide" or bool(sql(
        dsn, "SELECT 1 FROM genesis.experiment_phases WHERE experiment_id = 'exp-b' AND phase = 'decide'")))


@pytest.mark.parametrize("boundary", ["copy", "baseline", "change", "measure", "decide"])
def test_a_consumer_killed_at_a_phase_boundary_resumes_there(db_dsn: str, genesis_home: Path, calc_repo: Path,
                                                             background: Callable[..., Any], boundary: str) -> None:
    head, status = git(calc_repo, "rev-parse", "HEAD"), git(calc_repo, "status", "--porcelain")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENESIS_", "DATABASE_URL"))}
    env.update(GENESIS_HOME=str(genesis_home), GENESIS_DATABASE_URL=db_dsn, GENESIS_LEASE_S="2",
               GENESIS_REPO_ALLOW=str(calc_repo.parent), GENESIS_EXPERIMENT_RERUNS="1")
    broken = CALC.replace("a * b", "a + b")    # test_mul fails after the change: a real regression
    request = {"type": "genesis_experiment_request", "experiment_id": "exp-b", "instance_id": "s1",
               "experiment_type": "refactor", "description": "breaks mul", "risk_level": "high",
               "repo": str(calc_repo), "timeout_ms": 120000,
               "changes": {"files": [{"path": "calc.py", "content": broken}]}}
    holder = hold_next_write(db_dsn, boundary)
    try:
        blocker = holder.info.backend_pid
        sql(db_dsn, "SELECT pgmq.send(%s, %s::jsonb)", (QUEUE, json.dumps(request)))
        victim = background(BIN / "genesis-consume", "--queues", QUEUE, "--poll-interval-ms", "100", env=env)
        wait_until(lambda: blocked(db_dsn, blocker, boundary), timeout=120, interval=0.1,
                   what=f"the consumer's write after the {boundary} phase to wait")
        victim.kill()
    finally:
        holder.rollback()
        holder.close()
    done = [r["phase"] for r in sql(db_dsn, "SELECT phase FROM genesis.experiment_phases WHERE experiment_id = 'exp-b'")]
    expected = ["copy", "baseline", "change", "measure", "decide"]
    assert sorted(done) == sorted(expected[:expected.index(boundary) + 1])
    wait_until(lambda: not sandbox_processes(genesis_home), timeout=10, what="the sandbox to die with its consumer")
    assert git(calc_repo, "rev-parse", "HEAD") == head and git(calc_repo, "status", "--porcelain") == status
    assert sql(db_dsn, f"SELECT count(*) AS n FROM pgmq.q_{RESULTS}")[0]["n"] == 0

    finished = subprocess.run([str(BIN / "genesis-consume"), "--drain", "--queues", QUEUE, "--poll-interval-ms", "100"],
                              env=env, capture_output=True, text=True, timeout=180)
    assert finished.returncode == 0, finished.stderr
    assert f"resumes after the {boundary} phase" in finished.stderr or boundary == "decide"

    [result] = [r["message"] for r in sql(db_dsn, f"SELECT message FROM pgmq.q_{RESULTS}")]
    assert result["request"]["attempt"] == 2 and result["status"] == "completed"
    outcome = result["result"]
    assert (outcome["status"], outcome["recommendation"], outcome["rolled_back"]) == ("regressed", "reject", True)
    assert outcome["classes"] == {"pass->pass": 1, "pass->fail": 1, "fail->pass": 0, "fail->fail": 0}
    assert outcome["regressions"] == ["tests/test_calc.py::test_mul"] and outcome["flaky"] == []
    assert outcome["reruns"] == 1

    # no phase ran twice: each recorded once, by the attempt that reached it
    phases = {r["phase"]: r for r in sql(db_dsn, "SELECT phase, attempt, state FROM genesis.experiment_phases "
                                                 "WHERE experiment_id = 'exp-b'")}
    assert {p: r["attempt"] for p, r in phases.items()} == {
        p: 1 if expected.index(p) <= expected.index(boundary) else 2 for p in expected}
    assert {p: phases[p]["state"]["runs"] for p in SEEDS} == SEEDS
    steps = sql(db_dsn, "SELECT step, count(*) AS n FROM genesis.experiment_runs WHERE experiment_id = 'exp-b' "
                        "GROUP BY step")
    assert {r["step"]: r["n"] for r in steps} == RUNS_PER_STEP
    [record] = sql(db_dsn, "SELECT status, attempts, result FROM genesis.experiments WHERE experiment_id = 'exp-b'")
    assert (record["status"], record["attempts"]) == ("regressed", 2) and record["result"] == outcome
    events = [r["event"] for r in sql(db_dsn, "SELECT event FROM genesis.sandbox_events "
                                              "WHERE experiment_id = 'exp-b' ORDER BY id")]
    assert events == ["created", "rolled_back", "preserved"]
    # the original untouched, the copy rolled back to its baseline, nothing left running or mounted
    assert git(calc_repo, "rev-parse", "HEAD") == head and git(calc_repo, "status", "--porcelain") == status
    copy = genesis_home / "sandboxes" / "exp-b"
    assert (copy / "calc.py").read_text() == CALC and git(copy, "rev-parse", "HEAD").strip() == head.strip()
    assert not sandbox_processes(genesis_home)
    assert not [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(genesis_home) in line]
