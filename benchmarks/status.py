"""`genesis status` and genesis.queue_health against a long history (issue 9, item 4): 1M runs and
10M archived messages generated in the bench database, then each read five times; the median is
printed beside the time of the counts they replaced (a count over all of history), measured on
the same rows in the same run.

    python -m benchmarks.status [--dsn DSN] [--runs 1000000] [--archived 10000000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from genesis_pgflow.messages import QUEUES
from genesis_pgflow.store.admin import PgAdminStore
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.tallies import compact

QUEUE_NAMES = list(QUEUES)
TYPES = [kind for kind, _results in QUEUES.values()]
REPEATS = 5


@dataclass(frozen=True)
class StatusFigures:
    runs: int
    archived: int
    status_ms: float           # PgAdminStore.status(): what `genesis status --json` prints, without process start
    queue_health_ms: float     # SELECT * FROM genesis.queue_health
    history_count_ms: float    # the counts of before: runs grouped over all history, plus count(*) of each archive


def fill(dsn: str, runs: int, archived: int) -> None:
    """Generated rows, as a consumer would have left them (10% failed), spread over weeks."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("""
            INSERT INTO genesis.workflow_runs (queue, msg_id, workflow_id, type, status, attempts, enqueued_at,
                                               started_at, finished_at, updated_at, consumer, error, result)
            SELECT (%(queues)s::text[])[1 + i %% 4], 1000000000 + i, gen_random_uuid(), (%(types)s::text[])[1 + i %% 4],
                   CASE WHEN i %% 10 = 0 THEN 'failed' ELSE 'completed' END, 1,
                   now() - make_interval(secs => i * 3), now() - make_interval(secs => i * 3),
                   now() - make_interval(secs => i * 3) + interval '20 ms', now(), 'bench',
                   CASE WHEN i %% 10 = 0 THEN '{"code": "invalid_payload", "message": "generated"}'::jsonb END,
                   '{"status": "applied"}'::jsonb
            FROM generate_series(1, %(n)s) AS i""", {"queues": QUEUE_NAMES, "types": TYPES, "n": runs})
        per_queue = archived // len(QUEUE_NAMES)
        for queue in QUEUE_NAMES:
            conn.execute(f"""
                INSERT INTO pgmq.a_{queue} (msg_id, read_ct, enqueued_at, archived_at, vt, message)
                SELECT 1000000000 + i, 1, now() - make_interval(secs => i), now() - make_interval(secs => i), now(),
                       '{{"type": "generated"}}'::jsonb
                FROM generate_series(1, %(n)s) AS i""", {"n": per_queue})
        conn.execute("VACUUM ANALYZE genesis.workflow_runs")
        for queue in QUEUE_NAMES:
            conn.execute(f"VACUUM ANALYZE pgmq.a_{queue}")


def _median_ms(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure_status(dsn: str, runs: int, archived: int) -> StatusFigures:
    fill(dsn, runs, archived)
    with Database(dsn, max_size=2).open() as db:
        # what the consumers' tally job does every few seconds (once here, over all of the fill)
        while compact(db).folded is None:
            time.sleep(0.1)
        store = PgAdminStore(db)
        status_ms = _median_ms(store.status)
    with psycopg.connect(dsn, autocommit=True) as conn:
        health_ms = _median_ms(lambda: conn.execute("SELECT * FROM genesis.queue_health").fetchall())

        def history() -> None:
            conn.execute("SELECT queue, type, status, count(*) FROM genesis.workflow_runs GROUP BY 1, 2, 3").fetchall()
            for queue in QUEUE_NAMES:
                conn.execute(f"SELECT count(*) FROM pgmq.a_{queue}").fetchall()
        history_ms = _median_ms(history)
    return StatusFigures(runs, archived, status_ms, health_ms, history_ms)


def main() -> None:
    from benchmarks.run import bench_database

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="a server to create the bench database on (default: a throwaway server)")
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--archived", type=int, default=10_000_000)
    args = parser.parse_args()
    with bench_database(args.dsn) as (db, where):
        print(f"status at scale: {where}")
        figures = measure_status(db.dsn, args.runs, args.archived)
    print_status(figures)


def print_status(f: StatusFigures) -> None:
    print(f"\nstatus with {f.runs:,} runs and {f.archived:,} archived messages (median of {REPEATS}):")
    print(f"  genesis status (the store's query, no process start) {f.status_ms:8.1f} ms")
    print(f"  SELECT * FROM genesis.queue_health                    {f.queue_health_ms:8.1f} ms")
    print(f"  the counts over all history they replaced             {f.history_count_ms:8.1f} ms")


if __name__ == "__main__":
    main()
