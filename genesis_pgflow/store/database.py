"""The connection pool, the session settings of every connection, and the one place where brief
connection errors are retried (tenacity).

How it gets through a fault: a connection found broken drops the whole pool at once (its other
connections are as dead as this one, and psycopg_pool would otherwise probe each with its own
backoff); the next call first opens one connection directly and builds a fresh pool only when that
works. Every connection carries TCP keepalives, a TCP user timeout, a connect timeout and a server
statement timeout, and a watchdog cuts the socket of a call that the server has stopped answering
(a blackholed network), so no call blocks for longer than a known bound."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import sql as pgsql
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential_jitter

from genesis_pgflow.errors import DatabaseUnavailable
from genesis_pgflow.store.queries import sql

log = logging.getLogger(__name__)
T = TypeVar("T")

# What the store raises when the database fails it (after its own brief retries).
StoreError = psycopg.Error
# A pooled connection: rows come back as dicts.
Conn = psycopg.Connection[DictRow]

# SQLSTATEs of a database that refuses for a while rather than a query that is wrong: the
# consumer waits these out (within its outage budget) instead of exiting.
REFUSED = {
    "25006": "read-only transaction (standby, or default_transaction_read_only)",
    "42501": "insufficient privilege",
    "53000": "insufficient resources", "53100": "disk full", "53200": "out of memory",
    "53300": "too many connections", "53400": "configuration limit exceeded",
    "57014": "query canceled (statement timeout)",
    "55P03": "lock not available",
    "57P01": "admin shutdown", "57P02": "crash shutdown", "57P03": "cannot connect now",
    "58000": "system error", "58030": "I/O error",
    "40001": "serialization failure", "40P01": "deadlock detected",
}
# ... of which these are worth retrying at once, inside the store, on the same pool
_RETRY_IN_STORE = {"40001", "40P01", "55P03"}
# ... and after these the pool's sessions are no use (a read-only session stays read-only)
_STALE_SESSIONS = {"25006", "57P01", "57P02", "57P03"}

# libpq parameters every connection gets unless the DSN sets them: keepalives notice a peer
# that has gone, tcp_user_timeout unacknowledged data (Linux), connect_timeout a server that
# never answers the handshake.
SESSION_DEFAULTS = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5",
                    "keepalives_count": "3", "tcp_user_timeout": "30000"}


def one(cursor: psycopg.Cursor[Any]) -> Any:
    """The row of a query that always returns exactly one (an aggregate, a function call)."""
    row = cursor.fetchone()
    if row is None:
        raise psycopg.DataError("the query returned no row")
    return row


def is_connection_error(exc: BaseException) -> bool:
    """The database could not be reached or the connection broke (not: it answered no)."""
    if isinstance(exc, (PoolTimeout, PoolClosed, DatabaseDown)):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


def is_transient(exc: BaseException) -> bool:
    """An outage or a refusal that passes (waited out), as opposed to a bug (exit 1)."""
    if is_connection_error(exc):
        return True
    state = getattr(exc, "sqlstate", None)
    return state is not None and (state in REFUSED or state.startswith(("08", "53")))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_dsn(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    info.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in info.items())


def check_reachable(dsn: str, timeout_s: int = 5, *, writable: bool = False) -> None:
    """Raise DatabaseUnavailable with one clear line if the server does not answer (or, with
    writable, if its sessions are read-only: a standby, or default_transaction_read_only)."""
    try:
        with psycopg.connect(dsn, connect_timeout=timeout_s, autocommit=True) as conn:
            row = conn.execute("SELECT current_setting('transaction_read_only')").fetchone()
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL ({describe_dsn(dsn)}): {first_line(exc)}") from None
    if writable and row is not None and row[0] == "on":
        raise DatabaseUnavailable(f"the database is read-only ({describe_dsn(dsn)}: a standby, or "
                                  "default_transaction_read_only on): a consumer writes results and runs, so point "
                                  "it at the primary")


def session_params(dsn: str, *, application_name: str, connect_timeout_s: int, statement_timeout_ms: int,
                   idle_in_transaction_ms: int) -> dict[str, Any]:
    """The libpq parameters of a connection of ours: the defaults above, then what the DSN says
    (the DSN wins), with the server timeouts put ahead of the DSN's own `options`."""
    given = psycopg.conninfo.conninfo_to_dict(dsn)
    params: dict[str, Any] = {k: v for k, v in SESSION_DEFAULTS.items() if k not in given}
    for key, value in (("connect_timeout", str(connect_timeout_s)), ("application_name", application_name)):
        if key not in given:
            params[key] = value
    ours = (f"-c statement_timeout={statement_timeout_ms} "
            f"-c idle_in_transaction_session_timeout={idle_in_transaction_ms}")
    params["options"] = f"{ours} {given['options']}" if given.get("options") else ours
    return params


class DatabaseDown(psycopg.OperationalError):
    """A connection to the database could not be opened (no pool is kept meanwhile)."""


class Watchdog:
    """Cuts the socket of a database call that runs past its deadline. A server that stopped
    answering (blackholed network: the kernel still acknowledges, keepalives see a live peer)
    would otherwise keep the caller in a socket read for ever; after the cut psycopg raises
    OperationalError at once and the connection is broken."""

    TICK_S = 0.25

    def __init__(self, monotonic: Callable[[], float] = time.monotonic):
        self.monotonic = monotonic
        self.cuts = 0
        self._calls: dict[int, tuple[psycopg.Connection[Any], float]] = {}
        self._cap_s: float | None = None
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextmanager
    def watch(self, conn: psycopg.Connection[Any], seconds: float) -> Iterator[None]:
        with self._changed:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="genesis-db-watchdog", daemon=True)
                self._thread.start()
            if self._cap_s is not None:
                seconds = min(seconds, self._cap_s)
            # no notify: the watchdog looks every TICK_S, and deadlines are seconds away
            self._calls[id(conn)] = (conn, self.monotonic() + seconds)
        try:
            yield
        finally:
            with self._changed:
                self._calls.pop(id(conn), None)

    def hurry(self, seconds: float) -> None:
        """From now on no call lasts longer than `seconds` (shutting down): calls running already
        get at most that long from now."""
        with self._changed:
            self._cap_s = seconds
            limit = self.monotonic() + seconds
            self._calls = {k: (conn, min(deadline, limit)) for k, (conn, deadline) in self._calls.items()}
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _run(self) -> None:
        with self._changed:
            while not self._closed:
                now = self.monotonic()
                for key, (conn, deadline) in list(self._calls.items()):
                    if now >= deadline:
                        # Cut under the lock: the call cannot end and hand its (healthy) connection
                        # to someone else in the meantime.
                        del self._calls[key]
                        self.cuts += 1
                        _cut(conn)
                waits = [deadline - now for _, deadline in self._calls.values()]
                self._changed.wait(min(self.TICK_S, max(0.01, min(waits, default=self.TICK_S))))


def _cut(conn: psycopg.Connection[Any]) -> None:
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except (OSError, psycopg.Error):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


class _Held(threading.local):
    """This thread's pooled connections of one Database, and how many it may hold."""
    n = 0
    allowed = 1


class Database:
    """A pool of connections with dict rows; `run(fn)` runs fn(conn) in one transaction, retried
    on brief connection trouble. Handlers never see this object.

    `generation` counts the pools dropped after a connection error; `connect_failures` the
    connections that could not be opened (each is one attempt, never a backoff of its own)."""

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 8, retry_for_s: float = 2.0,
                 name: str = "genesis", application_name: str | None = None, connect_timeout_s: int = 5,
                 statement_timeout_s: float = 30.0, call_timeout_s: float | None = None):
        self.dsn = dsn
        self.retry_for_s = retry_for_s
        self.name = name
        self.min_size, self.max_size = min_size, max_size
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_s = statement_timeout_s
        # the server cancels a slow statement itself; the watchdog only catches a silent server
        self.call_timeout_s = call_timeout_s if call_timeout_s is not None else statement_timeout_s + 5.0
        self.application_name = application_name or f"genesis:{os.getpid()}"
        self.watchdog = Watchdog()
        self.generation = 0
        self.connect_failures = 0
        self._lock = threading.Lock()
        self._pool: ConnectionPool[Conn] | None = None
        self._closed = False
        self._hurry_s: float | None = None
        # each thread holds at most one pooled connection (a maintenance lock's holder: two), and
        # one maintenance lock is held at a time in a process: so no wait for the pool can wait
        # on itself, however small the pool (the consumer's is its share of --parallel + 1)
        self._held = _Held()
        self._maintenance = threading.Lock()

    def connect_params(self, purpose: str = "") -> dict[str, Any]:
        """libpq parameters for a connection of ours (the pool's, LISTEN's, a lock holder's)."""
        timeout_ms = max(1, round(self.statement_timeout_s * 1000))
        return session_params(self.dsn, application_name=self.application_name + (f":{purpose}" if purpose else ""),
                              connect_timeout_s=self.connect_timeout_s, statement_timeout_ms=timeout_ms,
                              idle_in_transaction_ms=max(timeout_ms, 60_000))

    def connect(self, purpose: str, **kwargs: Any) -> psycopg.Connection[Any]:
        """A connection outside the pool, with the same session settings."""
        try:
            return psycopg.connect(self.dsn, **self.connect_params(purpose), **kwargs)
        except psycopg.Error:
            self.connect_failures += 1
            raise

    @property
    def pool(self) -> ConnectionPool[Conn]:
        """The current pool; raises DatabaseDown (without trying to connect) while there is none."""
        pool = self._pool
        if pool is None:
            raise DatabaseDown("no connection pool: the database is away")
        return pool

    def open(self, wait_s: float = 10.0) -> Database:
        self._current_pool().wait(timeout=wait_s)
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        self.watchdog.close()
        if pool is not None:
            pool.close()

    def __enter__(self) -> Database:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def hurry(self, seconds: float) -> None:
        """Shutting down: no database call from now on lasts longer than `seconds`."""
        self._hurry_s = seconds
        self.watchdog.hurry(seconds)

    def _current_pool(self) -> ConnectionPool[Conn]:
        """The pool, or a new one once a connection opened directly shows the server answers; a
        failure raises at once (the caller backs off), so no pool ever sits in its own backoff."""
        with self._lock:
            if self._closed:
                raise PoolClosed(f"the database handle {self.name!r} is closed")
            if self._pool is not None:
                return self._pool
            try:
                probe = psycopg.connect(self.dsn, **self.connect_params(), autocommit=True)
            except psycopg.Error as exc:
                self.connect_failures += 1
                raise DatabaseDown(f"cannot connect: {first_line(exc)}") from exc
            probe.close()
            pool: ConnectionPool[Conn] = ConnectionPool(
                self.dsn, min_size=self.min_size, max_size=self.max_size, open=False, name=self.name,
                kwargs={"row_factory": dict_row, "autocommit": False, **self.connect_params()},
                timeout=self.connect_timeout_s + 5.0, reconnect_timeout=self.connect_timeout_s + 5.0,
            )
            pool.open(wait=False)
            self._pool = pool
            return pool

    def drop(self, pool: ConnectionPool[Conn] | None = None) -> None:
        """Forget the pool (the one given, if still current): its idle connections close now, the
        lent ones when they come back; the next call reconnects."""
        with self._lock:
            if self._pool is None or (pool is not None and pool is not self._pool):
                return
            old, self._pool = self._pool, None
            self.generation += 1
        log.debug("dropped the connection pool (generation %d)", self.generation)
        # in the background: a worker of the old pool may be inside a connect attempt
        threading.Thread(target=old.close, kwargs={"timeout": self.connect_timeout_s + 1.0},
                         name="genesis-pool-close", daemon=True).start()

    def _retrying(self) -> Retrying:
        def retry_here(exc: BaseException) -> bool:
            # not DatabaseDown: a server that refused a connection just now is the caller's to wait out
            return (is_connection_error(exc) and not isinstance(exc, DatabaseDown)) or \
                getattr(exc, "sqlstate", None) in _RETRY_IN_STORE

        return Retrying(
            retry=retry_if_exception(retry_here),
            wait=wait_exponential_jitter(multiplier=0.05, max=0.5, jitter=0.05),
            stop=stop_after_delay(self.retry_for_s) | stop_after_attempt(4),
            reraise=True,
            # quiet: the consumer says once that the database is away; this is per attempt
            before_sleep=lambda state: log.debug("database error, retrying: %s",
                                                 state.outcome.exception() if state.outcome else "?"),
        )

    def run(self, fn: Callable[[Conn], T], *, single: bool = False) -> T:
        """fn(conn) in one transaction; the whole transaction is retried on a brief error.

        single=True: fn runs one statement, which is its own transaction, so it runs in autocommit:
        the BEGIN and COMMIT round trips cost the consumer about as much CPU as the statement."""
        for attempt in self._retrying():
            with attempt:
                return self._once(fn, single)
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def _holding(self) -> Iterator[None]:
        """Count this thread's pooled connections; a second one (outside a maintenance lock) is a
        bug that could wait forever on a full pool, so it fails at once."""
        held = self._held.n
        if held >= self._held.allowed:
            raise RuntimeError(f"{threading.current_thread().name} asked the pool of {self.name!r} for a "
                               f"connection while holding {held}")
        self._held.n = held + 1
        try:
            yield
        finally:
            self._held.n = held

    def _once(self, fn: Callable[[Conn], T], single: bool = False) -> T:
        pool = self._current_pool()
        try:
            with self._holding(), pool.connection(timeout=min(pool.timeout, self._hurry_s or pool.timeout)) as conn:
                try:
                    with self.watchdog.watch(conn, self.call_timeout_s):
                        if single:
                            return _autocommit(conn, fn)
                        with conn.transaction():
                            return fn(conn)
                except psycopg.Error as exc:
                    if conn.broken or conn.closed or getattr(exc, "sqlstate", None) in _STALE_SESSIONS:
                        self.drop(pool)
                    raise
        except (PoolTimeout, PoolClosed):
            self.drop(pool)
            raise

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        pool = self._current_pool()
        with self._holding(), pool.connection() as conn:
            try:
                yield conn
            except psycopg.Error:
                if conn.broken or conn.closed:
                    self.drop(pool)
                raise

    @contextmanager
    def maintenance_connection(self) -> Iterator[Conn]:
        """A pooled connection for a maintenance lock, held across the job: one at a time in a
        process, and its thread may take one more for the job's own statements. A thread already
        holding one fails before it waits for another's job (which may be waiting for the pool)."""
        if self._held.n:
            raise RuntimeError(f"{threading.current_thread().name} asked for a maintenance lock on "
                               f"{self.name!r} while holding a pooled connection")
        with self._maintenance, self.connection() as conn:
            self._held.allowed = 2
            try:
                yield conn
            finally:
                self._held.allowed = 1


@contextmanager
def maintenance_lock(db: Database, job: str) -> Iterator[bool]:
    """One maintenance job's session-level advisory lock, on a pooled connection of its own held for
    the whole job (a transaction lock would keep one transaction open across file-system work or
    many batches). Yields False at once when another process holds it; the lock goes with the
    connection if this process dies. One such job runs at a time in a process (the others wait):
    its holder is the one thread allowed a second pooled connection, for the job's own statements."""
    with db.maintenance_connection() as conn:
        conn.autocommit = True
        try:
            locked = bool(one(conn.execute(sql("maintenance_try_lock"), {"job": job}))["locked"])
            try:
                yield locked
            finally:
                if locked:
                    conn.execute(sql("maintenance_unlock"), {"job": job})
        finally:
            conn.autocommit = False


class Listener:
    """A LISTEN connection of its own (never a pooled one: a pooled connection forgets what it
    listened to when the pool hands it on). It is opened again whenever the channels change or the
    pool has been dropped since (a reconnect: the old session and what it listened to are gone).

        conn, fresh = listener.connection(["genesis_control"])
        # fresh: just listening, so whatever was notified before was not heard
        for _ in conn.notifies(timeout=1.0, stop_after=1): ...
    """

    def __init__(self, db: Database, name: str):
        self.db, self.name = db, name
        self._conn: psycopg.Connection[Any] | None = None
        self._channels: tuple[str, ...] = ()
        self._generation = -1

    def connection(self, channels: Sequence[str]) -> tuple[psycopg.Connection[Any], bool]:
        wanted = tuple(channels)
        if (self._conn is not None and not self._conn.closed and self._channels == wanted
                and self._generation == self.db.generation):
            return self._conn, False
        self.close()
        generation = self.db.generation
        self._conn = conn = self.db.connect(self.name, autocommit=True)
        with self.db.watchdog.watch(conn, self.db.call_timeout_s):
            for channel in wanted:
                conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(channel)))
        self._channels, self._generation = wanted, generation
        return conn, True

    def wait(self, channels: Sequence[str], timeout_s: float) -> set[str]:
        """The channels notified (the first notification, and any that came with it), or every
        channel when they were just listened to again (whatever was notified before was not
        heard: look now); empty after timeout_s of silence. A database error closes the
        connection (the next call opens a new one) and propagates."""
        try:
            conn, fresh = self.connection(channels)
            if fresh:
                return set(channels)
            heard = {n.channel for n in conn.notifies(timeout=max(timeout_s, 0.0), stop_after=1)}
            if heard:       # and what else has arrived by now, without waiting
                heard.update(n.channel for n in conn.notifies(timeout=0.0))
            return heard
        except psycopg.Error:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
        self._conn = None


def _autocommit(conn: Conn, fn: Callable[[Conn], T]) -> T:
    """fn(conn) with autocommit on, set back before the connection returns to its pool (a
    connection left in autocommit would run the next caller's transaction statement by statement)."""
    conn.autocommit = True
    try:
        return fn(conn)
    finally:
        try:
            conn.autocommit = False
        except psycopg.Error:
            conn.close()        # broken: the pool discards a closed connection
