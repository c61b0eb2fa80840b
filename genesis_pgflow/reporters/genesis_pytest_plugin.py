"""The pytest side of genesis_pgflow's report channel: runs pytest and reports each test's outcome
on a pipe only this process holds, each line signed with a key only this process learnt.

Run inside the sandbox, before any code under test is imported, as

    python3 -I -B genesis_pytest_plugin.py REPORT_FD KEY_FD EXTRA_PATHS -- PYTEST_ARGS...

- -I: no PYTHONPATH, no user site, no current directory on sys.path at start, so neither the
  repository under test nor the environment can shadow this file, pytest or pluggy;
- the key (hex, one line) is read from KEY_FD until its end, and KEY_FD closed;
- REPORT_FD is moved to a private, close-on-exec descriptor, and the process made non-dumpable,
  so that a child process the tests start inherits neither and cannot open them through /proc;
- then pytest runs with this module's Reporter registered before any conftest.

Each line is `SEQ<TAB>KIND<TAB>JSON<TAB>HMAC-SHA256(key, "SEQ<TAB>KIND<TAB>JSON")`, written with
one write() of less than PIPE_BUF bytes (atomic on a pipe). Kinds: start, begin {id}, outcome {id,
outcome, raw, final, rewritten, message}, collect {id, outcome, message}, end {tests, exitstatus,
tampered}. The consumer (genesis_pgflow/suite.py) accepts a stream only if every line is signed,
in sequence, each begun test has one outcome and the stream ends with `end`.

Each test's outcome is taken from the raw exception of each phase, seen by this plugin's
innermost wrapper of pytest_runtest_setup/call/teardown, not from the report a conftest hook may
rewrite; a report that says better than what was raised is marked `rewritten` and the raw outcome
counts. Code running inside this process can still tamper with it (it can reach this module's
memory); that is the residual risk the consumer's documentation states.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import os
import sys
import time
from typing import Any

_CLOCK = time.perf_counter  # bound before any code under test can patch time

_LINE_MAX = 3800  # below PIPE_BUF (4096), so that a line is written atomically
_SEVERITY = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


class Channel:
    """The signed, sequenced lines on the private descriptor."""

    def __init__(self, fd: int, key: bytes):
        self._fd = fd
        self._key = key
        self._seq = 0

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=True)
        if len(body) > _LINE_MAX:
            payload = {k: (v[:200] if isinstance(v, str) else v) for k, v in payload.items()}
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=True)
        message = f"{self._seq}\t{kind}\t{body}"
        mac = hmac.new(self._key, message.encode("ascii"), hashlib.sha256).hexdigest()
        self._seq += 1
        data = f"{message}\t{mac}\n".encode("ascii")
        while data:
            written = os.write(self._fd, data)
            data = data[written:]


def _short(value: object) -> str:
    text = f"{type(value).__name__}: {value}"
    return text if len(text) <= 300 else text[:297] + "..."


class Reporter:
    """The pytest plugin object (registered through pytest.main(plugins=[...]))."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.begun: str | None = None
        self.phases: dict[str, str] = {}    # phase -> raw outcome of the current test
        self.finals: dict[str, str] = {}    # phase -> outcome its (possibly rewritten) report says
        self.message = ""
        self.tests = 0
        self.tampered: list[str] = []
        self.hooks: Any = None
        import _pytest.python
        import _pytest.runner
        import pluggy

        # what a test module could patch at import time to turn every test into a pass
        self._watched = {
            "Function.runtest": (_pytest.python.Function, "runtest"),
            "runner.call_and_report": (_pytest.runner, "call_and_report"),
            "runner.call_runtest_hook": (_pytest.runner, "call_runtest_hook"),
            "runner.pytest_runtest_call": (_pytest.runner, "pytest_runtest_call"),
            "runner.CallInfo.from_call": (_pytest.runner.CallInfo, "from_call"),
            "Reporter.pytest_runtest_logreport": (Reporter, "pytest_runtest_logreport"),
            "Channel.emit": (Channel, "emit"),
        }
        self._originals = {name: _attribute(*where) for name, where in self._watched.items()}
        self._pluggy = pluggy

    def _check_integrity(self, item: Any = None) -> None:
        found = [name for name, where in self._watched.items() if _attribute(*where) is not self._originals[name]]
        if item is not None:
            for phase in ("setup", "call", "teardown"):
                wrappers = [impl for impl in getattr(item.ihook, f"pytest_runtest_{phase}").get_hookimpls()
                            if impl.hookwrapper or getattr(impl, "wrapper", False)]
                if wrappers and wrappers[0].plugin is not self.hooks:
                    found.append(f"a pytest_runtest_{phase} wrapper inside the reporter's")
        self.tampered += [name for name in found if name not in self.tampered]

    # -- per test ------------------------------------------------------------------------------

    def _pytest_runtest_protocol(self, item: Any, nextitem: Any) -> Any:
        self.begun = item.nodeid
        self.phases, self.finals, self.message = {}, {}, ""
        self.channel.emit("begin", {"id": item.nodeid})
        began = _CLOCK()
        self._check_integrity(item)
        yield
        self._check_integrity(item)
        raw = self._raw_outcome(item)
        final = _worst(self.finals.values()) if self.finals else "error"
        rewritten = _SEVERITY[final] < _SEVERITY[raw]
        outcome = raw if _SEVERITY[raw] >= _SEVERITY[final] else final
        self.tests += 1
        self.channel.emit("outcome", {"id": item.nodeid, "outcome": outcome, "raw": raw, "final": final,
                                      "rewritten": rewritten, "message": self.message,
                                      "duration_ms": round((_CLOCK() - began) * 1000.0, 3)})
        self.begun = None

    def _raw_outcome(self, item: Any) -> str:
        if "call" not in self.phases:
            # no call phase: a setup that failed or skipped, or a protocol someone cut short
            setup = self.phases.get("setup")
            if setup in ("error", "skipped"):
                return _worst([setup, self.phases.get("teardown", "passed")])
            return "error"
        return _worst(self.phases.values())

    def _phase(self, item: Any, when: str) -> Any:
        outcome = yield
        excinfo = outcome.excinfo
        if excinfo is None:
            self.phases[when] = "passed"
            return
        error = excinfo[1]
        import pytest

        if isinstance(error, pytest.skip.Exception):
            self.phases[when] = "skipped"
        elif isinstance(error, pytest.xfail.Exception):
            self.phases[when] = "skipped"  # imperative xfail: reported as xfailed, never as a pass
        elif when == "call" and next(item.iter_markers(name="xfail"), None) is not None:
            # an expected failure (xfailed; pytest's own report says failed where raises= does not
            # match, and the worse of the two counts)
            self.phases[when] = "skipped"
        else:
            self.phases[when] = "failed" if when == "call" else "error"
            if not self.message:
                self.message = _short(error)

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.nodeid != self.begun:
            return
        if report.outcome == "passed":
            self.finals[report.when] = "passed"
        elif report.outcome == "skipped":
            self.finals[report.when] = "skipped"
        else:
            self.finals[report.when] = "failed" if report.when == "call" else "error"

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.channel.emit("collect", {"id": report.nodeid or "<collection>", "outcome": "error",
                                          "message": str(getattr(report, "longreprtext", ""))[-300:]})

    def pytest_sessionfinish(self, session: Any, exitstatus: Any) -> None:
        self._check_integrity()
        self.channel.emit("end", {"tests": self.tests, "exitstatus": int(exitstatus),
                                  "tampered": self.tampered})


def _attribute(owner: Any, name: str) -> Any:
    return owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)


def _worst(outcomes: Any) -> str:
    found = list(outcomes) or ["passed"]
    return max(found, key=lambda o: _SEVERITY[o])


def _register_hooks(reporter: Reporter) -> Any:
    """The hook implementations, marked as pluggy wants them: the phase wrappers innermost
    (trylast, registered before any conftest), the protocol wrapper outermost."""
    import pytest

    class Hooks:
        @pytest.hookimpl(hookwrapper=True, tryfirst=True)
        def pytest_runtest_protocol(self, item: Any, nextitem: Any) -> Any:
            return (yield from reporter._pytest_runtest_protocol(item, nextitem))

        @pytest.hookimpl(hookwrapper=True, trylast=True)
        def pytest_runtest_setup(self, item: Any) -> Any:
            return (yield from reporter._phase(item, "setup"))

        @pytest.hookimpl(hookwrapper=True, trylast=True)
        def pytest_runtest_call(self, item: Any) -> Any:
            return (yield from reporter._phase(item, "call"))

        @pytest.hookimpl(hookwrapper=True, trylast=True)
        def pytest_runtest_teardown(self, item: Any, nextitem: Any) -> Any:
            return (yield from reporter._phase(item, "teardown"))

        @pytest.hookimpl(tryfirst=True)
        def pytest_runtest_logreport(self, report: Any) -> None:
            reporter.pytest_runtest_logreport(report)

        @pytest.hookimpl(tryfirst=True)
        def pytest_collectreport(self, report: Any) -> None:
            reporter.pytest_collectreport(report)

        @pytest.hookimpl(trylast=True)
        def pytest_sessionfinish(self, session: Any, exitstatus: Any) -> None:
            reporter.pytest_sessionfinish(session, exitstatus)

        @pytest.hookimpl(tryfirst=True)
        def pytest_collection_finish(self, session: Any) -> None:
            # pluggy puts the last trylast wrapper registered innermost: a conftest's would sit
            # inside ours and could swallow an exception before we see it. Registering again, once
            # every conftest is in, puts ours back innermost (each test then checks it still is).
            manager = session.config.pluginmanager
            name = manager.get_name(self)
            manager.unregister(self)
            manager.register(self, name)

    hooks = Hooks()
    reporter.hooks = hooks
    return hooks


def _read_key(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    os.close(fd)
    return bytes.fromhex(b"".join(chunks).decode("ascii").strip())


def _private(fd: int) -> int:
    """The report descriptor moved high and close-on-exec; the original number closed."""
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 200)
    os.close(fd)
    return moved


def _non_dumpable() -> None:
    """Other processes of the same uid (whatever the tests start) can no longer open this one's
    /proc/<pid>/fd or /proc/<pid>/mem."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[3] != "--":
        print("usage: genesis_pytest_plugin.py REPORT_FD KEY_FD EXTRA_PATHS -- PYTEST_ARGS...", file=sys.stderr)
        return 4
    report_fd, key_fd, extra = int(argv[0]), int(argv[1]), argv[2]
    key = _read_key(key_fd)
    channel = Channel(_private(report_fd), key)
    _non_dumpable()
    sys.path[1:1] = [p for p in extra.split(os.pathsep) if p]
    import pytest

    reporter = Reporter(channel)
    channel.emit("start", {"runner": "pytest", "version": pytest.__version__})
    # what `python -m pytest` would add, but last: the repository must not shadow the runner
    sys.path.append(os.getcwd())
    status = pytest.main(argv[4:], plugins=[_register_hooks(reporter)])
    return int(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
