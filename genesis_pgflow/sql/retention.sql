-- Retention: deleting old archived requests, finished runs and unread results in bounded batches. Named blocks: see store/queries.py.

-- name: retention_session
-- Keep one prune batch from waiting on anyone's lock for long, and from running long.
SELECT set_config('lock_timeout', '1s', true), set_config('statement_timeout', '60s', true)

-- name: prune_archive
-- Delete up to `limit` of the oldest archived messages of one archive table archived before `before` (archived_at index).
DELETE FROM pgmq.{table} WHERE msg_id = ANY(ARRAY(
    SELECT msg_id FROM pgmq.{table} WHERE archived_at < %(before)s
    ORDER BY archived_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED))

-- name: count_prunable_archive
-- How many archived messages of one archive table were archived before `before` (prune --dry-run).
SELECT count(*) AS n FROM pgmq.{table} WHERE archived_at < %(before)s

-- name: prune_results
-- Delete up to `limit` unread result messages of one result queue sent before `before` and not leased by a reader now.
DELETE FROM pgmq.{table} WHERE msg_id = ANY(ARRAY(
    SELECT msg_id FROM pgmq.{table} WHERE enqueued_at < %(before)s AND vt <= clock_timestamp()
    ORDER BY msg_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED))

-- name: count_prunable_results
-- How many unread result messages of one result queue were sent before `before` (prune --dry-run).
SELECT count(*) AS n FROM pgmq.{table} WHERE enqueued_at < %(before)s AND vt <= clock_timestamp()

-- name: prune_runs
-- Delete up to `limit` of the oldest finished (completed or failed) runs finished before `before`, and the errors they met.
WITH gone AS (
    DELETE FROM genesis.workflow_runs WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM genesis.workflow_runs
        WHERE finished_at < %(before)s AND status IN ('completed', 'failed')
        ORDER BY finished_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED))
    RETURNING queue, msg_id
), errors AS (
    DELETE FROM genesis.run_errors AS e USING gone WHERE e.queue = gone.queue AND e.msg_id = gone.msg_id
)
SELECT count(*) AS n FROM gone

-- name: count_prunable_runs
-- How many finished runs finished before `before` (prune --dry-run).
SELECT count(*) AS n FROM genesis.workflow_runs WHERE finished_at < %(before)s AND status IN ('completed', 'failed')

-- name: existing_queue_tables
-- Which of the given pgmq tables exist (a queue may not have been created yet).
SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgmq' AND c.relname = ANY(%(names)s::text[])

-- name: relation_bytes
-- The total size (heap, indexes, TOAST) of each given pgmq or genesis table.
SELECT t.name, pg_total_relation_size(to_regclass(t.name)) AS bytes
FROM unnest(%(names)s::text[]) AS t(name) WHERE to_regclass(t.name) IS NOT NULL
