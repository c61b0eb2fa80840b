"""Throughput from the tallies: `genesis status`'s last minute and last hour no longer read the
runs that finished in them. They read every such run (an index scan of workflow_runs by
finished_at): after 40,000 runs in an hour the status took 87 ms instead of 10, and it grows with
the rate, so it was slowest when the system was busiest.

genesis.run_tallies gains `bucket`, when the runs finished to the 10 seconds (NULL: not finished,
finished over 65 minutes ago, or folded into history), and `total_ms`, the sum of their durations. The statement-level trigger
writes the same rows as before with the bucket in the group (a completion still adds one row, or
two when its runs straddle a bucket's edge), so a window is the sum of at most a few hundred
folded rows. Compaction folds buckets older than 65 minutes into history and, from now on, only
groups that have more than one row, so that a folded row is not rewritten every run.

Failures by code over the last hour read only failed runs (a partial index by finished_at), not
every failed run of history.

Revision ID: 0015
Revises: 0014
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

TALLY_RUNS_0009 = """
    CREATE OR REPLACE FUNCTION genesis.tally_runs() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO genesis.run_tallies (queue, type, status, n)
            SELECT queue, type, status, count(*) FROM new_rows GROUP BY 1, 2, 3;
        ELSIF TG_OP = 'UPDATE' THEN
            INSERT INTO genesis.run_tallies (queue, type, status, n)
            SELECT queue, type, status, sum(d) FROM (
                SELECT queue, type, status, 1 AS d FROM new_rows
                UNION ALL
                SELECT queue, type, status, -1 FROM old_rows) AS changed
            GROUP BY 1, 2, 3 HAVING sum(d) <> 0;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO genesis.run_tallies (queue, type, status, n)
            SELECT queue, type, status, -count(*) FROM old_rows GROUP BY 1, 2, 3;
        ELSE   -- TRUNCATE
            DELETE FROM genesis.run_tallies;
        END IF;
        RETURN NULL;
    END
    $$;
"""


def upgrade() -> None:
    op.execute("""
    CREATE FUNCTION genesis.tally_bucket(finished timestamptz) RETURNS timestamptz
        LANGUAGE sql STABLE PARALLEL SAFE AS $$
        SELECT CASE WHEN finished >= now() - interval '65 minutes'
                    THEN to_timestamp(floor(extract(epoch FROM finished) / 10) * 10) END
    $$;
    COMMENT ON FUNCTION genesis.tally_bucket(timestamptz) IS
        'The 10-second bucket of genesis.run_tallies a run finished at this time is counted in: NULL '
        '(history) if it did not finish, or finished over 65 minutes ago.';

    CREATE FUNCTION genesis.run_ms(started timestamptz, finished timestamptz) RETURNS float8
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT coalesce(extract(epoch FROM finished - started) * 1000, 0)::float8
    $$;

    -- no write may fall between the move below and the new trigger (as in 0009)
    LOCK TABLE genesis.workflow_runs IN SHARE MODE;
    ALTER TABLE genesis.run_tallies ADD COLUMN bucket timestamptz,
                                    ADD COLUMN total_ms float8 NOT NULL DEFAULT 0;
    COMMENT ON TABLE genesis.run_tallies IS
        'Signed deltas of the number of workflow_runs per (queue, type, status); the count is sum(n). '
        'bucket: when they finished, to the 10 seconds, for the last 65 minutes (NULL: unfinished or '
        'older); total_ms: the sum of their durations (0 where bucket is NULL).';

    -- the last 65 minutes' finished runs move from history into their buckets
    INSERT INTO genesis.run_tallies (queue, type, status, bucket, n, total_ms)
    SELECT queue, type, status, bucket, count(*), sum(ms)
    FROM (SELECT queue, type, status, genesis.tally_bucket(finished_at) AS bucket,
                 genesis.run_ms(started_at, finished_at) AS ms
          FROM genesis.workflow_runs WHERE finished_at >= now() - interval '65 minutes') AS recent
    GROUP BY 1, 2, 3, 4
    UNION ALL
    SELECT queue, type, status, NULL, -count(*), 0
    FROM genesis.workflow_runs WHERE finished_at >= now() - interval '65 minutes' GROUP BY 1, 2, 3;

    -- A run that finished over 65 minutes ago (a DBA's fix, retention's delete) counts in history
    -- at once: a delete of a million old runs adds a row per group, not a row per 10 seconds.
    CREATE OR REPLACE FUNCTION genesis.tally_runs() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO genesis.run_tallies (queue, type, status, bucket, n, total_ms)
            SELECT queue, type, status, bucket, count(*), coalesce(sum(ms) FILTER (WHERE bucket IS NOT NULL), 0)
            FROM (SELECT queue, type, status, genesis.tally_bucket(finished_at) AS bucket,
                         genesis.run_ms(started_at, finished_at) AS ms FROM new_rows) AS r
            GROUP BY 1, 2, 3, 4;
        ELSIF TG_OP = 'UPDATE' THEN
            INSERT INTO genesis.run_tallies (queue, type, status, bucket, n, total_ms)
            SELECT queue, type, status, bucket, sum(d), coalesce(sum(ms) FILTER (WHERE bucket IS NOT NULL), 0)
            FROM (SELECT queue, type, status, genesis.tally_bucket(finished_at) AS bucket, 1 AS d,
                         genesis.run_ms(started_at, finished_at) AS ms FROM new_rows
                  UNION ALL
                  SELECT queue, type, status, genesis.tally_bucket(finished_at), -1,
                         -genesis.run_ms(started_at, finished_at) FROM old_rows) AS changed
            GROUP BY 1, 2, 3, 4
            HAVING sum(d) <> 0 OR coalesce(sum(ms) FILTER (WHERE bucket IS NOT NULL), 0) <> 0;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO genesis.run_tallies (queue, type, status, bucket, n, total_ms)
            SELECT queue, type, status, bucket, -count(*), -coalesce(sum(ms) FILTER (WHERE bucket IS NOT NULL), 0)
            FROM (SELECT queue, type, status, genesis.tally_bucket(finished_at) AS bucket,
                         genesis.run_ms(started_at, finished_at) AS ms FROM old_rows) AS r
            GROUP BY 1, 2, 3, 4;
        ELSE   -- TRUNCATE
            DELETE FROM genesis.run_tallies;
        END IF;
        RETURN NULL;
    END
    $$;

    CREATE INDEX workflow_runs_failed_idx ON genesis.workflow_runs (finished_at) WHERE status = 'failed';
    """)


def downgrade() -> None:
    op.execute("LOCK TABLE genesis.workflow_runs IN SHARE MODE;" + TALLY_RUNS_0009 + """
    DROP INDEX IF EXISTS genesis.workflow_runs_failed_idx;
    -- the counts are sums over all rows, whatever their bucket: the rows stay, the columns go
    ALTER TABLE genesis.run_tallies DROP COLUMN bucket, DROP COLUMN total_ms;
    COMMENT ON TABLE genesis.run_tallies IS
        'Signed deltas of the number of workflow_runs per (queue, type, status); the count is sum(n).';
    DROP FUNCTION IF EXISTS genesis.tally_bucket(timestamptz);
    DROP FUNCTION IF EXISTS genesis.run_ms(timestamptz, timestamptz);
    """)
