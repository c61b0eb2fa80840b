"""Lost connections: the store re-establishes them, and nothing is lost or answered twice."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from genesis_pgflow.consumer import Consumer, ConsumerOptions
from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.queue import PgQueueStore

pytestmark = pytest.mark.db
Q, RESULTS = "genesis_rule_updates", "genesis_rule_updates_results"


class Slowish:
    payload_type = "genesis_rule_update"

    def __call__(self, payload, ctx):
        time.sleep(0.002)
        return {"rule_id": payload.rule_id}


def _sql(dsn, statement, params=None):
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def test_killing_the_consumers_connections_repeatedly_loses_nothing(db_dsn):
    n = 400
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])",
                      (Q, [f'{{"type":"genesis_rule_update","namespace":"n","rule_id":"r{i}","confidence":0.9,"rule":{{}}}}'
                           for i in range(n)]))
    db = Database(db_dsn, max_size=4).open()
    store = PgQueueStore(db, "trouble:1")
    dispatcher = Dispatcher({"genesis_rule_update": Slowish()}, timeout_s=30, max_attempts=5,
                            retry_base_s=0.1, retry_max_s=1)
    consumer = Consumer(store, dispatcher, ConsumerOptions(queues=(Q,), parallel=4, batch_size=20,
                                                           poll_interval_s=0.05, lease_s=2))
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        kills = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = _sql(db_dsn, f"SELECT count(*) FROM pgmq.q_{RESULTS}")[0][0]
            if done >= n:
                break
            if kills < 5 and done >= kills * n // 6:
                terminated = _sql(db_dsn, "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                                          "FROM pg_stat_activity WHERE datname = current_database() "
                                          "AND pid <> pg_backend_pid()")[0][0]
                kills += 1 if terminated else 0
            time.sleep(0.02)
        assert kills == 5
    finally:
        consumer.stop()
        thread.join(30)
        store.close()
        db.close()
    assert not thread.is_alive()
    ids = [r[0] for r in _sql(db_dsn, f"SELECT (message->'request'->>'msg_id')::bigint FROM pgmq.q_{RESULTS}")]
    assert len(ids) == n and len(set(ids)) == n                         # one result each, none twice
    assert _sql(db_dsn, f"SELECT count(*) FROM pgmq.a_{Q}")[0][0] == n   # every request archived
    assert _sql(db_dsn, f"SELECT count(*) FROM pgmq.q_{Q}")[0][0] == 0
    statuses = dict(_sql(db_dsn, "SELECT status, count(*) FROM genesis.workflow_runs GROUP BY status"))
    assert statuses == {"completed": n}


class NotANumber:
    payload_type = "genesis_rule_update"

    def __call__(self, payload, ctx):
        return {"rule_id": payload.rule_id, "score": float("nan") if payload.rule_id == "r3" else 1.0}


def test_an_outcome_the_database_refuses_fails_alone_and_the_batch_goes_through(db_dsn):
    for i in range(6):
        _sql(db_dsn, "SELECT pgmq.send(%s, %s::jsonb)",
             (Q, f'{{"type":"genesis_rule_update","namespace":"n","rule_id":"r{i}","confidence":0.9,"rule":{{}}}}'))
    db = Database(db_dsn, max_size=4).open()
    store = PgQueueStore(db, "refused:1")
    dispatcher = Dispatcher({"genesis_rule_update": NotANumber()}, timeout_s=30, max_attempts=3,
                            retry_base_s=0.1, retry_max_s=1)
    consumer = Consumer(store, dispatcher, ConsumerOptions(queues=(Q,), parallel=4, batch_size=10,
                                                           poll_interval_s=0.05, drain=True))
    try:
        consumer.run()
    finally:
        store.close()
        db.close()
    rows = _sql(db_dsn, f"SELECT message->'request'->>'msg_id', message->>'status', message->'error'->>'code', "
                        f"message->'error'->'details'->>'rule_id' FROM pgmq.q_{RESULTS} ORDER BY 1")
    assert len(rows) == 6
    refused = [r for r in rows if r[1] == "failed"]
    assert [(r[2], r[3]) for r in refused] == [("result_not_storable", "r3")]
    assert _sql(db_dsn, f"SELECT count(*) FROM pgmq.q_{Q}")[0][0] == 0
