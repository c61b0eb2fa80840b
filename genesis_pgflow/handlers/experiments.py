"""ExperimentRunner: the handler of genesis_experiment_request.

One experiment, start to end:

0. admit: `repo` must be allowed by GENESIS_REPO_ALLOW (checked before anything of it is read),
   the experiment_id must not belong to another instance_id (experiment_id_taken), and no other
   consumer may be running it (an advisory lock held for the whole experiment; experiment_busy,
   retried later, when it is); the producer's oldest kept copies go first when it is over its caps.
   A re-send of an id by the instance that owns it is a new attempt: its copy is made afresh and
   its record counts one more attempt;
1. isolate: fetch `repo` at `base_ref` into <home>/sandboxes/<experiment_id>/ (workspace.py), at
   most GENESIS_EXPERIMENT_MAX_COPY_MB;
2. baseline: run the test suite there, in the sandbox (sandbox.py), per-test outcomes from the runner's
   report channel, never from the suite's output (suite.py);
   each run writes to a capped scratch over the copy (Workspace.scratch), never to the copy itself;
3. change: apply `changes` (whole files, or a unified diff checked by `git apply --check`), commit
   on branch experiment/<experiment_id>, run the same tests again;
4. measure: success_rate, regression (the share of tests that passed at the baseline and do not
   pass after the change), test_count, failures, duration_ms;
5. decide: regression above the threshold rolls the copy back to the baseline commit; recommend
   merge, merge_with_review or reject (see `decide`).

Every step is recorded through ExperimentRecords. A timeout (the request's timeout_ms, else
settings.experiment_timeout_ms, never past the consumer's deadline) rolls back and fails the
experiment with WorkflowTimeout. At most settings.max_experiments_concurrent experiments run at
once in one process, whatever the consumer's parallelism, and as many across every consumer of
the database (advisory locks through the records store).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from genesis_pgflow import maintenance
from genesis_pgflow.errors import (
    ConfigurationError,
    GenesisError,
    PermanentError,
    RetryableError,
    SandboxUnavailable,
    WorkflowTimeout,
)
from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.messages import ExperimentRequest
from genesis_pgflow.sandbox import Limits, Sandbox
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.experiments import (
    ExperimentRecords,
    ExperimentStart,
)
from genesis_pgflow.suite import (  # noqa: F401 - TestRun, parse_junit, read_report: this module's interface too
    NO_TESTS_COLLECTED,
    Outcome,
    TestRun,
    parse_junit,
    read_report,
    run_tests,
    test_config_changes,
)
from genesis_pgflow.workspace import RepoAllow, Source, Workspace, tree_size

log = logging.getLogger(__name__)

Status = Literal["success", "regressed", "failed"]
Recommendation = Literal["merge", "merge_with_review", "reject"]

SANDBOX_PYTHON = "/usr/bin/python3"

# Test suites get more room than the sandbox's defaults for snippets; wall and CPU time are cut
# down to what is left of the experiment's time at each run.
EXPERIMENT_LIMITS = Limits(cpu_s=3600, memory_bytes=2 * 2**30, processes=256, file_bytes=256 * 2**20,
                           open_files=1024, wall_s=3600.0, output_bytes=2**20)


class ExperimentUnmeasurable(PermanentError):
    """The test command could not run at the baseline: there is nothing to compare the change with."""

    code = "test_command_failed"


class ExperimentSlotsBusy(RetryableError):
    """Every experiment slot stayed taken until the deadline; the experiment did not start."""

    code = "experiment_slots_busy"


class ExperimentBusy(RetryableError):
    """Another consumer (or another worker of this one) is running this experiment_id right now."""

    code = "experiment_busy"


class ExperimentIdTaken(PermanentError):
    """The experiment_id belongs to another instance_id: choose another id."""

    code = "experiment_id_taken"


class UnexpectedFailure(GenesisError):
    """The experiment broke off on an unexpected error (recorded; the request is retried)."""

    code = "internal_error"


# --- which tests a risk level runs ----------------------------------------------------------


@dataclass(frozen=True)
class TestSelection:
    """The pytest arguments one risk level adds: the paths that exist among `paths`, else the
    marker expression; both empty means the whole suite."""

    __test__ = False  # not a pytest test class, whatever its name

    paths: tuple[str, ...] = ()
    marker: str | None = None

    def pytest_args(self, root: Path) -> list[str]:
        present = [p for p in self.paths if (root / p).is_dir() and not (root / p).is_symlink()]
        if present:
            return present
        return ["-m", self.marker] if self.marker else []


# low: unit tests; medium: unit and integration tests; high: the whole suite. By path when the
# repository has tests/unit and tests/integration, else by marker. A selection that collects
# nothing falls back to the whole suite.
DEFAULT_SELECTION: Mapping[str, TestSelection] = {
    "low": TestSelection(("tests/unit",), "not integration and not slow and not e2e"),
    "medium": TestSelection(("tests/unit", "tests/integration"), "not slow and not e2e"),
    "high": TestSelection(),
}


# --- metrics and the decision ---------------------------------------------------------------


@dataclass(frozen=True)
class Metrics:
    success_rate: float
    regression: float
    baseline_success_rate: float
    test_count: int
    failures: int
    duration_ms: float
    new_failures: int = 0  # tests that passed at the baseline and not after the change

    def as_json(self) -> dict[str, Any]:
        return {"success_rate": round(self.success_rate, 6), "regression": round(self.regression, 6),
                "baseline_success_rate": round(self.baseline_success_rate, 6), "test_count": self.test_count,
                "failures": self.failures, "duration_ms": round(self.duration_ms, 3)}


def measure(baseline: TestRun, change: TestRun, duration_ms: float) -> Metrics:
    """Compare the two runs. A test that passed at the baseline and failed, errored or disappeared
    after the change counts as regressed (one that became skipped does not)."""
    before = baseline.passed
    broken = {t for t in before if change.outcomes.get(t) in ("failed", "error", None)}
    return Metrics(
        success_rate=change.success_rate,
        regression=len(broken) / len(before) if before else 0.0,
        baseline_success_rate=baseline.success_rate,
        test_count=change.test_count,
        failures=change.count("failed") + change.count("error"),
        duration_ms=duration_ms,
        new_failures=len(broken),
    )


@dataclass(frozen=True)
class Decision:
    status: Status
    recommendation: Recommendation
    rollback: bool
    reason: str


def decide(metrics: Metrics, *, risk_level: str, threshold: float, measured: bool = True,
           flags: Sequence[str] = (), problems: Sequence[str] = ()) -> Decision:
    """The documented rules, in order:

    1. regression > threshold                      -> regressed, reject, rolled back
    2. the change could not be measured, or its
       success_rate < baseline_success_rate        -> failed, reject (kept for analysis)
    3. risk high, no tests ran, no test passes after
       the change, some test that
       passed at the baseline fails now, or a flag
       (the change touches the test configuration
       or a hook rewrote a report)                  -> success, merge_with_review
    4. otherwise                                    -> success, merge
    """
    if metrics.regression > threshold:
        return Decision("regressed", "reject", True,
                        f"regression {metrics.regression:.3f} is above the threshold {threshold:.3f}")
    if not measured:
        why = f": {problems[0]}" if problems else ""
        return Decision("failed", "reject", False, f"the tests could not be run after the change{why}")
    if metrics.success_rate < metrics.baseline_success_rate - 1e-9:
        return Decision("failed", "reject", False,
                        f"success rate fell from {metrics.baseline_success_rate:.3f} to {metrics.success_rate:.3f}")
    if risk_level == "high":
        return Decision("success", "merge_with_review", False, "high-risk changes are always reviewed")
    if metrics.test_count == 0:
        return Decision("success", "merge_with_review", False, "no test measured the change")
    if metrics.success_rate == 0:
        return Decision("success", "merge_with_review", False, "no test passes, before or after the change")
    if metrics.new_failures:
        return Decision("success", "merge_with_review", False,
                        f"{metrics.new_failures} test(s) that passed at the baseline fail now")
    if flags:
        # the change may have changed how tests report (suite.test_config_changes): a person looks
        return Decision("success", "merge_with_review", False, f"flagged: {', '.join(flags)}")
    return Decision("success", "merge", False, "no regression")


# --- the handler ----------------------------------------------------------------------------


def default_python_path() -> tuple[Path, ...]:
    """The directory holding pytest in this interpreter's environment, to be seen read-only (and
    put on PYTHONPATH) by the sandbox's /usr/bin/python3."""
    spec = importlib.util.find_spec("pytest")
    if spec is None or not spec.origin:
        return ()
    return (Path(spec.origin).resolve().parents[1],)


class ExperimentTimedOut(Exception):
    """Internal: the experiment ran out of time (turned into WorkflowTimeout after rollback)."""


@dataclass
class _Attempt:
    """What one run of the handler has done so far (for rollback and for the records)."""

    workspace: Workspace
    started: float
    deadline: float
    baseline_commit: str | None = None
    changed: bool = False
    rolled_back: bool = False
    selection: list[str] = field(default_factory=list)


class ExperimentRunner:
    """The handler of genesis_experiment_request (see the module docstring).

    settings: sandboxes_dir, regression_threshold, experiment_timeout_ms, max_experiments_concurrent.
    records: where experiments, runs and sandbox events are kept.
    sandbox: runs the test suites (Sandbox.run with the copy as its writable directory).
    selection: risk level -> TestSelection (default DEFAULT_SELECTION).
    python / python_path: the interpreter inside the sandbox and the read-only directories put on
    its PYTHONPATH (default: /usr/bin/python3 and the site-packages holding this pytest).
    limits: the sandbox limits of one test-suite run (time limits are cut to what is left).
    """

    payload_type = "genesis_experiment_request"

    def __init__(self, settings: Settings, records: ExperimentRecords, sandbox: Sandbox, *,
                 selection: Mapping[str, TestSelection] = DEFAULT_SELECTION, python: str = SANDBOX_PYTHON,
                 python_path: Sequence[Path] | None = None, limits: Limits = EXPERIMENT_LIMITS,
                 monotonic: Any = time.monotonic):
        self.settings = settings
        self.records = records
        self.sandbox = sandbox
        self.selection = dict(selection)
        self.python = python
        self.python_path = tuple(default_python_path() if python_path is None else python_path)
        self.limits = limits
        self.monotonic = monotonic
        self.slots = threading.BoundedSemaphore(settings.max_experiments_concurrent)
        self._running = 0
        self._active: set[str] = set()
        self._running_lock = threading.Lock()
        self.peak_running = 0  # the most experiments seen running at once (for tests and metrics)
        try:
            self.allow = RepoAllow.parse(settings.repo_allow, home=settings.home)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        if self.allow.empty:
            log.warning("experiments disabled: set GENESIS_REPO_ALLOW to the local roots and git URL prefixes "
                        "experiments may use (every genesis_experiment_request fails with repository_unavailable)")
        else:
            log.info("experiments may use repositories under: %s", self.allow.describe())
        if os.geteuid() != 0:
            log.warning("experiments: not root, so test runs write to the copy itself: their disk use is "
                        "bounded per file only (RLIMIT_FSIZE), not by GENESIS_EXPERIMENT_SCRATCH_MB")

    def timeout_s(self, payload: ExperimentRequest) -> float:
        """The deadline this experiment asks the consumer for."""
        return (payload.timeout_ms or self.settings.experiment_timeout_ms) / 1000.0

    # -- the entry point -----------------------------------------------------------------------

    def __call__(self, payload: ExperimentRequest, ctx: WorkContext) -> dict[str, Any]:
        self.sandbox.check()  # SandboxUnavailable before anything is cloned
        source = self._admit(payload)
        started = self.monotonic()
        # finish (rolled back and recorded) a little before the consumer's own deadline, so that
        # the timeout it reports is ours, with its details
        left = ctx.remaining()
        deadline = started + min(self.timeout_s(payload), left - min(2.0, 0.05 * left))
        with ExitStack() as slots:
            self._claim(payload, slots)
            self._take_slots(payload, ctx, deadline, slots)
            with self._running_lock:
                self._running += 1
                self.peak_running = max(self.peak_running, self._running)
            try:
                return self._run(payload, ctx, started, deadline, source)
            finally:
                with self._running_lock:
                    self._running -= 1

    def _admit(self, request: ExperimentRequest) -> Source:
        """The allowed source of request.repo, and (local ones) base_ref found in it: the one
        RepositoryUnavailable otherwise, with the same details whatever the reason."""
        try:
            source = self.allow.resolve(request.repo)
            if source.local is not None:
                Workspace.local_baseline(source, request.base_ref, self.allow)
        except GenesisError as exc:
            exc.details = {**exc.details, **request.identifiers(), "rolled_back": False}
            raise
        return source

    def _claim(self, request: ExperimentRequest, stack: ExitStack) -> None:
        """One run per experiment_id at a time: in this process (a set), and across every consumer
        of the database (an advisory lock held until the experiment is over). Two runs would share
        one sandbox copy; the second is retried later."""
        busy = ExperimentBusy(f"experiment {request.experiment_id} is being run by another consumer; retried later",
                              details={**request.identifiers(), "rolled_back": False})
        with self._running_lock:
            if request.experiment_id in self._active:
                raise busy
            self._active.add(request.experiment_id)
        stack.callback(self._active.discard, request.experiment_id)
        lock = self.records.experiment_lock(request.experiment_id)
        if not lock.__enter__():
            lock.__exit__(None, None, None)
            raise busy
        stack.push(lock)

    def _take_slots(self, request: ExperimentRequest, ctx: WorkContext, deadline: float, stack: ExitStack) -> None:
        """One of max_experiments_concurrent slots in this process (a semaphore), then one shared
        by every consumer of the database (advisory locks); wait for both until the deadline."""
        limit = self.settings.max_experiments_concurrent
        while not self.slots.acquire(timeout=0.1):
            self._slot_wait_over(request, ctx, deadline)
        stack.callback(self.slots.release)
        while True:
            shared = self.records.experiment_slot(limit)
            if shared.__enter__():
                stack.push(shared)
                return
            shared.__exit__(None, None, None)
            self._slot_wait_over(request, ctx, deadline)
            ctx.cancelled.wait(1.0)

    def _slot_wait_over(self, request: ExperimentRequest, ctx: WorkContext, deadline: float) -> None:
        if ctx.cancelled.is_set() or self.monotonic() >= deadline:
            raise ExperimentSlotsBusy(
                "no experiment slot came free before the deadline "
                f"(max_experiments_concurrent={self.settings.max_experiments_concurrent}); nothing was run",
                details={"experiment_id": request.experiment_id, "instance_id": request.instance_id,
                         "rolled_back": False})

    def _run(self, request: ExperimentRequest, ctx: WorkContext, started: float, deadline: float,
             source: Source) -> dict[str, Any]:
        ids = {"experiment_id": request.experiment_id, "instance_id": request.instance_id}
        workspace = Workspace(self.settings.sandboxes_dir, request.experiment_id)
        attempt = _Attempt(workspace, started, deadline)
        owned = self.records.experiment_started(ExperimentStart(
            experiment_id=request.experiment_id, instance_id=request.instance_id,
            experiment_type=request.experiment_type, description=request.description,
            risk_level=request.risk_level, repo=request.repo, base_ref=request.base_ref,
            sandbox_path=str(workspace.path)))
        if not owned:   # before anything is touched: the copy and the record are the other instance's
            raise ExperimentIdTaken(f"experiment_id {request.experiment_id!r} belongs to another instance_id; "
                                    "choose another id", details={**ids, "rolled_back": False})
        try:
            return self._experiment(request, ctx, attempt, ids, source)
        except ExperimentTimedOut as exc:
            self._give_up(request, attempt, rollback=True)
            error = WorkflowTimeout(f"experiment {request.experiment_id} ran past its timeout: {exc}",
                                    details=self._details(ids, attempt))
            self._record_failure(request, attempt, error)
            raise error from None
        except GenesisError as exc:
            self._give_up(request, attempt, rollback=attempt.changed)
            exc.details = {**exc.details, **self._details(ids, attempt)}
            self._record_failure(request, attempt, exc)
            raise
        except Exception as exc:
            # unexpected (a full disk, a lost database): retried through the queue; leave the copy
            # at its baseline and say so in the records if they can still be reached
            try:
                self._give_up(request, attempt, rollback=attempt.changed)
                self._record_failure(request, attempt, UnexpectedFailure(
                    f"{type(exc).__name__}: {exc}", details=self._details(ids, attempt)))
            except Exception:
                log.exception("experiment %s: could not record its failure", request.experiment_id)
            raise

    def _experiment(self, request: ExperimentRequest, ctx: WorkContext, attempt: _Attempt,
                    ids: dict[str, str], source: Source) -> dict[str, Any]:
        workspace = attempt.workspace
        maintenance.enforce_instance_caps(self.settings, self.records, request.instance_id,
                                          starting=request.experiment_id)
        if workspace.path.exists():   # left by an earlier attempt (a killed consumer, a retry): reaped, on record
            self.records.sandbox_event(request.experiment_id, str(workspace.path), "cleaned_up",
                                       size_bytes=workspace.size_bytes(),
                                       detail=f"replaced by attempt {ctx.attempt}")
        try:
            attempt.baseline_commit = workspace.create(
                source, request.base_ref, allow=self.allow, max_bytes=self.settings.experiment_max_copy_mb * 2**20,
                timeout_s=self._check_time(ctx, attempt))
        except GenesisError:
            self._check_time(ctx, attempt)  # a clone cut short by the deadline is a timeout
            raise
        self.records.commits_recorded(request.experiment_id, baseline_commit=attempt.baseline_commit)
        self.records.sandbox_event(request.experiment_id, str(workspace.path), "created",
                                   size_bytes=workspace.size_bytes(), detail=f"{request.repo}@{request.base_ref}")
        # refuse a change that cannot apply before spending the baseline run on it
        if request.changes.patch is not None:
            workspace.check_patch(request.changes.patch)
        else:
            workspace.check_files(f.path for f in request.changes.files or [])

        baseline = self._baseline_run(request, ctx, attempt)
        self.records.run_recorded(request.experiment_id, baseline.record("baseline", attempt.baseline_commit))
        if not baseline.measured:
            output = (baseline.result.stderr or baseline.result.stdout).strip()[-1500:]
            raise ExperimentUnmeasurable(
                f"the test command could not run at the baseline (exit status {baseline.result.returncode}, "
                f"no test report): {output.splitlines()[-1] if output else 'no output'}",
                details={"command": baseline.command, "returncode": baseline.result.returncode, "output": output})
        workspace.restore(attempt.baseline_commit)

        self._check_time(ctx, attempt)
        attempt.changed = True
        if request.changes.patch is not None:
            workspace.apply_patch(request.changes.patch)
        else:
            workspace.apply_files((f.path, f.content) for f in request.changes.files or [])
        change_commit = workspace.commit(f"experiment {request.experiment_id}: {request.experiment_type}\n\n"
                                         f"{request.description}".strip())
        self.records.commits_recorded(request.experiment_id, change_commit=change_commit)

        change = self._test_run(request, ctx, attempt)
        self.records.run_recorded(request.experiment_id, change.record("change", change_commit))
        workspace.restore(change_commit)

        metrics = measure(baseline, change, (self.monotonic() - attempt.started) * 1000.0)
        config_changes = test_config_changes(workspace.git(
            "diff", "--name-only", "--no-renames", "-z", attempt.baseline_commit, change_commit).stdout.split("\0"))
        flags = (["test_config_changed"] if config_changes else []) + sorted({*baseline.flags, *change.flags})
        decision = decide(metrics, risk_level=request.risk_level, threshold=self.settings.regression_threshold,
                          measured=change.measured, flags=flags, problems=change.problems)
        if decision.rollback:
            workspace.git("update-ref", f"refs/genesis/rolled-back/{workspace.branch}", change_commit)
            workspace.rollback(attempt.baseline_commit)
            attempt.rolled_back = True
            self.records.sandbox_event(request.experiment_id, str(workspace.path), "rolled_back",
                                       size_bytes=workspace.size_bytes(), detail=decision.reason)
        if decision.status != "success":
            self.records.sandbox_event(request.experiment_id, str(workspace.path), "preserved",
                                       size_bytes=workspace.size_bytes(), detail=decision.reason)
        result = {
            **ids,
            "status": decision.status,
            "metrics": metrics.as_json(),
            "recommendation": decision.recommendation,
            "rolled_back": attempt.rolled_back,
            "baseline_commit": attempt.baseline_commit,
            "sandbox_path": str(workspace.path),
            "counted_by": change.counted_by,
            "flags": flags,
            "test_config_changes": config_changes,
        }
        self.records.experiment_finished(request.experiment_id, result)
        log.info("experiment %s: %s, %s (%s)", request.experiment_id, decision.status, decision.recommendation,
                 decision.reason)
        return result

    # -- failure paths -------------------------------------------------------------------------

    @staticmethod
    def _details(ids: dict[str, str], attempt: _Attempt) -> dict[str, Any]:
        return {**ids, "rolled_back": attempt.rolled_back, "baseline_commit": attempt.baseline_commit,
                "sandbox_path": str(attempt.workspace.path)}

    def _give_up(self, request: ExperimentRequest, attempt: _Attempt, *, rollback: bool) -> None:
        """Put the copy back to its baseline (if it got that far) and keep it for analysis."""
        workspace = attempt.workspace
        if rollback and attempt.baseline_commit is not None and workspace.path.exists():
            try:
                workspace.rollback(attempt.baseline_commit)
                attempt.rolled_back = True
                self.records.sandbox_event(request.experiment_id, str(workspace.path), "rolled_back",
                                           size_bytes=workspace.size_bytes(), detail="experiment failed")
            except GenesisError as exc:
                log.error("experiment %s: rollback failed: %s", request.experiment_id, exc)
        if workspace.path.exists():
            self.records.sandbox_event(request.experiment_id, str(workspace.path), "preserved",
                                       size_bytes=tree_size(workspace.path, workspace.git_dir),
                                       detail="experiment failed")

    def _record_failure(self, request: ExperimentRequest, attempt: _Attempt, error: GenesisError) -> None:
        self.records.experiment_failed(
            request.experiment_id, {"code": error.code, "message": error.message, "details": error.details},
            rolled_back=attempt.rolled_back, duration_ms=(self.monotonic() - attempt.started) * 1000.0)

    # -- running the tests ---------------------------------------------------------------------

    def _check_time(self, ctx: WorkContext, attempt: _Attempt) -> float:
        if ctx.cancelled.is_set():
            raise ExperimentTimedOut("cancelled")
        left = attempt.deadline - self.monotonic()
        if left <= 0:
            raise ExperimentTimedOut(f"no time left after {self.monotonic() - attempt.started:.1f}s")
        return left

    def _baseline_run(self, request: ExperimentRequest, ctx: WorkContext, attempt: _Attempt) -> TestRun:
        """Run the baseline with the risk level's selection; if that selects nothing, the whole suite
        (and the change then runs the whole suite too)."""
        selection = self.selection.get(request.risk_level, TestSelection())
        # an explicit test_command is run as given; the risk level picks tests for the default one
        attempt.selection = selection.pytest_args(attempt.workspace.path) if request.test_command is None else []
        run = self._test_run(request, ctx, attempt)
        if attempt.selection and run.result.returncode == NO_TESTS_COLLECTED and not run.test_count:
            log.info("experiment %s: selection %s collected no test, running the whole suite",
                     request.experiment_id, attempt.selection)
            attempt.selection = []
            attempt.workspace.restore(attempt.baseline_commit or "HEAD")
            run = self._test_run(request, ctx, attempt)
        return run

    def _test_run(self, request: ExperimentRequest, ctx: WorkContext, attempt: _Attempt) -> TestRun:
        """One run of the suite (suite.py: the command, the report channel, the verdict)."""
        left = self._check_time(ctx, attempt)
        limits = dataclasses.replace(self.limits, wall_s=min(self.limits.wall_s, left),
                                     cpu_s=max(1, min(self.limits.cpu_s, math.ceil(left))))
        with attempt.workspace.scratch(max_bytes=self.settings.experiment_scratch_mb * 2**20,
                                       max_inodes=self.settings.experiment_scratch_inodes) as root:
            run = run_tests(self.sandbox, request.test_command, attempt.selection, root=root, python=self.python,
                            python_path=self.python_path, limits=limits, timeout_s=left, cancelled=ctx.cancelled)
        result = run.result
        if result.timed_out or result.cancelled:
            raise ExperimentTimedOut(f"the test suite was still running after {result.duration_s:.1f}s"
                                     if result.timed_out else "cancelled")
        if result.returncode != 0 and result.stderr.startswith("bwrap:"):
            raise SandboxUnavailable(f"the sandbox could not start the tests: {result.stderr.strip()[:500]}")
        if run.problems:
            log.warning("experiment %s: %s run not measured: %s", request.experiment_id, run.counted_by,
                        "; ".join(run.problems[:3]))
        return run
