"""Tallies folded from the rows: no tally row per completion, so no dead row per completion.

Since 0009 every statement that wrote runs or archived messages appended a delta row to
genesis.run_tallies and genesis.archive_tallies, and the compaction job deleted it again: under
light load (a message per completion) that was two dead rows per message on top of pgmq's own two,
and a row of each message's body copied into a trigger's transition table on every archive.

Now a new run, or a new archived message, is counted where it is until the scheduled job folds it:

- genesis.workflow_runs gains `tally_xid` and each request queue's pgmq archive `genesis_xid`
  (xid8, the writing transaction's id by default, indexed): rows at or past the horizon
  genesis.tally_horizon are counted from the table itself, rows before it (or NULL: written before
  this migration) are in the folded tallies;
- the job moves the horizon up to the oldest transaction still running
  (pg_snapshot_xmin(pg_current_snapshot())): every row before it was committed (or rolled back)
  and is visible to the fold, which counts the rows between the old and the new horizon into
  genesis.folded_run_tallies / genesis.folded_archive_tallies in the same transaction. Transaction
  ids order the rows by when their writers could still be running, which ids of rows do not;
- updates and deletes of rows the fold has passed still append signed deltas (statement-level
  triggers, as before): a DBA's fix, retention's delete, a running run that ends. They take the
  horizon row FOR SHARE, and the fold takes it FOR UPDATE SKIP LOCKED before its snapshot, so a
  fold never runs while such a write is open, and such a write reads the horizon the fold left;
- genesis.run_tallies and genesis.archive_tallies become views: the folded rows plus what is past
  the horizon, so every reader (queue_health, status, the dashboard, DBAs) sums them as before.

Revision ID: 0017
Revises: 0016
"""

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

# the delta functions of 0015 and 0009, which the downgrade puts back
TALLY_RUNS_0015 = """
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
"""

TALLY_ARCHIVE_0009 = """
    CREATE OR REPLACE FUNCTION genesis.tally_archive() RETURNS trigger LANGUAGE plpgsql AS $$
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
"""

QUEUE_HEALTH_0009 = """
    CREATE VIEW genesis.queue_health AS
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
    COMMENT ON VIEW genesis.queue_health IS 'Per request queue: depth, in flight, oldest age, outcomes, dead letters.';
    GRANT SELECT ON genesis.queue_health TO pg_monitor;
"""

# The tallies read once, not three times per queue: the view's runs past the horizon are an index
# scan whose size the planner cannot know, and twelve of them priced the view over jit_above_cost
# (30 ms of JIT compiling for a view that runs in 1).
QUEUE_HEALTH = """
    CREATE OR REPLACE VIEW genesis.queue_health AS
        SELECT m.queue,
               m.type,
               q.queue_length                         AS depth,
               q.queue_length - q.queue_visible_length AS in_flight,
               q.oldest_msg_age_sec                   AS oldest_age_s,
               coalesce(t.completed, 0)::bigint       AS completed,
               coalesce(t.failed, 0)::bigint          AS failed,
               coalesce(t.retrying, 0)::bigint        AS retrying,
               d.queue_length                         AS dead_lettered,
               r.queue_length                         AS results_waiting
        FROM genesis.queue_map m
        CROSS JOIN LATERAL genesis.queue_metrics(m.queue) q
        CROSS JOIN LATERAL genesis.queue_metrics(m.dlq) d
        CROSS JOIN LATERAL genesis.queue_metrics(m.result_queue) r
        LEFT JOIN (SELECT queue, sum(n) FILTER (WHERE status = 'completed') AS completed,
                          sum(n) FILTER (WHERE status = 'failed') AS failed,
                          sum(n) FILTER (WHERE status = 'pending') AS retrying
                   FROM genesis.run_tallies GROUP BY queue) AS t ON t.queue = m.queue;
"""


def upgrade() -> None:
    op.execute("""
    -- no write may fall between the counts as they are and the new way of keeping them (as in 0009)
    LOCK TABLE genesis.workflow_runs IN SHARE MODE;

    CREATE TABLE genesis.tally_horizon (
        one          boolean PRIMARY KEY DEFAULT true CHECK (one),
        folded_below xid8    NOT NULL,
        folded_at    timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE genesis.tally_horizon IS
        'One row: rows of genesis.workflow_runs (tally_xid) and of the request queues'' pgmq archives '
        '(genesis_xid) written by a transaction before folded_below are counted in the folded tallies, '
        'the rest where they are; folded_at: when it last moved. Moved up by genesis.fold_tallies().';
    -- every transaction before the oldest still running has ended: its runs are in the tallies
    INSERT INTO genesis.tally_horizon (folded_below) VALUES (pg_snapshot_xmin(pg_current_snapshot()));

    ALTER TABLE genesis.workflow_runs ADD COLUMN tally_xid xid8;
    -- set apart from ADD COLUMN: a volatile default there would rewrite every row
    ALTER TABLE genesis.workflow_runs ALTER COLUMN tally_xid SET DEFAULT pg_current_xact_id();
    COMMENT ON COLUMN genesis.workflow_runs.tally_xid IS
        'The transaction that wrote the run (leave it to its default): counted by genesis.run_tallies '
        'from this row until the tallies'' horizon passes it (NULL: counted in the folded tallies).';
    CREATE INDEX workflow_runs_tally_xid_idx ON genesis.workflow_runs (tally_xid) WHERE tally_xid IS NOT NULL;

    ALTER TABLE genesis.run_tallies RENAME TO folded_run_tallies;
    ALTER TABLE genesis.archive_tallies RENAME TO folded_archive_tallies;
    COMMENT ON TABLE genesis.folded_run_tallies IS
        'Signed counts of the workflow_runs before the tallies'' horizon per (queue, type, status, bucket); '
        'read genesis.run_tallies, which adds the runs past it.';
    COMMENT ON TABLE genesis.folded_archive_tallies IS
        'Signed counts of the archived messages before the tallies'' horizon per request queue; read '
        'genesis.archive_tallies, which adds the messages past it.';

    -- updates and deletes: a row the fold has passed leaves the folded count, one it has passed
    -- enters it; a row past the horizon is counted where it is, whatever it becomes
    CREATE OR REPLACE FUNCTION genesis.tally_runs() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        horizon xid8;
    BEGIN
        IF TG_OP = 'TRUNCATE' THEN
            DELETE FROM genesis.folded_run_tallies;
            RETURN NULL;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM old_rows) THEN   -- an INSERT ... ON CONFLICT that updated nothing
            RETURN NULL;
        END IF;
        -- held until this transaction ends: no fold meanwhile, and the horizon the last fold left
        SELECT folded_below INTO horizon FROM genesis.tally_horizon FOR SHARE;
        IF TG_OP = 'UPDATE' THEN
            INSERT INTO genesis.folded_run_tallies (queue, type, status, bucket, n, total_ms)
            SELECT queue, type, status, bucket, sum(d), coalesce(sum(ms) FILTER (WHERE bucket IS NOT NULL), 0)
            FROM (SELECT queue, type, status, genesis.tally_bucket(finished_at) AS bucket, 1 AS d,
                         genesis.run_ms(started_at, finished_at) AS ms
                  FROM new_rows WHERE coalesce(tally_xid, '0') < horizon
                  UNION ALL
                  SELECT queue, type, status, genesis.tally_bucket(finished_at), -1,
                         -genesis.run_ms(started_at, finished_at)
                  FROM old_rows WHERE coalesce(tally_xid, '0') < horizon) AS changed
            GROUP BY 1, 2, 3, 4
            HAVING sum(d) <> 0 OR coalesce(sum(ms) FILTER (WHERE bucket IS NOT NULL), 0) <> 0;
        ELSE   -- DELETE
            INSERT INTO genesis.folded_run_tallies (queue, type, status, bucket, n, total_ms)
            SELECT queue, type, status, bucket, -count(*), -coalesce(sum(ms) FILTER (WHERE bucket IS NOT NULL), 0)
            FROM (SELECT queue, type, status, genesis.tally_bucket(finished_at) AS bucket,
                         genesis.run_ms(started_at, finished_at) AS ms
                  FROM old_rows WHERE coalesce(tally_xid, '0') < horizon) AS r
            GROUP BY 1, 2, 3, 4;
        END IF;
        RETURN NULL;
    END
    $$;
    DROP TRIGGER tally_insert ON genesis.workflow_runs;

    CREATE OR REPLACE FUNCTION genesis.tally_archive() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        horizon xid8;
    BEGIN
        IF TG_OP = 'TRUNCATE' THEN
            DELETE FROM genesis.folded_archive_tallies WHERE queue = substr(TG_TABLE_NAME, 3);
            RETURN NULL;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM old_rows) THEN
            RETURN NULL;
        END IF;
        SELECT folded_below INTO horizon FROM genesis.tally_horizon FOR SHARE;   -- as tally_runs
        INSERT INTO genesis.folded_archive_tallies (queue, n)
        SELECT substr(TG_TABLE_NAME, 3), -count(*) FROM old_rows
        WHERE coalesce(genesis_xid, '0') < horizon HAVING count(*) > 0;
        RETURN NULL;
    END
    $$;

    -- what `genesis db upgrade` does to each request queue's archive (store/schema.py), and this
    -- migration to those tallied the old way: the column, its index, the triggers of deletes
    CREATE FUNCTION genesis.prepare_archive_tally(queue text) RETURNS void LANGUAGE plpgsql AS $$
    DECLARE
        archive text := 'a_' || queue;
    BEGIN
        EXECUTE format('LOCK TABLE pgmq.%I IN SHARE ROW EXCLUSIVE MODE', archive);
        EXECUTE format('ALTER TABLE pgmq.%I ADD COLUMN IF NOT EXISTS genesis_xid xid8', archive);
        EXECUTE format('ALTER TABLE pgmq.%I ALTER COLUMN genesis_xid SET DEFAULT pg_current_xact_id()', archive);
        EXECUTE format($c$COMMENT ON COLUMN pgmq.%I.genesis_xid IS 'genesis_pgflow: the transaction that archived the message, counted by genesis.archive_tallies (leave it to its default)'$c$,
                       archive);
        EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON pgmq.%I (genesis_xid) WHERE genesis_xid IS NOT NULL',
                       archive || '_genesis_xid', archive);
        EXECUTE format('DROP TRIGGER IF EXISTS genesis_tally_insert ON pgmq.%I', archive);
        EXECUTE format('DROP TRIGGER IF EXISTS genesis_tally_delete ON pgmq.%I', archive);
        EXECUTE format('CREATE TRIGGER genesis_tally_delete AFTER DELETE ON pgmq.%I REFERENCING OLD TABLE AS '
                       'old_rows FOR EACH STATEMENT EXECUTE FUNCTION genesis.tally_archive()', archive);
        EXECUTE format('DROP TRIGGER IF EXISTS genesis_tally_truncate ON pgmq.%I', archive);
        EXECUTE format('CREATE TRIGGER genesis_tally_truncate AFTER TRUNCATE ON pgmq.%I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION genesis.tally_archive()', archive);
    END
    $$;
    DO $$
    DECLARE
        t record;
    BEGIN
        FOR t IN SELECT substr(c.relname, 3) AS queue FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = 'pgmq' AND g.tgname = 'genesis_tally_insert' AND c.relname LIKE 'a\\_%' LOOP
            PERFORM genesis.prepare_archive_tally(t.queue);
        END LOOP;
    END
    $$;

    -- The pgmq archives that carry genesis_xid (prepare_archive_tally): those the tallies count.
    CREATE FUNCTION genesis.counted_archives() RETURNS TABLE (relname name) LANGUAGE sql STABLE AS $$
        SELECT c.relname FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'genesis_xid' AND NOT a.attisdropped
        WHERE ns.nspname = 'pgmq' AND c.relkind IN ('r', 'p') AND c.relname LIKE 'a\\_%'
    $$;

    -- The tally rows of the runs written by transactions from from_xid up to, not with, below_xid,
    -- and, with unmarked, of those written before this migration (tally_xid NULL): what a fold
    -- moves into the folded rows. A SQL function of one statement, so the planner inlines it into
    -- its caller's statement and sees the index.
    CREATE FUNCTION genesis.run_tally_rows(below_xid xid8, from_xid xid8, unmarked boolean DEFAULT false)
        RETURNS TABLE (queue text, type text, status text, bucket timestamptz, n bigint, total_ms float8)
        LANGUAGE sql STABLE AS $$
        SELECT queue, type, status, bucket, count(*), coalesce(sum(ms) FILTER (WHERE bucket IS NOT NULL), 0)
        FROM (SELECT queue, type, status, genesis.tally_bucket(finished_at) AS bucket,
                     genesis.run_ms(started_at, finished_at) AS ms
              FROM genesis.workflow_runs
              WHERE (tally_xid >= from_xid AND tally_xid < below_xid) OR (unmarked AND tally_xid IS NULL)) AS r
        GROUP BY 1, 2, 3, 4
    $$;

    -- Runs past the horizon, counted where they are: one scan of the index for the transactions
    -- since the last fold (a few seconds' worth, more while a transaction that wrote stays open).
    -- The same rows as run_tally_rows(xmax, horizon), written out: a function in a view runs with
    -- the reader's rights, and a monitoring role may read these counts, not the runs. The upper
    -- bound holds for every row this snapshot sees; with two bounds unknown when the view is
    -- planned, the planner expects a narrow range (the index), not a third of the table (a
    -- parallel scan, 16 ms at 1M runs for no row).
    CREATE VIEW genesis.run_tallies AS
        SELECT queue, type, status, bucket, n, total_ms FROM genesis.folded_run_tallies
        UNION ALL
        SELECT queue, type, status, bucket, count(*), coalesce(sum(ms) FILTER (WHERE bucket IS NOT NULL), 0)
        FROM (SELECT queue, type, status, genesis.tally_bucket(finished_at) AS bucket,
                     genesis.run_ms(started_at, finished_at) AS ms
              FROM genesis.workflow_runs
              WHERE tally_xid >= (SELECT folded_below FROM genesis.tally_horizon)
                AND tally_xid < pg_snapshot_xmax(pg_current_snapshot())) AS r
        GROUP BY 1, 2, 3, 4;
    COMMENT ON VIEW genesis.run_tallies IS
        'The number of workflow_runs per (queue, type, status) is sum(n) over its rows; bucket: when '
        'they finished, to the 10 seconds, for the last 65 minutes (NULL: unfinished or older); total_ms: '
        'the sum of their durations (0 where bucket is NULL).';

    -- The archives' messages past the horizon: a function, as the archives are pgmq's tables (a
    -- view on them would keep pgmq.drop_queue from dropping them). Stable: it reads in the
    -- snapshot of the statement that calls it, as the folded rows beside it are. A definer's
    -- rights: a monitoring role reads counts, not the archives.
    CREATE FUNCTION genesis.unfolded_archive_counts() RETURNS TABLE (queue text, n bigint)
        LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    DECLARE
        horizon xid8 := (SELECT folded_below FROM genesis.tally_horizon);
        archive record;
    BEGIN
        FOR archive IN SELECT relname FROM genesis.counted_archives() LOOP
            queue := substr(archive.relname, 3);
            EXECUTE format('SELECT count(*) FROM pgmq.%I WHERE genesis_xid >= $1', archive.relname)
                INTO n USING horizon;
            IF n > 0 THEN
                RETURN NEXT;
            END IF;
        END LOOP;
    END
    $$;
    CREATE VIEW genesis.archive_tallies AS
        SELECT queue, n FROM genesis.folded_archive_tallies
        UNION ALL
        SELECT queue, n FROM genesis.unfolded_archive_counts();
    COMMENT ON VIEW genesis.archive_tallies IS
        'The number of rows in each request queue''s pgmq archive is sum(n) over its rows.';

    -- The scheduled job tally_compaction (store/tallies.py), in a read-committed transaction of its
    -- own. Returns the rows folded (0: nothing, or fewer than min_rows runs past the horizon and the
    -- last fold under max_wait_s ago: a fold costs a dead row or two, so a slow trickle is folded
    -- in batches), NULL when a write that holds the horizon is still open.
    CREATE FUNCTION genesis.fold_tallies(min_rows integer DEFAULT 0, max_wait_s float8 DEFAULT 0)
        RETURNS bigint LANGUAGE plpgsql AS $$
    DECLARE
        was  xid8;
        upto xid8;
        recount boolean;
        folded bigint;
        archived bigint;
        archive record;
    BEGIN
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'genesis.fold_tallies() needs a read-committed transaction: its snapshot comes after its lock';
        END IF;
        IF min_rows > 0 AND (SELECT folded_at > now() - make_interval(secs => max_wait_s) FROM genesis.tally_horizon)
           AND (SELECT count(*) FROM (SELECT FROM genesis.workflow_runs
                                      WHERE tally_xid >= (SELECT folded_below FROM genesis.tally_horizon)
                                        AND tally_xid < pg_snapshot_xmax(pg_current_snapshot())
                                      LIMIT min_rows) AS past) < min_rows THEN
            RETURN 0;
        END IF;
        SELECT folded_below INTO was FROM genesis.tally_horizon FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        -- each statement from here on has a snapshot taken after the lock: every transaction
        -- before upto has ended, and what it wrote is visible
        SELECT pg_snapshot_xmin(pg_current_snapshot()) INTO upto;
        recount := upto < was;
        IF recount THEN
            -- a horizon ahead of this server's transactions (a database restored from a dump):
            -- count every row before the new horizon again
            DELETE FROM genesis.folded_run_tallies;
            DELETE FROM genesis.folded_archive_tallies;
            INSERT INTO genesis.folded_run_tallies (queue, type, status, bucket, n, total_ms)
            SELECT * FROM genesis.run_tally_rows(upto, '0', true);
        ELSE
            INSERT INTO genesis.folded_run_tallies (queue, type, status, bucket, n, total_ms)
            SELECT * FROM genesis.run_tally_rows(upto, was);
        END IF;
        GET DIAGNOSTICS folded = ROW_COUNT;
        FOR archive IN SELECT relname FROM genesis.counted_archives() LOOP
            EXECUTE format('INSERT INTO genesis.folded_archive_tallies (queue, n) SELECT $1, count(*) FROM pgmq.%I '
                           'WHERE %s HAVING count(*) > 0', archive.relname,
                           CASE WHEN recount THEN 'coalesce(genesis_xid, ''0'') < $3'
                                ELSE 'genesis_xid >= $2 AND genesis_xid < $3' END)
                USING substr(archive.relname, 3), was, upto;
            GET DIAGNOSTICS archived = ROW_COUNT;
            folded := folded + archived;
        END LOOP;
        IF upto <> was OR recount THEN
            UPDATE genesis.tally_horizon SET folded_below = upto, folded_at = now();
        END IF;
        RETURN folded;
    END
    $$;

    GRANT SELECT ON genesis.run_tallies, genesis.archive_tallies, genesis.folded_run_tallies,
                    genesis.folded_archive_tallies, genesis.tally_horizon TO pg_monitor;
    """ + QUEUE_HEALTH)


def downgrade() -> None:
    op.execute("""
    LOCK TABLE genesis.workflow_runs IN SHARE MODE;
    -- what is past the horizon goes into the tallies, which count by deltas again from here on
    INSERT INTO genesis.folded_run_tallies (queue, type, status, bucket, n, total_ms)
    SELECT * FROM genesis.run_tally_rows(pg_snapshot_xmax(pg_current_snapshot()),
                                         (SELECT folded_below FROM genesis.tally_horizon));
    DO $$
    DECLARE
        t record;
    BEGIN
        FOR t IN SELECT relname FROM genesis.counted_archives() LOOP
            EXECUTE format('LOCK TABLE pgmq.%I IN SHARE ROW EXCLUSIVE MODE', t.relname);
            EXECUTE format('INSERT INTO genesis.folded_archive_tallies (queue, n) SELECT $1, count(*) FROM pgmq.%I '
                           'WHERE genesis_xid >= (SELECT folded_below FROM genesis.tally_horizon) HAVING count(*) > 0',
                           t.relname) USING substr(t.relname, 3);
            EXECUTE format('ALTER TABLE pgmq.%I DROP COLUMN genesis_xid', t.relname);   -- its index with it
            EXECUTE format('CREATE TRIGGER genesis_tally_insert AFTER INSERT ON pgmq.%I REFERENCING NEW TABLE AS '
                           'new_rows FOR EACH STATEMENT EXECUTE FUNCTION genesis.tally_archive()', t.relname);
        END LOOP;
    END
    $$;
    DROP VIEW genesis.queue_health;
    DROP VIEW genesis.run_tallies;
    DROP VIEW genesis.archive_tallies;
    -- (queue_health comes back at the end, on the table again)
    DROP FUNCTION genesis.unfolded_archive_counts();
    DROP FUNCTION genesis.run_tally_rows(xid8, xid8, boolean);
    DROP FUNCTION genesis.counted_archives();
    DROP FUNCTION genesis.fold_tallies(integer, float8);
    DROP FUNCTION genesis.prepare_archive_tally(text);
    ALTER TABLE genesis.folded_run_tallies RENAME TO run_tallies;
    ALTER TABLE genesis.folded_archive_tallies RENAME TO archive_tallies;
    COMMENT ON TABLE genesis.run_tallies IS
        'Signed deltas of the number of workflow_runs per (queue, type, status); the count is sum(n). '
        'bucket: when they finished, to the 10 seconds, for the last 65 minutes (NULL: unfinished or '
        'older); total_ms: the sum of their durations (0 where bucket is NULL).';
    COMMENT ON TABLE genesis.archive_tallies IS
        'Signed deltas of the number of rows in each request queue''s pgmq archive; the count is sum(n).';
    DROP INDEX genesis.workflow_runs_tally_xid_idx;
    ALTER TABLE genesis.workflow_runs DROP COLUMN tally_xid;
    DROP TABLE genesis.tally_horizon;
    CREATE TRIGGER tally_insert AFTER INSERT ON genesis.workflow_runs
        REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION genesis.tally_runs();
    """ + TALLY_RUNS_0015 + TALLY_ARCHIVE_0009 + QUEUE_HEALTH_0009)
