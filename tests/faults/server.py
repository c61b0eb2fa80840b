"""A throwaway PostgreSQL 15 server of the fault tier's own: initdb in a temporary directory, its own
port on 127.0.0.1, run as the `postgres` OS user; stopped, restarted and cut at will.

The shared server on 5432 is never touched here: these tests stop and restart their server.

    server = ThrowawayServer.create()          # initdb + start
    server.dsn("postgres")                      # key/value DSN to one database
    server.stop("immediate"); server.start()    # or server.restart("fast")
    server.terminate_backends("db", spare_application="my-test")
    server.destroy()
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

PG_BIN = Path(os.environ.get("GENESIS_FAULTS_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"


def free_port() -> int:
    """A port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the postgres OS user when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", OS_USER, "--", *argv]
    return argv


class ServerError(RuntimeError):
    """The throwaway server did not do what it was told; the message carries its log tail."""


class ThrowawayServer:
    """One initdb'd cluster; start/stop/restart go through pg_ctl and wait until done."""

    def __init__(self, root: Path, port: int):
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = port

    @classmethod
    def create(cls, max_connections: int = 200) -> ThrowawayServer:
        root = Path(tempfile.mkdtemp(prefix="genesis-faults-pg-", dir="/var/tmp"))
        root.chmod(0o755)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(OS_USER)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        server = cls(root, free_port())
        server._run([str(PG_BIN / "initdb"), "-D", str(server.data), "-U", "postgres", "--auth=trust",
                     "-E", "UTF8", "--locale=C.UTF-8", "--no-sync", "--no-instructions"], timeout=120)
        with open(server.data / "postgresql.conf", "a") as conf:
            conf.write("\n# the fault tier's throwaway server\n"
                       "listen_addresses = '127.0.0.1'\n"
                       f"port = {server.port}\n"
                       f"unix_socket_directories = '{root}'\n"
                       f"max_connections = {max_connections}\n"
                       "shared_buffers = 32MB\n"
                       "fsync = off\n"
                       "log_min_messages = warning\nlog_min_error_statement = panic\n")
        server.start()
        return server

    def _run(self, argv: list[str], timeout: float = 60) -> str:
        done = subprocess.run(_as_postgres(argv), capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise ServerError(f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stderr.strip()}\n"
                              f"{self.log_tail()}")
        return done.stdout

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # --- lifecycle ----------------------------------------------------------------------------

    def running(self) -> bool:
        done = subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status"]),
                              capture_output=True, text=True, check=False)
        return done.returncode == 0

    def start(self) -> None:
        """Start and wait until it accepts connections. The port may have been taken while the
        server was down (free_port's race): then it moves to a fresh one."""
        for _ in range(3):
            try:
                self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "120",
                           "-o", f"-p {self.port}", "start"], timeout=150)
                break
            except ServerError:
                if not self._port_taken():
                    raise
                self.port = free_port()
        self._wait_ready()

    def _port_taken(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0 and not self.running()

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=3, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise ServerError(f"not accepting connections after {timeout} s\n{self.log_tail()}") from None
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """mode: smart, fast (clients disconnected, clean shutdown) or immediate (like a crash:
        recovery at the next start)."""
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "120", "-m", mode, "stop"],
                  timeout=150)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def destroy(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except ServerError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    # --- databases and sessions ----------------------------------------------------------------

    def dsn(self, dbname: str, **extra: str) -> str:
        parts = {"host": "127.0.0.1", "port": str(self.port), "user": "postgres", "dbname": dbname, **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def execute(self, statement: str, params: Sequence[Any] | None = None, dbname: str = "postgres") -> list[tuple]:
        with psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def terminate_backends(self, dbname: str, spare_application: str | None = None) -> int:
        """pg_terminate_backend on every other client session of a database but those of
        spare_application (e.g. the test's own); returns how many were terminated."""
        rows = self.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
            "AND application_name IS DISTINCT FROM %s::text",
            (dbname, spare_application))
        return int(rows[0][0])
