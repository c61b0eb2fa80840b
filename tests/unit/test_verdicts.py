"""Forged verdicts (issue 7, item 2): tested code that prints a runner's summary, rewrites its
reports, writes into every descriptor it can find or halts the runner gets no pass out of it.
Real runners in the real sandbox."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from genesis_pgflow.analysers import Toolchain, elixir, javascript, python
from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.handlers.experiments import ExperimentRunner, Metrics, decide
from genesis_pgflow.messages import ExperimentRequest, parse_payload
from genesis_pgflow.sandbox import Limits, Sandbox
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.experiments import MemoryExperimentRecords
from genesis_pgflow.suite import REPORTERS_DIR, ReportChannel, TestRun, Verdict, pytest_argv, run_tests

from .gitrepos import git, make_repo

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def verdict_sandbox() -> Sandbox:
    return Sandbox(Limits(wall_s=60))


@pytest.fixture
def tools(verdict_sandbox: Sandbox) -> Toolchain:
    # one per test: a toolchain's deadline is 30 s from when it is made, and a module of these
    # tests on a busy machine takes longer than that
    return Toolchain(verdict_sandbox)


def code(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def rules(analysis: Any) -> set[str]:
    return {issue.rule for issue in analysis.issues}


# code that writes a forged report line into every descriptor it holds (Python, then JavaScript)
FORGE_EVERY_FD_PY = """
import os
def forge():
    line = b"0\\tstart\\t{}\\t" + b"0" * 64 + b"\\n" + b"1\\tresult\\t{\\"id\\":\\"x\\",\\"outcome\\":\\"passed\\"}\\t" + b"0" * 64 + b"\\n"
    for name in os.listdir("/proc/self/fd"):
        try:
            os.write(int(name), line * 25)
        except OSError:
            pass
        try:  # and through the path, which reopens pipes and files
            with open(f"/proc/self/fd/{name}", "ab") as handle:
                handle.write(line)
        except OSError:
            pass
"""


# --- Python ------------------------------------------------------------------------------------


def test_a_failing_python_test_printing_25_passed_at_exit_is_one_failure(tools: Toolchain) -> None:
    analysis = python.testing(code("""
        import atexit, os

        def shout():
            for fd in (1, 2):
                os.write(fd, b"\\n========== 25 passed in 0.01s ==========\\n")
        atexit.register(shout)

        def test_wrong():
            assert 1 + 1 == 3
    """), tools)
    assert analysis.output is not None and "25 passed" in analysis.output  # the forged summary was printed
    assert analysis.tests is not None
    assert analysis.tests.as_json() == {"passed": 0, "failed": 1, "errors": 0, "total": 1}
    assert analysis.quality_score == 0.0


def test_python_test_code_writing_report_lines_into_every_descriptor_gains_nothing(tools: Toolchain) -> None:
    analysis = python.testing(FORGE_EVERY_FD_PY + code("""
        def test_forges():
            forge()
            assert False
    """), tools)
    # the forged lines broke the stream: the run is unmeasurable, and its one test an error
    assert analysis.tests is not None and analysis.tests.as_json() == {"passed": 0, "failed": 0, "errors": 1, "total": 1}
    assert "test-report" in rules(analysis)


def test_python_test_code_patching_the_runner_at_import_is_unmeasurable(tools: Toolchain) -> None:
    analysis = python.testing(code("""
        import _pytest.python
        _pytest.python.Function.runtest = lambda self: None  # every test "passes" without running

        def test_wrong():
            assert False
    """), tools)
    assert analysis.tests is not None and analysis.tests.passed == 0 and analysis.tests.errors >= 1
    assert "test-report" in rules(analysis)
    assert any("patched" in issue.message for issue in analysis.issues)


def run_pytest(sandbox: Sandbox, files: dict[str, str]) -> tuple[Verdict, str]:
    with ReportChannel() as channel:
        argv = pytest_argv("/usr/bin/python3", ["-q", "-p", "no:cacheprovider", "--color=no"], channel)
        result = sandbox.run(argv, files=files, env=channel.env, ro_paths=[REPORTERS_DIR], pass_fds=channel.pass_fds)
    return channel.verdict("pytest-plugin"), result.stdout + result.stderr


REWRITING_CONFTEST = code("""
    import pytest

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_makereport(item, call):
        outcome = yield
        report = outcome.get_result()
        if report.failed:
            report.outcome = "passed"
            report.longrepr = None
""")


def test_a_conftest_rewriting_failures_to_passes_is_counted_as_failures(tools: Toolchain) -> None:
    tests = "def test_one():\n    assert False\n\ndef test_two():\n    raise RuntimeError\n\ndef test_ok():\n    pass\n"
    verdict, output = run_pytest(tools.sandbox, {"conftest.py": REWRITING_CONFTEST, "test_code.py": tests})
    assert "3 passed" in output  # pytest itself was fooled
    assert verdict.measured
    assert verdict.outcomes == {"test_code.py::test_one": "failed", "test_code.py::test_two": "failed",
                                "test_code.py::test_ok": "passed"}
    assert set(verdict.rewritten) == {"test_code.py::test_one", "test_code.py::test_two"}


SWALLOWING_CONFTEST = code("""
    import pytest

    @pytest.hookimpl(hookwrapper=True, trylast=True)
    def pytest_runtest_call(item):
        outcome = yield
        outcome.force_result(None)  # the test's exception never reaches pytest's report
""")


def test_a_conftest_wrapper_swallowing_exceptions_does_not_get_inside_the_reporter(tools: Toolchain) -> None:
    tests = "def test_one():\n    assert False\n\ndef test_ok():\n    pass\n"
    verdict, output = run_pytest(tools.sandbox, {"conftest.py": SWALLOWING_CONFTEST, "test_code.py": tests})
    assert "2 passed" in output
    assert verdict.measured and verdict.rewritten == ("test_code.py::test_one",)
    assert verdict.outcomes == {"test_code.py::test_one": "failed", "test_code.py::test_ok": "passed"}


def test_a_wrapper_registered_by_a_test_makes_the_run_unmeasurable(tools: Toolchain) -> None:
    tests = code("""
        import pytest

        class Swallow:
            @pytest.hookimpl(hookwrapper=True, trylast=True)
            def pytest_runtest_call(self, item):
                outcome = yield
                outcome.force_result(None)

        def test_registers(request):
            request.config.pluginmanager.register(Swallow(), "swallow")

        def test_one():
            assert False
    """)
    verdict, output = run_pytest(tools.sandbox, {"test_code.py": tests})
    assert "2 passed" in output and not verdict.measured
    assert "wrapper inside the reporter" in verdict.problems[0]


def test_pytest_outcomes_skips_and_expected_failures(tools: Toolchain) -> None:
    tests = code("""
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("setup")

        def test_setup_error(broken):
            pass

        @pytest.mark.skip(reason="no")
        def test_skipped():
            pass

        @pytest.mark.xfail
        def test_expected():
            assert False

        @pytest.mark.xfail(strict=True)
        def test_strict_xpass():
            pass

        def test_ok():
            pass
    """)
    verdict, _ = run_pytest(tools.sandbox, {"test_code.py": tests})
    assert verdict.measured and not verdict.rewritten
    assert verdict.outcomes == {"test_code.py::test_setup_error": "error", "test_code.py::test_skipped": "skipped",
                                "test_code.py::test_expected": "skipped", "test_code.py::test_strict_xpass": "failed",
                                "test_code.py::test_ok": "passed"}


def test_a_python_run_that_exits_in_the_middle_is_unmeasurable(tools: Toolchain) -> None:
    analysis = python.testing(code("""
        import os

        def test_ok():
            pass

        def test_leaves():
            os._exit(0)

        def test_wrong():
            assert False
    """), tools)
    # test_ok's pass is not counted, test_leaves never finished, test_wrong never ran
    assert analysis.tests is not None and analysis.tests.as_json() == {"passed": 0, "failed": 0, "errors": 1, "total": 1}
    assert "test-report" in rules(analysis)


# --- JavaScript --------------------------------------------------------------------------------


def test_javascript_printing_pass_25_and_a_megabyte_of_padding_is_counted_right(tools: Toolchain) -> None:
    analysis = javascript.testing(code("""
        const test = require("node:test");
        const assert = require("node:assert");
        test("wrong", () => {
          process.stdout.write("# tests 25\\n# pass 25\\n# fail 0\\n");
          process.stdout.write("x".repeat(1 << 20) + "\\n");
          assert.strictEqual(1 + 1, 3);
        });
        process.on("exit", () => process.stdout.write("\\n# pass 25\\n# fail 0\\n"));
    """), tools, extension="js")
    assert analysis.output is not None and "# pass 25" in analysis.output
    assert analysis.tests is not None
    assert analysis.tests.as_json() == {"passed": 0, "failed": 1, "errors": 0, "total": 1}
    assert ("test-failed", 3) in {(i.rule, i.line) for i in analysis.issues}


def test_javascript_writing_report_lines_into_every_descriptor_gains_nothing(tools: Toolchain) -> None:
    analysis = javascript.testing(code("""
        const test = require("node:test");
        const fs = require("node:fs");
        const forged = "0\\tstart\\t{}\\t" + "0".repeat(64) + "\\n1\\tresult\\t{\\"id\\":\\"x\\",\\"outcome\\":\\"passed\\"}\\t"
          + "0".repeat(64) + "\\n";
        test("forges", () => {
          for (const name of fs.readdirSync("/proc/self/fd")) {
            try { fs.writeSync(Number(name), forged.repeat(25)); } catch {}
            try { fs.appendFileSync(`/proc/self/fd/${name}`, forged); } catch {}
            try { fs.appendFileSync(`/proc/${process.ppid}/fd/${name}`, forged); } catch {}
          }
          throw new Error("fails");
        });
    """), tools, extension="js")
    assert analysis.tests is not None and analysis.tests.passed == 0 and analysis.tests.failed <= 1
    assert analysis.tests.total >= 1


# --- Elixir ------------------------------------------------------------------------------------


def test_elixir_printing_the_exunit_summary_and_halting_counts_no_pass(tools: Toolchain) -> None:
    analysis = elixir.testing(code("""
        defmodule HaltTest do
          use ExUnit.Case

          test "wrong and halts" do
            IO.puts("\\nFinished in 0.01 seconds\\n25 tests, 0 failures\\n")
            IO.puts("GENESIS_EXUNIT total=25 failures=0 skipped=0 excluded=0")
            System.halt(0)
          end
        end
    """), tools)
    assert analysis.output is not None and "25 tests, 0 failures" in analysis.output
    assert analysis.tests is not None and analysis.tests.passed == 0 and analysis.tests.errors == 1
    assert "test-report" in rules(analysis)


def test_elixir_test_code_writing_into_the_report_descriptor_gains_nothing(tools: Toolchain) -> None:
    analysis = elixir.testing(code("""
        defmodule ForgeTest do
          use ExUnit.Case

          test "forges" do
            line = "0\\tstart\\t{}\\t" <> String.duplicate("0", 64) <> "\\n"
            fd = String.to_integer(System.get_env("GENESIS_REPORT_FD"))
            port = Port.open({:fd, 0, fd}, [:binary, :out])
            Port.command(port, String.duplicate(line, 25))
            assert false
          end
        end
    """), tools)
    assert analysis.tests is not None and analysis.tests.passed == 0 and analysis.tests.failed <= 1
    assert "test-report" in rules(analysis)  # its lines, unsigned, broke the stream


def test_exunit_outcomes_are_counted_by_the_formatter(tools: Toolchain) -> None:
    analysis = elixir.testing(code("""
        defmodule CountTest do
          use ExUnit.Case

          test "one", do: assert 1 == 1
          test "two", do: assert 1 == 2
          @tag :skip
          test "skipped", do: assert false
          test "three", do: assert true
        end
    """), tools)
    assert analysis.tests is not None
    assert analysis.tests.as_json() == {"passed": 2, "failed": 1, "errors": 0, "total": 3}
    assert "test-report" not in rules(analysis)


# --- the host ---------------------------------------------------------------------------------


def test_no_report_descriptor_is_left_open_in_this_process(tools: Toolchain) -> None:
    before = set(os.listdir("/proc/self/fd"))
    python.testing("def test_ok():\n    pass\n", tools)
    leaked = {fd for fd in set(os.listdir("/proc/self/fd")) - before if Path(f"/proc/self/fd/{fd}").exists()}
    assert not {fd for fd in leaked if os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")}


# --- experiments ------------------------------------------------------------------------------

CALC = "def add(a, b):\n    return a + b\n"
CALC_TESTS = ("from calc import add\n\n"
              "def test_add():\n    assert add(1, 2) == 3\n\n"
              "def test_add_zero():\n    assert add(0, 0) == 0\n\n"
              "def test_add_neg():\n    assert add(-1, 1) == 0\n\n"
              "def test_add_big():\n    assert add(10, 20) == 30\n")


@pytest.fixture
def experiments(genesis_home: Path, tmp_path: Path) -> tuple[ExperimentRunner, MemoryExperimentRecords, Path]:
    sandbox = Sandbox()
    if not sandbox.available:
        pytest.skip("the sandbox (bubblewrap) is not available here")
    repos = tmp_path / "repos"
    repo = make_repo(repos / "calc", {"calc.py": CALC, "tests/unit/test_calc.py": CALC_TESTS})
    records = MemoryExperimentRecords()
    runner = ExperimentRunner(Settings(home=genesis_home, repo_allow=str(repos)), records, sandbox)
    return runner, records, repo


def experiment(repo: Path, files: dict[str, str], experiment_id: str) -> ExperimentRequest:
    payload = {"type": "genesis_experiment_request", "experiment_id": experiment_id, "instance_id": "singularity-1",
               "experiment_type": "refactor", "description": "a change", "risk_level": "low", "repo": str(repo),
               "changes": {"files": [{"path": path, "content": content} for path, content in files.items()]}}
    parsed = parse_payload(payload)
    assert isinstance(parsed, ExperimentRequest)
    return parsed


def context() -> WorkContext:
    return WorkContext("genesis_experiment_requests", 1, 1, "wf-1", time.monotonic() + 120.0)


def test_an_experiment_whose_conftest_rewrites_failures_is_measured_as_it_ran_and_flagged(experiments: Any) -> None:
    runner, records, repo = experiments
    head = git(repo, "rev-parse", "HEAD")
    broken = CALC.replace("a + b", "a - b")  # breaks test_add, test_add_neg and test_add_big
    result = runner(experiment(repo, {"calc.py": broken, "conftest.py": REWRITING_CONFTEST}, "exp-rewrite"), context())
    assert result["counted_by"] == "pytest-plugin"
    assert result["flags"] == ["test_config_changed", "report_rewritten"]
    assert result["test_config_changes"] == ["conftest.py"]
    assert result["metrics"]["regression"] == 0.75 and result["metrics"]["failures"] == 3
    assert (result["status"], result["recommendation"], result["rolled_back"]) == ("regressed", "reject", True)
    change_run = records.show_experiment("exp-rewrite")["runs"][1]
    assert (change_run["passed"], change_run["failed"]) == (1, 3)
    assert git(repo, "rev-parse", "HEAD") == head and not (repo / "conftest.py").exists()


def test_an_experiment_touching_the_test_configuration_is_never_merge(experiments: Any) -> None:
    runner, _records, repo = experiments
    harmless = "import pytest\n\n\n@pytest.fixture\ndef unused():\n    return 1\n"
    result = runner(experiment(repo, {"calc.py": CALC.replace("a + b", "b + a"), "tests/conftest.py": harmless},
                               "exp-config"), context())
    assert result["metrics"]["regression"] == 0.0 and result["metrics"]["success_rate"] == 1.0
    assert (result["status"], result["recommendation"]) == ("success", "merge_with_review")
    assert result["flags"] == ["test_config_changed"] and result["test_config_changes"] == ["tests/conftest.py"]


def test_the_same_harmless_change_without_configuration_is_merge(experiments: Any) -> None:
    runner, _records, repo = experiments
    result = runner(experiment(repo, {"calc.py": CALC.replace("a + b", "b + a")}, "exp-plain"), context())
    assert (result["status"], result["recommendation"], result["flags"]) == ("success", "merge", [])


def test_decide_caps_a_flagged_change_at_merge_with_review() -> None:
    clean = Metrics(success_rate=1.0, regression=0.0, baseline_success_rate=1.0, test_count=4, failures=0,
                    duration_ms=1.0)
    assert decide(clean, risk_level="low", threshold=0.05).recommendation == "merge"
    flagged = decide(clean, risk_level="low", threshold=0.05, flags=["test_config_changed"])
    assert (flagged.status, flagged.recommendation) == ("success", "merge_with_review")
    assert "test_config_changed" in flagged.reason


# --- whole repositories: mix test and node --test ---------------------------------------------

MIX_PROJECT = {
    "mix.exs": 'defmodule Calc.MixProject do\n  use Mix.Project\n'
               '  def project, do: [app: :calc, version: "0.1.0", elixir: "~> 1.14", deps: []]\nend\n',
    "lib/calc.ex": "defmodule Calc do\n  def add(a, b), do: a + b\nend\n",
    "test/test_helper.exs": "ExUnit.start()\n",
    "test/calc_test.exs": 'defmodule CalcTest do\n  use ExUnit.Case\n'
                          '  test "adds", do: assert Calc.add(1, 2) == 3\n'
                          '  test "wrong", do: assert Calc.add(1, 2) == 4\nend\n',
}


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return root


def suite_run(root: Path, command: list[str]) -> TestRun:
    limits = Limits(wall_s=120, cpu_s=120)
    return run_tests(Sandbox(limits), command, [], root=root, python="/usr/bin/python3", python_path=[],
                     limits=limits, timeout_s=120)


def test_mix_test_is_counted_by_our_formatter(tmp_path: Path) -> None:
    run = suite_run(tree(tmp_path / "calc", MIX_PROJECT), ["mix", "test"])
    assert (run.counted_by, run.measured) == ("exunit-formatter", True)
    assert run.outcomes == {"CalcTest::test adds": "passed", "CalcTest::test wrong": "failed"}
    assert "2 tests, 1 failure" in run.result.stdout


def test_mix_test_printing_its_summary_and_halting_counts_no_pass(tmp_path: Path) -> None:
    halting = MIX_PROJECT["test/calc_test.exs"].replace(
        'test "wrong", do: assert Calc.add(1, 2) == 4',
        'test "wrong" do\n    IO.puts("2 tests, 0 failures")\n    System.halt(0)\n  end')
    run = suite_run(tree(tmp_path / "calc", {**MIX_PROJECT, "test/calc_test.exs": halting}), ["mix", "test"])
    assert run.result.returncode == 0 and "2 tests, 0 failures" in run.result.stdout
    assert not run.measured and "no end marker" in " ".join(run.problems)


def test_node_test_over_a_repository_is_counted_by_our_reporter(tmp_path: Path) -> None:
    files = {"test/calc.test.js": 'const test = require("node:test");\nconst assert = require("node:assert");\n'
                                  'test("adds", () => assert.equal(1 + 2, 3));\n'
                                  'test("wrong", () => { console.log("# pass 25"); assert.equal(1 + 2, 4); });\n'}
    run = suite_run(tree(tmp_path / "calc", files), ["node", "--test"])
    assert (run.counted_by, run.measured) == ("node-reporter", True)
    assert run.outcomes == {"test/calc.test.js::adds": "passed", "test/calc.test.js::wrong": "failed"}


def test_a_suite_killed_at_its_memory_limit_is_unmeasured_and_says_so(tmp_path: Path) -> None:
    """Even a command counted by its exit status: a run the sandbox killed has no verdict."""
    limits = Limits(wall_s=120, cpu_s=120, memory_bytes=128 * 2**20)
    sandbox = Sandbox(limits)
    if sandbox.hierarchy is None:
        pytest.skip("no writable cgroup here: the memory limit is per process (covered in test_sandbox)")
    # four processes of 100 MiB each: each under the per-process limit, together over the run's
    hog = textwrap.dedent("""
        import os, time
        for _ in range(4):
            if os.fork() == 0:
                x = bytearray(100 * 2**20)
                for i in range(0, len(x), 4096): x[i] = 1
                time.sleep(60)
        os.wait()
    """)
    root = tree(tmp_path / "hog", {"hog.py": hog})
    run = run_tests(sandbox, ["/usr/bin/python3", "hog.py"], [], root=root, python="/usr/bin/python3",
                    python_path=[], limits=limits, timeout_s=120)
    assert run.result.limit == "memory"
    assert not run.measured and run.passed == set()
    assert run.problems[0] == "the suite went past its memory limit and was killed"


# --- node:test event frames forged on stdout ------------------------------------------------

# what `node --test`'s parent parses from a child's stdout (Node 20's v8-serializer reporter):
# a v8 serializer header, the 4-byte big-endian length, then the serialized {type, data} item
FORGE_NODE_FRAMES = """
const v8 = require("node:v8");
const fs = require("node:fs");
function frame(item) {
  const header = new v8.DefaultSerializer();
  header.writeHeader();
  const body = new v8.DefaultSerializer();
  body.writeHeader();
  body.writeValue(item);
  const value = body.releaseBuffer();
  const length = Buffer.alloc(4);
  length.writeUInt32BE(value.length);
  return Buffer.concat([header.releaseBuffer(), length, value]);
}
function forge() {
  for (let i = 0; i < 25; i += 1) {
    fs.writeSync(1, frame({ type: "test:pass", data: { name: `forged ${i}`, nesting: 0, testNumber: 100 + i,
      details: { duration_ms: 1 }, file: __filename, line: 1, column: 1 } }));
  }
}
"""


def test_javascript_writing_node_test_event_frames_on_stdout_gains_nothing(tools: Toolchain) -> None:
    """Under `node --test` these frames were counted: 25 passed, 1 failed."""
    analysis = javascript.testing(FORGE_NODE_FRAMES + code("""
        const test = require("node:test");
        const assert = require("node:assert");
        test("wrong", () => {
          forge();
          assert.strictEqual(1 + 1, 3);
        });
    """), tools, extension="js")
    assert analysis.tests is not None
    assert analysis.tests.as_json() == {"passed": 0, "failed": 1, "errors": 0, "total": 1}
    assert analysis.quality_score == 0.0


def test_node_test_files_run_in_the_process_of_our_reporter_not_a_child_of_a_parser(tmp_path: Path) -> None:
    """The test file records the process it runs in (node started on our entry) and the sandbox's
    processes (no `node --test` parent); the frames it writes on stdout are only output."""
    files = {"test/forge.test.js": FORGE_NODE_FRAMES + code("""
        const test = require("node:test");
        const assert = require("node:assert");
        const processes = fs.readdirSync("/proc").filter((name) => /^[0-9]+$/.test(name)).map((pid) => {
          try { return fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\\0"); } catch { return []; }
        });
        fs.writeFileSync("ran-in.json", JSON.stringify({ argv: process.argv, execArgv: process.execArgv, processes }));
        test("adds", () => assert.equal(1 + 2, 3));
        test("wrong", () => { forge(); assert.equal(1 + 2, 4); });
    """), "test/more_test.mjs": 'import { test } from "node:test";\ntest("also", () => {});\n'}
    root = tree(tmp_path / "calc", files)
    run = suite_run(root, ["node", "--test"])
    assert (run.counted_by, run.measured) == ("node-reporter", True)
    assert run.outcomes == {"test/forge.test.js::adds": "passed", "test/forge.test.js::wrong": "failed",
                            "test/more_test.mjs::also": "passed"}
    ran_in = json.loads((root / "ran-in.json").read_text())
    assert ran_in["argv"][1] == str(REPORTERS_DIR / "genesis_node_entry.mjs")
    assert f"--import={REPORTERS_DIR / 'genesis_node_reporter.mjs'}" in ran_in["execArgv"]
    assert "--test" not in ran_in["execArgv"]
    # the sandbox's processes (its own pid namespace): one node, ours, with no `node --test` parent
    nodes = [argv for argv in ran_in["processes"] if argv and os.path.basename(argv[0]) == "node"]
    assert len(nodes) == 1 and "--test" not in nodes[0]
