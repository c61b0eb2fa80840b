"""JobExecutor end to end with real tools: the contract's result, failures, deadlines, fail-closed."""

from __future__ import annotations

import threading
import time

import pytest

from genesis_pgflow.errors import (
    SandboxUnavailable,
    UnsupportedLanguage,
    WorkflowTimeout,
)
from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.handlers.jobs import JobExecutor
from genesis_pgflow.messages import CodeExecutionRequest
from genesis_pgflow.sandbox import Limits, Sandbox

RESULT_KEYS = {"id", "language", "analysis_type", "issues", "metrics"}


@pytest.fixture(scope="module")
def executor() -> JobExecutor:
    return JobExecutor(Sandbox(Limits(wall_s=20)))


@pytest.fixture(scope="module")
def closed() -> JobExecutor:
    """The same machine with the sandbox forced to be unavailable."""
    return JobExecutor(Sandbox(bwrap="/nonexistent/bwrap"))


def request(code: str, language: str, analysis_type: str, **extra) -> CodeExecutionRequest:
    return CodeExecutionRequest(type="code_execution_request", id="job-1", code=code, language=language,
                                analysis_type=analysis_type, **extra)


def context(seconds: float = 30.0) -> WorkContext:
    return WorkContext(queue="code_execution_requests", msg_id=1, attempt=1, workflow_id="wf",
                       deadline=time.monotonic() + seconds)


def rules(result: dict) -> set[tuple[str, int | None]]:
    return {(issue["rule"], issue["line"]) for issue in result["issues"]}


def test_the_seed_example_gets_a_real_answer(executor):
    result = executor(request("def foo, do: 42", "elixir", "quality"), context())
    assert set(result) == RESULT_KEYS
    assert result["id"] == "job-1" and result["language"] == "elixir" and result["analysis_type"] == "quality"
    assert result["issues"] == []
    assert result["metrics"]["quality_score"] == 100.0 and result["metrics"]["issues_count"] == 0
    assert result["metrics"]["execution_ms"] > 0


def test_python_security_result_follows_the_contract(executor):
    result = executor(request("import os\n\n\nvalue = eval(os.environ['X'])\n", "python", "security"), context())
    assert set(result) == RESULT_KEYS
    issue = next(i for i in result["issues"] if i["rule"] == "B307")
    assert issue == {"rule": "B307", "severity": "warning", "line": 4, "message": issue["message"]}
    assert "ast.literal_eval" in issue["message"]
    assert result["metrics"]["issues_count"] == len(result["issues"])
    assert 0 <= result["metrics"]["quality_score"] < 100


def test_python_linting_and_quality(executor):
    linted = executor(request("import os\n", "py", "linting"), context())
    assert linted["language"] == "py" and rules(linted) == {("F401", 1)}
    assert linted["metrics"]["quality_score"] == 95.0
    nested = "def f(a, b):\n    if a:\n        if b:\n            return 1\n    return 0\n"
    scores = [executor(request(code, "python", "quality"), context())["metrics"]["quality_score"]
              for code in (nested, "def f():\n    return 1\n")]
    assert scores[0] < scores[1] == 100.0


@pytest.mark.sandbox
def test_python_testing_adds_tests_and_output(executor):
    code = "def test_ok():\n    assert True\n\ndef test_bad():\n    assert 1 == 2\n"
    result = executor(request(code, "python", "testing"), context())
    assert set(result) == RESULT_KEYS | {"tests", "output"}
    assert result["tests"] == {"passed": 1, "failed": 1, "errors": 0, "total": 2}
    assert rules(result) == {("test-failed", 4)}
    assert result["metrics"]["quality_score"] == 50.0
    assert "1 failed, 1 passed" in result["output"]


@pytest.mark.sandbox
@pytest.mark.parametrize(("language", "code", "expected"), [
    ("elixir", 'defmodule T do\n  use ExUnit.Case\n  test "ok" do\n    assert 1 + 1 == 2\n  end\nend\n', 1),
    ("javascript", 'const test = require("node:test");\ntest("ok", () => {});\ntest("also", () => {});\n', 2),
])
def test_testing_in_other_languages(executor, language, code, expected):
    result = executor(request(code, language, "testing"), context())
    assert result["tests"] == {"passed": expected, "failed": 0, "errors": 0, "total": expected}
    assert result["metrics"]["quality_score"] == 100.0


@pytest.mark.parametrize(("language", "analysis_type", "code", "expected"), [
    ("elixir", "security", "def f(x), do: String.to_atom(x)\n", {("EXS003", 1)}),
    ("elixir", "linting", "def f(x), do: IO.inspect(x)\n", {("EXL001", 1)}),
    ("javascript", "security", "// eval(x)\nconst y = eval(process.argv[2]);\nmodule.exports = y;\n", {("JSS001", 2)}),
    ("typescript", "linting", "export function f(a: number) {\n  debugger;\n  return a;\n}\n",
     {("suspicious/noDebugger", 2)}),
    ("go", "quality", "package main\n\nfunc main() {}\n", set()),
])
def test_static_analyses_in_other_languages(executor, language, analysis_type, code, expected):
    result = executor(request(code, language, analysis_type), context())
    assert expected <= rules(result)
    assert result["metrics"]["issues_count"] == len(result["issues"])


def test_an_unknown_language_is_unsupported_and_lists_what_is(executor):
    with pytest.raises(UnsupportedLanguage) as raised:
        executor(request("IDENTIFICATION DIVISION.", "cobol", "quality"), context())
    error = raised.value
    assert error.code == "unsupported_language"
    assert "'cobol' is not supported" in error.message
    assert "python (quality, linting, security, testing)" in error.message
    assert "elixir (quality, linting, security, testing)" in error.message and "go" in error.message
    assert "scripts/system-deps.sh" in error.message
    assert error.details["id"] == "job-1" and error.details["supported"]["go"] == ["quality"]


def test_an_analysis_a_language_lacks_is_unsupported(executor):
    with pytest.raises(UnsupportedLanguage, match="linting is not available for go on this machine"):
        executor(request("package main\n", "go", "linting"), context())


def test_fails_closed_without_a_sandbox_but_static_analyses_still_work(closed):
    with pytest.raises(SandboxUnavailable) as raised:
        closed(request("def test_x():\n    assert True\n", "python", "testing"), context())
    assert raised.value.code == "sandbox_unavailable" and raised.value.details["id"] == "job-1"
    assert "/nonexistent/bwrap" in raised.value.message
    assert ("B307", 1) in rules(closed(request("eval('1')\n", "python", "security"), context()))
    assert closed(request("def foo, do: 42", "elixir", "quality"), context())["metrics"]["quality_score"] == 100.0


@pytest.mark.sandbox
def test_a_test_run_past_the_deadline_is_a_workflow_timeout(executor):
    started = time.monotonic()
    with pytest.raises(WorkflowTimeout) as raised:
        executor(request("def test_forever():\n    while True:\n        pass\n", "python", "testing"), context(2.0))
    assert time.monotonic() - started < 20   # cut at the 2 s deadline, not the sandbox's 30 s wall time
    assert raised.value.code == "timeout" and raised.value.details["id"] == "job-1"


@pytest.mark.sandbox
def test_a_test_run_past_the_sandbox_wall_time_is_a_failed_result():
    executor = JobExecutor(Sandbox(), test_limits=Limits(wall_s=2))
    result = executor(request("def test_forever():\n    while True:\n        pass\n", "python", "testing"), context())
    assert result["tests"]["errors"] == 1 and ("test-timeout", None) in rules(result)
    assert result["metrics"]["quality_score"] == 0.0


@pytest.mark.sandbox
def test_a_cancelled_run_stops_at_once(executor):
    ctx = context(30.0)
    timer = threading.Timer(0.5, ctx.cancelled.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(WorkflowTimeout):
        executor(request("import time\n\ndef test_slow():\n    time.sleep(30)\n", "python", "testing"), ctx)
    timer.join()
    assert time.monotonic() - started < 20   # the test itself sleeps 30 s


def test_a_run_whose_deadline_has_passed_does_not_start(executor):
    with pytest.raises(WorkflowTimeout):
        executor(request("x = 1\n", "python", "linting"), context(0.0))


@pytest.mark.sandbox
def test_test_output_is_truncated(executor):
    code = "def test_noisy():\n    print(('x' * 100 + '\\n') * 500)\n    assert False\n"
    result = executor(request(code, "python", "testing"), context())
    assert len(result["output"]) <= 16_100 and "[... output truncated ...]" in result["output"]
    assert "1 failed" in result["output"][-100:]  # the summary at the end is kept
