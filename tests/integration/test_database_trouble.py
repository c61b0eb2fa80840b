"""Database trouble on the real server: lost connections, silent and slow servers, a read-only
database, give-backs and wake-ups; nothing is lost or answered twice, and recovery waits on no backoff."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid

import psycopg
import pytest

from genesis_pgflow.consumer import Consumer, ConsumerOptions
from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.messages import RunStart
from genesis_pgflow.store.database import Database, is_transient, maintenance_lock
from genesis_pgflow.store.queue import PgQueueStore
from genesis_pgflow.testing import wait_until

pytestmark = pytest.mark.db
Q, RESULTS = "genesis_rule_updates", "genesis_rule_updates_results"


class Slowish:
    payload_type = "genesis_rule_update"

    def __call__(self, payload, ctx):
        time.sleep(0.002)
        return {"rule_id": payload.rule_id}


def _sql(dsn, statement, params=None):
    # writable whatever the database's default says (see the read-only test)
    with psycopg.connect(dsn, autocommit=True, options="-c default_transaction_read_only=off") as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def test_killing_the_consumers_connections_repeatedly_loses_nothing(db_dsn):
    """Five times, every connection of the consumer is killed while it works on a stage of the
    requests. Each stage is sent only after the kill before it, so the consumer cannot have
    finished everything before the fifth kill, however fast it is or however slow the machine."""
    stages, per_stage = 6, 70
    n = stages * per_stage

    def send_stage(k: int) -> None:
        _sql(db_dsn, "SELECT pgmq.send_batch(%s, %s::jsonb[])",
             (Q, [f'{{"type":"genesis_rule_update","namespace":"n","rule_id":"r{i}","confidence":0.9,"rule":{{}}}}'
                  for i in range(k * per_stage, (k + 1) * per_stage)]))

    def done() -> int:
        return int(_sql(db_dsn, f"SELECT count(*) FROM pgmq.q_{RESULTS}")[0][0])

    def kill_connections() -> bool:
        return bool(_sql(db_dsn, "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                                 "WHERE datname = current_database() AND pid <> pg_backend_pid()")[0][0])

    db = Database(db_dsn, max_size=4).open()
    store = PgQueueStore(db, "trouble:1")
    dispatcher = Dispatcher({"genesis_rule_update": Slowish()}, timeout_s=30, max_attempts=5,
                            retry_base_s=0.1, retry_max_s=1)
    consumer = Consumer(store, dispatcher, ConsumerOptions(queues=(Q,), parallel=4, batch_size=20,
                                                           poll_interval_s=0.05, lease_s=2))
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        for k in range(stages - 1):
            send_stage(k)
            wait_until(lambda k=k: done() > k * per_stage, 60, what=f"a result of stage {k}")
            wait_until(kill_connections, 60, what="a connection of the consumer to kill")
        send_stage(stages - 1)
        wait_until(lambda: done() >= n, 60, what=f"{n} results")
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


# --- recovery in seconds, refused writes waited out, give-backs, wake-ups ----------------------


class Quick:
    payload_type = "genesis_rule_update"

    def __call__(self, payload, ctx):
        return {"rule_id": payload.rule_id}


def _rule(i):
    return f'{{"type":"genesis_rule_update","namespace":"n","rule_id":"r{i}","confidence":0.9,"rule":{{}}}}'


def _send(dsn, i):
    return _sql(dsn, "SELECT pgmq.send(%s, %s::jsonb)", (Q, _rule(i)))[0][0]


def _answered(dsn, msg_id):
    return _sql(dsn, f"SELECT count(*) FROM pgmq.q_{RESULTS} WHERE (message->'request'->>'msg_id')::bigint = %s",
                (msg_id,))[0][0]


def _terminate(dsn, application_name):
    """pg_terminate_backend on every connection of one Database (found by its application_name)."""
    return _sql(dsn, "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                     "WHERE application_name LIKE %s", (application_name + "%",))[0][0]


class Running:
    """A consumer on its own Database (named so that its connections can be found), in a thread."""

    def __init__(self, dsn, *, parallel=4, **options):
        self.name = f"trouble-{uuid.uuid4().hex[:8]}"
        self.db = Database(dsn, max_size=parallel + 2, application_name=self.name).open()
        self.store = PgQueueStore(self.db, f"{self.name}:1")
        dispatcher = Dispatcher({"genesis_rule_update": Quick()}, timeout_s=30, max_attempts=3,
                                retry_base_s=0.1, retry_max_s=1)
        self.consumer = Consumer(self.store, dispatcher, ConsumerOptions(
            queues=(Q,), parallel=parallel, batch_size=10, poll_interval_s=0.2, **options), hurry=self.db.hurry)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)   # a failed test must not hang pytest
        self.thread.start()

    def _run(self):
        try:
            self.consumer.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self):
        self.consumer.stop()
        self.thread.join(30)
        self.store.close()
        self.db.close()
        assert not self.thread.is_alive() and self.error is None, self.error

    def listening(self):
        return _sql(self.store.db.dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                    (f"{self.name}:listen",))[0][0]


@pytest.mark.parametrize("parallel", [4, 32])
def test_after_its_connections_are_terminated_the_next_message_is_answered_from_a_fresh_pool(db_dsn, parallel):
    running = Running(db_dsn, parallel=parallel)
    try:
        first = _send(db_dsn, 1)
        wait_until(lambda: _answered(db_dsn, first), what="the first answer")
        wait_until(running.listening, what="the LISTEN connection")
        generation, failures = running.db.generation, running.db.connect_failures

        assert _terminate(db_dsn, running.name) >= 2          # the pool's and the LISTEN connection
        second = _send(db_dsn, 2)
        wait_until(lambda: _answered(db_dsn, second), what="the answer after the terminations")

        # The dead pool was dropped (not probed connection by connection) and every connection
        # attempt since has worked: nothing waited out a backoff.
        assert generation + 1 <= running.db.generation <= generation + 2
        assert running.db.connect_failures == failures
        assert running.db.pool.get_stats().get("connections_errors", 0) == 0
        wait_until(running.listening, what="the LISTEN connection, back")
        assert not running.consumer.outage.down
    finally:
        running.stop()


def test_every_connection_carries_keepalives_timeouts_and_its_name(db_dsn):
    with Database(db_dsn, application_name="trouble-params", statement_timeout_s=7.0) as db:
        settings = db.run(lambda conn: conn.execute(
            "SELECT current_setting('statement_timeout') AS st, "
            "current_setting('idle_in_transaction_session_timeout') AS idle, "
            "current_setting('application_name') AS name").fetchone())
        params = db.run(lambda conn: conn.info.get_parameters())
        with db.connect("listen") as own:
            own_name = own.execute("SELECT current_setting('application_name')").fetchone()[0]
    assert settings == {"st": "7s", "idle": "1min", "name": "trouble-params"}
    assert own_name == "trouble-params:listen"
    assert {k: params.get(k) for k in ("keepalives", "keepalives_idle", "tcp_user_timeout", "connect_timeout")} == {
        "keepalives": "1", "keepalives_idle": "10", "tcp_user_timeout": "30000", "connect_timeout": "5"}


def test_the_dsn_overrides_the_session_defaults(db_dsn):
    dsn = db_dsn + " keepalives_idle=60 application_name=mine options='-c statement_timeout=3s'"
    with Database(dsn, application_name="ignored", statement_timeout_s=7.0) as db:
        row = db.run(lambda conn: conn.execute(
            "SELECT current_setting('statement_timeout') AS st, current_setting('application_name') AS name"
        ).fetchone())
        assert db.run(lambda conn: conn.info.get_parameters()).get("keepalives_idle") == "60"
    assert row == {"st": "3s", "name": "mine"}


def test_a_single_statement_runs_alone_and_the_next_caller_still_gets_a_transaction(db_dsn):
    """run(single=True) skips BEGIN and COMMIT (the read's one statement, one round trip); the
    connection goes back to its pool transactional, even after the statement failed."""
    table = f"single_{uuid.uuid4().hex[:8]}"
    _sql(db_dsn, f"CREATE TABLE {table} (n int)")
    try:
        with Database(db_dsn, max_size=1, retry_for_s=0) as db:       # one connection: the same session
            assert db.run(lambda conn: conn.execute("SELECT pg_current_xact_id_if_assigned() IS NULL AS none, "
                                                    "now() = statement_timestamp() AS alone").fetchone(),
                          single=True) == {"none": True, "alone": True}
            with pytest.raises(psycopg.errors.DivisionByZero):
                db.run(lambda conn: conn.execute("SELECT 1 / 0"), single=True)

            def insert_then_fail(conn):
                conn.execute(f"INSERT INTO {table} VALUES (1)")
                raise RuntimeError("after the insert")
            with pytest.raises(RuntimeError):
                db.run(insert_then_fail)
            # rolled back: the insert was inside a transaction, not committed on its own
            assert db.run(lambda conn: conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()) == {"n": 0}
            assert db.run(lambda conn: conn.autocommit) is False
    finally:
        _sql(db_dsn, f"DROP TABLE {table}")


def test_a_thread_holds_one_pooled_connection_and_a_maintenance_lock_holder_two(db_dsn):
    """A second connection asked for inside run() fails at once, never waits on a full pool: so a
    pool of --parallel + 1 (every worker, then the loop) cannot wait on itself. The holder of a
    maintenance lock runs its job's statements beside the lock's connection, one holder at a time."""
    with Database(db_dsn, max_size=2, retry_for_s=0) as db:
        with pytest.raises(RuntimeError, match="while holding 1"):
            db.run(lambda conn: db.run(lambda inner: inner.execute("SELECT 1")))
        assert db.run(lambda conn: conn.execute("SELECT 2 AS n").fetchone()) == {"n": 2}   # the count went back

        def lock_inside(conn):
            with maintenance_lock(db, "job-a"):
                pass
        with pytest.raises(RuntimeError, match="maintenance lock .* while holding a pooled connection"):
            db.run(lock_inside)       # fails before it waits for another thread's job

        order: list[str] = []
        inside = threading.Event()
        with maintenance_lock(db, "job-a") as locked:
            assert locked
            assert db.run(lambda conn: conn.execute("SELECT 3 AS n").fetchone()) == {"n": 3}
            with pytest.raises(RuntimeError, match="while holding 2"):
                db.run(lambda conn: db.run(lambda inner: inner.execute("SELECT 1")))

            def other_job() -> None:
                with maintenance_lock(db, "job-b") as b_locked:
                    order.append(f"b {b_locked}")
                    inside.set()
            other = threading.Thread(target=other_job)
            other.start()
            # the other job waits for this one (it would otherwise take the pool's last connection
            # and wait for a second one while this job waited for it)
            assert not inside.wait(0.3)
            order.append("a done")
        other.join(10)
        assert order == ["a done", "b True"]
        with pytest.raises(RuntimeError, match="while holding 1"):      # the allowance went with the lock
            db.run(lambda conn: db.run(lambda inner: inner.execute("SELECT 1")))


def test_a_slow_statement_is_cancelled_by_the_server_and_is_transient(db_dsn):
    with Database(db_dsn, statement_timeout_s=0.2, retry_for_s=0) as db:
        with pytest.raises(psycopg.errors.QueryCanceled) as raised:
            db.run(lambda conn: conn.execute("SELECT pg_sleep(5)"))
        assert is_transient(raised.value)
        assert db.run(lambda conn: conn.execute("SELECT 1 AS one").fetchone()) == {"one": 1}
        assert db.generation == 0           # the session was fine: nothing dropped


def test_a_server_that_stops_answering_is_cut_by_the_watchdog(db_dsn):
    # statement_timeout far away: only the client's own deadline can end the wait
    with Database(db_dsn, statement_timeout_s=60.0, call_timeout_s=0.5, retry_for_s=0) as db:
        with pytest.raises(psycopg.OperationalError) as raised:
            db.run(lambda conn: conn.execute("SELECT pg_sleep(4)"))
        assert is_transient(raised.value)
        assert db.watchdog.cuts == 1 and db.generation == 1
        assert db.run(lambda conn: conn.execute("SELECT 1 AS one").fetchone()) == {"one": 1}


def test_hurry_cuts_a_call_that_is_already_waiting(db_dsn):
    with Database(db_dsn, statement_timeout_s=60.0, retry_for_s=0) as db:
        started = threading.Event()
        failure: list[BaseException] = []

        def slow():
            try:
                db.run(lambda conn: (started.set(), conn.execute("SELECT pg_sleep(4)")))
            except psycopg.Error as exc:
                failure.append(exc)

        thread = threading.Thread(target=slow)
        thread.start()
        assert started.wait(10)
        db.hurry(0.2)
        thread.join(10)
        assert not thread.is_alive() and failure and db.watchdog.cuts == 1


def test_release_gives_messages_back_without_spending_an_attempt(db_dsn):
    with Database(db_dsn) as db:
        store = PgQueueStore(db, "release:1")
        a, b = _send(db_dsn, 1), _send(db_dsn, 2)
        read = store.read(Q, 2, lease_s=30)
        assert [m.read_ct for m in read] == [1, 1]
        store.record_running([RunStart(m, str(uuid.uuid4()), dt.datetime.now(dt.UTC)) for m in read])
        store.release(Q, [a, b])
        rows = _sql(db_dsn, f"SELECT msg_id, read_ct, vt <= clock_timestamp() FROM pgmq.q_{Q} ORDER BY msg_id")
        assert rows == [(a, 0, True), (b, 0, True)]
        runs = _sql(db_dsn, "SELECT msg_id, status, attempts FROM genesis.workflow_runs ORDER BY msg_id")
        assert runs == [(a, "pending", 0), (b, "pending", 0)]
        [again, _] = store.read(Q, 2, lease_s=0)   # read again: attempt 1, and its lease already over
        assert again.read_ct == 1
        store.release(Q, [a])                      # not leased any more: not ours to give back
        assert _sql(db_dsn, f"SELECT read_ct FROM pgmq.q_{Q} WHERE msg_id = %s", (a,)) == [(1,)]


def test_one_send_batch_of_a_thousand_wakes_a_listener_once(db_dsn):
    with psycopg.connect(db_dsn, autocommit=True) as listener:
        listener.execute(f'LISTEN "pgmq.q_{Q}.INSERT"')
        with psycopg.connect(db_dsn, autocommit=True) as producer:
            producer.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])", (Q, [_rule(i) for i in range(1000)]))
        first = list(listener.notifies(timeout=10, stop_after=1))
        more = list(listener.notifies(timeout=0.5))
    assert [n.channel for n in first] == [f"pgmq.q_{Q}.INSERT"] and more == []
    assert _sql(db_dsn, f"SELECT count(*) FROM pgmq.q_{Q}") == [(1000,)]
    assert _sql(db_dsn, "SELECT count(*) FROM pgmq.notify_insert_throttle") == [(0,)]   # no shared row


def test_two_producers_in_open_transactions_do_not_wait_on_each_other(db_dsn):
    with psycopg.connect(db_dsn) as first, psycopg.connect(db_dsn) as second:
        first.execute("SELECT pgmq.send(%s, %s::jsonb)", (Q, _rule(1)))       # transaction left open
        # would fail (not hang) if it had to wait for the first producer's transaction
        second.execute("SET lock_timeout = '1s'")
        second.execute("SELECT pgmq.send(%s, %s::jsonb)", (Q, _rule(2)))
        second.commit()
        assert _sql(db_dsn, f"SELECT count(*) FROM pgmq.q_{Q}") == [(1,)]
        first.commit()
    assert _sql(db_dsn, f"SELECT count(*) FROM pgmq.q_{Q}") == [(2,)]


def test_a_read_only_database_is_waited_out_and_work_resumes_when_it_is_writable(db_dsn, caplog):
    caplog.set_level(logging.INFO, logger="genesis_pgflow.consumer")
    running = Running(db_dsn)
    name = psycopg.conninfo.conninfo_to_dict(db_dsn)["dbname"]
    try:
        wait_until(running.listening, what="the consumer's connections")
        _sql(db_dsn, f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        _terminate(db_dsn, running.name)            # new sessions pick the setting up
        wait_until(lambda: running.consumer.outage.down, what="the consumer to notice")
        waiting = _send(db_dsn, 1)
        wait_until(lambda: running.consumer.outage.attempts >= 3, what="a few attempts")
        assert running.thread.is_alive() and running.error is None
        assert "read-only transaction" in running.consumer.outage.last_error

        _sql(db_dsn, f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        wait_until(lambda: _answered(db_dsn, waiting), what="the answer once writable")
        assert not running.consumer.outage.down and running.consumer.outage.count == 1
    finally:
        try:
            _sql(db_dsn, f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        finally:
            running.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "genesis_pgflow.consumer"]
    assert len([m for m in messages if m.startswith("database unavailable (")]) == 1
    assert len([m for m in messages if m.startswith("database back after")]) == 1
