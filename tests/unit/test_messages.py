"""The wire model: validation errors name the field, unknown types, secrets, the envelope."""

import datetime as dt

import pytest

from genesis_pgflow.errors import InvalidPayload, UnknownType
from genesis_pgflow.messages import (
    REDACTED,
    CodeExecutionRequest,
    ExperimentRequest,
    Failure,
    LlmConfigUpdate,
    Outcome,
    ReadMessage,
    RuleUpdate,
    all_queue_names,
    envelope,
    parse_payload,
    redact,
)

RULE = {"type": "genesis_rule_update", "namespace": "ns", "rule_id": "r1", "version": 2, "confidence": 0.9,
        "rule": {"when": "x"}}


def test_each_type_parses_to_its_model_and_extra_fields_are_ignored():
    assert isinstance(parse_payload({**RULE, "extra": 1}), RuleUpdate)
    assert isinstance(parse_payload({"type": "genesis_llm_config_update", "provider": "claude",
                                     "complexity": "simple", "models": ["m"]}), LlmConfigUpdate)
    assert isinstance(parse_payload({"type": "code_execution_request", "id": "c", "code": "x = 1",
                                     "language": "python", "analysis_type": "quality"}), CodeExecutionRequest)
    exp = parse_payload({"type": "genesis_experiment_request", "experiment_id": "e1", "instance_id": "i",
                         "experiment_type": "t", "description": "d", "risk_level": "low", "repo": "/r",
                         "changes": {"patch": "diff"}})
    assert isinstance(exp, ExperimentRequest) and exp.base_ref == "HEAD"


@pytest.mark.parametrize("body, field, words", [
    ({**RULE, "confidence": 1.5}, "confidence", "less than or equal to 1"),
    ({**RULE, "version": 0}, "version", "greater than or equal to 1"),
    ({k: v for k, v in RULE.items() if k != "rule_id"}, "rule_id", "Field required"),
    ({"type": "genesis_llm_config_update", "provider": "p", "complexity": "huge", "models": ["m"]},
     "complexity", "'simple', 'medium' or 'complex'"),
    ({"type": "genesis_llm_config_update", "provider": "p", "complexity": "simple", "models": []},
     "models", "at least 1 item"),
    ({"type": "code_execution_request", "id": "c", "code": "x" * (1024 * 1024 + 1), "language": "python",
      "analysis_type": "quality"}, "code", "at most 1048576 bytes"),
    ({"type": "genesis_experiment_request", "experiment_id": "../evil", "instance_id": "i", "experiment_type": "t",
      "description": "d", "risk_level": "low", "repo": "/r", "changes": {"patch": "x"}}, "experiment_id", "pattern"),
    ({"type": "genesis_experiment_request", "experiment_id": "e", "instance_id": "i", "experiment_type": "t",
      "description": "d", "risk_level": "low", "repo": "/r", "changes": {}}, "changes", "exactly one of"),
])
def test_invalid_payload_names_the_field_and_the_problem(body, field, words):
    with pytest.raises(InvalidPayload) as info:
        parse_payload(body)
    assert info.value.message.startswith(field) or f"; {field}" in info.value.message
    assert words in info.value.message
    assert field in info.value.details["fields"][0]


def test_invalid_payload_keeps_identifiers_for_correlation():
    with pytest.raises(InvalidPayload) as info:
        parse_payload({"type": "code_execution_request", "id": "job-7"})
    assert info.value.details["id"] == "job-7"


@pytest.mark.parametrize("body", [[1, 2], "text", 42, None])
def test_non_object_is_invalid(body):
    with pytest.raises(InvalidPayload, match="must be a JSON object"):
        parse_payload(body)


def test_missing_type_is_invalid_and_unknown_type_is_its_own_error():
    with pytest.raises(InvalidPayload, match="type: field required"):
        parse_payload({"rule_id": "x"})
    with pytest.raises(UnknownType, match="'nope' has no handler"):
        parse_payload({"type": "nope", "rule_id": "r9"})


def test_redact_hides_secret_named_fields_at_any_depth():
    value = {"settings": {"api_key": "sk-1", "nested": [{"Auth_Token": "t"}], "temperature": 0.2},
             "password": "p", "client_secret": "s"}
    assert redact(value) == {"settings": {"api_key": REDACTED, "nested": [{"Auth_Token": REDACTED}],
                                          "temperature": 0.2}, "password": REDACTED, "client_secret": REDACTED}


def test_twelve_queues():
    names = all_queue_names()
    assert len(names) == len(set(names)) == 12
    assert "code_execution_results" in names and "code_execution_requests_dlq" in names


def test_envelope_of_a_failure_and_of_a_success():
    t0 = dt.datetime(2026, 11, 21, 10, 0, tzinfo=dt.timezone.utc)
    msg = ReadMessage("genesis_rule_updates", 42, 2, t0, RULE)
    failed = Outcome(msg, "failed", t0, t0 + dt.timedelta(milliseconds=42),
                     error=Failure("low_confidence", "too low", {"rule_id": "r1", "token": "x"}))
    env = envelope(failed, "host:1")
    assert env["request"] == {"queue": "genesis_rule_updates", "msg_id": 42, "type": "genesis_rule_update",
                              "attempt": 2}
    assert env["status"] == "failed" and env["result"] is None
    assert env["error"] == {"code": "low_confidence", "message": "too low",
                            "details": {"rule_id": "r1", "token": REDACTED}}
    assert env["execution_ms"] == 42.0 and env["consumer"] == "host:1"
    assert env["started_at"] == "2026-11-21T10:00:00.000000+00:00"
    done = Outcome(msg, "completed", t0, t0, result={"status": "applied", "api_key": "k"})
    assert envelope(done, "h")["result"] == {"status": "applied", "api_key": REDACTED}
    assert envelope(done, "h")["error"] is None


def test_nul_characters_which_jsonb_cannot_hold_are_replaced():
    t0 = dt.datetime(2026, 11, 21, 10, 0, tzinfo=dt.timezone.utc)
    msg = ReadMessage("code_execution_requests", 1, 1, t0, {"type": "code_execution_request"})
    done = Outcome(msg, "completed", t0, t0, result={"output": "a\x00b", "k\x00": ["\x00"]})
    assert envelope(done, "h")["result"] == {"output": "a\ufffdb", "k\ufffd": ["\ufffd"]}
    failed = Outcome(msg, "failed", t0, t0, error=Failure("x", "bad \x00 byte"))
    assert envelope(failed, "h")["error"]["message"] == "bad \ufffd byte"
