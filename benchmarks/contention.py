"""Sessions that hold the database's xmin horizon back while the latency bench runs (issue 9's contention rows).

Two kinds, each a context manager that opens its sessions on entry and closes every one on exit,
also when the measurement inside fails:

- an idle-in-transaction session: `BEGIN ISOLATION LEVEL REPEATABLE READ`, one read of the
  request queue (its snapshot taken), then idle for the whole measurement;
- analytic readers: sessions that loop a repeatable-read transaction of one full scan of the
  request queue's archive (pre-filled with history, so a scan is long-ish) and then keep that
  snapshot for a while, as a report that reads several times under one snapshot would. Two of
  them, staggered, keep the horizon held back for seconds at a time, moving now and then.

On a 2-core machine the readers' scans (about 0.2 s each) cost the consumer more than the horizon
they hold: readers over an empty archive hold it the same way and leave p99 near the idle
session's. The row is a realistic neighbour, not the horizon alone.

While either holds its snapshot, no dead row the consumer leaves behind (a read's lease update,
an archive's delete) can be pruned or vacuumed away, so every read of the queue walks past them.
Only ever on the bench's throwaway server: an idle-in-transaction session on a shared server
holds back everyone's cleanup.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import psycopg
from psycopg import IsolationLevel

from benchmarks.pipelines import BenchDatabase, Q

APPLICATION = "genesis-bench-contention"
# the archive's history for the analytic readers: ids far above any the bench sends
HISTORY_FIRST_ID = 1_000_000_000

FILL_ARCHIVE = f"""
INSERT INTO pgmq.a_{Q} (msg_id, read_ct, enqueued_at, archived_at, vt, message)
SELECT %(first)s + i, 1, now(), now(), now(),
       jsonb_build_object('type', 'genesis_rule_update', 'namespace', 'history', 'rule_id', 'h' || i,
                          'version', 1, 'confidence', 0.9,
                          'rule', jsonb_build_object('when', 'event ' || i, 'then', 'notify'))
FROM generate_series(1, %(rows)s) AS i
"""
SCAN_ARCHIVE = f"SELECT count(*), sum(length(message::text)) FROM pgmq.a_{Q}"


def _connect(db: BenchDatabase) -> psycopg.Connection:
    conn = psycopg.connect(db.dsn, application_name=APPLICATION)
    conn.isolation_level = IsolationLevel.REPEATABLE_READ
    return conn


@contextmanager
def idle_in_transaction(db: BenchDatabase) -> Iterator[None]:
    """One session idle in a repeatable-read transaction that has read the request queue."""
    with _connect(db) as conn:
        conn.execute(f"SELECT 1 FROM pgmq.q_{Q} LIMIT 1")      # psycopg's BEGIN comes first: the snapshot
        try:
            yield
            _require_held(db, 1)
        finally:
            conn.rollback()


class AnalyticReader(threading.Thread):
    """Loops: a repeatable-read transaction that scans the archive, then keeps its snapshot hold_s."""

    def __init__(self, db: BenchDatabase, hold_s: float, delay_s: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.db, self.hold_s, self.delay_s, self.stop = db, hold_s, delay_s, stop
        self.scans = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.stop.wait(self.delay_s):
                return
            with _connect(self.db) as conn:
                while not self.stop.is_set():
                    with conn.transaction():
                        conn.execute(SCAN_ARCHIVE).fetchone()
                        self.scans += 1
                        self.stop.wait(self.hold_s)
        except BaseException as exc:        # reported by analytic_readers, not lost in a thread
            self.error = exc


@contextmanager
def analytic_readers(db: BenchDatabase, sessions: int = 2, history: int = 200_000,
                     hold_s: float = 2.0) -> Iterator[None]:
    """`sessions` AnalyticReaders over an archive pre-filled with `history` rows, staggered evenly."""
    db.execute(FILL_ARCHIVE, {"first": HISTORY_FIRST_ID, "rows": history})
    db.settle()
    stop = threading.Event()
    readers = [AnalyticReader(db, hold_s, i * hold_s / sessions, stop) for i in range(sessions)]
    for reader in readers:
        reader.start()
    try:
        yield
        _require_held(db, 1)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    failed = [r.error for r in readers if r.error is not None]
    if failed:
        raise RuntimeError(f"an analytic reader failed: {failed[0]!r}")
    if not all(r.scans for r in readers):
        raise RuntimeError("an analytic reader never finished a scan: no contention was measured")


def _require_held(db: BenchDatabase, at_least: int) -> None:
    """The contention was there at the end: its sessions still hold a snapshot (none timed out or was killed)."""
    rows = db.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND application_name = %s AND backend_xmin IS NOT NULL", (APPLICATION,))
    if rows[0][0] < at_least:
        raise RuntimeError(f"contention: fewer than {at_least} session(s) of {APPLICATION} hold a snapshot")


KINDS: dict[str, Callable[[BenchDatabase], AbstractContextManager[None]]] = {
    "idle in transaction": idle_in_transaction,
    "2 analytic readers": analytic_readers,
}


def holding(db: BenchDatabase, kind: str | None) -> AbstractContextManager[None]:
    """The contention of that kind, or none."""
    return KINDS[kind](db) if kind else nullcontext()
