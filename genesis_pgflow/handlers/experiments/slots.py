"""Who may run an experiment now: one run per experiment_id, and at most max_experiments_concurrent
experiments at once, in this process and across every consumer of the database.

    with slots.hold(request, cancelled, deadline):
        ...   # the experiment

raises ExperimentBusy at once if the experiment_id is being run elsewhere (two runs would share one
sandbox copy), and ExperimentSlotsBusy if no slot came free before the deadline. In-process
bookkeeping (a set and a semaphore) answers first; the records' advisory locks, held on
connections of their own for the whole experiment, answer for the other consumers and go with
the connection if this process dies."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from genesis_pgflow.handlers.experiments.errors import ExperimentBusy, ExperimentSlotsBusy
from genesis_pgflow.messages import ExperimentRequest
from genesis_pgflow.store.experiments import ExperimentRecords


class ExperimentSlots:
    """The concurrency limits of one ExperimentRunner. peak is the most experiments seen running at
    once (for tests and metrics)."""

    def __init__(self, limit: int, records: ExperimentRecords, monotonic: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.records = records
        self.monotonic = monotonic
        self._semaphore = threading.BoundedSemaphore(limit)
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self.running = 0
        self.peak = 0

    @contextmanager
    def hold(self, request: ExperimentRequest, cancelled: threading.Event, deadline: float) -> Iterator[None]:
        with ExitStack() as stack:
            self._claim(request, stack)
            self._take(request, cancelled, deadline, stack)
            with self._lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
            try:
                yield
            finally:
                with self._lock:
                    self.running -= 1

    def _claim(self, request: ExperimentRequest, stack: ExitStack) -> None:
        busy = ExperimentBusy(f"experiment {request.experiment_id} is being run by another consumer; retried later",
                              details={**request.identifiers(), "rolled_back": False})
        with self._lock:
            if request.experiment_id in self._active:
                raise busy
            self._active.add(request.experiment_id)
        stack.callback(self._release, request.experiment_id)
        lock = self.records.experiment_lock(request.experiment_id)
        if not lock.__enter__():
            lock.__exit__(None, None, None)
            raise busy
        stack.push(lock)

    def _release(self, experiment_id: str) -> None:
        with self._lock:
            self._active.discard(experiment_id)

    def _take(self, request: ExperimentRequest, cancelled: threading.Event, deadline: float,
              stack: ExitStack) -> None:
        """One slot in this process (a semaphore), then one shared by every consumer of the
        database (advisory locks); wait for both until the deadline."""
        while not self._semaphore.acquire(timeout=0.1):
            self._wait_over(request, cancelled, deadline)
        stack.callback(self._semaphore.release)
        while True:
            shared = self.records.experiment_slot(self.limit)
            if shared.__enter__():
                stack.push(shared)
                return
            shared.__exit__(None, None, None)
            self._wait_over(request, cancelled, deadline)
            cancelled.wait(1.0)

    def _wait_over(self, request: ExperimentRequest, cancelled: threading.Event, deadline: float) -> None:
        if cancelled.is_set() or self.monotonic() >= deadline:
            raise ExperimentSlotsBusy(
                "no experiment slot came free before the deadline "
                f"(max_experiments_concurrent={self.limit}); nothing was run",
                details={"experiment_id": request.experiment_id, "instance_id": request.instance_id,
                         "rolled_back": False})
