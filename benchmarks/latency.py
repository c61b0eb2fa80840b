"""Latency from pgmq.send to the result being committed, at a steady send rate, through a running genesis-consume.

Method. The producer is a procedure the bench creates in its own database (schema `bench`): each
message is sent when it falls due (a steady rate), one transaction per send (COMMIT in the loop,
synchronous_commit off for the producer's session only); when the producer falls behind, the
messages due by then go together in one send_batch. Each carries `sent_at`, the server's
clock_timestamp() just before its send (an extra field, which the consumer ignores). Server-side,
because a Python producer beside the consumer on two busy cores could not hold 2,000 msg/s.
The consumer is the real CLI with its defaults (NOTIFY wake-up on: the request queue's trigger;
polling every 1 s otherwise). Commit time is observed, not inferred: for the duration of the run
the bench puts a statement-level trigger on the result queue that NOTIFYs (the project's own
wake-up function, genesis.notify_queue_insert). PostgreSQL delivers a NOTIFY only when its
transaction commits, so an observer session LISTENing on it wakes at each completion commit,
reads the results it has not seen yet (with their requests' `sent_at`, from the archive written in
the same transaction) and stamps them with the wall clock when its read returned: an upper bound
on the commit time, by one small query. The envelope's `finished_at` and pgmq's `enqueued_at` are
not used: both are taken before the commit. Both clocks are the host's realtime clock.
"""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from benchmarks.pipelines import RESULTS, BenchDatabase, Q, reap, start_consumer

CHANNEL = f"pgmq.q_{RESULTS}.INSERT"


@dataclass
class Latency:
    rate: float             # asked for, msg/s
    sent: int
    send_rate: float        # achieved by the producer
    seen: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


PRODUCE = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE OR REPLACE PROCEDURE bench.produce(rate float8, seconds float8, first int) LANGUAGE plpgsql AS $$
DECLARE
    start timestamptz := clock_timestamp();
    total int := (rate * seconds)::int;
    sent int := 0;
    due int;
BEGIN
    WHILE sent < total LOOP
        due := least(total, floor(extract(epoch FROM clock_timestamp() - start) * rate)::int + 1);
        IF due > sent THEN
            PERFORM pgmq.send_batch('genesis_rule_updates', ARRAY(
                SELECT jsonb_build_object('type', 'genesis_rule_update', 'namespace', 'bench', 'rule_id', 'r' || i,
                                          'version', 1, 'confidence', 0.9,
                                          'rule', jsonb_build_object('when', 'event ' || i, 'then', 'notify'),
                                          'sent_at', extract(epoch FROM clock_timestamp()))
                FROM generate_series(first + sent, first + due - 1) AS i ORDER BY i));
            COMMIT;
            sent := due;
        ELSE
            PERFORM pg_sleep(extract(epoch FROM start + make_interval(secs => sent / rate) - clock_timestamp()));
        END IF;
    END LOOP;
END
$$
"""


class CommitObserver(threading.Thread):
    """Stamps each result, by its request's msg_id, with the latency from its send to the moment a
    LISTENing session first saw it committed."""

    def __init__(self, dsn: str):
        super().__init__(daemon=True)
        self.dsn = dsn
        self.latency_ms: dict[int, float] = {}
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        last = 0
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'LISTEN "{CHANNEL}"')
            self.ready.set()
            while not self.stop.is_set():
                for _ in conn.notifies(timeout=0.2, stop_after=1):
                    pass
                rows = conn.execute(f"SELECT r.msg_id, a.msg_id, (a.message ->> 'sent_at')::float8 "
                                    f"FROM pgmq.q_{RESULTS} r JOIN pgmq.a_{Q} a "
                                    "ON a.msg_id = (r.message -> 'request' ->> 'msg_id')::bigint "
                                    "WHERE r.msg_id > %s ORDER BY r.msg_id", (last,)).fetchall()
                now = time.time()
                if rows:
                    last = rows[-1][0]
                    with self.lock:
                        for _, request_id, sent_at in rows:
                            self.latency_ms.setdefault(request_id, (now - sent_at) * 1000)

    def latencies(self, ids: range) -> list[float]:
        with self.lock:
            return [self.latency_ms[i] for i in ids if i in self.latency_ms]


def _last_id(conn: psycopg.Connection) -> int:
    row = conn.execute(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM pgmq.q_{Q}_msg_id_seq").fetchone()
    assert row is not None
    return int(row[0])


def _produce(conn: psycopg.Connection, rate: float, seconds: float, first: int) -> tuple[range, float]:
    """Send at a steady rate; the msg ids sent (one session, so consecutive) and the rate achieved."""
    before = _last_id(conn)
    start = time.perf_counter()
    conn.execute("CALL bench.produce(%s, %s, %s)", (rate, seconds, first))
    elapsed = time.perf_counter() - start
    after = _last_id(conn)
    return range(before + 1, after + 1), (after - before) / elapsed


def _wait_seen(observer: CommitObserver, ids: range, timeout: float) -> list[float]:
    deadline = time.monotonic() + timeout
    while len(seen := observer.latencies(ids)) < len(ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


def measure_latency(db: BenchDatabase, phases: list[tuple[float, float]], consumer_args: list[str],
                    drain_timeout: float = 180.0) -> list[Latency]:
    """One consumer process; for each (rate msg/s, seconds) phase a steady send, then a wait until
    every result of the phase is seen (so phases do not overlap)."""
    db.reset()
    db.execute(PRODUCE)
    db.execute(f"CREATE TRIGGER bench_commit_seen AFTER INSERT ON pgmq.q_{RESULTS} "
               "FOR EACH STATEMENT EXECUTE FUNCTION genesis.notify_queue_insert()")
    db.settle()
    observer = CommitObserver(db.dsn)
    observer.start()
    observer.ready.wait(10)
    results: list[Latency] = []
    with tempfile.TemporaryDirectory(prefix="genesis-bench-latency-") as tmp:
        home = Path(tmp)
        proc = start_consumer(db.dsn, home, consumer_args, home / "consumer.log")
        try:
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                conn.execute("SET synchronous_commit = off")
                # warm-up: the consumer has started, connected and read once when these come back
                warm, _ = _produce(conn, 20, 0.5, 10_000_000)
                if len(_wait_seen(observer, warm, 60)) < len(warm):
                    raise RuntimeError("latency: the consumer answered no warm-up message in 60 s\n"
                                       + (home / "consumer.log").read_text(errors="replace")[-3000:])
                first = 0
                for rate, seconds in phases:
                    ids, send_rate = _produce(conn, rate, seconds, first)
                    first += len(ids)
                    lat = _wait_seen(observer, ids, drain_timeout)
                    results.append(Latency(rate, len(ids), send_rate, len(lat), percentile(lat, 50),
                                           percentile(lat, 99), max(lat, default=float("nan"))))
        finally:
            proc.send_signal(signal.SIGTERM)
            reap(proc, 60)
            observer.stop.set()
            observer.join()
            db.execute(f"DROP TRIGGER bench_commit_seen ON pgmq.q_{RESULTS}")
    return results
