-- The queries of the metrics probe (/metrics and /readyz). Named blocks: see store/queries.py.
-- It also runs pgmq_schema_exists, schema_version_table_exists and schema_revision (schema.sql)
-- and queue_metrics (queue.sql).

-- name: probe_statement_timeout
-- Bound every statement of the probe's own session, so that a scrape never hangs on a slow server.
SELECT set_config('statement_timeout', %(timeout_ms)s, false)
