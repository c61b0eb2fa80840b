"""Performance impact (issue 12, item 3): wall, CPU and memory of the suite, the tests that got
slower, and custom metrics from the suite's own file, which is untrusted and refused whole when
it is anything but a small object of names to numbers. The experiment runs for real."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.handlers.experiments import ExperimentRunner
from genesis_pgflow.handlers.experiments.performance import performance, relative_change
from genesis_pgflow.messages import ExperimentRequest, parse_payload
from genesis_pgflow.sandbox import Sandbox, SandboxResult
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.experiments import MemoryExperimentRecords
from genesis_pgflow.suite import METRICS_FILE, TestRun, read_metrics

from .gitrepos import make_repo


def test_relative_change() -> None:
    assert relative_change(12, 9) == -0.25 and relative_change(2, 3) == 0.5
    assert relative_change(0, 3) is None and relative_change(None, 3) is None


def test_slower_tests_and_metrics_are_compared() -> None:
    def run(durations: dict[str, float], metrics: dict[str, float], cpu: float, wall: float) -> TestRun:
        result = SandboxResult(0, "", "", False, wall, cpu_s=cpu, memory_peak_bytes=100)
        return TestRun({t: "passed" for t in durations}, ["pytest"], result, True, "pytest-plugin",
                       durations=durations, custom_metrics=metrics)
    baseline = run({"a": 10.0, "b": 100.0, "c": 5.0}, {"llm_calls": 12, "tokens": 1000}, 1.0, 2.0)
    change = run({"a": 10.5, "b": 300.0, "c": 9.0}, {"llm_calls": 9}, 1.5, 3.0)
    section = performance(baseline, change)
    assert [s["test"] for s in section["slower_tests"]] == ["b", "c"]  # a: +0.5 ms is noise
    assert section["slower_tests"][0] == {"test": "b", "baseline_ms": 100.0, "change_ms": 300.0,
                                          "relative_change": 2.0}
    assert section["metrics"] == {"llm_calls": {"baseline": 12, "change": 9, "relative_change": -0.25},
                                  "tokens": {"baseline": 1000, "change": None, "relative_change": None}}
    assert section["relative_change"] == {"wall_ms": 0.5, "cpu_ms": 0.5, "memory_peak_bytes": 0.0}


@pytest.mark.parametrize("content, problem", [
    ('{"llm_calls": 12, "latency.p95_ms": 3.5}', None),
    ('{"llm_calls": true}', "finite numbers"),
    ('{"llm_calls": "12"}', "finite numbers"),
    ('{"llm_calls": NaN}', "finite numbers"),
    ('{"a b": 1}', "finite numbers"),
    ('{"' + "x" * 65 + '": 1}', "finite numbers"),
    (json.dumps({f"m{i}": i for i in range(51)}), "at most 50"),
    ("[1, 2]", "at most 50"),
    ("{", "not JSON"),
    (" " * (64 * 1024 + 1), "at most 65536 bytes"),
])
def test_the_metrics_file_is_numbers_only_and_bounded(tmp_path: Path, content: str, problem: str | None) -> None:
    (tmp_path / METRICS_FILE).write_text(content)
    metrics, found = read_metrics(tmp_path / METRICS_FILE)
    if problem is None:
        assert (metrics, found) == ({"llm_calls": 12.0, "latency.p95_ms": 3.5}, None)
    else:
        assert metrics == {} and found is not None and problem in found


def test_a_metrics_file_that_is_a_symlink_or_a_fifo_is_refused(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).symlink_to("/etc/passwd")
    assert read_metrics(tmp_path / METRICS_FILE)[0] == {}
    (tmp_path / METRICS_FILE).unlink()
    os.mkfifo(tmp_path / METRICS_FILE)
    assert read_metrics(tmp_path / METRICS_FILE)[0] == {}
    assert read_metrics(tmp_path / "absent.json") == ({}, None)


LLM = ("import json, os, time\n\nCALLS = {calls}\n\n\ndef answer():\n    time.sleep({sleep})\n    return 42\n\n\n"
       "def report():\n    with open(os.environ['GENESIS_METRICS_FILE'], 'w') as f:\n"
       "        json.dump({{'llm_calls': CALLS}}, f)\n")
TESTS = ("from llm import answer, report\n\n\ndef test_answer():\n    assert answer() == 42\n\n\n"
         "def test_report():\n    report()\n")


@pytest.mark.sandbox
def test_an_experiment_reports_its_performance_impact(genesis_home: Path, tmp_path: Path) -> None:
    sandbox = Sandbox()
    if not sandbox.available:
        pytest.skip("the sandbox (bubblewrap) is not available here")
    repo = make_repo(tmp_path / "repos" / "llm", {"llm.py": LLM.format(calls=12, sleep=0.0),
                                                  "tests/test_llm.py": TESTS})
    runner = ExperimentRunner(Settings(home=genesis_home, repo_allow=str(tmp_path / "repos")),
                              MemoryExperimentRecords(), sandbox)
    parsed = parse_payload({
        "type": "genesis_experiment_request", "experiment_id": "exp-perf", "instance_id": "singularity-1",
        "experiment_type": "llm_reduction", "description": "fewer calls", "risk_level": "medium",
        "repo": str(repo), "changes": {"files": [{"path": "llm.py", "content": LLM.format(calls=9, sleep=0.3)}]}})
    assert isinstance(parsed, ExperimentRequest)

    result = runner(parsed, WorkContext("genesis_experiment_requests", 1, 1, "wf-1", time.monotonic() + 120.0))

    section = result["performance"]
    assert section["metrics"] == {"llm_calls": {"baseline": 12.0, "change": 9.0, "relative_change": -0.25}}
    assert section["slower_tests"][0]["test"] == "tests/test_llm.py::test_answer"  # the most added time
    assert section["slower_tests"][0]["change_ms"] >= 300
    for side in ("baseline", "change"):
        assert section[side]["wall_ms"] > 0
        if sandbox.hierarchy is not None:
            assert section[side]["cpu_ms"] > 0 and section[side]["memory_peak_bytes"] > 0
