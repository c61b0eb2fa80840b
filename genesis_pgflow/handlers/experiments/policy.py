"""The experiment's pure policy: each test's class across the runs, what the two runs measure, and
the decision taken on it (which tests a risk level runs is selection.py). Nothing here runs
anything or touches the records, so every rule is testable on its own (tests/unit/test_experiments.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from genesis_pgflow.suite import Outcome, TestRun

Status = Literal["success", "regressed", "failed"]
Recommendation = Literal["merge", "merge_with_review", "reject"]
TestClass = Literal["pass->pass", "pass->fail", "fail->pass", "fail->fail"]
TEST_CLASSES: tuple[TestClass, ...] = ("pass->pass", "pass->fail", "fail->pass", "fail->fail")
# how many test ids a result lists per kind (regressions, flaky, ...); the counts are always whole
LISTED_TESTS = 50


# --- each test's class across runs ---------------------------------------------------------


@dataclass(frozen=True)
class Classified:
    """Every test seen in the runs of both commits: its class (SWE-bench's four), or flaky (it both
    passed and failed on one commit), or skipped (skipped on a side, so not compared).

    A side's outcome: pass if every run that reported the test passed it, fail if every one
    failed or errored it, and a test no run of that side reported counts as failing there (a test
    that vanished after the change is pass->fail; a new one is fail->pass or fail->fail). So a
    regression (pass->fail) passed on every baseline run and failed on every change run."""

    classes: Mapping[str, TestClass]
    flaky: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(TEST_CLASSES, 0)
        for test_class in self.classes.values():
            counts[test_class] += 1
        return counts

    def tests(self, test_class: TestClass) -> list[str]:
        return sorted(t for t, c in self.classes.items() if c == test_class)

    @property
    def regressions(self) -> list[str]:
        return self.tests("pass->fail")


def _side(observed: Sequence[Outcome]) -> str:
    """pass, fail, flaky, skip or absent: what one commit's runs said of a test."""
    passed = "passed" in observed
    failed = "failed" in observed or "error" in observed
    if passed and failed:
        return "flaky"
    if passed:
        return "pass"
    if failed:
        return "fail"
    return "skip" if observed else "absent"


def classify(baseline_runs: Sequence[Mapping[str, Outcome]],
             change_runs: Sequence[Mapping[str, Outcome]]) -> Classified:
    """Each test's class from every run at the baseline and every run after the change (a rerun may
    cover only some tests: a test counts the runs that reported it)."""
    tests = {t for run in (*baseline_runs, *change_runs) for t in run}
    classes: dict[str, TestClass] = {}
    flaky: list[str] = []
    skipped: list[str] = []
    for test in tests:
        before = _side([run[test] for run in baseline_runs if test in run])
        after = _side([run[test] for run in change_runs if test in run])
        if "flaky" in (before, after):
            flaky.append(test)
        elif "skip" in (before, after):
            skipped.append(test)
        else:
            classes[test] = f"{'pass' if before == 'pass' else 'fail'}->{'pass' if after == 'pass' else 'fail'}"  # type: ignore[assignment]
    return Classified(classes, tuple(sorted(flaky)), tuple(sorted(skipped)))


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


def _rate(run: TestRun, apart: set[str]) -> float:
    counted = [o for t, o in run.outcomes.items() if o != "skipped" and t not in apart]
    return sum(1 for o in counted if o == "passed") / len(counted) if counted else 0.0


def measure(baseline: TestRun, change: TestRun, duration_ms: float, classified: Classified | None = None) -> Metrics:
    """Compare the two runs (and the reruns `classified` saw). A test that passed at the baseline and
    failed, errored or disappeared after the change counts as regressed (one that became skipped
    does not); a flaky test is set apart: it counts in neither success rate nor the regression."""
    if classified is None:
        classified = classify([baseline.outcomes], [change.outcomes])
    apart = set(classified.flaky)
    before = baseline.passed - apart
    broken = classified.regressions
    return Metrics(
        success_rate=_rate(change, apart),
        regression=len(broken) / len(before) if before else 0.0,
        baseline_success_rate=_rate(baseline, apart),
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
