"""Hostile experiment requests sent with plain SQL to a real consumer (`genesis-consume --drain`):
repositories that are not the producer's, another producer's experiment_id, and run output that
`genesis experiments show` prints only when asked. Checked in the results and on the host."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

pytestmark = [pytest.mark.db, pytest.mark.sandbox, pytest.mark.slow]
BIN = Path(sys.executable).parent
QUEUE, RESULTS = "genesis_experiment_requests", "genesis_experiment_results"


def sql(dsn: str, statement: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def make_repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content)
    env = {"PATH": "/usr/bin:/bin", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "b"]):
        subprocess.run(["git", *args], cwd=path, env=env, check=True, capture_output=True)
    return path


def experiment(experiment_id: str, repo: Path | str, instance_id: str = "s1", **fields: Any) -> dict[str, Any]:
    return {"type": "genesis_experiment_request", "experiment_id": experiment_id, "instance_id": instance_id,
            "experiment_type": "probe", "description": "", "risk_level": "low", "repo": str(repo),
            "test_command": ["python", "-c", "print(open('key.txt').read())"],
            "changes": {"files": [{"path": "note.txt", "content": "x\n"}]}, **fields}


@pytest.mark.skipif(os.geteuid() != 0, reason="the attack needs a repository only root can read")
def test_hostile_experiment_requests_through_sql(db_dsn: str, genesis_home: Path, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    mine = make_repo(allowed / "mine", {"key.txt": "PRINTED-BY-THE-TESTS\n"})
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o700)
    secret = make_repo(vault / "secret", {"key.txt": "ROOT-ONLY-SECRET\n"})
    secret.chmod(0o700)
    copy = genesis_home / "sandboxes" / "good"
    requests = [
        experiment("good", mine),
        experiment("steal-root-only", secret),
        experiment("probe-missing", tmp_path / "nothing-here"),
        experiment("probe-missing-inside", allowed / "nothing-here"),
        experiment("good", make_repo(allowed / "other", {"key.txt": "INTRUDER\n"}), instance_id="intruder"),
        experiment("steal-copy", copy),
        experiment("steal-git-dir", genesis_home / "sandboxes" / ".gitdirs" / "good.git"),
    ]
    for body in requests:
        sql(db_dsn, "SELECT pgmq.send(%s, %s::jsonb)", (QUEUE, json.dumps(body)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENESIS_", "DATABASE_URL"))}
    env.update(GENESIS_HOME=str(genesis_home), GENESIS_DATABASE_URL=db_dsn, GENESIS_REPO_ALLOW=str(allowed))

    done = subprocess.run([str(BIN / "genesis-consume"), "--drain", "--parallel", "1", "--queues", QUEUE,
                           "--poll-interval-ms", "100"], env=env, capture_output=True, text=True, timeout=240)

    assert done.returncode == 0, done.stderr
    results = [r["message"] for r in sql(db_dsn, f"SELECT message FROM pgmq.q_{RESULTS} ORDER BY msg_id")]
    assert [r["status"] for r in results] == ["completed"] + ["failed"] * 6
    refused = [r["error"] for r in results[1:4] + results[5:]]
    assert {e["code"] for e in refused} == {"repository_unavailable"}
    assert len({e["message"] for e in refused}) == 1       # one text, whatever exists on the host
    assert results[4]["error"]["code"] == "experiment_id_taken"
    assert "ROOT-ONLY-SECRET" not in json.dumps(results) + done.stderr + done.stdout

    # on the host: nothing of the refused repositories was copied; the copy is private and unchanged
    leaked = [p for p in genesis_home.rglob("*") if p.is_file() and b"ROOT-ONLY-SECRET" in p.read_bytes()]
    assert leaked == []
    assert sorted(p.name for p in (genesis_home / "sandboxes").iterdir() if not p.name.startswith(".")) == ["good"]
    assert (copy / "key.txt").read_text() == "PRINTED-BY-THE-TESTS\n"
    assert stat.S_IMODE((genesis_home / "sandboxes").stat().st_mode) == 0o700
    [owner] = sql(db_dsn, "SELECT instance_id, attempts FROM genesis.experiments WHERE experiment_id = 'good'")
    assert owner == {"instance_id": "s1", "attempts": 1}

    # run output is shown only when asked
    show = [str(BIN / "genesis"), "experiments", "show", "good"]
    plain = subprocess.run(show, env=env, capture_output=True, text=True, timeout=60)
    asked = subprocess.run([*show, "--output"], env=env, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and asked.returncode == 0, plain.stderr + asked.stderr
    assert "PRINTED-BY-THE-TESTS" not in plain.stdout and "output_tail" not in plain.stdout
    assert "PRINTED-BY-THE-TESTS" in asked.stdout
