"""What each phase of an experiment leaves for the next, as the JSON its records keep
(ExperimentRecords.phase_finished), and back: the next delivery of a request whose consumer was
killed reads them and resumes at the first unfinished phase (runner.py).

    copy     -> {"baseline_commit"}
    baseline -> {"selection", "run"}                 (the baseline's run, per-test outcomes included)
    change   -> {"change_commit", "run"}
    measure  -> {"metrics", "classified", "flags", "config_changes", "reruns", "performance"}
    decide   -> the result itself (kept on the experiment's record too)

Every state also holds "runs" (the suite runs so far: each run's GENESIS_RUN_SEED is its number,
so a resumed experiment numbers its runs as an uninterrupted one would) and "elapsed_ms" (the
experiment's time so far, so that its duration counts the attempts before). Only what a later
phase reads is kept: a run's output is in genesis.experiment_runs, not here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from genesis_pgflow.handlers.experiments.policy import LISTED_TESTS, Classified, Metrics
from genesis_pgflow.sandbox import SandboxResult
from genesis_pgflow.store.experiments import PHASES
from genesis_pgflow.suite import TestRun

__all__ = ["PHASES", "Measured", "finished_prefix", "run_from", "run_state"]


@dataclass(frozen=True)
class Measured:
    """The measure phase's outcome: what decide needs, and the measure part of the result."""

    metrics: Metrics
    flags: list[str]
    config_changes: list[str]
    classified: Classified
    reruns: int
    performance: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """The measure phase's part of the result."""
        classified = self.classified
        return {"classes": classified.counts(), "regressions": classified.regressions[:LISTED_TESTS],
                "fixed": classified.tests("fail->pass")[:LISTED_TESTS],
                "flaky": list(classified.flaky[:LISTED_TESTS]), "reruns": self.reruns,
                "performance": self.performance}

    def state(self) -> dict[str, Any]:
        classified = self.classified
        return {"metrics": asdict(self.metrics), "flags": self.flags, "config_changes": self.config_changes,
                "classified": {"classes": dict(classified.classes), "flaky": list(classified.flaky),
                               "skipped": list(classified.skipped)},
                "reruns": self.reruns, "performance": self.performance}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Measured:
        classified = state["classified"]
        return cls(Metrics(**state["metrics"]), list(state["flags"]), list(state["config_changes"]),
                   Classified(dict(classified["classes"]), tuple(classified["flaky"]), tuple(classified["skipped"])),
                   int(state["reruns"]), dict(state["performance"]))


# the parts of a run's SandboxResult that a later phase reads (performance, decide); not its output
_RESULT_FIELDS = ("returncode", "timed_out", "duration_s", "cancelled", "limit", "memory_peak_bytes", "cpu_s")


def run_state(run: TestRun) -> dict[str, Any]:
    """A test run as JSON: outcomes, how they were counted, durations, metrics and its usage."""
    return {"outcomes": dict(run.outcomes), "command": list(run.command), "measured": run.measured,
            "counted_by": run.counted_by, "problems": list(run.problems), "rewritten": list(run.rewritten),
            "durations": dict(run.durations), "custom_metrics": dict(run.custom_metrics),
            "metrics_problem": run.metrics_problem,
            "result": {name: getattr(run.result, name) for name in _RESULT_FIELDS}}


def run_from(state: dict[str, Any]) -> TestRun:
    """The TestRun run_state kept (its output left out)."""
    result = SandboxResult(stdout="", stderr="", **{name: state["result"].get(name) for name in _RESULT_FIELDS
                                                   if name in state["result"]})
    return TestRun(dict(state["outcomes"]), list(state["command"]), result, bool(state["measured"]),
                   state["counted_by"], tuple(state["problems"]), tuple(state["rewritten"]),
                   dict(state["durations"]), dict(state["custom_metrics"]), state.get("metrics_problem"))


def finished_prefix(phases: dict[str, dict[str, Any]]) -> list[str]:
    """The phases finished in order from the first (a later one recorded after a gap is not used)."""
    done: list[str] = []
    for name in PHASES:
        if name not in phases:
            break
        done.append(name)
    return done
