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

-- name: pgmq_extension_available
-- Whether the server can CREATE EXTENSION pgmq.
SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq')

-- name: list_queues
-- The names of every pgmq queue.
SELECT queue_name FROM pgmq.meta

-- name: create_queue
-- Create one pgmq queue (idempotent inside pgmq).
SELECT pgmq.create(%(queue)s)

-- name: notify_enabled_queues
-- Queues whose inserts already NOTIFY listeners.
SELECT queue_name FROM pgmq.notify_insert_throttle

-- name: enable_notify
-- Make inserts into a queue NOTIFY `pgmq.q_<queue>.INSERT` (throttled).
SELECT pgmq.enable_notify_insert(%(queue)s, %(throttle_ms)s)

-- name: schema_version_table_exists
-- Whether Alembic has ever run on the genesis schema.
SELECT to_regclass('genesis.alembic_version') IS NOT NULL

-- name: schema_revision
-- The genesis schema's Alembic revision.
SELECT version_num FROM genesis.alembic_version LIMIT 1
