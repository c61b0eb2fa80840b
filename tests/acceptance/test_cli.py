"""The real `genesis` and `genesis-consume` console scripts in subprocesses, against a real PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from genesis_pgflow.store import schema
from genesis_pgflow.testing import wait_until

RULES, RULES_RESULTS, RULES_DLQ = "genesis_rule_updates", "genesis_rule_updates_results", "genesis_rule_updates_dlq"
LLM, LLM_RESULTS, LLM_DLQ = ("genesis_llm_config_updates", "genesis_llm_config_updates_results",
                             "genesis_llm_config_updates_dlq")
BIN = Path(sys.executable).parent
GENESIS = BIN / "genesis"
GENESIS_CONSUME = BIN / "genesis-consume"
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"
FAST = ("--poll-interval-ms", "100")


def cli_env(home: Path, dsn: str | None = None, **extra: str) -> dict[str, str]:
    """The caller's environment without anything that chooses a database or configures genesis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENESIS_", "DATABASE_URL"))}
    env["GENESIS_HOME"] = str(home)
    if dsn is not None:
        env["GENESIS_DATABASE_URL"] = dsn
    env.update(extra)
    return env


def run_cli(script: Path, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(script), *args], check=False, env=env, capture_output=True, text=True, timeout=timeout)


def query(dsn: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def results(dsn: str, results_queue: str) -> list[dict[str, Any]]:
    return [r["message"] for r in query(dsn, f"SELECT message FROM pgmq.q_{results_queue} ORDER BY msg_id")]


def count(dsn: str, table: str) -> int:
    return query(dsn, f"SELECT count(*) AS n FROM {table}")[0]["n"]


def rule(i: int | str, **extra: Any) -> dict[str, Any]:
    return {"type": "genesis_rule_update", "namespace": "cli", "rule_id": f"r{i}", "version": 1,
            "confidence": 0.95, "rule": {"when": "x", "then": "y"}, **extra}


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{text}"
    return lines[0]


@pytest.fixture
def env(db_dsn: str, genesis_home: Path) -> dict[str, str]:
    return cli_env(genesis_home, db_dsn)


def wait_listening(dsn: str, timeout: float = 30) -> None:
    """Until a consumer has its LISTEN connection open and idle (it then waits for NOTIFY or its poll)."""
    wait_until(lambda: query(dsn, """
        SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle'
        AND query ILIKE 'LISTEN%%' AND pid <> pg_backend_pid()"""), timeout, what="a LISTENing consumer")


# --- genesis db upgrade --------------------------------------------------------------------


@pytest.mark.db
def test_db_upgrade_twice(empty_db_dsn: str, genesis_home: Path) -> None:
    env = cli_env(genesis_home, empty_db_dsn)
    first = ok(run_cli(GENESIS, "db", "upgrade", env=env))
    head = schema.head_revision()
    assert "queues created: 13" in first.stdout
    assert f"none -> {head}" in first.stdout

    second = ok(run_cli(GENESIS, "db", "upgrade", env=env))
    assert "pgmq: present" in second.stdout and "queues created: 0" in second.stdout
    assert f"{head} -> {head}" in second.stdout
    assert schema.problems(empty_db_dsn) == []


@pytest.mark.db
def test_concurrent_db_upgrade_processes(empty_db_dsn: str, genesis_home: Path) -> None:
    env = cli_env(genesis_home, empty_db_dsn)
    procs = [subprocess.Popen([str(GENESIS), "db", "upgrade"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert sum(int(out.split("queues created: ")[1].split(";")[0]) for out, _ in outputs) == 13
    assert schema.problems(empty_db_dsn) == []


# --- send, consume, status ------------------------------------------------------------------


@pytest.mark.db
def test_send_then_drain_publishes_the_result(env: dict[str, str], db_dsn: str) -> None:
    sent = ok(run_cli(GENESIS, "send", RULES, json.dumps(rule(1)), env=env))
    msg_id = int(sent.stdout.strip())

    ok(run_cli(GENESIS_CONSUME, "--drain", "--queues", RULES, *FAST, env=env))

    [envelope] = results(db_dsn, RULES_RESULTS)
    assert envelope["request"] == {"queue": RULES, "msg_id": msg_id, "type": "genesis_rule_update", "attempt": 1}
    assert envelope["status"] == "completed"
    assert envelope["result"] == {"status": "applied", "namespace": "cli", "rule_id": "r1", "version": 1,
                                  "confidence": 0.95}
    assert count(db_dsn, f"pgmq.a_{RULES}") == 1 and count(db_dsn, f"pgmq.q_{RULES}") == 0

    listed = json.loads(ok(run_cli(GENESIS, "rules", "list", "--json", env=env)).stdout)
    assert [(r["rule_id"], r["version"]) for r in listed] == [("r1", 1)]


@pytest.mark.db
def test_drain_consumes_every_queue_by_default(env: dict[str, str], db_dsn: str) -> None:
    ok(run_cli(GENESIS, "send", RULES, json.dumps(rule(2)), env=env))
    ok(run_cli(GENESIS, "send", LLM, json.dumps({"type": "genesis_llm_config_update", "provider": "gemini",
                                                  "complexity": "simple", "models": ["g-1", "g-2"]}), env=env))
    ok(run_cli(GENESIS_CONSUME, "--drain", "--parallel", "1", *FAST, env=env))

    assert [m["status"] for m in results(db_dsn, RULES_RESULTS)] == ["completed"]
    [llm] = results(db_dsn, LLM_RESULTS)
    assert llm["status"] == "completed" and llm["result"]["models_count"] == 2


@pytest.mark.db
def test_status_json_counts_per_queue(env: dict[str, str], db_dsn: str) -> None:
    ok(run_cli(GENESIS, "send", RULES, json.dumps(rule(1)), env=env))
    ok(run_cli(GENESIS, "send", RULES, json.dumps(rule(2, confidence=0.1)), env=env))  # low confidence: failed
    ok(run_cli(GENESIS, "send", RULES, '{"type": "genesis_rule_update"}', "--raw", env=env))   # invalid: failed
    ok(run_cli(GENESIS_CONSUME, "--drain", "--queues", RULES, *FAST, env=env))
    ok(run_cli(GENESIS, "send", RULES, json.dumps(rule(3)), env=env))                 # waiting

    status = json.loads(ok(run_cli(GENESIS, "status", "--json", env=env)).stdout)

    queues = status["queues"]
    assert set(queues) == {RULES, LLM, "code_execution_requests", "genesis_experiment_requests"}
    rules = queues[RULES]
    assert {k: rules[k] for k in ("depth", "in_flight", "archived", "dead_lettered", "completed", "failed")} == {
        "depth": 1, "in_flight": 0, "archived": 3, "dead_lettered": 0, "completed": 1, "failed": 2}
    assert rules["oldest_age_s"] is not None and rules["oldest_age_s"] >= 0
    for name in (LLM, "code_execution_requests", "genesis_experiment_requests"):
        assert {k: queues[name][k] for k in ("depth", "archived", "completed", "failed")} == {
            "depth": 0, "archived": 0, "completed": 0, "failed": 0}

    assert status["types"]["genesis_rule_update"] == {"completed": 1, "failed": 2, "retrying": 0, "running": 0}

    table = ok(run_cli(GENESIS, "status", env=env)).stdout
    assert RULES in table and "depth" in table and "archived" in table


# --- dead letters ---------------------------------------------------------------------------


@pytest.mark.db
def test_dlq_list_and_requeue_a_poison_message(env: dict[str, str], db_dsn: str) -> None:
    secret = "sk-" + uuid.uuid4().hex
    body = {"type": "genesis_llm_config_update", "provider": "openai", "complexity": "medium",
            "models": ["o-1"], "settings": {"api_key": secret}}
    poison = int(ok(run_cli(GENESIS, "send", LLM, json.dumps(body), env=env)).stdout)
    with psycopg.connect(db_dsn, autocommit=True) as conn:  # three consumers took it and died
        for _ in range(3):
            conn.execute("SELECT pgmq.read(%s, 0, 1)", (LLM,))

    ok(run_cli(GENESIS_CONSUME, "--drain", "--queues", LLM, "--max-attempts", "3", *FAST, env=env))

    [dead] = results(db_dsn, LLM_RESULTS)
    assert dead["request"]["msg_id"] == poison and dead["request"]["attempt"] == 4
    assert dead["status"] == "failed" and dead["error"]["code"] == "max_attempts_exceeded"
    assert count(db_dsn, f"pgmq.a_{LLM}") == 1

    listed = ok(run_cli(GENESIS, "dlq", "list", LLM, "--json", env=env)).stdout
    assert secret not in listed
    [letter] = json.loads(listed)
    assert letter["message"]["provider"] == "openai" and letter["message"]["settings"]["api_key"] != secret
    text = ok(run_cli(GENESIS, "dlq", "list", LLM, env=env)).stdout
    assert str(letter["msg_id"]) in text and secret not in text
    assert "no dead letters" in ok(run_cli(GENESIS, "dlq", "list", RULES, env=env)).stdout
    status = json.loads(ok(run_cli(GENESIS, "status", "--json", env=env)).stdout)
    assert status["queues"][LLM]["dead_lettered"] == 1 and secret not in json.dumps(status)

    requeued = ok(run_cli(GENESIS, "dlq", "requeue", LLM, env=env)).stdout
    assert "requeued 1 message(s)" in requeued
    assert count(db_dsn, f"pgmq.q_{LLM_DLQ}") == 0
    [again] = query(db_dsn, f"SELECT msg_id, read_ct, message FROM pgmq.q_{LLM}")
    # the secret is kept for the handler, sealed (cipher.py): the store opens it
    assert again["read_ct"] == 0 and again["message"]["settings"]["api_key"].startswith("genesis-sealed:v1:")
    assert {**again["message"], "settings": body["settings"]} == body
    assert f"-> {LLM} {again['msg_id']}" in requeued

    ok(run_cli(GENESIS_CONSUME, "--drain", "--queues", LLM, *FAST, env=env))
    final = [m for m in results(db_dsn, LLM_RESULTS) if m["request"]["msg_id"] == again["msg_id"]]
    assert [m["status"] for m in final] == ["completed"]
    assert secret not in json.dumps(results(db_dsn, LLM_RESULTS))
    assert "requeued 0 message(s)" in ok(run_cli(GENESIS, "dlq", "requeue", LLM, env=env)).stdout


# --- exit codes -----------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    (GENESIS_CONSUME, "--dsn", UNREACHABLE, "--drain"),
    (GENESIS, "--dsn", UNREACHABLE, "status"),
    (GENESIS, "--dsn", UNREACHABLE, "db", "upgrade"),
    (GENESIS, "--dsn", UNREACHABLE, "send", RULES, "{}"),
], ids=["consume", "status", "db-upgrade", "send"])
def test_an_unreachable_database_exits_2_with_one_line(argv: tuple[Any, ...], genesis_home: Path) -> None:
    started = time.monotonic()
    proc = run_cli(argv[0], *argv[1:], env=cli_env(genesis_home), timeout=30)
    assert proc.returncode == 2, proc
    line = one_line(proc.stderr)
    assert "127.0.0.1" in line and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 30    # one attempt, not a wait for the outage budget (300 s)


def test_an_unreachable_database_from_the_environment_exits_2(genesis_home: Path) -> None:
    proc = run_cli(GENESIS_CONSUME, "--drain", env=cli_env(genesis_home, UNREACHABLE), timeout=30)
    assert proc.returncode == 2, proc
    one_line(proc.stderr)


@pytest.mark.parametrize("argv, mentions", [
    ((GENESIS_CONSUME, "--bogus"), "--bogus"),
    ((GENESIS_CONSUME, "--parallel", "many"), "--parallel"),
    ((GENESIS_CONSUME, "--parallel", "0"), "parallel"),
    ((GENESIS_CONSUME, "--queues", "no_such_queue"), "no_such_queue"),
    ((GENESIS_CONSUME, "--log-format", "xml"), "--log-format"),
    ((GENESIS, "--bogus", "status"), "--bogus"),
    ((GENESIS,), "command"),
    ((GENESIS, "send", "no_such_queue", "{}"), "no_such_queue"),
    ((GENESIS, "send", RULES, "{not json"), "JSON"),
    ((GENESIS, "dlq", "requeue", RULES, "abc"), "abc"),
], ids=["consume-unknown-flag", "consume-not-a-number", "consume-parallel-0", "consume-unknown-queue",
        "consume-log-format", "admin-unknown-flag", "admin-no-command", "send-unknown-queue", "send-bad-json",
        "requeue-bad-id"])
def test_bad_usage_exits_2_with_one_line(argv: tuple[Any, ...], mentions: str, genesis_home: Path) -> None:
    # an unreachable database: bad usage is reported before any connection is tried
    proc = run_cli(argv[0], *argv[1:], env=cli_env(genesis_home, UNREACHABLE), timeout=30)
    assert proc.returncode == 2, proc
    assert mentions in one_line(proc.stderr)


@pytest.mark.db
def test_no_migrate_on_an_empty_database_exits_2_saying_what_to_run(empty_db_dsn: str, genesis_home: Path) -> None:
    proc = run_cli(GENESIS_CONSUME, "--no-migrate", "--drain", env=cli_env(genesis_home, empty_db_dsn))
    assert proc.returncode == 2, proc
    assert "genesis db upgrade" in one_line(proc.stderr)
    assert schema.problems(empty_db_dsn)  # and it did not migrate


@pytest.mark.db
@pytest.mark.parametrize("argv", [(), ("--no-migrate",), ("--processes", "1")],
                         ids=["default", "no-migrate", "one-process"])
def test_a_read_only_database_at_start_exits_2_with_one_line(argv: tuple[str, ...], db_dsn: str,
                                                             genesis_home: Path) -> None:
    """A standby, or a database whose sessions are read-only: a consumer could take nothing it could
    answer, so it says so and exits 2 before it starts (a database turned read-only while it runs
    is waited out instead: tests/faults)."""
    dbname = conninfo_to_dict(db_dsn)["dbname"]
    query(db_dsn, f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
    proc = run_cli(GENESIS_CONSUME, "--drain", *argv, env=cli_env(genesis_home, db_dsn))
    assert proc.returncode == 2, proc
    assert "the database is read-only" in one_line(proc.stderr)
    assert "Traceback" not in proc.stderr


@pytest.mark.db
@pytest.mark.parametrize("argv", [("status",), ("send", "genesis_rule_updates", "{}"), ("dlq", "list", "genesis_rule_updates")])
def test_admin_commands_never_migrate_a_configured_database(argv: tuple[str, ...], empty_db_dsn: str,
                                                            genesis_home: Path) -> None:
    proc = run_cli(GENESIS, *argv, env=cli_env(genesis_home, empty_db_dsn))
    assert proc.returncode == 2, proc
    assert "genesis db upgrade" in one_line(proc.stderr)
    assert schema.problems(empty_db_dsn) == ["pgmq is not installed"]


@pytest.mark.db
def test_no_migrate_on_a_current_database_consumes(env: dict[str, str], db_dsn: str) -> None:
    ok(run_cli(GENESIS, "send", RULES, json.dumps(rule(1)), env=env))
    ok(run_cli(GENESIS_CONSUME, "--no-migrate", "--drain", "--queues", RULES, *FAST, env=env))
    assert len(results(db_dsn, RULES_RESULTS)) == 1


# --- signals and crashes --------------------------------------------------------------------


@pytest.mark.db
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_idle_exits_0_quickly(signum: int, env: dict[str, str], db_dsn: str,
                                             background: Callable[..., Any]) -> None:
    # faulthandler: if it hangs, SIGABRT dumps every thread's stack into the failure message
    consumer = background(GENESIS_CONSUME, "--poll-interval-ms", "120000", env={**env, "PYTHONFAULTHANDLER": "1"})
    consumer.wait_for_line("consuming")
    wait_listening(db_dsn)

    started = time.monotonic()
    consumer.signal(signum)
    try:
        code = consumer.wait(timeout=60)
    except subprocess.TimeoutExpired:
        consumer.signal(signal.SIGABRT)
        consumer.wait(timeout=10)
        pytest.fail(f"still running 60 s after {signal.Signals(signum).name} while idle "
                    "(shutdown waits out the 120 s LISTEN poll?)\n" + consumer.stderr())
    assert code == 0, consumer.stderr()
    assert time.monotonic() - started < 60, "a 120 s poll interval must not delay shutdown"
    assert "Traceback" not in consumer.stderr()


def test_a_sigterm_during_start_up_exits_0(genesis_home: Path, background: Callable[..., Any]) -> None:
    """Before the consumer runs (connecting, migrating), SIGTERM ends start-up with exit 0, as
    Ctrl-C does: nothing is in flight yet. The consumer is held in start-up by a server that takes
    its connection and never answers; the test signals once that connection has been accepted."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent.settimeout(60)
        dsn = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/x?connect_timeout=120"
        consumer = background(GENESIS_CONSUME, env=cli_env(genesis_home, dsn))
        try:
            accepted, _ = silent.accept()       # the consumer waits for the server's answer now
        except TimeoutError:
            pytest.fail("the consumer never connected\n" + consumer.stderr())
        with accepted:
            consumer.signal(signal.SIGTERM)
            try:
                code = consumer.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail("still starting 60 s after SIGTERM\n" + consumer.stderr())
    assert code == 0, consumer.stderr()
    assert "during start-up" in consumer.stderr() and "Traceback" not in consumer.stderr()


@pytest.mark.db
@pytest.mark.slow
def test_kill_9_mid_batch_loses_nothing_and_answers_each_request_once(env: dict[str, str], db_dsn: str,
                                                                      background: Callable[..., Any]) -> None:
    total = 8000            # two processes at -p 4 answer thousands a second: the kill comes first
    bodies = [json.dumps(rule(i)) for i in range(total)]
    sent = [r["msg_id"] for r in query(db_dsn, "SELECT pgmq.send_batch(%s, %s::jsonb[]) AS msg_id", (RULES, bodies))]
    assert len(sent) == total
    fast_leases = {**env, "GENESIS_LEASE_S": "2"}  # what the killed consumer held comes back within 2 s

    victim = background(GENESIS_CONSUME, "--parallel", "4", "--queues", RULES, *FAST, env=fast_leases)
    def busy() -> bool:     # some answered, and (most likely, still) holding leases
        return count(db_dsn, f"pgmq.q_{RULES_RESULTS}") >= 100 and query(
            db_dsn, f"SELECT count(*) AS n FROM pgmq.q_{RULES} WHERE vt > clock_timestamp()")[0]["n"] > 0
    wait_until(busy, timeout=60, what="some results and leases held")
    victim.kill()
    done_before = count(db_dsn, f"pgmq.q_{RULES_RESULTS}")
    assert done_before < total, "the consumer finished before it could be killed; send more messages"
    # What the killed consumer held: read, not archived (whether or not its lease has run out by
    # now, and possibly nothing if the kill fell between two batches).
    held = query(db_dsn, f"SELECT count(*) AS n FROM pgmq.q_{RULES} WHERE read_ct >= 1")[0]["n"]

    ok(run_cli(GENESIS_CONSUME, "--drain", "--parallel", "4", "--queues", RULES, *FAST, env=fast_leases,
               timeout=120))

    answered = Counter(m["request"]["msg_id"] for m in results(db_dsn, RULES_RESULTS))
    duplicates = {msg_id: n for msg_id, n in answered.items() if n > 1}
    assert duplicates == {}
    assert sorted(answered) == sent, f"{len(set(sent) - set(answered))} request(s) without a result"
    rerun = sum(1 for m in results(db_dsn, RULES_RESULTS) if m["request"]["attempt"] >= 2)
    assert rerun >= held, "what the killed consumer held was read again and answered"
    statuses = Counter((m["status"], (m["result"] or {}).get("status")) for m in results(db_dsn, RULES_RESULTS))
    assert set(statuses) <= {("completed", "applied"), ("completed", "unchanged")}, statuses
    archived = [r["msg_id"] for r in query(db_dsn, f"SELECT msg_id FROM pgmq.a_{RULES} ORDER BY msg_id")]
    assert archived == sent
    assert count(db_dsn, f"pgmq.q_{RULES}") == 0
    assert query(db_dsn, "SELECT status, count(*) AS n FROM genesis.workflow_runs GROUP BY status") == [
        {"status": "completed", "n": total}]
    assert count(db_dsn, "genesis.active_rules") == total


# --- the embedded default -------------------------------------------------------------------


def _pg_ctl() -> Path:
    import pgserver

    return Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_ctl"


@pytest.fixture
def embedded_home(genesis_home: Path) -> Iterator[Path]:
    """A GENESIS_HOME whose embedded server is stopped at teardown (it outlives the CLI by design)."""
    yield genesis_home
    pgdata = genesis_home / "pgdata"
    if (pgdata / "postmaster.pid").exists():
        command = [str(_pg_ctl()), "-D", str(pgdata), "stop", "-m", "fast", "-w"]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "pgserver", "--", *command]
        subprocess.run(command, capture_output=True, timeout=60, check=False)


@pytest.mark.slow
def test_the_embedded_default_end_to_end(embedded_home: Path) -> None:
    pytest.importorskip("pgserver")
    env = cli_env(embedded_home)  # neither GENESIS_DATABASE_URL nor DATABASE_URL

    sent = ok(run_cli(GENESIS, "send", RULES, json.dumps(rule("embedded")), env=env, timeout=120))
    msg_id = int(sent.stdout.strip())
    ok(run_cli(GENESIS_CONSUME, "--drain", "--queues", RULES, *FAST, env=env, timeout=120))

    status = json.loads(ok(run_cli(GENESIS, "status", "--json", env=env)).stdout)
    assert status["queues"][RULES]["completed"] == 1
    assert status["queues"][RULES]["archived"] == 1
    assert status["queues"][RULES]["results_waiting"] == 1
    assert (embedded_home / "pgdata" / "PG_VERSION").exists()
    listed = json.loads(ok(run_cli(GENESIS, "rules", "list", "--json", env=env)).stdout)
    assert [r["rule_id"] for r in listed] == ["rembedded"]
    assert msg_id == 1
