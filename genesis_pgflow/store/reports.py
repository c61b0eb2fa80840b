"""Experiment trends and the daily report to CentralCloud.

`trends(db, days)` reads genesis.experiment_trends (migration 0008: per UTC day, experiment type and
instance, the count, success rate, mean regression and recommendations of the experiments that
finished). `send_due(db, sent_by)` sends one message per ended UTC day to the genesis_reports
queue (docs/interface.md has its format): the consumer runs it every REPORT_INTERVAL_S, one
consumer at a time (a maintenance advisory lock); which day was reported last is kept in
genesis.scheduled_reports and moved in the transaction that sends, its row locked meanwhile, so
restarts and any number of consumers send exactly one report per day. Days missed while no
consumer ran are sent when one comes back, the last MAX_CATCH_UP_DAYS of them at most.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb

from genesis_pgflow.messages import REPORT_QUEUE
from genesis_pgflow.store.database import Conn, Database, maintenance_lock, one
from genesis_pgflow.store.queries import sql

log = logging.getLogger(__name__)

REPORT_JOB = "experiment_report"
REPORT_NAME = "experiments_daily"
REPORT_TYPE = "genesis_experiment_report"
# how often a consumer looks whether a day has ended (cheap: one lock and one row)
REPORT_INTERVAL_S = 600.0
MAX_CATCH_UP_DAYS = 7
RECOMMENDATIONS = ("merge", "merge_with_review", "reject")
_COUNTS = ("experiments", "succeeded", "regressed", "failed")


@dataclass(frozen=True)
class ReportRun:
    """What one send_due did: ran is False when another consumer held the job's lock."""

    ran: bool
    days: list[str] = field(default_factory=list)


def trends(db: Database, days: int = 7) -> list[dict[str, Any]]:
    """genesis.experiment_trends for the last `days` UTC days (today included), newest first."""
    def tx(conn: Conn) -> list[dict[str, Any]]:
        today = _today(conn)
        return conn.execute(sql("experiment_trends"), {
            "since": today - dt.timedelta(days=max(1, days) - 1), "until": None}).fetchall()
    return db.run(tx)


def report(rows: Sequence[dict[str, Any]], day: dt.date, sent_by: str, now: dt.datetime) -> dict[str, Any]:
    """The report of one day from its genesis.experiment_trends rows."""
    by_type = [{"experiment_type": r["experiment_type"], "instance_id": r["instance_id"],
                **{k: r[k] for k in _COUNTS}, "success_rate": r["success_rate"],
                "mean_regression": r["mean_regression"], "mean_duration_ms": r["mean_duration_ms"],
                "recommendations": {k: r[k] for k in RECOMMENDATIONS}} for r in rows]
    total = sum(r["experiments"] for r in rows)
    measured = [r for r in rows if r["mean_regression"] is not None]
    weight = sum(r["experiments"] for r in measured)
    totals = {**{k: sum(r[k] for r in rows) for k in _COUNTS},
              "success_rate": round(sum(r["succeeded"] for r in rows) / total, 4) if total else None,
              "mean_regression": round(sum(r["mean_regression"] * r["experiments"] for r in measured) / weight, 4)
              if weight else None,
              "recommendations": {k: sum(r[k] for r in rows) for k in RECOMMENDATIONS}}
    return {"type": REPORT_TYPE, "report": REPORT_NAME, "day": day.isoformat(), "generated_at": now.isoformat(),
            "sent_by": sent_by, "totals": totals, "by_type": by_type}


def send_due(db: Database, sent_by: str) -> ReportRun:
    """Send the report of every ended UTC day not reported yet (the first time: yesterday's)."""
    with maintenance_lock(db, REPORT_JOB) as locked:
        if not locked:
            return ReportRun(ran=False)

        def tx(conn: Conn) -> list[str]:
            today = _today(conn)
            yesterday = today - dt.timedelta(days=1)
            conn.execute(sql("scheduled_report_first"), {"report": REPORT_NAME,
                                                         "day": yesterday - dt.timedelta(days=1)})
            last = one(conn.execute(sql("scheduled_report_day"), {"report": REPORT_NAME}))["last_day"]
            first = max(last + dt.timedelta(days=1), today - dt.timedelta(days=MAX_CATCH_UP_DAYS))
            days = [first + dt.timedelta(days=n) for n in range((yesterday - first).days + 1)]
            now = dt.datetime.now(dt.timezone.utc)
            for day in days:
                rows = conn.execute(sql("experiment_trends"), {"since": day, "until": day}).fetchall()
                message = Jsonb(report(rows, day, sent_by, now))
                conn.execute(sql("send_one"), {"queue": REPORT_QUEUE, "message": message})
            if days:
                conn.execute(sql("scheduled_report_sent"), {"report": REPORT_NAME, "day": days[-1], "sent_by": sent_by})
            return [d.isoformat() for d in days]
        sent = db.run(tx)
        if sent:
            log.info("experiment report sent to %s for %s", REPORT_QUEUE, ", ".join(sent))
        return ReportRun(ran=True, days=sent)


def _today(conn: Conn) -> dt.date:
    """The database's UTC date: every consumer agrees on when a day ends, whatever its own clock."""
    return one(conn.execute(sql("report_today")))["today"]


def scheduled_job(db: Database, sent_by: str) -> tuple[str, float, Callable[[], ReportRun]]:
    """(name, interval_s, job) for the consumer's periodic list."""
    return REPORT_JOB, REPORT_INTERVAL_S, lambda: send_due(db, sent_by)
