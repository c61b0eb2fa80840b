"""ExperimentRunner: the handler of genesis_experiment_request. It only sequences the phases; what
they measure and decide is policy.py, how a suite runs is suite.py, how the copy is made and
rolled back is workspace.py, who may run now is slots.py.

One experiment, start to end:

0. admit: `repo` must be allowed by GENESIS_REPO_ALLOW (checked before anything of it is read),
   the experiment_id must not belong to another instance_id (experiment_id_taken), and no other
   consumer may be running it (an advisory lock held for the whole experiment; experiment_busy,
   retried later, when it is); the producer's oldest kept copies go first when it is over its caps.
   A re-send of an id by the instance that owns it is a new attempt: its copy is made afresh and
   its record counts one more attempt. The next delivery of the same request (the same message,
   read again after its consumer was killed or its lease ran out) resumes instead: the phases
   below are recorded as they finish, with what the next one needs (phases.py), and it starts at
   the first unfinished one, in the copy the earlier attempt left (started afresh if that copy is
   gone). Every phase write is fenced by the delivery's attempt (read_ct): one from an attempt
   that no longer holds the experiment is refused (AttemptSuperseded) and that consumer stops
   without touching the copy;
1. copy: fetch `repo` at `base_ref` into <home>/sandboxes/<experiment_id>/ (workspace.py), at
   most GENESIS_EXPERIMENT_MAX_COPY_MB;
2. baseline: run the test suite there (the request's test_command, else the repository's runner
   narrowed by the risk level: selection.py), in the sandbox (sandbox.py), per-test outcomes from
   the runner's report channel, never from the suite's output (suite.py);
   each run writes to a capped scratch over the copy (Workspace.scratch), never to the copy itself;
3. change: apply `changes` (whole files, or a unified diff checked by `git apply --check`), commit
   on branch experiment/<experiment_id>, run the same tests again;
4. measure: the tests that fail after the change run settings.experiment_reruns more times at the
   change and at the baseline; each test gets its class (pass->pass, pass->fail, fail->pass,
   fail->fail) or is flaky (it passed and failed on one commit: set apart, never a regression);
   success_rate, regression (the share of tests that passed at the baseline and fail after the
   change), test_count, failures, duration_ms; and the performance impact (wall, CPU time and peak
   memory of the suite, the tests that got slower, the suite's custom metrics: performance.py);
5. decide: regression above the threshold rolls the copy back to the baseline commit; recommend
   merge, merge_with_review or reject (see policy.decide).

Every phase is recorded through ExperimentRecords, with the runs it made, in one transaction. A
timeout (the request's timeout_ms, else settings.experiment_timeout_ms, never past the consumer's
deadline) rolls back and fails the experiment with WorkflowTimeout. At most
settings.max_experiments_concurrent experiments run at once in one process, whatever the
consumer's parallelism, and as many across every consumer of the database (slots.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genesis_pgflow import maintenance
from genesis_pgflow.errors import ConfigurationError, GenesisError, SandboxUnavailable, WorkflowTimeout
from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.handlers.experiments.errors import (
    ExperimentIdTaken,
    ExperimentTimedOut,
    ExperimentUnmeasurable,
    UnexpectedFailure,
)
from genesis_pgflow.handlers.experiments.performance import performance
from genesis_pgflow.handlers.experiments.phases import PHASES, Measured, finished_prefix, run_from, run_state
from genesis_pgflow.handlers.experiments.policy import Decision, classify, decide, measure
from genesis_pgflow.handlers.experiments.selection import (
    DEFAULT_SELECTION,
    Selected,
    TestSelection,
    changed_paths,
    select_tests,
    selected_nothing,
)
from genesis_pgflow.handlers.experiments.slots import ExperimentSlots
from genesis_pgflow.messages import ExperimentRequest
from genesis_pgflow.sandbox import Limits, Sandbox
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.experiments import (
    AttemptSuperseded,
    ExperimentRecords,
    ExperimentStart,
    Fence,
    RunRecord,
    SandboxEvent,
)
from genesis_pgflow.suite import TestRun, run_tests, test_config_changes
from genesis_pgflow.workspace import RepoAllow, Source, Workspace, tree_size

log = logging.getLogger(__name__)

SANDBOX_PYTHON = "/usr/bin/python3"

# Test suites get more room than the sandbox's defaults for snippets; wall and CPU time are cut
# down to what is left of the experiment's time at each run.
EXPERIMENT_LIMITS = Limits(cpu_s=3600, memory_bytes=2 * 2**30, processes=256, file_bytes=256 * 2**20,
                           open_files=1024, wall_s=3600.0, output_bytes=2**20)


def default_python_path() -> tuple[Path, ...]:
    """The directory holding pytest in this interpreter's environment, to be seen read-only (and
    put on PYTHONPATH) by the sandbox's /usr/bin/python3."""
    spec = importlib.util.find_spec("pytest")
    if spec is None or not spec.origin:
        return ()
    return (Path(spec.origin).resolve().parents[1],)


def _selected_state(selected: Selected | None) -> dict[str, Any] | None:
    return None if selected is None else dataclasses.asdict(selected)


def _selected_from(state: dict[str, Any] | None) -> Selected | None:
    """The baseline's Selected, as _selected_state kept it (for the phases after a resume)."""
    if state is None:
        return None
    return Selected(tuple(state["command"]), tuple(state["args"]), state["by"], _selected_from(state.get("instead_of")))


@dataclass
class _Attempt:
    """What one run of the handler has done so far (for the next phase, rollback and the records)."""

    request: ExperimentRequest
    ctx: WorkContext
    workspace: Workspace
    started: float
    deadline: float
    fence: Fence | None = None
    elapsed_before_ms: float = 0.0  # the experiment's time in the attempts this one resumes
    baseline_commit: str | None = None
    change_commit: str | None = None
    changed: bool = False
    rolled_back: bool = False
    selection: list[str] = field(default_factory=list)
    selected: Selected | None = None  # the command and the risk level's selection (selection.py)
    baseline: TestRun | None = None
    change: TestRun | None = None
    runs: int = 0  # suite runs so far: each gets its number as GENESIS_RUN_SEED
    measured: Measured | None = None
    pending: list[RunRecord] = field(default_factory=list)  # runs of the phase under way, recorded with it

    @property
    def ids(self) -> dict[str, str]:
        return {"experiment_id": self.request.experiment_id, "instance_id": self.request.instance_id}

    def details(self) -> dict[str, Any]:
        return {**self.ids, "rolled_back": self.rolled_back, "baseline_commit": self.baseline_commit,
                "sandbox_path": str(self.workspace.path)}

    def elapsed_ms(self, now: float) -> float:
        return self.elapsed_before_ms + (now - self.started) * 1000.0


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
        self.slots = ExperimentSlots(settings.max_experiments_concurrent, records, monotonic)
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

    @property
    def peak_running(self) -> int:
        """The most experiments seen running at once in this process."""
        return self.slots.peak

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
        with self.slots.hold(payload, ctx.cancelled, deadline):
            attempt = _Attempt(payload, ctx, Workspace(self.settings.sandboxes_dir, payload.experiment_id),
                               started, deadline, Fence(ctx.queue, ctx.msg_id, ctx.attempt))
            return self._run(attempt, source)

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

    def _run(self, attempt: _Attempt, source: Source) -> dict[str, Any]:
        request = attempt.request
        claim = self.records.experiment_started(ExperimentStart(
            experiment_id=request.experiment_id, instance_id=request.instance_id,
            experiment_type=request.experiment_type, description=request.description,
            risk_level=request.risk_level, repo=request.repo, base_ref=request.base_ref,
            sandbox_path=str(attempt.workspace.path)), attempt.fence)
        if not claim:   # before anything is touched: the copy and the record are the other instance's
            raise ExperimentIdTaken(f"experiment_id {request.experiment_id!r} belongs to another instance_id; "
                                    "choose another id", details={**attempt.ids, "rolled_back": False})
        try:
            return self._phases(attempt, source, claim.phases)
        except AttemptSuperseded:
            # a later attempt holds the experiment, and its copy: leave both alone
            log.warning("experiment %s: attempt %d lost it to a later attempt; stopped", request.experiment_id,
                        attempt.ctx.attempt)
            raise
        except ExperimentTimedOut as exc:
            self._give_up(attempt, rollback=True)
            error = WorkflowTimeout(f"experiment {request.experiment_id} ran past its timeout: {exc}",
                                    details=attempt.details())
            self._record_failure(attempt, error)
            raise error from None
        except GenesisError as exc:
            self._give_up(attempt, rollback=attempt.changed)
            exc.details = {**exc.details, **attempt.details()}
            self._record_failure(attempt, exc)
            raise
        except Exception as exc:
            # unexpected (a full disk, a lost database): retried through the queue; leave the copy
            # at its baseline and say so in the records if they can still be reached
            try:
                self._give_up(attempt, rollback=attempt.changed)
                self._record_failure(attempt, UnexpectedFailure(f"{type(exc).__name__}: {exc}",
                                                                details=attempt.details()))
            except Exception:
                log.exception("experiment %s: could not record its failure", request.experiment_id)
            raise

    def _phases(self, attempt: _Attempt, source: Source, recorded: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """copy, baseline, change, measure, decide: each phase takes what the ones before left in
        `attempt`; those an earlier attempt finished (`recorded`) are not run again."""
        done = self._resume(attempt, recorded)
        if "decide" in done:
            log.info("experiment %s: decided by an earlier attempt; its result is sent again",
                     attempt.request.experiment_id)
            return dict(recorded["decide"])
        if "copy" not in done:
            self._copy(attempt, source)
        if "baseline" not in done:
            self._baseline(attempt)
        if "change" not in done:
            self._change(attempt)
        if "measure" not in done:
            self._measure(attempt)
        return self._decide(attempt)

    def _resume(self, attempt: _Attempt, recorded: dict[str, dict[str, Any]]) -> list[str]:
        """Take up what earlier attempts of this request recorded (phases.py) and put the copy
        where the first unfinished phase starts; the phases to skip. Nothing is skipped when the
        copy they left is gone or lacks their commits: the experiment starts again from its copy."""
        done = finished_prefix(recorded)
        if not done or "decide" in done:
            return done
        state = {name: recorded[name] for name in done}
        last = state[done[-1]]
        commits = [c for c in (state["copy"].get("baseline_commit"), state.get("change", {}).get("change_commit"))
                   if c]
        workspace = attempt.workspace
        if not (workspace.path.is_dir() and workspace.git_dir.is_dir()) or not all(
                workspace.git("cat-file", "-e", f"{c}^{{commit}}", check=False).returncode == 0 for c in commits):
            log.warning("experiment %s: the copy earlier attempts left is gone or incomplete; starting again",
                        attempt.request.experiment_id)
            return []
        attempt.baseline_commit = state["copy"]["baseline_commit"]
        if "baseline" in state:
            attempt.selection = list(state["baseline"]["selection"])
            attempt.selected = _selected_from(state["baseline"].get("selected"))
            attempt.baseline = run_from(state["baseline"]["run"])
        if "change" in state:
            attempt.change_commit = state["change"]["change_commit"]
            attempt.change = run_from(state["change"]["run"])
            attempt.changed = True
        if "measure" in state:
            attempt.measured = Measured.from_state(state["measure"])
        attempt.runs = int(last.get("runs", 0))
        attempt.elapsed_before_ms = float(last.get("elapsed_ms", 0.0))
        workspace.restore(attempt.change_commit or attempt.baseline_commit or "HEAD")
        log.info("experiment %s: attempt %d resumes after the %s phase (%d suite run(s) so far)",
                 attempt.request.experiment_id, attempt.ctx.attempt, done[-1], attempt.runs)
        return done

    def _phase_done(self, attempt: _Attempt, phase: str, state: dict[str, Any], *,
                    events: list[SandboxEvent] | None = None, **commits: str | None) -> None:
        """Record a finished phase with its runs (fenced: AttemptSuperseded if this attempt no
        longer holds the experiment)."""
        assert phase in PHASES
        self.records.phase_finished(
            attempt.request.experiment_id, phase,
            {**state, "runs": attempt.runs, "elapsed_ms": round(attempt.elapsed_ms(self.monotonic()), 3)},
            fence=attempt.fence, runs=attempt.pending, events=events or [], **commits)
        attempt.pending = []

    # -- the phases ----------------------------------------------------------------------------

    def _copy(self, attempt: _Attempt, source: Source) -> None:
        request, workspace = attempt.request, attempt.workspace
        maintenance.enforce_instance_caps(self.settings, self.records, request.instance_id,
                                          starting=request.experiment_id)
        if workspace.path.exists():   # left by an earlier attempt (a killed consumer, a retry): reaped, on record
            self.records.sandbox_event(request.experiment_id, str(workspace.path), "cleaned_up",
                                       size_bytes=workspace.size_bytes(),
                                       detail=f"replaced by attempt {attempt.ctx.attempt}")
        try:
            attempt.baseline_commit = workspace.create(
                source, request.base_ref, allow=self.allow, max_bytes=self.settings.experiment_max_copy_mb * 2**20,
                timeout_s=self._check_time(attempt))
        except GenesisError:
            self._check_time(attempt)  # a clone cut short by the deadline is a timeout
            raise
        created = SandboxEvent(str(workspace.path), "created", size_bytes=workspace.size_bytes(),
                               detail=f"{request.repo}@{request.base_ref}")
        try:
            # refuse a change that cannot apply before spending the baseline run on it
            if request.changes.patch is not None:
                workspace.check_patch(request.changes.patch)
            else:
                workspace.check_files(f.path for f in request.changes.files or [])
        except GenesisError:
            self.records.sandbox_event(request.experiment_id, created.sandbox_path, created.event,
                                       size_bytes=created.size_bytes, detail=created.detail)
            raise
        self._phase_done(attempt, "copy", {"baseline_commit": attempt.baseline_commit}, events=[created],
                         baseline_commit=attempt.baseline_commit)

    def _baseline(self, attempt: _Attempt) -> None:
        """Run the baseline with the risk level's selection; if that selects nothing, the whole suite
        (and the change then runs the whole suite too)."""
        request = attempt.request
        # an explicit test_command is run as given; the risk level picks tests for the default one
        changed = changed_paths(attempt.workspace, [f.path for f in request.changes.files or []],
                                request.changes.patch)
        attempt.selected = select_tests(self.selection.get(request.risk_level, TestSelection()),
                                        attempt.workspace.path, request.test_command, changed)
        attempt.selection = list(attempt.selected.args)
        run = self._test_run(attempt)
        if selected_nothing(attempt.selected, run):
            log.info("experiment %s: selection %s ran no test, running the whole suite",
                     request.experiment_id, attempt.selection)
            attempt.selected, attempt.selection = attempt.selected.whole_suite(), []
            attempt.workspace.restore(attempt.baseline_commit or "HEAD")
            run = self._test_run(attempt)
        attempt.pending.append(self._record(run, "baseline", "baseline", attempt.baseline_commit))
        if not run.measured:
            output = (run.result.stderr or run.result.stdout).strip()[-1500:]
            raise ExperimentUnmeasurable(
                f"the test command could not run at the baseline (exit status {run.result.returncode}, "
                f"no test report): {output.splitlines()[-1] if output else 'no output'}",
                details={"command": run.command, "returncode": run.result.returncode, "output": output})
        attempt.workspace.restore(attempt.baseline_commit or "HEAD")
        attempt.baseline = run
        self._phase_done(attempt, "baseline", {"selection": attempt.selection, "run": run_state(run),
                                               "selected": _selected_state(attempt.selected)})

    def _change(self, attempt: _Attempt) -> None:
        request, workspace = attempt.request, attempt.workspace
        self._check_time(attempt)
        attempt.changed = True
        if request.changes.patch is not None:
            workspace.apply_patch(request.changes.patch)
        else:
            workspace.apply_files((f.path, f.content) for f in request.changes.files or [])
        attempt.change_commit = workspace.commit(f"experiment {request.experiment_id}: {request.experiment_type}\n\n"
                                                 f"{request.description}".strip())
        run = self._test_run(attempt)
        attempt.pending.append(self._record(run, "change", "change", attempt.change_commit))
        workspace.restore(attempt.change_commit)
        attempt.change = run
        self._phase_done(attempt, "change", {"change_commit": attempt.change_commit, "run": run_state(run)},
                         change_commit=attempt.change_commit)

    @staticmethod
    def _record(run: TestRun, phase: str, step: str, commit: str | None) -> RunRecord:
        return dataclasses.replace(run.record(phase, commit), step=step)

    def _measure(self, attempt: _Attempt) -> None:
        assert attempt.baseline is not None and attempt.change is not None
        assert attempt.baseline_commit is not None and attempt.change_commit is not None
        baseline, change = attempt.baseline, attempt.change
        baseline_runs, change_runs = self._reruns(attempt)
        classified = classify([baseline.outcomes, *baseline_runs], [change.outcomes, *change_runs])
        metrics = measure(baseline, change, attempt.elapsed_ms(self.monotonic()), classified)
        config_changes = test_config_changes(attempt.workspace.git(
            "diff", "--name-only", "--no-renames", "-z", attempt.baseline_commit, attempt.change_commit
        ).stdout.split("\0"))
        flags = ((["test_config_changed"] if config_changes else []) + sorted({*baseline.flags, *change.flags})
                 + (["flaky_tests"] if classified.flaky else []))
        attempt.measured = Measured(metrics, flags, config_changes, classified, len(change_runs),
                                    performance(baseline, change))
        self._phase_done(attempt, "measure", attempt.measured.state())

    def _reruns(self, attempt: _Attempt) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The tests that failed after the change, run settings.experiment_reruns more times after
        the change and as many at the baseline: the outcomes of each measured rerun (a rerun the
        sandbox killed or whose report is not whole tells nothing and is left out)."""
        assert attempt.change is not None and attempt.baseline_commit and attempt.change_commit
        failing = sorted(t for t, o in attempt.change.outcomes.items() if o in ("failed", "error"))
        if not failing or not self.settings.experiment_reruns:
            return [], []
        selection = self._rerun_selection(attempt, failing)
        done: dict[str, list[dict[str, Any]]] = {"change": [], "baseline": []}
        for phase, commit in (("change", attempt.change_commit), ("baseline", attempt.baseline_commit)):
            attempt.workspace.restore(commit)
            for _ in range(self.settings.experiment_reruns):
                run = self._test_run(attempt, selection)
                attempt.pending.append(self._record(run, phase, "measure", commit))
                if run.measured:
                    done[phase].append(dict(run.outcomes))
        attempt.workspace.restore(attempt.change_commit)
        log.info("experiment %s: %d failing test(s) rerun %d more time(s) at the change and at the baseline",
                 attempt.request.experiment_id, len(failing), self.settings.experiment_reruns)
        return done["baseline"], done["change"]

    def _rerun_selection(self, attempt: _Attempt, failing: Sequence[str]) -> list[str]:
        """pytest reruns just the failing tests (their node ids, when they are plain enough to pass
        as arguments); every other runner reruns what it ran (the outcomes of the other tests
        count too: one that passed before and fails now is just as flaky)."""
        assert attempt.baseline is not None
        plain = all(not t.startswith("-") and "\n" not in t and "::" in t for t in failing)
        if attempt.baseline.counted_by == "pytest-plugin" and plain and len(failing) <= 200:
            return list(failing)
        return attempt.selection

    def _decide(self, attempt: _Attempt) -> dict[str, Any]:
        request, workspace, change, measured = attempt.request, attempt.workspace, attempt.change, attempt.measured
        assert change is not None and attempt.baseline_commit is not None and attempt.change_commit is not None
        assert measured is not None
        events: list[SandboxEvent] = []
        decision: Decision = decide(measured.metrics, risk_level=request.risk_level,
                                    threshold=self.settings.regression_threshold, measured=change.measured,
                                    flags=measured.flags, problems=change.problems)
        if decision.rollback:
            workspace.git("update-ref", f"refs/genesis/rolled-back/{workspace.branch}", attempt.change_commit)
            workspace.rollback(attempt.baseline_commit)
            attempt.rolled_back = True
            events.append(SandboxEvent(str(workspace.path), "rolled_back", size_bytes=workspace.size_bytes(),
                                       detail=decision.reason))
        if decision.status != "success":
            events.append(SandboxEvent(str(workspace.path), "preserved", size_bytes=workspace.size_bytes(),
                                       detail=decision.reason))
        result = {
            **attempt.ids,
            "status": decision.status,
            "metrics": measured.metrics.as_json(),
            "recommendation": decision.recommendation,
            "rolled_back": attempt.rolled_back,
            "baseline_commit": attempt.baseline_commit,
            "sandbox_path": str(workspace.path),
            "counted_by": change.counted_by,
            "selection": attempt.selected.as_json() if attempt.selected else None,
            **measured.as_json(),
            "flags": measured.flags,
            "test_config_changes": measured.config_changes,
        }
        # the decide phase: recorded with the result, its events, fenced like every phase
        self.records.experiment_finished(request.experiment_id, result, fence=attempt.fence, events=events)
        log.info("experiment %s: %s, %s (%s)", request.experiment_id, decision.status, decision.recommendation,
                 decision.reason)
        return result

    # -- failure paths -------------------------------------------------------------------------

    def _give_up(self, attempt: _Attempt, *, rollback: bool) -> None:
        """Put the copy back to its baseline (if it got that far) and keep it for analysis."""
        workspace, experiment_id = attempt.workspace, attempt.request.experiment_id
        if rollback and attempt.baseline_commit is not None and workspace.path.exists():
            try:
                workspace.rollback(attempt.baseline_commit)
                attempt.rolled_back = True
                self.records.sandbox_event(experiment_id, str(workspace.path), "rolled_back",
                                           size_bytes=workspace.size_bytes(), detail="experiment failed")
            except GenesisError as exc:
                log.error("experiment %s: rollback failed: %s", experiment_id, exc)
        if workspace.path.exists():
            self.records.sandbox_event(experiment_id, str(workspace.path), "preserved",
                                       size_bytes=tree_size(workspace.path, workspace.git_dir),
                                       detail="experiment failed")

    def _record_failure(self, attempt: _Attempt, error: GenesisError) -> None:
        self.records.experiment_failed(
            attempt.request.experiment_id, {"code": error.code, "message": error.message, "details": error.details},
            rolled_back=attempt.rolled_back, duration_ms=attempt.elapsed_ms(self.monotonic()), fence=attempt.fence,
            runs=attempt.pending)
        attempt.pending = []

    # -- running the tests ---------------------------------------------------------------------

    def _check_time(self, attempt: _Attempt) -> float:
        if attempt.ctx.cancelled.is_set():
            raise ExperimentTimedOut("cancelled")
        left = attempt.deadline - self.monotonic()
        if left <= 0:
            raise ExperimentTimedOut(f"no time left after {self.monotonic() - attempt.started:.1f}s")
        return left

    def _test_run(self, attempt: _Attempt, selection: Sequence[str] | None = None) -> TestRun:
        """One run of the suite (suite.py: the command, the report channel, the verdict)."""
        left = self._check_time(attempt)
        limits = dataclasses.replace(self.limits, wall_s=min(self.limits.wall_s, left),
                                     cpu_s=max(1, min(self.limits.cpu_s, math.ceil(left))))
        request = attempt.request
        attempt.runs += 1
        with attempt.workspace.scratch(max_bytes=self.settings.experiment_scratch_mb * 2**20,
                                       max_inodes=self.settings.experiment_scratch_inodes) as root:
            run = run_tests(self.sandbox, attempt.selected.command if attempt.selected else request.test_command,
                            attempt.selection if selection is None else selection, root=root, python=self.python,
                            python_path=self.python_path, limits=limits, timeout_s=left,
                            cancelled=attempt.ctx.cancelled, env={"GENESIS_RUN_SEED": str(attempt.runs)})
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
