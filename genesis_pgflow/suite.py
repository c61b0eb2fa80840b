"""Test suites: the command per runner, the report channel the tested code cannot write to, and
the per-test outcomes read from it (for `testing` requests and experiments alike).

Counts never come from a run's stdout or stderr, which the code under test controls. Each run
gets a ReportChannel: a pipe whose write end is handed into the sandbox as a descriptor, and a
fresh random key handed in once on a second pipe that the runner's own reporter reads and closes
before any code under test is loaded. The reporter signs every line (HMAC-SHA256, sequence
numbered); `read_channel` accepts the stream only if every line is signed and in sequence, every
test that began has exactly one outcome and the stream ends with the reporter's end marker.
Anything else (a forged or garbled line, a stream cut short by a halt, a duplicate) makes the run
unmeasurable: its verified outcomes are kept, but it is never counted as passed.

How tests are counted (`counted_by`):

- pytest-plugin: reporters/genesis_pytest_plugin.py starts pytest itself (python -I, so the
  repository cannot shadow it), and takes each test's outcome from the exception each phase
  raised, not from the report a conftest hook may rewrite (a rewritten report is marked);
- node-reporter: reporters/genesis_node_reporter.mjs, in the one node process where our entry
  (reporters/genesis_node_entry.mjs) imports the test files: not `node --test`, whose parent takes
  test events from what each child writes on stdout;
- exunit-formatter: reporters/genesis_exunit_formatter.exs, an ExUnit formatter of ours;
- junit: another command's JUnit XML at the path it was told (GENESIS_JUNIT_XML); that file is
  written by the command itself, so it is only as trustworthy as the command;
- exit-status: no report at all: the command is one test, passed when it exits 0.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal
from xml.etree import ElementTree

from genesis_pgflow.sandbox import SANDBOX_DIR, Limits, Sandbox, SandboxResult
from genesis_pgflow.store.experiments import RunRecord

Outcome = Literal["passed", "failed", "error", "skipped"]
CountedBy = Literal["pytest-plugin", "node-reporter", "exunit-formatter", "junit", "exit-status"]

REPORTERS_DIR = Path(__file__).resolve().parent / "reporters"
PYTEST_PLUGIN = REPORTERS_DIR / "genesis_pytest_plugin.py"
NODE_REPORTER = REPORTERS_DIR / "genesis_node_reporter.mjs"
NODE_ENTRY = REPORTERS_DIR / "genesis_node_entry.mjs"
EXUNIT_FORMATTER = REPORTERS_DIR / "genesis_exunit_formatter.exs"

CHANNEL_MAX_BYTES = 32 * 2**20
JUNIT_FILE = ".genesis-junit.xml"
JUNIT_MAX_BYTES = 32 * 2**20
# pytest's exit status when it collected no test at all
NO_TESTS_COLLECTED = 5

_SEVERITY: dict[str, int] = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
_OUTCOMES = frozenset(_SEVERITY)


# --- what a run's report said ---------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The per-test outcomes of one run, how they were counted, and whether they can be trusted:
    measured is False when the report was cut short, forged, garbled or inconsistent (problems
    says why). rewritten: tests whose report a hook made better than what the test raised."""

    outcomes: dict[str, Outcome]
    counted_by: CountedBy
    measured: bool
    problems: tuple[str, ...] = ()
    rewritten: tuple[str, ...] = ()
    messages: Mapping[str, str] = field(default_factory=dict)  # test id -> its failure, in short
    lines: Mapping[str, int] = field(default_factory=dict)  # test id -> its line, where the runner says
    durations: Mapping[str, float] = field(default_factory=dict)  # test id -> milliseconds, where known

    def count(self, outcome: Outcome) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)


def read_channel(data: bytes, key: bytes, *, counted_by: CountedBy, truncated: bool = False) -> Verdict:
    """The outcomes a reporter signed; see the module docstring for what makes a stream whole."""
    problems: list[str] = []
    outcomes: dict[str, Outcome] = {}
    messages: dict[str, str] = {}
    lines: dict[str, int] = {}
    durations: dict[str, float] = {}
    rewritten: list[str] = []
    begun: str | None = None
    started = ended = False
    ran = 0
    if truncated:
        problems.append(f"the report passed {CHANNEL_MAX_BYTES} bytes")
    rows = data.split(b"\n")
    if rows[-1]:
        problems.append("the report ends in the middle of a line")
    for number, raw in enumerate(rows[:-1]):
        parsed = _signed_line(raw, key, number)
        if isinstance(parsed, str):
            problems.append(parsed)
            break  # nothing after a bad line is trusted: sequence numbers are off from here
        kind, payload = parsed
        if ended:
            problems.append("lines after the end marker")
            break
        if not started and kind != "start":
            problems.append("the report does not open with the reporter's start line")
            break
        if kind == "start":
            if started:
                problems.append("a second start line")
                break
            started = True
        elif kind == "begin":
            test_id = str(payload.get("id"))
            if begun is not None:
                problems.append(f"test {begun!r} began and never finished")
                outcomes.setdefault(begun, "error")
            if test_id in outcomes:
                problems.append(f"test {test_id!r} reported twice")
            begun = test_id
        elif kind in ("outcome", "result", "collect"):
            test_id, said = str(payload.get("id")), payload.get("outcome")
            if not isinstance(said, str) or said not in _OUTCOMES:
                problems.append(f"unknown outcome {said!r}")
                break
            outcome: Outcome = said  # type: ignore[assignment]
            if kind == "outcome" and begun != test_id:
                problems.append(f"an outcome for {test_id!r}, which had not begun")
            if test_id in outcomes:
                problems.append(f"test {test_id!r} reported twice")
                outcome = _worst(outcome, outcomes[test_id])
            outcomes[test_id] = outcome
            if payload.get("message"):
                messages[test_id] = str(payload["message"])[:300]
            if isinstance(payload.get("line"), int):
                lines[test_id] = payload["line"]  # type: ignore[assignment]
            took = payload.get("duration_ms")
            if isinstance(took, int | float) and not isinstance(took, bool) and 0 <= took < 1e10:
                durations[test_id] = float(took)
            if payload.get("rewritten"):
                rewritten.append(test_id)
            if kind == "outcome":
                begun = None
            if kind != "collect":
                ran += 1
        elif kind == "end":
            ended = True
            tampered = payload.get("tampered")
            if tampered:
                names = tampered if isinstance(tampered, list) else [tampered]
                problems.append(f"the runner was patched during the run: {', '.join(str(n) for n in names)}")
            if payload.get("tests") != ran:
                problems.append(f"the end marker counts {payload.get('tests')!r} tests, the report {ran}")
        else:
            problems.append(f"unknown line kind {kind!r}")
            break
    if begun is not None:
        outcomes.setdefault(begun, "error")
        problems.append(f"test {begun!r} began and never finished")
    if not ended and not problems:
        problems.append("the report has no end marker (the run stopped before the runner finished)"
                        if started else "no report (the runner never started)")
    elif not ended:
        problems.append("the report has no end marker")
    return Verdict(outcomes, counted_by, not problems, tuple(dict.fromkeys(problems)), tuple(rewritten),
                   messages, lines, durations)


def _signed_line(raw: bytes, key: bytes, number: int) -> tuple[str, dict[str, object]] | str:
    """(kind, payload) of a well-formed, correctly signed line numbered `number`, else why not."""
    fields = raw.split(b"\t")
    if len(fields) != 4:
        return f"line {number}: not a reporter line"
    seq, kind, body, mac = fields
    expected = hmac.new(key, b"\t".join((seq, kind, body)), hashlib.sha256).hexdigest().encode("ascii")
    if not hmac.compare_digest(expected, mac):
        return f"line {number}: bad signature (written by something other than the reporter)"
    if seq != str(number).encode("ascii"):
        return f"line {number}: out of sequence"
    try:
        payload = json.loads(body)
    except ValueError:
        return f"line {number}: unreadable payload"
    if not isinstance(payload, dict):
        return f"line {number}: unreadable payload"
    return kind.decode("ascii", errors="replace"), payload


def _worst(a: str, b: str) -> Outcome:
    return a if _SEVERITY[a] >= _SEVERITY[b] else b  # type: ignore[return-value]


# --- the channel ------------------------------------------------------------------------------


class ReportChannel:
    """A report pipe and a one-time key for one run.

        with ReportChannel() as channel:
            sandbox.run(argv, pass_fds=channel.pass_fds, env=channel.env, ...)
        verdict = channel.verdict("pytest-plugin")

    The pipe is drained in a thread while the run goes on (a reporter never blocks on a full
    pipe); at most CHANNEL_MAX_BYTES are kept, past that the run is unmeasurable. Leaving the
    block closes the runner's write end and waits for the end of the stream (the sandbox has
    killed every process that held it by then)."""

    def __init__(self, max_bytes: int = CHANNEL_MAX_BYTES):
        self.key = secrets.token_bytes(32)
        self.max_bytes = max_bytes
        self._report_read, self.report_fd = os.pipe()
        self.key_fd, key_write = os.pipe()
        try:
            os.write(key_write, self.key.hex().encode("ascii") + b"\n")
        finally:
            os.close(key_write)
        self._chunks: list[bytes] = []
        self._size = 0
        self.truncated = False
        self._thread = threading.Thread(target=self._drain, name="report-channel", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def pass_fds(self) -> tuple[int, int]:
        return (self.report_fd, self.key_fd)

    @property
    def env(self) -> dict[str, str]:
        return {"GENESIS_REPORT_FD": str(self.report_fd), "GENESIS_KEY_FD": str(self.key_fd)}

    def _drain(self) -> None:
        with os.fdopen(self._report_read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                room = self.max_bytes - self._size
                if room > 0:
                    self._chunks.append(chunk[:room])
                    self._size += min(room, len(chunk))
                if len(chunk) > room:
                    self.truncated = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self.report_fd)
        os.close(self.key_fd)
        self._thread.join(timeout=10.0)

    def __enter__(self) -> ReportChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def data(self) -> bytes:
        self.close()
        return b"".join(self._chunks)

    def verdict(self, counted_by: CountedBy) -> Verdict:
        if self._thread.is_alive():
            return Verdict({}, counted_by, False, ("the report pipe was still held open after the run",))
        return read_channel(self.data, self.key, counted_by=counted_by, truncated=self.truncated)


# --- commands ---------------------------------------------------------------------------------


def pytest_argv(python: str, args: Sequence[str], channel: ReportChannel,
                python_path: Sequence[Path] = ()) -> list[str]:
    """pytest started by our plugin (see reporters/genesis_pytest_plugin.py); the plugin's folder and
    python_path must be visible read-only in the sandbox (REPORTERS_DIR, `ro_paths`)."""
    extra = os.pathsep.join(str(p) for p in python_path)
    return [python, "-I", "-B", str(PYTEST_PLUGIN), str(channel.report_fd), str(channel.key_fd), extra, "--", *args]


def node_argv(node: str, args: Sequence[str]) -> list[str]:
    """node:test files run in one node process by our entry module (not `node --test`, whose parent
    counts what it parses from each child's stdout), with TAP on stdout for people and our reporter
    (on GENESIS_REPORT_FD) for counts. The reporter is imported first, so it holds the key before
    any code under test loads. `args`: node options (starting with -), then the paths to test."""
    options = [a for a in args if a.startswith("-") and a != "--"]
    paths = [a for a in args if not a.startswith("-")]
    return [node, f"--import={NODE_REPORTER}", "--test-reporter=tap", "--test-reporter-destination=stdout",
            f"--test-reporter={NODE_REPORTER}", "--test-reporter-destination=stderr", *options,
            str(NODE_ENTRY), *paths]


def exunit_argv(elixir: str, script: str) -> list[str]:
    """elixir with our formatter required first (it reads the key before any test code loads)."""
    return [elixir, "-r", str(EXUNIT_FORMATTER), script]


def mix_test_argv(elixir: str, args: Sequence[str]) -> list[str]:
    """`mix test` in a VM that required our formatter first, with ExUnit's own output for people.
    Hex is offline and the project's dependencies come from its deps/ (no network in the sandbox)."""
    return [elixir, "-r", str(EXUNIT_FORMATTER), "-S", "mix", "test", "--formatter", "ExUnit.CLIFormatter",
            "--formatter", "GenesisPgflow.ExUnitFormatter", *args]


MIX_ENV = {"MIX_ENV": "test", "HEX_OFFLINE": "1", "MIX_HOME": f"{SANDBOX_DIR}/.mix", "HEX_HOME": f"{SANDBOX_DIR}/.hex"}


# --- one run of a repository's suite (experiments) --------------------------------------------


@dataclass
class TestRun:
    """One test-suite run: the outcome of each test, by id, and how they were counted."""

    __test__ = False

    outcomes: dict[str, Outcome]
    command: list[str]
    result: SandboxResult
    measured: bool  # the outcomes came from a whole report (or the command's exit status)
    counted_by: CountedBy = "exit-status"
    problems: tuple[str, ...] = ()
    rewritten: tuple[str, ...] = ()
    durations: Mapping[str, float] = field(default_factory=dict)  # test id -> milliseconds, where reported
    custom_metrics: Mapping[str, float] = field(default_factory=dict)  # from the suite's METRICS_FILE
    metrics_problem: str | None = None  # why the suite's METRICS_FILE was refused (the tests still count)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)

    @property
    def passed(self) -> set[str]:
        return {t for t, o in self.outcomes.items() if o == "passed"}

    @property
    def test_count(self) -> int:
        return sum(1 for o in self.outcomes.values() if o != "skipped")

    @property
    def success_rate(self) -> float:
        return len(self.passed) / self.test_count if self.test_count else 0.0

    @property
    def flags(self) -> list[str]:
        return ["report_rewritten"] if self.rewritten else []

    def record(self, phase: str, commit: str | None) -> RunRecord:
        output = (self.result.stdout + self.result.stderr)[-4000:]
        return RunRecord(phase=phase, commit=commit, command=self.command, returncode=self.result.returncode,
                         timed_out=self.result.timed_out, passed=self.count("passed"),
                         failed=self.count("failed"), errors=self.count("error"), skipped=self.count("skipped"),
                         duration_ms=round(self.result.duration_s * 1000.0, 3), output_tail=output)


@dataclass(frozen=True)
class SuiteCommand:
    """What to run for a request's test_command: argv (with our reporter where the runner is one
    we know), how it is counted, and the read-only paths it needs."""

    argv: list[str]
    counted_by: CountedBy
    ro_paths: tuple[Path, ...] = ()
    pytest: bool = False


Runner = Literal["pytest", "mix", "node", "other"]
# files that make a repository a Python one, whatever else it holds (a package.json for its assets)
_PYTHON_MARKERS = ("pyproject.toml", "setup.py", "setup.cfg", "pytest.ini", "tox.ini", "conftest.py")


def default_test_command(root: Path) -> list[str]:
    """The runner of a repository whose request names none: `mix test` where mix.exs is at its
    root, `node --test` where package.json is and no Python project file, else pytest."""
    def has(name: str) -> bool:
        return (root / name).is_file() and not (root / name).is_symlink()

    if has("mix.exs"):
        return ["mix", "test"]
    if has("package.json") and not any(has(name) for name in _PYTHON_MARKERS):
        return ["node", "--test"]
    return ["pytest"]


def runner_of(test_command: Sequence[str]) -> Runner:
    """Which runner a test_command starts: pytest (`pytest ...`, `py.test ...`, `python -m pytest
    ...`), mix (`mix test ...`), node (`node ... --test ...`), or another command."""
    argv = list(test_command) or ["pytest"]
    name = os.path.basename(argv[0])
    if name in ("pytest", "py.test") or (name in ("python", "python3") and argv[1:3] == ["-m", "pytest"]):
        return "pytest"
    if name == "mix" and argv[1:2] == ["test"]:
        return "mix"
    if name == "node" and "--test" in argv[1:]:
        return "node"
    return "other"


def suite_command(test_command: Sequence[str] | None, selection: Sequence[str], *, python: str,
                  python_path: Sequence[Path], channel: ReportChannel, node: str = "/usr/bin/node",
                  elixir: str = "/usr/bin/elixir") -> SuiteCommand:
    """pytest (`pytest ...`, `py.test ...`, `python -m pytest ...`): our plugin; `node --test ...`:
    our reporter; `mix test ...`: our formatter; each with the risk level's `selection` appended
    (selection.py); anything else as given (`python ...` with the sandbox's interpreter), counted
    from the JUnit file it may write, else its exit status."""
    argv = list(test_command or ["pytest"])
    runner = runner_of(argv)
    if runner == "pytest":
        pytest_args = argv[3:] if os.path.basename(argv[0]) in ("python", "python3") else argv[1:]
        args = ["-q", "-p", "no:cacheprovider", *pytest_args, *selection]
        return SuiteCommand(pytest_argv(python, args, channel, python_path), "pytest-plugin",
                            (REPORTERS_DIR, *python_path), pytest=True)
    if runner == "mix":
        return SuiteCommand(mix_test_argv(elixir, [*_without_option(argv[2:], "--formatter"), *selection]),
                            "exunit-formatter", (REPORTERS_DIR,))
    if runner == "node":
        rest = _without_option(_without_option([a for a in argv[1:] if a != "--test"], "--test-reporter"),
                               "--test-reporter-destination")
        return SuiteCommand(node_argv(node, [*rest, *selection]), "node-reporter", (REPORTERS_DIR,))
    if argv[0] in ("python", "python3"):
        argv = [python, *argv[1:]]
    return SuiteCommand(argv, "junit", tuple(python_path))


def run_tests(sandbox: Sandbox, test_command: Sequence[str] | None, selection: Sequence[str], *, root: Path,
              python: str, python_path: Sequence[Path], limits: Limits, timeout_s: float,
              cancelled: threading.Event | None = None, env: Mapping[str, str] | None = None) -> TestRun:
    """Run a repository's suite once in the sandbox with `root` as /sandbox, and read its verdict
    (see suite_command for how each kind of command is counted)."""
    (root / JUNIT_FILE).unlink(missing_ok=True)
    (root / METRICS_FILE).unlink(missing_ok=True)
    with ReportChannel() as channel:
        suite = suite_command(test_command, selection, python=python, python_path=python_path, channel=channel)
        variables = {"CI": "true", "PYTHONDONTWRITEBYTECODE": "1", **junit_env(), **channel.env,
                     "GENESIS_METRICS_FILE": f"{SANDBOX_DIR}/{METRICS_FILE}", **(env or {})}
        if suite.counted_by == "exunit-formatter":
            variables = {**MIX_ENV, **variables}
        if python_path:
            variables["PYTHONPATH"] = os.pathsep.join(str(p) for p in python_path)
        result = sandbox.run(suite.argv, writable=root, env=variables, ro_paths=suite.ro_paths, limits=limits,
                             timeout_s=timeout_s, cancelled=cancelled, pass_fds=channel.pass_fds)
    verdict = command_verdict(suite, channel, result, root / JUNIT_FILE, " ".join(test_command or ["pytest"]))
    metrics, metrics_problem = read_metrics(root / METRICS_FILE)
    if result.limit is not None:
        # killed by the sandbox: whatever it reported so far is not the suite's verdict, nor is its
        # exit status (a parent whose child the limit killed may still exit 0): no outcomes
        return TestRun({}, suite.argv, result, False, verdict.counted_by,
                       (f"the suite went past its {result.limit} limit and was killed", *verdict.problems),
                       verdict.rewritten, dict(verdict.durations), metrics, metrics_problem)
    return TestRun(dict(verdict.outcomes), suite.argv, result, verdict.measured, verdict.counted_by,
                   verdict.problems, verdict.rewritten, dict(verdict.durations), metrics, metrics_problem)


def _without_option(args: Sequence[str], option: str) -> list[str]:
    """args less `option VALUE` and `option=VALUE` (the reporters are ours to choose)."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def command_verdict(suite: SuiteCommand, channel: ReportChannel, result: SandboxResult, report: Path,
                    name: str) -> Verdict:
    """The verdict of a run of `suite`: from our reporter's channel, else the command's JUnit file,
    else its exit status (the command as one test named `name`)."""
    if suite.counted_by != "junit":
        return channel.verdict(suite.counted_by)
    text = read_report(report)
    if text is not None:
        try:
            return Verdict(parse_junit(text), "junit", True, durations=junit_durations(text))
        except (ElementTree.ParseError, ValueError) as exc:
            problem = f"unreadable JUnit report: {exc}"
        else:  # pragma: no cover - both branches return
            problem = ""
    else:
        problem = ""
    outcome: Outcome = "passed" if result.returncode == 0 else "error"
    return Verdict({name: outcome}, "exit-status", True, (problem,) if problem else ())


def parse_junit(text: str) -> dict[str, Outcome]:
    """test id (classname::name) -> outcome, from JUnit XML. A test reported twice (a teardown
    error after a pass) keeps its worst outcome."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise ValueError("JUnit report with a DTD refused")  # no entity expansion of untrusted XML
    root = ElementTree.fromstring(text)
    outcomes: dict[str, Outcome] = {}
    for case in root.iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        test_id = f"{classname}::{name}" if classname else name
        tags = {child.tag for child in case}
        outcome: Outcome = ("error" if "error" in tags else "failed" if "failure" in tags
                            else "skipped" if "skipped" in tags else "passed")
        previous = outcomes.get(test_id)
        outcomes[test_id] = outcome if previous is None else _worst(outcome, previous)
    return outcomes


def junit_durations(text: str) -> dict[str, float]:
    """test id -> milliseconds, from the `time` (seconds) of each testcase that has a sane one."""
    durations: dict[str, float] = {}
    for case in ElementTree.fromstring(text).iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        try:
            seconds = float(case.get("time", ""))
        except ValueError:
            continue
        if math.isfinite(seconds) and 0 <= seconds < 1e7:
            durations[f"{classname}::{name}" if classname else name] = round(seconds * 1000.0, 3)
    return durations


# --- custom metrics a suite reports --------------------------------------------------------------

METRICS_FILE = ".genesis-metrics.json"
METRICS_MAX_BYTES = 64 * 1024
METRICS_MAX_KEYS = 50
_METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def read_metrics(path: Path) -> tuple[dict[str, float], str | None]:
    """The custom metrics a suite wrote to $GENESIS_METRICS_FILE (`{"llm_calls": 12}`), and what was
    wrong with the file if anything. The file is the tested code's: it must be a regular file of at
    most METRICS_MAX_BYTES holding one JSON object of at most METRICS_MAX_KEYS names (letters,
    digits, `_.-`, at most 64 characters) to finite numbers; anything else is refused whole."""
    text = read_report(path, max_bytes=METRICS_MAX_BYTES)
    if text is None:
        return {}, (f"{METRICS_FILE} is not a regular file of at most {METRICS_MAX_BYTES} bytes"
                    if os.path.lexists(path) else None)
    try:
        data = json.loads(text, parse_constant=lambda name: None)
    except ValueError:
        return {}, f"{METRICS_FILE} is not JSON"
    if not isinstance(data, dict) or len(data) > METRICS_MAX_KEYS:
        return {}, f"{METRICS_FILE} is not an object of at most {METRICS_MAX_KEYS} metrics"
    metrics: dict[str, float] = {}
    for name, value in data.items():
        if not _METRIC_NAME.fullmatch(name) or isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or abs(value) > 1e15:
            return {}, f"{METRICS_FILE}: metrics are names (letters, digits, _.-) of finite numbers"
        metrics[name] = float(value)
    return metrics, None


def read_report(path: Path, max_bytes: int = JUNIT_MAX_BYTES) -> str | None:
    """The report the test run wrote, if it is a regular file (never through a symlink the code
    under test planted) of sane size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            return None
        return handle.read(max_bytes + 1)[:max_bytes].decode("utf-8", errors="replace")


def junit_env() -> dict[str, str]:
    return {"GENESIS_JUNIT_XML": f"{SANDBOX_DIR}/{JUNIT_FILE}"}


# --- changes to how tests run -------------------------------------------------------------------

# files that configure a test runner or load plugins into it, wherever they are
_CONFIG_NAMES = frozenset({
    "conftest.py", "pytest.ini", ".pytest.ini", "tox.ini", "setup.cfg", "pyproject.toml", "setup.py",
    "sitecustomize.py", "usercustomize.py",
    "test_helper.exs", "mix.exs",
    "package.json", ".npmrc", ".noderc",
})
_CONFIG_PREFIXES = (".mocharc", "jest.config", "vitest.config", "jest.setup", "vitest.setup", ".c8rc", ".nycrc")
# top-level modules that would shadow the runner or its plugins if imported from the repository
_RUNNER_MODULES = frozenset({"pytest", "_pytest", "pluggy", "py", "genesis_pytest_plugin"})


def test_config_changes(paths: Iterable[str]) -> list[str]:
    """The paths among `paths` (relative to the repository) that configure the test runner or its
    plugins: a change to any of them can change what the tests report, so it is reviewed by a
    person. pyproject.toml, setup.cfg and tox.ini count whatever section changed (each may hold
    the runner's configuration or declare its plugins); so do Elixir's config/*.exs."""
    found = []
    for path in paths:
        parts = PurePosixPath(path).parts
        if not parts:
            continue
        name = parts[-1]
        top = parts[0].removesuffix(".py")
        if (name in _CONFIG_NAMES or name.startswith(_CONFIG_PREFIXES) or name.endswith(".pth")
                or (len(parts) >= 2 and parts[0] == "config" and name.endswith(".exs"))
                or top in _RUNNER_MODULES):
            found.append(path)
    return sorted(dict.fromkeys(found))


test_config_changes.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, whatever its name
