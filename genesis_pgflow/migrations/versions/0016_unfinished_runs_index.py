"""genesis.workflow_runs' index on (status, type) keeps only the runs not yet finished (pending,
running). Every run written ends finished, and each was an entry in that index as well: one more
index to write per message for a lookup no query makes (counts by status come from the tallies
since 0009, failed runs have an index of their own since 0015, and what DBAs look up by status,
the runs waiting for a retry or still running, stays indexed).

Revision ID: 0016
Revises: 0015
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    DROP INDEX IF EXISTS genesis.workflow_runs_status_idx;
    CREATE INDEX workflow_runs_unfinished_idx ON genesis.workflow_runs (status, type)
        WHERE status IN ('pending', 'running');
    """)


def downgrade() -> None:
    op.execute("""
    DROP INDEX IF EXISTS genesis.workflow_runs_unfinished_idx;
    CREATE INDEX workflow_runs_status_idx ON genesis.workflow_runs (status, type);
    """)
