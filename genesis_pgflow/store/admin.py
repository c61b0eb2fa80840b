"""The operators' seam: live consumers and their heartbeats, failures, one run's history, dead letters, status."""

from __future__ import annotations

import os
import socket
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg.types.json import Jsonb

from genesis_pgflow.errors import ConfigurationError
from genesis_pgflow.messages import QUEUES, dead_letter_queue, reply_queue_family, result_queue
from genesis_pgflow.store.control import COMMANDS
from genesis_pgflow.store.database import Conn, Database, one
from genesis_pgflow.store.queries import sql, with_tables


def package_version() -> str:
    try:
        return metadata.version("genesis_pgflow")
    except metadata.PackageNotFoundError:   # run from a checkout that was never installed
        return "unknown"


def shown_dsn(dsn: str, *, show_password: bool = False) -> str:
    """A DSN as a key/value string psql takes (`psql "$(genesis db url)"`), without its password
    unless asked for."""
    try:
        info = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    if not show_password:
        info.pop("password", None)
    return conninfo.make_conninfo("", **info)


def _request_queue(queue: str) -> None:
    if queue not in QUEUES:
        raise ConfigurationError(f"not a request queue: {queue!r} (one of {', '.join(QUEUES)})")


@dataclass(frozen=True)
class ConsumerPresence:
    """One genesis-consume process as genesis.consumers shows it: registered at start, a heartbeat
    every heartbeat_s seconds (which also cleans up after consumers that died), stopped at exit."""

    db: Database
    id: str                     # host:pid, the `consumer` of its results and runs
    queues: tuple[str, ...]
    parallel: int
    heartbeat_s: float
    retention_s: float          # how long a gone or stopped consumer stays listed

    def _params(self, in_flight: int = 0) -> dict[str, Any]:
        return {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(), "version": package_version(),
                "queues": list(self.queues), "parallel": self.parallel, "heartbeat_s": self.heartbeat_s,
                "in_flight": in_flight}

    def register(self) -> None:
        def tx(conn: Conn) -> None:
            conn.execute(sql("consumer_register"), self._params())
            conn.execute(sql("consumer_commands_clear"), {"id": self.id})   # one left by an earlier holder of the id
        self.db.run(tx)

    def beat(self, in_flight: int) -> None:
        """Say this consumer is alive; mark those silent for three of their intervals gone, and
        forget those gone or stopped for longer than the retention."""
        def tx(conn: Conn) -> None:
            conn.execute(sql("consumer_heartbeat"), self._params(in_flight))
            conn.execute(sql("consumers_mark_gone"))
            conn.execute(sql("consumers_forget"), {"retention_s": self.retention_s})
            conn.execute(sql("consumer_commands_forget"))
        self.db.run(tx)

    def stopped(self) -> None:
        """Exited: stopped, and the drain or stop it obeyed is done with."""
        def tx(conn: Conn) -> None:
            conn.execute(sql("consumer_stopped"), {"id": self.id})
            conn.execute(sql("consumer_commands_clear"), {"id": self.id})
        self.db.run(tx)


class PgAdminStore:
    """What the `genesis` admin commands read and do; each method is one transaction."""

    def __init__(self, db: Database):
        self.db = db

    def database(self) -> dict[str, Any]:
        return self.db.run(lambda conn: dict(one(conn.execute(sql("database_identity")))))

    def consumers(self) -> list[dict[str, Any]]:
        return self.db.run(lambda conn: conn.execute(sql("consumers_list")).fetchall())

    # --- steering the fleet (genesis.fleet_control; every change is a NOTIFY the consumers act on)

    def pause_queue(self, queue: str, by: str | None = None) -> bool:
        """No consumer leases the queue's messages from now on (those in flight finish); False if
        it was paused already."""
        _request_queue(queue)
        return self.db.run(lambda conn: conn.execute(sql("queue_pause"), {"queue": queue, "by": by}).fetchone()
                           is not None)

    def resume_queue(self, queue: str) -> bool:
        """Consumers read the queue again at once; False if it was not paused."""
        _request_queue(queue)
        return self.db.run(lambda conn: conn.execute(sql("queue_resume"), {"queue": queue}).fetchone() is not None)

    def paused_queues(self) -> list[dict[str, Any]]:
        """The paused queues: queue, paused_at, paused_by."""
        return self.db.run(lambda conn: conn.execute(sql("queues_paused")).fetchall())

    def queues(self) -> list[dict[str, Any]]:
        """Each request queue: its type, depth, and whether (since when, by whom) it is paused."""
        def tx(conn: Conn) -> list[dict[str, Any]]:
            depth = {r["queue_name"]: r["queue_length"] for r in conn.execute(sql("queue_metrics"))}
            paused = {r["queue"]: r for r in conn.execute(sql("queues_paused"))}
            return [{"queue": queue, "type": kind, "paused": queue in paused,
                     "paused_at": paused.get(queue, {}).get("paused_at"),
                     "paused_by": paused.get(queue, {}).get("paused_by"), "depth": depth.get(queue, 0)}
                    for queue, (kind, _results) in QUEUES.items()]
        return self.db.run(tx)

    def command_consumers(self, command: str, ids: Sequence[str] = (), *, all: bool = False,
                          by: str | None = None) -> list[dict[str, Any]]:
        """Tell consumers (the ids given, or every one not stopped) to drain or stop; returns each
        one's command now (a stop is never turned into a drain). All or nothing: an id that is
        not a consumer, or one that has stopped, raises ConfigurationError and tells no one."""
        if command not in COMMANDS:
            raise ConfigurationError(f"not a consumer command: {command!r} (one of {', '.join(COMMANDS)})")
        if bool(ids) == all:
            raise ConfigurationError("name consumer ids or --all, not both nor neither")

        def tx(conn: Conn) -> list[dict[str, Any]]:
            live = {r["id"] for r in conn.execute(sql("consumers_commandable"))}
            missing = [i for i in dict.fromkeys(ids) if i not in live]
            if missing:
                raise ConfigurationError(f"no running consumer {', '.join(missing)}; see `genesis consumers`")
            targets = sorted(live) if all else list(dict.fromkeys(ids))
            if not targets:
                return []
            return conn.execute(sql("consumers_command"), {"ids": targets, "command": command, "by": by}).fetchall()
        return self.db.run(tx)

    def failures(self, *, since_s: float, queue: str | None = None, type: str | None = None,
                 limit: int = 50) -> list[dict[str, Any]]:
        params = {"since_s": since_s, "queue": queue, "type": type, "limit": limit}
        return self.db.run(lambda conn: conn.execute(sql("failures_recent"), params).fetchall())

    def run_history(self, queue: str, msg_id: int) -> dict[str, Any] | None:
        """One request message's whole story: its run row, every error it met (retries and the
        final failure), where the message is now (queue or archive), its result if still waiting,
        and the dead-letter copy if there is one. None if nothing is known of it."""
        params = {"queue": queue, "msg_id": msg_id}

        def tx(conn: Conn) -> dict[str, Any] | None:
            run = conn.execute(sql("run_row"), params).fetchone()
            queued = conn.execute(with_tables("run_queue_row", table=f"q_{queue}"), params).fetchone()
            archived = conn.execute(with_tables("run_archive_row", table=f"a_{queue}"), params).fetchone()
            if run is None and queued is None and archived is None:
                return None
            letters = self._explained_dead_letters(conn, queue, 1000)
            # where its result went: the reply_to it named (if valid and created), else the paired queue
            named = (archived or queued or {}).get("reply_to")
            answers = result_queue(queue)
            if (isinstance(named, str) and reply_queue_family(named) == queue
                    and one(conn.execute(sql("queue_exists"), {"queue": named}))["found"]):
                answers = named
            return {
                "queue": queue, "msg_id": msg_id, "run": run,
                "errors": conn.execute(sql("run_errors"), params).fetchall(),
                "in_queue": queued, "archived": archived, "results_queue": answers,
                "results_waiting": conn.execute(with_tables("run_result_messages", table=f"q_{answers}"),
                                                params).fetchall(),
                "dead_letter": next(({"queue": dead_letter_queue(queue), "msg_id": d["msg_id"],
                                      "enqueued_at": d["enqueued_at"]}
                                     for d in letters if d["original_msg_id"] == msg_id), None),
            }
        return self.db.run(tx)

    def dead_letters(self, queue: str, limit: int = 100) -> list[dict[str, Any]]:
        """The dead letters of a request queue, each with its original msg_id, attempts and last error."""
        return self.db.run(lambda conn: self._explained_dead_letters(conn, queue, limit))

    @staticmethod
    def _explained_dead_letters(conn: Conn, queue: str, limit: int) -> list[dict[str, Any]]:
        query = with_tables("dead_letters_explained", dlq=f"q_{dead_letter_queue(queue)}", archive=f"a_{queue}")
        rows = conn.execute(query, {"queue": queue, "limit": limit}).fetchall()
        return [{**row, "queue": dead_letter_queue(queue), "original_queue": queue} for row in rows]

    def requeue_dead_letters(self, queue: str, msg_ids: Sequence[int] = ()) -> list[tuple[int, int]]:
        """Send the chosen (or all) dead letters back to their request queue as new messages;
        returns (old, new) ids. All or nothing: an id that is not in the dead-letter queue (or is
        being requeued by someone else right now) raises ConfigurationError and moves nothing."""
        dlq = dead_letter_queue(queue)

        def tx(conn: Conn) -> list[tuple[int, int]]:
            rows = conn.execute(with_tables("take_dead_letters", table=f"q_{dlq}"),
                                {"all": not msg_ids, "msg_ids": list(msg_ids)}).fetchall()
            missing = sorted(set(msg_ids) - {row["msg_id"] for row in rows})
            if missing:
                raise ConfigurationError(f"no dead letter {', '.join(map(str, missing))} in {dlq}; "
                                         f"see `genesis dlq list {queue}`")
            moved = []
            for row in rows:
                # the request's own pgmq headers (a correlation id) go back with it
                headers = row["headers"].get("request_headers") if isinstance(row["headers"], dict) else None
                new_id = one(conn.execute(sql("send_one_with_headers"), {
                    "queue": queue, "message": Jsonb(row["message"]),
                    "headers": Jsonb(headers) if isinstance(headers, dict) else None}))
                conn.execute(sql("archive_one"), {"queue": dlq, "msg_id": row["msg_id"]})
                moved.append((row["msg_id"], new_id["msg_id"]))
            return moved
        return self.db.run(tx)

    def status(self) -> dict[str, Any]:
        """Per queue: depth, in flight, oldest age, archived, dead-lettered, outcomes, paused; per
        type: outcomes; throughput over the last minute and hour; failures by code (last hour);
        the paused queues; consumers (with the drain or stop addressed to each). The keys `queues`
        and `types` are the stable ones of `genesis status --json`."""
        def tx(conn: Conn) -> dict[str, Any]:
            metrics = {r["queue_name"]: r for r in conn.execute(sql("queue_metrics"))}
            counts: dict[str, Counter[str]] = defaultdict(Counter)
            types: dict[str, Counter[str]] = defaultdict(Counter)
            for r in conn.execute(sql("run_counts")):
                counts[r["queue"]][r["status"]] += r["n"]
                types[r["type"]][r["status"]] += r["n"]
            paused = {r["queue"]: r for r in conn.execute(sql("queues_paused"))}
            archived_counts = {r["queue"]: r["n"] for r in conn.execute(sql("archived_counts"))}
            queues = {}
            for queue, (kind, results) in QUEUES.items():
                m = metrics.get(queue, {})
                archived = archived_counts.get(queue, 0)
                queues[queue] = {
                    "type": kind,
                    "depth": m.get("queue_length", 0),
                    "in_flight": m.get("queue_length", 0) - m.get("queue_visible_length", 0),
                    "oldest_age_s": m.get("oldest_msg_age_sec"),
                    "archived": archived,
                    "dead_lettered": metrics.get(dead_letter_queue(queue), {}).get("queue_length", 0),
                    "results_waiting": metrics.get(results, {}).get("queue_length", 0),
                    "completed": counts[queue].get("completed", 0),
                    "failed": counts[queue].get("failed", 0),
                    "retrying": counts[queue].get("pending", 0),
                    "running": counts[queue].get("running", 0),
                    "paused": queue in paused,
                }
            throughput = {}
            for label, window_s in (("last_minute", 60), ("last_hour", 3600)):
                rows = conn.execute(sql("throughput_since"), {"window_s": window_s}).fetchall()
                throughput[label] = {
                    "completed": sum(r["completed"] for r in rows), "failed": sum(r["failed"] for r in rows),
                    "queues": {r["queue"]: {"completed": r["completed"], "failed": r["failed"], "avg_ms": r["avg_ms"]}
                               for r in rows}}
            by_code = conn.execute(sql("failures_by_code"), {"window_s": 3600}).fetchall()
            return {"queues": queues,
                    "types": {t: {"completed": c["completed"], "failed": c["failed"], "retrying": c["pending"],
                                  "running": c["running"]} for t, c in sorted(types.items())},
                    "throughput": throughput,
                    "failures_by_code_last_hour": {r["code"]: r["n"] for r in by_code},
                    "paused_queues": list(paused.values()),
                    "consumers": conn.execute(sql("consumers_list")).fetchall()}
        return self.db.run(tx)
