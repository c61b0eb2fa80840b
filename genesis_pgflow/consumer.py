"""The consumer loop: fetch -> execute -> complete, with free-slot accounting, deadlines, leases and shutdown."""

from __future__ import annotations

import logging
import queue as queue_module
import random
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

from genesis_pgflow.dispatcher import Dispatcher, Task
from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.messages import Outcome, ReadMessage
from genesis_pgflow.store.database import StoreError
from genesis_pgflow.store.queue import QueueStore

log = logging.getLogger(__name__)


class WorkerPool:
    """A fixed number of daemon threads. Daemon, because a handler that never returns must not
    keep the process alive after shutdown has given its message back."""

    def __init__(self, size: int, on_done: Callable[[], None]):
        self._jobs: queue_module.SimpleQueue = queue_module.SimpleQueue()
        self._on_done = on_done
        self._threads = [threading.Thread(target=self._work, name=f"genesis-worker-{i}", daemon=True)
                         for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Outcome], *args: object) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            future, fn, args = item
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, which classifies it
                future.set_exception(exc)
            self._on_done()

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


@dataclass(eq=False)
class Job:
    task: Task
    ctx: WorkContext
    future: Future

    @property
    def key(self) -> tuple[str, int]:
        return self.task.message.queue, self.task.message.msg_id


@dataclass(frozen=True)
class ConsumerOptions:
    queues: tuple[str, ...]
    parallel: int = 4
    batch_size: int = 10
    poll_interval_s: float = 1.0
    lease_s: int = 10
    drain: bool = False
    shutdown_grace_s: float = 30.0


@dataclass
class Stats:
    outcomes: Counter = field(default_factory=Counter)   # kind -> count
    by_type: Counter = field(default_factory=Counter)    # (type, status) -> count
    store_errors: int = 0


PeriodicJob = tuple[str, float, Callable[[], object]]


class Consumer:
    def __init__(self, store: QueueStore, dispatcher: Dispatcher, options: ConsumerOptions, *,
                 monotonic: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random,
                 periodic: Sequence[PeriodicJob] = ()):
        self.store = store
        self.dispatcher = dispatcher
        self.options = options
        self.monotonic = monotonic
        self.rand = rand
        self.periodic = list(periodic)
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self.pool = WorkerPool(options.parallel, self.wakeup.set)
        self.running: dict[tuple[str, int], Job] = {}
        self.overrun: set[Job] = set()      # timed out, thread not yet returned: the slot stays counted
        self.finals: list[Outcome] = []     # to complete (result + archive + run) in one transaction
        self.retries: list[Outcome] = []
        self.stats = Stats()
        self._rotation = 0
        self._next_renewal = monotonic() + options.lease_s / 3

    # --- the three steps ------------------------------------------------------------------

    def free_slots(self) -> int:
        return self.options.parallel - len(self.running) - len(self.overrun)

    def fetch(self) -> int:
        """Lease at most as many messages as there are free slots, taking the queues in turn."""
        fetched = 0
        queues = self.options.queues
        for i in range(len(queues)):
            free = self.free_slots()
            if free <= 0:
                break
            name = queues[(self._rotation + i) % len(queues)]
            for message in self.store.read(name, min(free, self.options.batch_size), self.options.lease_s):
                self.start(message)
                fetched += 1
        self._rotation = (self._rotation + 1) % len(queues)
        return fetched

    def start(self, message: ReadMessage) -> None:
        prepared = self.dispatcher.prepare(message)
        if isinstance(prepared, Outcome):
            self._route(prepared)
            return
        ctx = self.dispatcher.context(prepared, self.monotonic() + prepared.timeout_s)
        ctx.monotonic = self.monotonic
        job = Job(prepared, ctx, self.pool.submit(self.dispatcher.execute, prepared, ctx))
        self.running[job.key] = job

    def collect(self) -> None:
        """Take the outcomes of finished jobs; time out jobs past their deadline."""
        now = self.monotonic()
        for key, job in list(self.running.items()):
            if job.future.done():
                del self.running[key]
                error = job.future.exception()
                self._route(self.dispatcher.transient(job.task, error) if error else job.future.result())
            elif now >= job.ctx.deadline:
                # Reported at once; the thread keeps its slot until it returns, and what it
                # returns then is discarded.
                job.ctx.cancelled.set()
                del self.running[key]
                self.overrun.add(job)
                self._route(self.dispatcher.timed_out(job.task))
        self.overrun = {job for job in self.overrun if not job.future.done()}

    def complete(self) -> None:
        """Write what collect gathered: final outcomes in one transaction, retries in another."""
        if self.finals:
            applied = self.store.complete(self.finals)
            if len(applied) != len(self.finals):
                log.warning("%d message(s) were finished elsewhere (lease lost); their results were not sent",
                            len(self.finals) - len(applied))
            self._count(applied)
            self.finals = []
        if self.retries:
            self.store.retry(self.retries)
            self._count(self.retries)
            self.retries = []

    def renew_leases(self, force: bool = False) -> None:
        """Keep the messages of live jobs invisible to other consumers while they run."""
        now = self.monotonic()
        if not force and now < self._next_renewal:
            return
        self._next_renewal = now + self.options.lease_s / 3
        held: dict[str, list[int]] = defaultdict(list)
        for queue_name, msg_id in self.running:
            held[queue_name].append(msg_id)
        for outcome in self.finals + self.retries:
            held[outcome.message.queue].append(outcome.message.msg_id)
        for queue_name, ids in held.items():
            kept = self.store.extend_leases(queue_name, ids, self.options.lease_s)
            for lost in set(ids) - kept:
                log.warning("message %s/%s left its queue while held here", queue_name, lost)

    def _route(self, outcome: Outcome) -> None:
        (self.retries if outcome.kind == "retry" else self.finals).append(outcome)

    def _count(self, outcomes: Sequence[Outcome]) -> None:
        for outcome in outcomes:
            self.stats.outcomes[outcome.kind] += 1
            self.stats.by_type[(outcome.message.type or "(none)", outcome.status)] += 1

    # --- driving the loop -----------------------------------------------------------------

    def run_once(self, wait_s: float = 0.0) -> int:
        """One iteration: fetch, wait up to wait_s for a job to finish, collect, complete, renew."""
        fetched = 0 if self.stopping.is_set() else self.fetch()
        if wait_s > 0 and (self.running or self.overrun) and not self.finals and not self.retries:
            self.wakeup.wait(min(wait_s, self._until_next_deadline()))
        self.wakeup.clear()
        self.collect()
        self.complete()
        self.renew_leases()
        return fetched

    def _until_next_deadline(self) -> float:
        now = self.monotonic()
        deadlines = [job.ctx.deadline for job in self.running.values()] + [self._next_renewal]
        return max(0.0, min(deadlines) - now)

    def idle(self) -> bool:
        return not self.running and not self.finals and not self.retries

    def poll_wait_s(self) -> float:
        return self.options.poll_interval_s * (0.8 + 0.4 * self.rand())

    def run(self) -> None:
        """Until stop() (or, with drain, until every queue is empty); then shut down cleanly."""
        listener = threading.Thread(target=self._listen, name="genesis-listen", daemon=True)
        listener.start()
        scheduler = threading.Thread(target=self._run_periodic, name="genesis-periodic", daemon=True)
        if self.periodic:
            scheduler.start()
        failures = 0
        try:
            while not self.stopping.is_set():
                try:
                    fetched = self.run_once(wait_s=self.poll_wait_s())
                    failures = 0
                except StoreError as exc:  # the store already retried briefly; keep state, back off
                    failures += 1
                    self.stats.store_errors += 1
                    delay = min(30.0, 0.5 * 2 ** min(failures, 6)) * (0.5 + self.rand() / 2)
                    log.error("database unavailable (%s); retrying in %.1f s", str(exc).strip().splitlines()[0]
                              if str(exc).strip() else type(exc).__name__, delay)
                    self.stopping.wait(delay)
                    continue
                if fetched == 0 and self.idle():
                    if self.options.drain and self.store.depth(self.options.queues) == 0:
                        log.info("drained: every queue is empty and nothing is in flight")
                        break
                    self.wakeup.wait(self.poll_wait_s())
        finally:
            self.shutdown()

    def stop(self) -> None:
        """Stop reading; in-flight work finishes (or is given back) in shutdown()."""
        self.stopping.set()
        self.wakeup.set()

    def shutdown(self) -> None:
        self.stopping.set()
        grace_end = self.monotonic() + self.options.shutdown_grace_s
        try:
            while self.running and self.monotonic() < grace_end:
                self.run_once(wait_s=min(0.5, max(0.0, grace_end - self.monotonic())))
            self.collect()
            self.complete()
            given_back: dict[str, list[int]] = defaultdict(list)
            for job in self.running.values():
                job.ctx.cancelled.set()
                given_back[job.task.message.queue].append(job.task.message.msg_id)
            for queue_name, ids in given_back.items():
                log.warning("giving back %d unfinished message(s) of %s", len(ids), queue_name)
                self.store.release(queue_name, ids)
            self.running.clear()
        finally:
            self.pool.stop()

    def _listen(self) -> None:
        while not self.stopping.is_set():
            if self.store.wait_for_messages(self.options.queues, timeout_s=self.options.poll_interval_s):
                self.wakeup.set()

    def _run_periodic(self) -> None:
        due = {name: self.monotonic() + interval * self.rand() * 0.1 for name, interval, _ in self.periodic}
        while not self.stopping.is_set():
            now = self.monotonic()
            for name, interval, job in self.periodic:
                if now >= due[name]:
                    due[name] = now + interval
                    try:
                        job()
                    except Exception:  # noqa: BLE001 - a failing maintenance job must not stop consuming
                        log.exception("periodic job %s failed", name)
            self.stopping.wait(max(0.1, min(due.values()) - self.monotonic()))
