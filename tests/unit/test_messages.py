"""The wire model: validation errors name the field, unknown types, secrets, the envelope, and intake
(each message decoded on its own, within limits)."""

import datetime as dt
import json

import pytest

from genesis_pgflow.errors import InvalidPayload, PayloadTooLarge, UnknownType
from genesis_pgflow.messages import (
    REDACTED,
    CodeExecutionRequest,
    ExperimentRequest,
    Failure,
    IntakeLimits,
    LlmConfigUpdate,
    Outcome,
    ReadMessage,
    RuleUpdate,
    all_queue_names,
    decode_json,
    envelope,
    parse_payload,
    raw_identifiers,
    redact,
    take_in,
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


def test_thirteen_queues():
    names = all_queue_names()
    assert len(names) == len(set(names)) == 13
    assert names[-1] == "genesis_reports"
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


# --- intake: each message decoded on its own, within limits --------------------------------

LIMITS = IntakeLimits()


def _decode_fails(text: str, limits: IntakeLimits = LIMITS) -> InvalidPayload:
    with pytest.raises(InvalidPayload) as info:
        decode_json(text, limits)
    return info.value


@pytest.mark.parametrize("text", [
    "[" * 10_000 + "]" * 10_000,
    '{"a":' * 10_000 + "1" + "}" * 10_000,
    '{"a": [' * 5_000 + "]}" * 5_000,
    "[" * 100_000,                          # deep and not even closed
])
def test_deep_nesting_is_refused_before_decoding_with_the_depth_and_the_limit(text):
    error = _decode_fails(text)
    assert error.code == "invalid_payload"
    assert "levels deep; at most 64 are accepted" in error.message
    assert error.details["depth"] >= 10_000 and error.details["limit_depth"] == 64


def test_nesting_up_to_the_limit_decodes_and_brackets_inside_strings_do_not_count():
    assert decode_json("[" * 64 + "]" * 64, LIMITS) is not None
    _decode_fails("[" * 65 + "]" * 65)
    assert decode_json('{"code": "' + "[{" * 5_000 + '\\"[[["}', LIMITS) == {"code": "[{" * 5_000 + '"[[['}


@pytest.mark.parametrize("number", ["9" * 5_000, "-" + "1" * 5_000, "1." + "0" * 5_000, "1e" + "9" * 5_000])
def test_a_long_number_is_refused_naming_its_length(number):
    error = _decode_fails('{"type": "genesis_rule_update", "version": ' + number + "}")
    assert "holds a number of" in error.message and "at most 100 are accepted" in error.message
    assert error.details["number_length"] == len(number)


def test_digits_inside_strings_are_not_numbers():
    assert decode_json('{"id": "' + "9" * 5_000 + '"}', LIMITS) == {"id": "9" * 5_000}


def test_a_huge_body_is_too_large_before_anything_is_decoded():
    text = '{"code": "' + "x" * (3 * 1024 * 1024) + '"}'
    with pytest.raises(PayloadTooLarge) as info:
        decode_json(text, LIMITS)
    assert info.value.code == "payload_too_large"
    assert info.value.details == {"field": "payload", "size_bytes": len(text), "limit_bytes": 2 * 1024 * 1024}
    assert f"{len(text)} bytes" in info.value.message
    # the size is in UTF-8 bytes, not characters
    with pytest.raises(PayloadTooLarge):
        decode_json('"' + "é" * 600 + '"', IntakeLimits(max_payload_bytes=1_000))


@pytest.mark.parametrize("text, words", [
    ('{"a": "\\u0000"}', "NUL"),
    ('{"\\u0000": 1}', "NUL"),
    ('["\\ud800"]', "lone surrogate (\\ud800)"),
    ('{"x": "\\udc00 tail"}', "lone surrogate (\\udc00)"),
    ('{"x": "\\uDFFF"}', "lone surrogate (\\udfff)"),
    ('{"x": "\\uDbFf", "y": "\\u00e9"}', "lone surrogate (\\udbff)"),
    ('{"x": ["ok", {"deep": "\\u0000"}]}', "NUL"),
    ("[NaN]", "NaN is not a JSON number"),
    ('{"n": Infinity}', "Infinity is not a JSON number"),
    ("[-Infinity]", "-Infinity is not a JSON number"),
    ("[1e999]", "out of range"),
    ('{"a": 1', "not valid JSON"),
    ('"' + '\\"' * 50_000 + "\\", "not valid JSON"),   # unterminated, full of escaped quotes
    ("", "not valid JSON"),
    ("\x00", "not valid JSON"),
])
def test_what_json_or_postgresql_cannot_hold_is_invalid_naming_the_problem(text, words):
    assert words in _decode_fails(text).message


@pytest.mark.parametrize("text", ['{"a": "\\u00e9\\u20ac"}', '{"a": "\\\\u0000"}', '{"a": "\\ud83d\\ude00"}',
                                  '{"a": "\\\\ud800"}'])
def test_escapes_that_only_look_unstorable_decode(text):
    """The text is looked at first (a body with no \\u0000 or \\udXXX escape is not walked); an
    escaped backslash or a surrogate pair is not a NUL or a lone surrogate."""
    assert decode_json(text, LIMITS) == json.loads(text)


def test_valid_json_decodes_to_the_same_value_as_json_loads():
    text = '{"type": "t", "emoji": "\\ud83d\\ude00", "list": [1, -2.5e3, true, false, null], "s": "a\\"b"}'
    assert decode_json(text, LIMITS) == {"type": "t", "emoji": "\U0001F600", "list": [1, -2500.0, True, False, None],
                                         "s": 'a"b'}


def test_take_in_turns_every_problem_into_the_message_never_an_exception():
    t0 = dt.datetime(2026, 11, 21, 10, 0, tzinfo=dt.timezone.utc)
    good = take_in("q", 1, 1, t0, body=json.dumps(RULE), body_bytes=None, limits=LIMITS)
    assert good.body == RULE and good.problem is None and good.headers is None
    deep = take_in("q", 2, 1, t0, body="[" * 9_999 + "]" * 9_999, body_bytes=None, limits=LIMITS)
    assert deep.body is None and deep.problem is not None and deep.problem.code == "invalid_payload"
    unread = take_in("q", 3, 1, t0, body=None, body_bytes=60 * 1024 * 1024, limits=LIMITS)
    assert unread.problem is not None and unread.problem.code == "payload_too_large"
    assert unread.problem.details["size_bytes"] == 60 * 1024 * 1024
    bad_headers = take_in("q", 4, 1, t0, body=json.dumps(RULE), body_bytes=None,
                          headers='{"correlation_id": ' + "1" * 500 + "}", headers_bytes=None, limits=LIMITS)
    assert bad_headers.body == RULE and bad_headers.problem is not None
    assert bad_headers.problem.details["field"] == "headers"
    big_headers = take_in("q", 5, 1, t0, body="{}", body_bytes=2, headers=None, headers_bytes=10**6, limits=LIMITS)
    assert big_headers.problem is not None and big_headers.problem.code == "payload_too_large"
    assert "headers is 1000000 bytes" in big_headers.problem.message
    headers = take_in("q", 6, 1, t0, body="{}", body_bytes=2, headers='{"correlation_id": "c-1"}',
                      headers_bytes=25, limits=LIMITS)
    assert headers.headers == {"correlation_id": "c-1"} and headers.problem is None


def test_echoed_identifiers_and_types_stay_bounded():
    long_id = "x" * 10_000
    assert raw_identifiers({"id": long_id, "rule_id": "r1"}) == {"rule_id": "r1"}
    with pytest.raises(UnknownType) as info:
        parse_payload({"type": "t" * 100_000})
    assert len(info.value.message) < 500 and len(info.value.details["type"]) < 200
    with pytest.raises(InvalidPayload, match="id: String should have at most 256 characters"):
        parse_payload({"type": "code_execution_request", "id": long_id, "code": "", "language": "python",
                       "analysis_type": "quality"})
    t0 = dt.datetime(2026, 11, 21, 10, 0, tzinfo=dt.timezone.utc)
    assert ReadMessage("q", 1, 1, t0, {"type": "t" * 129}).type is None
    assert ReadMessage("q", 1, 1, t0, {"type": "genesis_rule_update"}).type == "genesis_rule_update"


def test_a_body_too_large_to_fetch_echoes_the_short_identifiers_the_database_picked_out():
    t0 = dt.datetime(2026, 11, 21, 10, 0, tzinfo=dt.timezone.utc)
    unread = take_in("q", 1, 1, t0, body=None, body_bytes=60 * 1024 * 1024, limits=LIMITS,
                     identifiers=json.dumps({"rule_id": "big-1", "id": "x" * 300, "namespace": "ns"}))
    assert unread.problem is not None and unread.problem.details == {
        "rule_id": "big-1", "namespace": "ns", "field": "payload", "size_bytes": 60 * 1024 * 1024,
        "limit_bytes": 2 * 1024 * 1024}
    broken = take_in("q", 2, 1, t0, body=None, body_bytes=10**8, limits=LIMITS, identifiers="[" * 100)
    assert broken.problem is not None and broken.problem.code == "payload_too_large"


def test_a_payload_with_many_bad_items_reports_the_first_few_problems_only():
    with pytest.raises(InvalidPayload) as info:
        parse_payload({"type": "genesis_llm_config_update", "provider": "p", "complexity": "simple",
                       "models": [""] * 10_000})
    assert len(info.value.details["errors"]) == len(info.value.details["fields"]) == 20
    assert info.value.details["fields"][0] == "models.0"
    assert info.value.message.endswith("; and 9980 more problem(s)") and len(info.value.message) < 2_000


def test_workflow_ids_are_distinct_version_4_uuids():
    import uuid

    from genesis_pgflow.messages import new_workflow_id

    ids = [new_workflow_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 4 and uuid.UUID(i).variant == uuid.RFC_4122 and str(uuid.UUID(i)) == i
               for i in ids)


def test_redacting_keeps_no_hostile_field_name_in_memory():
    """Secret-looking field names are remembered to spare the regex, but only short ones: 40
    requests with a distinct field name of a megabyte each must leave nothing behind."""
    import gc
    import tracemalloc

    from genesis_pgflow.messages import redact

    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40):
            name = f"{i:02d}" + "x" * 1_000_000
            assert redact({name: 1, "api_key": "sk"}) == {name: 1, "api_key": "[redacted]"}
            del name
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 4_000_000, f"{kept} bytes kept after redacting 40 MB of field names"
