"""The operator's view from the terminal: the real `genesis` CLI in subprocesses after a real burst
processed by a real `genesis-consume`: failures, one run's history, dead letters, status, live
consumers, --dsn anywhere, --version, and a closed pipe."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from genesis_pgflow.processes import usable_cores
from genesis_pgflow.store import schema
from genesis_pgflow.store.admin import package_version
from genesis_pgflow.testing import wait_until

from .test_cli import (
    FAST,
    GENESIS,
    GENESIS_CONSUME,
    LLM,
    RULES,
    cli_env,
    ok,
    one_line,
    query,
    rule,
    run_cli,
)

LLM_DLQ = f"{LLM}_dlq"


@pytest.fixture
def env(db_dsn: str, genesis_home: Path) -> dict[str, str]:
    return cli_env(genesis_home, db_dsn)


def send(env: dict[str, str], queue: str, body: dict[str, Any], *flags: str) -> int:
    return int(ok(run_cli(GENESIS, "send", queue, json.dumps(body), *flags, env=env)).stdout)


def as_json(*argv: str, env: dict[str, str]) -> Any:
    return json.loads(ok(run_cli(GENESIS, *argv, "--json", env=env)).stdout)


@pytest.fixture
def burst(env: dict[str, str], db_dsn: str) -> dict[str, int]:
    """Two good rules, one below the minimum confidence, one invalid, and an LLM configuration
    that three consumers took and died on (dead-lettered), all drained by a real consumer."""
    sent = {"good": send(env, RULES, rule(1)), "good2": send(env, RULES, rule(2)),
            "low": send(env, RULES, rule(3, confidence=0.2)),
            "invalid": send(env, RULES, {"type": "genesis_rule_update", "namespace": "cli"}, "--raw"),
            "poison": send(env, LLM, {"type": "genesis_llm_config_update", "provider": "openai",
                                      "complexity": "simple", "models": ["o-1"],
                                      "settings": {"api_key": "sk-very-secret"}})}
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        for _ in range(3):
            conn.execute("SELECT pgmq.read(%s, 0, 1)", (LLM,))
    ok(run_cli(GENESIS_CONSUME, "--drain", "--max-attempts", "3", *FAST, env=env))
    return sent


@pytest.mark.db
@pytest.mark.slow
def test_failures_show_each_failed_request_with_its_code_and_message(env: dict[str, str],
                                                                     burst: dict[str, int]) -> None:
    text = ok(run_cli(GENESIS, "failures", env=env)).stdout
    lines = text.splitlines()
    assert lines[0].split() == ["finished", "queue", "msg_id", "type", "attempts", "code", "message"]
    assert len(lines) == 4
    low = next(line for line in lines if " low_confidence " in line)
    assert RULES in low and "below the minimum" in low

    listed = as_json("failures", env=env)
    by_id = {(f["queue"], f["msg_id"]): f for f in listed}
    assert by_id[(RULES, burst["low"])]["code"] == "low_confidence"
    assert by_id[(RULES, burst["invalid"])]["code"] == "invalid_payload"
    assert "rule_id" in by_id[(RULES, burst["invalid"])]["message"]
    assert by_id[(LLM, burst["poison"])]["code"] == "max_attempts_exceeded"
    assert by_id[(LLM, burst["poison"])]["attempts"] == 4
    assert "sk-very-secret" not in text + json.dumps(listed)

    assert [f["msg_id"] for f in as_json("failures", "--queue", LLM, env=env)] == [burst["poison"]]
    assert {f["code"] for f in as_json("failures", "--type", "genesis_rule_update", env=env)} == {
        "low_confidence", "invalid_payload"}
    assert len(as_json("failures", "--limit", "1", env=env)) == 1
    bad = run_cli(GENESIS, "failures", "--since", "yesterday", env=env)
    assert bad.returncode == 2 and "yesterday" in one_line(bad.stderr)


@pytest.mark.db
@pytest.mark.slow
def test_runs_show_tells_one_requests_whole_story(env: dict[str, str], burst: dict[str, int]) -> None:
    story = as_json("runs", "show", RULES, str(burst["low"]), env=env)
    assert story["run"]["status"] == "failed" and story["run"]["attempts"] == 1
    assert story["run"]["error"]["code"] == "low_confidence"
    assert [e["error"]["code"] for e in story["errors"]] == ["low_confidence"]
    assert story["archived"]["msg_id"] == burst["low"] and story["in_queue"] is None
    [result] = story["results_waiting"]
    assert result["message"]["request"]["msg_id"] == burst["low"] and result["message"]["status"] == "failed"

    text = ok(run_cli(GENESIS, "runs", "show", LLM, str(burst["poison"]), env=env)).stdout
    assert "status: failed" in text and "attempts: 4" in text and "max_attempts_exceeded" in text
    assert f"dead letter: {LLM_DLQ}" in text and "archived at" in text
    assert "sk-very-secret" not in text

    missing = run_cli(GENESIS, "runs", "show", RULES, "999999", env=env)
    assert missing.returncode == 2 and "999999" in one_line(missing.stderr)


@pytest.mark.db
@pytest.mark.slow
def test_dlq_list_names_the_original_its_attempts_and_last_error(env: dict[str, str], db_dsn: str,
                                                                 burst: dict[str, int]) -> None:
    [letter] = as_json("dlq", "list", LLM, env=env)
    assert (letter["original_queue"], letter["original_msg_id"]) == (LLM, burst["poison"])
    assert letter["attempts"] == 4 and letter["error"]["code"] == "max_attempts_exceeded"
    assert letter["message"]["settings"]["api_key"] != "sk-very-secret"

    text = ok(run_cli(GENESIS, "dlq", "list", LLM, env=env)).stdout
    header, row = text.splitlines()
    assert header.split() == ["msg_id", "dead_since", "original", "attempts", "code", "last_error"]
    assert f"{LLM} {burst['poison']}" in row and " 4 " in row and "max_attempts_exceeded" in row
    assert "read 4 times" in row and "sk-very-secret" not in text

    missing = run_cli(GENESIS, "dlq", "requeue", LLM, str(letter["msg_id"]), "987654", env=env)
    assert missing.returncode == 2
    assert "987654" in one_line(missing.stderr) and missing.stdout == ""
    assert query(db_dsn, f"SELECT msg_id FROM pgmq.q_{LLM_DLQ}") == [{"msg_id": letter["msg_id"]}]  # nothing moved
    moved = ok(run_cli(GENESIS, "dlq", "requeue", LLM, str(letter["msg_id"]), env=env)).stdout
    assert "requeued 1 message(s)" in moved


@pytest.mark.db
@pytest.mark.slow
def test_status_starts_with_the_database_and_adds_throughput_and_failures(env: dict[str, str], db_dsn: str,
                                                                          burst: dict[str, int]) -> None:
    dbname = conninfo_to_dict(db_dsn)["dbname"]
    with_password = {**env, "GENESIS_DATABASE_URL": make_conninfo(db_dsn, password="hunter2-not-needed")}
    text = ok(run_cli(GENESIS, "status", env=with_password)).stdout
    first = text.splitlines()[0]
    assert first.startswith("database: ") and f"dbname={dbname}" in first
    assert "hunter2" not in text
    assert "throughput: last minute" in text and "last hour 2 completed, 3 failed" in text
    assert "failures by code, last hour:" in text and "low_confidence 1" in text
    # the burst's one command: a consumer per process, one per usable core (at most --parallel 4)
    assert f"consumers: 0 running, 0 gone, {min(usable_cores(), 4)} stopped" in text

    status = as_json("status", env=with_password)
    assert {"queues", "types", "database", "throughput", "failures_by_code_last_hour", "consumers"} <= set(status)
    assert status["database"]["embedded"] is False and "hunter2" not in json.dumps(status)
    assert status["queues"][RULES]["completed"] == 2 and status["queues"][LLM]["dead_lettered"] == 1
    assert status["throughput"]["last_hour"] == {
        "completed": 2, "failed": 3, "queues": {
            LLM: {"completed": 0, "failed": 1, "avg_ms": status["throughput"]["last_hour"]["queues"][LLM]["avg_ms"]},
            RULES: {"completed": 2, "failed": 2,
                    "avg_ms": status["throughput"]["last_hour"]["queues"][RULES]["avg_ms"]}}}
    assert status["failures_by_code_last_hour"] == {"invalid_payload": 1, "low_confidence": 1,
                                                    "max_attempts_exceeded": 1}
    assert len(status["consumers"]) == min(usable_cores(), 4)
    assert all(c["state"] == "stopped" and c["in_flight"] == 0 for c in status["consumers"])


# --- the CLI itself -------------------------------------------------------------------------


@pytest.mark.db
def test_dsn_works_after_the_subcommand(empty_db_dsn: str, genesis_home: Path) -> None:
    env = cli_env(genesis_home)   # no database in the environment
    ok(run_cli(GENESIS, "db", "upgrade", "--dsn", empty_db_dsn, env=env))
    assert schema.problems(empty_db_dsn) == []
    status = json.loads(ok(run_cli(GENESIS, "status", "--json", "--dsn", empty_db_dsn, env=env)).stdout)
    assert status["database"]["dsn"] == make_conninfo(empty_db_dsn)
    # after the subcommand wins over before it, as the later flag does
    ok(run_cli(GENESIS, "--dsn", "postgresql://nobody@127.0.0.1:1/x", "failures", "--dsn", empty_db_dsn, env=env))


def test_db_url_hides_the_password_unless_asked(genesis_home: Path) -> None:
    url = "postgresql://ops:hunter2@db.example:6543/genesis"
    env = cli_env(genesis_home, url)
    shown = ok(run_cli(GENESIS, "db", "url", env=env)).stdout.strip()
    assert "hunter2" not in shown
    assert conninfo_to_dict(shown) == {"user": "ops", "host": "db.example", "port": "6543", "dbname": "genesis"}
    assert "password=hunter2" in ok(run_cli(GENESIS, "db", "url", "--show-password", env=env)).stdout


def test_version(genesis_home: Path) -> None:
    proc = ok(run_cli(GENESIS, "--version", env=cli_env(genesis_home)))
    assert proc.stdout.strip() == f"genesis {package_version()}"


@pytest.mark.db
def test_a_closed_pipe_is_not_a_traceback(env: dict[str, str], db_dsn: str) -> None:
    # far more than a pipe's buffer (64 KiB), so that the CLI is still writing when head exits
    query(db_dsn, """INSERT INTO genesis.rule_versions (namespace, rule_id, version, confidence, rule)
                     SELECT 'pipe', 'rule-' || i, 1, 0.9, '{}' FROM generate_series(1, 5000) AS i""")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"'{GENESIS}' rules list | head -1"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc
    assert proc.stdout.split() == ["rule", "version", "confidence", "applied"]
    assert proc.stderr == ""


# --- live consumers -------------------------------------------------------------------------


@pytest.mark.db
@pytest.mark.slow
def test_consumers_shows_a_live_consumer_and_a_killed_one_as_gone(env: dict[str, str], db_dsn: str,
                                                                  background: Callable[..., Any]) -> None:
    fast = {**env, "GENESIS_HEARTBEAT_INTERVAL_S": "0.3"}
    # one process per command, so that the command's pid is the consumer's (its id ends with it)
    victim = background(GENESIS_CONSUME, "--queues", RULES, "--parallel", "2", "--processes", "1", *FAST, env=fast)
    victim.wait_for_line("consuming")
    victim_id = f"{victim.proc.pid}"

    def listed() -> dict[str, dict[str, Any]]:
        return {c["id"].rsplit(":", 1)[1]: c for c in as_json("consumers", env=env)}

    row = wait_until(lambda: listed().get(victim_id), 60, what="the consumer listed")
    assert row["state"] == "running" and row["queues"] == [RULES] and row["parallel"] == 2
    beat = row["last_heartbeat"]
    wait_until(lambda: listed()[victim_id]["last_heartbeat"] != beat, 60, what="a second heartbeat")
    text = ok(run_cli(GENESIS, "consumers", env=env)).stdout
    assert f":{victim_id} " in text and " running " in text

    victim.kill()   # SIGKILL: no chance to say it stopped
    wait_until(lambda: listed()[victim_id]["state"] == "gone", 60, interval=0.3, what="the killed consumer gone")
    assert " gone " in ok(run_cli(GENESIS, "consumers", env=env)).stdout

    # any live consumer's heartbeat forgets consumers gone for longer than the retention
    keeper = background(GENESIS_CONSUME, "--queues", LLM, "--processes", "1", *FAST,
                        env={**fast, "GENESIS_CONSUMER_RETENTION_S": "0"})
    keeper.wait_for_line("consuming")
    wait_until(lambda: victim_id not in listed(), 60, interval=0.3, what="the gone consumer forgotten")
    assert listed()[str(keeper.proc.pid)]["state"] == "running"

    keeper.proc.terminate()
    assert keeper.wait(timeout=30) == 0, keeper.stderr()
    assert listed()[str(keeper.proc.pid)]["state"] == "stopped"


@pytest.mark.db
def test_status_watch_redraws_in_place_until_ctrl_c(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "watch.out"
    with out.open("w") as stdout:
        proc = subprocess.Popen([str(GENESIS), "status", "--watch", "--interval", "0.2"], env=env, stdout=stdout,
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: out.read_text().count("\x1b[H\x1b[2J") >= 2, 60, what="two redraws")
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert proc.returncode == 0 and stderr == ""
    frame = out.read_text().split("\x1b[H\x1b[2J")[1]   # complete: another redraw followed it
    assert "Ctrl-C to stop" in frame and "\ndatabase: " in frame and RULES in frame
