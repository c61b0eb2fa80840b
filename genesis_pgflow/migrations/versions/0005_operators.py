"""What operators and DBAs read: live consumers, each error a run met (retries included), views of
recent failures and throughput per minute, and read access to the views for pg_monitor.

Revision ID: 0005
Revises: 0003
"""

from alembic import op

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE genesis.consumers (
        id             text        PRIMARY KEY,
        host           text        NOT NULL,
        pid            integer     NOT NULL,
        version        text        NOT NULL,
        queues         text[]      NOT NULL,
        parallel       integer     NOT NULL,
        heartbeat_s    double precision NOT NULL CHECK (heartbeat_s > 0),
        started_at     timestamptz NOT NULL DEFAULT now(),
        last_heartbeat timestamptz NOT NULL DEFAULT now(),
        in_flight      integer     NOT NULL DEFAULT 0,
        state          text        NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'stopped', 'gone'))
    );
    COMMENT ON TABLE genesis.consumers IS
        'One row per genesis-consume process (id host:pid), kept by its heartbeat every heartbeat_s seconds; '
        'no heartbeat for 3 x heartbeat_s: gone. Rows gone or stopped for GENESIS_CONSUMER_RETENTION_S are deleted '
        'by the heartbeat of any live consumer.';

    CREATE TABLE genesis.run_errors (
        queue      text        NOT NULL,
        msg_id     bigint      NOT NULL,
        attempt    integer     NOT NULL,
        outcome    text        NOT NULL CHECK (outcome IN ('retry', 'failed')),
        error      jsonb       NOT NULL,
        retry_at   timestamptz,
        consumer   text,
        at         timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX run_errors_message_idx ON genesis.run_errors (queue, msg_id, at);
    COMMENT ON TABLE genesis.run_errors IS
        'Every error a run met: each retry (outcome retry, retry_at) and the final failure (outcome failed). '
        'Written by triggers on workflow_runs; successes write nothing here.';

    CREATE FUNCTION genesis.record_run_error() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO genesis.run_errors (queue, msg_id, attempt, outcome, error, retry_at, consumer)
        VALUES (NEW.queue, NEW.msg_id, NEW.attempts, CASE WHEN NEW.status = 'failed' THEN 'failed' ELSE 'retry' END,
                NEW.error, CASE WHEN NEW.status = 'pending' THEN NEW.next_attempt_at END, NEW.consumer);
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER run_failed_at_once AFTER INSERT ON genesis.workflow_runs FOR EACH ROW
        WHEN (NEW.status = 'failed' AND NEW.error IS NOT NULL)
        EXECUTE FUNCTION genesis.record_run_error();
    -- a retry sets next_attempt_at (every read clears it); a graceful give-back does not, and
    -- is no error
    CREATE TRIGGER run_error AFTER UPDATE ON genesis.workflow_runs FOR EACH ROW
        WHEN (NEW.error IS NOT NULL AND (
              (NEW.status = 'failed' AND OLD.status IS DISTINCT FROM 'failed')
           OR (NEW.status = 'pending' AND NEW.next_attempt_at IS NOT NULL AND OLD.next_attempt_at IS NULL)))
        EXECUTE FUNCTION genesis.record_run_error();

    -- pgmq.metrics() reads the queue tables with the caller's rights; this reads them with the
    -- owner's, so that a monitoring role sees counts and ages without the right to read bodies
    CREATE FUNCTION genesis.queue_metrics(queue text) RETURNS pgmq.metrics_result
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
        AS $$ SELECT * FROM pgmq.metrics(queue) $$;
    REVOKE ALL ON FUNCTION genesis.queue_metrics(text) FROM PUBLIC;

    CREATE OR REPLACE VIEW genesis.queue_health AS
        SELECT m.queue,
               m.type,
               q.queue_length                         AS depth,
               q.queue_length - q.queue_visible_length AS in_flight,
               q.oldest_msg_age_sec                   AS oldest_age_s,
               (SELECT count(*) FROM genesis.workflow_runs r WHERE r.queue = m.queue AND r.status = 'completed') AS completed,
               (SELECT count(*) FROM genesis.workflow_runs r WHERE r.queue = m.queue AND r.status = 'failed')    AS failed,
               (SELECT count(*) FROM genesis.workflow_runs r WHERE r.queue = m.queue AND r.status = 'pending')   AS retrying,
               d.queue_length                         AS dead_lettered,
               r.queue_length                         AS results_waiting
        FROM genesis.queue_map m
        CROSS JOIN LATERAL genesis.queue_metrics(m.queue) q
        CROSS JOIN LATERAL genesis.queue_metrics(m.dlq) d
        CROSS JOIN LATERAL genesis.queue_metrics(m.result_queue) r;

    CREATE VIEW genesis.recent_failures AS
        SELECT finished_at, queue, msg_id, type, attempts, error ->> 'code' AS code, error ->> 'message' AS message,
               workflow_id, consumer
        FROM genesis.workflow_runs
        WHERE status = 'failed' AND finished_at > now() - interval '24 hours'
        ORDER BY finished_at DESC;
    COMMENT ON VIEW genesis.recent_failures IS 'Failed runs of the last 24 hours, newest first: code and message.';

    CREATE VIEW genesis.throughput_per_minute AS
        SELECT date_trunc('minute', finished_at) AS minute, queue, coalesce(type, '(none)') AS type,
               count(*) FILTER (WHERE status = 'completed') AS completed,
               count(*) FILTER (WHERE status = 'failed')    AS failed,
               round(avg(extract(epoch FROM finished_at - started_at) * 1000)::numeric, 1) AS avg_ms
        FROM genesis.workflow_runs
        WHERE finished_at > now() - interval '24 hours'
        GROUP BY 1, 2, 3
        ORDER BY 1 DESC, 2, 3;
    COMMENT ON VIEW genesis.throughput_per_minute IS
        'Runs finished per minute, queue and type over the last 24 hours, with their mean duration.';

    -- pg_monitor exists on every server (PostgreSQL 10+): no role to create, a DBA grants it
    GRANT USAGE ON SCHEMA genesis TO pg_monitor;
    GRANT SELECT ON genesis.queue_health, genesis.recent_failures, genesis.throughput_per_minute,
                    genesis.consumers TO pg_monitor;
    GRANT EXECUTE ON FUNCTION genesis.queue_metrics(text) TO pg_monitor;
    """)


def downgrade() -> None:
    op.execute("""
    REVOKE ALL ON genesis.queue_health FROM pg_monitor;
    REVOKE USAGE ON SCHEMA genesis FROM pg_monitor;
    DROP VIEW IF EXISTS genesis.throughput_per_minute;
    DROP VIEW IF EXISTS genesis.recent_failures;
    CREATE OR REPLACE VIEW genesis.queue_health AS
        SELECT m.queue,
               m.type,
               q.queue_length                         AS depth,
               q.queue_length - q.queue_visible_length AS in_flight,
               q.oldest_msg_age_sec                   AS oldest_age_s,
               (SELECT count(*) FROM genesis.workflow_runs r WHERE r.queue = m.queue AND r.status = 'completed') AS completed,
               (SELECT count(*) FROM genesis.workflow_runs r WHERE r.queue = m.queue AND r.status = 'failed')    AS failed,
               (SELECT count(*) FROM genesis.workflow_runs r WHERE r.queue = m.queue AND r.status = 'pending')   AS retrying,
               d.queue_length                         AS dead_lettered,
               r.queue_length                         AS results_waiting
        FROM genesis.queue_map m
        CROSS JOIN LATERAL pgmq.metrics(m.queue) q
        CROSS JOIN LATERAL pgmq.metrics(m.dlq) d
        CROSS JOIN LATERAL pgmq.metrics(m.result_queue) r;
    DROP FUNCTION IF EXISTS genesis.queue_metrics(text);
    DROP TRIGGER IF EXISTS run_error ON genesis.workflow_runs;
    DROP TRIGGER IF EXISTS run_failed_at_once ON genesis.workflow_runs;
    DROP FUNCTION IF EXISTS genesis.record_run_error();
    DROP TABLE IF EXISTS genesis.run_errors;
    DROP TABLE IF EXISTS genesis.consumers;
    """)
