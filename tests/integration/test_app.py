"""The composition root end to end: every workflow sent with plain SQL, consumed by App's consumer
with the real handlers, answered in the paired result queues."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import psycopg
import pytest

from genesis_pgflow.app import App
from genesis_pgflow.settings import Settings

pytestmark = [pytest.mark.db, pytest.mark.sandbox]


def send(dsn: str, queue: str, body: dict) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT pgmq.send(%s, %s::jsonb)", (queue, json.dumps(body))).fetchone()[0]


def results(dsn: str, queue: str) -> dict[str, dict]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(f"SELECT message FROM pgmq.q_{queue}").fetchall()
    return {json.dumps(r[0]["request"]["msg_id"]): r[0] for r in rows}


def code(dsn: str, id_: str, language: str, analysis: str, source: str) -> tuple[str, int]:
    return id_, send(dsn, "code_execution_requests", {"type": "code_execution_request", "id": id_, "code": source,
                                                       "language": language, "analysis_type": analysis})


def test_every_workflow_through_the_app(db_dsn: str, genesis_home: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    (repo / "tests" / "test_calc.py").write_text("from calc import add\n\n\ndef test_add():\n    assert add(1, 2) == 3\n")
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "b"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)

    send(db_dsn, "genesis_rule_updates", {"type": "genesis_rule_update", "namespace": "lint", "rule_id": "no-eval",
                                          "confidence": 0.95, "rule": {"deny": "eval"}})
    send(db_dsn, "genesis_llm_config_updates", {"type": "genesis_llm_config_update", "provider": "claude",
                                                "complexity": "complex", "models": ["opus"],
                                                "settings": {"api_key": "sk-never-shown"}})
    jobs = dict([
        code(db_dsn, "py-sec", "python", "security", "import pickle\n\ndef load(b):\n    return pickle.loads(b)\n"),
        code(db_dsn, "ex-q", "elixir", "quality", "def foo, do: 42"),
        code(db_dsn, "js-lint", "javascript", "linting", "var unused = 1;\nif (x == null) { debugger; }\n"),
        code(db_dsn, "py-test", "python", "testing", "def test_ok():\n    assert True\n"),
    ])
    send(db_dsn, "genesis_experiment_requests", {
        "type": "genesis_experiment_request", "experiment_id": "app-1", "instance_id": "s1",
        "experiment_type": "refactor", "description": "docstring", "risk_level": "low", "repo": str(repo),
        "changes": {"files": [{"path": "calc.py", "content": '"""c"""\ndef add(a, b):\n    return a + b\n'}]}})

    app = App.open(Settings(dsn=db_dsn, home=genesis_home, drain=True, poll_interval_ms=50, repo_allow=str(tmp_path)))
    try:
        app.consumer().run()
    finally:
        app.close()

    [rule] = results(db_dsn, "genesis_rule_updates_results").values()
    assert rule["result"]["status"] == "applied"
    [llm] = results(db_dsn, "genesis_llm_config_updates_results").values()
    assert llm["result"]["status"] == "applied" and "sk-never-shown" not in json.dumps(llm)
    by_id = {m["result"]["id"]: m["result"] for m in results(db_dsn, "code_execution_results").values()}
    assert set(by_id) == set(jobs)
    assert "B301" in {i["rule"] for i in by_id["py-sec"]["issues"]}          # bandit: pickle.loads
    assert by_id["ex-q"]["metrics"]["quality_score"] == 100.0
    assert "suspicious/noDebugger" in {i["rule"] for i in by_id["js-lint"]["issues"]}   # Biome
    assert by_id["py-test"]["tests"] == {"passed": 1, "failed": 0, "errors": 0, "total": 1}
    [experiment] = results(db_dsn, "genesis_experiment_results").values()
    assert (experiment["result"]["status"], experiment["result"]["recommendation"]) == ("success", "merge")
    assert experiment["result"]["metrics"]["test_count"] == 1
