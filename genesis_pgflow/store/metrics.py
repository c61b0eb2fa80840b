"""What /metrics and /readyz read from PostgreSQL: pgmq's figures per queue, the schema's state, pool occupancy."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

import psycopg
from psycopg.rows import DictRow, dict_row

from genesis_pgflow.messages import all_queue_names
from genesis_pgflow.store.database import Database, one
from genesis_pgflow.store.queries import sql


def _scalar(cursor: psycopg.Cursor[DictRow]) -> object:
    return next(iter(one(cursor).values()))


@dataclass(frozen=True)
class QueueFigures:
    depth: int                   # messages in the queue, visible or not
    in_flight: int               # leased (invisible) right now
    oldest_age_s: float | None   # None: the queue is empty


@dataclass(frozen=True)
class DatabaseReading:
    """One look at the database: pgmq present, its queues' figures, the genesis schema revision."""

    pgmq: bool
    queues: dict[str, QueueFigures] = field(default_factory=dict)
    revision: str | None = None

    def problems(self, head: str) -> list[str]:
        """What keeps the database from being current (empty when it is), as in schema.problems."""
        if not self.pgmq:
            return ["pgmq is not installed"]
        found = []
        missing = [q for q in all_queue_names() if q not in self.queues]
        if missing:
            found.append(f"missing queue(s): {', '.join(missing)}")
        if self.revision != head:
            found.append(f"genesis schema is at revision {self.revision or 'none'}, head is {head}")
        return found


class DatabaseProbe(Protocol):
    def read(self) -> DatabaseReading:
        """One reading; raises StoreError when the database cannot be read."""

    def close(self) -> None:
        """Release the connection."""


class PgDatabaseProbe:
    """DatabaseProbe on a connection of its own, opened on first use and again after any error.

    Not the pool: a scrape must neither wait for a connection the workers hold nor take one from
    them, nor sit through the store's 30 s of retries; a short connect and statement timeout
    instead, and the caller serves its last reading when this one fails."""

    def __init__(self, dsn: str, *, connect_timeout_s: int = 3, statement_timeout_ms: int = 5000):
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_ms = statement_timeout_ms
        self._conn: psycopg.Connection[DictRow] | None = None
        self._lock = threading.Lock()

    def read(self) -> DatabaseReading:
        with self._lock:
            try:
                return self._read(self._connection())
            except psycopg.Error:
                self._close()
                raise

    def _connection(self) -> psycopg.Connection[DictRow]:
        if self._conn is None or self._conn.closed:
            # keepalives and tcp_user_timeout: a server gone silent fails the reading within seconds
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s,
                                   row_factory=dict_row, application_name="genesis-metrics", keepalives=1,
                                   keepalives_idle=5, keepalives_interval=2, keepalives_count=2,
                                   tcp_user_timeout=self.statement_timeout_ms + 5000)
            conn.execute(sql("probe_statement_timeout"), {"timeout_ms": str(self.statement_timeout_ms)})
            self._conn = conn
        return self._conn

    @staticmethod
    def _read(conn: psycopg.Connection[DictRow]) -> DatabaseReading:
        if not _scalar(conn.execute(sql("pgmq_schema_exists"))):
            return DatabaseReading(pgmq=False)
        queues = {
            r["queue_name"]: QueueFigures(depth=r["queue_length"],
                                          in_flight=r["queue_length"] - r["queue_visible_length"],
                                          oldest_age_s=r["oldest_msg_age_sec"])
            for r in conn.execute(sql("queue_metrics"))
        }
        revision = None
        if _scalar(conn.execute(sql("schema_version_table_exists"))):
            row = conn.execute(sql("schema_revision")).fetchone()
            revision = None if row is None else row["version_num"]
        return DatabaseReading(pgmq=True, queues=queues, revision=revision)

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._close()


@dataclass(frozen=True)
class PoolFigures:
    max_size: int
    size: int             # connections open
    idle: int             # open and not lent out
    waiting: int          # requests waiting for a connection
    connections_lost: int  # found broken and replaced, since start
    connection_errors: int  # attempts to open a connection that failed, since start


def pool_figures(db: Database) -> PoolFigures | None:
    """The occupancy of the consumer's connection pool (psycopg_pool's own counters); None while
    the database has no pool to show."""
    try:
        stats = db.pool.get_stats()
    except psycopg.Error:
        return None
    return PoolFigures(max_size=stats.get("pool_max", 0), size=stats.get("pool_size", 0),
                       idle=stats.get("pool_available", 0), waiting=stats.get("requests_waiting", 0),
                       connections_lost=stats.get("connections_lost", 0),
                       connection_errors=stats.get("connections_errors", 0))
