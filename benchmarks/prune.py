"""`python -m benchmarks.prune [--rows N]`: how fast `genesis prune` deletes, and whether it keeps a
database that has seen N requests small, on a throwaway database of the server given.

It fills one request queue's archive and genesis.workflow_runs with N backdated rows each (what N
requests leave behind) and N/10 unread results, prunes them (rows/s), runs a plain VACUUM (what
autovacuum does), then fills the same tables with N fresh rows again: pruned, the tables hold one
retention window's rows instead of growing with every request ever made.
"""

from __future__ import annotations

import argparse
import time
import uuid

import psycopg
from psycopg.conninfo import make_conninfo

from genesis_pgflow.store import schema
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.retention import PgRetention, RetentionPolicy

Q, RESULTS = "genesis_rule_updates", "genesis_rule_updates_results"
TABLES = (f"pgmq.a_{Q}", "genesis.workflow_runs", f"pgmq.q_{RESULTS}")


def fill(conn: psycopg.Connection, n: int, start: int, age: str) -> None:
    conn.execute(f"""
        INSERT INTO pgmq.a_{Q} (msg_id, read_ct, enqueued_at, archived_at, vt, message)
        SELECT i, 1, now() - interval '{age}', now() - interval '{age}', now(),
               jsonb_build_object('type', 'genesis_rule_update', 'namespace', 'bench', 'rule_id', 'r' || i,
                                  'confidence', 0.9, 'rule', jsonb_build_object('deny', 'eval', 'n', i))
        FROM generate_series(%(start)s::bigint, %(end)s::bigint) AS i""", {"start": start, "end": start + n - 1})
    conn.execute(f"""
        INSERT INTO genesis.workflow_runs (queue, msg_id, workflow_id, type, status, attempts, enqueued_at,
                                           started_at, finished_at, updated_at, consumer, result)
        SELECT '{Q}', i, gen_random_uuid(), 'genesis_rule_update', 'completed', 1, now() - interval '{age}',
               now() - interval '{age}', now() - interval '{age}', now() - interval '{age}', 'bench:1',
               jsonb_build_object('status', 'applied', 'rule_id', 'r' || i, 'version', 1)
        FROM generate_series(%(start)s::bigint, %(end)s::bigint) AS i""", {"start": start, "end": start + n - 1})
    conn.execute(f"""
        INSERT INTO pgmq.q_{RESULTS} (enqueued_at, vt, read_ct, message)
        SELECT now() - interval '{age}', now() - interval '{age}', 0, jsonb_build_object('status', 'completed', 'n', i)
        FROM generate_series(1, %(n)s) AS i""", {"n": n // 10})


def sizes(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT " + ", ".join(f"pg_total_relation_size('{t}')" for t in TABLES)).fetchone()
    assert row is not None
    return ", ".join(f"{t} {b / 2**20:.0f} MiB" for t, b in zip(TABLES, row, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    args = parser.parse_args()
    name = f"genesis_bench_prune_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(args.dsn, dbname=name)
    try:
        schema.upgrade(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            t0 = time.monotonic()
            fill(conn, args.rows, 10_000_000, "30 days")
            conn.execute("VACUUM ANALYZE")
            print(f"filled {args.rows:,} archived requests + {args.rows:,} runs + {args.rows // 10:,} results "
                  f"in {time.monotonic() - t0:.1f} s: {sizes(conn)}")
            with Database(dsn, max_size=2) as db:
                db.open()
                report = PgRetention(db).prune(RetentionPolicy(batch_size=args.batch_size))
            rate = report.total / max(report.seconds, 1e-3)
            print(f"pruned {report.total:,} rows in {report.seconds:.1f} s = {rate:,.0f} rows/s "
                  f"({report.batches} batches of <= {args.batch_size}): {sizes(conn)}")
            conn.execute("VACUUM")
            print(f"after a plain VACUUM: {sizes(conn)}")
            fill(conn, args.rows, 20_000_000, "1 hour")
            print(f"after {args.rows:,} more requests: {sizes(conn)} (one retention window's worth; "
                  f"unpruned, the tables would hold both)")
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
