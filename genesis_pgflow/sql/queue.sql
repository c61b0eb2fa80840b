-- The consumer's hot path and the admin commands over pgmq. Named blocks: see store/queries.py.

-- name: read_batch
-- Lease up to qty visible messages of one queue (none while it is paused) for lease_s seconds, in one round trip; each body and headers come as JSON text with its size, the text only under its limit. No run is written here: a run is recorded when it has run a while (record_running) or when it ends. The lease is pgmq.read's own statement (pgmq 1.x: the oldest visible first, skipping rows another reader holds, read_ct and last_read_at counted), written here for the queue's table so that it is planned once per connection: pgmq.read builds and plans it anew on every call (about 0.2 ms, twice the statement itself at 10 messages).
WITH cte AS (
    SELECT msg_id FROM pgmq.{table}
    -- waited_s: visible this long at least (a command's second process takes what waits: processes.py)
    WHERE vt <= clock_timestamp() - make_interval(secs => %(waited_s)s)
    ORDER BY msg_id
    -- a paused queue (genesis.fleet_control) is read for nothing, whatever the consumer believes
    LIMIT CASE WHEN EXISTS (SELECT 1 FROM genesis.fleet_control WHERE scope = 'queue' AND target = %(queue)s)
               THEN 0 ELSE %(qty)s END
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE pgmq.{table} AS m
    SET last_read_at = clock_timestamp(), vt = clock_timestamp() + make_interval(secs => %(lease_s)s),
        read_ct = m.read_ct + 1
    -- by id, not a join: a generic plan (prepared, its LIMIT unknown) hash-joined the whole queue
    WHERE m.msg_id = ANY(ARRAY(SELECT msg_id FROM cte))
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.message, m.headers
)
-- as text, so that the consumer decodes each message on its own; a body over the limit never
-- leaves the server. The columns' order is PgQueueStore._take_in's (it takes the rows as tuples).
SELECT msg_id, read_ct, enqueued_at, octet_length(written.body) AS body_bytes, octet_length(written.headers) AS headers_bytes,
       CASE WHEN octet_length(written.body) <= %(max_payload_bytes)s THEN written.body END AS body,
       CASE WHEN octet_length(written.headers) <= %(max_headers_bytes)s THEN written.headers END AS headers,
       -- what the failure of a body too large to fetch echoes, for correlation
       CASE WHEN octet_length(written.body) > %(max_payload_bytes)s AND jsonb_typeof(message) = 'object' THEN
           (SELECT jsonb_object_agg(key, value) FROM jsonb_each(message)
            WHERE key = ANY(%(id_fields)s::text[]) AND jsonb_typeof(value) IN ('string', 'number')
              AND octet_length(value::text) <= %(max_identifier_bytes)s)::text END AS identifiers
-- each document written out as text once (OFFSET 0 keeps the planner from copying the
-- conversion into every expression that uses it)
FROM leased CROSS JOIN LATERAL (SELECT message::text AS body, headers::text AS headers OFFSET 0) AS written
ORDER BY msg_id

-- name: lease_bare
-- Lease up to qty visible messages without reading their bodies (when read_batch failed on one).
SELECT msg_id, read_ct, enqueued_at FROM pgmq.read(%(queue)s, %(lease_s)s, CASE WHEN EXISTS (
    SELECT 1 FROM genesis.fleet_control WHERE scope = 'queue' AND target = %(queue)s) THEN 0 ELSE %(qty)s END)
ORDER BY msg_id

-- name: read_body
-- The body and headers of one message as JSON text with their sizes, each text only under its limit (as read_batch, and in the order of its columns from body_bytes on).
SELECT size.body_bytes, size.headers_bytes,
       CASE WHEN size.body_bytes <= %(max_payload_bytes)s THEN message::text END AS body,
       CASE WHEN size.headers_bytes <= %(max_headers_bytes)s THEN headers::text END AS headers,
       CASE WHEN size.body_bytes > %(max_payload_bytes)s AND jsonb_typeof(message) = 'object' THEN
           (SELECT jsonb_object_agg(key, value) FROM jsonb_each(message)
            WHERE key = ANY(%(id_fields)s::text[]) AND jsonb_typeof(value) IN ('string', 'number')
              AND octet_length(value::text) <= %(max_identifier_bytes)s)::text END AS identifiers
FROM pgmq.{table} CROSS JOIN LATERAL (SELECT octet_length(message::text) AS body_bytes,
                                             octet_length(headers::text) AS headers_bytes) AS size
WHERE msg_id = %(msg_id)s

-- name: archive_batch
-- Move messages from a queue ({table}) to its archive ({archive}); returns the ids that were still in the queue. pgmq.archive's own statement, prepared here: pgmq.archive builds and plans it anew on every call.
WITH archived AS (
    DELETE FROM pgmq.{table} WHERE msg_id = ANY(%(msg_ids)s::bigint[])
    RETURNING msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers
)
INSERT INTO pgmq.{archive} (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
SELECT msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers FROM archived
RETURNING msg_id

-- name: send_batch
-- Send the elements of a JSON array as messages to one queue, each with the pgmq headers at the same place of a second array (null: none).
SELECT msg_id FROM pgmq.send_batch(
    %(queue)s,
    ARRAY(SELECT m FROM jsonb_array_elements(%(messages)s::jsonb) WITH ORDINALITY AS e(m, n) ORDER BY n),
    ARRAY(SELECT nullif(h, 'null'::jsonb) FROM jsonb_array_elements(%(headers)s::jsonb) WITH ORDINALITY AS e(h, n)
          ORDER BY n)) AS msg_id

-- name: send_one
-- Send one JSON message to a queue (genesis send, dead-letter requeue).
SELECT pgmq.send(%(queue)s, %(message)s::jsonb) AS msg_id

-- name: send_one_with_headers
-- Send one JSON message with pgmq headers (null: none) to a queue.
SELECT pgmq.send(%(queue)s, %(message)s::jsonb, %(headers)s::jsonb) AS msg_id

-- name: send_results
-- Publish the result envelopes of several runs of one queue (a JSON array) to one queue ({table}), each with the pgmq headers at the same place of a second array (null: none), and record each run's final outcome from its envelope, with, in the same order, each request's enqueue time (a JSON array of texts): the envelopes are parsed once for both (parsing them cost as much as a fifth of the two writes). A run's error and result are its envelope's.
WITH e AS MATERIALIZED (
    SELECT value, n FROM jsonb_array_elements(%(results)s::jsonb) WITH ORDINALITY AS e(value, n)
), runs AS (
    INSERT INTO genesis.workflow_runs AS r (queue, msg_id, workflow_id, type, status, attempts, enqueued_at,
                                            started_at, finished_at, updated_at, consumer, error, result)
    SELECT %(queue)s, (e.value->'request'->>'msg_id')::bigint, (e.value->>'workflow_id')::uuid,
           e.value->'request'->>'type', e.value->>'status', (e.value->'request'->>'attempt')::int, t.enqueued_at,
           (e.value->>'started_at')::timestamptz, (e.value->>'finished_at')::timestamptz, now(), %(consumer)s,
           nullif(e.value->'error', 'null'::jsonb), nullif(e.value->'result', 'null'::jsonb)
    FROM e JOIN (SELECT value::timestamptz AS enqueued_at, n
                 FROM jsonb_array_elements_text(%(enqueued_at)s::jsonb) WITH ORDINALITY AS t(value, n)) AS t USING (n)
    ON CONFLICT (queue, msg_id) DO UPDATE
        SET workflow_id = EXCLUDED.workflow_id, type = EXCLUDED.type, status = EXCLUDED.status,
            attempts = EXCLUDED.attempts, started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at,
            updated_at = now(), consumer = EXCLUDED.consumer, error = EXCLUDED.error, result = EXCLUDED.result,
            next_attempt_at = NULL
)
-- the results, as pgmq.send_batch inserts them (its statement, prepared here for the queue's table)
INSERT INTO pgmq.{table} (vt, message, headers)
SELECT clock_timestamp(), e.value, nullif(h.h, 'null'::jsonb)
FROM e JOIN jsonb_array_elements(%(headers)s::jsonb) WITH ORDINALITY AS h(h, n) USING (n)
ORDER BY n
RETURNING msg_id

-- name: schedule_retries
-- Make messages visible again after their backoff delays (seconds), only those still leased by this read (same read_ct); returns their ids.
UPDATE pgmq.{table} AS q SET vt = clock_timestamp() + make_interval(secs => t.delay_s)
FROM unnest(%(msg_ids)s::bigint[], %(read_cts)s::int[], %(delays)s::float8[]) AS t(msg_id, read_ct, delay_s)
WHERE q.msg_id = t.msg_id AND q.read_ct = t.read_ct
RETURNING q.msg_id

-- name: record_retries
-- Record runs pending again with the error that caused the retry and when the next attempt is due (the ids schedule_retries kept; never a finished run). The run may have no row yet: one that failed quickly was never recorded running.
INSERT INTO genesis.workflow_runs AS r (queue, msg_id, workflow_id, type, status, attempts, enqueued_at, started_at,
                                        updated_at, consumer, error, next_attempt_at)
SELECT %(queue)s, t.msg_id, t.workflow_id, t.type, 'pending', t.attempts, t.enqueued_at, t.started_at, now(),
       %(consumer)s, t.error, now() + make_interval(secs => t.delay_s)
FROM jsonb_to_recordset(%(runs)s::jsonb)
     AS t(msg_id bigint, workflow_id uuid, type text, attempts int, enqueued_at timestamptz, started_at timestamptz,
          delay_s float8, error jsonb)
WHERE t.msg_id = ANY(%(kept)s::bigint[])
ON CONFLICT (queue, msg_id) DO UPDATE
    SET workflow_id = EXCLUDED.workflow_id, type = EXCLUDED.type, status = 'pending', attempts = EXCLUDED.attempts,
        started_at = EXCLUDED.started_at, updated_at = now(), consumer = EXCLUDED.consumer, error = EXCLUDED.error,
        next_attempt_at = EXCLUDED.next_attempt_at
    WHERE r.status NOT IN ('completed', 'failed')

-- name: record_running
-- Record runs as running: those that have run a while, while their message is still in its queue and held by the read that leased them (read_ct = attempts). Never a finished run, nor one a later read has recorded.
INSERT INTO genesis.workflow_runs AS r (queue, msg_id, workflow_id, type, status, attempts, enqueued_at, started_at,
                                        updated_at, consumer)
SELECT %(queue)s, t.msg_id, t.workflow_id, t.type, 'running', t.attempts, t.enqueued_at, t.started_at, now(),
       %(consumer)s
FROM jsonb_to_recordset(%(runs)s::jsonb)
     AS t(msg_id bigint, workflow_id uuid, type text, attempts int, enqueued_at timestamptz, started_at timestamptz)
JOIN pgmq.{table} AS q ON q.msg_id = t.msg_id AND q.read_ct = t.attempts
ON CONFLICT (queue, msg_id) DO UPDATE
    SET workflow_id = EXCLUDED.workflow_id, type = EXCLUDED.type, status = 'running', attempts = EXCLUDED.attempts,
        started_at = EXCLUDED.started_at, updated_at = now(), consumer = EXCLUDED.consumer, error = NULL,
        next_attempt_at = NULL
    WHERE r.status NOT IN ('completed', 'failed') AND r.attempts <= EXCLUDED.attempts

-- name: extend_leases
-- Push the visibility timeout of in-flight messages lease_s seconds ahead; returns the ids still held.
SELECT msg_id FROM pgmq.set_vt(%(queue)s, %(msg_ids)s::bigint[], %(lease_s)s)

-- name: release_messages
-- Give leased messages back without spending an attempt: visible at once, the read that leased them uncounted (only while that read, read_ct, still holds them, when given).
UPDATE pgmq.{table} AS q SET vt = clock_timestamp(), read_ct = greatest(q.read_ct - 1, 0)
FROM unnest(%(msg_ids)s::bigint[], %(read_cts)s::int[]) AS t(msg_id, read_ct)
WHERE q.msg_id = t.msg_id AND q.vt > clock_timestamp() AND (t.read_ct IS NULL OR q.read_ct = t.read_ct)
RETURNING q.msg_id

-- name: release_runs
-- Mark given-back runs pending (their messages are visible again), the attempt uncounted.
UPDATE genesis.workflow_runs SET status = 'pending', updated_at = now(), attempts = greatest(attempts - 1, 0)
WHERE queue = %(queue)s AND msg_id = ANY(%(released)s::bigint[]) AND status = 'running'

-- name: queue_metrics
-- pgmq's metrics of every queue.
SELECT queue_name, queue_length, queue_visible_length, oldest_msg_age_sec, total_messages FROM pgmq.metrics_all()

-- name: run_counts
-- Runs per queue, type and status, from the tallies (migrations 0009, 0017): no scan of history.
SELECT queue, coalesce(type, '(none)') AS type, status, sum(n)::bigint AS n
FROM genesis.run_tallies GROUP BY queue, type, status HAVING sum(n) <> 0

-- name: archived_counts
-- How many messages each request queue has archived, from the tallies (migrations 0009, 0017).
SELECT queue, sum(n)::bigint AS n FROM genesis.archive_tallies GROUP BY queue

-- name: fold_tallies
-- Count the runs and archived messages written since the last fold into the folded tallies and move the horizon past them (migration 0017), once min_rows runs are past it or max_wait_s after the last fold (0: not yet); NULL: a write that holds the horizon is still open, nothing done.
SELECT genesis.fold_tallies(%(min_rows)s, %(max_wait_s)s) AS folded

-- name: compact_tallies
-- Merge the rows of both folded tallies into one per group (the scheduled job tally_compaction, after fold_tallies): run buckets older than 65 minutes go into history (bucket NULL); a group that is one row already is left alone, so a folded row is not rewritten every run. Rows added meanwhile by other transactions are not in this statement's snapshot and stay as they are; a row deleted meanwhile (a TRUNCATE) is not folded.
WITH run_rows AS (
    -- a bucket is its own bucket while it is recent, NULL (history) after: one definition, the trigger's
    SELECT ctid AS row_id, bucket, genesis.tally_bucket(bucket) AS into_bucket,
           count(*) OVER (PARTITION BY queue, type, status, genesis.tally_bucket(bucket)) AS rows_in_group
    FROM genesis.folded_run_tallies
), runs AS (
    DELETE FROM genesis.folded_run_tallies t USING run_rows r
    WHERE t.ctid = r.row_id AND (r.rows_in_group > 1 OR r.bucket IS DISTINCT FROM r.into_bucket)
    RETURNING t.queue, t.type, t.status, r.into_bucket, t.n, t.total_ms
), runs_folded AS (
    INSERT INTO genesis.folded_run_tallies (queue, type, status, bucket, n, total_ms)
    SELECT queue, type, status, into_bucket, sum(n), CASE WHEN into_bucket IS NULL THEN 0 ELSE sum(total_ms) END
    FROM runs GROUP BY queue, type, status, into_bucket
    HAVING sum(n) <> 0 OR (into_bucket IS NOT NULL AND sum(total_ms) <> 0)
    RETURNING 1
), archive_rows AS (
    SELECT ctid AS row_id, count(*) OVER (PARTITION BY queue) AS rows_in_group FROM genesis.folded_archive_tallies
), archives AS (
    DELETE FROM genesis.folded_archive_tallies t USING archive_rows r
    WHERE t.ctid = r.row_id AND r.rows_in_group > 1
    RETURNING t.queue, t.n
), archives_folded AS (
    INSERT INTO genesis.folded_archive_tallies (queue, n)
    SELECT queue, sum(n) FROM archives GROUP BY 1 HAVING sum(n) <> 0
    RETURNING 1
)
SELECT (SELECT count(*) FROM runs) + (SELECT count(*) FROM archives) AS before,
       (SELECT count(*) FROM runs_folded) + (SELECT count(*) FROM archives_folded) AS after

-- name: take_dead_letters
-- Lease the chosen (or all) messages of a dead-letter queue for requeueing.
SELECT msg_id, message, headers FROM pgmq.{table}
WHERE %(all)s OR msg_id = ANY(%(msg_ids)s::bigint[])
ORDER BY msg_id FOR UPDATE SKIP LOCKED

-- name: archive_one
-- Archive one message.
SELECT pgmq.archive(%(queue)s, %(msg_id)s::bigint)

-- name: total_depth
-- How many messages (visible or not) the given queues hold.
SELECT coalesce(sum(queue_length), 0)::bigint AS depth FROM pgmq.metrics_all() WHERE queue_name = ANY(%(queues)s::text[])
