"""`make bench`: issue 9's benchmark in one run (throughput vs the raw pgmq floor, latency, costs, memory, scaling).

Throughput rounds are interleaved and each figure is printed beside its target.

    python -m benchmarks.run [--messages 20000] [--rounds 3] [--status-runs 1000000] [--long] [--dsn DSN]

By default everything runs on a throwaway PostgreSQL 15 of the bench's own (initdb in a temporary
directory, PostgreSQL's defaults, fsync on), so that WAL and commit counters are the bench's alone;
--dsn uses a database created on that server instead (WAL is then counted cluster-wide, with
whatever else writes there, and the latency-under-contention rows are skipped: they open an
idle-in-transaction session, never on a shared server). A benchmark, never a timed test: figures
vary with the machine's load, ratios measured in the same run much less.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import make_conninfo

from benchmarks import latency as lat
from benchmarks import status as st
from benchmarks.pipelines import (
    BenchDatabase,
    Figures,
    measure_genesis,
    measure_pgqueuer,
    measure_raw,
    median,
    pgqueuer_install,
    pgqueuer_version,
)
from genesis_pgflow.store import schema

GENESIS_P4_B100 = ["--parallel", "4", "--batch-size", "100"]
ONE_PROCESS = ["--processes", "1"]
RSS_TARGET_MESSAGES = 200_000


@contextmanager
def bench_database(dsn: str | None) -> Iterator[tuple[BenchDatabase, str]]:
    if dsn is None:
        from tests.faults.server import ThrowawayServer

        server = ThrowawayServer.create()
        try:
            # back to PostgreSQL's defaults where the fault tier's server departs from them
            with open(server.data / "postgresql.conf", "a") as conf:
                conf.write("fsync = on\nshared_buffers = 128MB\nmax_connections = 100\n")
            server.restart()
            server.execute('CREATE DATABASE "bench"')
            db = BenchDatabase(server.dsn("bench"), server.dsn("postgres"), "bench")
            schema.upgrade(db.dsn)
            yield db, f"throwaway PostgreSQL 15 on port {server.port} (defaults, fsync on)"
        finally:
            server.destroy()
        return
    name = f"genesis_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        db = BenchDatabase(make_conninfo(dsn, dbname=name), make_conninfo(dsn, dbname="postgres"), name)
        schema.upgrade(db.dsn)
        yield db, f"database {name} on --dsn's server (WAL counted cluster-wide: other sessions' writes included)"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT MET")


class Report:
    """Collects the figures of every round and prints the tables."""

    def __init__(self) -> None:
        self.rounds: dict[str, list[Figures]] = {}
        self.ratios: dict[str, list[float]] = {}

    def add(self, key: str, figures: Figures, floor: Figures) -> None:
        self.rounds.setdefault(key, []).append(figures)
        self.ratios.setdefault(key, []).append(figures.rate / floor.rate if floor.rate else float("nan"))
        print(f"    {figures.name:<46} {figures.messages:>7} msgs {figures.seconds:7.2f} s {figures.rate:8.0f} msg/s"
              f"  {self.ratios[key][-1]:5.2f}x", flush=True)

    def rate(self, key: str) -> float:
        return median([f.rate for f in self.rounds.get(key, [])])

    def ratio(self, key: str) -> float:
        return median(self.ratios.get(key, []))

    def per_message(self, key: str, attr: str) -> float:
        return median([getattr(f, attr) / f.messages for f in self.rounds.get(key, []) if f.messages])

    def cpu_us(self, key: str) -> tuple[float, float] | None:
        """Median CPU per message in microseconds: the pipeline's process, the rest of the machine."""
        spent = [f.cpu for f in self.rounds.get(key, []) if f.cpu is not None and f.cpu.messages]
        if not spent:
            return None
        return median([c.client_us for c in spent]), median([c.rest_us for c in spent])

    def pair_ratio(self, key: str, other: str) -> float:
        """Median of the per-round ratios key / other (both measured in the same round)."""
        mine, theirs = self.rounds.get(key, []), self.rounds.get(other, [])
        return median([a.rate / b.rate for a, b in zip(mine, theirs, strict=False) if b.rate])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default=os.environ.get("GENESIS_BENCH_DATABASE_URL"),
                        help="a server to create the bench database on (default: a throwaway server of its own)")
    parser.add_argument("--messages", type=int, default=20_000, help="N of the batch-100 rounds (default 20000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--status-runs", type=int, default=1_000_000,
                        help="runs generated for the status-at-scale row, with 10x as many archived (0: skip)")
    parser.add_argument("--long", action="store_true",
                        help=f"also RSS growth over {RSS_TARGET_MESSAGES:,} messages (the target's figure; minutes)")
    args = parser.parse_args()
    n, small = args.messages, max(1000, args.messages // 4)
    began = time.monotonic()
    pgq = pgqueuer_version()

    with bench_database(args.dsn) as (db, where):
        print(f"make bench: {os.cpu_count()} cores, {where}")
        print(f"  N = {n:,} for batch 100, {small:,} for batch 10 and the defaults (the slow rows), "
              f"{args.rounds} rounds interleaved, real rule updates (distinct rule ids) for genesis-consume")
        if pgq:
            pgqueuer_install(db)
        else:
            print("  PgQueuer: not installed (pip install '.[bench]')")
        report = Report()
        runs: list[tuple[str, Callable[[], Figures]]] = [
            ("raw100", lambda: measure_raw(db, n, 100)),
            ("genesis_p4_b100", lambda: measure_genesis(db, n, "genesis-consume --parallel 4 --batch-size 100",
                                                        GENESIS_P4_B100)),
            # the same command in one process (by default it runs one per usable core: processes.py)
            ("genesis_p4_b100_one", lambda: measure_genesis(db, n, "genesis-consume -p 4 -b 100 --processes 1",
                                                            [*GENESIS_P4_B100, *ONE_PROCESS])),
            ("raw10", lambda: measure_raw(db, small, 10)),
            ("genesis_defaults", lambda: measure_genesis(db, small, "genesis-consume (defaults: -p 4 -b 10)", [])),
        ]
        if pgq:
            runs[3:3] = [("pgq100", lambda: measure_pgqueuer(db, n, 100))]
            runs.append(("pgq10", lambda: measure_pgqueuer(db, small, 10)))
        for r in range(1, args.rounds + 1):
            print(f"  round {r}:", flush=True)
            floor: Figures | None = None
            for key, run in runs:
                figures = run()
                if floor is None:
                    floor = figures
                report.add(key, figures, floor)

        print("  latency (genesis-consume defaults, NOTIFY wake-up on):", flush=True)
        # seconds enough for a steady state at each rate: 2,000 msgs at 200 msg/s, 10,000 at 2,000
        latencies = lat.measure_latency(db, [(200, 10), (2000, 5)], [])
        for item in latencies:
            print(f"    {item.rate:.0f} msg/s asked, {item.send_rate:.0f} sent: p50 {item.p50_ms:.1f} ms, "
                  f"p99 {item.p99_ms:.1f} ms, max {item.max_ms:.0f} ms ({item.seen}/{item.sent} seen)", flush=True)

        contended: list[lat.Latency] | None = None
        if args.dsn is None:
            print("  latency under contention (200 msg/s, genesis-consume defaults):", flush=True)
            contended = lat.measure_contention(db)
            lat.print_latency(contended, dead=True, indent="    ")
        else:
            print("  latency under contention: skipped (--dsn; it opens an idle-in-transaction session, "
                  "only ever on the bench's own server)", flush=True)

        print("  scaling (genesis-consume --parallel 4 --batch-size 100 --processes 1, processes on one queue):",
              flush=True)
        scaling: dict[int, Figures] = {}
        for processes in (1, 2, 4):
            # twice the batch-100 N: at ten thousand msg/s a smaller N is over in a second, most of it
            # the processes' staggered start-up (4 processes: 0.94x one at N = 10,000, 1.2x at 40,000)
            scaling[processes] = measure_genesis(db, 2 * n, f"{processes} process(es)",
                                                 [*GENESIS_P4_B100, *ONE_PROCESS], processes=processes)
            print(f"    {processes} process(es): {scaling[processes].rate:.0f} msg/s aggregate", flush=True)

        status: st.StatusFigures | None = None
        if args.status_runs:
            print(f"  status: generating {args.status_runs:,} runs and {args.status_runs * 10:,} archived messages",
                  flush=True)
            status = st.measure_status(db.dsn, args.status_runs, args.status_runs * 10)

        long_run: Figures | None = None
        if args.long:
            print(f"  memory: genesis-consume --parallel 4 --batch-size 100 on {RSS_TARGET_MESSAGES:,} messages",
                  flush=True)
            long_run = measure_genesis(db, RSS_TARGET_MESSAGES, "long", GENESIS_P4_B100, timeout=3600)

    print_tables(report, latencies, contended, scaling, status, long_run, n, small, pgq, time.monotonic() - began)


def print_tables(report: Report, latencies: list[lat.Latency], contended: list[lat.Latency] | None,
                 scaling: dict[int, Figures], status: st.StatusFigures | None, long_run: Figures | None,
                 n: int, small: int, pgq: str | None, elapsed: float) -> None:
    rows = [("raw100", "raw pgmq, read 100, 4 threads, 1 tx/batch", n),
            ("raw10", "raw pgmq, batch 10", small),
            ("genesis_p4_b100", "genesis-consume -p 4 -b 100, real rules", n),
            ("genesis_p4_b100_one", "  the same, one process (--processes 1)", n),
            ("genesis_defaults", "genesis-consume defaults, real rules", small),
            ("pgq100", f"PgQueuer {pgq}, batch 100, no-op", n),
            ("pgq10", f"PgQueuer {pgq}, batch 10, no-op", small)]
    print(f"\nthroughput: medians of {len(report.ratios.get('raw100', []))} rounds; ratio = median of each round's "
          "rate / that round's raw floor")
    print(f"  {'pipeline':<44} {'N':>7} {'msg/s':>7} {'ratio':>6} {'commits/msg':>11} {'WAL B/msg':>9} "
          f"{'dead/msg':>8} {'peak RSS':>9} {'CPU us/msg':>12}")
    for key, label, size in rows:
        if key not in report.rounds:
            if key.startswith("pgq"):
                print(f"  {label.split(',')[0] + ' ' + label.split(',')[1]:<44} not installed (pip install '.[bench]')")
            continue
        rss = [f.peak_rss_mb for f in report.rounds[key] if f.peak_rss_mb is not None]
        cpu = report.cpu_us(key)
        print(f"  {label:<44} {size:>7} {report.rate(key):7.0f} {report.ratio(key):5.2f}x "
              f"{report.per_message(key, 'commits'):11.2f} {report.per_message(key, 'wal_bytes'):9.0f} "
              f"{report.per_message(key, 'dead_tuples'):8.2f} {(f'{median(rss):.0f} MiB' if rss else '-'):>9} "
              f"{(f'{cpu[0]:.0f} + {cpu[1]:.0f}' if cpu else '-'):>12}")
    startup = median([f.wall_s - f.seconds for f in report.rounds.get("genesis_p4_b100", [])])
    print(f"  (genesis-consume's rate is over its first to last completion transaction; start-up and exit "
          f"added {startup:.1f} s per run)")
    print("  (CPU us/msg: the pipeline's own process + the rest of the machine, PostgreSQL's backends mostly;"
          " genesis-consume's\n   from 10% to 95% of its messages, the others over the whole drain)")

    print("\nlatency, pgmq.send -> result committed (seen by a LISTENing session), genesis-consume defaults:")
    for item in latencies:
        print(f"  {item.rate:>5.0f} msg/s ({item.send_rate:.0f} achieved, {item.sent} msgs): p50 {item.p50_ms:7.1f} ms"
              f"  p99 {item.p99_ms:8.1f} ms  max {item.max_ms:8.0f} ms")
    if contended:
        print("\nthe same under contention on the database (dead/msg: updates + deletes over the consumer's run):")
        lat.print_latency(contended, dead=True)
    print(f"\nscaling, genesis-consume -p 4 -b 100 --processes 1 in each process, N = {2 * n:,} on one queue:")
    for processes, figures in scaling.items():
        print(f"  {processes} process(es): {figures.rate:7.0f} msg/s aggregate  "
              f"({figures.rate / scaling[1].rate:.2f}x one process)")

    if status:
        st.print_status(status)

    growth = long_run.rss_growth_mb if long_run else report.rounds["genesis_p4_b100"][-1].rss_growth_mb
    growth_n = long_run.messages if long_run else n
    print("\ntargets (issue 9), this run:")
    targets: list[tuple[str, str, bool | None]] = []
    ratio = report.ratio("genesis_p4_b100")
    targets.append(("real rules -p 4 -b 100 >= 0.8x raw pgmq floor", f"{ratio:.2f}x", ratio >= 0.8))
    vs = report.pair_ratio("genesis_p4_b100", "pgq100") if pgq else None
    targets.append(("real rules -p 4 -b 100 >= PgQueuer batch 100",
                    "PgQueuer not installed" if vs is None else f"{vs:.2f}x PgQueuer", None if vs is None else vs >= 1))
    # the target's command runs one process per usable core by default: what one process does
    ratio1 = report.ratio("genesis_p4_b100_one")
    vs1 = report.pair_ratio("genesis_p4_b100_one", "pgq100") if pgq else None
    targets.append(("  (the same in one process, --processes 1: not a target)",
                    f"{ratio1:.2f}x floor" + ("" if vs1 is None else f", {vs1:.2f}x PgQueuer"), None))
    vs10 = report.pair_ratio("genesis_defaults", "pgq10") if pgq else None
    targets.append(("defaults >= PgQueuer batch 10",
                    "PgQueuer not installed" if vs10 is None else f"{vs10:.2f}x PgQueuer",
                    None if vs10 is None else vs10 >= 1))
    by_rate = {round(item.rate): item for item in latencies}
    if 200 in by_rate:
        item = by_rate[200]
        targets.append(("p50 <= 5 ms at 200 msg/s", f"{item.p50_ms:.1f} ms", item.p50_ms <= 5))
        targets.append(("p99 <= 25 ms at 200 msg/s", f"{item.p99_ms:.1f} ms", item.p99_ms <= 25))
    if 2000 in by_rate:
        item = by_rate[2000]
        targets.append(("p99 <= 50 ms at 2,000 msg/s", f"{item.p99_ms:.1f} ms", item.p99_ms <= 50))
    if growth is None:
        targets.append(("RSS growth <= 10 MB over 200,000 messages", "not sampled", None))
    elif long_run:
        targets.append(("RSS growth <= 10 MB over 200,000 messages", f"{growth:+.1f} MiB", growth <= 10))
    else:
        targets.append(("RSS growth <= 10 MB over 200,000 messages",
                        f"{growth:+.1f} MiB over {growth_n:,} (--long for 200,000)", None))
    dead = report.per_message("genesis_p4_b100", "dead_tuples")
    floor_dead = report.per_message("raw100", "dead_tuples")
    targets.append(("dead tuples/msg <= pgmq's own (no idle-in-tx session here)",
                    f"{dead:.2f} vs {floor_dead:.2f}", dead <= floor_dead + 0.01))
    if contended is None:
        targets.append(("pickup p99 <= 100 ms under contention", "skipped with --dsn", None))
    else:
        targets += lat.contention_targets(contended, floor_dead, "raw pgmq, this run")
    four = scaling[4].rate / scaling[1].rate
    targets.append(("4 processes >= 1 process, aggregate", f"{four:.2f}x", four >= 1))
    if status:
        slowest = max(status.status_ms, status.queue_health_ms)
        targets.append((f"status and queue_health < 50 ms at {status.runs:,} runs, {status.archived:,} archived",
                        f"{status.status_ms:.0f} / {status.queue_health_ms:.0f} ms", slowest < 50))
    for name, figure, met in targets:
        print(f"  {name:<58} {figure:<42} {verdict(met)}")
    print(f"\n(make bench took {elapsed / 60:.1f} min)")


if __name__ == "__main__":
    main()
