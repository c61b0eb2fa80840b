"""`make bench`: messages per second through the raw pgmq pipeline and through genesis-consume's loop,
measured in one run on the same database, so the ratio means something on a noisy machine.

raw:       read 100 -> 4 threads run a no-op -> send the results + archive, one transaction per batch
per-msg:   the same work with one transaction per message (what to avoid)
consumer:  genesis_pgflow's Consumer (validation, dispatch, envelopes, run records) with a no-op handler
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from genesis_pgflow.consumer import Consumer, ConsumerOptions
from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.store import schema
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.queue import PgQueueStore

Q, RESULTS = "genesis_rule_updates", "genesis_rule_updates_results"


def body(i: int) -> dict:
    return {"type": "genesis_rule_update", "namespace": "bench", "rule_id": f"r{i}", "confidence": 0.9,
            "rule": {"n": i}}


def fill(dsn: str, n: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"TRUNCATE pgmq.q_{Q}, pgmq.q_{RESULTS}, pgmq.a_{Q}, genesis.workflow_runs")
        for start in range(0, n, 1000):
            conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])",
                         (Q, [Jsonb(body(i)) for i in range(start, min(n, start + 1000))]))
        conn.execute("VACUUM ANALYZE")


def noop(message: dict) -> dict:
    return {"status": "applied", "rule_id": message.get("rule_id")}


def raw_pipeline(dsn: str, per_message: bool) -> int:
    done = 0
    with psycopg.connect(dsn) as conn, ThreadPoolExecutor(4) as pool:
        while True:
            with conn.transaction():
                rows = conn.execute("SELECT msg_id, message FROM pgmq.read(%s, 30, 100)", (Q,)).fetchall()
            if not rows:
                return done
            outputs = list(pool.map(noop, [m for _, m in rows]))
            if per_message:
                for (msg_id, _), out in zip(rows, outputs, strict=True):
                    with conn.transaction():
                        conn.execute("SELECT pgmq.send(%s, %s)", (RESULTS, Jsonb(out)))
                        conn.execute("SELECT pgmq.archive(%s, %s::bigint)", (Q, msg_id))
            else:
                with conn.transaction():
                    conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])", (RESULTS, [Jsonb(o) for o in outputs]))
                    conn.execute("SELECT pgmq.archive(%s, %s::bigint[])", (Q, [m for m, _ in rows]))
            done += len(rows)


class NoOp:
    payload_type = "genesis_rule_update"

    def __call__(self, payload, ctx):
        return {"status": "applied", "rule_id": payload.rule_id}


def consumer_pipeline(dsn: str, parallel: int, batch_size: int) -> int:
    db = Database(dsn, max_size=parallel + 2).open()
    store = PgQueueStore(db, "bench:1")
    dispatcher = Dispatcher({"genesis_rule_update": NoOp()}, timeout_s=30, max_attempts=3,
                            retry_base_s=1, retry_max_s=10)
    consumer = Consumer(store, dispatcher, ConsumerOptions(queues=(Q,), parallel=parallel, batch_size=batch_size,
                                                           poll_interval_s=0.05, drain=True))
    consumer.run()
    store.close()
    db.close()
    return consumer.stats.outcomes["completed"]


def measure(name: str, dsn: str, n: int, fn) -> float:
    fill(dsn, n)
    start = time.perf_counter()
    done = fn()
    elapsed = time.perf_counter() - start
    rate = done / elapsed
    print(f"  {name:<44} {done:>7} msgs  {elapsed:7.2f} s  {rate:9.0f} msg/s")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default=os.environ.get("GENESIS_BENCH_DATABASE_URL",
                                                        "host=127.0.0.1 port=5432 user=postgres dbname=postgres"))
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()

    name = f"genesis_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(args.dsn, dbname=name)
    try:
        schema.upgrade(dsn)
        n = args.messages
        print(f"throughput, {n} rule updates, no-op handler, {os.cpu_count()} cores, one run:")
        raw = measure("raw pgmq: read 100, 4 threads, 1 tx/batch", dsn, n, lambda: raw_pipeline(dsn, False))
        per = measure("raw pgmq: 1 tx per message", dsn, max(2000, n // 10), lambda: raw_pipeline(dsn, True))
        figures = {"raw_batch": raw, "raw_per_message": per}
        for parallel, batch in ((4, 10), (4, 100), (16, 100)):
            label = f"genesis consumer --parallel {parallel} --batch-size {batch}"
            figures[f"consumer_p{parallel}_b{batch}"] = measure(
                label, dsn, n, lambda p=parallel, b=batch: consumer_pipeline(dsn, p, b))
        print("ratios to the raw batched pipeline (same run):")
        for key, rate in figures.items():
            print(f"  {key:<28} {rate / raw:6.2f}x")
        print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        print(json.dumps({k: round(v) for k, v in figures.items()}))
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
