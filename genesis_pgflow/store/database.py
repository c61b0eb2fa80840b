"""The connection pool, and the one place where brief connection errors are retried (tenacity)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolTimeout
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential_jitter

from genesis_pgflow.errors import DatabaseUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# What the store raises when the database fails it (after its own brief retries).
StoreError = psycopg.Error
# A pooled connection: rows come back as dicts.
Conn = psycopg.Connection[DictRow]

# errors after which the same statement may well succeed on a fresh connection
_TRANSIENT = (psycopg.OperationalError, psycopg.errors.SerializationFailure,
              psycopg.errors.DeadlockDetected, PoolTimeout)


def one(cursor: psycopg.Cursor[Any]) -> Any:
    """The row of a query that always returns exactly one (an aggregate, a function call)."""
    row = cursor.fetchone()
    if row is None:
        raise psycopg.DataError("the query returned no row")
    return row


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (psycopg.errors.QueryCanceled,)):
        return False
    return isinstance(exc, _TRANSIENT)


def describe_dsn(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    info.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in info.items())


def check_reachable(dsn: str, timeout_s: int = 5) -> None:
    """Raise DatabaseUnavailable with one clear line if the server does not answer."""
    try:
        with psycopg.connect(dsn, connect_timeout=timeout_s, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL ({describe_dsn(dsn)}): {first}") from None


class Database:
    """A pool of connections with dict rows; `run(fn)` runs fn(conn) in one transaction, retried
    on brief connection trouble. Handlers never see this object."""

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 8, retry_for_s: float = 30.0,
                 name: str = "genesis"):
        self.dsn = dsn
        self.retry_for_s = retry_for_s
        self.pool: ConnectionPool[Conn] = ConnectionPool(
            dsn, min_size=min_size, max_size=max_size, open=False, name=name,
            kwargs={"row_factory": dict_row, "autocommit": False},
            check=ConnectionPool.check_connection, reconnect_timeout=retry_for_s,
        )

    def open(self, wait_s: float = 10.0) -> Database:
        self.pool.open(wait=True, timeout=wait_s)
        return self

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Database:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _retrying(self) -> Retrying:
        return Retrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential_jitter(multiplier=0.05, max=2.0),
            stop=stop_after_delay(self.retry_for_s) | stop_after_attempt(50),
            reraise=True,
            before_sleep=lambda state: log.warning("database error, retrying: %s",
                                                   state.outcome.exception() if state.outcome else "?"),
        )

    def run(self, fn: Callable[[Conn], T]) -> T:
        """fn(conn) in one transaction; the whole transaction is retried on a transient error."""
        for attempt in self._retrying():
            with attempt:
                with self.pool.connection(timeout=self.retry_for_s) as conn:
                    with conn.transaction():
                        return fn(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        with self.pool.connection(timeout=self.retry_for_s) as conn:
            yield conn
