"""The executor: a fixed pool of worker threads, the jobs running on it and their deadlines.

A job's deadline starts when a worker starts it (a message waiting for a worker is not late).
A job past its deadline is answered at once (`timeout`); its thread keeps its worker until it
returns, and what it returns then is discarded. The executor also learns each handler's pace,
which tells the producer how far ahead to read."""

from __future__ import annotations

import queue as queue_module
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from genesis_pgflow.dispatcher import Dispatcher, Task
from genesis_pgflow.handlers.base import LazyEvent, WorkContext
from genesis_pgflow.messages import Outcome, ReadMessage

DEADLINE_SCAN_S = 0.02      # how often running jobs are checked against their deadlines


@dataclass(eq=False)
class Job:
    """A leased message on its way through a worker; its deadline starts when a worker starts it."""

    task: Task
    ctx: WorkContext
    queued_at: float = 0.0                  # when the loop took it (monotonic): it is held from then
    recorded: bool = False                  # its run has been recorded `running`
    started_at: float | None = None
    finished_at: float | None = None
    outcome: Outcome | None = None          # None: cancelled before it started
    error: BaseException | None = None      # what the dispatcher itself raised, if anything
    returned: threading.Event = field(default_factory=LazyEvent)   # its worker is done with it

    @property
    def key(self) -> tuple[str, int]:
        return self.task.message.queue, self.task.message.msg_id


class WorkerPool:
    """A fixed number of daemon threads running jobs; each finished job is put on `done` for the
    loop to collect. Daemon, because a handler that never returns must not keep the process alive
    after shutdown has given its message back."""

    def __init__(self, size: int, run: Callable[[Job], None], on_done: Callable[[], None]):
        self._jobs: queue_module.SimpleQueue[Job | None] = queue_module.SimpleQueue()
        self.done: queue_module.SimpleQueue[Job] = queue_module.SimpleQueue()
        self._run = run
        self._on_done = on_done
        self._threads = [threading.Thread(target=self._work, name=f"genesis-worker-{i}", daemon=True)
                         for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._run(job)
            finally:
                job.returned.set()
            self.done.put(job)
            self._on_done()

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


class Executor:
    """Runs prepared tasks on the pool; collect() hands back the outcomes of finished jobs and of
    jobs past their deadline. Only the consumer loop calls it (one thread), except _execute,
    which runs on the workers."""

    def __init__(self, dispatcher: Dispatcher, parallel: int, *, monotonic: Callable[[], float],
                 on_done: Callable[[], None]):
        self.dispatcher = dispatcher
        self.monotonic = monotonic
        self.pool = WorkerPool(parallel, self._execute, on_done)
        self.running: dict[tuple[str, int], Job] = {}
        self.overrun: set[Job] = set()      # timed out, thread not yet returned: the slot stays counted
        self._pace: dict[str | None, float] = {}   # payload type -> moving average of handler seconds
        self._deadline_scan_at = 0.0

    def busy(self) -> int:
        """Workers taken: running jobs and timed-out ones whose thread has not returned."""
        return len(self.running) + len(self.overrun)

    def pace(self, payload_type: str | None) -> float | None:
        """The moving average of a handler's run time, in seconds; None until one has run."""
        return self._pace.get(payload_type)

    def start(self, task: Task) -> None:
        ctx = self.dispatcher.context(task, float("inf"))
        ctx.monotonic = self.monotonic
        job = Job(task, ctx, queued_at=self.monotonic())
        self.running[job.key] = job
        self.pool.submit(job)

    def run_inline(self, task: Task) -> Outcome:
        """A handler that only works out what to write (its `inline`: see handlers.base.Handler),
        run here on the loop's thread as it is read: no worker, no hand-off to one and back. Its
        deadline is looked at once it returns: late is a timeout, as it would be on a worker."""
        ctx = self.dispatcher.context(task, float("inf"))
        ctx.monotonic = self.monotonic
        started = self.monotonic()
        ctx.deadline = started + task.timeout_s
        outcome = self.dispatcher.execute(task, ctx)
        finished = self.monotonic()
        self._learn_pace(task, finished - started)
        return self.dispatcher.timed_out(task) if finished > ctx.deadline else outcome

    def _execute(self, job: Job) -> None:
        """In a worker thread: the deadline starts now; a job cancelled before it started does not run."""
        if job.ctx.cancelled.is_set():
            return
        job.started_at = self.monotonic()
        job.ctx.deadline = job.started_at + job.task.timeout_s
        try:
            job.outcome = self.dispatcher.execute(job.task, job.ctx)
        except BaseException as exc:  # noqa: BLE001 - classified by the loop
            job.error = exc
        finally:
            job.finished_at = self.monotonic()

    def collect(self) -> list[Outcome]:
        """The outcomes of finished jobs, and a `timeout` for each job past its deadline."""
        outcomes: list[Outcome] = []
        while True:
            try:
                job = self.pool.done.get_nowait()
            except queue_module.Empty:
                break
            if job in self.overrun:              # a late return after its timeout: discarded
                self.overrun.discard(job)
            elif self.running.get(job.key) is job:
                del self.running[job.key]
                if job.started_at is not None and job.finished_at is not None:
                    self._learn_pace(job.task, job.finished_at - job.started_at)
                outcome = self.dispatcher.transient(job.task, job.error) if job.error else job.outcome
                if outcome is not None:          # None: cancelled before it started, given back
                    outcomes.append(outcome)
        now = self.monotonic()
        if now < self._deadline_scan_at:
            return outcomes
        self._deadline_scan_at = now + DEADLINE_SCAN_S
        for key, job in list(self.running.items()):
            if now >= job.ctx.deadline:
                # Reported at once; the thread keeps its slot until it returns, and what it
                # returns then is discarded.
                job.ctx.cancelled.set()
                del self.running[key]
                self.overrun.add(job)
                outcomes.append(self.dispatcher.timed_out(job.task))
        return outcomes

    def unrecorded(self, held_s: float) -> list[Job]:
        """The jobs held at least held_s whose run is not yet recorded `running`. Jobs are kept in
        the order they were taken, so this stops at the first that is not due."""
        now = self.monotonic()
        due: list[Job] = []
        for job in self.running.values():
            if job.recorded:
                continue
            if now - job.queued_at < held_s:
                break
            due.append(job)
        return due

    def next_record(self, held_s: float) -> float:
        """When the oldest job whose run is not recorded will have been held held_s (inf: none)."""
        return next((job.queued_at + held_s for job in self.running.values() if not job.recorded), float("inf"))

    def next_deadline(self) -> float:
        """The earliest deadline of a running job (inf if none)."""
        return min((job.ctx.deadline for job in self.running.values()), default=float("inf"))

    def _learn_pace(self, task: Task, seconds: float) -> None:
        kind = getattr(task.payload, "type", None)
        previous = self._pace.get(kind)
        self._pace[kind] = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def cancel_all(self, wait_s: float) -> tuple[dict[str, list[ReadMessage]], int]:
        """Cancel every job still running and wait, up to wait_s, for their threads (and those of
        the jobs that overran) to return. Returns the messages of the cancelled jobs that did
        return, by queue (to be given back), and how many did not. What they return is discarded."""
        unfinished = list(self.running.values())
        waited = unfinished + list(self.overrun)
        for job in waited:
            job.ctx.cancelled.set()
        # real time: these are threads (and their sandboxes) coming back, whatever clock the loop uses
        until = time.monotonic() + wait_s
        for job in waited:
            job.returned.wait(max(0.0, until - time.monotonic()))
        returned: dict[str, list[ReadMessage]] = defaultdict(list)
        stuck = 0
        for job in unfinished:
            del self.running[job.key]
            if job.returned.is_set():
                returned[job.task.message.queue].append(job.task.message)
            else:
                stuck += 1
        self.collect()      # discards what the cancelled jobs returned
        return returned, stuck

    def stop(self) -> None:
        self.pool.stop()
