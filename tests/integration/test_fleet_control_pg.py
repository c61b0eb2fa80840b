"""A consumer's control channel on the real server: after its connections are terminated it
listens again, and a pause made afterwards still reaches it through NOTIFY alone (the table's
periodic re-read is set far beyond the test)."""

from __future__ import annotations

import threading

import psycopg
import pytest

from genesis_pgflow.consumer import Consumer, ConsumerOptions
from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.store.admin import PgAdminStore
from genesis_pgflow.store.control import PgControlStore
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.queue import PgQueueStore
from genesis_pgflow.testing import wait_until

pytestmark = pytest.mark.db
Q = "genesis_rule_updates"


class Rules:
    payload_type = "genesis_rule_update"

    def __call__(self, payload, ctx):
        return {"rule_id": payload.rule_id}


def _control_listeners(dsn: str, name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("""SELECT count(*) FROM pg_stat_activity WHERE application_name = %s
                               AND query LIKE 'LISTEN %%genesis_control%%'""", (f"{name}:control",)).fetchone()[0]


def _terminate(dsn: str, name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return len(conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name "
                                "LIKE %s AND pid <> pg_backend_pid()", (f"{name}%",)).fetchall())


def test_after_its_connections_are_terminated_the_control_channel_listens_again(db_dsn):
    name = "fleet-control-test"
    db = Database(db_dsn, application_name=name).open()
    control = PgControlStore(db, "test:1")
    options = ConsumerOptions(queues=(Q,), poll_interval_s=0.1, control_poll_s=3600.0)
    queues = PgQueueStore(db, "test:1")
    consumer = Consumer(queues, Dispatcher({"genesis_rule_update": Rules()}, timeout_s=5.0, max_attempts=3,
                                                                   retry_base_s=1.0, retry_max_s=5.0),
                        options, control=control)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    admin = PgAdminStore(db)
    try:
        wait_until(lambda: _control_listeners(db_dsn, name) == 1, 30, what="the control channel")
        assert _terminate(db_dsn, name) >= 2                  # the pool's, LISTEN's and the control channel
        # the loop finds its pool broken and drops it; the channel follows the new generation
        wait_until(lambda: _control_listeners(db_dsn, name) == 1, 60, what="the control channel, back")
        admin.pause_queue(Q)
        wait_until(lambda: consumer.paused == {Q}, 60, what="the pause, through NOTIFY")
        admin.resume_queue(Q)
        wait_until(lambda: consumer.paused == frozenset(), 60, what="the resume, through NOTIFY")
    finally:
        consumer.stop()
        thread.join(30)
        control.close()
        queues.close()
        db.close()
    assert not thread.is_alive()
