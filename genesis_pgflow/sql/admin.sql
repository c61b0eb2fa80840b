-- What operators read and do: live consumers, failures, one run's history, dead letters, status. Named blocks: see store/queries.py.

-- name: consumer_register
-- Register (or register again) a consumer: running from now, nothing in flight.
INSERT INTO genesis.consumers AS c (id, host, pid, version, queues, parallel, heartbeat_s, started_at, last_heartbeat,
                                    in_flight, state)
VALUES (%(id)s, %(host)s, %(pid)s, %(version)s, %(queues)s, %(parallel)s, %(heartbeat_s)s, now(), now(), 0, 'running')
ON CONFLICT (id) DO UPDATE
    SET host = EXCLUDED.host, pid = EXCLUDED.pid, version = EXCLUDED.version, queues = EXCLUDED.queues,
        parallel = EXCLUDED.parallel, heartbeat_s = EXCLUDED.heartbeat_s, started_at = now(), last_heartbeat = now(),
        in_flight = 0, state = 'running'

-- name: consumer_heartbeat
-- A consumer is alive and holds in_flight messages; its row comes back if it was cleaned up meanwhile, a stopped one stays stopped.
INSERT INTO genesis.consumers AS c (id, host, pid, version, queues, parallel, heartbeat_s, in_flight)
VALUES (%(id)s, %(host)s, %(pid)s, %(version)s, %(queues)s, %(parallel)s, %(heartbeat_s)s, %(in_flight)s)
ON CONFLICT (id) DO UPDATE
    SET last_heartbeat = now(), in_flight = EXCLUDED.in_flight, heartbeat_s = EXCLUDED.heartbeat_s,
        state = CASE WHEN c.state = 'stopped' THEN 'stopped' ELSE 'running' END

-- name: consumers_mark_gone
-- Mark running consumers whose heartbeat is over three intervals old as gone.
UPDATE genesis.consumers SET state = 'gone'
WHERE state = 'running' AND last_heartbeat < now() - make_interval(secs => 3 * heartbeat_s)

-- name: consumers_forget
-- Delete consumers gone or stopped for longer than the retention (seconds).
DELETE FROM genesis.consumers
WHERE state <> 'running' AND last_heartbeat < now() - make_interval(secs => %(retention_s)s)

-- name: consumer_stopped
-- A consumer exited: stopped, nothing in flight.
UPDATE genesis.consumers SET state = 'stopped', in_flight = 0, last_heartbeat = now() WHERE id = %(id)s

-- name: consumers_list
-- Every registered consumer, live ones first, with the command (drain, stop) addressed to it; a running one whose heartbeat is over three intervals old is shown as gone.
SELECT id, host, pid, version, queues, parallel, in_flight, started_at, last_heartbeat, heartbeat_s,
       round(extract(epoch FROM now() - last_heartbeat)::numeric, 1)::float8 AS heartbeat_age_s,
       CASE WHEN state = 'running' AND last_heartbeat < now() - make_interval(secs => 3 * heartbeat_s) THEN 'gone'
            ELSE state END AS state,
       f.command, f.issued_at AS command_issued_at, f.honoured_at AS command_honoured_at
FROM genesis.consumers
LEFT JOIN genesis.fleet_control f ON f.scope = 'consumer' AND f.target = consumers.id
ORDER BY (state = 'running' AND last_heartbeat >= now() - make_interval(secs => 3 * heartbeat_s)) DESC,
         started_at DESC, id

-- name: failures_recent
-- Failed runs finished in the last since_s seconds, newest first, optionally of one queue and one type.
SELECT finished_at, queue, msg_id, type, attempts, error ->> 'code' AS code, error ->> 'message' AS message,
       error -> 'details' AS details, workflow_id, consumer
FROM genesis.workflow_runs
WHERE status = 'failed' AND finished_at >= now() - make_interval(secs => %(since_s)s)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s) AND (%(type)s::text IS NULL OR type = %(type)s)
ORDER BY finished_at DESC, queue, msg_id
LIMIT %(limit)s

-- name: failures_by_code
-- Failed runs per error code over the last window_s seconds.
SELECT coalesce(error ->> 'code', '(none)') AS code, count(*) AS n
FROM genesis.workflow_runs WHERE status = 'failed' AND finished_at >= now() - make_interval(secs => %(window_s)s)
GROUP BY 1 ORDER BY 2 DESC, 1

-- name: throughput_since
-- Runs finished per queue over the last window_s seconds (to the 10 seconds: every bucket of the tallies the window reaches into, migration 0015): completed, failed, mean duration in ms. No run is read.
SELECT queue, coalesce(sum(n) FILTER (WHERE status = 'completed'), 0)::bigint AS completed,
       coalesce(sum(n) FILTER (WHERE status = 'failed'), 0)::bigint AS failed,
       round((sum(total_ms) / nullif(sum(n), 0))::numeric, 1)::float8 AS avg_ms
FROM genesis.run_tallies
WHERE bucket > now() - make_interval(secs => %(window_s)s + 10) AND status IN ('completed', 'failed')
GROUP BY queue HAVING sum(n) <> 0 ORDER BY queue

-- name: run_row
-- The run row of one request message.
SELECT queue, msg_id, workflow_id, type, status, attempts, enqueued_at, started_at, finished_at, updated_at,
       next_attempt_at, consumer, error, result
FROM genesis.workflow_runs WHERE queue = %(queue)s AND msg_id = %(msg_id)s

-- name: run_errors
-- Every error one request message met, in order: each retry and the final failure.
SELECT at, attempt, outcome, error, retry_at, consumer
FROM genesis.run_errors WHERE queue = %(queue)s AND msg_id = %(msg_id)s ORDER BY at, attempt

-- name: run_queue_row
-- One message as it sits in a request queue (not yet finished).
SELECT msg_id, read_ct, enqueued_at, vt, vt > clock_timestamp() AS leased,
       coalesce(message ->> 'reply_to', headers ->> 'reply_to') AS reply_to
FROM pgmq.{table} WHERE msg_id = %(msg_id)s

-- name: run_archive_row
-- One message as it sits in a queue's archive.
SELECT msg_id, read_ct, enqueued_at, archived_at,
       coalesce(message ->> 'reply_to', headers ->> 'reply_to') AS reply_to
FROM pgmq.{table} WHERE msg_id = %(msg_id)s

-- name: queue_exists
-- Whether a pgmq queue (a reply_to queue, say) exists.
SELECT to_regclass(format('pgmq.%%I', 'q_' || %(queue)s)) IS NOT NULL AS found

-- name: run_result_messages
-- The result messages still waiting in a result queue for one request message.
SELECT msg_id, enqueued_at, message FROM pgmq.{table}
WHERE message -> 'request' ->> 'queue' = %(queue)s AND (message -> 'request' ->> 'msg_id')::bigint = %(msg_id)s
ORDER BY msg_id

-- name: dead_letters_explained
-- The dead letters of one request queue, oldest first, each joined back to its original message (the dlq copy's headers name it, else the archive row of the same transaction and body) and its run.
WITH letters AS (
    SELECT d.msg_id, d.read_ct, d.enqueued_at, d.message, d.headers,
           CASE WHEN d.headers ->> 'original_msg_id' ~ '^[0-9]{{1,18}}$'
                THEN (d.headers ->> 'original_msg_id')::bigint END AS named_original,
           row_number() OVER (PARTITION BY d.enqueued_at, d.message ORDER BY d.msg_id) AS nth,
           row_number() OVER (PARTITION BY d.enqueued_at ORDER BY d.msg_id) AS nth_at
    FROM pgmq.{dlq} d ORDER BY d.msg_id LIMIT %(limit)s
), originals AS (
    -- the dead letter, the archived original and the run row are written in one transaction:
    -- same now(), same body (unless the archive scrubbed its secrets; then the order decides)
    SELECT a.msg_id, a.archived_at, a.message,
           row_number() OVER (PARTITION BY a.archived_at, a.message ORDER BY a.msg_id) AS nth,
           row_number() OVER (PARTITION BY a.archived_at ORDER BY a.msg_id) AS nth_at
    FROM pgmq.{archive} a
    JOIN genesis.workflow_runs r ON r.queue = %(queue)s AND r.msg_id = a.msg_id
    WHERE a.archived_at IN (SELECT enqueued_at FROM letters)
      AND r.status = 'failed' AND r.error ->> 'code' = 'max_attempts_exceeded'
), matched AS (
    SELECT l.*, coalesce(l.named_original, same.msg_id, nearest.msg_id) AS original_msg_id
    FROM letters l
    LEFT JOIN originals same ON same.archived_at = l.enqueued_at AND same.message = l.message AND same.nth = l.nth
    LEFT JOIN originals nearest ON nearest.archived_at = l.enqueued_at AND nearest.nth_at = l.nth_at
)
SELECT m.msg_id, m.read_ct, m.enqueued_at, m.message, m.headers, m.original_msg_id,
       r.attempts, r.error, r.finished_at, r.workflow_id
FROM matched m
LEFT JOIN genesis.workflow_runs r ON r.queue = %(queue)s AND r.msg_id = m.original_msg_id
ORDER BY m.msg_id

-- name: dead_letters_present
-- Which of the given ids are in a dead-letter queue.
SELECT msg_id FROM pgmq.{table} WHERE msg_id = ANY(%(msg_ids)s::bigint[])

-- name: database_identity
-- The server and database a command is looking at.
SELECT current_database() AS database, current_user AS "user", split_part(version(), ' ', 2) AS server_version,
       inet_server_addr()::text AS address, inet_server_port() AS port
