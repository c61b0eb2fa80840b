"""The reply_to naming rule: which result queue a request may name, and what genesis send accepts."""

import datetime as dt

import pytest

from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.errors import InvalidPayload
from genesis_pgflow.messages import (
    PGMQ_MAX_QUEUE_NAME,
    QUEUES,
    ReadMessage,
    all_queue_names,
    check_request,
    queue_role,
    reply_queue_family,
    reply_to,
    result_destination,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
RULES = "genesis_rule_updates"


def message(body, headers=None, queue=RULES):
    return ReadMessage(queue, 1, 1, T0, body, headers)


def test_every_family_owns_its_names_alone():
    for request, (_type, results) in QUEUES.items():
        name = f"{results}_sing1"
        assert reply_queue_family(name) == request
        assert result_destination(message({"reply_to": name}, queue=request)) == name
        for other, (_t, other_results) in QUEUES.items():
            if other != request:
                assert not name.startswith(f"{other_results}_")
                assert result_destination(message({"reply_to": name}, queue=other)) == other_results
    assert not any(reply_queue_family(name) for name in all_queue_names())


def test_the_longest_name_fits_pgmq():
    longest = "genesis_rule_updates_results_" + "a" * (PGMQ_MAX_QUEUE_NAME - len("genesis_rule_updates_results_"))
    assert len(longest) == 47 and reply_queue_family(longest) == RULES
    assert reply_queue_family(longest + "a") is None


def test_roles():
    assert [queue_role(n) for n in ("code_execution_requests", "code_execution_results",
                                    "code_execution_requests_dlq", "code_execution_results_sing1", "other")] == \
        ["request", "result", "dead_letter", "reply_to", None]


def test_where_a_reply_to_is_given_and_what_wins():
    assert reply_to(message({"n": 1})) is None
    assert reply_to(message({"reply_to": None})) is None
    assert reply_to(message({"reply_to": "genesis_rule_updates_results"})) is None       # the paired queue
    assert reply_to(message({}, {"reply_to": "genesis_rule_updates_results_a"})) == "genesis_rule_updates_results_a"
    assert reply_to(message("not an object", ["not", "an", "object"])) is None
    agree = "genesis_rule_updates_results_a"
    assert reply_to(message({"reply_to": agree}, {"reply_to": agree})) == agree
    with pytest.raises(InvalidPayload) as refused:
        reply_to(message({"reply_to": agree, "rule_id": "r7"}, {"reply_to": "genesis_rule_updates_results_b"}))
    assert refused.value.details["field"] == "reply_to" and refused.value.details["rule_id"] == "r7"
    assert refused.value.details["source"] == ["payload", "headers"]


def test_a_refused_reply_to_fails_the_request_before_its_handler_runs():
    ran = []
    dispatcher = Dispatcher({"genesis_rule_update": lambda payload, ctx: ran.append(payload) or {}},
                            timeout_s=1, max_attempts=3, retry_base_s=1, retry_max_s=1)
    body = {"type": "genesis_rule_update", "namespace": "ns", "rule_id": "r", "confidence": 0.9, "rule": {},
            "reply_to": "genesis_rule_updates_dlq"}
    outcome = dispatcher.prepare(message(body))
    assert outcome.kind == "failed" and outcome.error.code == "invalid_payload"
    assert outcome.error.details["field"] == "reply_to" and outcome.error.details["rule_id"] == "r"
    assert result_destination(outcome.message) == "genesis_rule_updates_results"
    assert ran == []


def test_check_request_is_the_consumers_check_and_the_queues_type():
    good = {"type": "genesis_rule_update", "namespace": "ns", "rule_id": "r", "confidence": 0.9, "rule": {}}
    assert check_request(RULES, good).identifiers()["rule_id"] == "r"
    with pytest.raises(InvalidPayload, match="^type: 'code_execution_request' is not the type of"):
        check_request(RULES, {"type": "code_execution_request"})
    with pytest.raises(InvalidPayload, match="^reply_to"):
        check_request(RULES, good, {"reply_to": "code_execution_results_x"})
