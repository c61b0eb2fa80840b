"""The package as a user gets it: a wheel built from the checkout, installed into a fresh virtualenv
outside the checkout, running the whole lifecycle (upgrade, send, drain) against a real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.db, pytest.mark.slow]


def _run(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bin directory of a fresh virtualenv holding only the wheel and its dependencies."""
    work = tmp_path_factory.mktemp("wheel")
    dist = work / "dist"
    # the build runs from a copy of the tracked files, so nothing in the checkout is written
    source = work / "source"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        relative = name.decode()
        if not (ROOT / relative).is_file():
            continue        # deleted in the working tree, not yet committed
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes((ROOT / relative).read_bytes())
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, source, cwd=work)
    wheels = list(dist.glob("genesis_pgflow-*.whl"))
    assert len(wheels) == 1, wheels
    venv = work / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=work)
    _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheels[0], cwd=work)
    yield venv / "bin"


def test_the_wheel_runs_the_whole_lifecycle_outside_the_checkout(installed: Path, empty_db_dsn: str,
                                                                tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENESIS_", "DATABASE_URL", "PYTHON"))}
    env.update(GENESIS_DATABASE_URL=empty_db_dsn, GENESIS_HOME=str(tmp_path / "home"))
    where = _run(installed / "python", "-c", "import genesis_pgflow; print(genesis_pgflow.__file__)",
                 cwd=tmp_path, env=env)
    assert str(ROOT) not in where and str(installed.parent) in where

    _run(installed / "genesis", "db", "upgrade", cwd=tmp_path, env=env)
    rule = {"type": "genesis_rule_update", "namespace": "wheel", "rule_id": "r1", "version": 1,
            "confidence": 0.9, "rule": {"when": "x", "then": "y"}}
    _run(installed / "genesis", "send", "genesis_rule_updates", json.dumps(rule), cwd=tmp_path, env=env)
    _run(installed / "genesis-consume", "--drain", "--queues", "genesis_rule_updates", "--poll-interval-ms", "100",
         cwd=tmp_path, env=env, timeout=120)

    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT message FROM pgmq.q_genesis_rule_updates_results").fetchall()
        archived = conn.execute("SELECT count(*) FROM pgmq.a_genesis_rule_updates").fetchone()
    assert [r[0]["status"] for r in rows] == ["completed"]
    assert rows[0][0]["result"]["status"] == "applied"
    assert archived is not None and archived[0] == 1
