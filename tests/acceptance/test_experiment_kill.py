"""A consumer killed with -9 in the middle of an experiment: the original repository is untouched,
nothing of the sandbox keeps running, and a restarted consumer reaps the abandoned copy and runs the
experiment again to exactly one result, with both attempts on record."""

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
    # the killed run's scratch (a tmpfs over the copy) was unmounted by the attempt that replaced it
    assert not [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(genesis_home) in line]
    events = [r["event"] for r in sql(db_dsn, "SELECT event FROM genesis.sandbox_events "
                                              "WHERE experiment_id = 'exp-kill' ORDER BY id")]
    assert events == ["created", "cleaned_up", "created"]   # the killed attempt's copy, reaped on record
