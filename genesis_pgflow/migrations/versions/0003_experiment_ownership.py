"""Experiment records treated as sensitive and owned: a run's output tail is bounded (2000 characters)
and documented as sensitive; an experiment_id is documented as its instance_id's.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    UPDATE genesis.experiment_runs SET output_tail = right(output_tail, 2000)
    WHERE char_length(output_tail) > 2000;
    ALTER TABLE genesis.experiment_runs
        ADD CONSTRAINT experiment_runs_output_tail_bounded CHECK (char_length(output_tail) <= 2000);
    COMMENT ON COLUMN genesis.experiment_runs.output_tail IS
        'SENSITIVE: the last 2000 characters the test suite printed; it may hold anything the code under '
        'test could read. Shown by `genesis experiments show --output` only.';
    COMMENT ON COLUMN genesis.experiments.instance_id IS
        'The instance that owns experiment_id: a request from another instance with the same id is refused '
        '(experiment_id_taken).';
    """)


def downgrade() -> None:
    op.execute("""
    ALTER TABLE genesis.experiment_runs DROP CONSTRAINT IF EXISTS experiment_runs_output_tail_bounded;
    COMMENT ON COLUMN genesis.experiment_runs.output_tail IS NULL;
    COMMENT ON COLUMN genesis.experiments.instance_id IS NULL;
    """)
