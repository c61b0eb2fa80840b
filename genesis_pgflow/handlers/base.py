"""What a handler is: a callable from a validated payload and a work context to a result dict."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from genesis_pgflow.errors import WorkflowTimeout
from genesis_pgflow.messages import Deferred, Payload

_LAZY = threading.Lock()


class LazyEvent(threading.Event):
    """A threading.Event whose Condition is made only when someone waits on it. Every message
    has two events (its run's cancel, its job's return) that almost nobody waits on, and making
    their Conditions was a sixth of the consumer loop's time on a batch of rule updates."""

    def __init__(self) -> None:  # no super().__init__(): that makes the Condition
        self._set = False
        self._event: threading.Event | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True            # before looking for a waiter's event (see wait)
        event = self._event
        if event is not None:
            event.set()

    def clear(self) -> None:
        with _LAZY:
            self._set = False
            if self._event is not None:
                self._event.clear()

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        with _LAZY:
            if self._event is None:
                self._event = threading.Event()
            if self._set:           # set() ran before the event existed
                self._event.set()
        return self._event.wait(timeout)


@dataclass
class WorkContext:
    """Handed to a handler with each payload.

    Timeouts are cooperative: `deadline` is a time.monotonic() value and `cancelled` is set
    when the consumer has given up on the run (timeout or shutdown). Work that must be
    killable runs in a subprocess bounded by `remaining()`.
    """

    queue: str
    msg_id: int
    attempt: int
    workflow_id: str
    deadline: float
    cancelled: threading.Event = field(default_factory=LazyEvent)
    monotonic: Callable[[], float] = time.monotonic
    # the run's effective timeout: what the request asked for, cut to the operator's maximum
    timeout_s: float | None = None

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - self.monotonic())

    def check(self) -> None:
        """Raise WorkflowTimeout if the run was cancelled or its deadline has passed."""
        if self.cancelled.is_set() or self.remaining() <= 0:
            raise WorkflowTimeout()


class Handler(Protocol):
    """One payload type's workflow.

    Return the result object (contract section 5), or a messages.Deferred whose write the store
    makes in the message's completion transaction (a handler whose work is a database write);
    raise a PermanentError subclass for a failure that will not go away, a RetryableError for one
    that may. The deadline is the
    handler's own `timeout_s(payload)` if it has that method (an experiment's hour), else the
    payload's `timeout_ms` if it has one, else the consumer's --timeout-ms; either of the first
    two is cut to the operator's maximum (--max-timeout-ms, --max-experiment-timeout-ms).

    A handler with `inline = True` promises that it only works out a Deferred from its payload,
    in microseconds, with no I/O: the consumer runs it on its own thread as it reads the message,
    sparing the hand-off to a worker and back (most of the cost of a rule update). Its deadline
    is looked at when it returns. Anything that may block or take long must not be inline.
    """

    payload_type: str

    def __call__(self, payload: Any, ctx: WorkContext) -> dict[str, Any] | Deferred: ...


def timeout_override(payload: Payload) -> float | None:
    """The per-request timeout a payload asks for, in seconds, if any."""
    # a pydantic model's fields are in its __dict__; getattr on a missing one raises inside
    # pydantic first, which costs more than the rest of a rule update's preparation
    fields = getattr(payload, "__dict__", None)
    timeout_ms = fields.get("timeout_ms") if fields is not None else getattr(payload, "timeout_ms", None)
    return timeout_ms / 1000.0 if timeout_ms else None
