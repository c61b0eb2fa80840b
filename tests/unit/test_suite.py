"""suite.py without a sandbox: which signed report streams are whole, the report pipe, the
commands per runner, and which changed paths configure a test runner."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from genesis_pgflow.suite import (
    EXUNIT_FORMATTER,
    NODE_REPORTER,
    PYTEST_PLUGIN,
    REPORTERS_DIR,
    ReportChannel,
    read_channel,
    suite_command,
    test_config_changes,
)

KEY = bytes(range(32))


def line(seq: int, kind: str, payload: Mapping[str, object], key: bytes = KEY) -> bytes:
    message = f"{seq}\t{kind}\t{json.dumps(payload)}"
    mac = hmac.new(key, message.encode(), hashlib.sha256).hexdigest()
    return f"{message}\t{mac}\n".encode()


def stream(*entries: tuple[str, Mapping[str, object]], key: bytes = KEY) -> bytes:
    return b"".join(line(seq, kind, payload, key) for seq, (kind, payload) in enumerate(entries))


START = ("start", {"runner": "pytest"})


def test_a_whole_stream_is_measured_test_by_test() -> None:
    data = stream(START,
                  ("begin", {"id": "t::a"}), ("outcome", {"id": "t::a", "outcome": "passed"}),
                  ("begin", {"id": "t::b"}), ("outcome", {"id": "t::b", "outcome": "failed", "message": "boom"}),
                  ("collect", {"id": "t2.py", "outcome": "error"}),
                  ("end", {"tests": 2, "tampered": []}))
    verdict = read_channel(data, KEY, counted_by="pytest-plugin")
    assert verdict.measured and verdict.problems == ()
    assert verdict.outcomes == {"t::a": "passed", "t::b": "failed", "t2.py": "error"}
    assert verdict.messages == {"t::b": "boom"} and verdict.counted_by == "pytest-plugin"


def test_standalone_results_carry_their_line() -> None:
    data = stream(START, ("result", {"id": "f::x", "outcome": "failed", "line": 7}), ("end", {"tests": 1}))
    verdict = read_channel(data, KEY, counted_by="node-reporter")
    assert verdict.measured and verdict.outcomes == {"f::x": "failed"} and verdict.lines == {"f::x": 7}


@pytest.mark.parametrize(("data", "problem"), [
    # cut short: a halt after one pass
    (stream(START, ("begin", {"id": "a"}), ("outcome", {"id": "a", "outcome": "passed"})), "no end marker"),
    # a test that began and never finished (the process died in it)
    (stream(START, ("begin", {"id": "a"}), ("end", {"tests": 0})), "began and never finished"),
    # the tests' own line, unsigned, in the stream
    (stream(START) + b"1\tresult\t{\"id\": \"x\", \"outcome\": \"passed\"}\t" + b"0" * 64 + b"\n", "bad signature"),
    # lines signed with another key
    (stream(START, ("result", {"id": "x", "outcome": "passed"}), ("end", {"tests": 1}), key=b"k" * 32),
     "bad signature"),
    # a genuine line replayed
    (stream(START, ("result", {"id": "x", "outcome": "passed"})) + line(1, "result", {"id": "x", "outcome": "passed"})
     + line(2, "end", {"tests": 2}), "out of sequence"),
    # the same test twice
    (stream(START, ("result", {"id": "x", "outcome": "passed"}), ("result", {"id": "x", "outcome": "passed"}),
            ("end", {"tests": 2})), "reported twice"),
    # an end marker that does not match what came before
    (stream(START, ("result", {"id": "x", "outcome": "passed"}), ("end", {"tests": 25})), "end marker counts"),
    # the runner saw itself patched
    (stream(START, ("end", {"tests": 0, "tampered": ["Function.runtest"]})), "patched"),
    # a line cut in the middle
    (stream(START, ("end", {"tests": 0}))[:-5], "middle of a line"),
    # nothing at all
    (b"", "never started"),
    # garbage before the reporter's first line
    (b"25 passed\n" + stream(START, ("end", {"tests": 0})), "not a reporter line"),
])
def test_a_stream_that_is_not_whole_is_unmeasurable(data: bytes, problem: str) -> None:
    verdict = read_channel(data, KEY, counted_by="pytest-plugin")
    assert not verdict.measured
    assert any(problem in p for p in verdict.problems), verdict.problems


def test_an_unfinished_test_counts_as_an_error_and_verified_outcomes_stay() -> None:
    data = stream(START, ("begin", {"id": "a"}), ("outcome", {"id": "a", "outcome": "failed"}),
                  ("begin", {"id": "b"}))
    verdict = read_channel(data, KEY, counted_by="pytest-plugin")
    assert verdict.outcomes == {"a": "failed", "b": "error"} and not verdict.measured


def test_a_rewritten_report_is_named() -> None:
    data = stream(START, ("begin", {"id": "a"}),
                  ("outcome", {"id": "a", "outcome": "failed", "raw": "failed", "final": "passed", "rewritten": True}),
                  ("end", {"tests": 1}))
    verdict = read_channel(data, KEY, counted_by="pytest-plugin")
    assert verdict.measured and verdict.outcomes == {"a": "failed"} and verdict.rewritten == ("a",)


def test_a_truncated_stream_is_unmeasurable() -> None:
    data = stream(START, ("end", {"tests": 0}))
    assert not read_channel(data, KEY, counted_by="pytest-plugin", truncated=True).measured


def test_the_channel_hands_a_key_once_and_collects_what_is_written() -> None:
    with ReportChannel() as channel:
        report_fd, key_fd = channel.pass_fds
        key = bytes.fromhex(os.read(key_fd, 100).decode().strip())
        assert os.read(key_fd, 100) == b""  # the key pipe is at its end: a second reader finds nothing
        os.write(report_fd, stream(START, ("end", {"tests": 0}), key=key))
    assert key == channel.key and channel.env == {"GENESIS_REPORT_FD": str(report_fd), "GENESIS_KEY_FD": str(key_fd)}
    assert channel.verdict("pytest-plugin").measured
    with pytest.raises(OSError):
        os.fstat(report_fd)  # closed once the run is over


def test_the_channel_keeps_draining_past_its_cap() -> None:
    channel = ReportChannel(max_bytes=1000)
    writer = threading.Thread(target=lambda: os.write(channel.report_fd, b"x" * 200_000))
    writer.start()
    writer.join(timeout=30)  # the writer never blocks on a full pipe
    assert not writer.is_alive()
    channel.close()
    assert channel.truncated and len(channel.data) == 1000
    assert not channel.verdict("pytest-plugin").measured


def test_commands_per_runner() -> None:
    with ReportChannel() as channel:
        site = Path("/opt/site")
        pytest_suite = suite_command(["python", "-m", "pytest", "-x"], ["tests/unit"], python="/usr/bin/python3",
                                     python_path=[site], channel=channel)
        report_fd, key_fd = channel.pass_fds
        assert pytest_suite.argv == ["/usr/bin/python3", "-I", "-B", str(PYTEST_PLUGIN), str(report_fd), str(key_fd),
                                     "/opt/site", "--", "-q", "-p", "no:cacheprovider", "-x", "tests/unit"]
        assert pytest_suite.counted_by == "pytest-plugin" and pytest_suite.ro_paths == (REPORTERS_DIR, site)
        assert suite_command(None, [], python="/p", python_path=[], channel=channel).counted_by == "pytest-plugin"
        node = suite_command(["node", "--test", "--test-reporter=dot", "test/"], [], python="/p",
                             python_path=[], channel=channel)
        assert node.counted_by == "node-reporter" and f"--test-reporter={NODE_REPORTER}" in node.argv
        assert "--test-reporter=dot" not in node.argv and node.argv[-1] == "test/"
        # the risk level's selection (test files) goes after the command's own paths
        node = suite_command(["node", "--test"], ["test/a.test.js"], python="/p", python_path=[], channel=channel)
        assert node.argv[-2:] == [str(REPORTERS_DIR / "genesis_node_entry.mjs"), "test/a.test.js"]
        node = suite_command(["node", "--test", "--test-reporter", "spec", "--test-reporter-destination", "/x", "t/"],
                             [], python="/p", python_path=[], channel=channel)
        assert "spec" not in node.argv and "/x" not in node.argv and node.argv[-1] == "t/"
        mix = suite_command(["mix", "test", "--formatter", "Other", "test/a_test.exs"], [], python="/p",
                            python_path=[], channel=channel)
        assert mix.counted_by == "exunit-formatter" and "Other" not in mix.argv
        assert mix.argv[:3] == ["/usr/bin/elixir", "-r", str(EXUNIT_FORMATTER)] and mix.argv[-1] == "test/a_test.exs"
        mix = suite_command(["mix", "test"], ["test/a_test.exs", "--exclude", "slow"], python="/p", python_path=[],
                            channel=channel)
        assert mix.argv[-4:] == ["GenesisPgflow.ExUnitFormatter", "test/a_test.exs", "--exclude", "slow"]
        other = suite_command(["python", "run_tests.py"], ["ignored"], python="/usr/bin/python3", python_path=[],
                              channel=channel)
        assert other.argv == ["/usr/bin/python3", "run_tests.py"] and other.counted_by == "junit"


@pytest.mark.parametrize(("path", "flagged"), [
    ("conftest.py", True), ("tests/unit/conftest.py", True), ("pytest.ini", True), ("tox.ini", True),
    ("setup.cfg", True), ("pyproject.toml", True), ("sub/pyproject.toml", True),
    ("test/test_helper.exs", True), ("mix.exs", True), ("config/test.exs", True),
    ("package.json", True), (".mocharc.yml", True), ("jest.config.js", True), ("vitest.config.ts", True),
    ("pytest.py", True), ("_pytest/runner.py", True), ("pluggy/__init__.py", True), ("x.pth", True),
    ("sitecustomize.py", True),
    ("calc.py", False), ("tests/unit/test_calc.py", False), ("lib/app.ex", False), ("src/index.js", False),
    ("docs/pytest.md", False), ("", False),
])
def test_test_config_changes(path: str, flagged: bool) -> None:
    assert test_config_changes([path]) == ([path] if flagged else [])


def test_test_config_changes_are_sorted_once() -> None:
    assert test_config_changes(["b/conftest.py", "a.py", "a/conftest.py", "b/conftest.py"]) == \
        ["a/conftest.py", "b/conftest.py"]
