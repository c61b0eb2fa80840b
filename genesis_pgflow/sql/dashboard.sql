-- What the dashboard charts: each request queue's depth minute by minute and runs finished per minute. Named blocks: see store/queries.py.

-- name: depth_per_minute
-- One queue's depth at the end of each of the last minutes (the last: now), rebuilt from the messages still queued and those archived since the first minute: no sampling process needed.
WITH bounds AS (
    SELECT date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1) AS start
), events AS (
    SELECT q.enqueued_at AS at, 1 AS delta FROM pgmq.{queue} q
    UNION ALL
    SELECT a.enqueued_at, 1 FROM pgmq.{archive} a, bounds b WHERE a.archived_at >= b.start
    UNION ALL
    SELECT a.archived_at, -1 FROM pgmq.{archive} a, bounds b WHERE a.archived_at >= b.start
), buckets AS (
    SELECT greatest(date_trunc('minute', e.at), b.start) AS minute, sum(e.delta) AS delta
    FROM events e, bounds b GROUP BY 1
)
SELECT m.minute, greatest(0, sum(coalesce(k.delta, 0)) OVER (ORDER BY m.minute))::bigint AS depth
FROM bounds b
CROSS JOIN generate_series(b.start, date_trunc('minute', now()), interval '1 minute') AS m(minute)
LEFT JOIN buckets k ON k.minute = m.minute
ORDER BY m.minute

-- name: throughput_minutes
-- Runs finished per minute and queue over the last minutes (at most 65: the tallies' 10-second buckets, migration 0015; no run is read).
SELECT date_trunc('minute', bucket) AS minute, queue,
       coalesce(sum(n) FILTER (WHERE status = 'completed'), 0)::bigint AS completed,
       coalesce(sum(n) FILTER (WHERE status = 'failed'), 0)::bigint AS failed
FROM genesis.run_tallies
WHERE bucket >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1) AND status IN ('completed', 'failed')
GROUP BY 1, 2 ORDER BY 1, 2

-- name: dashboard_clock
-- The database's own now, so that the charts' minutes and the page's ages agree with the rows.
SELECT now() AS now, date_trunc('minute', now()) AS minute
