"""Runs written at their end: a read no longer writes a `running` run (the consumer records one
only for a run held a second or more, store/queue.py record_running), so a retry may be the
first row of its run, and two retries in a row need not have a read between them that clears
next_attempt_at. The triggers that copy errors to genesis.run_errors follow: a retry inserted
is an error too, and an update is a new retry when its attempt is a new one.

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    DROP TRIGGER run_failed_at_once ON genesis.workflow_runs;
    CREATE TRIGGER run_failed_at_once AFTER INSERT ON genesis.workflow_runs FOR EACH ROW
        WHEN (NEW.error IS NOT NULL AND (NEW.status = 'failed' OR (NEW.status = 'pending' AND NEW.next_attempt_at IS NOT NULL)))
        EXECUTE FUNCTION genesis.record_run_error();
    -- a retry sets next_attempt_at; a graceful give-back does not, and is no error
    DROP TRIGGER run_error ON genesis.workflow_runs;
    CREATE TRIGGER run_error AFTER UPDATE ON genesis.workflow_runs FOR EACH ROW
        WHEN (NEW.error IS NOT NULL AND (
              (NEW.status = 'failed' AND OLD.status IS DISTINCT FROM 'failed')
           OR (NEW.status = 'pending' AND NEW.next_attempt_at IS NOT NULL
               AND (OLD.next_attempt_at IS NULL OR OLD.attempts IS DISTINCT FROM NEW.attempts))))
        EXECUTE FUNCTION genesis.record_run_error();
    """)


def downgrade() -> None:
    op.execute("""
    DROP TRIGGER run_failed_at_once ON genesis.workflow_runs;
    CREATE TRIGGER run_failed_at_once AFTER INSERT ON genesis.workflow_runs FOR EACH ROW
        WHEN (NEW.status = 'failed' AND NEW.error IS NOT NULL)
        EXECUTE FUNCTION genesis.record_run_error();
    DROP TRIGGER run_error ON genesis.workflow_runs;
    CREATE TRIGGER run_error AFTER UPDATE ON genesis.workflow_runs FOR EACH ROW
        WHEN (NEW.error IS NOT NULL AND (
              (NEW.status = 'failed' AND OLD.status IS DISTINCT FROM 'failed')
           OR (NEW.status = 'pending' AND NEW.next_attempt_at IS NOT NULL AND OLD.next_attempt_at IS NULL)))
        EXECUTE FUNCTION genesis.record_run_error();
    """)
