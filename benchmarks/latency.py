"""Latency from pgmq.send to the result being committed, at a steady send rate, through a running genesis-consume.

Method. The producer is a procedure the bench creates in its own database (schema `bench`): each
message is sent when it falls due (a steady rate), one transaction per send (COMMIT in the loop,
synchronous_commit off for the producer's session only); when the producer falls behind, the
messages due by then go together in one send_batch. Each carries `sent_at`, the server's
clock_timestamp() just before its send (an extra field, which the consumer ignores). Server-side,
because a Python producer beside the consumer on two busy cores could not hold 2,000 msg/s.
The consumer is the real CLI with its defaults (NOTIFY wake-up on: the request queue's trigger;
polling every 1 s otherwise). Commit time is observed, not inferred: for the duration of the run
the bench puts a statement-level trigger on the result queue that NOTIFYs the range of result ids
each statement inserted. PostgreSQL delivers a NOTIFY only when its transaction commits, so an
observer session LISTENing on it wakes at each completion commit, reads the results in that range
(with their requests' `sent_at`, from the archive written in the same transaction) and stamps them
with the wall clock when its read returned: an upper bound on the commit time, by one small query.
By range, not "every result past the last one seen": the consumer's processes commit in their own
order, so a result can commit after one with a higher id (the last-seen mark skipped such results).
The envelope's `finished_at` and pgmq's `enqueued_at` are not used: both are taken before the
commit. Both clocks are the host's realtime clock.

Under contention (benchmarks/contention.py: an idle-in-transaction session, or analytic readers
holding the xmin horizon back) the same measurement runs with those sessions open on the database
from before the consumer starts until its results are all seen; then also dead tuples per message
(updates + deletes of every table over the consumer's run, as the throughput rows count them).
Alone, always on a throwaway server of the bench's own (never a shared one: see contention.py):

    python -m benchmarks.latency [--contention] [--rate 200] [--seconds 10] [-- GENESIS-CONSUME FLAGS]
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from benchmarks import contention as ct
from benchmarks.pipelines import RESULTS, BenchDatabase, Q, reap, start_consumer

CHANNEL = "bench_results_committed"
# issue 9's targets under contention, at 200 msg/s; pgmq's own dead tuples per message: a read's
# update and an archive's delete
CONTENTION_P99_MS = 100.0
PGMQ_DEAD_PER_MSG = 2.0


@dataclass
class Latency:
    rate: float             # asked for, msg/s
    sent: int
    send_rate: float        # achieved by the producer
    seen: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    contention: str | None = None
    dead_per_msg: float = float("nan")     # over the consumer's whole run (every phase, warm-up included)


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
$$;
CREATE OR REPLACE FUNCTION bench.notify_results() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_results_committed', min(msg_id) || ',' || max(msg_id)) FROM inserted HAVING count(*) > 0;
    RETURN NULL;
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
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'LISTEN "{CHANNEL}"')
            self.ready.set()
            while not self.stop.is_set():
                # the generator holds the connection: the ranges first, then the reads
                ranges = [notify.payload.split(",") for notify in conn.notifies(timeout=0.2, stop_after=1)]
                for low, high in ranges:
                    rows = conn.execute(f"SELECT a.msg_id, (a.message ->> 'sent_at')::float8 "
                                        f"FROM pgmq.q_{RESULTS} r JOIN pgmq.a_{Q} a "
                                        "ON a.msg_id = (r.message -> 'request' ->> 'msg_id')::bigint "
                                        "WHERE r.msg_id BETWEEN %s AND %s", (int(low), int(high))).fetchall()
                    now = time.time()
                    with self.lock:
                        for request_id, sent_at in rows:
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
                    drain_timeout: float = 180.0, contention: str | None = None) -> list[Latency]:
    """One consumer process; for each (rate msg/s, seconds) phase a steady send, then a wait until
    every result of the phase is seen (so phases do not overlap). contention: a kind of
    contention.KINDS, held from before the consumer starts until it has stopped."""
    db.reset()
    db.execute(PRODUCE)
    db.execute(f"CREATE TRIGGER bench_commit_seen AFTER INSERT ON pgmq.q_{RESULTS} REFERENCING NEW TABLE AS inserted "
               "FOR EACH STATEMENT EXECUTE FUNCTION bench.notify_results()")
    db.settle()
    try:
        with ct.holding(db, contention):
            # dead tuples counted once every session that wrote has ended (its statistics
            # reported); the contention's sessions only read
            db.wait_idle(spare_application=ct.APPLICATION)
            dead_before = db.dead_tuples()
            results, sent = _run_phases(db, phases, consumer_args, drain_timeout)
            db.wait_idle(spare_application=ct.APPLICATION)
            dead = db.dead_tuples() - dead_before
    finally:
        db.execute(f"DROP TRIGGER bench_commit_seen ON pgmq.q_{RESULTS}")
    for item in results:
        item.contention = contention
        item.dead_per_msg = dead / sent if sent else float("nan")
    return results


def _run_phases(db: BenchDatabase, phases: list[tuple[float, float]], consumer_args: list[str],
                drain_timeout: float) -> tuple[list[Latency], int]:
    """The phases through one consumer, with the warm-up before them; the Latency of each phase
    and the count of messages sent in all."""
    observer = CommitObserver(db.dsn)
    observer.start()
    observer.ready.wait(10)
    results: list[Latency] = []
    sent = 0
    with tempfile.TemporaryDirectory(prefix="genesis-bench-latency-") as tmp:
        home = Path(tmp)
        proc = start_consumer(db.dsn, home, consumer_args, home / "consumer.log")
        try:
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                conn.execute("SET synchronous_commit = off")
                # warm-up: the consumer has started, connected and read once when these come back
                warm, _ = _produce(conn, 20, 0.5, 10_000_000)
                sent += len(warm)
                if len(_wait_seen(observer, warm, 60)) < len(warm):
                    raise RuntimeError("latency: the consumer answered no warm-up message in 60 s\n"
                                       + (home / "consumer.log").read_text(errors="replace")[-3000:])
                first = 0
                for rate, seconds in phases:
                    ids, send_rate = _produce(conn, rate, seconds, first)
                    first += len(ids)
                    sent += len(ids)
                    lat = _wait_seen(observer, ids, drain_timeout)
                    results.append(Latency(rate, len(ids), send_rate, len(lat), percentile(lat, 50),
                                           percentile(lat, 99), max(lat, default=float("nan"))))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                reap(proc, 60)
            finally:
                observer.stop.set()
                observer.join()
    return results, sent


def measure_contention(db: BenchDatabase, rate: float = 200.0, seconds: float = 30.0,
                       consumer_args: list[str] | None = None) -> list[Latency]:
    """The steady rate beside each kind of contention.KINDS in turn, one consumer run each (defaults).
    30 s, not a few: the dead rows an idle transaction keeps pile up, so a short run understates it."""
    return [measure_latency(db, [(rate, seconds)], consumer_args or [], contention=kind)[0] for kind in ct.KINDS]


def print_latency(items: list[Latency], dead: bool = False, indent: str = "  ") -> None:
    for item in items:
        where = f"{item.contention:<20} " if item.contention else ""
        print(f"{indent}{where}{item.rate:>5.0f} msg/s ({item.send_rate:.0f} achieved, {item.sent} msgs): "
              f"p50 {item.p50_ms:7.1f} ms  p99 {item.p99_ms:8.1f} ms  max {item.max_ms:8.0f} ms"
              + (f"  dead/msg {item.dead_per_msg:.2f}" if dead else "")
              + ("" if item.seen == item.sent else f"  ({item.sent - item.seen} never seen)"))


def contention_targets(items: list[Latency], floor_dead: float,
                       floor_name: str) -> list[tuple[str, str, bool | None]]:
    """Issue 9's rows under contention: pickup p99 (every message seen) and dead tuples per message
    against pgmq's own (floor_dead, measured in the same run where there is one)."""
    targets: list[tuple[str, str, bool | None]] = []
    for item in items:
        unseen = item.sent - item.seen
        targets.append((f"pickup p99 <= {CONTENTION_P99_MS:.0f} ms at {item.rate:.0f} msg/s, {item.contention}",
                        f"{item.p99_ms:.1f} ms" + (f", {unseen} unseen" if unseen else ""),
                        item.p99_ms <= CONTENTION_P99_MS and not unseen))
    for item in items:
        targets.append((f"dead tuples/msg <= pgmq's own, {item.contention}",
                        f"{item.dead_per_msg:.2f} vs {floor_dead:.2f} ({floor_name})",
                        item.dead_per_msg <= floor_dead + 0.01))
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contention", action="store_true",
                        help="also beside an idle-in-transaction session and beside 2 analytic readers")
    parser.add_argument("--rate", type=float, default=200.0, help="msg/s, steady (default 200)")
    parser.add_argument("--seconds", type=float, default=30.0, help="of steady sending per run (default 30)")
    parser.add_argument("consumer", nargs="*", metavar="FLAG",
                        help="genesis-consume flags, after -- (e.g. -- --processes 1; default: none, its defaults)")
    args = parser.parse_args()
    # run.py imports this module: its server set-up and verdicts are imported here, when run alone
    from benchmarks.run import bench_database, verdict

    with bench_database(None) as (db, where):
        print(f"latency: {where}, genesis-consume defaults, NOTIFY wake-up on", flush=True)
        items = measure_latency(db, [(args.rate, args.seconds)], args.consumer)
        if args.contention:
            items += measure_contention(db, args.rate, args.seconds, args.consumer)
    print("\nlatency, pgmq.send -> result committed (seen by a LISTENing session); dead/msg over each consumer run:")
    print_latency(items, dead=True)
    if args.contention:
        print("\ntargets (issue 9), this run:")
        for name, figure, met in contention_targets(items[1:], PGMQ_DEAD_PER_MSG, "pgmq: read + archive"):
            print(f"  {name:<58} {figure:<42} {verdict(met)}")


if __name__ == "__main__":
    main()
