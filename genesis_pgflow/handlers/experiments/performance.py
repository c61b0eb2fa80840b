"""Performance impact (pure): what the suite cost at the baseline and after the change, the tests
that got slower, and the custom metrics the suite reported (suite.read_metrics), each with its
relative change. The figures come from the sandbox (its run's cgroup: CPU time and peak memory;
the wall clock of the run) and the runner's report (per-test durations); none of them decides
anything: they are there for the producer to weigh."""

from __future__ import annotations

from typing import Any

from genesis_pgflow.suite import TestRun

SLOWER_LISTED = 5
# a test "got slower" when it took at least this much longer, and this share longer
SLOWER_MIN_MS = 1.0
SLOWER_MIN_SHARE = 0.10


def relative_change(before: float | None, after: float | None) -> float | None:
    """(after - before) / before; None where either is unknown or before is 0."""
    if before is None or after is None or before == 0:
        return None
    return round((after - before) / abs(before), 6)


def usage(run: TestRun) -> dict[str, Any]:
    """wall_ms, cpu_ms and memory_peak_bytes of one run (the last two None without a cgroup)."""
    result = run.result
    return {"wall_ms": round(result.duration_s * 1000.0, 3),
            "cpu_ms": None if result.cpu_s is None else round(result.cpu_s * 1000.0, 3),
            "memory_peak_bytes": result.memory_peak_bytes}


def slower_tests(baseline: TestRun, change: TestRun, listed: int = SLOWER_LISTED) -> list[dict[str, Any]]:
    """The tests that took longer after the change, most added time first."""
    slower: list[dict[str, Any]] = []
    for test, after in change.durations.items():
        before = baseline.durations.get(test)
        if before is not None and after - before >= SLOWER_MIN_MS and after >= before * (1 + SLOWER_MIN_SHARE):
            slower.append({"test": test, "baseline_ms": before, "change_ms": after,
                           "relative_change": relative_change(before, after)})
    slower.sort(key=lambda s: (-(s["change_ms"] - s["baseline_ms"]), s["test"]))
    return slower[:listed]


def performance(baseline: TestRun, change: TestRun) -> dict[str, Any]:
    """The result's "performance" section (docs/interface.md)."""
    before, after = usage(baseline), usage(change)
    names = sorted({*baseline.custom_metrics, *change.custom_metrics})
    section: dict[str, Any] = {
        "baseline": before, "change": after,
        "relative_change": {key: relative_change(before[key], after[key]) for key in before},
        "slower_tests": slower_tests(baseline, change),
        "metrics": {name: {"baseline": baseline.custom_metrics.get(name), "change": change.custom_metrics.get(name),
                           "relative_change": relative_change(baseline.custom_metrics.get(name),
                                                              change.custom_metrics.get(name))}
                    for name in names},
    }
    problems = [p for p in (baseline.metrics_problem, change.metrics_problem) if p]
    if problems:
        section["metrics_problems"] = sorted(set(problems))
    return section
