"""The completer: writes finished outcomes, many to a transaction, while the loop reads on.

Final outcomes (completed, failed, dead letter) go to QueueStore.complete, which publishes each
result, archives each request and records each run in one transaction; retries go to
QueueStore.retry. An outcome waits at most flush_after_s for others to share its transaction;
with nothing left running it is written at once. A transaction carries up to write_most()
final outcomes (two batches, at least 100): when the database falls behind the reads, the
outcomes of several reads share one commit (its round trips and its WAL flush), and the
completer catches up.

While the consumer runs, the completer has a thread of its own (start()), so that the write of
one batch overlaps the read and the work of the next, as River's batch completer does. Without
it (tests that turn the loop by hand, and shutdown) the loop calls flush() itself.

The database being away is the outage's business: a write that fails for a transient reason
keeps its outcomes, backs off and tries again; the outage's budget, or a bug (a non-transient
error), ends the consumer through `failure`, which the loop raises."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.errors import DatabaseUnavailable
from genesis_pgflow.messages import Outcome, clip
from genesis_pgflow.store.database import StoreError, is_transient
from genesis_pgflow.store.queue import QueueStore

from .outage import Outage

log = logging.getLogger(__package__)


@dataclass
class Stats:
    outcomes: Counter = field(default_factory=Counter)   # kind -> count
    by_type: Counter = field(default_factory=Counter)    # (type, status) -> count
    store_errors: int = 0


# Most final outcomes in one transaction: two batches (--batch-size), and at least WRITE_AT_LEAST.
# A completion costs the same round trips for 10 outcomes as for 100, so at a small batch size a
# cap of two batches left the completer behind the reads (at the defaults, batch 10, a drain of
# rule updates ran 1.26x faster with 100: medians of 3 interleaved rounds).
WRITE_BATCHES = 2
WRITE_AT_LEAST = 100


def write_most(batch_size: int) -> int:
    """The most final outcomes one completion transaction carries."""
    return max(WRITE_BATCHES * batch_size, WRITE_AT_LEAST)


class Completer:
    """Holds finished outcomes until they are due, then stores them (see the module docstring)."""

    def __init__(self, store: QueueStore, dispatcher: Dispatcher, outage: Outage, *, batch_size: int,
                 flush_after_s: float, monotonic: Callable[[], float], on_written: Callable[[], None],
                 more_coming: Callable[[], bool] = lambda: True):
        self.store = store
        self.dispatcher = dispatcher
        self.outage = outage
        self.batch_size = batch_size
        self.flush_after_s = flush_after_s
        self.monotonic = monotonic
        self.on_written = on_written       # wakes the loop: room for more reads, or drained
        self.more_coming = more_coming     # False: nothing runs, so waiting for company is pointless
        self.stats = Stats()
        # called with the outcomes stored (results written, retries scheduled): the metrics
        self.observers: list[Callable[[Sequence[Outcome]], None]] = []
        self.failure: BaseException | None = None     # what ended the thread; the loop raises it
        self.failing = False            # the last write on the thread failed (the outage is not over)
        self._cond = threading.Condition()
        self._finals: list[Outcome] = []
        self._retries: list[Outcome] = []
        self._writing: list[Outcome] = []       # taken by the write under way
        self._since = 0.0                       # when the oldest waiting outcome arrived
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- what the loop sees ----------------------------------------------------------------

    def add(self, outcomes: Sequence[Outcome]) -> None:
        if not outcomes:
            return
        with self._cond:
            if not self._finals and not self._retries:
                self._since = self.monotonic()
            for outcome in outcomes:
                (self._retries if outcome.kind == "retry" else self._finals).append(outcome)
            self._cond.notify()

    def held(self) -> list[Outcome]:
        """Outcomes not yet stored (waiting or being written): their messages' leases are kept."""
        with self._cond:
            return self._writing + self._finals + self._retries

    def backlog(self) -> int:
        with self._cond:
            return len(self._writing) + len(self._finals) + len(self._retries)

    @property
    def retries(self) -> list[Outcome]:
        with self._cond:
            return list(self._retries)

    def due_in(self) -> float:
        """Seconds until what waits is due to be written (inf: nothing waits)."""
        with self._cond:
            if not self._finals and not self._retries:
                return float("inf")
            if self._due_locked():
                return 0.0
            return max(0.0, self._since + self.flush_after_s - self.monotonic())

    # --- writing ---------------------------------------------------------------------------

    def flush(self, *, now: bool = False) -> bool:
        """Write what is due (everything waiting, with now=True), up to a batch of each kind.
        True if something was written. A transient failure keeps what was not stored (the
        exception propagates: the caller backs off)."""
        with self._cond:
            if self._writing or not (self._finals or self._retries):
                return False
            if not now and not self._due_locked():
                return False
            most = write_most(self.batch_size)
            finals, self._finals = self._finals[:most], self._finals[most:]
            retries, self._retries = self._retries[:self.batch_size], self._retries[self.batch_size:]
            self._writing = finals + retries
        stored_finals = stored_retries = False
        try:
            applied = self._complete(finals) if finals else []
            stored_finals = True
            with self._cond:
                self._writing = list(retries)
            self._count(applied)
            if retries:
                self.store.retry(retries)
                self._count(retries)
            stored_retries = True
        finally:
            with self._cond:
                # what was not stored goes back to the front, due at once
                if not stored_finals:
                    self._finals = finals + self._finals
                if not stored_retries:
                    self._retries = retries + self._retries
                if not (stored_finals and stored_retries):
                    self._since = self.monotonic() - self.flush_after_s
                self._writing = []
        self.on_written()
        return True

    def _due_locked(self) -> bool:
        waiting = len(self._finals) + len(self._retries)
        return (waiting >= self.batch_size or not self.more_coming()
                or self.monotonic() - self._since >= self.flush_after_s)

    def _complete(self, finals: list[Outcome]) -> list[Outcome]:
        try:
            applied = self.store.complete(finals)
        except StoreError as exc:
            if is_transient(exc):
                raise
            applied = self._complete_one_by_one(finals, exc)
        if len(applied) != len(finals):
            log.warning("%d message(s) were finished elsewhere (lease lost); their results were not sent",
                        len(finals) - len(applied))
        return applied

    def _complete_one_by_one(self, finals: list[Outcome], batch_error: Exception) -> list[Outcome]:
        """A batch the database refused (not an outage): find the outcome it refuses and answer
        that request with a failure it can store, so one bad result never blocks the others."""
        log.error("the database refused a batch of %d outcome(s) (%s); completing them one by one",
                  len(finals), batch_error)
        applied: list[Outcome] = []
        for outcome in finals:
            try:
                applied += self.store.complete([outcome])
            except StoreError as exc:
                if is_transient(exc):
                    raise
                applied += self.store.complete([self.dispatcher.unstorable(outcome, exc)])
        return applied

    def _count(self, outcomes: Sequence[Outcome]) -> None:
        """Count what was stored, log it (a line per failure, a debug line per success) and tell
        the observers."""
        with self._cond:
            for outcome in outcomes:
                self.stats.outcomes[outcome.kind] += 1
                self.stats.by_type[(outcome.message.type or "(none)", outcome.status)] += 1
        for outcome in outcomes:
            _log_outcome(outcome)
        for observe in self.observers:
            observe(outcomes)

    def counted(self) -> Counter:
        """A copy of the outcome counts (the completer's thread adds to them)."""
        with self._cond:
            return Counter(self.stats.outcomes)

    # --- the thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="genesis-completer", daemon=True)
        self._thread.start()

    @property
    def threaded(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float) -> None:
        """End the thread once what it is writing is written (what waits stays, for the caller)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not ((self._finals or self._retries) and self._due_locked()):
                    # wait for the first outcome, or until the oldest is due
                    self._cond.wait(None if not (self._finals or self._retries)
                                    else max(0.001, self._since + self.flush_after_s - self.monotonic()))
                if self._stopping:
                    return
            try:
                self.flush()
            except StoreError as exc:
                if not is_transient(exc):
                    self._fail(exc)
                    return
                self.stats.store_errors += 1
                self.failing = True
                try:
                    delay = self.outage.failed(exc)
                except DatabaseUnavailable as gave_up:
                    self._fail(gave_up)
                    return
                with self._cond:
                    if not self._stopping:
                        self._cond.wait(delay)
                continue
            except BaseException as exc:  # noqa: BLE001 - a bug: the loop raises it (exit 1)
                self._fail(exc)
                return
            # the loop ends the outage on its next turn (its reads may still fail)
            self.failing = False

    def _fail(self, exc: BaseException) -> None:
        self.failure = exc
        self.on_written()


def _log_outcome(outcome: Outcome) -> None:
    if outcome.error is None and not log.isEnabledFor(logging.DEBUG):
        return      # a success is a debug line: its fields are not built for nothing
    m = outcome.message
    fields = {"queue": m.queue, "msg_id": m.msg_id, "workflow_id": outcome.workflow_id, "type": clip(m.type),
              "status": outcome.kind, "attempt": m.read_ct,
              "duration_ms": round((outcome.finished_at - outcome.started_at).total_seconds() * 1000.0, 3)}
    if outcome.error is None:
        log.debug("%s %s/%s", outcome.kind, m.queue, m.msg_id, extra=fields)
    else:
        log.info("%s %s/%s: %s: %s", outcome.kind, m.queue, m.msg_id, outcome.error.code,
                 clip(outcome.error.message, 300), extra={**fields, "code": outcome.error.code})
