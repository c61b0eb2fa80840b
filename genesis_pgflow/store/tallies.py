"""The tallies behind `genesis status` and genesis.queue_health (migration 0009): runs per queue,
type and status, and rows per archive, kept as signed deltas by statement-level triggers so that
no count scans history. `compact` folds the deltas into one row per group; the consumer runs it
every TALLY_INTERVAL_S (10 s), in one consumer at a time."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from genesis_pgflow.store.database import Database, maintenance_lock, one
from genesis_pgflow.store.queries import sql

log = logging.getLogger(__name__)

TALLY_JOB = "tally_compaction"
# Deltas arrive a row in each tally per completion transaction, so a count sums what came since
# the last fold: at 200 transactions a second (a message or a few each) a minute left 12,000 rows
# in each, and 60,000 in each made `genesis status` 57 ms slower on a 2-core machine. Every 10 s:
# at most a few thousand. A fold is one statement, and it deletes each delta once however often
# it runs.
TALLY_INTERVAL_S = 10.0


@dataclass(frozen=True)
class CompactionReport:
    ran: bool                # False: another consumer held the job's lock
    rows_before: int = 0
    rows_after: int = 0


def compact(db: Database) -> CompactionReport:
    """One statement: what other transactions add meanwhile is left for the next run."""
    with maintenance_lock(db, TALLY_JOB) as locked:
        if not locked:
            return CompactionReport(ran=False)
        row = db.run(lambda conn: one(conn.execute(sql("compact_tallies"))))
        return CompactionReport(ran=True, rows_before=int(row["before"]), rows_after=int(row["after"]))


def scheduled_job(db: Database) -> tuple[str, float, Callable[[], CompactionReport]]:
    """(name, interval_s, job) for the consumer's periodic list."""
    return TALLY_JOB, TALLY_INTERVAL_S, lambda: compact(db)
