"""The dispatcher: timeouts clamped to the operator's maxima, messages that were not taken in, and
anything raised while preparing a message fail that message alone."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pytest

from genesis_pgflow.dispatcher import Dispatcher, Task, clamp_timeout
from genesis_pgflow.errors import InvalidPayload, PayloadTooLarge
from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.messages import Outcome, ReadMessage

T0 = dt.datetime(2026, 11, 21, 10, 0, tzinfo=dt.timezone.utc)
CODE = {"type": "code_execution_request", "id": "job-1", "code": "x = 1", "language": "python",
        "analysis_type": "quality"}
EXPERIMENT = {"type": "genesis_experiment_request", "experiment_id": "e1", "instance_id": "i1",
              "experiment_type": "t", "description": "d", "risk_level": "low", "repo": "/r",
              "changes": {"patch": "diff"}}


class Echo:
    """A handler of code execution requests that returns its context's timeout."""

    payload_type = "code_execution_request"

    def __call__(self, payload: Any, ctx: WorkContext) -> dict[str, Any]:
        return {"timeout_s": ctx.timeout_s}


class OwnTimeout:
    """A handler with a timeout of its own, as ExperimentRunner has (the request's, else an hour)."""

    payload_type = "genesis_experiment_request"

    def __init__(self, explode: bool = False):
        self.explode = explode

    def timeout_s(self, payload: Any) -> float:
        if self.explode:
            raise OverflowError("int too large to convert to float")
        return (payload.timeout_ms or 3_600_000) / 1000.0

    def __call__(self, payload: Any, ctx: WorkContext) -> dict[str, Any]:
        return {}


def dispatcher(**options: Any) -> Dispatcher:
    handlers = options.pop("handlers", [Echo(), OwnTimeout()])
    settings = {"timeout_s": 30.0, "max_attempts": 3, "retry_base_s": 1.0, "retry_max_s": 10.0,
                "max_timeout_s": 300.0, "timeout_ceilings": {"genesis_experiment_request": 3600.0},
                "clock": lambda: T0, **options}
    return Dispatcher({h.payload_type: h for h in handlers}, **settings)


def prepared(d: Dispatcher, body: Any, read_ct: int = 1, **message: Any) -> Task | Outcome:
    return d.prepare(ReadMessage("code_execution_requests", 7, read_ct, T0, body, **message))


def task(d: Dispatcher, body: Any) -> Task:
    result = prepared(d, body)
    assert isinstance(result, Task), result
    return result


@pytest.mark.parametrize("timeout_ms, effective_s, requested_s", [
    (None, 30.0, None),                    # the operator's default
    (60_000, 60.0, None),                  # a request may ask for more than the default...
    (300_000, 300.0, None),
    (300_001, 300.0, 300.001),             # ...but not more than the maximum
    (10**10, 300.0, 10**7),                # the attack: 1e10 ms
    (10**90, 300.0, 10**87),
])
def test_a_request_timeout_is_clamped_to_the_operator_maximum(timeout_ms, effective_s, requested_s):
    d = dispatcher()
    t = task(d, {**CODE, "timeout_ms": timeout_ms} if timeout_ms is not None else CODE)
    assert t.timeout_s == effective_s
    assert t.requested_timeout_s == (None if requested_s is None else pytest.approx(requested_s))
    assert d.context(t, deadline=0.0).timeout_s == effective_s


def test_1e10_as_a_json_number_is_clamped_too_not_an_internal_error():
    t = task(dispatcher(), {**CODE, "timeout_ms": 1e10})
    assert t.timeout_s == 300.0


@pytest.mark.parametrize("timeout_ms", [-1, 0, 1.5, "soon", [1], {"ms": 1}])
def test_a_timeout_that_is_no_positive_integer_is_invalid_payload(timeout_ms):
    outcome = prepared(dispatcher(), {**CODE, "timeout_ms": timeout_ms})
    assert isinstance(outcome, Outcome) and outcome.kind == "failed"
    assert outcome.error is not None and outcome.error.code == "invalid_payload"
    assert "timeout_ms" in outcome.error.message and outcome.error.details["id"] == "job-1"


def test_the_maximum_is_never_below_the_operator_default():
    t = task(dispatcher(timeout_s=600.0, max_timeout_s=300.0), {**CODE, "timeout_ms": 900_000})
    assert t.timeout_s == 600.0 and t.requested_timeout_s == 900.0


def test_no_maximum_leaves_request_timeouts_as_they_are():
    assert task(dispatcher(max_timeout_s=None), {**CODE, "timeout_ms": 900_000}).timeout_s == 900.0


def test_a_handler_timeout_of_its_own_is_clamped_to_the_ceiling_of_its_type():
    d = dispatcher()
    assert task(d, EXPERIMENT).timeout_s == 3600.0
    assert task(d, {**EXPERIMENT, "timeout_ms": 120_000}).timeout_s == 120.0
    clamped = task(d, {**EXPERIMENT, "timeout_ms": 10**10})
    assert clamped.timeout_s == 3600.0 and clamped.requested_timeout_s == 10**7
    # a type without a ceiling of its own gets the general maximum
    assert task(dispatcher(timeout_ceilings={}), {**EXPERIMENT, "timeout_ms": 10**10}).timeout_s == 300.0


def test_a_timeout_says_the_effective_timeout_and_what_was_asked():
    d = dispatcher()
    error = d.timed_out(task(d, {**CODE, "timeout_ms": 10**10})).error
    assert error is not None and error.code == "timeout"
    assert error.details == {"timeout_ms": 300_000, "requested_timeout_ms": 10**10, "id": "job-1"}
    assert "operator's maximum" in error.message
    plain = d.timed_out(task(d, CODE)).error
    assert plain is not None and plain.details == {"timeout_ms": 30_000, "id": "job-1"}


@pytest.mark.parametrize("requested", [math.inf, -math.inf, math.nan, -5, 0, True, "60", None])
def test_clamp_timeout_takes_the_default_for_anything_but_a_positive_finite_number(requested):
    assert clamp_timeout(requested, 30.0, 300.0) == (30.0, None)


def test_a_message_that_was_not_taken_in_fails_with_its_problem_whatever_its_read_count():
    d = dispatcher()
    too_large = PayloadTooLarge("payload is 62914560 bytes of JSON; at most 2097152 bytes are accepted",
                                details={"field": "payload", "size_bytes": 62914560, "limit_bytes": 2097152})
    for read_ct in (1, 3, 10):
        outcome = prepared(d, None, read_ct=read_ct, problem=too_large)
        assert isinstance(outcome, Outcome) and outcome.kind == "failed"
        assert outcome.error is not None and outcome.error.code == "payload_too_large"
        assert outcome.error.details["size_bytes"] == 62914560
    bad_headers = InvalidPayload("headers is nested 100 levels deep; at most 64 are accepted",
                                 details={"field": "headers"})
    outcome = prepared(d, CODE, problem=bad_headers)
    assert isinstance(outcome, Outcome) and outcome.error is not None
    assert outcome.error.code == "invalid_payload" and outcome.error.details == {"field": "headers", "id": "job-1"}


def test_anything_raised_while_preparing_fails_that_message_alone(caplog):
    d = dispatcher(handlers=[Echo(), OwnTimeout(explode=True)])
    outcome = prepared(d, EXPERIMENT)
    assert isinstance(outcome, Outcome) and outcome.kind == "failed"
    assert outcome.error is not None and outcome.error.code == "preparation_failed"
    assert outcome.error.details == {"exception": "OverflowError", "experiment_id": "e1", "instance_id": "i1"}
    assert "preparing code_execution_requests/7 raised unexpectedly" in caplog.text
    # the next message is prepared as usual
    assert isinstance(prepared(d, CODE), Task)


class LosesTheDatabase:
    payload_type = "code_execution_request"

    def __call__(self, payload: Any, ctx: WorkContext) -> dict[str, Any]:
        import psycopg

        raise psycopg.OperationalError("server closed the connection unexpectedly\n\tThis probably means...")


def test_a_handler_meeting_a_database_outage_is_retried_with_one_line_and_no_traceback(caplog):
    d = dispatcher(handlers=[LosesTheDatabase()], rand=lambda: 0.0)
    t = task(d, CODE)
    outcome = d.execute(t, d.context(t, deadline=math.inf))
    assert outcome.kind == "retry" and outcome.error is not None and outcome.error.code == "internal_error"
    [record] = [r for r in caplog.records if r.name == "genesis_pgflow.dispatcher"]
    assert record.levelname == "WARNING" and record.exc_info is None
    assert "server closed the connection unexpectedly" in record.getMessage()
    assert "\n" not in record.getMessage()
