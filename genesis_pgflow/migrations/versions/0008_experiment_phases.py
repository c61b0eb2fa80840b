"""Experiments: recorded phases (resumable, fenced by attempt) and trends.

- genesis.experiments gets the delivery that holds it (fence_queue, fence_msg_id, fence_attempt:
  the request's queue message and its read_ct) and its final `result`;
- genesis.experiment_phases: one row per finished phase (copy, baseline, change, measure, decide)
  with what the next phase needs, so that the next delivery of the same message resumes there;
- genesis.experiment_runs.step: the phase that ran a test run (the measure phase's reruns are at
  the baseline or the change, so `phase` alone does not say it);
- genesis.experiment_trends: per day, experiment type and instance, what the experiments came to;
- genesis.scheduled_reports: the last day each daily report was sent for (one per day, whoever sends).

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    ALTER TABLE genesis.experiments
        ADD COLUMN fence_queue   text,
        ADD COLUMN fence_msg_id  bigint,
        ADD COLUMN fence_attempt integer,
        ADD COLUMN result        jsonb;
    COMMENT ON COLUMN genesis.experiments.fence_attempt IS
        'The read_ct of the delivery of (fence_queue, fence_msg_id) that holds the experiment: a phase or a '
        'result written by an older delivery is refused (its consumer lost its lease and stops).';
    COMMENT ON COLUMN genesis.experiments.result IS
        'The handler''s result (classes, flaky, performance, ...) once the experiment is decided.';

    CREATE TABLE genesis.experiment_phases (
        experiment_id text        NOT NULL
                      REFERENCES genesis.experiments ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
        phase         text        NOT NULL CHECK (phase IN ('copy', 'baseline', 'change', 'measure', 'decide')),
        attempt       integer     NOT NULL,
        state         jsonb       NOT NULL DEFAULT '{}',
        finished_at   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (experiment_id, phase)
    );
    COMMENT ON TABLE genesis.experiment_phases IS
        'The finished phases of an experiment''s current request, with what the next phase needs (state); '
        'attempt is the read_ct of the delivery that finished it. A new request for the id clears them.';

    ALTER TABLE genesis.experiment_runs
        ADD COLUMN step text CHECK (step IN ('baseline', 'change', 'measure'));
    COMMENT ON COLUMN genesis.experiment_runs.step IS
        'The phase that ran it (measure: a rerun of the tests that failed after the change); NULL before 0008.';

    CREATE VIEW genesis.experiment_trends AS
    SELECT (e.finished_at AT TIME ZONE 'UTC')::date                                  AS day,
           e.experiment_type,
           e.instance_id,
           count(*)                                                                  AS experiments,
           count(*) FILTER (WHERE e.status = 'success')                              AS succeeded,
           count(*) FILTER (WHERE e.status = 'regressed')                            AS regressed,
           count(*) FILTER (WHERE e.status = 'failed')                               AS failed,
           round(count(*) FILTER (WHERE e.status = 'success')::numeric / count(*), 4)::float8
                                                                                     AS success_rate,
           round(avg(e.regression)::numeric, 4)::float8                             AS mean_regression,
           count(*) FILTER (WHERE e.recommendation = 'merge')                        AS merge,
           count(*) FILTER (WHERE e.recommendation = 'merge_with_review')            AS merge_with_review,
           count(*) FILTER (WHERE e.recommendation = 'reject')                       AS reject,
           round(avg(e.duration_ms)::numeric, 1)::float8                            AS mean_duration_ms
    FROM genesis.experiments e
    WHERE e.finished_at IS NOT NULL AND e.status <> 'running'
    GROUP BY 1, 2, 3;
    COMMENT ON VIEW genesis.experiment_trends IS
        'Per UTC day (of finishing), experiment type and instance: how many experiments, the share that '
        'succeeded, the mean regression, and the recommendations counted (latest attempt of each id).';

    CREATE TABLE genesis.scheduled_reports (
        report    text        PRIMARY KEY,
        last_day  date        NOT NULL,
        sent_at   timestamptz NOT NULL DEFAULT now(),
        sent_by   text
    );
    COMMENT ON TABLE genesis.scheduled_reports IS
        'The last day each daily report was sent for: read and moved in the transaction that sends it.';
    """)


def downgrade() -> None:
    op.execute("""
    DROP TABLE IF EXISTS genesis.scheduled_reports;
    DROP VIEW IF EXISTS genesis.experiment_trends;
    ALTER TABLE genesis.experiment_runs DROP COLUMN IF EXISTS step;
    DROP TABLE IF EXISTS genesis.experiment_phases;
    ALTER TABLE genesis.experiments
        DROP COLUMN IF EXISTS result, DROP COLUMN IF EXISTS fence_attempt,
        DROP COLUMN IF EXISTS fence_msg_id, DROP COLUMN IF EXISTS fence_queue;
    """)
