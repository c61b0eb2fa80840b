"""What must hold after any fault, checked in SQL: every request has exactly one result message in
its result queue, exactly one archive row and exactly one terminal run row, and none is left
queued (the contract's section 3)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import psycopg

from genesis_pgflow.messages import QUEUES, dead_letter_queue


def _rows(conn: psycopg.Connection, statement: str) -> list[tuple]:
    return conn.execute(statement).fetchall()


def violations(dsn: str, sent: Mapping[str, Iterable[int]] | None = None) -> list[str]:
    """Every broken promise, as one line each (empty when all hold). `sent`: the msg_ids the test
    sent per request queue; without it, what the queue and its archive hold is taken as sent."""
    found: list[str] = []
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        for queue, (_kind, results_queue) in QUEUES.items():
            queued = [r[0] for r in _rows(conn, f"SELECT msg_id FROM pgmq.q_{queue} ORDER BY msg_id")]
            archived = Counter(r[0] for r in _rows(conn, f"SELECT msg_id FROM pgmq.a_{queue}"))
            answers = _rows(conn, f"""
                SELECT message->'request'->>'queue', (message->'request'->>'msg_id')::bigint,
                       message->>'status', message->'error'->>'code'
                FROM pgmq.q_{results_queue}""")
            runs = _rows(conn, f"SELECT msg_id, status FROM genesis.workflow_runs WHERE queue = '{queue}'")
            dead = _rows(conn, f"SELECT count(*) FROM pgmq.q_{dead_letter_queue(queue)}")[0][0]

            expected = set(sent.get(queue, ())) if sent is not None else set(queued) | set(archived)
            if queued:
                found.append(f"{queue}: {len(queued)} request(s) left queued: {queued[:10]}")
            missing = expected - set(archived)
            if missing:
                found.append(f"{queue}: {len(missing)} request(s) not archived: {sorted(missing)[:10]}")
            extra = set(archived) - expected
            if extra:
                found.append(f"{queue}: archived request(s) that were never sent: {sorted(extra)[:10]}")
            twice = {m: n for m, n in archived.items() if n > 1}
            if twice:
                found.append(f"{queue}: archived more than once: {twice}")

            per_request = Counter(msg_id for q, msg_id, _s, _c in answers if q == queue)
            stray = [(q, m) for q, m, _s, _c in answers if q != queue]
            if stray:
                found.append(f"{results_queue}: results of other queues' requests: {stray[:10]}")
            unanswered = [m for m in expected if per_request[m] == 0]
            if unanswered:
                found.append(f"{queue}: {len(unanswered)} request(s) without a result: {sorted(unanswered)[:10]}")
            doubled = {m: n for m, n in per_request.items() if n > 1}
            if doubled:
                found.append(f"{queue}: request(s) answered more than once: {doubled}")
            unsent = set(per_request) - expected
            if unsent:
                found.append(f"{queue}: results for requests never sent: {sorted(unsent)[:10]}")

            run_count = Counter(msg_id for msg_id, _status in runs)
            status = {msg_id: s for msg_id, s in runs}
            rowless = [m for m in sorted(expected) if run_count[m] != 1]
            if rowless:
                found.append(f"{queue}: {len(rowless)} request(s) without exactly one run row: "
                             + ", ".join(f"{m} ({run_count[m]})" for m in rowless[:10]))
            open_runs = [m for m in sorted(expected) if run_count[m] == 1 and status[m] not in ("completed", "failed")]
            if open_runs:
                found.append(f"{queue}: {len(open_runs)} run row(s) not terminal: "
                             + ", ".join(f"{m} ({status[m]})" for m in open_runs[:10]))
            answered_status = {m: s for q, m, s, _c in answers if q == queue}
            mismatched = [m for m in expected if m in answered_status and m in status
                          and answered_status[m] != status[m]]
            if mismatched:
                found.append(f"{queue}: run rows disagree with the results for {sorted(mismatched)[:10]}")
            dead_lettered = sum(1 for q, _m, _s, code in answers if q == queue and code == "max_attempts_exceeded")
            if dead != dead_lettered:
                found.append(f"{queue}: {dead} dead letter(s) for {dead_lettered} max_attempts_exceeded result(s)")
    return found


def assert_invariants(dsn: str, sent: Mapping[str, Iterable[int]] | None = None) -> None:
    found = violations(dsn, sent)
    assert not found, "invariants broken:\n" + "\n".join(found)
