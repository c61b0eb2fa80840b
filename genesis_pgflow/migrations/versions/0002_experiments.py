"""Experiment records: experiments, their test runs, and the history of their sandboxes.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE genesis.experiments (
        experiment_id         text        PRIMARY KEY,
        instance_id           text        NOT NULL,
        experiment_type       text        NOT NULL,
        description           text        NOT NULL DEFAULT '',
        risk_level            text        NOT NULL CHECK (risk_level IN ('low', 'medium', 'high')),
        repo                  text        NOT NULL,
        base_ref              text        NOT NULL DEFAULT 'HEAD',
        status                text        NOT NULL
                              CHECK (status IN ('running', 'success', 'regressed', 'failed')),
        attempts              integer     NOT NULL DEFAULT 1,
        baseline_commit       text,
        change_commit         text,
        sandbox_path          text,
        success_rate          double precision,
        regression            double precision,
        baseline_success_rate double precision,
        test_count            integer,
        failures              integer,
        duration_ms           double precision,
        recommendation        text        CHECK (recommendation IN ('merge', 'merge_with_review', 'reject')),
        rolled_back           boolean     NOT NULL DEFAULT false,
        error                 jsonb,
        created_at            timestamptz NOT NULL DEFAULT now(),
        started_at            timestamptz NOT NULL DEFAULT now(),
        finished_at           timestamptz,
        updated_at            timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE genesis.experiments IS
        'One row per experiment (its latest attempt): request, metrics, recommendation, rollback, error.';
    CREATE INDEX experiments_status_idx ON genesis.experiments (status, finished_at DESC);
    CREATE INDEX experiments_instance_idx ON genesis.experiments (instance_id, started_at DESC);

    CREATE TABLE genesis.experiment_runs (
        id            bigserial   PRIMARY KEY,
        experiment_id text        NOT NULL REFERENCES genesis.experiments ON DELETE CASCADE,
        attempt       integer     NOT NULL,
        phase         text        NOT NULL CHECK (phase IN ('baseline', 'change')),
        commit_sha    text,
        command       jsonb       NOT NULL DEFAULT '[]',
        returncode    integer,
        timed_out     boolean     NOT NULL DEFAULT false,
        test_count    integer     NOT NULL DEFAULT 0,
        passed        integer     NOT NULL DEFAULT 0,
        failed        integer     NOT NULL DEFAULT 0,
        errors        integer     NOT NULL DEFAULT 0,
        skipped       integer     NOT NULL DEFAULT 0,
        success_rate  double precision,
        duration_ms   double precision,
        output_tail   text,
        recorded_at   timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE genesis.experiment_runs IS
        'One row per test-suite run of an experiment: the baseline run and the run after the change.';
    CREATE INDEX experiment_runs_experiment_idx ON genesis.experiment_runs (experiment_id, id);

    CREATE TABLE genesis.sandbox_events (
        id            bigserial   PRIMARY KEY,
        experiment_id text        NOT NULL,
        sandbox_path  text        NOT NULL,
        event         text        NOT NULL CHECK (event IN ('created', 'rolled_back', 'preserved', 'cleaned_up',
                                                            'integrity_ok', 'integrity_failed')),
        size_bytes    bigint,
        age_s         double precision,
        detail        text,
        recorded_at   timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE genesis.sandbox_events IS
        'The history of experiment sandboxes: created, rolled back, preserved, cleaned up, integrity checks.';
    CREATE INDEX sandbox_events_experiment_idx ON genesis.sandbox_events (experiment_id, id);
    CREATE INDEX sandbox_events_event_idx ON genesis.sandbox_events (event, recorded_at DESC);
    """)


def downgrade() -> None:
    op.execute("""
    DROP TABLE IF EXISTS genesis.sandbox_events;
    DROP TABLE IF EXISTS genesis.experiment_runs;
    DROP TABLE IF EXISTS genesis.experiments;
    """)
