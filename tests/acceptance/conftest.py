"""Running the real console scripts (`genesis`, `genesis-consume`) in subprocesses."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


class Background:
    """A CLI process in the background whose stderr lines are collected as they arrive."""

    def __init__(self, script: Path, *args: str, env: dict[str, str]):
        self.proc = subprocess.Popen([str(script), *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = 30) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no stderr line matching {pattern!r}; got:\n" + "\n".join(self.lines))
                self._changed.wait(min(left, 0.2))

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None and not self._reader.is_alive():
                pipe.close()
        return code

    def stderr(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait(timeout=10)


@pytest.fixture
def background() -> Iterator[Callable[..., Background]]:
    """start(script, *args, env=...) runs a CLI in the background; what still runs at teardown is
    killed (by its own pid)."""
    started: list[Background] = []

    def start(script: Path, *args: str, env: dict[str, str]) -> Background:
        process = Background(script, *args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.kill()
        else:
            process.wait(timeout=5)
