"""Code analysers: what an analysis returns, how it is scored, and the registry of
(language, analysis_type) -> analyser, built from the tools present on this machine.

Static analyses (quality, linting, security) parse the code and never run it; `testing` runs
it, and only inside the sandbox. Every tool runs as a subprocess bounded by the run's deadline
and by limits of its own (`Toolchain.run`: TOOL_LIMITS, in a cgroup of its own where there is
one; `Toolchain.sandboxed`: the test limits): running out of the request's time raises
WorkflowTimeout, going past a limit ResourceLimit (`resource_limit`, naming the limit), and an
analyser that crashes on the code AnalyserFailed (`analyser_failed`): both permanent, since the
same code would do the same again.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from genesis_pgflow.errors import AnalyserFailed, GenesisError, ResourceLimit, WorkflowTimeout
from genesis_pgflow.sandbox import Limits, Sandbox, SandboxResult
from genesis_pgflow.suite import Verdict

ANALYSIS_TYPES = ("quality", "linting", "security", "testing")
SEVERITY_WEIGHTS = {"error": 10.0, "warning": 5.0, "info": 1.0}
COMPLEXITY_THRESHOLD = 10  # a function above this cyclomatic complexity is reported
OUTPUT_CHARS = 16_000  # how much of a test run's output a result carries

# What one analyser run (ruff, bandit, radon, lizard, Biome, the TypeScript parser, the Elixir
# analysis) may use on code of up to 1 MiB: far above what real code needs (the largest real
# inputs take a few CPU-seconds and a few hundred MiB), far below what pathological code costs.
# processes counts threads (the BEAM and V8 start dozens).
TOOL_LIMITS = Limits(cpu_s=20, memory_bytes=1 * 2**30, processes=512, file_bytes=64 * 2**20, open_files=1024,
                     wall_s=60.0, output_bytes=8 * 2**20, cpu_cores=1.0)


@dataclass(frozen=True)
class Issue:
    rule: str
    severity: str  # error | warning | info
    line: int | None
    message: str

    def as_json(self) -> dict[str, object]:
        return {"rule": self.rule, "severity": self.severity, "line": self.line, "message": self.message}


@dataclass(frozen=True)
class Function:
    """One function's cyclomatic complexity, as a quality analyser measured it."""

    name: str
    line: int
    complexity: int


@dataclass(frozen=True)
class TestCounts:
    passed: int = 0
    failed: int = 0
    errors: int = 0

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.errors

    def as_json(self) -> dict[str, int]:
        return {"passed": self.passed, "failed": self.failed, "errors": self.errors, "total": self.total}


@dataclass(frozen=True)
class Analysis:
    issues: list[Issue]
    quality_score: float
    tests: TestCounts | None = None
    output: str | None = None


# --- scoring (documented in README.md, "Code execution requests") -----------------------------------------------------


def clamp_score(value: float) -> float:
    return round(min(100.0, max(0.0, value)), 1)


def issues_score(issues: list[Issue]) -> float:
    """linting and security: 100 minus 10 per error, 5 per warning, 1 per info."""
    return clamp_score(100.0 - sum(SEVERITY_WEIGHTS.get(i.severity, 5.0) for i in issues))


def complexity_score(functions: list[Function]) -> float:
    """quality: 100 - 5 x (mean complexity - 1) - 3 x (sum of each function's excess over 10)."""
    if not functions:
        return 100.0
    mean = sum(f.complexity for f in functions) / len(functions)
    excess = sum(max(0, f.complexity - COMPLEXITY_THRESHOLD) for f in functions)
    return clamp_score(100.0 - 5.0 * (mean - 1.0) - 3.0 * excess)


def complexity_issues(functions: list[Function]) -> list[Issue]:
    return [
        Issue("complexity", "error" if f.complexity > 2 * COMPLEXITY_THRESHOLD else "warning", f.line,
              f"{f.name} has cyclomatic complexity {f.complexity} (more than {COMPLEXITY_THRESHOLD})")
        for f in functions if f.complexity > COMPLEXITY_THRESHOLD
    ]


def quality_analysis(functions: list[Function], issues: list[Issue] = ()) -> Analysis:  # type: ignore[assignment]
    found = [*issues, *complexity_issues(functions)]
    syntax_errors = [i for i in found if i.rule == "syntax-error"]
    return Analysis(found, 0.0 if syntax_errors else complexity_score(functions))


def testing_analysis(counts: TestCounts, issues: list[Issue], output: str) -> Analysis:
    """testing: the share of tests that passed, as a percentage (0 when none ran)."""
    score = clamp_score(100.0 * counts.passed / counts.total) if counts.total else 0.0
    if len(output) > OUTPUT_CHARS:
        output = output[: OUTPUT_CHARS // 4] + "\n[... output truncated ...]\n" + output[-3 * OUTPUT_CHARS // 4:]
    return Analysis(issues, score, counts, output)


def verdict_analysis(verdict: Verdict, issues: list[Issue], result: SandboxResult) -> Analysis:
    """testing, counted from a report channel (suite.py). A run whose report is not whole (cut
    short, forged, a halt before the end, the runner patched) counts no pass at all: only the
    failures and errors it verified (a test that never finished is one), and at least one error."""
    errors = verdict.count("error")
    counts = TestCounts(passed=verdict.count("passed") if verdict.measured else 0, failed=verdict.count("failed"),
                        errors=errors if verdict.measured else max(1, errors))
    if result.timed_out:
        issues = [*issues, Issue("test-timeout", "error", None, "the tests ran past the sandbox's wall time")]
    elif not verdict.measured:
        issues = [*issues, Issue("test-report", "error", None,
                                 f"the tests' report is not whole ({verdict.counted_by}): {verdict.problems[0]}")]
    if verdict.rewritten:
        issues = [*issues, Issue("test-report-rewritten", "error", None,
                                 f"a hook rewrote the report of {len(verdict.rewritten)} test(s); "
                                 f"counted as they ran: {', '.join(verdict.rewritten[:5])}")]
    return testing_analysis(counts, issues, result.stdout + result.stderr)


def line_of(code: str, offset: int) -> int:
    """The 1-based line of a UTF-8 byte offset into code."""
    return code.encode("utf-8")[:offset].count(b"\n") + 1


# --- running tools ------------------------------------------------------------------------------


@dataclass
class Toolchain:
    """Where analysers find their tools, and the deadline and sandbox they run under.

    python: the interpreter with ruff, bandit, radon and lizard (the consumer's own).
    sandbox_python: the interpreter tests run with inside the sandbox (must live under /usr).
    node_modules: where scripts/system-deps.sh installed Biome and TypeScript.
    test_limits: what a test run in the sandbox may use; tool_limits: what one analyser run may use.
    """

    sandbox: Sandbox
    python: str = sys.executable
    sandbox_python: str = "/usr/bin/python3"
    node_modules: Path = Path(__file__).resolve().parents[2] / ".tools" / "node_modules"
    node: str = "/usr/bin/node"
    elixir: str = "/usr/bin/elixir"
    test_limits: Limits = field(default_factory=Limits)
    tool_limits: Limits = TOOL_LIMITS
    deadline: float = field(default_factory=lambda: time.monotonic() + 30.0)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def bounded(self, deadline: float, cancelled: threading.Event) -> Toolchain:
        """The same toolchain, bounded by a run's deadline and cancel event."""
        return replace(self, deadline=deadline, cancelled=cancelled)

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def run(self, argv: list[str], *, stdin: str | None = None, files: dict[str, str] | None = None,
            env: dict[str, str] | None = None) -> SandboxResult:
        """Run a trusted tool (never the code itself) in a temporary directory holding files."""
        with tempfile.TemporaryDirectory(prefix="genesis-analysis-") as scratch:
            for name, content in (files or {}).items():
                (Path(scratch) / name).write_text(content, encoding="utf-8")
            result = self.sandbox.run_tool(argv, limits=self.tool_limits, timeout_s=self.remaining(),
                                           cancelled=self.cancelled, cwd=Path(scratch), env=env,
                                           stdin=stdin.encode("utf-8") if stdin is not None else None)
        return self._finished(argv, result, self.tool_limits)

    def sandboxed(self, argv: list[str], *, files: dict[str, str], env: dict[str, str] | None = None,
                  ro_paths: Sequence[Path] = (), pass_fds: Sequence[int] = ()) -> SandboxResult:
        """Run untrusted code in the sandbox; SandboxUnavailable if it cannot be set up."""
        result = self.sandbox.run(argv, files=files, env=env, limits=self.test_limits, ro_paths=ro_paths,
                                  timeout_s=self.remaining(), cancelled=self.cancelled, pass_fds=pass_fds)
        if result.timed_out and self.remaining() > 0:
            return result  # the sandbox's own wall time: the tests' failure, reported as such
        return self._finished(argv, result, self.test_limits)

    def _finished(self, argv: list[str], result: SandboxResult, limits: Limits) -> SandboxResult:
        if result.limit is not None:
            raise _past_limit(Path(argv[0]).name, result, limits)
        if result.timed_out or result.cancelled:
            raise WorkflowTimeout(f"{Path(argv[0]).name} did not finish before the deadline",
                                  details={"tool": Path(argv[0]).name})
        return result


Analyser = Callable[[str, Toolchain], Analysis]


def _past_limit(tool: str, result: SandboxResult, limits: Limits) -> ResourceLimit:
    amount = {"memory": f"{limits.memory_bytes // 2**20} MiB", "cpu": f"{limits.cpu_s} CPU-seconds",
              "wall": f"{limits.wall_s:g} s of wall time"}.get(result.limit or "", "?")
    details: dict[str, object] = {"tool": tool, "limit": result.limit}
    if result.memory_peak_bytes is not None:
        details["memory_peak_bytes"] = result.memory_peak_bytes
    return ResourceLimit(f"{tool} went past its {result.limit} limit ({amount}) on this code and was stopped",
                         details=details)


def permanent_on_crash(analyser: Analyser, language: str, analysis_type: str) -> Analyser:
    """analyser, whose crash on a code (an exit status it does not expect, output it cannot
    read) is AnalyserFailed: permanent, since the same code would crash it again. OSError (the
    machine's trouble: no fork, no file) stays retryable."""

    @functools.wraps(analyser)
    def analyse(code: str, tools: Toolchain) -> Analysis:
        try:
            return analyser(code, tools)
        except (GenesisError, OSError):
            raise
        except Exception as exc:
            raise AnalyserFailed(f"the {language} {analysis_type} analyser failed on this code: {str(exc)[:500]}",
                                 details={"analyser": f"{language}/{analysis_type}",
                                          "exception": type(exc).__name__}) from exc

    return analyse

# language names as producers spell them -> the registry's name
ALIASES = {
    "py": "python", "python3": "python", "js": "javascript", "node": "javascript", "nodejs": "javascript",
    "mjs": "javascript", "cjs": "javascript", "ts": "typescript", "ex": "elixir", "exs": "elixir",
    "c++": "cpp", "cxx": "cpp", "cs": "csharp", "c#": "csharp", "golang": "go", "rb": "ruby",
    "rs": "rust", "kt": "kotlin", "objc": "objectivec", "objective-c": "objectivec", "jsx": "tsx",
    "vuejs": "vue", "ttcn3": "ttcn", "pl/sql": "plsql", "c": "cpp",
}


def normalise(language: str) -> str:
    name = language.strip().lower()
    return ALIASES.get(name, name)


def registry(toolchain: Toolchain) -> dict[tuple[str, str], Analyser]:
    """Every (language, analysis_type) with its tools present on this machine."""
    from genesis_pgflow.analysers import elixir, generic, javascript, python

    found: dict[tuple[str, str], Analyser] = {}
    for module in (generic, python, elixir, javascript):  # later modules override lizard
        found.update(module.analysers(toolchain))
    return {key: permanent_on_crash(analyser, *key) for key, analyser in found.items()}


def supported(analysers: dict[tuple[str, str], Analyser]) -> dict[str, list[str]]:
    languages: dict[str, list[str]] = {}
    for language, analysis_type in analysers:
        languages.setdefault(language, []).append(analysis_type)
    return {lang: [t for t in ANALYSIS_TYPES if t in types] for lang, types in sorted(languages.items())}
