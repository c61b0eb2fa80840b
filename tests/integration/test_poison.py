"""Intake that cannot be poisoned: whatever PostgreSQL accepted into a request queue (any nesting,
any number, any size, any headers), the real consumer goes on, answers each message exactly once
and archives it; a body over the size limit never enters the consumer's memory."""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from genesis_pgflow.app import App
from genesis_pgflow.settings import Settings

pytestmark = pytest.mark.db

RULES, RULES_RESULTS = "genesis_rule_updates", "genesis_rule_updates_results"
CODE, CODE_RESULTS = "code_execution_requests", "code_execution_results"
MIB = 1024 * 1024
GENESIS_CONSUME = Path(sys.executable).parent / "genesis-consume"


def query(dsn: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def send_sql(dsn: str, queue: str, text: str, headers: str | None = None) -> int:
    """Enqueue like a producer: plain SQL, the body given as JSON text."""
    if headers is None:
        return query(dsn, "SELECT pgmq.send(%s, %s::jsonb) AS msg_id", (queue, text))[0]["msg_id"]
    return query(dsn, "SELECT pgmq.send(%s, %s::jsonb, %s::jsonb) AS msg_id", (queue, text, headers))[0]["msg_id"]


def rule(i: int, **extra: Any) -> str:
    return json.dumps({"type": "genesis_rule_update", "namespace": "poison", "rule_id": f"r{i}", "version": 1,
                       "confidence": 0.9, "rule": {"when": "x"}, **extra})


def results_by_request(dsn: str, results_queue: str) -> dict[int, list[dict[str, Any]]]:
    found: dict[int, list[dict[str, Any]]] = {}
    for row in query(dsn, f"SELECT message FROM pgmq.q_{results_queue} ORDER BY msg_id"):
        found.setdefault(row["message"]["request"]["msg_id"], []).append(row["message"])
    return found


def archived(dsn: str, queue: str) -> set[int]:
    return {r["msg_id"] for r in query(dsn, f"SELECT msg_id FROM pgmq.a_{queue}")}


def waiting(dsn: str, queue: str) -> list[int]:
    return [r["msg_id"] for r in query(dsn, f"SELECT msg_id FROM pgmq.q_{queue}")]


@pytest.fixture
def app_settings(db_dsn: str, genesis_home: Path) -> Iterator[Settings]:
    yield Settings(dsn=db_dsn, home=genesis_home, queues=(RULES, CODE), drain=True, poll_interval_ms=100,
                   migrate=False, parallel=2)


def consume_until_drained(settings: Settings) -> None:
    """The consumer exactly as `genesis-consume --drain` builds it (app.py); it must return, not raise."""
    app = App.open(settings)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            app.consumer().run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            raised.append(exc)

    try:
        thread = threading.Thread(target=run, name="poison-consumer", daemon=True)
        thread.start()
        thread.join(timeout=180)
        assert not thread.is_alive(), "the consumer did not drain its queues"
        assert not raised, f"the consumer raised {raised[0]!r}"
    finally:
        app.close()


def check_each_answered_once_and_archived(dsn: str, queue: str, results_queue: str,
                                          expected: dict[int, str]) -> dict[int, dict[str, Any]]:
    """Every request has exactly one result with the expected status or error code, and is archived."""
    answers = results_by_request(dsn, results_queue)
    assert set(answers) == set(expected)
    for msg_id, code in expected.items():
        assert len(answers[msg_id]) == 1, f"message {msg_id}: {len(answers[msg_id])} results"
        result = answers[msg_id][0]
        got = "completed" if result["status"] == "completed" else result["error"]["code"]
        assert got == code, f"message {msg_id}: {got} ({result['error']}), expected {code}"
    assert archived(dsn, queue) == set(expected)
    assert waiting(dsn, queue) == []
    runs = {r["msg_id"]: r for r in query(dsn, "SELECT msg_id, status, type, error FROM genesis.workflow_runs "
                                               "WHERE queue = %s", (queue,))}
    assert {m: r["status"] for m, r in runs.items()} == {
        m: "completed" if code == "completed" else "failed" for m, code in expected.items()}
    return {m: a[0] for m, a in answers.items()}


def test_poison_messages_fail_alone_and_the_consumer_goes_on(db_dsn: str, app_settings: Settings) -> None:
    random_type = "".join(random.choice(string.ascii_letters) for _ in range(10_000))  # incompressible
    deep_headers = "[" * 100 + "]" * 100
    sent = {
        send_sql(db_dsn, RULES, rule(1)): "completed",
        send_sql(db_dsn, RULES, "[" * 10_000 + "]" * 10_000): "invalid_payload",
        send_sql(db_dsn, RULES, '{"a":' * 10_000 + "1" + "}" * 10_000): "invalid_payload",
        send_sql(db_dsn, RULES, rule(2)): "completed",
        send_sql(db_dsn, RULES, rule(3).replace('"version": 1', '"version": ' + "9" * 5_000)): "invalid_payload",
        send_sql(db_dsn, RULES, rule(4).replace('"confidence": 0.9', '"confidence": 1e400')): "invalid_payload",
        # a type longer than any index row: it once failed every read of the queue
        send_sql(db_dsn, RULES, json.dumps({"type": random_type, "rule_id": "r5"})): "unknown_type",
        send_sql(db_dsn, RULES, rule(6, rule_id="".join(random.choices(string.ascii_letters, k=10_000)))):
            "invalid_payload",
        send_sql(db_dsn, RULES, rule(7, rule={"blob": "x" * (3 * MIB)})): "payload_too_large",
        send_sql(db_dsn, RULES, rule(8), headers=deep_headers): "invalid_payload",
        send_sql(db_dsn, RULES, rule(9), headers=json.dumps({"pad": "y" * (100 * 1024)})): "payload_too_large",
        send_sql(db_dsn, RULES, '"just a string"'): "invalid_payload",
        send_sql(db_dsn, RULES, rule(10)): "completed",
    }
    code_sent = {
        # an absurd timeout is clamped, never an internal error retried as transient
        send_sql(db_dsn, CODE, json.dumps({"type": "code_execution_request", "id": "c1", "code": "x",
                                           "language": "cobol", "analysis_type": "quality",
                                           "timeout_ms": 1e10})): "unsupported_language",
        send_sql(db_dsn, CODE, json.dumps({"type": "code_execution_request", "id": "c2", "code": "x",
                                           "language": "python", "analysis_type": "quality",
                                           "timeout_ms": -5})): "invalid_payload",
    }

    consume_until_drained(app_settings)

    answers = check_each_answered_once_and_archived(db_dsn, RULES, RULES_RESULTS, sent)
    check_each_answered_once_and_archived(db_dsn, CODE, CODE_RESULTS, code_sent)
    ids = list(sent)
    errors = {m: answers[m]["error"] for m in ids}
    assert "nested 10000 levels deep" in errors[ids[1]]["message"]
    assert "nested 10000 levels deep" in errors[ids[2]]["message"]
    assert "number of 5000 characters" in errors[ids[4]]["message"]
    assert "number of 401 characters" in errors[ids[5]]["message"]      # 1e400 as PostgreSQL writes it
    assert len(errors[ids[6]]["details"]["type"]) < 200 and answers[ids[6]]["request"]["type"] is None
    assert errors[ids[7]]["message"].startswith("rule_id: String should have at most 256 characters")
    assert errors[ids[8]]["details"]["limit_bytes"] == 2 * MIB and errors[ids[8]]["details"]["size_bytes"] > 3 * MIB
    assert errors[ids[8]]["details"]["rule_id"] == "r7"     # identifiers echoed, though the body was never read
    assert errors[ids[9]]["details"]["field"] == "headers" and "nested 100 levels" in errors[ids[9]]["message"]
    assert errors[ids[10]]["details"]["field"] == "headers" and errors[ids[10]]["details"]["limit_bytes"] == 65536
    assert errors[ids[11]]["message"] == "payload must be a JSON object, got str"
    # what the database recorded is bounded too
    [long_type] = query(db_dsn, "SELECT type FROM genesis.workflow_runs WHERE queue = %s AND msg_id = %s",
                        (RULES, ids[6]))
    assert long_type["type"] is None


def test_a_message_whose_batch_read_fails_is_read_alone(db_dsn: str, app_settings: Settings) -> None:
    """A batch read that the database refuses because of one message (here: a trigger a DBA
    added that refuses it in the read of bodies, the way an index once refused a long type)
    leases the batch without bodies and reads each message on its own: the others go on and the
    culprit gets its one result."""
    query(db_dsn, f"""
        CREATE FUNCTION refuses_boom() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.message ->> 'type' = 'boom' AND current_query() LIKE '%%body_bytes%%' THEN
                RAISE EXCEPTION 'refused: boom' USING ERRCODE = 'data_exception';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuses_boom BEFORE UPDATE ON pgmq.q_{RULES}
            FOR EACH ROW EXECUTE FUNCTION refuses_boom();""")
    sent = {
        send_sql(db_dsn, RULES, rule(1)): "completed",
        send_sql(db_dsn, RULES, json.dumps({"type": "boom", "rule_id": "b1"})): "unknown_type",
        send_sql(db_dsn, RULES, rule(2)): "completed",
    }
    consume_until_drained(app_settings)
    answers = check_each_answered_once_and_archived(db_dsn, RULES, RULES_RESULTS, sent)
    boom = answers[list(sent)[1]]
    assert boom["error"]["details"]["rule_id"] == "b1" and boom["request"]["attempt"] == 1


def _consumer_env(home: Path, dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENESIS_", "DATABASE_URL"))}
    env.update(GENESIS_HOME=str(home), GENESIS_DATABASE_URL=dsn)
    return env


def _drain_and_measure(home: Path, dsn: str) -> float:
    """Run the real `genesis-consume --drain` over the rules queue; its peak RSS in MiB."""
    proc = subprocess.Popen([str(GENESIS_CONSUME), "--queues", RULES, "--drain", "--poll-interval-ms", "100"],
                            env=_consumer_env(home, dsn), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # wait4: the exit status and the peak RSS of this process (and of the few short commands
        # it starts: the sandbox probe)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == 0, stderr
    return usage.ru_maxrss / 1024


@pytest.mark.slow
def test_a_60_mib_message_never_enters_the_consumer(db_dsn: str, genesis_home: Path) -> None:
    """Three 60 MiB messages (built by the server, so this test holds none of them) are answered
    payload_too_large while the real `genesis-consume` process stays far below their size: its
    peak is compared with its own peak over small messages on this machine, not with a constant."""
    zero = send_sql(db_dsn, RULES, rule(0))
    baseline_mib = _drain_and_measure(genesis_home, db_dsn)

    first = send_sql(db_dsn, RULES, rule(1))
    big = [query(db_dsn, "SELECT pgmq.send(%s, jsonb_build_object('type', 'genesis_rule_update', 'rule_id', %s::text, "
                         "'rule', jsonb_build_object('blob', repeat('x', %s)))) AS msg_id",
                 (RULES, f"big{i}", 60 * MIB))[0]["msg_id"] for i in range(3)]
    last = send_sql(db_dsn, RULES, rule(2))
    peak_mib = _drain_and_measure(genesis_home, db_dsn)

    # one body fetched would add at least its 60 MiB (as bytes, then as text)
    assert peak_mib - baseline_mib < 30, (
        f"the consumer peaked at {peak_mib:.0f} MiB while three 60 MiB messages were waiting, "
        f"{baseline_mib:.0f} MiB over small ones")
    expected = {zero: "completed", first: "completed", last: "completed", **{m: "payload_too_large" for m in big}}
    answers = check_each_answered_once_and_archived(db_dsn, RULES, RULES_RESULTS, expected)
    for i, msg_id in enumerate(big):
        details = answers[msg_id]["error"]["details"]
        assert details["size_bytes"] > 60 * MIB and details["limit_bytes"] == 2 * MIB
        assert details["rule_id"] == f"big{i}"
