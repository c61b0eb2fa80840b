"""Running the real `genesis-consume` (and `genesis`) in subprocesses for the fault tier: stderr
collected as it arrives, signals, kill -9, and the process tree each consumer started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from genesis_pgflow.testing import CliProcess

BIN = Path(sys.executable).parent
GENESIS = BIN / "genesis"
GENESIS_CONSUME = BIN / "genesis-consume"


def cli_env(home: Path, dsn: str | None = None, **extra: str) -> dict[str, str]:
    """The caller's environment without anything that chooses a database or configures genesis,
    but for one consumer process per command (GENESIS_PROCESSES=1; `extra` may say otherwise): the
    fault tier stalls, kills and cuts off a consumer process by its pid, and watches it recover.
    What a command of several processes does when one dies or is signalled is tested in
    tests/acceptance/test_processes.py, and its connections under a fault in test_leases.py."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENESIS_", "DATABASE_URL"))}
    env["GENESIS_HOME"] = str(home)
    env["GENESIS_PROCESSES"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"   # a hang killed with SIGABRT dumps every thread's stack
    if dsn is not None:
        env["GENESIS_DATABASE_URL"] = dsn
    env.update(extra)
    return env


@dataclass(frozen=True)
class Proc:
    """A process identified by pid and start time, so that a reused pid is never mistaken for it."""

    pid: int
    start: int
    uid: int
    cmdline: str

    def alive(self) -> bool:
        found = read_proc(self.pid)
        return found is not None and found.start == self.start and not _zombie(self.pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        uid = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("Uid:")).split()[1])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return Proc(pid, int(fields[19]), uid, cmdline)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[Proc]:
    """Every live process below pid (children, grandchildren, ...), at this moment."""
    tree = _children()
    found: list[Proc] = []
    todo = list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        proc = read_proc(child)
        if proc is not None:
            found.append(proc)
        todo += tree.get(child, [])
    return found


class Consumer(CliProcess):
    """One `genesis-consume` (or `genesis`) process in the background."""

    line_timeout_s = 60.0

    def __init__(self, script: Path, *args: str, env: dict[str, str]):
        super().__init__(script, *args, env=env, stdout=subprocess.DEVNULL)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """The exit code; on a hang, SIGABRT (faulthandler dumps the stacks) and fail."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self._finish()
            raise AssertionError(f"genesis-consume {' '.join(self.args)} still running after {timeout} s; "
                                 "stderr:\n" + self.stderr()) from None
        self._finish()
        return code

    def kill(self) -> None:
        """kill -9 (by its own pid), and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._finish()

    def stderr(self) -> str:
        """Its stderr so far, shortened to the first and last 25 lines (a flood stays readable)."""
        with self._changed:
            lines = list(self.lines)
        if len(lines) > 50:
            lines = [*lines[:25], f"... ({len(lines) - 50} lines left out) ...", *lines[-25:]]
        return "\n".join(lines)

    def line_count(self) -> int:
        with self._changed:
            return len(self.lines)

    def descendants(self) -> list[Proc]:
        return descendants(self.pid)


class Consumers:
    """Starts CLI processes for one test; what still runs at teardown is killed by its own pid."""

    def __init__(self) -> None:
        self.started: list[Consumer] = []

    def start(self, *args: str, env: dict[str, str], script: Path = GENESIS_CONSUME) -> Consumer:
        consumer = Consumer(script, *args, env=env)
        self.started.append(consumer)
        return consumer

    def __iter__(self) -> Iterator[Consumer]:
        return iter(self.started)

    def kill_all(self) -> None:
        for consumer in self.started:
            consumer.kill()


def run_cli(*args: str, env: dict[str, str], timeout: float = 120,
            script: Path = GENESIS_CONSUME) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(script), *args], check=False, env=env, capture_output=True, text=True,
                          timeout=timeout)
