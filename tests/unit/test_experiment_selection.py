"""Risk-aware test selection for every runner (issue 12, item 1): which files and tags a risk level
picks for pytest, ExUnit and node, and whole experiments on real mix and node projects in real git
repositories, through the real ExperimentRunner and sandbox, whose result says what ran."""

from __future__ import annotations

import difflib
import time
from pathlib import Path
from typing import Any

import pytest

from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.handlers.experiments import DEFAULT_SELECTION, ExperimentRunner, TestSelection, select_tests
from genesis_pgflow.handlers.experiments.selection import exunit_test_files, node_test_files
from genesis_pgflow.messages import ExperimentRequest, parse_payload
from genesis_pgflow.sandbox import Sandbox
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.experiments import MemoryExperimentRecords
from genesis_pgflow.suite import default_test_command
from genesis_pgflow.workspace import repo_state

from .gitrepos import make_repo


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return root


# --- which runner, which files (no sandbox) -------------------------------------------------


def test_the_default_command_is_the_repositorys_runner(tmp_path: Path) -> None:
    assert default_test_command(tree(tmp_path / "py", {"calc.py": ""})) == ["pytest"]
    assert default_test_command(tree(tmp_path / "ex", {"mix.exs": "", "package.json": "{}"})) == ["mix", "test"]
    assert default_test_command(tree(tmp_path / "js", {"package.json": "{}"})) == ["node", "--test"]
    # a Python project with a package.json (for its assets) stays a pytest one
    assert default_test_command(tree(tmp_path / "both", {"package.json": "{}", "pyproject.toml": ""})) == ["pytest"]
    # a symlinked mix.exs makes nothing of the repository
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "mix.exs").symlink_to(tmp_path / "ex" / "mix.exs")
    assert default_test_command(tmp_path / "link") == ["pytest"]


def test_exunit_test_files_of_changed_modules(tmp_path: Path) -> None:
    root = tree(tmp_path, {"test/calc_test.exs": "", "test/calc/parser_test.exs": "", "test/other_test.exs": ""})
    assert exunit_test_files(root, ["lib/calc/parser.ex"]) == ["test/calc/parser_test.exs"]
    assert exunit_test_files(root, ["lib/calc.ex", "lib/calc/parser.ex", "README.md"]) == [
        "test/calc/parser_test.exs", "test/calc_test.exs"]
    assert exunit_test_files(root, ["test/other_test.exs"]) == ["test/other_test.exs"]  # a changed test: itself
    assert exunit_test_files(root, ["lib/nope.ex", "test/new_test.exs", "config/config.exs"]) == []
    assert exunit_test_files(root, ["lib/../test/calc.ex"]) == []


def test_node_test_files_of_changed_sources(tmp_path: Path) -> None:
    root = tree(tmp_path, {"src/calc.js": "", "src/parse.mjs": "", "test/calc.test.js": "", "test/parse.js": "",
                           "src/calc-test.mjs": "", "test/other.test.js": "", "node_modules/x/test/calc.test.js": "",
                           "lib/test-calc.cjs": ""})
    assert node_test_files(root, ["src/calc.js"]) == ["lib/test-calc.cjs", "src/calc-test.mjs", "test/calc.test.js"]
    assert node_test_files(root, ["src/parse.mjs"]) == ["test/parse.js"]
    assert node_test_files(root, ["test/other.test.js"]) == ["test/other.test.js"]
    assert node_test_files(root, ["README.md", "src/none.ts"]) == []


def test_each_risk_level_maps_to_each_runner(tmp_path: Path) -> None:
    mix = tree(tmp_path / "mix", {"mix.exs": "", "test/calc_test.exs": ""})
    low, medium, high = (DEFAULT_SELECTION[level] for level in ("low", "medium", "high"))
    assert select_tests(low, mix, None, ["lib/calc.ex"]).as_json() == {
        "command": ["mix", "test"], "by": "changed paths and tags",
        "args": ["test/calc_test.exs", "--exclude", "integration", "--exclude", "slow", "--exclude", "e2e"]}
    assert select_tests(low, mix, None, ["lib/new.ex"]).as_json() == {
        "command": ["mix", "test"], "by": "tags",
        "args": ["--exclude", "integration", "--exclude", "slow", "--exclude", "e2e"]}
    assert select_tests(medium, mix, None, ["lib/calc.ex"]).args == ("--exclude", "slow", "--exclude", "e2e")
    assert select_tests(high, mix, None, ["lib/calc.ex"]).as_json() == {
        "command": ["mix", "test"], "by": "whole suite", "args": []}
    assert select_tests(TestSelection(changed_tests=True), mix, None, ["lib/calc.ex"]).by == "changed paths"

    node = tree(tmp_path / "node", {"package.json": "{}", "test/calc.test.js": ""})
    assert select_tests(low, node, None, ["src/calc.js"]).as_json() == {
        "command": ["node", "--test"], "by": "changed paths", "args": ["test/calc.test.js"]}
    assert select_tests(medium, node, None, ["src/calc.js"]).by == "whole suite"
    assert select_tests(low, node, None, ["src/other.js"]).by == "whole suite"

    python = tree(tmp_path / "py", {"tests/unit/test_x.py": ""})
    assert select_tests(low, python, None, ["x.py"]).as_json() == {
        "command": ["pytest"], "by": "paths", "args": ["tests/unit"]}
    assert select_tests(low, tmp_path / "mix" / "test", None, []).by == "marker"
    # an explicit command runs as given, whatever the risk level
    assert select_tests(low, mix, ["mix", "test", "--trace"], ["lib/calc.ex"]).as_json() == {
        "command": ["mix", "test", "--trace"], "by": "test_command", "args": []}


# --- whole experiments on real mix and node projects ----------------------------------------

MIX = {
    "mix.exs": 'defmodule Calc.MixProject do\n  use Mix.Project\n'
               '  def project, do: [app: :calc, version: "0.1.0", elixir: "~> 1.14", deps: []]\nend\n',
    "lib/calc.ex": "defmodule Calc do\n  def add(a, b), do: a + b\n  def mul(a, b), do: a * b\nend\n",
    "lib/calc/parser.ex": "defmodule Calc.Parser do\n  def parse(text), do: String.to_integer(String.trim(text))\nend\n",
    "test/test_helper.exs": "ExUnit.start()\n",
    "test/calc_test.exs": 'defmodule CalcTest do\n  use ExUnit.Case\n'
                          '  test "adds", do: assert Calc.add(1, 2) == 3\n'
                          '  test "multiplies", do: assert Calc.mul(2, 3) == 6\n'
                          '  @tag :slow\n  test "adds many", do: assert Enum.reduce(1..1000, 0, &Calc.add/2) == 500500\n'
                          'end\n',
    "test/calc/parser_test.exs": 'defmodule Calc.ParserTest do\n  use ExUnit.Case\n'
                                 '  test "parses", do: assert Calc.Parser.parse(" 42 ") == 42\nend\n',
}
NODE = {
    "package.json": '{"name": "calc", "version": "1.0.0"}\n',
    "src/calc.js": "exports.add = (a, b) => a + b;\n",
    "src/shout.js": "exports.shout = (s) => s.toUpperCase();\n",
    "test/calc.test.js": 'const test = require("node:test");\nconst assert = require("node:assert");\n'
                         'const { add } = require("../src/calc.js");\n'
                         'test("adds", () => assert.equal(add(1, 2), 3));\n'
                         'test("adds zero", () => assert.equal(add(0, 0), 0));\n',
    "test/shout.test.js": 'const test = require("node:test");\nconst assert = require("node:assert");\n'
                          'const { shout } = require("../src/shout.js");\n'
                          'test("shouts", () => assert.equal(shout("hi"), "HI"));\n',
}


@pytest.fixture
def experiments(genesis_home: Path, tmp_path: Path, sandbox: Sandbox) -> tuple[ExperimentRunner,
                                                                                MemoryExperimentRecords, Path]:
    records = MemoryExperimentRecords()
    runner = ExperimentRunner(Settings(home=genesis_home, repo_allow=str(tmp_path / "repos")), records, sandbox)
    return runner, records, tmp_path / "repos"


def run(experiments: Any, files: dict[str, str], risk_level: str, changes: dict[str, Any],
        **fields: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One experiment on a fresh repository of `files`; its result and recorded runs. The original
    repository is checked untouched."""
    runner, records, repos = experiments
    repo = make_repo(repos / "source", files)
    before = repo_state(repo)
    request = parse_payload({"type": "genesis_experiment_request", "experiment_id": "exp-sel",
                             "instance_id": "singularity-1", "experiment_type": "refactor", "description": "x",
                             "risk_level": risk_level, "repo": str(repo), "changes": changes, **fields})
    assert isinstance(request, ExperimentRequest)
    result = runner(request, WorkContext("genesis_experiment_requests", 1, 1, "wf-1", time.monotonic() + 300))
    assert repo_state(repo) == before
    shown = records.show_experiment("exp-sel")
    assert shown is not None
    return result, shown["runs"]


@pytest.mark.sandbox
def test_low_risk_mix_runs_the_changed_modules_tests_without_slow_ones(experiments: Any) -> None:
    broken = MIX["lib/calc.ex"].replace("a * b", "a + b")
    result, runs = run(experiments, MIX, "low", {"files": [{"path": "lib/calc.ex", "content": broken}]})
    tags = ["--exclude", "integration", "--exclude", "slow", "--exclude", "e2e"]
    assert result["selection"] == {"command": ["mix", "test"], "by": "changed paths and tags",
                                   "args": ["test/calc_test.exs", *tags]}
    assert result["counted_by"] == "exunit-formatter"
    # calc_test.exs only (parser_test.exs not run), its slow test excluded: 2 tests, 1 broken
    assert result["classes"] == {"pass->pass": 1, "pass->fail": 1, "fail->pass": 0, "fail->fail": 0}
    assert result["regressions"] == ["CalcTest::test multiplies"] and result["metrics"]["test_count"] == 2
    assert (result["status"], result["recommendation"]) == ("regressed", "reject")
    assert all(r["command"][-7:] == ["test/calc_test.exs", *tags] for r in runs)  # reruns too
    assert [r["phase"] for r in runs] == ["baseline", "change", "change", "change", "baseline", "baseline"]


@pytest.mark.sandbox
def test_medium_risk_mix_excludes_slow_tests_by_tag(experiments: Any) -> None:
    changed = MIX["lib/calc/parser.ex"].replace("String.trim(text)", "text |> String.trim()")
    result, runs = run(experiments, MIX, "medium", {"files": [{"path": "lib/calc/parser.ex", "content": changed}]})
    assert result["selection"] == {"command": ["mix", "test"], "by": "tags",
                                   "args": ["--exclude", "slow", "--exclude", "e2e"]}
    assert result["classes"]["pass->pass"] == 3 and result["metrics"]["test_count"] == 3  # the slow one excluded
    assert (result["status"], result["recommendation"]) == ("success", "merge")


@pytest.mark.sandbox
def test_a_mix_selection_that_runs_nothing_falls_back_to_the_whole_suite(experiments: Any) -> None:
    tagged = MIX["test/calc/parser_test.exs"].replace("use ExUnit.Case\n", "use ExUnit.Case\n  @moduletag :integration\n")
    changed = MIX["lib/calc/parser.ex"].replace("String.trim(text)", "text |> String.trim()")
    result, runs = run(experiments, {**MIX, "test/calc/parser_test.exs": tagged}, "low",
                       {"files": [{"path": "lib/calc/parser.ex", "content": changed}]})
    assert result["selection"] == {
        "command": ["mix", "test"], "by": "whole suite", "args": [],
        "selected_nothing": {"by": "changed paths and tags", "args": [
            "test/calc/parser_test.exs", "--exclude", "integration", "--exclude", "slow", "--exclude", "e2e"]}}
    assert result["metrics"]["test_count"] == 4 and result["recommendation"] == "merge"
    assert [r["phase"] for r in runs] == ["baseline", "change"]  # the empty run is not the baseline
    assert runs[0]["command"][-1] == "GenesisPgflow.ExUnitFormatter"  # nothing appended


@pytest.mark.sandbox
def test_an_explicit_mix_test_runs_as_given(experiments: Any) -> None:
    changed = MIX["lib/calc.ex"].replace("a + b", "b + a")
    result, runs = run(experiments, MIX, "low", {"files": [{"path": "lib/calc.ex", "content": changed}]},
                       test_command=["mix", "test"])
    assert result["selection"] == {"command": ["mix", "test"], "by": "test_command", "args": []}
    assert result["metrics"]["test_count"] == 4  # the slow test and the parser's too


@pytest.mark.sandbox
def test_low_risk_node_runs_the_test_files_of_the_changed_sources(experiments: Any) -> None:
    changed = NODE["src/calc.js"].replace("a + b", "b + a")
    patch = "".join(difflib.unified_diff(NODE["src/calc.js"].splitlines(True), changed.splitlines(True),
                                         "a/src/calc.js", "b/src/calc.js"))
    result, runs = run(experiments, NODE, "low", {"patch": patch})
    assert result["selection"] == {"command": ["node", "--test"], "by": "changed paths", "args": ["test/calc.test.js"]}
    assert result["counted_by"] == "node-reporter"
    assert result["classes"]["pass->pass"] == 2 and result["metrics"]["test_count"] == 2  # not shout.test.js
    assert (result["status"], result["recommendation"]) == ("success", "merge")
    assert all(r["command"][-1] == "test/calc.test.js" for r in runs)


@pytest.mark.sandbox
def test_high_risk_node_runs_the_whole_suite(experiments: Any) -> None:
    changed = NODE["src/shout.js"].replace("toUpperCase", "toLowerCase")
    result, _runs = run(experiments, NODE, "high", {"files": [{"path": "src/shout.js", "content": changed}]})
    assert result["selection"] == {"command": ["node", "--test"], "by": "whole suite", "args": []}
    assert result["regressions"] == ["test/shout.test.js::shouts"] and result["metrics"]["test_count"] == 3
