"""Retention: deleting archived requests, finished runs and unread results older than their
configured ages, in bounded batches that never block a consumer.

    report = PgRetention(db).prune(RetentionPolicy.of(settings), dry_run=False)

What goes, each after its own age (0 keeps it forever):
- archived messages (`pgmq.a_<queue>` of every request, result and dead-letter queue) archived
  more than retention_archive_days ago (default 7);
- runs (`genesis.workflow_runs`, with the `genesis.run_errors` they met) that are completed or
  failed and finished more than retention_runs_days ago (default 30); pending and running never;
- result messages nobody read (`pgmq.q_<result queue>`, reply_to queues included) sent more than
  retention_results_days ago (default 7) and not leased by a reader at the moment.
Dead letters (`pgmq.q_<queue>_dlq`) are never deleted: each waits for an operator's decision
(`genesis dlq requeue`, or a DBA's `pgmq.delete`). Live request queues are never touched.

How it stays out of the consumers' way: each batch is one short transaction deleting at most
batch_size rows picked through an index (archived_at, finished_at, the msg_id key) with FOR UPDATE
SKIP LOCKED, under lock_timeout 1 s; DELETE takes only the ROW EXCLUSIVE table lock that the
consumer's own INSERTs and DELETEs take too, so an archive, a send or a read never waits for it.
One process at a time prunes (a session-level advisory lock); the others return at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

from psycopg import sql as pgsql

from genesis_pgflow.messages import QUEUES, all_queue_names, is_reply_queue
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.database import Conn, Database, maintenance_lock, one
from genesis_pgflow.store.queries import sql

log = logging.getLogger(__name__)

RETENTION_JOB = "retention"
DAY_S = 86_400.0
RUNS_TABLE = "genesis.workflow_runs"


@dataclass(frozen=True)
class RetentionPolicy:
    """Ages in days (0: keep forever), rows per batch, and the pause between batches."""

    archive_days: float = 7.0
    runs_days: float = 30.0
    results_days: float = 7.0
    batch_size: int = 5000
    pause_s: float = 0.02

    @classmethod
    def of(cls, settings: Settings) -> RetentionPolicy:
        return cls(settings.retention_archive_days, settings.retention_runs_days, settings.retention_results_days,
                   settings.retention_batch_size)


@dataclass
class PruneReport:
    """What one prune deleted (or, dry_run, would delete) per table; ran is False when another
    process was pruning, complete is False when the time budget ended it early."""

    ran: bool
    dry_run: bool = False
    complete: bool = True
    cutoffs: dict[str, str | None] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.deleted.values())

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


class PgRetention:
    """Prunes one database; sleep and the clocks are injected so that tests control the pacing."""

    def __init__(self, db: Database, *, sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)):
        self.db = db
        self.sleep = sleep
        self.monotonic = monotonic
        self.now = now

    def prune(self, policy: RetentionPolicy, *, dry_run: bool = False, budget_s: float | None = None) -> PruneReport:
        """Delete (or count, dry_run) what the policy lets go, oldest first; stop starting new
        batches once budget_s has passed (the next run goes on where this one stopped)."""
        with self._lock() as locked:
            if not locked:
                return PruneReport(ran=False, dry_run=dry_run)
            started = self.monotonic()
            deadline = None if budget_s is None else started + budget_s
            report = PruneReport(ran=True, dry_run=dry_run)
            now = self.now()

            def cutoff(kind: str, days: float) -> dt.datetime | None:
                before = now - dt.timedelta(days=days) if days > 0 else None
                report.cutoffs[kind] = before.isoformat() if before else None
                return before

            archives, results = self._tables()
            plan: list[tuple[str, str, str, dt.datetime | None]] = []
            before = cutoff("archive", policy.archive_days)
            plan += [(f"pgmq.{t}", "prune_archive", "count_prunable_archive", before) for t in archives]
            before = cutoff("results", policy.results_days)
            plan += [(f"pgmq.{t}", "prune_results", "count_prunable_results", before) for t in results]
            before = cutoff("runs", policy.runs_days)
            plan.append((RUNS_TABLE, "prune_runs", "count_prunable_runs", before))
            for table, prune, count, before in plan:
                if before is None:
                    continue
                if dry_run:
                    report.deleted[table] = self._count(table, count, before)
                    continue
                report.deleted[table] = 0
                while True:
                    if deadline is not None and self.monotonic() >= deadline:
                        report.complete = False
                        break
                    n = self._batch(table, prune, before, policy.batch_size)
                    report.batches += 1
                    report.deleted[table] += n
                    if n < policy.batch_size:
                        break
                    self.sleep(policy.pause_s)   # autovacuum and the consumers get their turn
                if not report.complete:
                    break
            report.seconds = round(self.monotonic() - started, 3)
            if report.total and not dry_run:
                log.info("pruned %d row(s) in %d batch(es), %.1f s: %s", report.total, report.batches,
                         report.seconds, {t: n for t, n in report.deleted.items() if n})
            return report

    def table_bytes(self) -> dict[str, int]:
        """pg_total_relation_size of every table retention prunes, for reports and tests."""
        archives, results = self._tables()
        names = [f"pgmq.{t}" for t in archives + results] + [RUNS_TABLE, "genesis.run_errors"]
        rows = self.db.run(lambda conn: conn.execute(sql("relation_bytes"), {"names": names}).fetchall())
        return {r["name"]: r["bytes"] for r in rows}

    # --- steps -----------------------------------------------------------------------------

    def _tables(self) -> tuple[list[str], list[str]]:
        """The archive tables and the result queue tables that exist, in a fixed order: the
        contract's queues, then the reply_to queues requests created (found by the naming rule in
        pgmq's list of queues), whose results and archives age like the paired queue's."""
        def tx(conn: Conn) -> tuple[list[str], set[str]]:
            replies = sorted(r["queue_name"] for r in conn.execute(sql("list_queues"))
                             if is_reply_queue(r["queue_name"]))
            wanted = [f"a_{q}" for q in all_queue_names() + replies] + \
                     [f"q_{results}" for _type, results in QUEUES.values()] + [f"q_{q}" for q in replies]
            return wanted, {r["name"] for r in conn.execute(sql("existing_queue_tables"), {"names": wanted})}
        names, found = self.db.run(tx)
        archives = [t for t in names if t.startswith("a_") and t in found]
        return archives, [t for t in names if t.startswith("q_") and t in found]

    def _batch(self, table: str, query: str, before: dt.datetime, limit: int) -> int:
        statement = _statement(query, table)
        params = {"before": before, "limit": limit}

        def tx(conn: Conn) -> int:
            conn.execute(sql("retention_session"))
            cur = conn.execute(statement, params)
            return int(one(cur)["n"]) if cur.description else cur.rowcount
        return self.db.run(tx)

    def _count(self, table: str, query: str, before: dt.datetime) -> int:
        statement = _statement(query, table)
        return self.db.run(lambda conn: int(one(conn.execute(statement, {"before": before}))["n"]))

    def _lock(self) -> AbstractContextManager[bool]:
        return maintenance_lock(self.db, RETENTION_JOB)


def _statement(query: str, table: str) -> pgsql.Composed:
    """The named query over one table (`pgmq.{table}` in its text; the runs query names its own)."""
    return pgsql.SQL(sql(query)).format(table=pgsql.Identifier(table.removeprefix("pgmq.")))


# A scheduled prune stops starting batches after this long and goes on at its next run, so that
# one run never holds the retention lock (and a consumer's thread) for long.
SCHEDULED_BUDGET_S = 5.0


def scheduled_job(db: Database, settings: Settings) -> tuple[str, float, Callable[[], PruneReport]]:
    """(name, interval_s, job) for the consumer's periodic list: a prune bounded to SCHEDULED_BUDGET_S."""
    retention, policy = PgRetention(db), RetentionPolicy.of(settings)
    return RETENTION_JOB, settings.retention_interval_s, lambda: retention.prune(policy, budget_s=SCHEDULED_BUDGET_S)
