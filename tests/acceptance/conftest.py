"""Running the real console scripts (`genesis`, `genesis-consume`) in subprocesses."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from genesis_pgflow.testing import CliProcess


class Background(CliProcess):
    """A CLI process in the background whose stderr lines are collected as they arrive."""

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._finish()
        return code

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
