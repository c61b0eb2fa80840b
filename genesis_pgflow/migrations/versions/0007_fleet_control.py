"""Steering the fleet: queue pauses and consumer commands (drain, stop), honoured through NOTIFY.

One control table: a row per paused queue (scope 'queue') and per command to a consumer (scope
'consumer'). Any change to it (from `genesis queues|consumers ...`, the dashboard or plain SQL)
notifies the channel genesis_control; every consumer LISTENs there, re-reads the table and acts,
and also re-reads it at each heartbeat in case a notification was missed. A paused queue is
refused in SQL too: the consumers' read statements lease nothing from it.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE genesis.fleet_control (
        scope       text        NOT NULL CHECK (scope IN ('queue', 'consumer')),
        target      text        NOT NULL,
        command     text        NOT NULL,
        issued_at   timestamptz NOT NULL DEFAULT now(),
        issued_by   text        NOT NULL DEFAULT session_user,
        honoured_at timestamptz,
        PRIMARY KEY (scope, target),
        CHECK ((scope = 'queue' AND command = 'pause') OR (scope = 'consumer' AND command IN ('drain', 'stop')))
    );
    COMMENT ON TABLE genesis.fleet_control IS
        'Operators steering the consumers: a row (queue, Q, pause) while queue Q is paused (no consumer leases its '
        'messages; delete the row to resume), a row (consumer, ID, drain|stop) while consumer ID is told to drain '
        '(finish what it holds, exit 0) or stop (as SIGTERM). honoured_at: when the consumer began to act on it. '
        'Every change notifies the channel genesis_control; consumers also re-read this table at each heartbeat.';

    CREATE FUNCTION genesis.notify_fleet_control() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('genesis_control', '');
        RETURN NULL;
    END
    $$;
    -- per row, so that a statement changing nothing (the heartbeat's clean-up) notifies nobody;
    -- PostgreSQL folds the identical notifications of one transaction into one
    CREATE TRIGGER fleet_control_added_or_removed AFTER INSERT OR DELETE ON genesis.fleet_control
        FOR EACH ROW EXECUTE FUNCTION genesis.notify_fleet_control();
    -- honoured_at alone changes nothing a consumer acts on: no notification for it
    CREATE TRIGGER fleet_control_changed AFTER UPDATE ON genesis.fleet_control
        FOR EACH ROW WHEN (OLD.command IS DISTINCT FROM NEW.command OR OLD.target IS DISTINCT FROM NEW.target
                           OR OLD.scope IS DISTINCT FROM NEW.scope)
        EXECUTE FUNCTION genesis.notify_fleet_control();

    GRANT SELECT ON genesis.fleet_control TO pg_monitor;
    """)


def downgrade() -> None:
    op.execute("""
    DROP TABLE IF EXISTS genesis.fleet_control;
    DROP FUNCTION IF EXISTS genesis.notify_fleet_control();
    """)
