"""reply_to on a real PostgreSQL: producers that send with plain SQL and each read only their own
result queue; hostile names answered in the paired queue without creating anything; retention of
reply_to queues; `genesis send` checking what it sends and where."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from genesis_pgflow.cli import admin_main
from genesis_pgflow.handlers.rules import RuleEngine
from genesis_pgflow.metrics import OTHER, queue_label
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.retention import PgRetention, RetentionPolicy
from genesis_pgflow.store.state import PgStateStore

from .test_consumer_pg import RULES, RULES_RESULTS, Harness, ProbeHandler, drive, query, rule

pytestmark = pytest.mark.db

SING1, SING2 = f"{RULES_RESULTS}_sing1", f"{RULES_RESULTS}_sing2"


@pytest.fixture
def harness(db_dsn: str) -> Iterator[Harness]:
    h = Harness(db_dsn)
    yield h
    h.close()


def send_sql(dsn: str, body: Any, headers: Any = None) -> int:
    """As a Singularity instance sends: plain SQL, pgmq headers as a second argument."""
    if headers is None:
        return query(dsn, "SELECT pgmq.send(%s, %s::jsonb) AS id", (RULES, json.dumps(body)))[0]["id"]
    return query(dsn, "SELECT pgmq.send(%s, %s::jsonb, %s::jsonb) AS id",
                 (RULES, json.dumps(body), json.dumps(headers)))[0]["id"]


def queue_names(dsn: str) -> set[str]:
    return {r["queue_name"] for r in query(dsn, "SELECT queue_name FROM pgmq.list_queues()")}


def read_all(dsn: str, queue: str) -> list[dict[str, Any]]:
    """What a producer reading its queue gets: pgmq.read, leasing for 30 s."""
    return query(dsn, "SELECT msg_id, message, headers FROM pgmq.read(%s, 30, 100)", (queue,))


def all_results(dsn: str, queue: str) -> list[dict[str, Any]]:
    return [r["message"] for r in query(dsn, f"SELECT message FROM pgmq.q_{queue} ORDER BY msg_id")]


def test_two_instances_each_read_only_their_own_results(harness: Harness) -> None:
    consumer = harness.consumer([RuleEngine(PgStateStore(harness.database()))])
    dsn = harness.dsn
    assert not {SING1, SING2} & queue_names(dsn)
    # instance 1 names its queue in the payload, instance 2 in a pgmq header; both send correlation ids
    one = [send_sql(dsn, rule(f"a{i}", reply_to=SING1), {"correlation_id": f"one-{i}"}) for i in range(3)]
    two = [send_sql(dsn, rule(f"b{i}"), {"correlation_id": f"two-{i}", "reply_to": SING2}) for i in range(2)]
    plain = send_sql(dsn, rule("c"))

    drive(consumer, lambda: len(all_results(dsn, RULES_RESULTS)) == 1 and SING2 in queue_names(dsn)
          and len(all_results(dsn, SING2)) == 2 and len(all_results(dsn, SING1)) == 3, what="six results")

    assert queue_names(dsn) >= {SING1, SING2}
    mine = read_all(dsn, SING1)
    assert sorted(r["message"]["request"]["msg_id"] for r in mine) == one
    assert {r["message"]["status"] for r in mine} == {"completed"}
    assert sorted(r["headers"]["correlation_id"] for r in mine) == ["one-0", "one-1", "one-2"]
    theirs = read_all(dsn, SING2)
    assert sorted(r["message"]["request"]["msg_id"] for r in theirs) == two
    assert sorted(r["headers"]["correlation_id"] for r in theirs) == ["two-0", "two-1"]
    # instance 1's read leased nothing of instance 2's, nor of the paired queue
    assert [r["message"]["request"]["msg_id"] for r in read_all(dsn, RULES_RESULTS)] == [plain]
    # later requests find their queue there
    again = send_sql(dsn, rule("a9", reply_to=SING1))
    drive(consumer, lambda: len(all_results(dsn, SING1)) == 4, what="the fourth result of instance 1")
    assert [r["message"]["request"]["msg_id"] for r in read_all(dsn, SING1)] == [again]


HOSTILE = [
    "genesis_llm_config_updates_results_x",          # another family's
    "code_execution_results_sing1",                   # another family's
    "genesis_rule_updates_dlq",                       # a dead-letter queue
    "genesis_llm_config_updates_dlq",
    "genesis_rule_updates",                           # a request queue
    "code_execution_requests",
    "genesis_rule_updates_results_dlq",               # looks like a dead-letter queue
    "genesis_rule_updates_results_x_dlq",
    "genesis_rule_updates_results_" + "a" * 19,       # 48 characters: over pgmq's 47
    "genesis_rule_updates_results_" + "a" * 5000,
    "genesis_rule_updates_results_Sing1",             # uppercase (pgmq would fold it into another name)
    "GENESIS_RULE_UPDATES_RESULTS_SING1",
    'genesis_rule_updates_results_a"b',               # quotes
    "genesis_rule_updates_results_a'b",
    "genesis_rule_updates_results_x'); DROP TABLE pgmq.meta; --",
    "genesis_rule_updates_results_x; DELETE FROM genesis.workflow_runs",
    "genesis_rule_updates_results_x$$",
    "genesis_rule_updates_results_a b",
    "genesis_rule_updates_results_a.b",
    "genesis_rule_updates_results_../x",
    "genesis_rule_updates_results_x\n",
    "genesis_rule_updates_results_\u017f",             # the long s, which folds to s
    "genesis_rule_updates_results_\u212a",             # the Kelvin sign, which folds to k
    "genesis_rule_updates_results_\u00e9",
    "genesis_rule_updates_results_\uff11",             # a fullwidth digit
    "genesis_rule_updates_results_a__b",
    "genesis_rule_updates_results__a",
    "genesis_rule_updates_results_a_",
    "genesis_rule_updates_results_",
    "",
    "pg_catalog",
    42,
    ["genesis_rule_updates_results_x"],
    {"queue": "genesis_rule_updates_results_x"},
    True,
]


@pytest.mark.parametrize("where", ["payload", "headers"])
def test_hostile_reply_to_names_are_answered_in_the_paired_queue_and_create_nothing(harness: Harness,
                                                                                     where: str) -> None:
    handler = ProbeHandler()
    consumer = harness.consumer([handler], batch_size=50)
    dsn = harness.dsn
    before = queue_names(dsn)
    sent = {}
    for i, name in enumerate(HOSTILE):
        body, headers = (rule(i, reply_to=name), None) if where == "payload" else (rule(i), {"reply_to": name})
        sent[send_sql(dsn, body, headers)] = name
    after = send_sql(dsn, rule("after"))     # the consumer goes on

    drive(consumer, lambda: len(all_results(dsn, RULES_RESULTS)) == len(HOSTILE) + 1, timeout=30,
          what="a result for every request")

    by_id = {r["request"]["msg_id"]: r for r in all_results(dsn, RULES_RESULTS)}
    for msg_id, name in sent.items():
        error = by_id[msg_id]["error"]
        assert by_id[msg_id]["status"] == "failed" and error["code"] == "invalid_payload", (name, error)
        assert error["details"]["field"] == "reply_to" and error["message"].startswith("reply_to"), (name, error)
        assert error["details"]["source"] == [where]
        assert len(error["message"]) < 600, "the name is clipped, not echoed whole"
    assert by_id[after]["status"] == "completed"
    assert handler.calls and len(handler.calls) == 1, "no request with a refused reply_to ran"
    assert queue_names(dsn) == before, "nothing was created for a refused name"
    assert query(dsn, "SELECT count(*) AS n FROM pgmq.meta")[0]["n"] == len(before)


def test_payload_and_header_must_agree(harness: Harness) -> None:
    consumer = harness.consumer([ProbeHandler()])
    dsn = harness.dsn
    both = send_sql(dsn, rule(1, reply_to=SING1), {"reply_to": SING1})
    differ = send_sql(dsn, rule(2, reply_to=SING1), {"reply_to": SING2})
    drive(consumer, lambda: len(all_results(dsn, SING1)) == 1 and len(all_results(dsn, RULES_RESULTS)) == 1,
          what="two results")
    assert all_results(dsn, SING1)[0]["request"]["msg_id"] == both
    [refused] = all_results(dsn, RULES_RESULTS)
    assert refused["request"]["msg_id"] == differ and refused["error"]["details"]["field"] == "reply_to"
    assert SING2 not in queue_names(dsn)


def test_a_reply_to_queue_dropped_by_a_dba_is_created_again(harness: Harness) -> None:
    consumer = harness.consumer([ProbeHandler()])
    dsn = harness.dsn
    send_sql(dsn, rule(1, reply_to=SING1))
    drive(consumer, lambda: SING1 in queue_names(dsn) and len(all_results(dsn, SING1)) == 1, what="a first result")
    query(dsn, "SELECT pgmq.drop_queue(%s)", (SING1,))
    second = send_sql(dsn, rule(2, reply_to=SING1))
    drive(consumer, lambda: SING1 in queue_names(dsn) and len(all_results(dsn, SING1)) == 1, what="the queue again")
    assert all_results(dsn, SING1)[0]["request"]["msg_id"] == second


def test_prune_covers_reply_to_queues_and_leaves_other_queues_alone(db_dsn: str) -> None:
    for name in (SING1, "someone_elses_results_x"):
        query(db_dsn, "SELECT pgmq.create(%s)", (name,))
        query(db_dsn, f"""INSERT INTO pgmq.q_{name} (enqueued_at, vt, message)
                          SELECT now() - interval '8 days', now() - interval '8 days', '{{}}'::jsonb
                          FROM generate_series(1, 40)""")
        query(db_dsn, f"""INSERT INTO pgmq.a_{name} (msg_id, enqueued_at, archived_at, vt, message)
                          SELECT i, now() - interval '9 days', now() - interval '9 days', now(), '{{}}'::jsonb
                          FROM generate_series(1, 30) AS i""")
    query(db_dsn, f"INSERT INTO pgmq.q_{SING1} (vt, message) VALUES (now(), '{{}}'::jsonb)")   # a fresh one stays
    db = Database(db_dsn, max_size=2).open()
    try:
        report = PgRetention(db, sleep=lambda s: None).prune(RetentionPolicy(batch_size=25))
    finally:
        db.close()
    assert report.deleted[f"pgmq.q_{SING1}"] == 40 and report.deleted[f"pgmq.a_{SING1}"] == 30
    assert query(db_dsn, f"SELECT count(*) AS n FROM pgmq.q_{SING1}")[0]["n"] == 1
    assert "pgmq.q_someone_elses_results_x" not in report.deleted
    assert query(db_dsn, "SELECT count(*) AS n FROM pgmq.q_someone_elses_results_x")[0]["n"] == 40


def test_metrics_label_a_reply_to_queue_as_other() -> None:
    assert queue_label(SING1) == OTHER and queue_label(RULES_RESULTS) == RULES_RESULTS


# --- genesis send --------------------------------------------------------------------------


def genesis(dsn: str, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = admin_main(["--dsn", dsn, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def rows(dsn: str, queue: str) -> list[dict[str, Any]]:
    return query(dsn, f"SELECT message, headers FROM pgmq.q_{queue} ORDER BY msg_id")


@pytest.mark.parametrize("body, field", [
    ({"type": "genesis_rule_update", "namespace": "ns", "rule_id": "r", "rule": {}}, "confidence"),
    ({"type": "genesis_rule_update", "namespace": "ns", "rule_id": "r", "confidence": 7, "rule": {}}, "confidence"),
    ({"type": "genesis_rule_update", "namespace": "", "rule_id": "r", "confidence": 0.9, "rule": {}}, "namespace"),
    ({"namespace": "ns"}, "type"),
    ({"type": "code_execution_request", "id": "x"}, "type"),
    ({"type": "no_such_type"}, "type"),
    ({**rule(1), "reply_to": "genesis_rule_updates_dlq"}, "reply_to"),
    ({**rule(1), "reply_to": "code_execution_results_x"}, "reply_to"),
], ids=["missing", "out-of-range", "empty", "no-type", "other-queues-type", "unknown-type", "reply-to-dlq",
        "reply-to-other-family"])
def test_send_refuses_a_payload_the_consumer_would_fail(db_dsn: str, capsys: pytest.CaptureFixture[str],
                                                        body: dict[str, Any], field: str) -> None:
    code, out, err = genesis(db_dsn, capsys, "send", RULES, json.dumps(body))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and field in err and "--raw" in err, err
    assert rows(db_dsn, RULES) == []
    # --raw sends it all the same (the consumer will answer it)
    code, out, _ = genesis(db_dsn, capsys, "send", RULES, json.dumps(body), "--raw")
    assert code == 0 and int(out) >= 1
    assert [r["message"] for r in rows(db_dsn, RULES)] == [body]


def test_send_refuses_a_header_reply_to_outside_the_family(db_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = genesis(db_dsn, capsys, "send", RULES, json.dumps(rule(1)), "--header", "reply_to=genesis_rule_updates")
    assert code == 2 and "reply_to" in err and rows(db_dsn, RULES) == []


def test_send_a_valid_payload_with_headers(db_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = genesis(db_dsn, capsys, "send", RULES, json.dumps(rule(1)), "--headers",
                             json.dumps({"correlation_id": "c-1", "n": 1}), "--header", f"reply_to={SING1}",
                             "--header", "correlation_id=c-2")
    assert code == 0 and err == "" and int(out) >= 1
    assert rows(db_dsn, RULES) == [{"message": rule(1), "headers": {"correlation_id": "c-2", "n": 1,
                                                                     "reply_to": SING1}}]
    code, _, err = genesis(db_dsn, capsys, "send", RULES, json.dumps(rule(2)), "--header", "novalue")
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = genesis(db_dsn, capsys, "send", RULES, json.dumps(rule(2)), "--headers", "[1]")
    assert code == 2 and "JSON object" in err
    assert len(rows(db_dsn, RULES)) == 1


@pytest.mark.parametrize("queue, says", [
    (RULES_RESULTS, "a result queue"), ("code_execution_results", "a result queue"),
    ("genesis_rule_updates_dlq", "dead-letter queue"), (SING1, "reply_to"),
    ("someone_elses_queue", "not a queue of genesis_pgflow"), ("x'; DROP TABLE pgmq.meta; --", "not a queue"),
])
def test_send_writes_only_to_request_queues(db_dsn: str, capsys: pytest.CaptureFixture[str], queue: str,
                                            says: str) -> None:
    before = queue_names(db_dsn)
    for extra in ((), ("--raw",)):
        with pytest.raises(SystemExit) as exit_:
            admin_main(["--dsn", db_dsn, "send", queue, "{}", *extra])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and says in err and "request queue" in err, err
    assert queue_names(db_dsn) == before
    assert all(not rows(db_dsn, q) for q in before), "nothing was sent anywhere"


def test_runs_show_finds_a_result_in_the_reply_to_queue_it_went_to(harness: Harness) -> None:
    from genesis_pgflow.store.admin import PgAdminStore

    consumer = harness.consumer([ProbeHandler()])
    dsn = harness.dsn
    by_payload = send_sql(dsn, rule("p", reply_to=SING1))
    by_header = send_sql(dsn, rule("h"), {"reply_to": SING2})
    paired = send_sql(dsn, rule("q"))
    refused = send_sql(dsn, rule("r", reply_to="genesis_job_requests_results_x"))
    drive(consumer, lambda: len(all_results(dsn, SING1)) == 1 and SING2 in queue_names(dsn)
          and len(all_results(dsn, SING2)) == 1 and len(all_results(dsn, RULES_RESULTS)) == 2, what="four results")

    with Database(dsn, max_size=1).open() as db:
        admin = PgAdminStore(db)
        for msg_id, where in ((by_payload, SING1), (by_header, SING2), (paired, RULES_RESULTS),
                              (refused, RULES_RESULTS)):
            found = admin.run_history(RULES, msg_id)
            assert found is not None and found["results_queue"] == where
            assert [r["message"]["request"]["msg_id"] for r in found["results_waiting"]] == [msg_id]
