"""Recovery figures: time from the database's return to the first answer, after a server restart
(fast and immediate) and after its backends are terminated, at --parallel 4 and 32, with the real
`genesis-consume` at its defaults against a throwaway PostgreSQL (tests/faults/server.py).

    python -m benchmarks.recovery [--parallel 4,32] [--rounds 3] [--faults restart-fast,...]

"idle": the consumer waits for work when the database goes; one message is sent the moment it is
back. "busy": the consumer is working through a backlog; the figure is the time to the first new
answer. Not a test: it prints figures, and needs root or the postgres user (for the server)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg

from tests.faults.conftest import RULES, RULES_RESULTS, TEMPLATE, rule
from tests.faults.consumers import GENESIS, Consumers, cli_env, run_cli
from tests.faults.server import ThrowawayServer

FAULTS = ("restart-fast", "restart-immediate", "terminate")


def _answered(conn: psycopg.Connection) -> int:
    return int(conn.execute(f"SELECT count(*) FROM pgmq.q_{RULES_RESULTS}").fetchone()[0])  # type: ignore[index]


def _wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.005) -> float | None:
    """Seconds until predicate() holds (None after timeout)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    return None


def _connect(server: ThrowawayServer, db: str) -> psycopg.Connection:
    deadline = time.monotonic() + 60
    while True:
        try:
            return psycopg.connect(server.dsn(db), autocommit=True, connect_timeout=3)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _send(conn: psycopg.Connection, n: int, start: int) -> None:
    bodies = [json.dumps(rule(i)) for i in range(start, start + n)]
    conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])", (RULES, bodies))


def measure(server: ThrowawayServer, home: Path, parallel: int, fault: str, mode: str, timeout: float) -> float | None:
    db = f"recovery_{uuid.uuid4().hex[:8]}"
    server.execute(f'CREATE DATABASE "{db}" TEMPLATE "{TEMPLATE}"')
    consumers = Consumers()
    try:
        consumer = consumers.start("--parallel", str(parallel), "--queues", RULES, "--no-migrate",
                                   env=cli_env(home, server.dsn(db)))
        consumer.wait_for_line("consuming")
        conn = _connect(server, db)
        _send(conn, 1, 0)
        if _wait(lambda: _answered(conn) >= 1, 60) is None:
            raise RuntimeError("the consumer never answered the first message:\n" + consumer.stderr())
        if mode == "busy":
            _send(conn, 20_000, 1)
            _wait(lambda: _answered(conn) >= 200, 60)
        else:
            time.sleep(1.5)          # idle: past a poll or two, LISTENing
        conn.close()
        if fault == "terminate":
            server.terminate_backends(db)
        else:
            server.restart(fault.split("-")[1])
        back = time.monotonic()            # the server accepts connections again
        conn = _connect(server, db)
        before = _answered(conn)
        if mode == "idle":
            _send(conn, 1, 100_000)
        answered = _wait(lambda: _answered(conn) > before, timeout)
        recovery = None if answered is None else time.monotonic() - back
        conn.close()
        if not consumer.running():
            raise RuntimeError(f"the consumer exited after {fault}:\n{consumer.stderr()}")
        consumer.signal(signal.SIGTERM)
        consumer.wait(timeout=120)
        return recovery
    finally:
        consumers.kill_all()
        server.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", default="4,32")
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--modes", default="idle,busy")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240.0, help="give up on one measurement after this")
    args = parser.parse_args()

    server = ThrowawayServer.create()
    home = Path(tempfile.mkdtemp(prefix="genesis-recovery-", dir="/var/tmp"))
    try:
        server.execute(f'CREATE DATABASE "{TEMPLATE}"')
        upgraded = run_cli("db", "upgrade", env=cli_env(home, server.dsn(TEMPLATE)), script=GENESIS)
        if upgraded.returncode != 0:
            raise SystemExit(upgraded.stderr)
        print(f"time from the database's return to the first answer (s); {args.rounds} round(s) each; "
              f"{os.cpu_count()} CPU(s), load {os.getloadavg()[0]:.1f}")
        print(f"{'fault':<18} {'mode':<5} {'parallel':>8} {'median':>8} {'max':>8}  all")
        for fault in args.faults.split(","):
            for mode in args.modes.split(","):
                for parallel in (int(p) for p in args.parallel.split(",")):
                    figures = [measure(server, home, parallel, fault, mode, args.timeout) for _ in range(args.rounds)]
                    known = [f for f in figures if f is not None]
                    shown = " ".join("timeout" if f is None else f"{f:.2f}" for f in figures)
                    median = f"{statistics.median(known):.2f}" if known else "-"
                    worst = "timeout" if None in figures else f"{max(known):.2f}"
                    print(f"{fault:<18} {mode:<5} {parallel:>8} {median:>8} {worst:>8}  {shown}", flush=True)
    finally:
        server.destroy()


if __name__ == "__main__":
    main()
