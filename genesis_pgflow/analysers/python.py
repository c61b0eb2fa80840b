"""Python: radon (quality), ruff (linting), bandit (security), pytest in the sandbox (testing)."""

from __future__ import annotations

import json
import re

from genesis_pgflow.analysers import (
    Analyser,
    Analysis,
    Function,
    Issue,
    Toolchain,
    clamp_score,
    complexity_score,
    issues_score,
    quality_analysis,
    verdict_analysis,
)
from genesis_pgflow.suite import REPORTERS_DIR, ReportChannel, pytest_argv

# run in a subprocess: radon parses the code with ast and never runs it
_RADON = """
import json, sys
from radon.complexity import ComplexityVisitor
from radon.metrics import mi_visit
code = sys.stdin.read()
try:
    visitor = ComplexityVisitor.from_code(code)
except SyntaxError as exc:
    print(json.dumps({"syntax_error": [exc.lineno, exc.msg]}))
    raise SystemExit(0)
def flatten(functions):
    for f in functions:
        yield f
        yield from flatten(f.closures)
blocks = list(flatten(visitor.functions))
for cls in visitor.classes:
    blocks += flatten(cls.methods)
print(json.dumps({"functions": [[b.fullname, b.lineno, b.complexity] for b in blocks],
                  "mi": mi_visit(code, multi=True)}))
"""
RUFF_RULES = "E4,E7,E9,F,W,B,SIM,I"
_RUFF_ERRORS = re.compile(r"^(E9|F8[0-9][0-9]|F63|F7|invalid-syntax)")
_BANDIT_SEVERITY = {"HIGH": "error", "MEDIUM": "warning", "LOW": "info"}


def quality(code: str, tools: Toolchain) -> Analysis:
    """The mean of the complexity score and radon's maintainability index (0..100)."""
    result = tools.run([tools.python, "-I", "-c", _RADON], stdin=code)
    if result.returncode != 0:
        raise RuntimeError(f"radon failed: {result.stderr.strip()[-500:]}")
    report = json.loads(result.stdout)
    if "syntax_error" in report:
        line, message = report["syntax_error"]
        return quality_analysis([], [Issue("syntax-error", "error", line, message)])
    functions = [Function(name, line, ccn) for name, line, ccn in report["functions"]]
    analysis = quality_analysis(functions)
    score = clamp_score((complexity_score(functions) + float(report["mi"])) / 2)
    return Analysis(analysis.issues, score)


def linting(code: str, tools: Toolchain) -> Analysis:
    result = tools.run([tools.python, "-m", "ruff", "check", "--isolated", "--no-cache", "--output-format=json",
                        f"--select={RUFF_RULES}", "--target-version=py311", "--stdin-filename=code.py", "-"],
                       stdin=code)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"ruff failed: {result.stderr.strip()[-500:]}")
    issues = [
        Issue(d["code"] or "invalid-syntax", "error" if _RUFF_ERRORS.match(d["code"] or "invalid-syntax") else "warning",
              d["location"]["row"], d["message"])
        for d in json.loads(result.stdout)
    ]
    return Analysis(issues, issues_score(issues))


def security(code: str, tools: Toolchain) -> Analysis:
    result = tools.run([tools.python, "-m", "bandit", "-f", "json", "-q", "-"], stdin=code)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"bandit failed: {result.stderr.strip()[-500:]}")
    report = json.loads(result.stdout)
    issues = [
        Issue(r["test_id"], _BANDIT_SEVERITY.get(r["issue_severity"], "warning"), r["line_number"],
              f"{r['issue_text']} ({r['test_name']}, confidence {r['issue_confidence'].lower()})")
        for r in report["results"]
    ]
    issues += [Issue("syntax-error", "error", None, e["reason"]) for e in report["errors"]]
    return Analysis(issues, issues_score(issues))


def testing(code: str, tools: Toolchain) -> Analysis:
    """pytest on the code as test_code.py, in the sandbox; counts from our plugin's report channel
    (suite.py), never from the output."""
    with ReportChannel() as channel:
        argv = pytest_argv(tools.sandbox_python, ["-q", "-rfE", "--tb=short", "--color=no", "-p", "no:cacheprovider",
                                                  "test_code.py"], channel)
        result = tools.sandboxed(argv, files={"test_code.py": code}, ro_paths=[REPORTERS_DIR],
                                 pass_fds=channel.pass_fds)
    verdict = channel.verdict("pytest-plugin")
    issues = [Issue("test-failed" if outcome == "failed" else "test-error", "error",
                    _def_line(code, test_id.split("::")[-1]),
                    f"{test_id.split('::')[-1]}: {verdict.messages.get(test_id) or outcome}")
              for test_id, outcome in verdict.outcomes.items() if outcome in ("failed", "error")]
    return verdict_analysis(verdict, issues, result)


def _def_line(code: str, test_name: str) -> int | None:
    function = re.escape(test_name.split("::")[-1].split("[")[0])
    match = re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{function}\b", code, re.MULTILINE)
    return code.count("\n", 0, match.start()) + 1 if match else None


def analysers(tools: Toolchain) -> dict[tuple[str, str], Analyser]:
    return {("python", "quality"): quality, ("python", "linting"): linting,
            ("python", "security"): security, ("python", "testing"): testing}
