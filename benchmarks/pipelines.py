"""The pipelines `make bench` times (raw pgmq, the genesis-consume CLI, PgQueuer) and what a run costs the database."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

Q, RESULTS = "genesis_rule_updates", "genesis_rule_updates_results"
GENESIS_CONSUME = Path(sys.executable).parent / "genesis-consume"
# truncated before each fill (RESTART IDENTITY: msg ids count from 1 in every run)
RESET_TABLES = (f"pgmq.q_{Q}", f"pgmq.q_{RESULTS}", f"pgmq.a_{Q}", f"pgmq.q_{Q}_dlq", "genesis.workflow_runs",
                "genesis.rule_versions")


def rule_update(i: int) -> dict[str, Any]:
    """A real rule update: distinct rule ids, confident enough to be applied (RuleEngine's state write)."""
    return {"type": "genesis_rule_update", "namespace": "bench", "rule_id": f"r{i}", "version": 1,
            "confidence": 0.9, "rule": {"when": f"event {i}", "then": "notify"}}


@dataclass
class Figures:
    """One timed run of one pipeline: rate over its working window and what it cost the database."""

    name: str
    messages: int
    seconds: float                 # the working window (see the pipeline's docstring)
    commits: int = 0
    wal_bytes: int = 0
    dead_tuples: int = 0
    wall_s: float = 0.0            # process start to exit, for the CLI runs
    peak_rss_mb: float | None = None
    rss_growth_mb: float | None = None
    cpu: CpuSpent | None = None     # CPU over the steady part of the run (see CpuSpent)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class CpuSpent:
    """CPU seconds over `messages` messages: the pipeline's own process (the consumer, or the bench
    process for the in-process pipelines) and the whole machine (/proc/stat), whose rest is
    PostgreSQL's backends on the bench's own server, plus whatever else runs on the machine."""

    messages: int
    client_s: float
    machine_s: float

    @property
    def client_us(self) -> float:
        return self.client_s / self.messages * 1e6

    @property
    def rest_us(self) -> float:
        return max(0.0, self.machine_s - self.client_s) / self.messages * 1e6


def process_tree(pid: int) -> list[int]:
    """A live process and its live descendants (genesis-consume consumes in its children when it
    runs more than one process)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listed:
            children = [int(child) for child in listed.read().split()]
    except OSError:
        return []
    return [pid, *(p for child in children for p in process_tree(child))]


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU of a live process and its descendants, all their threads (/proc/<pid>/stat)."""
    total, tree = 0.0, process_tree(pid)
    for member in tree:
        try:
            with open(f"/proc/{member}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total if tree else None


def machine_cpu_s() -> float:
    """CPU spent by every process on the machine so far (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:8]]
    return (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / os.sysconf("SC_CLK_TCK")


@contextmanager
def cpu_spent(into: list[CpuSpent], messages: Callable[[], int]) -> Iterator[None]:
    """The CPU of this process and of the machine over the block (an in-process pipeline)."""
    client, machine = time.process_time(), machine_cpu_s()
    yield
    into.append(CpuSpent(messages(), time.process_time() - client, machine_cpu_s() - machine))


class BenchDatabase:
    """The one database every pipeline of a run uses; counters are read from the server's own statistics."""

    def __init__(self, dsn: str, admin_dsn: str, name: str):
        self.dsn = dsn
        self.admin_dsn = admin_dsn      # the server's `postgres` database: waits and snapshots from outside
        self.name = name

    def execute(self, statement: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[tuple]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def reset(self) -> None:
        self.execute(f"TRUNCATE {', '.join(RESET_TABLES)} RESTART IDENTITY")

    def fill_pgmq(self, n: int, start: int = 0) -> None:
        self.reset()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for first in range(start, start + n, 1000):
                conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])",
                             (Q, [Jsonb(rule_update(i)) for i in range(first, min(start + n, first + 1000))]))
        self.settle()

    def settle(self) -> None:
        """Same starting line for every run: dead rows gone, statistics fresh, a checkpoint behind
        (so every run pays the same full-page writes)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
            conn.execute("CHECKPOINT")

    def wait_idle(self, timeout: float = 30.0, spare_application: str | None = None) -> None:
        """Until no other session is on the database (but those of spare_application, which make
        no writes): a session's statistics reach the counters when it ends."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                                   "AND pid <> pg_backend_pid() AND application_name IS DISTINCT FROM %s::text",
                                   (self.name, spare_application)).fetchone()
                if row is not None and row[0] == 0:
                    return
                time.sleep(0.05)

    def counters(self) -> dict[str, int]:
        """Commits (pg_stat_database.xact_commit), WAL position (pg_current_wal_lsn) and dead tuples
        made (updates + deletes of every table), read from outside the database."""
        self.wait_idle()
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT xact_commit, pg_current_wal_lsn() - '0/0'::pg_lsn FROM pg_stat_database "
                               "WHERE datname = %s", (self.name,)).fetchone()
        assert row is not None
        return {"commits": int(row[0]), "wal": int(row[1]), "dead": self.dead_tuples()}

    def dead_tuples(self) -> int:
        """Dead tuples made so far: updates + deletes of every table, as far as the sessions that
        made them have reported (see wait_idle)."""
        rows = self.execute("SELECT coalesce(sum(n_tup_upd + n_tup_del), 0) FROM pg_stat_all_tables "
                            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')")
        return int(rows[0][0])

    @contextmanager
    def costs(self, figures_out: list[Figures]) -> Iterator[None]:
        """Charge the counters' deltas over the block to the Figures the block appends."""
        before = self.counters()
        yield
        after = self.counters()
        figures = figures_out[-1]
        # this helper's own sessions: two autocommit statements per counters() call are the only
        # commits it adds (the admin session's are on another database)
        figures.commits = after["commits"] - before["commits"] - 2
        figures.wal_bytes = after["wal"] - before["wal"]
        figures.dead_tuples = after["dead"] - before["dead"]

    def archive_window(self) -> tuple[int, float]:
        """Messages archived after the first completion transaction, and the seconds from that
        transaction to the last one (archived_at is each completion transaction's now()): the
        steady-state rate, with no process start-up or exit in it."""
        rows = self.execute(f"SELECT archived_at, count(*) FROM pgmq.a_{Q} GROUP BY archived_at ORDER BY archived_at")
        total = sum(int(r[1]) for r in rows)
        if len(rows) < 2:
            return total, 0.0
        return total - int(rows[0][1]), (rows[-1][0] - rows[0][0]).total_seconds()


# --- raw pgmq --------------------------------------------------------------------------------------


def _noop(message: dict) -> dict:
    return {"status": "applied", "rule_id": message.get("rule_id")}


def raw_pgmq(db: BenchDatabase, batch: int) -> int:
    """The floor: read `batch` -> 4 threads run a no-op -> send_batch the results + archive, one
    transaction per batch."""
    done = 0
    with psycopg.connect(db.dsn) as conn, ThreadPoolExecutor(4) as pool:
        while True:
            with conn.transaction():
                rows = conn.execute("SELECT msg_id, message FROM pgmq.read(%s, 30, %s)", (Q, batch)).fetchall()
            if not rows:
                return done
            outputs = list(pool.map(_noop, [m for _, m in rows]))
            with conn.transaction():
                conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])", (RESULTS, [Jsonb(o) for o in outputs]))
                conn.execute("SELECT pgmq.archive(%s, %s::bigint[])", (Q, [m for m, _ in rows]))
            done += len(rows)


def measure_raw(db: BenchDatabase, n: int, batch: int) -> Figures:
    db.fill_pgmq(n)
    out: list[Figures] = []
    cpu: list[CpuSpent] = []
    with db.costs(out):
        start = time.perf_counter()
        with cpu_spent(cpu, lambda: done):
            done = raw_pgmq(db, batch)
        wall = time.perf_counter() - start
        counted, window = db.archive_window()
        out.append(Figures(f"raw pgmq, batch {batch}", counted, window, wall_s=wall, cpu=cpu[0], extra={"done": done}))
    return out[0]


# --- genesis-consume, the real CLI -------------------------------------------------------------------


def cli_env(dsn: str, home: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENESIS_") and k != "DATABASE_URL"}
    env.update({"GENESIS_DATABASE_URL": dsn, "GENESIS_HOME": str(home), **settings})
    return env


def rss_mb(pid: int) -> float | None:
    """Resident memory of a live process and its descendants, summed."""
    total, tree = 0.0, process_tree(pid)
    for member in tree:
        try:
            with open(f"/proc/{member}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
        except (OSError, StopIteration):
            continue
    return total if tree else None


@dataclass(frozen=True)
class Sample:
    done: int               # results written so far
    rss_mb: float           # the process's and its descendants'
    cpu_s: float            # their CPU so far
    machine_cpu_s: float    # the machine's


class RssSampler(threading.Thread):
    """Samples a process's RSS and CPU (/proc), and the machine's CPU, against the count of results
    written (the result queue's sequence, read by a session on the bench database whose commits are
    counted and subtracted)."""

    def __init__(self, pid: int, db: BenchDatabase, total: int, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.db, self.total, self.every_s = pid, db, total, every_s
        self.samples: list[Sample] = []
        self.queries = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.db.dsn, autocommit=True) as conn:
            while not self.stop.wait(self.every_s):
                row = conn.execute(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
                                   f"FROM pgmq.q_{RESULTS}_msg_id_seq").fetchone()
                self.queries += 1
                rss, cpu = rss_mb(self.pid), process_cpu_s(self.pid)
                if row is None or rss is None or cpu is None:
                    continue
                self.samples.append(Sample(int(row[0]), rss, cpu, machine_cpu_s()))

    def peak(self) -> float | None:
        return max((s.rss_mb for s in self.samples), default=None)

    def growth(self) -> float | None:
        """RSS at the end of the run minus RSS once 10% of the messages were done (start-up and
        first allocations behind)."""
        warm = [s.rss_mb for s in self.samples if s.done >= self.total * 0.1]
        late = [s.rss_mb for s in self.samples if s.done >= self.total * 0.9]
        if not warm or not late:
            return None
        return max(late) - warm[0]

    def cpu(self) -> CpuSpent | None:
        """The CPU spent from the first sample with 10% of the messages done to the last one before
        95%: the steady state, without start-up (imports, connections: about a second of CPU) or
        exit."""
        warm = [s for s in self.samples if s.done >= self.total * 0.1]
        late = [s for s in warm if s.done <= self.total * 0.95]
        if not late or late[-1].done <= warm[0].done:
            return None
        first, last = warm[0], late[-1]
        return CpuSpent(last.done - first.done, last.cpu_s - first.cpu_s, last.machine_cpu_s - first.machine_cpu_s)


def start_consumer(dsn: str, home: Path, args: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen([str(GENESIS_CONSUME), *args], env=cli_env(dsn, home), stdout=log,
                                stderr=subprocess.STDOUT)


def reap(proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait for a consumer (wait4, for its rusage) and return its peak RSS in MiB; raises on a bad exit."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise RuntimeError(f"genesis-consume {proc.args!r} exited {proc.returncode}")
            return usage.ru_maxrss / 1024
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"genesis-consume {proc.args!r} did not finish in {timeout:.0f} s")
        time.sleep(0.05)


def measure_genesis(db: BenchDatabase, n: int, label: str, args: Sequence[str], processes: int = 1,
                    timeout: float = 900.0) -> Figures:
    """`genesis-consume --drain ARGS` in `processes` subprocesses on N real rule updates. The rate
    is over the archive window (first to last completion transaction); wall_s is process start to
    the last exit. Peak RSS: the most sampled from /proc over the command's processes together (one
    command), else the largest process's, from wait4's rusage; RSS growth sampled for one command."""
    db.fill_pgmq(n)
    out: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="genesis-bench-") as tmp:
        home = Path(tmp)
        with db.costs(out):
            start = time.perf_counter()
            procs = [start_consumer(db.dsn, home, ["--drain", *args], home / f"consumer-{i}.log")
                     for i in range(processes)]
            sampler = RssSampler(procs[0].pid, db, n)
            sampler.start()
            try:
                peaks = [reap(p, timeout) for p in procs]
            except RuntimeError as exc:
                logs = "\n".join((home / f"consumer-{i}.log").read_text(errors="replace")[-3000:]
                                 for i in range(processes))
                raise RuntimeError(f"{exc}\n{logs}") from None
            finally:
                sampler.stop.set()
                sampler.join()
                for p in procs:
                    if p.returncode is None:
                        p.kill()
            wall = time.perf_counter() - start
            counted, window = db.archive_window()
            sampled = sampler.peak() if processes == 1 else None
            out.append(Figures(label, counted, window, wall_s=wall, peak_rss_mb=max([*peaks, sampled or 0.0]),
                               rss_growth_mb=sampler.growth() if processes == 1 else None,
                               cpu=sampler.cpu() if processes == 1 else None))
    out[0].commits -= sampler.queries
    archived = db.execute(f"SELECT count(*) FROM pgmq.a_{Q}")[0][0]
    applied = db.execute("SELECT count(*) FROM genesis.rule_versions")[0][0]
    out[0].extra.update(archived=archived, applied=applied)
    if archived != n or applied != n:
        raise RuntimeError(f"{label}: {archived} of {n} archived, {applied} rules applied")
    return out[0]


# --- PgQueuer ------------------------------------------------------------------------------------------


def pgqueuer_version() -> str | None:
    try:
        import pgqueuer
    except ImportError:
        return None
    return str(getattr(pgqueuer, "__version__", "?"))


def pgqueuer_url(db: BenchDatabase) -> str:
    params = psycopg.conninfo.conninfo_to_dict(db.dsn)
    return f"postgresql://{params.get('user', 'postgres')}@{params['host']}:{params['port']}/{params['dbname']}"


async def _pgqueuer_install(url: str) -> None:
    import asyncpg  # type: ignore[import-untyped]
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(conn))
        await queries.install()
    finally:
        await conn.close()


async def _pgqueuer_fill(url: str, n: int) -> None:
    import json

    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE pgqueuer, pgqueuer_log RESTART IDENTITY")
        queries = Queries(AsyncpgDriver(conn))
        for first in range(0, n, 1000):
            count = min(n, first + 1000) - first
            await queries.enqueue(["bench"] * count,
                                  [json.dumps(rule_update(i)).encode() for i in range(first, first + count)],
                                  [0] * count)
    finally:
        await conn.close()


async def _pgqueuer_drain(url: str, batch: int) -> tuple[int, float]:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.domain.types import QueueExecutionMode

    conn = await asyncpg.connect(url)
    done = 0
    try:
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint("bench")
        async def bench(job: Any) -> None:
            nonlocal done
            done += 1

        start = time.perf_counter()
        await qm.run(batch_size=batch, mode=QueueExecutionMode.drain)
        return done, time.perf_counter() - start
    finally:
        await conn.close()


def pgqueuer_install(db: BenchDatabase) -> None:
    asyncio.run(_pgqueuer_install(pgqueuer_url(db)))


def measure_pgqueuer(db: BenchDatabase, n: int, batch: int) -> Figures:
    """PgQueuer (asyncpg), a no-op entrypoint, QueueManager.run(batch_size, mode=drain); timed from
    run() to its return."""
    url = pgqueuer_url(db)
    asyncio.run(_pgqueuer_fill(url, n))
    db.settle()
    out: list[Figures] = []
    cpu: list[CpuSpent] = []
    with db.costs(out):
        with cpu_spent(cpu, lambda: done):
            done, seconds = asyncio.run(_pgqueuer_drain(url, batch))
        out.append(Figures(f"PgQueuer, batch {batch}", done, seconds, wall_s=seconds, cpu=cpu[0]))
    return out[0]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


Measure = Callable[[], Figures]
