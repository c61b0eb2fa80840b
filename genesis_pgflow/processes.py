"""`genesis-consume --processes N`: N consumer processes run as one command.

One Python process runs the consumer's reading and writing under one interpreter lock, so on a
machine with more than one core it leaves some idle: at batch 100 two processes on one queue drain
it faster than one (README, Performance, for the figures). So by default (`auto`) a command runs
one process per core it may use (its CPU affinity, lowered by a cgroup CPU quota), at most one per
`--parallel` worker, and one only with `--metrics-port`, which serves one process's figures. This
module starts the N ordinary `genesis-consume` processes and keeps them together:

- `--parallel` is the whole command's: the N processes share it (4 over 2: 2 and 2), so the bound
  on workflows running at once, and on the sandboxes they start, is what the operator asked for;
- the database is resolved (the embedded one started) and migrated once, here, before any starts;
  each process is given its DSN in the environment, never on the process list;
- SIGTERM or SIGINT is passed on to every process, which finishes its work as one consumer does,
  and the command exits when they all have;
- a process dying with the command (kill -9 of it included) is the kernel's to enforce
  (PR_SET_PDEATHSIG): none outlives it to hold leases nobody watches;
- one process ending in failure stops the others, and the command exits with its code (2 before
  1): the command fails as a whole, for whatever restarts it to see; one stopping (by
  `genesis consumers stop`) stops the others, unless they drain, where each ends when it is done;
- each process is a consumer of its own in `genesis consumers`, with its own id and its share;
- the first takes whatever arrives, the second only what has waited TAKE_AFTER_MS (the third
  twice that...): they share a backlog, and at moderate rates the first takes it all, as one
  process would, rather than each writing smaller completions of its half.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from genesis_pgflow.cgroups import cpu_quota_cores
from genesis_pgflow.errors import EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, ConfigurationError

log = logging.getLogger("genesis_pgflow")

_PR_SET_PDEATHSIG = 1
WAIT_SLICE_S = 0.2
# the second process takes only messages that have waited this long (the third twice as long...):
# what the first can take alone it takes, so that at moderate rates the completions are not split
# over processes (more, smaller transactions: worse latency); a backlog all share
TAKE_AFTER_MS = 50

# the command each process runs: the same genesis-consume, from the same interpreter
CHILD_COMMAND = (sys.executable, "-c",
                 "import sys; from genesis_pgflow.cli import consume_main; sys.exit(consume_main())")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, lowered by a CPU quota on its cgroup
    (whole cores, at least 1), as Go's and the JVM's runtimes size themselves in a container."""
    cores = len(os.sched_getaffinity(0))
    quota = cpu_quota_cores()
    return cores if quota is None else max(1, min(cores, int(quota)))


def how_many(processes: int | str, parallel: int, metrics_port: int | None, cores: int) -> tuple[int, str]:
    """The processes a command runs, and why (for its first log line; nothing when one was asked
    for). ConfigurationError for an explicit count that cannot work."""
    if processes == "auto":
        if metrics_port is not None:
            return 1, "one process: --metrics-port serves one process's figures"
        n = min(cores, parallel)
        return n, f"--processes auto: {cores} usable core(s), --parallel {parallel}"
    n = int(processes)
    if n > parallel:
        raise ConfigurationError(f"--processes {n} needs --parallel of at least {n} (each process runs at least "
                                 f"one workflow at a time), got --parallel {parallel}")
    if n > 1 and metrics_port is not None:
        raise ConfigurationError("--metrics-port serves one process: with --processes, run one genesis-consume "
                                 "per metrics port instead, or leave --metrics-port out")
    return n, f"--processes {n}" if n > 1 else ""


def shares(parallel: int, processes: int) -> list[int]:
    """--parallel split over the processes, the larger shares first (5 over 2: 3 and 2)."""
    return [parallel // processes + (1 if i < parallel % processes else 0) for i in range(processes)]


def _die_with_parent(libc: ctypes.CDLL, parent: int) -> None:
    """In the child, before exec: killed when the command dies, however it dies. Only a system
    call here (libc is loaded by the parent): between fork and exec another thread's locks may be
    held, so nothing that could take one runs."""
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(EXIT_UNEXPECTED)     # the command is already gone (or the kernel refused): run nothing


def exit_code(codes: Sequence[int]) -> int:
    """The command's exit code from its processes': 0 if all were, else 2 if one was (a
    configuration or an outage the contract reports as 2), else 1 (a crash, or killed by a signal)."""
    if all(code == EXIT_OK for code in codes):
        return EXIT_OK
    return EXIT_USAGE if EXIT_USAGE in codes else EXIT_UNEXPECTED


class Processes:
    """Starts the processes, passes signals on, and waits for them (see the module docstring)."""

    def __init__(self, args: Sequence[str], parallel: int, processes: int, env: Mapping[str, str], *,
                 drain: bool = False, why: str = ""):
        self.args = list(args)
        self.why = why              # how the count was chosen, for the first line
        self.drain = drain          # each process ends when the queues are empty: one done is not a stop
        self.parallel_shares = shares(parallel, processes)
        self.env = dict(env)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopping = False

    def start(self) -> None:
        """Start every process (on the calling thread: the kernel's parent-death signal is tied to
        the thread that forks)."""
        parent, libc = os.getpid(), ctypes.CDLL(None, use_errno=True)
        for rank, share in enumerate(self.parallel_shares):
            if self.stopping:       # a signal came while starting: start no more
                break
            env = {**self.env, "GENESIS_TAKE_AFTER_MS": str(TAKE_AFTER_MS * rank)} if rank else self.env
            self.procs.append(subprocess.Popen(
                [*CHILD_COMMAND, *self.args, "--parallel", str(share)], env=env, stdin=subprocess.DEVNULL,
                preexec_fn=lambda: _die_with_parent(libc, parent)))  # noqa: PLW1509 - prctl only, before exec
        log.info("started %d consumer processes (pids %s), --parallel %s%s",
                 len(self.procs), ", ".join(str(p.pid) for p in self.procs),
                 " + ".join(str(s) for s in self.parallel_shares), f" ({self.why})" if self.why else "")

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Pass a stop on to every process still running (each finishes its work, then exits)."""
        self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def wait(self) -> int:
        """Until every process has exited; the first to fail stops the others."""
        codes: dict[int, int] = {}
        while True:
            for proc in self.procs:
                code = proc.poll()
                if code is None or proc.pid in codes:
                    continue
                if code == -signal.SIGTERM and self.stopping:
                    # our SIGTERM reached it before its handler was in place: still starting (Python
                    # importing), it had taken nothing, so it stopped as a consumer stops in start-up
                    log.info("consumer process %d stopped during start-up", proc.pid)
                    codes[proc.pid] = EXIT_OK
                    continue
                codes[proc.pid] = code
                if code == EXIT_OK:
                    log.info("consumer process %d exited 0", proc.pid)
                    if not self.drain and not self.stopping:    # stopped from outside (genesis consumers stop)
                        log.info("consumer process %d stopped: stopping the others", proc.pid)
                        self.stop()
                    continue
                how = f"was killed by signal {-code}" if code < 0 else f"exited {code}"
                if not self.stopping:
                    log.error("consumer process %d %s: stopping the others", proc.pid, how)
                    self.stop()
                else:
                    log.warning("consumer process %d %s", proc.pid, how)
            if len(codes) == len(self.procs):
                break
            time.sleep(WAIT_SLICE_S)
        return exit_code([c if c >= 0 else EXIT_UNEXPECTED for c in codes.values()])
