-- The queries of `genesis db upgrade` and of the schema check. Named blocks: see store/queries.py.

-- name: advisory_lock
-- Wait for the session-level advisory lock that serialises concurrent upgrades.
SELECT pg_advisory_lock(hashtext(%(key)s))

-- name: advisory_unlock
-- Release the upgrade lock.
SELECT pg_advisory_unlock(hashtext(%(key)s))

-- name: pgmq_schema_exists
-- Whether pgmq is installed (as an extension or by the SQL-only installer).
SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgmq')

-- name: pgmq_message_columns
-- The columns of pgmq's message record (a queue table's row as pgmq returns it): what its version has.
SELECT a.attname AS name FROM pg_attribute a JOIN pg_type t ON t.typrelid = a.attrelid
WHERE t.typnamespace = 'pgmq'::regnamespace AND t.typname = 'message_record' AND a.attnum > 0 AND NOT a.attisdropped

-- name: pgmq_extension_available
-- Whether the server can CREATE EXTENSION pgmq.
SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq')

-- name: list_queues
-- The names of every pgmq queue.
SELECT queue_name FROM pgmq.meta

-- name: create_queue
-- Create one pgmq queue (idempotent inside pgmq).
SELECT pgmq.create(%(queue)s)

-- name: pgmq_notify_queues
-- Queues with pgmq's own row-level insert notify (each insert updates one shared, unlogged throttle row).
SELECT queue_name FROM pgmq.notify_insert_throttle

-- name: disable_pgmq_notify
-- Drop pgmq's own insert notify of a queue (its trigger and its throttle row).
SELECT pgmq.disable_notify_insert(%(queue)s)

-- name: wakeup_function
-- The wake-up trigger's function: NOTIFY `pgmq.q_<queue>.INSERT` once per inserting statement, with no state of its own.
CREATE OR REPLACE FUNCTION genesis.notify_queue_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- the channel pgmq's own notify uses, so that listeners need not know which one fired
    PERFORM pg_notify('pgmq.' || TG_TABLE_NAME || '.' || TG_OP, NULL);
    RETURN NULL;
END
$$

-- name: wakeup_queues
-- Queues whose table has the wake-up trigger.
SELECT substr(c.relname, 3) AS queue_name
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgmq' AND t.tgname = 'genesis_wakeup' AND NOT t.tgisinternal

-- name: create_wakeup_trigger
-- Make each statement inserting into a queue (one send or a send_batch of any size) wake its listeners once.
CREATE TRIGGER genesis_wakeup AFTER INSERT ON pgmq.{table}
FOR EACH STATEMENT EXECUTE FUNCTION genesis.notify_queue_insert()

-- name: schema_version_table_exists
-- Whether Alembic has ever run on the genesis schema.
SELECT to_regclass('genesis.alembic_version') IS NOT NULL

-- name: schema_revision
-- The genesis schema's Alembic revision.
SELECT version_num FROM genesis.alembic_version LIMIT 1

-- name: scrubbed_archives
-- Queues whose pgmq archive has the scrub trigger (migration 0006: archived copies keep no secret).
SELECT substr(c.relname, 3) AS queue_name
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgmq' AND t.tgname = 'scrub_archived' AND NOT t.tgisinternal AND c.relname LIKE 'a\_%'

-- name: create_scrub_trigger
-- Scrub each copy archived into this pgmq archive from now on.
CREATE TRIGGER scrub_archived BEFORE INSERT ON pgmq.{table}
FOR EACH ROW EXECUTE FUNCTION genesis.scrub_archived()

-- name: scrub_archive
-- Scrub the copies already in this pgmq archive (archived while it had no trigger).
UPDATE pgmq.{table} SET message = genesis.redact(message), headers = genesis.redact(headers)
WHERE message IS DISTINCT FROM genesis.redact(message) OR headers IS DISTINCT FROM genesis.redact(headers)

-- name: tallied_archives
-- Request queues whose pgmq archive is counted by genesis.archive_tallies (migration 0017): the column genesis_xid and the trigger of deletes.
SELECT substr(c.relname, 3) AS queue_name
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgmq' AND t.tgname = 'genesis_tally_delete' AND NOT t.tgisinternal AND c.relname LIKE 'a\_%'
  AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'genesis_xid' AND NOT a.attisdropped)

-- name: prepare_archive_tally
-- Put one archive's column, index and triggers on (migration 0017's function); its writers wait until this transaction commits.
SELECT genesis.prepare_archive_tally(%(queue)s)

-- name: reset_archive_tally
-- Count one archive again from its rows as they are (after prepare_archive_tally): those before the horizon (held until commit) into the folded tally, the rest are counted where they are.
WITH horizon AS (SELECT folded_below FROM genesis.tally_horizon FOR SHARE),
gone AS (DELETE FROM genesis.folded_archive_tallies WHERE queue = %(queue)s)
INSERT INTO genesis.folded_archive_tallies (queue, n)
SELECT %(queue)s, count(*) FROM pgmq.{table} WHERE coalesce(genesis_xid, '0') < (SELECT folded_below FROM horizon)
