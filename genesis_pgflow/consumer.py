"""The consumer loop: fetch -> execute -> complete, with free-slot accounting, deadlines, leases and shutdown."""

from __future__ import annotations

import logging
import queue as queue_module
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from genesis_pgflow.dispatcher import Dispatcher, Task
from genesis_pgflow.errors import DatabaseUnavailable
from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.messages import QUEUES, Outcome, ReadMessage, clip
from genesis_pgflow.store.control import Command, ControlState, ControlStore
from genesis_pgflow.store.database import StoreError, first_line, is_transient
from genesis_pgflow.store.queue import QueueStore

log = logging.getLogger(__name__)


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


@dataclass(eq=False)
class Job:
    """A leased message on its way through a worker; its deadline starts when a worker starts it."""

    task: Task
    ctx: WorkContext
    started_at: float | None = None
    finished_at: float | None = None
    outcome: Outcome | None = None          # None: cancelled before it started
    error: BaseException | None = None      # what the dispatcher itself raised, if anything
    returned: threading.Event = field(default_factory=threading.Event)   # its worker is done with it

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
    # a finished outcome waits at most this long for others to share its transaction
    flush_after_s: float = 0.005
    # messages are leased ahead of a free worker only when, at the handlers' measured pace,
    # they will start within this many seconds (so slow workflows are never hoarded)
    prefetch_horizon_s: float = 0.5
    # how often the loop logs what it did since the last report (0: never)
    report_every_s: float = 60.0
    # how long the database may stay away (unreachable or refusing) before the consumer gives up
    max_outage_s: float = 300.0
    # how often an outage is summed up in the log while it lasts
    outage_report_every_s: float = 60.0
    # at shutdown, how long cancelled work gets to return (its sandboxes killed) before its
    # messages are given back
    give_back_wait_s: float = 10.0
    # how often the control table is read even without a NOTIFY (the heartbeat's interval)
    control_poll_s: float = 5.0


@dataclass
class Stats:
    outcomes: Counter = field(default_factory=Counter)   # kind -> count
    by_type: Counter = field(default_factory=Counter)    # (type, status) -> count
    store_errors: int = 0


PeriodicJob = tuple[str, float, Callable[[], object]]
LISTEN_SLICE_S = 0.5
DEADLINE_SCAN_S = 0.02      # how often running jobs are checked against their deadlines
STOP_CALL_CAP_S = 5.0       # once stopping, no database call may last longer


@dataclass(frozen=True)
class Backoff:
    """first_s * 2**(n-1) after the n-th failure in a row, capped, times a random factor in
    [0.5, 1). The cap is short on purpose: a failed attempt costs one connection attempt, and the
    first message after the database is back should not wait out a long sleep."""

    first_s: float = 0.1
    max_s: float = 1.0

    def delay(self, failures: int, rand: float) -> float:
        return min(self.max_s, self.first_s * 2 ** max(0, min(failures, 30) - 1)) * (0.5 + rand / 2)


class Outage:
    """The database's absence as the consumer sees it (shared by the loop and the LISTEN thread):
    since when, how many failed attempts, the last error. It logs one line when the database goes,
    one summary per report period while it stays away and one when it is back, and ends the
    consumer (DatabaseUnavailable, exit 2) once the outage outlasts its budget."""

    def __init__(self, max_outage_s: float, *, monotonic: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random, report_every_s: float = 60.0,
                 backoff: Backoff = Backoff(), on_down: Callable[[], None] = lambda: None):
        self.max_outage_s = max_outage_s
        # called once when an outage begins: whoever noticed it (a periodic job, say), the loop
        # must start its own attempts, which alone end the outage, rather than sleep out its poll
        self.on_down = on_down
        self.monotonic = monotonic
        self.rand = rand
        self.report_every_s = report_every_s
        self.backoff = backoff
        self.since: float | None = None
        self.attempts = 0           # failed attempts in this outage
        self.last_error = ""
        self.count = 0              # outages since the start
        self._next_report = 0.0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException, *, budget: bool = True) -> float:
        """A failed attempt: how long to wait before the next one. Raises DatabaseUnavailable
        past the budget (unless budget is False: shutting down anyway)."""
        now = self.monotonic()
        with self._lock:
            self.last_error = first_line(exc)
            began = self.since is None
            if self.since is None:
                self.since, self.attempts, self._next_report = now, 0, now + self.report_every_s
                self.count += 1
                log.warning("database unavailable (%s); retrying quietly, giving up after %.0f s",
                            self.last_error, self.max_outage_s)
            elif now >= self._next_report:
                self._next_report = now + self.report_every_s
                log.warning("database still unavailable after %.0f s: %d failed attempt(s), last error: %s",
                            now - self.since, self.attempts + 1, self.last_error)
            self.attempts += 1
            since = self.since
            gone = now - since
            # the last attempt falls due when the budget does, not a backoff later
            delay = min(self.backoff.delay(self.attempts, self.rand()), since + self.max_outage_s - now)
        if began:
            self.on_down()
        if budget and gone >= self.max_outage_s:
            raise DatabaseUnavailable(f"database unreachable for {gone:.0f} s "
                                      f"(last error: {self.last_error}); giving up")
        return delay

    def recovered(self) -> None:
        if self.since is None:
            return
        with self._lock:
            if self.since is None:
                return
            log.info("database back after %.1f s (%d failed attempt(s))", self.monotonic() - self.since,
                     self.attempts)
            self.since, self.attempts = None, 0


def _log_outcome(outcome: Outcome) -> None:
    m = outcome.message
    fields = {"queue": m.queue, "msg_id": m.msg_id, "workflow_id": outcome.workflow_id, "type": clip(m.type),
              "status": outcome.kind, "attempt": m.read_ct,
              "duration_ms": round((outcome.finished_at - outcome.started_at).total_seconds() * 1000.0, 3)}
    if outcome.error is None:
        log.debug("%s %s/%s", outcome.kind, m.queue, m.msg_id, extra=fields)
    else:
        log.info("%s %s/%s: %s: %s", outcome.kind, m.queue, m.msg_id, outcome.error.code,
                 clip(outcome.error.message, 300), extra={**fields, "code": outcome.error.code})


class Consumer:
    def __init__(self, store: QueueStore, dispatcher: Dispatcher, options: ConsumerOptions, *,
                 monotonic: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random,
                 periodic: Sequence[PeriodicJob] = (), hurry: Callable[[float], None] | None = None,
                 control: ControlStore | None = None):
        self.store = store
        # paused queues and drain/stop commands (genesis queues|consumers ...); None: not steered
        self.control = control
        self.paused: frozenset[str] = frozenset()
        self.draining = threading.Event()     # told to drain: take nothing new, finish what is held, exit
        self._control_thread: threading.Thread | None = None
        # called with STOP_CALL_CAP_S on stop(): the database layer then cuts any call that would
        # keep shutdown waiting on a silent server
        self.hurry = hurry
        self.outage = Outage(options.max_outage_s, monotonic=monotonic, rand=rand,
                             report_every_s=options.outage_report_every_s, on_down=lambda: self.wakeup.set())
        self.dispatcher = dispatcher
        self.options = options
        self.monotonic = monotonic
        self.rand = rand
        self.periodic = list(periodic)
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self.pool = WorkerPool(options.parallel, self._execute, self.wakeup.set)
        self.running: dict[tuple[str, int], Job] = {}
        self.overrun: set[Job] = set()      # timed out, thread not yet returned: the slot stays counted
        self.finals: list[Outcome] = []     # to complete (result + archive + run) in one transaction
        self.retries: list[Outcome] = []
        self.stats = Stats()
        # called with the outcomes stored (results written, retries scheduled): the metrics
        self.observers: list[Callable[[Sequence[Outcome]], None]] = []
        self._rotation = 0
        self._next_renewal = monotonic() + options.lease_s / 3
        self._pending_since = 0.0
        self._listener: threading.Thread | None = None
        self._pace: dict[str | None, float] = {}   # payload type -> moving average of handler seconds
        self._deadline_scan_at = 0.0
        self._next_report = monotonic() + options.report_every_s
        self._reported: Counter = Counter()

    # --- the three steps ------------------------------------------------------------------

    def free_slots(self) -> int:
        """Workers neither running nor promised to a leased message."""
        return max(0, self.options.parallel - len(self.running) - len(self.overrun))

    def prefetch(self, queue: str) -> int:
        """How many messages of a queue may wait for a worker: as many as will start within the
        horizon at the pace its handler has shown, none before the pace is known."""
        pace = self._pace.get(QUEUES[queue][0] if queue in QUEUES else None)
        if pace is None:
            return 0
        return min(self.options.batch_size,
                   int(self.options.parallel * self.options.prefetch_horizon_s / max(pace, 1e-6)))

    def room(self, queue: str) -> int:
        return self.options.parallel + self.prefetch(queue) - len(self.running) - len(self.overrun)

    def fetch(self) -> int:
        """Lease no more than the workers can start soon, taking the queues in turn; read only
        once there is room for a reasonable batch (or nothing is running)."""
        fetched = 0
        queues = self.options.queues
        for i in range(len(queues)):
            name = queues[(self._rotation + i) % len(queues)]
            if name in self.paused:     # the store refuses it too; this saves the round trip
                continue
            room = self.room(name)
            worth_it = max(1, min(self.options.parallel + self.prefetch(name), self.options.batch_size) // 2)
            if room <= 0 or (self.running and room < worth_it):
                continue
            for message in self.store.read(name, min(room, self.options.batch_size), self.options.lease_s):
                self.start(message)
                fetched += 1
        self._rotation = (self._rotation + 1) % len(queues)
        return fetched

    def start(self, message: ReadMessage) -> None:
        prepared = self.dispatcher.prepare(message)
        if isinstance(prepared, Outcome):
            self._route(prepared)
            return
        ctx = self.dispatcher.context(prepared, float("inf"))
        ctx.monotonic = self.monotonic
        job = Job(prepared, ctx)
        self.running[job.key] = job
        self.pool.submit(job)

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

    def collect(self) -> None:
        """Take the outcomes of finished jobs; time out jobs past their deadline."""
        while True:
            try:
                job = self.pool.done.get_nowait()
            except queue_module.Empty:
                break
            if job in self.overrun:              # a late return after its timeout: discarded
                self.overrun.discard(job)
            elif self.running.get(job.key) is job:
                del self.running[job.key]
                self._learn_pace(job)
                outcome = self.dispatcher.transient(job.task, job.error) if job.error else job.outcome
                if outcome is not None:          # None: cancelled before it started, given back
                    self._route(outcome)
        now = self.monotonic()
        if now < self._deadline_scan_at:
            return
        self._deadline_scan_at = now + DEADLINE_SCAN_S
        for key, job in list(self.running.items()):
            if now >= job.ctx.deadline:
                # Reported at once; the thread keeps its slot until it returns, and what it
                # returns then is discarded.
                job.ctx.cancelled.set()
                del self.running[key]
                self.overrun.add(job)
                self._route(self.dispatcher.timed_out(job.task))

    def _learn_pace(self, job: Job) -> None:
        if job.started_at is None or job.finished_at is None:
            return
        kind = getattr(job.task.payload, "type", None)
        seconds = job.finished_at - job.started_at
        previous = self._pace.get(kind)
        self._pace[kind] = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def complete(self) -> None:
        """Write what collect gathered: final outcomes in one transaction, retries in another."""
        if self.finals:
            try:
                applied = self.store.complete(self.finals)
            except StoreError as exc:
                if is_transient(exc):
                    raise
                applied = self._complete_one_by_one(exc)
            if len(applied) != len(self.finals):
                log.warning("%d message(s) were finished elsewhere (lease lost); their results were not sent",
                            len(self.finals) - len(applied))
            self._count(applied)
            self.finals = []
        if self.retries:
            self.store.retry(self.retries)
            self._count(self.retries)
            self.retries = []

    def _complete_one_by_one(self, batch_error: Exception) -> list[Outcome]:
        """A batch the database refused (not an outage): find the outcome it refuses and answer
        that request with a failure it can store, so one bad result never blocks the others."""
        log.error("the database refused a batch of %d outcome(s) (%s); completing them one by one",
                  len(self.finals), batch_error)
        applied: list[Outcome] = []
        for outcome in self.finals:
            try:
                applied += self.store.complete([outcome])
            except StoreError as exc:
                if is_transient(exc):
                    raise
                applied += self.store.complete([self.dispatcher.unstorable(outcome, exc)])
        return applied

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
        if not self.finals and not self.retries:
            self._pending_since = self.monotonic()
        (self.retries if outcome.kind == "retry" else self.finals).append(outcome)

    def _count(self, outcomes: Sequence[Outcome]) -> None:
        """Count what was stored, log it (a line per failure, a debug line per success) and tell
        the observers."""
        for outcome in outcomes:
            self.stats.outcomes[outcome.kind] += 1
            self.stats.by_type[(outcome.message.type or "(none)", outcome.status)] += 1
            _log_outcome(outcome)
        for observe in self.observers:
            observe(outcomes)

    # --- driving the loop -----------------------------------------------------------------

    def run_once(self, wait_s: float = 0.0) -> int:
        """One iteration: fetch, wait up to wait_s for a job to finish, collect, complete, renew.

        Batching without hoarding: fetch() reads only when a reasonable batch fits, and finished
        outcomes linger up to flush_after_s so that several share one transaction."""
        fetched = 0
        failure: StoreError | None = None
        if not self.stopping.is_set() and not self.draining.is_set():
            try:
                fetched = self.fetch()
            except StoreError as exc:
                failure = exc      # raised after collect(): deadlines are kept during an outage too
        # Clear before looking, so a job finishing after the look wakes the wait below.
        self.wakeup.clear()
        self.collect()
        if failure is not None:
            raise failure
        if wait_s > 0 and (self.running or self.overrun) and not self._flush_due():
            self.wakeup.wait(min(wait_s, self._until_next_deadline()))
            self.collect()
        if self._flush_due():
            self.complete()
        self.renew_leases()
        return fetched

    def _flush_due(self) -> bool:
        pending = len(self.finals) + len(self.retries)
        return pending > 0 and (
            not self.running or self.stopping.is_set() or pending >= self.options.batch_size
            or self.monotonic() - self._pending_since >= self.options.flush_after_s)

    def _until_next_deadline(self) -> float:
        now = self.monotonic()
        deadlines = [job.ctx.deadline for job in self.running.values()] + [self._next_renewal]
        if self.finals or self.retries:
            deadlines.append(self._pending_since + self.options.flush_after_s)
        return max(0.0, min(deadlines) - now)

    def idle(self) -> bool:
        return not self.running and not self.finals and not self.retries

    def poll_wait_s(self) -> float:
        return self.options.poll_interval_s * (0.8 + 0.4 * self.rand())

    def turn(self) -> float | None:
        """One turn of run(): an iteration, or after a database failure the outage's bookkeeping.
        Returns how long to wait before the next turn (None: drained, stop)."""
        try:
            fetched = self.run_once(wait_s=0.0 if self.outage.down else self.poll_wait_s())
            if self.draining.is_set() and self.idle():
                log.info("drained on command: nothing left in flight")
                return None
            # a paused queue is not this consumer's to empty: --drain waits for the others only
            drained = (self.options.drain and fetched == 0 and self.idle()
                       and self.store.depth([q for q in self.options.queues if q not in self.paused]) == 0)
        except StoreError as exc:  # the store already retried briefly; keep state, back off
            if not is_transient(exc):
                raise              # a bug, not an outage: exit 1 rather than retry forever
            self.stats.store_errors += 1
            return self.outage.failed(exc)
        self.outage.recovered()
        self.report()
        if drained:
            log.info("drained: every queue is empty and nothing is in flight")
            return None
        return self.poll_wait_s() if fetched == 0 and self.idle() else 0.0

    def run(self) -> None:
        """Until stop() (or, with drain, until every queue is empty); then shut down cleanly.
        Raises DatabaseUnavailable once the database has been away for longer than max_outage_s."""
        self._listener = threading.Thread(target=self._listen, name="genesis-listen", daemon=True)
        self._listener.start()
        if self.control is not None:
            self.refresh_control(quiet=True)    # a queue paused before this consumer started stays unread
            self._control_thread = threading.Thread(target=self._watch_control, name="genesis-control",
                                                    daemon=True)
            self._control_thread.start()
        # each periodic job on a thread of its own: a long cleanup or prune never delays the heartbeat
        for name, interval, job in self.periodic:
            threading.Thread(target=self._run_periodic, args=(name, interval, job), name=f"genesis-{name}",
                             daemon=True).start()
        gave_up = False
        try:
            while not self.stopping.is_set():
                self.last_iteration = self.monotonic()   # read by /healthz: the loop is alive
                pause = self.turn()
                if pause is None:
                    break
                if pause > 0 and not self.stopping.is_set():   # a stop() during a turn was cleared with wakeup
                    if self.outage.down:
                        # a finished job must not cut the backoff short; an outage another thread
                        # noticed after this turn must not wait out a whole poll interval
                        self.stopping.wait(min(pause, self.outage.backoff.max_s))
                    else:
                        self.wakeup.wait(pause)
        except DatabaseUnavailable:
            gave_up = True
            raise
        finally:
            self.shutdown(grace=not gave_up)

    def report(self) -> None:
        """Every report_every_s, one log line of what was done since the last one."""
        now = self.monotonic()
        if not self.options.report_every_s or now < self._next_report:
            return
        self._next_report = now + self.options.report_every_s
        since = self.stats.outcomes - self._reported
        self._reported = Counter(self.stats.outcomes)
        if since or self.running:
            log.info("last %.0f s: %s; %d in flight", self.options.report_every_s,
                     ", ".join(f"{n} {kind}" for kind, n in sorted(since.items())) or "nothing finished",
                     len(self.running) + len(self.overrun))

    def stop(self) -> None:
        """Stop reading; in-flight work finishes (or is given back) in shutdown()."""
        self.stopping.set()
        self.wakeup.set()
        if self.hurry is not None:
            self.hurry(STOP_CALL_CAP_S)

    def shutdown(self, grace: bool = True) -> None:
        """Let in-flight work finish within the grace period, then cancel the rest, wait for it to
        return (so a sandboxed process of a given-back run is dead before its message is visible
        again) and give its messages back. The database being away costs no more than the grace."""
        self.stopping.set()
        grace_end = self.monotonic() + (self.options.shutdown_grace_s if grace else 0.0)
        try:
            while self.running and self.monotonic() < grace_end:
                wait_s = min(0.5, max(0.0, grace_end - self.monotonic()))
                if self.outage.down:        # nothing to write meanwhile: just wait for the work
                    self.wakeup.clear()
                    self.collect()
                    if self.running:
                        self.wakeup.wait(min(wait_s, self._until_next_deadline()))
                    continue
                try:
                    self.run_once(wait_s=wait_s)
                except StoreError as exc:
                    if not is_transient(exc):
                        raise
                    self.outage.failed(exc, budget=False)
            self.collect()
            returned = self._cancel_unfinished()
            self._write_back(returned)
        finally:
            self.pool.stop()
            for thread in (self._listener, self._control_thread):
                if thread is not None:
                    thread.join(LISTEN_SLICE_S + 5)

    def _cancel_unfinished(self) -> dict[str, list[ReadMessage]]:
        """Cancel every job still running (and wait, bounded, for the ones that overran): returns
        the messages of the cancelled jobs whose threads have returned, by queue. What a cancelled
        job returns is discarded: it is given back, not answered."""
        unfinished = list(self.running.values())
        waited = unfinished + list(self.overrun)
        for job in waited:
            job.ctx.cancelled.set()
        # real time: these are threads (and their sandboxes) coming back, whatever clock the loop uses
        until = time.monotonic() + self.options.give_back_wait_s
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
        if stuck:
            log.warning("%d handler(s) did not return within %.0f s of being cancelled; their messages are "
                        "not given back (they come back when their lease expires)", stuck,
                        self.options.give_back_wait_s)
        self.collect()      # discards what the cancelled jobs returned
        return returned

    def _write_back(self, returned: dict[str, list[ReadMessage]]) -> None:
        """The outcomes still held, and the given-back messages, written once if the database is there."""
        pending = len(self.finals) + len(self.retries)
        given_back = sum(len(ids) for ids in returned.values())
        if self.outage.down:
            if pending or given_back:
                log.warning("database unavailable at shutdown: %d outcome(s) not stored, %d message(s) not "
                            "given back; they come back when their lease expires", pending, given_back)
            return
        try:
            self.complete()
            for queue_name, messages in returned.items():
                log.warning("giving back %d unfinished message(s) of %s", len(messages), queue_name)
                self.store.release(queue_name, [m.msg_id for m in messages], [m.read_ct for m in messages])
        except StoreError as exc:
            if not is_transient(exc):
                raise
            log.warning("database unavailable at shutdown (%s): %d outcome(s) not stored, %d message(s) not "
                        "given back; they come back when their lease expires", first_line(exc),
                        len(self.finals) + len(self.retries), given_back)

    def _listen(self) -> None:
        """Wake the loop on NOTIFY. While the database is away the loop's own attempts tell when
        it is back; a LISTEN connection lost meanwhile backs off like the loop, quietly."""
        failures = 0
        while not self.stopping.is_set():
            if self.outage.down:
                self.stopping.wait(LISTEN_SLICE_S)
                continue
            try:
                # short slices, so that stop() is noticed at once whatever the poll interval
                woke = self.store.wait_for_messages(self.options.queues,
                                                    timeout_s=min(self.options.poll_interval_s, LISTEN_SLICE_S))
            except Exception as exc:  # noqa: BLE001 - polling is the fallback; the loop reports outages
                failures += 1
                if failures == 1:
                    log.info("LISTEN connection lost (%s); polling until it is back", first_line(exc))
                self.stopping.wait(self.outage.backoff.delay(failures, self.rand()))
                continue
            if failures:
                log.info("LISTEN connection back after %d failed attempt(s)", failures)
                failures = 0
            if woke:
                self.wakeup.set()

    def _run_periodic(self, name: str, interval: float, job: Callable[[], object]) -> None:
        """Run one periodic job every interval (the first time after a random tenth of it) until stop."""
        due = self.monotonic() + interval * self.rand() * 0.1
        while not self.stopping.is_set():
            now = self.monotonic()
            if now >= due:
                due = now + interval
                if not self.outage.down:       # it would fail too; the loop reports the outage
                    try:
                        job()
                    except Exception as exc:  # noqa: BLE001 - a failing maintenance job must not stop consuming
                        if isinstance(exc, StoreError) and is_transient(exc):
                            # the outage as the loop sees it: one line when it begins, silence after
                            self.outage.failed(exc, budget=False)
                        else:
                            log.exception("periodic job %s failed", name)
            self.stopping.wait(max(0.1, due - self.monotonic()))

    # --- steering: paused queues, drain and stop (genesis.fleet_control) --------------------

    def apply_control(self, state: ControlState) -> None:
        """Obey what the control table says now: read no paused queue (a resumed one at once);
        on drain take nothing new and exit once what is held is finished; on stop, as SIGTERM."""
        if state.paused != self.paused:
            newly, resumed = sorted(state.paused - self.paused), sorted(self.paused - state.paused)
            self.paused = state.paused
            if newly:
                log.info("paused: %s (messages in flight finish; nothing new is read from it)", ",".join(newly))
            if resumed:
                log.info("resumed: %s", ",".join(resumed))
                self.wakeup.set()
        if state.command == "stop" and not self.stopping.is_set():
            log.info("stop requested (genesis consumers stop): finishing in-flight work, giving back the rest")
            self._honoured("stop")
            self.stop()
        elif state.command == "drain" and not self.draining.is_set() and not self.stopping.is_set():
            log.info("drain requested (genesis consumers drain): taking no new messages, finishing the %d held",
                     len(self.running))
            self._honoured("drain")
            self.draining.set()
            self.wakeup.set()

    def _honoured(self, command: Command) -> None:
        assert self.control is not None
        try:
            self.control.command_honoured(command)
        except Exception as exc:  # noqa: BLE001 - only what status shows; the command is obeyed anyway
            log.debug("could not record that %s was honoured: %s", command, first_line(exc))

    def refresh_control(self, *, quiet: bool = False) -> bool:
        """Read the control table and obey it; False if it could not be read (the caller retries)."""
        if self.control is None:
            return True
        try:
            state = self.control.control_state()
        except Exception as exc:  # noqa: BLE001 - the loop reports outages; this retries on its own
            if not quiet:
                log.debug("could not read the control table: %s", first_line(exc))
            return False
        self.apply_control(state)
        return True

    def _watch_control(self) -> None:
        """Read the control table whenever its channel says it changed (NOTIFY), and at least
        every control_poll_s in case a notification was missed; a lost channel is opened again
        (and the table read again) with the loop's backoff, polling meanwhile."""
        assert self.control is not None
        failures = 0
        next_read = self.monotonic() + self.options.control_poll_s
        while not self.stopping.is_set():
            now = self.monotonic()
            if now >= next_read:
                next_read = now + (self.options.control_poll_s if self.refresh_control() else LISTEN_SLICE_S)
                continue
            if self.outage.down:
                self.stopping.wait(min(LISTEN_SLICE_S, max(0.0, next_read - now)))
                continue
            try:
                changed = self.control.wait_for_control(timeout_s=min(LISTEN_SLICE_S, max(0.0, next_read - now)))
            except Exception as exc:  # noqa: BLE001 - polling at next_read is the fallback
                failures += 1
                if failures == 1:
                    log.info("control channel lost (%s); reading the control table every %g s until it is back",
                             first_line(exc), self.options.control_poll_s)
                self.stopping.wait(self.outage.backoff.delay(failures, self.rand()))
                continue
            if failures:
                log.info("control channel back after %d failed attempt(s)", failures)
                failures = 0
            if changed:
                next_read = 0.0
