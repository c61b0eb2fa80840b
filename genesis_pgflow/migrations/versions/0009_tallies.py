"""Tallies: the counts `genesis status` and genesis.queue_health show, kept as they change instead
of counted over all of history (1M runs and 10M archived messages took seconds to count).

genesis.run_tallies holds signed deltas of the number of runs per (queue, type, status): a
statement-level trigger on genesis.workflow_runs appends one row per group a statement changed
(a batch of 100 runs adds a row or two, not 100), so writers never wait on a shared counter row.
genesis.archive_tallies does the same for the rows of each request queue's pgmq archive (its
triggers are put on by `genesis db upgrade`, store/schema.py, since a queue can be created again).
The scheduled job `tally_compaction` folds the deltas into one row per group; a count is the sum
of its rows, exact at any moment.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE genesis.run_tallies (
        queue  text   NOT NULL,
        type   text,
        status text   NOT NULL,
        n      bigint NOT NULL
    );
    COMMENT ON TABLE genesis.run_tallies IS
        'Signed deltas of the number of workflow_runs per (queue, type, status); the count is sum(n).';

    CREATE TABLE genesis.archive_tallies (
        queue text   NOT NULL,
        n     bigint NOT NULL
    );
    COMMENT ON TABLE genesis.archive_tallies IS
        'Signed deltas of the number of rows in each request queue''s pgmq archive; the count is sum(n).';

    CREATE FUNCTION genesis.tally_runs() RETURNS trigger LANGUAGE plpgsql AS $$
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

    CREATE FUNCTION genesis.tally_archive() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO genesis.archive_tallies (queue, n)
            SELECT substr(TG_TABLE_NAME, 3), count(*) FROM new_rows HAVING count(*) > 0;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO genesis.archive_tallies (queue, n)
            SELECT substr(TG_TABLE_NAME, 3), -count(*) FROM old_rows HAVING count(*) > 0;
        ELSE   -- TRUNCATE
            DELETE FROM genesis.archive_tallies WHERE queue = substr(TG_TABLE_NAME, 3);
        END IF;
        RETURN NULL;
    END
    $$;

    -- no write may fall between the first count and the triggers: SHARE waits for writers
    -- and holds new ones until this transaction commits
    LOCK TABLE genesis.workflow_runs IN SHARE MODE;
    CREATE TRIGGER tally_insert AFTER INSERT ON genesis.workflow_runs
        REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION genesis.tally_runs();
    CREATE TRIGGER tally_update AFTER UPDATE ON genesis.workflow_runs
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION genesis.tally_runs();
    CREATE TRIGGER tally_delete AFTER DELETE ON genesis.workflow_runs
        REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION genesis.tally_runs();
    CREATE TRIGGER tally_truncate AFTER TRUNCATE ON genesis.workflow_runs
        FOR EACH STATEMENT EXECUTE FUNCTION genesis.tally_runs();
    INSERT INTO genesis.run_tallies (queue, type, status, n)
    SELECT queue, type, status, count(*) FROM genesis.workflow_runs GROUP BY 1, 2, 3;
    -- counts only: a monitoring role may read them (0005 gave it the views)
    GRANT SELECT ON genesis.run_tallies, genesis.archive_tallies TO pg_monitor;

    CREATE OR REPLACE VIEW genesis.queue_health AS
        SELECT m.queue,
               m.type,
               q.queue_length                         AS depth,
               q.queue_length - q.queue_visible_length AS in_flight,
               q.oldest_msg_age_sec                   AS oldest_age_s,
               coalesce((SELECT sum(t.n) FROM genesis.run_tallies t WHERE t.queue = m.queue AND t.status = 'completed'), 0)::bigint AS completed,
               coalesce((SELECT sum(t.n) FROM genesis.run_tallies t WHERE t.queue = m.queue AND t.status = 'failed'), 0)::bigint    AS failed,
               coalesce((SELECT sum(t.n) FROM genesis.run_tallies t WHERE t.queue = m.queue AND t.status = 'pending'), 0)::bigint   AS retrying,
               d.queue_length                         AS dead_lettered,
               r.queue_length                         AS results_waiting
        FROM genesis.queue_map m
        CROSS JOIN LATERAL genesis.queue_metrics(m.queue) q
        CROSS JOIN LATERAL genesis.queue_metrics(m.dlq) d
        CROSS JOIN LATERAL genesis.queue_metrics(m.result_queue) r;
    """)


def downgrade() -> None:
    op.execute("""
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
    DROP TRIGGER IF EXISTS tally_insert ON genesis.workflow_runs;
    DROP TRIGGER IF EXISTS tally_update ON genesis.workflow_runs;
    DROP TRIGGER IF EXISTS tally_delete ON genesis.workflow_runs;
    DROP TRIGGER IF EXISTS tally_truncate ON genesis.workflow_runs;
    DO $$
    DECLARE t record;
    BEGIN
        FOR t IN SELECT c.relname FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = 'pgmq' AND g.tgname LIKE 'genesis_tally_%' LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS genesis_tally_insert ON pgmq.%I', t.relname);
            EXECUTE format('DROP TRIGGER IF EXISTS genesis_tally_delete ON pgmq.%I', t.relname);
            EXECUTE format('DROP TRIGGER IF EXISTS genesis_tally_truncate ON pgmq.%I', t.relname);
        END LOOP;
    END
    $$;
    DROP FUNCTION IF EXISTS genesis.tally_archive();
    DROP FUNCTION IF EXISTS genesis.tally_runs();
    DROP TABLE IF EXISTS genesis.archive_tallies;
    DROP TABLE IF EXISTS genesis.run_tallies;
    """)
