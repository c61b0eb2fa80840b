"""Routes a message by its payload type to a handler and turns a return or a raise into an Outcome."""

from __future__ import annotations

import datetime as dt
import logging
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from genesis_pgflow.errors import (
    GenesisError,
    InvalidPayload,
    MaxAttemptsExceeded,
    PermanentError,
    PreparationFailed,
    ResultNotStorable,
    UnknownType,
    WorkflowTimeout,
)
from genesis_pgflow.handlers.base import Handler, WorkContext, timeout_override
from genesis_pgflow.messages import (
    Deferred,
    Failure,
    Outcome,
    Payload,
    ReadMessage,
    new_workflow_id,
    parse_payload,
    raw_identifiers,
    reply_to,
)
from genesis_pgflow.retry import DeadLetter, decide
from genesis_pgflow.store.database import first_line, is_transient

log = logging.getLogger(__name__)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _identifiers(message: ReadMessage) -> dict[str, Any]:
    return raw_identifiers(message.body)


# a plain dataclass, as messages.ReadMessage (made for every message)
@dataclass
class Task:
    """A validated message ready to run: its handler, payload and timeout."""

    message: ReadMessage
    handler: Handler
    payload: Payload
    timeout_s: float
    workflow_id: str
    started_at: dt.datetime
    # what the request (or its handler) asked for, when a ceiling cut it to timeout_s
    requested_timeout_s: float | None = None


def clamp_timeout(requested: Any, default_s: float, ceiling_s: float | None) -> tuple[float, float | None]:
    """The timeout a run gets, and what was asked for if the ceiling cut it: a request's (or a
    handler's) timeout, else the default, never above the ceiling. Anything but a positive
    finite number asks for nothing."""
    if isinstance(requested, bool) or not isinstance(requested, (int, float)) or not 0 < requested < math.inf:
        requested = default_s
    if ceiling_s is not None and requested > ceiling_s:
        return ceiling_s, float(requested)
    return float(requested), None


class Dispatcher:
    """handlers: payload type -> handler. timeout_s is the default run timeout (--timeout-ms);
    max_timeout_s the ceiling of what a request may ask for (never below timeout_s; None: no
    ceiling), and timeout_ceilings the ceiling per payload type where a handler has a timeout
    of its own (an experiment's hour)."""

    def __init__(self, handlers: Mapping[str, Handler], *, timeout_s: float, max_attempts: int,
                 retry_base_s: float, retry_max_s: float, max_timeout_s: float | None = None,
                 timeout_ceilings: Mapping[str, float] | None = None,
                 clock: Callable[[], dt.datetime] = utcnow, rand: Callable[[], float] = random.random):
        self.handlers = dict(handlers)
        self.timeout_s = timeout_s
        self.max_timeout_s = None if max_timeout_s is None else max(max_timeout_s, timeout_s)
        self.timeout_ceilings = dict(timeout_ceilings or {})
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.clock = clock
        self.rand = rand

    def prepare(self, message: ReadMessage) -> Task | Outcome:
        """A Task to run, or at once the Outcome of a message that must not run; whatever goes
        wrong here fails this message alone (preparation_failed), never its batch."""
        started = self.clock()
        try:
            return self._prepare(message, started)
        except Exception as exc:  # noqa: BLE001 - one message's failure, never the consumer's
            log.exception("preparing %s/%s raised unexpectedly", message.queue, message.msg_id)
            error = PreparationFailed(f"an unexpected {type(exc).__name__} was raised while preparing this request "
                                      "to run; the consumer's log has the details",
                                      details={"exception": type(exc).__name__, **_identifiers(message)})
            return self._outcome(message, "failed", started, error=error)

    def _prepare(self, message: ReadMessage, started: dt.datetime) -> Task | Outcome:
        if message.problem is not None:
            # Not taken in (too large, too deep, not JSON...): failed whatever its read count,
            # since running it again would end the same way.
            problem = message.problem
            failure = Failure(problem.code, problem.message, {**_identifiers(message), **problem.details})
            return Outcome(message, "failed", started, self.clock(), error=failure)
        if message.read_ct > self.max_attempts:
            error = MaxAttemptsExceeded(
                f"read {message.read_ct} times, more than max_attempts={self.max_attempts}: "
                "a previous attempt never finished (consumer killed or lost?)",
                details={"attempts": message.read_ct, **raw_identifiers(message.body)})
            return self._outcome(message, "dead_letter", started, error=error)
        try:
            payload = parse_payload(message.body)
            reply_to(message)    # a refused reply_to fails the request before it runs
            handler = self.handlers.get(payload.type)  # type: ignore[attr-defined]
            if handler is None:
                raise UnknownType(f"type {payload.type!r} has no handler in this consumer; "  # type: ignore[attr-defined]
                                  f"available: {', '.join(sorted(self.handlers))}",
                                  details={"type": payload.type, **payload.identifiers()})  # type: ignore[attr-defined]
        except (InvalidPayload, UnknownType) as exc:
            return self._outcome(message, "failed", started, error=exc)
        own_timeout = getattr(handler, "timeout_s", None)
        if callable(own_timeout):
            timeout_s, requested = clamp_timeout(own_timeout(payload), self.timeout_s,
                                                 self.timeout_ceilings.get(payload.type, self.max_timeout_s))  # type: ignore[attr-defined]
        else:
            timeout_s, requested = clamp_timeout(timeout_override(payload), self.timeout_s, self.max_timeout_s)
        return Task(message, handler, payload, timeout_s, new_workflow_id(), started, requested)

    def context(self, task: Task, deadline: float) -> WorkContext:
        m = task.message
        return WorkContext(queue=m.queue, msg_id=m.msg_id, attempt=m.read_ct, workflow_id=task.workflow_id,
                           deadline=deadline, timeout_s=task.timeout_s)

    def execute(self, task: Task, ctx: WorkContext) -> Outcome:
        """Run the handler (in a worker thread) and classify what it did."""
        try:
            result = task.handler(task.payload, ctx)
        except PermanentError as exc:
            exc.details = {**task.payload.identifiers(), **exc.details}
            return self._outcome(task.message, "failed", task.started_at, error=exc, task=task)
        except Exception as exc:  # retryable by class, or unexpected: retried through the queue
            return self.transient(task, exc)
        if isinstance(result, Deferred):     # a state write: made by the store as it completes the message
            return self._outcome(task.message, "completed", task.started_at, task=task, deferred=result)
        if not isinstance(result, dict):
            return self.transient(task, TypeError(f"handler returned {type(result).__name__}, not a dict"))
        return self._outcome(task.message, "completed", task.started_at, result=result, task=task)

    def timed_out(self, task: Task) -> Outcome:
        details: dict[str, Any] = {"timeout_ms": round(task.timeout_s * 1000)}
        if task.requested_timeout_s is not None:
            details["requested_timeout_ms"] = round(task.requested_timeout_s * 1000)
        error = WorkflowTimeout(f"the handler ran past its timeout of {task.timeout_s:g} s"
                                + (" (the operator's maximum)" if task.requested_timeout_s is not None else ""),
                                details={**details, **task.payload.identifiers()})
        return self._outcome(task.message, "failed", task.started_at, error=error, task=task)

    def unstorable(self, outcome: Outcome, exc: BaseException) -> Outcome:
        """The same request failed instead, when the database refused to store its outcome."""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        error = ResultNotStorable(f"the outcome of this request could not be stored: {first}",
                                  details={**raw_identifiers(outcome.message.body), "outcome": outcome.kind})
        return self._outcome(outcome.message, "failed", outcome.started_at, error=error)

    def transient(self, task: Task, exc: BaseException) -> Outcome:
        """A failure that may pass: retry after a backoff, or dead-letter on the last attempt."""
        code = exc.code if isinstance(exc, GenesisError) else "internal_error"
        message = str(exc) or type(exc).__name__
        details = {**task.payload.identifiers(), "exception": type(exc).__name__,
                   **(exc.details if isinstance(exc, GenesisError) else {})}
        if is_transient(exc):       # the database went away under the handler: the loop reports outages
            log.warning("handler %s met a database error on %s/%s (%s); retried later", type(task.handler).__name__,
                        task.message.queue, task.message.msg_id, first_line(exc))
        elif not isinstance(exc, GenesisError):
            log.exception("handler %s raised unexpectedly on %s/%s", type(task.handler).__name__,
                          task.message.queue, task.message.msg_id, exc_info=exc)
        verdict = decide(task.message.read_ct, self.max_attempts, self.retry_base_s, self.retry_max_s, self.rand)
        if isinstance(verdict, DeadLetter):
            error = MaxAttemptsExceeded(f"{verdict.reason}; last error ({code}): {message}",
                                        details={**details, "last_error_code": code, "attempts": task.message.read_ct})
            return self._outcome(task.message, "dead_letter", task.started_at, error=error, task=task)
        return Outcome(task.message, "retry", task.started_at, self.clock(),
                       error=Failure(code, message, details), retry_after_s=verdict.delay_s,
                       workflow_id=task.workflow_id)

    def _outcome(self, message: ReadMessage, kind: Any, started: dt.datetime, *, error: GenesisError | None = None,
                 result: dict[str, Any] | None = None, task: Task | None = None,
                 deferred: Deferred | None = None) -> Outcome:
        failure = Failure(error.code, error.message, error.details) if error else None
        return Outcome(message, kind, started, self.clock(), result=result, error=failure,
                       workflow_id=task.workflow_id if task else new_workflow_id(), deferred=deferred)

