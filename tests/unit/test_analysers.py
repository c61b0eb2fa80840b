"""Each analyser with the real tool on real code: specific findings, not just 'some issues'."""

from __future__ import annotations

import os
import resource
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from genesis_pgflow.analysers import (
    TOOL_LIMITS,
    Function,
    Issue,
    Toolchain,
    complexity_score,
    elixir,
    generic,
    issues_score,
    javascript,
    python,
    registry,
)
from genesis_pgflow.cgroups import V1Hierarchy
from genesis_pgflow.errors import AnalyserFailed, PermanentError, ResourceLimit
from genesis_pgflow.sandbox import Limits, Sandbox


@pytest.fixture(scope="module")
def shared_sandbox() -> Sandbox:
    return Sandbox(Limits(wall_s=30))


@pytest.fixture
def tools(shared_sandbox: Sandbox) -> Toolchain:
    """A toolchain whose 30 s deadline starts with the test (a module-wide one would run out
    under a slow machine's later tests)."""
    return Toolchain(shared_sandbox)


def code(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def found(analysis) -> set[tuple[str, int | None]]:
    return {(issue.rule, issue.line) for issue in analysis.issues}


NESTED_PY = code("""
    def classify(a, b, c):
        if a:
            if b:
                if c:
                    return 1
                elif a > b:
                    return 2
            for x in range(a):
                if x and b or c:
                    return x
        return 0
""")
TRIVIAL_PY = "def answer():\n    return 42\n"


# --- scoring ---------------------------------------------------------------------------------


def test_complexity_score_formula():
    assert complexity_score([]) == 100.0
    assert complexity_score([Function("f", 1, 1)]) == 100.0
    assert complexity_score([Function("f", 1, 5), Function("g", 9, 1)]) == 90.0          # mean 3
    assert complexity_score([Function("f", 1, 14)]) == 100 - 5 * 13 - 3 * 4 == 23.0
    assert complexity_score([Function("f", 1, 40)]) == 0.0


def test_issues_score_formula():
    issues = [Issue("a", "error", 1, ""), Issue("b", "warning", 2, ""), Issue("c", "info", 3, "")]
    assert issues_score(issues) == 84.0
    assert issues_score(issues * 10) == 0.0


# --- Python ------------------------------------------------------------------------------------


def test_python_quality_scores_nested_ifs_below_a_trivial_function(tools):
    nested, trivial = python.quality(NESTED_PY, tools), python.quality(TRIVIAL_PY, tools)
    assert trivial.quality_score == 100.0 and trivial.issues == []
    assert nested.quality_score < trivial.quality_score
    assert nested.quality_score == python.quality(NESTED_PY, tools).quality_score  # deterministic


def test_python_quality_reports_a_very_complex_function(tools):
    branches = "".join(f"    if x == {n}:\n        return {n}\n" for n in range(12))
    analysis = python.quality(f"def big(x):\n{branches}    return -1\n", tools)
    assert [(i.rule, i.severity, i.line) for i in analysis.issues] == [("complexity", "warning", 1)]
    assert "big has cyclomatic complexity 13" in analysis.issues[0].message


def test_python_quality_of_code_that_does_not_parse(tools):
    analysis = python.quality("def broken(:\n    pass\n", tools)
    assert found(analysis) == {("syntax-error", 1)} and analysis.quality_score == 0.0


def test_ruff_finds_an_unused_import_and_an_undefined_name(tools):
    analysis = python.linting("import os\n\n\ndef f():\n    return undefined_name\n", tools)
    assert {("F401", 1), ("F821", 5)} <= found(analysis)
    severities = {i.rule: i.severity for i in analysis.issues}
    assert severities["F401"] == "warning" and severities["F821"] == "error"


def test_bandit_finds_eval_and_a_shell_call(tools):
    analysis = python.security(code("""
        import subprocess
        def run(text):
            value = eval(text)
            subprocess.call("echo " + text, shell=True)
            return value
    """), tools)
    assert {("B307", 3), ("B602", 4), ("B404", 1)} <= found(analysis)
    assert {i.rule: i.severity for i in analysis.issues}["B602"] == "error"
    assert analysis.quality_score < 100


@pytest.mark.sandbox
def test_pytest_counts_passes_and_failures_in_the_sandbox(tools):
    analysis = python.testing(code("""
        def add(a, b):
            return a + b

        def test_adds():
            assert add(1, 2) == 3

        def test_wrong():
            assert add(1, 2) == 4

        def test_raises():
            raise RuntimeError("boom")
    """), tools)
    assert analysis.tests.as_json() == {"passed": 1, "failed": 2, "errors": 0, "total": 3}
    assert found(analysis) == {("test-failed", 7), ("test-failed", 10)}
    assert analysis.quality_score == 33.3
    assert "1 passed" in analysis.output and "assert 3 == 4" in analysis.output


@pytest.mark.sandbox
def test_pytest_reports_code_that_does_not_import_as_an_error(tools):
    analysis = python.testing("import not_a_module\n\ndef test_x():\n    pass\n", tools)
    assert analysis.tests.errors == 1 and analysis.tests.passed == 0 and analysis.quality_score == 0.0


# --- Elixir ------------------------------------------------------------------------------------

ELIXIR_SECURITY = code("""
    defmodule Runner do
      def run(cmd, input) do
        Code.eval_string(input)
        System.cmd(cmd, [])
        System.cmd("ls", [input])
        :os.cmd(String.to_charlist(cmd))
        String.to_atom(input)
        :erlang.binary_to_term(input)
        :erlang.binary_to_term(input, [:safe])
        # Code.eval_string(input) in a comment is not code
        "System.cmd(cmd, []) in a string is not code either"
      end
    end
""")


def test_elixir_quality_of_the_seed_example(tools):
    analysis = elixir.quality("def foo, do: 42", tools)
    assert analysis.issues == [] and analysis.quality_score == 100.0


def test_elixir_quality_scores_nested_branches_lower(tools):
    nested = elixir.quality(code("""
        defmodule M do
          def f(a, b) do
            if a do
              case b do
                1 -> :one
                2 -> :two
                _ -> if a && b, do: :both, else: :other
              end
            end
          end
        end
    """), tools)
    assert nested.quality_score < elixir.quality("defmodule M do\n  def f, do: 1\nend\n", tools).quality_score


def test_elixir_quality_of_code_that_does_not_parse(tools):
    analysis = elixir.quality("defmodule M do\n  def f(, do: 1\nend\n", tools)
    assert [i.rule for i in analysis.issues] == ["syntax-error"] and analysis.quality_score == 0.0


def test_elixir_security_rules_on_the_syntax_tree(tools):
    analysis = elixir.security(ELIXIR_SECURITY, tools)
    assert found(analysis) == {("EXS001", 3), ("EXS002", 4), ("EXS002", 6), ("EXS003", 7), ("EXS004", 8)}


@pytest.mark.sandbox
def test_elixir_linting_formatter_ast_rules_and_compiler_warnings(tools):
    analysis = elixir.linting(code("""
        defmodule Bad_name do
          def fooBar(x) do
            unused = 1
            IO.inspect(x)
          end
        end
    """) + "defmodule   Ugly do\nend\n", tools)
    assert {("EXL003", 1), ("EXL002", 2), ("EXL001", 4), ("format", 7), ("compiler-warning", 3)} <= found(analysis)
    assert any('variable "unused" is unused' in i.message for i in analysis.issues)


def test_elixir_linting_without_a_sandbox_keeps_the_static_checks():
    tools = Toolchain(Sandbox(bwrap="/nonexistent/bwrap"))
    analysis = elixir.linting("defmodule M do\n  def f(x) do\n    y = 1\n    IO.inspect(x)\n  end\nend\n", tools)
    assert found(analysis) == {("EXL001", 4)}


@pytest.mark.sandbox
def test_exunit_counts_passes_and_failures_in_the_sandbox(tools):
    analysis = elixir.testing(code("""
        defmodule Math do
          def add(a, b), do: a + b
        end

        defmodule MathTest do
          use ExUnit.Case

          test "adds" do
            assert Math.add(1, 2) == 3
          end

          test "is wrong" do
            assert Math.add(1, 2) == 4
          end
        end
    """), tools)
    assert analysis.tests.as_json() == {"passed": 1, "failed": 1, "errors": 0, "total": 2}
    assert found(analysis) == {("test-failed", 12)}
    assert "2 tests, 1 failure" in analysis.output


@pytest.mark.sandbox
def test_exunit_reports_code_that_does_not_compile(tools):
    analysis = elixir.testing("defmodule M do\n  def f(, do: 1\nend\n", tools)
    assert analysis.tests.errors == 1 and analysis.issues[0].rule == "test-error"
    assert "SyntaxError" in analysis.issues[0].message


# --- JavaScript / TypeScript --------------------------------------------------------------------

JS_SECURITY = code("""
    // eval(input) in a comment is not a call
    const cp = require("child_process");
    const { execSync } = require("node:child_process");
    const text = "eval(input) in a string is not a call either";
    function run(input) {
      eval(input);
      const f = new Function("a", input);
      setTimeout("alert(" + input + ")", 10);
      cp.exec("ls " + input);
      cp.exec("ls");
      execSync(`rm ${input}`);
      /ab+c/.exec(input);
      document.body.innerHTML = input;
      require(input);
      require("crypto").createHash("md5");
      return [f, text];
    }
    module.exports = { run };
""")


def test_javascript_security_rules_on_the_syntax_tree(tools):
    analysis = javascript.security(JS_SECURITY, tools, extension="js")
    assert found(analysis) == {("JSS001", 6), ("JSS002", 7), ("JSS003", 8), ("JSS004", 9), ("JSS004", 11),
                               ("JSS006", 13), ("JSS007", 14), ("JSS008", 15)}


def test_typescript_security_parses_types(tools):
    analysis = javascript.security("const run = (input: string): unknown => eval(input as string);\n", tools,
                                   extension="ts")
    assert found(analysis) == {("JSS001", 1)}


def test_biome_lints_javascript(tools):
    analysis = javascript.linting(code("""
        var unused = 1;
        export function check(a) {
          if (a == 1) {
            debugger;
          }
          return a;
        }
    """), tools, extension="js")
    assert {("suspicious/noDoubleEquals", 3), ("suspicious/noDebugger", 4)} <= found(analysis)
    assert ("correctness/noUnusedVariables", 1) in found(analysis)


def test_lizard_quality_for_javascript_and_go(tools):
    nested = "function f(a, b) {\n  if (a) { if (b) { return 1; } else if (a > b) { return 2; } }\n  return 0;\n}\n"
    assert generic.lizard_quality(nested, tools, extension="js").quality_score == 85.0   # complexity 4
    go = "package main\n\nfunc f(a int) int {\n\tif a > 1 {\n\t\treturn 1\n\t}\n\treturn 0\n}\n"
    assert generic.lizard_quality(go, tools, extension="go").quality_score == 95.0       # complexity 2


@pytest.mark.sandbox
def test_node_test_runner_in_the_sandbox(tools):
    analysis = javascript.testing(code("""
        const test = require("node:test");
        const assert = require("node:assert");
        const add = (a, b) => a + b;
        test("adds", () => assert.strictEqual(add(1, 2), 3));
        test("is wrong", () => {
          assert.strictEqual(add(1, 2), 4);
        });
    """), tools, extension="js")
    assert analysis.tests.as_json() == {"passed": 1, "failed": 1, "errors": 0, "total": 2}
    assert found(analysis) == {("test-failed", 5)}


@pytest.mark.sandbox
def test_typescript_tests_are_transpiled_then_run_as_an_es_module(tools):
    analysis = javascript.testing(code("""
        import { test } from "node:test";
        import assert from "node:assert";
        const add = (a: number, b: number): number => a + b;
        test("adds", () => assert.equal(add(1, 2), 3));
    """), tools, extension="ts")
    assert analysis.tests.as_json() == {"passed": 1, "failed": 0, "errors": 0, "total": 1}
    assert analysis.quality_score == 100.0


def test_the_registry_covers_the_table(tools):
    analysers = registry(tools)
    for language in ("python", "elixir", "javascript", "typescript"):
        for analysis_type in ("quality", "linting", "security", "testing"):
            assert (language, analysis_type) in analysers
    assert ("go", "quality") in analysers and ("go", "linting") not in analysers


# --- analysers bounded like the sandbox (issue 7) --------------------------------------------------------------------

MiB = 2**20
# 20,000 small functions (~0.9 MiB): radon needs ~200 MiB and ~4 CPU-seconds for them
MANY_FUNCTIONS_PY = "".join(f"def f{i}(a):\n    if a:\n        return 1\n    return 2\n" for i in range(20_000))


def bounded(tools: Toolchain, **limits) -> Toolchain:
    """tools with limits of its own and a fresh deadline (the module's toolchain is made once)."""
    return replace(tools, tool_limits=replace(TOOL_LIMITS, **limits), deadline=time.monotonic() + 60)


def own_tool_cgroups(box: Sandbox) -> list[str]:
    """This process's analyser cgroups still on the host (other processes' runs are theirs)."""
    hierarchy = box.hierarchy
    parents = hierarchy.parents.values() if isinstance(hierarchy, V1Hierarchy) else [hierarchy.parent]
    prefix = f"tool-{os.getpid()}-"
    return [entry.name for parent in parents for entry in os.scandir(parent) if entry.name.startswith(prefix)]


@pytest.mark.sandbox
def test_an_analyser_past_its_memory_fails_resource_limit_and_the_consumer_is_untouched(tools):
    if tools.sandbox.hierarchy is None:
        pytest.skip("without a cgroup an analyser's memory is an rlimit: it fails as analyser_failed")
    consumer_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with pytest.raises(ResourceLimit) as raised:
        registry(tools)[("python", "quality")](MANY_FUNCTIONS_PY, bounded(tools, memory_bytes=96 * MiB))
    assert raised.value.code == "resource_limit" and isinstance(raised.value, PermanentError)
    assert raised.value.details["limit"] == "memory" and "memory limit (96 MiB)" in raised.value.message
    assert raised.value.details["memory_peak_bytes"] <= 96 * MiB  # the kernel's high-water mark of its cgroup
    # the analysis ran in a process of its own: the consumer's own peak did not take it on
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - consumer_peak < 32 * MiB
    assert own_tool_cgroups(tools.sandbox) == []


@pytest.mark.sandbox
@pytest.mark.parametrize("use_cgroups", [True, False], ids=["cgroup", "rlimits"])
def test_an_analyser_past_its_cpu_time_fails_resource_limit(use_cgroups):
    tools = Toolchain(Sandbox(Limits(wall_s=30), use_cgroups=use_cgroups))
    with pytest.raises(ResourceLimit) as raised:
        python.quality(MANY_FUNCTIONS_PY, bounded(tools, cpu_s=1))
    assert raised.value.details["limit"] == "cpu" and raised.value.details["tool"] == Path(tools.python).name
    assert "cpu limit (1 CPU-seconds)" in raised.value.message


def test_an_analyser_that_crashes_on_the_code_is_a_permanent_failure(tools):
    deep = "x = " + "1+" * 200_000 + "1\n"  # radon: RecursionError during ast construction
    with pytest.raises(AnalyserFailed) as raised:
        registry(tools)[("python", "quality")](deep, bounded(tools))
    assert raised.value.code == "analyser_failed" and isinstance(raised.value, PermanentError)
    assert raised.value.details == {"analyser": "python/quality", "exception": "RuntimeError"}
    assert "RecursionError" in raised.value.message


def test_the_typescript_parser_crashing_on_the_code_is_a_permanent_failure(tools):
    nested = "let a = " + "[" * 5000 + "]" * 5000 + ";\n"
    with pytest.raises(AnalyserFailed) as raised:
        registry(tools)[("typescript", "security")](nested, bounded(tools))
    assert raised.value.details["analyser"] == "typescript/security"
