"""ExperimentRunner: metrics, decisions, test selection, and whole experiments in the real sandbox
on real git repositories (the original repository checked untouched after each)."""

from __future__ import annotations

import difflib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from genesis_pgflow.errors import PermanentError, RetryableError, WorkflowTimeout
from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.handlers.experiments import (
    DEFAULT_SELECTION,
    ExperimentRunner,
    Metrics,
    TestRun,
    TestSelection,
    decide,
    measure,
    parse_junit,
)
from genesis_pgflow.messages import ExperimentRequest, parse_payload
from genesis_pgflow.sandbox import Sandbox, SandboxResult
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.experiments import MemoryExperimentRecords
from genesis_pgflow.workspace import RepoState, repo_state

from .gitrepos import git, make_repo

CALC = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
UNIT_TESTS = (
    "from calc import add, mul\n\n"
    "def test_add():\n    assert add(1, 2) == 3\n\n"
    "def test_add_zero():\n    assert add(0, 0) == 0\n\n"
    "def test_mul():\n    assert mul(2, 3) == 6\n\n"
    "def test_mul_one():\n    assert mul(7, 1) == 7\n"
)
INTEGRATION_TESTS = "from calc import add, mul\n\ndef test_both():\n    assert add(mul(2, 2), 1) == 5\n"
BASE_FILES = {"calc.py": CALC, "tests/unit/test_calc.py": UNIT_TESTS,
              "tests/integration/test_flow.py": INTEGRATION_TESTS}


# --- pure parts -------------------------------------------------------------------------------


def junit(*cases: tuple[str, str]) -> str:
    body = "".join(f'<testcase classname="t" name="{name}">'
                   + {"passed": "", "failed": "<failure/>", "error": "<error/>", "skipped": "<skipped/>"}[outcome]
                   + "</testcase>" for name, outcome in cases)
    return f'<?xml version="1.0"?><testsuites><testsuite>{body}</testsuite></testsuites>'


def run_of(**outcomes: str) -> TestRun:
    return TestRun(dict(outcomes), ["pytest"], SandboxResult(0, "", "", False, 0.1), True)  # type: ignore[arg-type]


def test_parse_junit_keeps_the_worst_outcome_of_a_test() -> None:
    text = junit(("a", "passed"), ("b", "failed"), ("c", "error"), ("d", "skipped"), ("a", "error"))
    assert parse_junit(text) == {"t::a": "error", "t::b": "failed", "t::c": "error", "t::d": "skipped"}


def test_parse_junit_refuses_entity_tricks() -> None:
    with pytest.raises(ValueError):
        parse_junit('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><testsuites/>')


def test_measure_counts_broken_and_vanished_tests_as_regressed() -> None:
    baseline = run_of(a="passed", b="passed", c="passed", d="passed", e="failed")
    change = run_of(a="passed", b="failed", c="skipped", e="passed", f="passed")  # d vanished
    metrics = measure(baseline, change, 12.0)
    assert metrics.regression == pytest.approx(2 / 4)
    assert metrics.new_failures == 2
    assert metrics.baseline_success_rate == pytest.approx(4 / 5)
    assert metrics.success_rate == pytest.approx(3 / 4)
    assert (metrics.test_count, metrics.failures, metrics.duration_ms) == (4, 1, 12.0)


def metrics(**values: Any) -> Metrics:
    base = {"success_rate": 1.0, "regression": 0.0, "baseline_success_rate": 1.0, "test_count": 10,
            "failures": 0, "duration_ms": 1.0, "new_failures": 0}
    return Metrics(**{**base, **values})


@pytest.mark.parametrize("values, risk, expected", [
    ({}, "low", ("success", "merge", False)),
    ({}, "medium", ("success", "merge", False)),
    ({}, "high", ("success", "merge_with_review", False)),
    ({"test_count": 0, "success_rate": 0.0, "baseline_success_rate": 0.0}, "low",
     ("success", "merge_with_review", False)),
    ({"regression": 0.02, "new_failures": 1, "success_rate": 1.0}, "low", ("success", "merge_with_review", False)),
    ({"regression": 0.05, "success_rate": 0.95, "new_failures": 1}, "low", ("failed", "reject", False)),
    ({"regression": 0.051, "success_rate": 0.9}, "low", ("regressed", "reject", True)),
    ({"regression": 0.5, "success_rate": 0.5}, "high", ("regressed", "reject", True)),
    ({"success_rate": 0.8, "baseline_success_rate": 0.9}, "low", ("failed", "reject", False)),
    # a suite that never passes says nothing about the change
    ({"success_rate": 0.0, "baseline_success_rate": 0.0, "failures": 10}, "low",
     ("success", "merge_with_review", False)),
])
def test_decide(values: dict[str, Any], risk: str, expected: tuple[str, str, bool]) -> None:
    decision = decide(metrics(**values), risk_level=risk, threshold=0.05)
    assert (decision.status, decision.recommendation, decision.rollback) == expected


def test_an_unmeasurable_change_is_rejected_saying_why() -> None:
    decision = decide(metrics(regression=0.0), risk_level="low", threshold=0.05, measured=False,
                      problems=["the suite went past its memory limit and was killed"])
    assert (decision.status, decision.recommendation) == ("failed", "reject")
    assert decision.reason.endswith("went past its memory limit and was killed")


def test_selection_prefers_paths_then_markers(tmp_path: Path) -> None:
    assert DEFAULT_SELECTION["high"].pytest_args(tmp_path) == []
    assert DEFAULT_SELECTION["low"].pytest_args(tmp_path) == ["-m", "not integration and not slow and not e2e"]
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    assert DEFAULT_SELECTION["low"].pytest_args(tmp_path) == ["tests/unit"]
    assert DEFAULT_SELECTION["medium"].pytest_args(tmp_path) == ["tests/unit"]
    (tmp_path / "tests" / "integration").mkdir()
    assert DEFAULT_SELECTION["medium"].pytest_args(tmp_path) == ["tests/unit", "tests/integration"]
    assert TestSelection(("nope",), None).pytest_args(tmp_path) == []


# --- whole experiments ------------------------------------------------------------------------


class Repos:
    """Builds original repositories; at teardown every one must be as it was built."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[Path, RepoState] = {}

    def make(self, name: str = "source", files: dict[str, str] = BASE_FILES) -> Path:
        return make_repo(self.root / name, files)

    def seal(self, repo: Path) -> Path:
        self.built[repo] = repo_state(repo)
        return repo

    def check_untouched(self) -> None:
        for repo, state in self.built.items():
            assert repo_state(repo) == state, f"{repo} was modified"


@pytest.fixture
def repos(tmp_path: Path) -> Iterator[Repos]:
    built = Repos(tmp_path / "repos")
    yield built
    built.check_untouched()


@pytest.fixture
def home(genesis_home: Path) -> Path:
    return genesis_home


def settings_for(home: Path, repos: Repos, **values: Any) -> Settings:
    """Settings whose GENESIS_REPO_ALLOW admits the repositories the test builds, and nothing else."""
    return Settings(home=home, repo_allow=str(repos.root), **values)


@pytest.fixture
def records() -> MemoryExperimentRecords:
    return MemoryExperimentRecords()


@pytest.fixture
def runner(home: Path, records: MemoryExperimentRecords, sandbox: Sandbox, repos: Repos) -> ExperimentRunner:
    return ExperimentRunner(settings_for(home, repos), records, sandbox)


def request(repo: Path, experiment_id: str = "exp-1", **fields: Any) -> ExperimentRequest:
    payload = {"type": "genesis_experiment_request", "experiment_id": experiment_id, "instance_id": "singularity-1",
               "experiment_type": "refactor", "description": "a change", "risk_level": "low", "repo": str(repo),
               "changes": {"files": [{"path": "calc.py", "content": CALC.replace("a + b", "b + a")}]}, **fields}
    parsed = parse_payload(payload)
    assert isinstance(parsed, ExperimentRequest)
    return parsed


def context(seconds: float = 60.0) -> WorkContext:
    return WorkContext("genesis_experiment_requests", 1, 1, "wf-1", time.monotonic() + seconds)


@pytest.mark.sandbox
def test_a_harmless_change_succeeds_and_is_recommended(runner: ExperimentRunner, repos: Repos,
                                                        records: MemoryExperimentRecords) -> None:
    repo = repos.seal(repos.make())
    result = runner(request(repo), context())

    baseline = git(repo, "rev-parse", "HEAD").strip()
    assert result == {
        "experiment_id": "exp-1", "instance_id": "singularity-1", "status": "success",
        "metrics": {**result["metrics"], "success_rate": 1.0, "regression": 0.0, "baseline_success_rate": 1.0,
                    "test_count": 4, "failures": 0},
        "recommendation": "merge", "rolled_back": False, "baseline_commit": baseline,
        "sandbox_path": str(runner.settings.sandboxes_dir / "exp-1"),
        "counted_by": "pytest-plugin", "flags": [], "test_config_changes": [],
        "selection": {"command": ["pytest"], "by": "paths", "args": ["tests/unit"]},
        "classes": {"pass->pass": 4, "pass->fail": 0, "fail->pass": 0, "fail->fail": 0},
        "regressions": [], "fixed": [], "flaky": [], "reruns": 0, "performance": result["performance"],
    }
    assert result["metrics"]["duration_ms"] > 0
    copy = Path(result["sandbox_path"])
    assert "b + a" in (copy / "calc.py").read_text()
    shown = records.show_experiment("exp-1")
    assert shown is not None and shown["status"] == "success" and shown["change_commit"]
    assert [r["phase"] for r in shown["runs"]] == ["baseline", "change"]
    assert shown["runs"][0]["command"][-1] == "tests/unit"  # low risk: the unit tests only
    assert [e["event"] for e in shown["sandbox_events"]] == ["created"]


@pytest.mark.sandbox
def test_a_breaking_change_is_measured_rolled_back_and_rejected(runner: ExperimentRunner, repos: Repos,
                                                                records: MemoryExperimentRecords) -> None:
    repo = repos.seal(repos.make())
    broken = CALC.replace("a * b", "a + b")  # mul breaks: 2 of the 5 tests (high risk runs them all)
    result = runner(request(repo, risk_level="high",
                            changes={"files": [{"path": "calc.py", "content": broken}]}), context())

    assert result["status"] == "regressed" and result["recommendation"] == "reject" and result["rolled_back"]
    assert result["metrics"]["regression"] == pytest.approx(2 / 5, abs=1e-6)
    assert result["metrics"]["test_count"] == 5 and result["metrics"]["failures"] == 2
    assert result["metrics"]["success_rate"] == pytest.approx(3 / 5, abs=1e-6)
    copy = Path(result["sandbox_path"])
    assert (copy / "calc.py").read_text() == CALC
    head = subprocess.run(["git", "-C", str(copy), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout
    assert head.strip() == result["baseline_commit"]
    shown = records.show_experiment("exp-1")
    assert shown is not None and shown["rolled_back"] and shown["status"] == "regressed"
    assert [e["event"] for e in shown["sandbox_events"]] == ["created", "rolled_back", "preserved"]


@pytest.mark.sandbox
def test_a_patch_that_does_not_apply_fails_before_any_test_runs(runner: ExperimentRunner, repos: Repos,
                                                                records: MemoryExperimentRecords) -> None:
    repo = repos.seal(repos.make())
    patch = "--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n+    return 0\n"
    with pytest.raises(PermanentError) as caught:
        runner(request(repo, changes={"patch": patch}), context())
    assert caught.value.code == "patch_does_not_apply"
    assert caught.value.details["experiment_id"] == "exp-1"
    shown = records.show_experiment("exp-1")
    assert shown is not None and shown["status"] == "failed" and shown["runs"] == []
    assert shown["error"]["code"] == "patch_does_not_apply" and shown["recommendation"] == "reject"


@pytest.mark.sandbox
def test_a_patch_is_applied_and_measured(runner: ExperimentRunner, repos: Repos) -> None:
    repo = repos.seal(repos.make())
    changed = CALC.replace("a + b", "sum((a, b))")
    patch = "".join(difflib.unified_diff(CALC.splitlines(True), changed.splitlines(True), "a/calc.py", "b/calc.py"))
    result = runner(request(repo, risk_level="medium", changes={"patch": patch}), context())
    assert (result["status"], result["recommendation"]) == ("success", "merge")
    assert result["metrics"]["test_count"] == 5  # medium: unit and integration tests


@pytest.mark.sandbox
@pytest.mark.parametrize("changes", [
    {"files": [{"path": "../../escaped.py", "content": "x"}]},
    {"files": [{"path": "tests/../../escaped.py", "content": "x"}]},
    {"files": [{"path": "/tmp/escaped.py", "content": "x"}]},
    {"patch": "--- /dev/null\n+++ b/../../escaped.py\n@@ -0,0 +1 @@\n+x\n"},
    {"patch": "diff --git a/out b/out\nnew file mode 120000\n--- /dev/null\n+++ b/out\n@@ -0,0 +1 @@\n"
              "+/tmp\n\\ No newline at end of file\n"},
], ids=["dotdot", "inner-dotdot", "absolute", "patch-dotdot", "patch-symlink"])
def test_paths_that_escape_the_sandbox_are_refused(runner: ExperimentRunner, repos: Repos, tmp_path: Path,
                                                   records: MemoryExperimentRecords, changes: dict[str, Any]) -> None:
    repo = repos.seal(repos.make())
    with pytest.raises(PermanentError) as caught:
        runner(request(repo, changes=changes), context())
    assert caught.value.code in ("path_escapes_sandbox", "patch_does_not_apply")
    if "files" in changes or "120000" in changes.get("patch", ""):
        assert caught.value.code == "path_escapes_sandbox"
    assert not list(runner.settings.home.rglob("escaped.py")) and not Path("/tmp/escaped.py").exists()
    shown = records.show_experiment("exp-1")
    assert shown is not None and shown["status"] == "failed"
    copy = runner.settings.sandboxes_dir / "exp-1"
    assert not (copy / "out").is_symlink()


@pytest.mark.sandbox
def test_a_copied_symlink_out_of_the_sandbox_is_refused(runner: ExperimentRunner, repos: Repos,
                                                        tmp_path: Path) -> None:
    repo = repos.make()
    (repo / "secrets").symlink_to("/etc")
    git(repo, "add", "secrets")
    git(repo, "commit", "-qm", "escape")
    repos.seal(repo)
    with pytest.raises(PermanentError) as caught:
        runner(request(repo), context())
    assert caught.value.code == "path_escapes_sandbox"


@pytest.mark.sandbox
def test_malicious_hooks_and_a_scheming_test_suite_never_run_on_the_host(runner: ExperimentRunner, repos: Repos,
                                                                        tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    # the test suite tries to plant a hook and an fsmonitor in the copy's git directory, and to write
    # the marker directly
    scheming = (
        "import os, pathlib\n\n"
        "def test_scheme():\n"
        "    root = pathlib.Path('.')\n"
        "    for target in [root / '.git', root / 'evil']:\n"
        "        try:\n"
        "            if target.is_file(): target.unlink()\n"
        "            (target / 'hooks').mkdir(parents=True, exist_ok=True)\n"
        f"            hook = target / 'hooks' / 'post-commit'; hook.write_text('#!/bin/sh\\ntouch {marker}\\n')\n"
        "            hook.chmod(0o755)\n"
        f"            (target / 'config').write_text('[core]\\n\\tfsmonitor = {marker}.sh\\n')\n"
        "        except OSError:\n"
        "            pass\n"
        "    try:\n"
        f"        open('{marker}', 'w').write('escaped')\n"
        "    except OSError:\n"
        "        pass\n"
    )
    repo = repos.make(files={**BASE_FILES, "tests/unit/test_scheme.py": scheming})
    hook_script = f"#!/bin/sh\ntouch {marker}\n"
    for hook in ("post-checkout", "post-commit", "pre-commit", "reference-transaction"):
        (repo / ".git" / "hooks" / hook).write_text(hook_script)
        (repo / ".git" / "hooks" / hook).chmod(0o755)
    Path(f"{marker}.sh").write_text(hook_script)
    Path(f"{marker}.sh").chmod(0o755)
    repos.seal(repo)

    result = runner(request(repo), context())

    assert result["status"] == "success"
    assert not marker.exists()
    assert not (Path(result["sandbox_path"]) / ".git").is_dir()


@pytest.mark.sandbox
@pytest.mark.slow
def test_a_hanging_test_suite_times_out_and_is_rolled_back(runner: ExperimentRunner, repos: Repos,
                                                           records: MemoryExperimentRecords) -> None:
    repo = repos.seal(repos.make())
    hanging = CALC.replace("    return a + b", "    import time\n    time.sleep(120)\n    return a + b")
    started = time.monotonic()
    # room for the baseline on a busy machine; the changed suite would sleep for 120 s
    with pytest.raises(WorkflowTimeout) as caught:
        runner(request(repo, timeout_ms=20_000, changes={"files": [{"path": "calc.py", "content": hanging}]}),
               context())
    assert time.monotonic() - started < 110, "the hanging suite was cut at the experiment's timeout"
    assert caught.value.code == "timeout" and caught.value.details["rolled_back"] is True
    copy = runner.settings.sandboxes_dir / "exp-1"
    assert (copy / "calc.py").read_text() == CALC
    shown = records.show_experiment("exp-1")
    assert shown is not None and shown["status"] == "failed" and shown["rolled_back"]
    assert shown["error"]["code"] == "timeout"
    assert [r["phase"] for r in shown["runs"]] == ["baseline"]


@pytest.mark.sandbox
def test_a_selection_that_collects_nothing_falls_back_to_the_whole_suite(runner: ExperimentRunner, repos: Repos,
                                                                         records: MemoryExperimentRecords) -> None:
    marked = "import pytest\n\npytestmark = pytest.mark.integration\n\n" + UNIT_TESTS
    repo = repos.seal(repos.make(files={"calc.py": CALC, "test_top.py": marked}))
    result = runner(request(repo, risk_level="low"), context())  # low: not integration -> nothing
    assert result["metrics"]["test_count"] == 4
    runs = records.show_experiment("exp-1")["runs"]  # type: ignore[index]
    assert [r["command"][-1] for r in runs] == ["no:cacheprovider"] * 2  # the whole suite, both times


@pytest.mark.sandbox
def test_an_explicit_test_command_runs_as_given(runner: ExperimentRunner, repos: Repos,
                                                records: MemoryExperimentRecords) -> None:
    repo = repos.seal(repos.make())
    result = runner(request(repo, risk_level="low", test_command=["pytest", "tests/integration"]), context())
    assert result["metrics"]["test_count"] == 1 and result["recommendation"] == "merge"


@pytest.mark.sandbox
def test_a_test_command_that_cannot_run_fails_the_experiment(runner: ExperimentRunner, repos: Repos,
                                                             records: MemoryExperimentRecords) -> None:
    repo = repos.seal(repos.make())
    with pytest.raises(PermanentError) as caught:
        runner(request(repo, test_command=["pytest", "--no-such-option"]), context())
    assert caught.value.code == "test_command_failed"
    assert "no-such-option" in caught.value.details["output"]
    shown = records.show_experiment("exp-1")
    assert shown is not None and shown["status"] == "failed" and [r["phase"] for r in shown["runs"]] == ["baseline"]


# --- the concurrency limit (a fake sandbox: it is the semaphore under test) -------------------


class GatedSandbox:
    """Stands in for Sandbox: each run waits for the gate and writes an all-passing report."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.inside = threading.Semaphore(0)
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()

    def check(self) -> None:
        pass

    def run(self, argv: list[str], *, writable: Path, **_: Any) -> SandboxResult:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        self.inside.release()
        self.gate.wait(timeout=30)
        (writable / ".genesis-junit.xml").write_text(junit(("a", "passed")))
        with self.lock:
            self.active -= 1
        return SandboxResult(0, "", "", False, 0.01)


def test_at_most_max_experiments_concurrent_run_at_once(repos: Repos, home: Path) -> None:
    repo = repos.seal(repos.make())
    fake = GatedSandbox()
    runner = ExperimentRunner(settings_for(home, repos, max_experiments_concurrent=2), MemoryExperimentRecords(),
                              fake)  # type: ignore[arg-type]
    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda i=i: results.append(runner(request(repo, f"exp-{i}", test_command=["true"]),
                                                                         context())))
               for i in range(4)]
    for thread in threads:
        thread.start()
    assert fake.inside.acquire(timeout=10) and fake.inside.acquire(timeout=10)
    time.sleep(0.3)  # give the other two every chance to get in, which they must not
    assert fake.peak == 2
    fake.gate.set()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 4 and fake.peak == 2 and runner.peak_running == 2
    assert all(r["status"] == "success" for r in results)


def test_no_sandbox_no_experiment(repos: Repos, home: Path, records: MemoryExperimentRecords) -> None:
    repo = repos.seal(repos.make())
    runner = ExperimentRunner(settings_for(home, repos), records, Sandbox(bwrap="/nonexistent/bwrap"))
    with pytest.raises(PermanentError) as caught:
        runner(request(repo), context())
    assert caught.value.code == "sandbox_unavailable"
    assert not (home / "sandboxes" / "exp-1").exists() and records.show_experiment("exp-1") is None


def test_waiting_for_a_slot_held_by_another_consumer_times_out(repos: Repos, home: Path) -> None:
    repo = repos.seal(repos.make())
    locks: dict[str, Any] = {}
    other_consumer, mine = MemoryExperimentRecords(locks=locks), MemoryExperimentRecords(locks=locks)
    runner = ExperimentRunner(settings_for(home, repos, max_experiments_concurrent=1), mine,
                              GatedSandbox())  # type: ignore[arg-type]
    with other_consumer.experiment_slot(1) as held:
        assert held
        with pytest.raises(RetryableError, match="no experiment slot") as caught:
            runner(request(repo, test_command=["true"]), context(seconds=1.0))
        assert caught.value.code == "experiment_slots_busy"
    assert mine.show_experiment("exp-1") is None
