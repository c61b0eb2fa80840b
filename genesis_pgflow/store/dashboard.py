"""What the dashboard reads that no admin command does: current queue figures and the last hour,
minute by minute (depth and runs finished), each request queue in one transaction."""

from __future__ import annotations

import datetime as dt
from typing import Any

from genesis_pgflow.messages import QUEUES, dead_letter_queue
from genesis_pgflow.store.database import Conn, Database, one
from genesis_pgflow.store.queries import sql, with_tables

# the throughput series come from the tallies' buckets, kept 65 minutes (migration 0015)
MAX_MINUTES = 64


class PgDashboardStore:
    """Reads only: the figures of pgmq.metrics_all() and the last `minutes` minutes per queue."""

    def __init__(self, db: Database):
        self.db = db

    def queues(self, minutes: int = 60) -> dict[str, Any]:
        """{now, minutes: [iso minute...], queues: {queue: {depth, in_flight, oldest_age_s,
        dead_lettered, results_waiting, depth_series, completed_series, failed_series}}}.
        Each series has one value per minute, oldest first; the last minute is the current one."""
        if not 1 <= minutes <= MAX_MINUTES:
            raise ValueError(f"minutes must be 1 to {MAX_MINUTES} (the tallies keep 65 minutes of buckets)")
        def tx(conn: Conn) -> dict[str, Any]:
            clock = one(conn.execute(sql("dashboard_clock")))
            metrics = {r["queue_name"]: r for r in conn.execute(sql("queue_metrics"))}
            first: dt.datetime = clock["minute"] - dt.timedelta(minutes=minutes - 1)
            slots = [first + dt.timedelta(minutes=i) for i in range(minutes)]
            index = {slot: i for i, slot in enumerate(slots)}
            done: dict[str, list[int]] = {q: [0] * minutes for q in QUEUES}
            failed: dict[str, list[int]] = {q: [0] * minutes for q in QUEUES}
            for row in conn.execute(sql("throughput_minutes"), {"minutes": minutes}):
                i = index.get(row["minute"])
                if i is not None and row["queue"] in QUEUES:
                    done[row["queue"]][i] += row["completed"]
                    failed[row["queue"]][i] += row["failed"]
            queues = {}
            for queue, (kind, results) in QUEUES.items():
                m = metrics.get(queue, {})
                depth = {r["minute"]: r["depth"] for r in conn.execute(
                    with_tables("depth_per_minute", queue=f"q_{queue}", archive=f"a_{queue}"), {"minutes": minutes})}
                queues[queue] = {
                    "type": kind,
                    "depth": m.get("queue_length", 0),
                    "in_flight": m.get("queue_length", 0) - m.get("queue_visible_length", 0),
                    "oldest_age_s": m.get("oldest_msg_age_sec"),
                    "dead_lettered": metrics.get(dead_letter_queue(queue), {}).get("queue_length", 0),
                    "results_waiting": metrics.get(results, {}).get("queue_length", 0),
                    "depth_series": [depth.get(slot, 0) for slot in slots],
                    "completed_series": done[queue],
                    "failed_series": failed[queue],
                }
            return {"now": clock["now"], "minutes": slots, "queues": queues}
        return self.db.run(tx)
