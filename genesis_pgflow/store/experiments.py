"""Experiment records: experiments, their test runs and their sandboxes' history, and the advisory
locks that let one consumer at a time run a maintenance job or a given experiment.

An experiment_id belongs to the instance_id that first used it: `experiment_started` refuses (returns
False, changing nothing) an id recorded for another instance. A run's `output_tail` is the last
OUTPUT_TAIL_CHARS characters of what its test suite printed; it may hold anything the code under
test could read, so `show_experiment` leaves it out unless asked (`output=True`).

Resuming (docs/interface.md): an experiment is held by one delivery of its request, its fence
(queue, msg_id and the message's read_ct). `experiment_started(start, fence)` claims it: a later
delivery of the same message takes it over and gets the phases already finished (PHASES, with
what each left for the next), a new message for the id starts it afresh, and an older delivery
than the recorded one is refused (AttemptSuperseded). Every phase, result or failure written with
a fence is refused the same way unless that fence still holds the experiment, so a consumer that
lost its lease can neither write a phase nor a result.

`ExperimentRecords` is the seam; `PgExperimentRecords` keeps the records in the genesis schema
(sql/experiments.sql) and `MemoryExperimentRecords` is its in-memory twin. One conformance suite
(tests/integration/test_experiment_records.py) runs against both.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from psycopg.types.json import Jsonb

from genesis_pgflow.errors import RetryableError
from genesis_pgflow.store.database import Conn, Database, maintenance_lock, one
from genesis_pgflow.store.queries import sql

SANDBOX_EVENTS = ("created", "rolled_back", "preserved", "cleaned_up", "integrity_ok", "integrity_failed")
EXPERIMENT_COLUMNS = (
    "experiment_id", "instance_id", "experiment_type", "description", "risk_level", "repo", "base_ref", "status",
    "attempts", "baseline_commit", "change_commit", "sandbox_path", "success_rate", "regression",
    "baseline_success_rate", "test_count", "failures", "duration_ms", "recommendation", "rolled_back", "error",
    "started_at", "finished_at",
)
# shown by show_experiment only (list_experiments leaves the whole result out)
SHOWN_ONLY = ("result", "fence_attempt")
METRICS = ("success_rate", "regression", "baseline_success_rate", "test_count", "failures", "duration_ms")
OUTPUT_TAIL_CHARS = 2000
# an experiment's phases, in the order they run (handlers/experiments/runner.py)
PHASES = ("copy", "baseline", "change", "measure", "decide")


class AttemptSuperseded(RetryableError):
    """A later delivery of the request (or a newer request for the id) holds the experiment now:
    this consumer lost its lease, and stops without writing anything more."""

    code = "attempt_superseded"


@dataclass(frozen=True)
class Fence:
    """The delivery holding an experiment: the request's queue, its msg_id, and read_ct (attempt)."""

    queue: str
    msg_id: int
    attempt: int


@dataclass(frozen=True)
class Claim:
    """What experiment_started found: owned (False: another instance_id owns the id) and, for a
    later delivery of the same request, the phases already finished (phase -> the state it left)."""

    owned: bool
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: int = 0

    def __bool__(self) -> bool:
        return self.owned


@dataclass(frozen=True)
class SandboxEvent:
    """One event in a sandbox's history, written with the phase that caused it."""

    sandbox_path: str
    event: str
    size_bytes: int | None = None
    age_s: float | None = None
    detail: str | None = None


@dataclass(frozen=True)
class ExperimentStart:
    """What is known of an experiment when it starts."""

    experiment_id: str
    instance_id: str
    experiment_type: str
    description: str
    risk_level: str
    repo: str
    base_ref: str
    sandbox_path: str


@dataclass(frozen=True)
class RunRecord:
    """One test-suite run: phase is 'baseline' or 'change'."""

    phase: str
    commit: str | None
    command: list[str]
    returncode: int | None
    timed_out: bool
    passed: int
    failed: int
    errors: int
    skipped: int
    duration_ms: float
    output_tail: str = ""
    step: str | None = None  # the runner's phase that ran it: baseline, change or measure (a rerun)

    @property
    def test_count(self) -> int:
        return self.passed + self.failed + self.errors

    @property
    def success_rate(self) -> float:
        return self.passed / self.test_count if self.test_count else 0.0


class ExperimentRecords(Protocol):
    """Where ExperimentRunner and sandbox maintenance keep what they did."""

    def experiment_started(self, start: ExperimentStart, fence: Fence | None = None) -> Claim:
        """A new experiment, or a new attempt at one (its previous outcome and phases are cleared),
        or, given the fence of a later delivery of the request that holds it, that experiment
        resumed (Claim.phases: the phases finished so far). A false Claim, and nothing changed, if
        the experiment_id is recorded for another instance_id; AttemptSuperseded if the fence is
        an older delivery than the recorded one."""

    def phase_finished(self, experiment_id: str, phase: str, state: dict[str, Any], *, fence: Fence | None = None,
                       runs: Sequence[RunRecord] = (), events: Sequence[SandboxEvent] = (),
                       baseline_commit: str | None = None, change_commit: str | None = None) -> None:
        """One phase finished, in one transaction with the runs and sandbox events it made and the
        commits it found: state is what the next phase needs. AttemptSuperseded (nothing written)
        unless the fence still holds the experiment."""

    def commits_recorded(self, experiment_id: str, *, baseline_commit: str | None = None,
                         change_commit: str | None = None) -> None:
        """The baseline commit, and later the change's commit."""

    def run_recorded(self, experiment_id: str, run: RunRecord) -> None:
        """One test-suite run of the current attempt."""

    def experiment_finished(self, experiment_id: str, result: dict[str, Any], *, fence: Fence | None = None,
                            events: Sequence[SandboxEvent] = ()) -> None:
        """The handler's result (status, metrics, recommendation, rolled_back, baseline_commit and the
        whole result kept as `result`), recorded as the decide phase; fenced as phase_finished."""

    def experiment_failed(self, experiment_id: str, error: dict[str, Any], *, rolled_back: bool,
                          duration_ms: float, fence: Fence | None = None, runs: Sequence[RunRecord] = ()) -> None:
        """The experiment ended in an error ({"code", "message", "details"}), with the runs of the
        phase it broke off in; fenced as phase_finished."""

    def sandbox_event(self, experiment_id: str, sandbox_path: str, event: str, *, size_bytes: int | None = None,
                      age_s: float | None = None, detail: str | None = None) -> None:
        """One event in a sandbox's history (SANDBOX_EVENTS)."""

    def list_experiments(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The latest experiments, newest first."""

    def show_experiment(self, experiment_id: str, *, output: bool = False) -> dict[str, Any] | None:
        """One experiment with "metrics", its "result", its "phases", its "runs" and its
        "sandbox_events"; None if unknown. The runs' output_tail only with output=True."""

    def experiment_owners(self, experiment_ids: list[str]) -> dict[str, dict[str, Any]]:
        """experiment_id -> {"instance_id", "status", "started_at", "finished_at"} of the known ones."""

    def sandbox_events(self, *, experiment_id: str | None = None, event: str | None = None,
                       limit: int = 1000) -> list[dict[str, Any]]:
        """Sandbox history, oldest first."""

    def maintenance_lock(self, job: str) -> Any:
        """A context manager yielding True if this caller now holds the job's lock, False if another
        holder has it (never waits). Released on exit."""

    def experiment_slot(self, limit: int) -> Any:
        """A context manager yielding True if this caller now holds one of `limit` experiment slots
        shared by every consumer of the database, False if all are taken (never waits)."""

    def experiment_lock(self, experiment_id: str) -> Any:
        """A context manager yielding True if this caller now holds the experiment_id (one consumer
        at a time across every consumer of the database), False if another holds it (never waits)."""


def with_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """An experiment row with its metrics gathered under "metrics" too (as in the handler's result)."""
    return {**row, "metrics": {name: row.get(name) for name in METRICS}}


def _check_event(event: str) -> None:
    if event not in SANDBOX_EVENTS:
        raise ValueError(f"unknown sandbox event {event!r}; known: {', '.join(SANDBOX_EVENTS)}")


def _run_params(experiment_id: str, run: RunRecord) -> dict[str, Any]:
    return {**asdict(run), "experiment_id": experiment_id, "command": Jsonb(run.command),
            "output_tail": run.output_tail[-OUTPUT_TAIL_CHARS:], "test_count": run.test_count,
            "success_rate": run.success_rate}


def _without_output(runs: list[dict[str, Any]], output: bool) -> list[dict[str, Any]]:
    return runs if output else [{k: v for k, v in run.items() if k != "output_tail"} for run in runs]


def _finish_params(experiment_id: str, result: dict[str, Any]) -> dict[str, Any]:
    metrics = result.get("metrics") or {}
    return {"experiment_id": experiment_id, "status": result["status"],
            "recommendation": result["recommendation"], "rolled_back": bool(result["rolled_back"]),
            "baseline_commit": result.get("baseline_commit"),
            **{name: metrics.get(name) for name in METRICS}}


def _fence_params(fence: Fence | None) -> dict[str, Any]:
    return {"queue": fence.queue if fence else None, "msg_id": fence.msg_id if fence else None,
            "attempt": fence.attempt if fence else None}


def _superseded(experiment_id: str, fence: Fence | None, holder: Any = None) -> AttemptSuperseded:
    held = f" (held by attempt {holder})" if holder is not None else ""
    return AttemptSuperseded(
        f"experiment {experiment_id}: attempt {fence.attempt if fence else '?'} no longer holds it{held}; "
        "it stops here without writing anything more",
        details={"experiment_id": experiment_id, "attempt": fence.attempt if fence else None,
                 "held_by_attempt": holder, "rolled_back": False})


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")


def _in_phase_order(phases: dict[str, Any]) -> dict[str, Any]:
    return {name: phases[name] for name in PHASES if name in phases}


# --- PostgreSQL -----------------------------------------------------------------------------


class PgExperimentRecords:
    """The records in genesis.experiments, genesis.experiment_runs and genesis.sandbox_events."""

    def __init__(self, db: Database):
        self.db = db

    def _execute(self, query: str, params: dict[str, Any]) -> None:
        self.db.run(lambda conn: conn.execute(query, params))

    def experiment_started(self, start: ExperimentStart, fence: Fence | None = None) -> Claim:
        ids = {"experiment_id": start.experiment_id}

        def fresh(conn: Conn) -> Claim:
            row = conn.execute(sql("experiment_start"), {**asdict(start), **_fence_params(fence)}).fetchone()
            if row is None:
                return Claim(False)
            conn.execute(sql("experiment_phases_clear"), ids)
            return Claim(True, {}, row["attempts"])

        def tx(conn: Conn) -> Claim:
            current = conn.execute(sql("experiment_claim_row"), ids).fetchone() if fence else None
            if current is None or current["instance_id"] != start.instance_id:
                return fresh(conn)
            if (current["fence_queue"], current["fence_msg_id"]) != (fence.queue, fence.msg_id):  # type: ignore[union-attr]
                return fresh(conn)   # a new request for the id: from its copy again
            if current["fence_attempt"] is not None and fence.attempt < current["fence_attempt"]:  # type: ignore[union-attr]
                raise _superseded(start.experiment_id, fence, current["fence_attempt"])
            row = one(conn.execute(sql("experiment_resume"), {**ids, "attempt": fence.attempt}))  # type: ignore[union-attr]
            phases = {r["phase"]: r["state"] for r in conn.execute(sql("experiment_phases_of"), ids)}
            return Claim(True, _in_phase_order(phases), row["attempts"])
        return self.db.run(tx)

    def _fenced(self, conn: Conn, experiment_id: str, fence: Fence | None, *, baseline_commit: str | None = None,
                change_commit: str | None = None) -> int | None:
        """Check the fence (row-locking the experiment until the write commits) and keep the
        commits; the attempt the phase is recorded under (None: no such experiment, and no fence
        to answer for, so nothing to write)."""
        row = conn.execute(sql("experiment_fence"), {
            "experiment_id": experiment_id, "baseline_commit": baseline_commit, "change_commit": change_commit,
            **_fence_params(fence)}).fetchone()
        if row is None and fence is None:
            return None
        if row is None:
            holder = conn.execute(sql("experiment_claim_row"), {"experiment_id": experiment_id}).fetchone()
            raise _superseded(experiment_id, fence, holder["fence_attempt"] if holder else None)
        return int(fence.attempt if fence else (row["fence_attempt"] or 0))

    def _insert_runs(self, conn: Conn, experiment_id: str, runs: Sequence[RunRecord]) -> None:
        for run in runs:
            conn.execute(sql("experiment_run_insert"), _run_params(experiment_id, run))

    def _insert_events(self, conn: Conn, experiment_id: str, events: Sequence[SandboxEvent]) -> None:
        for event in events:
            _check_event(event.event)
            conn.execute(sql("sandbox_event_insert"), {"experiment_id": experiment_id, **asdict(event)})

    def phase_finished(self, experiment_id: str, phase: str, state: dict[str, Any], *, fence: Fence | None = None,
                       runs: Sequence[RunRecord] = (), events: Sequence[SandboxEvent] = (),
                       baseline_commit: str | None = None, change_commit: str | None = None) -> None:
        _check_phase(phase)

        def tx(conn: Conn) -> None:
            attempt = self._fenced(conn, experiment_id, fence, baseline_commit=baseline_commit,
                                   change_commit=change_commit)
            if attempt is None:
                return
            conn.execute(sql("experiment_phase_insert"), {"experiment_id": experiment_id, "phase": phase,
                                                          "attempt": attempt, "state": Jsonb(state)})
            self._insert_runs(conn, experiment_id, runs)
            self._insert_events(conn, experiment_id, events)
        self.db.run(tx)

    def commits_recorded(self, experiment_id: str, *, baseline_commit: str | None = None,
                         change_commit: str | None = None) -> None:
        self._execute(sql("experiment_set_commits"), {
            "experiment_id": experiment_id, "baseline_commit": baseline_commit, "change_commit": change_commit})

    def run_recorded(self, experiment_id: str, run: RunRecord) -> None:
        self._execute(sql("experiment_run_insert"), _run_params(experiment_id, run))

    def experiment_finished(self, experiment_id: str, result: dict[str, Any], *, fence: Fence | None = None,
                            events: Sequence[SandboxEvent] = ()) -> None:
        def tx(conn: Conn) -> None:
            attempt = self._fenced(conn, experiment_id, fence)
            if attempt is None:
                return
            conn.execute(sql("experiment_phase_insert"), {"experiment_id": experiment_id, "phase": "decide",
                                                          "attempt": attempt, "state": Jsonb(result)})
            self._insert_events(conn, experiment_id, events)
            conn.execute(sql("experiment_finish"), {**_finish_params(experiment_id, result), "result": Jsonb(result)})
        self.db.run(tx)

    def experiment_failed(self, experiment_id: str, error: dict[str, Any], *, rolled_back: bool,
                          duration_ms: float, fence: Fence | None = None, runs: Sequence[RunRecord] = ()) -> None:
        def tx(conn: Conn) -> None:
            if self._fenced(conn, experiment_id, fence) is None:
                return
            self._insert_runs(conn, experiment_id, runs)
            conn.execute(sql("experiment_fail"), {"experiment_id": experiment_id, "error": Jsonb(error),
                                                  "rolled_back": rolled_back, "duration_ms": duration_ms})
        self.db.run(tx)

    def sandbox_event(self, experiment_id: str, sandbox_path: str, event: str, *, size_bytes: int | None = None,
                      age_s: float | None = None, detail: str | None = None) -> None:
        _check_event(event)
        self._execute(sql("sandbox_event_insert"), {"experiment_id": experiment_id, "sandbox_path": sandbox_path,
                                               "event": event, "size_bytes": size_bytes, "age_s": age_s,
                                               "detail": detail})

    def list_experiments(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.db.run(lambda conn: conn.execute(sql("experiments_list"),
                                                     {"status": status, "limit": limit}).fetchall())
        return [with_metrics(row) for row in rows]

    def show_experiment(self, experiment_id: str, *, output: bool = False) -> dict[str, Any] | None:
        def tx(conn: Conn) -> dict[str, Any] | None:
            row = conn.execute(sql("experiment_get"), {"experiment_id": experiment_id}).fetchone()
            if row is None:
                return None
            runs = conn.execute(sql("experiment_runs_of"), {"experiment_id": experiment_id}).fetchall()
            events = conn.execute(sql("sandbox_events_list"), {"experiment_id": experiment_id, "event": None,
                                                               "limit": 1000}).fetchall()
            phases = {r["phase"]: {"attempt": r["attempt"], "finished_at": r["finished_at"]}
                      for r in conn.execute(sql("experiment_phases_of"), {"experiment_id": experiment_id})}
            return {**with_metrics(row), "phases": _in_phase_order(phases), "runs": _without_output(runs, output),
                    "sandbox_events": events}
        return self.db.run(tx)

    def experiment_owners(self, experiment_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not experiment_ids:
            return {}
        rows = self.db.run(lambda conn: conn.execute(sql("experiment_owners"), {"ids": experiment_ids}).fetchall())
        return {row["experiment_id"]: {k: v for k, v in row.items() if k != "experiment_id"} for row in rows}

    def sandbox_events(self, *, experiment_id: str | None = None, event: str | None = None,
                       limit: int = 1000) -> list[dict[str, Any]]:
        return self.db.run(lambda conn: conn.execute(sql("sandbox_events_list"), {
            "experiment_id": experiment_id, "event": event, "limit": limit}).fetchall())

    def maintenance_lock(self, job: str) -> AbstractContextManager[bool]:
        return maintenance_lock(self.db, job)

    @contextmanager
    def experiment_slot(self, limit: int) -> Iterator[bool]:
        # A connection of its own, outside the pool, for as long as the experiment runs (up to
        # experiment_timeout_ms): the pool stays free for the consumer, and the slot goes with
        # the connection if this process dies.
        with self.db.connect("experiment", autocommit=True) as conn:
            for slot in range(limit):
                if one(conn.execute(sql("experiment_slot_try_lock"), {"slot": slot}))[0]:
                    try:
                        yield True
                    finally:
                        if not conn.closed:
                            conn.execute(sql("experiment_slot_unlock"), {"slot": slot})
                    return
            yield False

    @contextmanager
    def experiment_lock(self, experiment_id: str) -> Iterator[bool]:
        # Session-level, on a connection of its own held for the whole experiment (like a slot):
        # the lock goes with the connection if this process dies, and a second consumer given the
        # same id meanwhile is told at once rather than made to wait.
        with self.db.connect("experiment", autocommit=True) as conn:
            locked = bool(one(conn.execute(sql("experiment_try_lock"), {"experiment_id": experiment_id}))[0])
            try:
                yield locked
            finally:
                if locked and not conn.closed:
                    conn.execute(sql("experiment_unlock"), {"experiment_id": experiment_id})


# --- in memory ------------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class MemoryExperimentRecords:
    """The in-memory twin of PgExperimentRecords, for handler tests without a database. Its
    maintenance locks are shared by every instance given the same `locks` dict (one per
    "database")."""

    now: Callable[[], dt.datetime] = _utcnow
    locks: dict[str, threading.Lock] = field(default_factory=dict)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    # experiment_id -> phase -> {"attempt", "state", "finished_at"}; experiment_id -> (queue, msg_id)
    phases: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    holders: dict[str, tuple[str | None, int | None]] = field(default_factory=dict)
    _mutex: threading.Lock = field(default_factory=threading.Lock)

    def experiment_started(self, start: ExperimentStart, fence: Fence | None = None) -> Claim:
        with self._mutex:
            previous = self.experiments.get(start.experiment_id)
            if previous is not None and previous["instance_id"] != start.instance_id:
                return Claim(False)
            holder = (fence.queue, fence.msg_id) if fence else (None, None)
            if fence is not None and previous is not None and self.holders.get(start.experiment_id) == holder:
                if previous["fence_attempt"] is not None and fence.attempt < previous["fence_attempt"]:
                    raise _superseded(start.experiment_id, fence, previous["fence_attempt"])
                previous.update(fence_attempt=fence.attempt, attempts=previous["attempts"] + 1)
                if previous["result"] is None:
                    previous.update(status="running", error=None, rolled_back=False, recommendation=None,
                                    finished_at=None)
                phases = {name: p["state"] for name, p in self.phases.get(start.experiment_id, {}).items()}
                return Claim(True, _in_phase_order(phases), previous["attempts"])
            row: dict[str, Any] = {name: None for name in (*EXPERIMENT_COLUMNS, *SHOWN_ONLY)}
            row.update(asdict(start), status="running", rolled_back=False, started_at=self.now(),
                       attempts=(previous["attempts"] + 1) if previous else 1,
                       fence_attempt=fence.attempt if fence else None)
            self.experiments[start.experiment_id] = row
            self.holders[start.experiment_id] = holder
            self.phases.pop(start.experiment_id, None)
            return Claim(True, {}, row["attempts"])

    def _fenced(self, experiment_id: str, fence: Fence | None) -> dict[str, Any] | None:
        """The experiment's row if the fence still holds it (call with the mutex held); None if
        there is no such experiment and no fence to answer for."""
        row = self.experiments.get(experiment_id)
        if row is None and fence is None:
            return None
        if row is None:
            raise _superseded(experiment_id, fence)
        if fence is not None and (self.holders.get(experiment_id) != (fence.queue, fence.msg_id)
                                  or row["fence_attempt"] != fence.attempt):
            raise _superseded(experiment_id, fence, row["fence_attempt"])
        return row

    def _add_run(self, experiment_id: str, row: dict[str, Any], run: RunRecord) -> None:
        record = {"attempt": row["attempts"], **asdict(run), "output_tail": run.output_tail[-OUTPUT_TAIL_CHARS:],
                  "test_count": run.test_count, "success_rate": run.success_rate, "recorded_at": self.now()}
        record["commit_sha"] = record.pop("commit")
        self.runs.append({"experiment_id": experiment_id, **record})

    def _add_event(self, experiment_id: str, event: SandboxEvent) -> None:
        _check_event(event.event)
        self.events.append({"experiment_id": experiment_id, **asdict(event), "recorded_at": self.now()})

    def _add_phase(self, experiment_id: str, row: dict[str, Any], phase: str, state: dict[str, Any],
                   fence: Fence | None) -> None:
        attempt = fence.attempt if fence else (row["fence_attempt"] or 0)
        self.phases.setdefault(experiment_id, {})[phase] = {"attempt": attempt, "state": state,
                                                            "finished_at": self.now()}

    def phase_finished(self, experiment_id: str, phase: str, state: dict[str, Any], *, fence: Fence | None = None,
                       runs: Sequence[RunRecord] = (), events: Sequence[SandboxEvent] = (),
                       baseline_commit: str | None = None, change_commit: str | None = None) -> None:
        _check_phase(phase)
        for event in events:
            _check_event(event.event)
        with self._mutex:
            row = self._fenced(experiment_id, fence)
            if row is None:
                return
            row["baseline_commit"] = baseline_commit or row["baseline_commit"]
            row["change_commit"] = change_commit or row["change_commit"]
            self._add_phase(experiment_id, row, phase, state, fence)
            for run in runs:
                self._add_run(experiment_id, row, run)
            for event in events:
                self._add_event(experiment_id, event)

    def commits_recorded(self, experiment_id: str, *, baseline_commit: str | None = None,
                         change_commit: str | None = None) -> None:
        with self._mutex:
            row = self.experiments.get(experiment_id)
            if row is not None:
                row["baseline_commit"] = baseline_commit or row["baseline_commit"]
                row["change_commit"] = change_commit or row["change_commit"]

    def run_recorded(self, experiment_id: str, run: RunRecord) -> None:
        with self._mutex:
            row = self.experiments.get(experiment_id)
            if row is not None:
                self._add_run(experiment_id, row, run)

    def experiment_finished(self, experiment_id: str, result: dict[str, Any], *, fence: Fence | None = None,
                            events: Sequence[SandboxEvent] = ()) -> None:
        for event in events:
            _check_event(event.event)
        with self._mutex:
            row = self._fenced(experiment_id, fence)
            if row is None:
                return
            self._add_phase(experiment_id, row, "decide", result, fence)
            for event in events:
                self._add_event(experiment_id, event)
            params = _finish_params(experiment_id, result)
            params["baseline_commit"] = params["baseline_commit"] or row["baseline_commit"]
            row.update(params, error=None, result=result, finished_at=self.now())

    def experiment_failed(self, experiment_id: str, error: dict[str, Any], *, rolled_back: bool,
                          duration_ms: float, fence: Fence | None = None, runs: Sequence[RunRecord] = ()) -> None:
        with self._mutex:
            row = self._fenced(experiment_id, fence)
            if row is None:
                return
            for run in runs:
                self._add_run(experiment_id, row, run)
            row.update(status="failed", error=error, rolled_back=rolled_back, recommendation="reject",
                       duration_ms=duration_ms, finished_at=self.now())

    def sandbox_event(self, experiment_id: str, sandbox_path: str, event: str, *, size_bytes: int | None = None,
                      age_s: float | None = None, detail: str | None = None) -> None:
        _check_event(event)
        with self._mutex:
            self.events.append({"experiment_id": experiment_id, "sandbox_path": sandbox_path, "event": event,
                                "size_bytes": size_bytes, "age_s": age_s, "detail": detail,
                                "recorded_at": self.now()})

    def list_experiments(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        with self._mutex:
            rows = [{k: v for k, v in r.items() if k not in SHOWN_ONLY} for r in self.experiments.values()
                    if status is None or r["status"] == status]
        rows.sort(key=lambda r: r["experiment_id"])
        rows.sort(key=lambda r: r["started_at"], reverse=True)
        return [with_metrics(row) for row in rows[:limit]]

    def show_experiment(self, experiment_id: str, *, output: bool = False) -> dict[str, Any] | None:
        with self._mutex:
            row = self.experiments.get(experiment_id)
            if row is None:
                return None
            runs = [{k: v for k, v in r.items() if k != "experiment_id"} for r in self.runs
                    if r["experiment_id"] == experiment_id]
            phases = {name: {"attempt": p["attempt"], "finished_at": p["finished_at"]}
                      for name, p in self.phases.get(experiment_id, {}).items()}
        return {**with_metrics(dict(row)), "phases": _in_phase_order(phases), "runs": _without_output(runs, output),
                "sandbox_events": self.sandbox_events(experiment_id=experiment_id)}

    def experiment_owners(self, experiment_ids: list[str]) -> dict[str, dict[str, Any]]:
        with self._mutex:
            return {i: {k: self.experiments[i][k] for k in ("instance_id", "status", "started_at", "finished_at")}
                    for i in experiment_ids if i in self.experiments}

    def sandbox_events(self, *, experiment_id: str | None = None, event: str | None = None,
                       limit: int = 1000) -> list[dict[str, Any]]:
        with self._mutex:
            found = [dict(e) for e in self.events if (experiment_id is None or e["experiment_id"] == experiment_id)
                     and (event is None or e["event"] == event)]
        return found[:limit]

    @contextmanager
    def maintenance_lock(self, job: str) -> Iterator[bool]:
        with self._mutex:
            lock = self.locks.setdefault(job, threading.Lock())
        locked = lock.acquire(blocking=False)
        try:
            yield locked
        finally:
            if locked:
                lock.release()

    @contextmanager
    def experiment_slot(self, limit: int) -> Iterator[bool]:
        with self._mutex:
            slots = [self.locks.setdefault(f"experiment_slot:{slot}", threading.Lock()) for slot in range(limit)]
        for lock in slots:
            if lock.acquire(blocking=False):
                try:
                    yield True
                finally:
                    lock.release()
                return
        yield False

    @contextmanager
    def experiment_lock(self, experiment_id: str) -> Iterator[bool]:
        with self._mutex:
            lock = self.locks.setdefault(f"experiment:{experiment_id}", threading.Lock())
        locked = lock.acquire(blocking=False)
        try:
            yield locked
        finally:
            if locked:
                lock.release()
