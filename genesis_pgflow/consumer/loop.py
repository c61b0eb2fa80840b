"""The consumer: a producer, an executor and a completer, and the loop that ties them together.

    producer (reads)  ->  executor (worker pool, deadlines)  ->  completer (writes, own thread)

Each turn of the loop reads what the workers can start soon (producer.py), starts it on the pool
and collects what finished or timed out (executor.py), and hands the outcomes to the completer
(completer.py), which writes them many to a transaction on a thread of its own while the loop
reads on. The loop also keeps the leases of what is running or waiting to be written, wakes on
NOTIFY, obeys the control table (pause, drain, stop), runs the periodic jobs, and at shutdown
lets in-flight work finish within the grace period and gives the rest back. The database being
away is the Outage's to count (outage.py)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.errors import DatabaseUnavailable
from genesis_pgflow.messages import Outcome, ReadMessage, RunStart
from genesis_pgflow.store.control import Command, ControlState, ControlStore
from genesis_pgflow.store.database import StoreError, first_line, is_transient
from genesis_pgflow.store.queue import QueueStore

from .completer import Completer, Stats
from .executor import Executor, Job, WorkerPool
from .options import ConsumerOptions
from .outage import Outage
from .producer import Producer

log = logging.getLogger(__package__)

PeriodicJob = tuple[str, float, Callable[[], object]]
LISTEN_SLICE_S = 0.5
STOP_CALL_CAP_S = 5.0       # once stopping, no database call may last longer


class Consumer:
    def __init__(self, store: QueueStore, dispatcher: Dispatcher, options: ConsumerOptions, *,
                 monotonic: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random,
                 periodic: Sequence[PeriodicJob] = (), hurry: Callable[[float], None] | None = None,
                 control: ControlStore | None = None):
        self.store = store
        self.dispatcher = dispatcher
        self.options = options
        self.monotonic = monotonic
        self.rand = rand
        self.periodic = list(periodic)
        # paused queues and drain/stop commands (genesis queues|consumers ...); None: not steered
        self.control = control
        self.paused: frozenset[str] = frozenset()
        self.draining = threading.Event()     # told to drain: take nothing new, finish what is held, exit
        self.stopping = threading.Event()
        # set by whatever the loop may be waiting for: a job done, a batch written, a NOTIFY, an outage
        self.wakeup = threading.Event()
        # called with STOP_CALL_CAP_S on stop(): the database layer then cuts any call that would
        # keep shutdown waiting on a silent server
        self.hurry = hurry
        self.outage = Outage(options.max_outage_s, monotonic=monotonic, rand=rand,
                             report_every_s=options.outage_report_every_s, on_down=self.wakeup.set)
        self.executor = Executor(dispatcher, options.parallel, monotonic=monotonic, on_done=self.wakeup.set)
        self.completer = Completer(store, dispatcher, self.outage, batch_size=options.batch_size,
                                   flush_after_s=options.flush_after_s, monotonic=monotonic,
                                   on_written=self.wakeup.set, more_coming=lambda: bool(self.executor.running))
        self.producer = Producer(store, dispatcher, self.executor, self.completer, options, monotonic)
        self.last_iteration: float | None = None      # read by /healthz: the loop is alive
        self._next_renewal = monotonic() + options.lease_s / 3
        self._next_report = monotonic() + options.report_every_s
        self._reported: Counter = Counter()
        self._listener: threading.Thread | None = None
        self._control_thread: threading.Thread | None = None

    # --- the parts, as operators and tests see them ------------------------------------------

    @property
    def running(self) -> dict[tuple[str, int], Job]:
        return self.executor.running

    @property
    def overrun(self) -> set[Job]:
        return self.executor.overrun

    @property
    def pool(self) -> WorkerPool:
        return self.executor.pool

    @property
    def stats(self) -> Stats:
        return self.completer.stats

    @property
    def observers(self) -> list[Callable[[Sequence[Outcome]], None]]:
        return self.completer.observers

    @property
    def retries(self) -> list[Outcome]:
        """Retries collected and not yet written."""
        return self.completer.retries

    def free_slots(self) -> int:
        return self.producer.free_slots()

    # --- the three steps ---------------------------------------------------------------------

    def fetch(self) -> int:
        return self.producer.fetch(self.paused)

    def collect(self) -> None:
        """Hand what finished (or timed out) to the completer."""
        self.completer.add(self.executor.collect())

    def complete(self) -> None:
        """Write everything collected now, on this thread (shutdown, and tests that turn the loop by hand)."""
        while self.completer.flush(now=True):
            pass

    def renew_leases(self, force: bool = False) -> None:
        """Keep the messages of live jobs, and of outcomes not yet written, invisible to other consumers."""
        now = self.monotonic()
        if not force and now < self._next_renewal:
            return
        self._next_renewal = now + self.options.lease_s / 3
        held: dict[str, list[int]] = defaultdict(list)
        for queue_name, msg_id in self._held():
            held[queue_name].append(msg_id)
        for queue_name, ids in held.items():
            kept = self.store.extend_leases(queue_name, ids, self.options.lease_s)
            lost = set(ids) - kept
            if lost:
                lost &= set(self._held())      # not what the completer wrote meanwhile
            for msg_id in sorted(lost):
                log.warning("message %s/%s left its queue while held here", queue_name, msg_id)

    def record_running(self) -> None:
        """Record `running` the runs held longer than record_running_after_s. A run that ends
        sooner (most do) is written once, when it ends: no write at the read, no dead row."""
        due = self.executor.unrecorded(self.options.record_running_after_s)
        if not due:
            return
        self.store.record_running([RunStart(job.task.message, job.task.workflow_id, job.task.started_at)
                                   for job in due])
        for job in due:
            job.recorded = True

    def _held(self) -> list[tuple[str, int]]:
        return list(self.executor.running) + [(o.message.queue, o.message.msg_id) for o in self.completer.held()]

    # --- driving the loop -----------------------------------------------------------------

    def run_once(self, wait_s: float = 0.0) -> int:
        """One iteration: fetch, wait up to wait_s for a job to finish, collect, renew leases
        (and, when the completer has no thread of its own, write what is due)."""
        self._raise_completer_failure()
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
        if wait_s > 0 and self.executor.busy() and not self._write_due():
            self.wakeup.wait(min(wait_s, self._until_next_deadline()))
            self.collect()
        if not self.completer.threaded:
            while self._write_due() and self.completer.flush(now=True):
                pass
        self.renew_leases()
        self.record_running()
        return fetched

    def _write_due(self) -> bool:
        """Without a completer thread: whether the loop should write now. Outcomes wait up to
        flush_after_s for company, unless nothing else runs or the consumer is stopping."""
        if self.completer.threaded or not self.completer.backlog():
            return False
        return self.stopping.is_set() or self.completer.due_in() == 0

    def _until_next_deadline(self) -> float:
        now = self.monotonic()
        due = [self.executor.next_deadline(), self._next_renewal,
               self.executor.next_record(self.options.record_running_after_s)]
        if not self.completer.threaded:
            due.append(now + self.completer.due_in())
        return max(0.0, min(due) - now)

    def _raise_completer_failure(self) -> None:
        """What ended the completer's thread (the outage's budget, or a bug) ends the consumer."""
        if self.completer.failure is not None:
            raise self.completer.failure

    def idle(self) -> bool:
        return not self.executor.running and not self.completer.backlog()

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
        if not self.completer.failing:      # the writes fail too: the outage is not over
            self.outage.recovered()
        self.report()
        if drained:
            log.info("drained: every queue is empty and nothing is in flight")
            return None
        # nothing read and nothing running: wait for a NOTIFY, the poll, or the completer's write
        return self.poll_wait_s() if fetched == 0 and not self.executor.running else 0.0

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
        self.completer.start()
        gave_up = False
        try:
            while not self.stopping.is_set():
                self.last_iteration = self.monotonic()
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
        counted = self.completer.counted()
        since = counted - self._reported
        self._reported = counted
        if since or self.executor.running:
            log.info("last %.0f s: %s; %d in flight", self.options.report_every_s,
                     ", ".join(f"{n} {kind}" for kind, n in sorted(since.items())) or "nothing finished",
                     self.executor.busy())

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
            while self.executor.running and self.monotonic() < grace_end:
                wait_s = min(0.5, max(0.0, grace_end - self.monotonic()))
                if self.outage.down or self.completer.failure is not None:
                    # nothing to write meanwhile: just wait for the work
                    self.wakeup.clear()
                    self.collect()
                    if self.executor.running:
                        self.wakeup.wait(min(wait_s, self._until_next_deadline()))
                    continue
                try:
                    self.run_once(wait_s=wait_s)
                except StoreError as exc:
                    if not is_transient(exc):
                        raise
                    self.outage.failed(exc, budget=False)
            self.collect()
            self.completer.stop(STOP_CALL_CAP_S + 5)    # what it was writing is written; the rest is ours
            returned, stuck = self.executor.cancel_all(self.options.give_back_wait_s)
            if stuck:
                log.warning("%d handler(s) did not return within %.0f s of being cancelled; their messages are "
                            "not given back (they come back when their lease expires)", stuck,
                            self.options.give_back_wait_s)
            self._write_back(returned)
        finally:
            self.completer.stop(0)
            self.executor.stop()
            for thread in (self._listener, self._control_thread):
                if thread is not None:
                    thread.join(LISTEN_SLICE_S + 5)

    def _write_back(self, returned: dict[str, list[ReadMessage]]) -> None:
        """The outcomes still held, and the given-back messages, written once if the database is there."""
        pending = self.completer.backlog()
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
                        self.completer.backlog(), given_back)

    def _listen(self) -> None:
        """Wake the loop on NOTIFY. While the database is away the loop's own attempts tell when
        it is back; a LISTEN connection lost meanwhile backs off like the loop, quietly."""
        failures = 0
        while not self.stopping.is_set():
            if self.outage.down:
                self.producer.listening = False     # what is notified meanwhile may go unheard
                self.stopping.wait(LISTEN_SLICE_S)
                continue
            try:
                # short slices, so that stop() is noticed at once whatever the poll interval
                woke = self.store.wait_for_messages(self.options.queues,
                                                    timeout_s=min(self.options.poll_interval_s, LISTEN_SLICE_S))
            except Exception as exc:  # noqa: BLE001 - polling is the fallback; the loop reports outages
                self.producer.listening = False     # nothing tells of new messages: read every queue every turn
                failures += 1
                if failures == 1:
                    log.info("LISTEN connection lost (%s); polling until it is back", first_line(exc))
                self.stopping.wait(self.outage.backoff.delay(failures, self.rand()))
                continue
            if failures:
                log.info("LISTEN connection back after %d failed attempt(s)", failures)
                failures = 0
            if woke:
                if self.options.take_after_s:     # what is notified is not its to take yet
                    self.stopping.wait(self.options.take_after_s)
                self.producer.notified(woke)
                self.wakeup.set()
            self.producer.listening = True

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
