"""The queue seam: read, complete, retry and lease messages in pgmq (QueueStore, and its PostgreSQL form)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import psycopg
from psycopg.rows import scalar_row, tuple_row
from psycopg.types.json import Jsonb

from genesis_pgflow.cipher import SecretCipher
from genesis_pgflow.errors import InvalidPayload
from genesis_pgflow.messages import (
    ID_FIELDS,
    MAX_IDENTIFIER_CHARS,
    IntakeLimits,
    Outcome,
    ReadMessage,
    RunStart,
    dead_letter_headers,
    dead_letter_queue,
    envelope,
    is_reply_queue,
    request_headers,
    result_queue,
    settle,
    take_in,
)
from genesis_pgflow.store.database import Conn, Database, Listener, StoreError, one
from genesis_pgflow.store.queries import sql, with_tables

log = logging.getLogger(__name__)


class QueueStore(Protocol):
    """What the consumer needs from the queue engine. PgQueueStore and testing.MemoryQueueStore
    both pass tests/conformance."""

    def read(self, queue: str, qty: int, lease_s: int, *, waited_s: float = 0.0) -> list[ReadMessage]:
        """Lease up to qty visible messages (visible for waited_s seconds at least) for lease_s
        seconds. Their runs are not written here: a run is recorded once it has run a while
        (record_running), or when it ends."""

    def record_running(self, runs: Sequence[RunStart]) -> None:
        """Record runs still going as running, in one transaction; a run already finished, or
        recorded by a later read of its message (this read's lease was lost), is left as it is."""

    def complete(self, outcomes: Sequence[Outcome]) -> list[Outcome]:
        """For final outcomes, in one transaction: publish each result (and copy dead letters to
        the dlq), archive each request, record each run. Returns the outcomes applied: one whose
        request was no longer in its queue (completed elsewhere) is skipped, never published twice."""

    def retry(self, outcomes: Sequence[Outcome]) -> None:
        """Make each request visible again after its retry delay and record its run pending, unless
        the read the outcome came from is no longer the message's latest (its lease was lost)."""

    def extend_leases(self, queue: str, msg_ids: Sequence[int], lease_s: int) -> set[int]:
        """Push the leases of in-flight messages ahead; returns the ids still in the queue."""

    def release(self, queue: str, msg_ids: Sequence[int], read_cts: Sequence[int] | None = None) -> None:
        """Give leased messages back (graceful shutdown): visible again at once, runs pending, and
        the read that leased them not counted as an attempt. With read_cts, only the messages
        still held by those reads (a lease lost meanwhile is someone else's now)."""

    def wait_for_messages(self, queues: Sequence[str], timeout_s: float) -> set[str]:
        """Block until a message may have arrived in one of the queues, or timeout; returns the
        queues that may have new messages (every one when the listening has just begun: what came
        before was not heard), empty on timeout. Raises StoreError when it cannot listen (the
        caller backs off and polls meanwhile)."""

    def send(self, queue: str, body: Any, headers: Any = None) -> int:
        """Enqueue one message, with pgmq headers if given."""

    def depth(self, queues: Sequence[str]) -> int:
        """How many messages the queues hold, visible or not."""

    def close(self) -> None:
        """Release connections."""


def _group(outcomes: Iterable[Outcome]) -> dict[str, list[Outcome]]:
    grouped: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        grouped[outcome.message.queue].append(outcome)
    return grouped


def _by_destination(outcomes: Iterable[Outcome]) -> dict[str, list[Outcome]]:
    """Results by the queue they go to: the paired result queue, or a request's reply_to queue."""
    grouped: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        grouped[outcome.message.destination].append(outcome)
    return grouped


def _bigint_array(ids: Sequence[int]) -> str:
    """Message ids as an array literal for a bigint[] parameter: psycopg dumps a list of ints at
    about 2 us an element, this text at 0.2."""
    return "{" + ",".join(map(str, ids)) + "}"


def _run_rows(runs: Iterable[RunStart | Outcome]) -> list[dict[str, Any]]:
    """What record_running and record_retries write of a run that is not over."""
    return [{"msg_id": r.message.msg_id, "workflow_id": r.workflow_id, "type": r.message.type,
             "attempts": r.message.read_ct, "enqueued_at": r.message.enqueued_at.isoformat(),
             "started_at": r.started_at.isoformat()} for r in runs]


def _server_away(exc: StoreError) -> bool:
    """The database could not be reached or the connection broke: no message is to blame."""
    state = exc.sqlstate
    return isinstance(exc, psycopg.OperationalError) and (state is None or state.startswith(("08", "57P")))


def _message_fault(exc: StoreError) -> bool:
    """Whether the server refused to read one message because of what the message is (data,
    size, memory, time) rather than because it is away."""
    state = exc.sqlstate or ""
    return state[:2] in ("22", "54", "XX") or state in ("53200", "57014")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PgQueueStore:
    """QueueStore on PostgreSQL with pgmq; each method is one transaction of named queries."""

    def __init__(self, db: Database, consumer: str, limits: IntakeLimits | None = None,
                 cipher: SecretCipher | None = None):
        self.db = db
        self.cipher = cipher    # seals the secrets of LLM configuration dead letters
        self.consumer = consumer
        self.limits = limits or IntakeLimits()
        self._listener = Listener(db, "listen")
        self._reply_queues: set[str] = set()    # reply_to queues known to exist (created, or found)

    # --- the hot path ---------------------------------------------------------------------

    def read(self, queue: str, qty: int, lease_s: int, *, waited_s: float = 0.0) -> list[ReadMessage]:
        """Bodies come as JSON text and are decoded one by one (messages.take_in), so that no
        message, whatever PostgreSQL accepted, fails the batch; if the batch read fails all the
        same, the messages are leased without their bodies and each body is read on its own."""
        params = {"queue": queue, "qty": qty, "lease_s": lease_s, "waited_s": waited_s, **self._limit_params()}
        try:
            # one statement, so its own transaction: one round trip
            query = with_tables("read_batch", table=f"q_{queue}")
            # as tuples (a dict per row cost the loop a tenth of its time), in _take_in's order
            rows = self.db.run(lambda conn: conn.cursor(row_factory=tuple_row).execute(query, params).fetchall(),
                               single=True)
        except StoreError as exc:
            if _server_away(exc):
                raise
            log.warning("reading a batch of %s failed (%s); reading its messages one by one", queue, _first_line(exc))
            return self._read_one_by_one(queue, params)
        return [self._take_in(queue, *row) for row in rows]

    def _limit_params(self) -> dict[str, Any]:
        return {"max_payload_bytes": self.limits.max_payload_bytes, "max_headers_bytes": self.limits.max_headers_bytes,
                "id_fields": list(ID_FIELDS), "max_identifier_bytes": 4 * MAX_IDENTIFIER_CHARS + 2}

    def _take_in(self, queue: str, msg_id: int, read_ct: int, enqueued_at: dt.datetime, body_bytes: int | None,
                 headers_bytes: int | None, body: str | None, headers: str | None, identifiers: str | None
                 ) -> ReadMessage:
        """A leased message from its columns, in the order read_batch returns them (read_body returns
        the texts' part, from body_bytes on, in the same order)."""
        return take_in(queue, msg_id, read_ct, enqueued_at, body=body, body_bytes=body_bytes, headers=headers,
                       headers_bytes=headers_bytes, identifiers=identifiers, limits=self.limits)

    def _read_one_by_one(self, queue: str, params: dict[str, Any]) -> list[ReadMessage]:
        leases = self.db.run(lambda conn: conn.execute(sql("lease_bare"), params).fetchall())
        query = with_tables("read_body", table=f"q_{queue}")
        messages = []
        for lease in leases:
            body_params = {"msg_id": lease["msg_id"], **self._limit_params()}
            try:
                texts = self.db.run(
                    lambda conn: conn.cursor(row_factory=tuple_row).execute(query, body_params).fetchone())  # noqa: B023 - run now
            except StoreError as exc:
                if not _message_fault(exc):
                    raise
                log.error("message %s/%s cannot be read: %s", queue, lease["msg_id"], _first_line(exc))
                problem = InvalidPayload(f"the message could not be read from its queue: {_first_line(exc)}",
                                         details={"field": "payload", "sqlstate": exc.sqlstate})
                messages.append(ReadMessage(queue, lease["msg_id"], lease["read_ct"], lease["enqueued_at"], None,
                                            problem=problem))
                continue
            if texts is not None:   # None: archived by someone else meanwhile
                messages.append(self._take_in(queue, lease["msg_id"], lease["read_ct"], lease["enqueued_at"], *texts))
        return messages

    def complete(self, outcomes: Sequence[Outcome]) -> list[Outcome]:
        if not outcomes:
            return []
        try:
            applied = self.db.run(lambda conn: self._complete(conn, outcomes))
        except psycopg.errors.UndefinedTable:
            if not self._reply_queues:
                raise
            # a reply_to queue this process created was dropped since (by a DBA): forget them all, once
            self._reply_queues.clear()
            applied = self.db.run(lambda conn: self._complete(conn, outcomes))
        # known to exist from now on: no pgmq.create for them in later transactions
        self._reply_queues.update(filter(is_reply_queue, (o.message.destination for o in applied)))
        return applied

    def _complete(self, conn: Conn, outcomes: Sequence[Outcome]) -> list[Outcome]:
        applied: list[Outcome] = []
        for queue, items in _group(outcomes).items():
            ids = _bigint_array([o.message.msg_id for o in items])
            # Archive first: only what this transaction removed from the queue gets a result, so a
            # message finished elsewhere (lease lost) or by a retried commit is never answered twice.
            archive = with_tables("archive_batch", table=f"q_{queue}", archive=f"a_{queue}")
            archived = set(conn.cursor(row_factory=scalar_row).execute(archive, {"msg_ids": ids}))
            # deferred state writes (rules, LLM configurations) join this transaction
            mine = settle([o for o in items if o.message.msg_id in archived], conn)
            if not mine:
                continue
            dead = [o for o in mine if o.kind == "dead_letter"]
            with conn.pipeline():   # a statement per destination (and a create per new reply_to queue), one round trip
                for destination, answers in _by_destination(mine).items():
                    if destination != result_queue(queue) and destination not in self._reply_queues:
                        # first use here: pgmq.create is idempotent and locks the name against a racing twin
                        conn.execute(sql("create_queue"), {"queue": destination})
                    # each result carries its request's pgmq headers (a producer's correlation id), and
                    # each run is recorded as its result says, from the same JSON text (sent as text:
                    # the server parses it once for both)
                    conn.execute(with_tables("send_results", table=f"q_{destination}"), {
                        "queue": queue, "consumer": self.consumer,
                        "results": json.dumps([envelope(o, self.consumer) for o in answers]),
                        "headers": Jsonb([request_headers(o) for o in answers]),
                        # as JSON text: psycopg spends about 8 us per element dumping a list of datetimes
                        "enqueued_at": json.dumps([o.message.enqueued_at.isoformat() for o in answers])})
                if dead:
                    conn.execute(sql("send_batch"), {
                        "queue": dead_letter_queue(queue),
                        "messages": Jsonb([self.cipher.seal_dead_letter(queue, o.message.body) if self.cipher
                                           else o.message.body for o in dead]),
                        "headers": Jsonb([dead_letter_headers(o) for o in dead])})
            applied += mine
        return applied

    def retry(self, outcomes: Sequence[Outcome]) -> None:
        def tx(conn: Conn) -> None:
            for queue, items in _group(outcomes).items():
                params: dict[str, Any] = {
                    "queue": queue, "msg_ids": [o.message.msg_id for o in items],
                    "read_cts": [o.message.read_ct for o in items], "delays": [o.retry_after_s for o in items]}
                # fenced by the read count: a retry of a read whose lease was lost (the message read
                # again elsewhere, or finished) touches neither the message nor its run
                kept = [r["msg_id"] for r in conn.execute(with_tables("schedule_retries", table=f"q_{queue}"), params)]
                if not kept:
                    continue
                runs = [{**row, "delay_s": o.retry_after_s, "error": o.error.as_json() if o.error else None}
                        for row, o in zip(_run_rows(items), items, strict=True)]
                conn.execute(sql("record_retries"), {"queue": queue, "consumer": self.consumer, "kept": kept,
                                                     "runs": Jsonb(runs)})
        if outcomes:
            self.db.run(tx)

    def record_running(self, runs: Sequence[RunStart]) -> None:
        by_queue: dict[str, list[RunStart]] = defaultdict(list)
        for run in runs:
            by_queue[run.message.queue].append(run)

        def tx(conn: Conn) -> None:
            for queue, items in by_queue.items():
                conn.execute(with_tables("record_running", table=f"q_{queue}"),
                             {"queue": queue, "consumer": self.consumer, "runs": Jsonb(_run_rows(items))})
        if runs:
            self.db.run(tx)

    def extend_leases(self, queue: str, msg_ids: Sequence[int], lease_s: int) -> set[int]:
        if not msg_ids:
            return set()
        params = {"queue": queue, "msg_ids": list(msg_ids), "lease_s": lease_s}
        return {r["msg_id"] for r in self.db.run(lambda conn: conn.execute(sql("extend_leases"), params).fetchall())}

    def release(self, queue: str, msg_ids: Sequence[int], read_cts: Sequence[int] | None = None) -> None:
        if not msg_ids:
            return
        params: dict[str, Any] = {"queue": queue, "msg_ids": list(msg_ids),
                                  "read_cts": list(read_cts) if read_cts is not None else [None] * len(msg_ids)}

        def tx(conn: Conn) -> None:
            released = [r["msg_id"] for r in conn.execute(with_tables("release_messages", table=f"q_{queue}"), params)]
            conn.execute(sql("release_runs"), {**params, "released": released})
        self.db.run(tx)

    # --- waking on NOTIFY -----------------------------------------------------------------

    def wait_for_messages(self, queues: Sequence[str], timeout_s: float) -> set[str]:
        """LISTEN on the insert channels (`pgmq.q_<queue>.INSERT`, see schema.py) on a connection
        of its own (store.database.Listener), opened again whenever the pool has been dropped since."""
        channels = {f"pgmq.q_{queue}.INSERT": queue for queue in queues}
        return {channels[c] for c in self._listener.wait(list(channels), timeout_s) if c in channels}

    # --- producers and operators ----------------------------------------------------------

    def send(self, queue: str, body: Any, headers: Any = None) -> int:
        params = {"queue": queue, "message": Jsonb(body), "headers": None if headers is None else Jsonb(headers)}
        return self.db.run(lambda conn: one(conn.execute(sql("send_one_with_headers"), params))["msg_id"])

    def depth(self, queues: Sequence[str]) -> int:
        return self.db.run(lambda conn: one(conn.execute(sql("total_depth"), {"queues": list(queues)}))["depth"])

    def close(self) -> None:
        self._listener.close()
