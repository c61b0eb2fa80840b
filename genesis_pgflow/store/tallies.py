"""The tallies behind `genesis status` and genesis.queue_health (migrations 0009, 0017): runs per
queue, type and status, and rows per archive, counted without scanning history. A run or an
archived message is counted where it is (the views genesis.run_tallies and genesis.archive_tallies,
by an index of the writing transaction's id) until `compact` folds it into one row per group and
moves the tallies' horizon past it; the consumer runs it every TALLY_INTERVAL_S, in one consumer at
a time. Writes leave no tally row of their own: no dead row per completion."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from genesis_pgflow.store.database import Database, maintenance_lock, one
from genesis_pgflow.store.queries import sql

log = logging.getLogger(__name__)

TALLY_JOB = "tally_compaction"
# A count reads every run and archived message past the tallies' horizon; a fold moves it. A fold
# reads each row once however often it runs, but leaves a dead row or two of its own (the horizon's,
# and the merge of its group's bucket): so it waits for FOLD_MIN_ROWS runs, or FOLD_MAX_WAIT_S.
# At 200 msg/s that is a fold every 10 s (about 0.001 dead rows per message); at 13,000 msg/s one
# every TALLY_INTERVAL_S, and a count reads at most about 30,000 rows past the horizon.
TALLY_INTERVAL_S = 2.0
FOLD_MIN_ROWS = 2_000
FOLD_MAX_WAIT_S = 30.0


@dataclass(frozen=True)
class CompactionReport:
    ran: bool                # False: another consumer held the job's lock
    folded: int | None = 0   # rows the fold added (None: a write holding the horizon was open; next time)
    rows_before: int = 0     # folded rows the compaction merged ...
    rows_after: int = 0      # ... into these


def compact(db: Database, *, min_rows: int = 0, max_wait_s: float = 0.0) -> CompactionReport:
    """Fold (once min_rows runs are past the horizon, or max_wait_s after the last fold; by default
    now), then merge: two statements, each in a transaction of its own (the fold's lock comes
    before its snapshot); what other transactions write meanwhile is left for the next run."""
    with maintenance_lock(db, TALLY_JOB) as locked:
        if not locked:
            return CompactionReport(ran=False)
        folded = db.run(lambda conn: one(conn.execute(
            sql("fold_tallies"), {"min_rows": min_rows, "max_wait_s": max_wait_s}))["folded"])
        row = db.run(lambda conn: one(conn.execute(sql("compact_tallies"))))
        return CompactionReport(ran=True, folded=None if folded is None else int(folded),
                                rows_before=int(row["before"]), rows_after=int(row["after"]))


def scheduled_job(db: Database) -> tuple[str, float, Callable[[], CompactionReport]]:
    """(name, interval_s, job) for the consumer's periodic list."""
    return TALLY_JOB, TALLY_INTERVAL_S, lambda: compact(db, min_rows=FOLD_MIN_ROWS, max_wait_s=FOLD_MAX_WAIT_S)
