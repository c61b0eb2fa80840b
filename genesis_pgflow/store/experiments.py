"""Experiment records: experiments, their test runs and their sandboxes' history, and the advisory
locks that let one consumer at a time run a maintenance job or a given experiment.

An experiment_id belongs to the instance_id that first used it: `experiment_started` refuses (returns
False, changing nothing) an id recorded for another instance. A run's `output_tail` is the last
OUTPUT_TAIL_CHARS characters of what its test suite printed; it may hold anything the code under
test could read, so `show_experiment` leaves it out unless asked (`output=True`).

`ExperimentRecords` is the seam; `PgExperimentRecords` keeps the records in the genesis schema
(sql/experiments.sql) and `MemoryExperimentRecords` is its in-memory twin. One conformance suite
(tests/integration/test_experiment_records.py) runs against both.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from psycopg.types.json import Jsonb

from genesis_pgflow.store.database import Conn, Database, maintenance_lock, one
from genesis_pgflow.store.queries import sql

SANDBOX_EVENTS = ("created", "rolled_back", "preserved", "cleaned_up", "integrity_ok", "integrity_failed")
EXPERIMENT_COLUMNS = (
    "experiment_id", "instance_id", "experiment_type", "description", "risk_level", "repo", "base_ref", "status",
    "attempts", "baseline_commit", "change_commit", "sandbox_path", "success_rate", "regression",
    "baseline_success_rate", "test_count", "failures", "duration_ms", "recommendation", "rolled_back", "error",
    "started_at", "finished_at",
)
METRICS = ("success_rate", "regression", "baseline_success_rate", "test_count", "failures", "duration_ms")
OUTPUT_TAIL_CHARS = 2000


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

    @property
    def test_count(self) -> int:
        return self.passed + self.failed + self.errors

    @property
    def success_rate(self) -> float:
        return self.passed / self.test_count if self.test_count else 0.0


class ExperimentRecords(Protocol):
    """Where ExperimentRunner and sandbox maintenance keep what they did."""

    def experiment_started(self, start: ExperimentStart) -> bool:
        """A new experiment, or a new attempt at one (its previous outcome is cleared); False, and
        nothing changed, if the experiment_id is recorded for another instance_id."""

    def commits_recorded(self, experiment_id: str, *, baseline_commit: str | None = None,
                         change_commit: str | None = None) -> None:
        """The baseline commit, and later the change's commit."""

    def run_recorded(self, experiment_id: str, run: RunRecord) -> None:
        """One test-suite run of the current attempt."""

    def experiment_finished(self, experiment_id: str, result: dict[str, Any]) -> None:
        """The handler's result: status, metrics, recommendation, rolled_back, baseline_commit."""

    def experiment_failed(self, experiment_id: str, error: dict[str, Any], *, rolled_back: bool,
                          duration_ms: float) -> None:
        """The experiment ended in an error ({"code", "message", "details"})."""

    def sandbox_event(self, experiment_id: str, sandbox_path: str, event: str, *, size_bytes: int | None = None,
                      age_s: float | None = None, detail: str | None = None) -> None:
        """One event in a sandbox's history (SANDBOX_EVENTS)."""

    def list_experiments(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The latest experiments, newest first."""

    def show_experiment(self, experiment_id: str, *, output: bool = False) -> dict[str, Any] | None:
        """One experiment with "metrics", its "runs" and its "sandbox_events"; None if unknown. The
        runs' output_tail only with output=True."""

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


def _without_output(runs: list[dict[str, Any]], output: bool) -> list[dict[str, Any]]:
    return runs if output else [{k: v for k, v in run.items() if k != "output_tail"} for run in runs]


def _finish_params(experiment_id: str, result: dict[str, Any]) -> dict[str, Any]:
    metrics = result.get("metrics") or {}
    return {"experiment_id": experiment_id, "status": result["status"],
            "recommendation": result["recommendation"], "rolled_back": bool(result["rolled_back"]),
            "baseline_commit": result.get("baseline_commit"),
            **{name: metrics.get(name) for name in METRICS}}


# --- PostgreSQL -----------------------------------------------------------------------------


class PgExperimentRecords:
    """The records in genesis.experiments, genesis.experiment_runs and genesis.sandbox_events."""

    def __init__(self, db: Database):
        self.db = db

    def _execute(self, query: str, params: dict[str, Any]) -> None:
        self.db.run(lambda conn: conn.execute(query, params))

    def experiment_started(self, start: ExperimentStart) -> bool:
        return self.db.run(lambda conn: conn.execute(sql("experiment_start"), asdict(start)).fetchone()) is not None

    def commits_recorded(self, experiment_id: str, *, baseline_commit: str | None = None,
                         change_commit: str | None = None) -> None:
        self._execute(sql("experiment_set_commits"), {
            "experiment_id": experiment_id, "baseline_commit": baseline_commit, "change_commit": change_commit})

    def run_recorded(self, experiment_id: str, run: RunRecord) -> None:
        self._execute(sql("experiment_run_insert"), {
            **asdict(run), "experiment_id": experiment_id, "command": Jsonb(run.command),
            "output_tail": run.output_tail[-OUTPUT_TAIL_CHARS:],
            "test_count": run.test_count, "success_rate": run.success_rate})

    def experiment_finished(self, experiment_id: str, result: dict[str, Any]) -> None:
        self._execute(sql("experiment_finish"), _finish_params(experiment_id, result))

    def experiment_failed(self, experiment_id: str, error: dict[str, Any], *, rolled_back: bool,
                          duration_ms: float) -> None:
        self._execute(sql("experiment_fail"), {"experiment_id": experiment_id, "error": Jsonb(error),
                                          "rolled_back": rolled_back, "duration_ms": duration_ms})

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
            return {**with_metrics(row), "runs": _without_output(runs, output), "sandbox_events": events}
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
    _mutex: threading.Lock = field(default_factory=threading.Lock)

    def experiment_started(self, start: ExperimentStart) -> bool:
        with self._mutex:
            previous = self.experiments.get(start.experiment_id)
            if previous is not None and previous["instance_id"] != start.instance_id:
                return False
            row: dict[str, Any] = {name: None for name in EXPERIMENT_COLUMNS}
            row.update(asdict(start), status="running", rolled_back=False, started_at=self.now(),
                       attempts=(previous["attempts"] + 1) if previous else 1)
            self.experiments[start.experiment_id] = row
            return True

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
            if row is None:
                return
            record = {"attempt": row["attempts"], **asdict(run), "output_tail": run.output_tail[-OUTPUT_TAIL_CHARS:],
                      "test_count": run.test_count,
                      "success_rate": run.success_rate, "recorded_at": self.now()}
            record["commit_sha"] = record.pop("commit")
            self.runs.append({"experiment_id": experiment_id, **record})

    def experiment_finished(self, experiment_id: str, result: dict[str, Any]) -> None:
        with self._mutex:
            row = self.experiments.get(experiment_id)
            if row is not None:
                params = _finish_params(experiment_id, result)
                params["baseline_commit"] = params["baseline_commit"] or row["baseline_commit"]
                row.update(params, error=None, finished_at=self.now())

    def experiment_failed(self, experiment_id: str, error: dict[str, Any], *, rolled_back: bool,
                          duration_ms: float) -> None:
        with self._mutex:
            row = self.experiments.get(experiment_id)
            if row is not None:
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
            rows = [dict(r) for r in self.experiments.values() if status is None or r["status"] == status]
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
        return {**with_metrics(dict(row)), "runs": _without_output(runs, output),
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
