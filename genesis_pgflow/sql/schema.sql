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
-- Request queues whose pgmq archive keeps genesis.archive_tallies current (migration 0009).
SELECT substr(c.relname, 3) AS queue_name
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgmq' AND t.tgname = 'genesis_tally_insert' AND NOT t.tgisinternal AND c.relname LIKE 'a\_%'

-- name: lock_archive
-- Hold writers of one archive off until this transaction commits (its first count and its triggers agree).
LOCK TABLE pgmq.{table} IN SHARE MODE

-- name: create_archive_tally_insert
-- Count the rows each statement archives.
CREATE TRIGGER genesis_tally_insert AFTER INSERT ON pgmq.{table}
REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION genesis.tally_archive()

-- name: create_archive_tally_delete
-- Count the rows each statement deletes from an archive (genesis prune, a DBA).
CREATE TRIGGER genesis_tally_delete AFTER DELETE ON pgmq.{table}
REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION genesis.tally_archive()

-- name: create_archive_tally_truncate
-- An emptied archive counts nothing.
CREATE TRIGGER genesis_tally_truncate AFTER TRUNCATE ON pgmq.{table}
FOR EACH STATEMENT EXECUTE FUNCTION genesis.tally_archive()

-- name: reset_archive_tally
-- Start one archive's tally again from its rows as they are (under lock_archive).
WITH gone AS (DELETE FROM genesis.archive_tallies WHERE queue = %(queue)s)
INSERT INTO genesis.archive_tallies (queue, n) SELECT %(queue)s, count(*) FROM pgmq.{table}
