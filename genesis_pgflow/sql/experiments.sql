-- The records of ExperimentRunner and of sandbox maintenance. Named blocks: see store/queries.py.

-- name: experiment_start
-- Record that an experiment (or a new request for it by the same instance) has started, held by one delivery; no row if another instance owns the id.
INSERT INTO genesis.experiments AS e (experiment_id, instance_id, experiment_type, description, risk_level, repo,
                                      base_ref, status, attempts, sandbox_path, fence_queue, fence_msg_id,
                                      fence_attempt, started_at, updated_at)
VALUES (%(experiment_id)s, %(instance_id)s, %(experiment_type)s, %(description)s, %(risk_level)s, %(repo)s,
        %(base_ref)s, 'running', 1, %(sandbox_path)s, %(queue)s, %(msg_id)s, %(attempt)s, now(), now())
ON CONFLICT (experiment_id) DO UPDATE
    SET instance_id = EXCLUDED.instance_id, experiment_type = EXCLUDED.experiment_type,
        description = EXCLUDED.description, risk_level = EXCLUDED.risk_level, repo = EXCLUDED.repo,
        base_ref = EXCLUDED.base_ref, status = 'running', attempts = e.attempts + 1,
        sandbox_path = EXCLUDED.sandbox_path, baseline_commit = NULL, change_commit = NULL,
        success_rate = NULL, regression = NULL, baseline_success_rate = NULL, test_count = NULL,
        failures = NULL, duration_ms = NULL, recommendation = NULL, rolled_back = false, error = NULL,
        result = NULL, fence_queue = EXCLUDED.fence_queue, fence_msg_id = EXCLUDED.fence_msg_id,
        fence_attempt = EXCLUDED.fence_attempt, started_at = now(), finished_at = NULL, updated_at = now()
    WHERE e.instance_id = EXCLUDED.instance_id
RETURNING attempts

-- name: experiment_claim_row
-- The experiment's owner and the delivery holding it, locked until the claim commits.
SELECT instance_id, fence_queue, fence_msg_id, fence_attempt, result IS NOT NULL AS decided
FROM genesis.experiments WHERE experiment_id = %(experiment_id)s
FOR UPDATE

-- name: experiment_resume
-- A later delivery of the same request takes the experiment over where the phases left it (a decided one keeps its outcome).
UPDATE genesis.experiments
SET fence_attempt = %(attempt)s, attempts = attempts + 1,
    status = CASE WHEN result IS NULL THEN 'running' ELSE status END,
    error = CASE WHEN result IS NULL THEN NULL ELSE error END,
    rolled_back = CASE WHEN result IS NULL THEN false ELSE rolled_back END,
    recommendation = CASE WHEN result IS NULL THEN NULL ELSE recommendation END,
    finished_at = CASE WHEN result IS NULL THEN NULL ELSE finished_at END, updated_at = now()
WHERE experiment_id = %(experiment_id)s
RETURNING attempts

-- name: experiment_phases_clear
-- Forget the phases of an experiment's previous request (a new request starts from its copy).
DELETE FROM genesis.experiment_phases WHERE experiment_id = %(experiment_id)s

-- name: experiment_phases_of
-- The finished phases of an experiment's current request, with what each left for the next.
SELECT phase, attempt, state, finished_at FROM genesis.experiment_phases
WHERE experiment_id = %(experiment_id)s ORDER BY finished_at, phase

-- name: experiment_fence
-- Check that the writer still holds the experiment (its delivery is the recorded one) and keep its commits; no row if it does not.
UPDATE genesis.experiments
SET baseline_commit = coalesce(%(baseline_commit)s, baseline_commit),
    change_commit = coalesce(%(change_commit)s, change_commit), updated_at = now()
WHERE experiment_id = %(experiment_id)s
  AND (%(msg_id)s::bigint IS NULL
       OR (fence_queue = %(queue)s AND fence_msg_id = %(msg_id)s AND fence_attempt = %(attempt)s))
RETURNING attempts, fence_attempt

-- name: experiment_phase_insert
-- Record one finished phase and what the next one needs.
INSERT INTO genesis.experiment_phases (experiment_id, phase, attempt, state)
VALUES (%(experiment_id)s, %(phase)s, %(attempt)s, %(state)s)
ON CONFLICT (experiment_id, phase) DO UPDATE
    SET attempt = EXCLUDED.attempt, state = EXCLUDED.state, finished_at = now()

-- name: experiment_set_commits
-- Record an experiment's baseline commit and, once made, the commit of its change.
UPDATE genesis.experiments
SET baseline_commit = coalesce(%(baseline_commit)s, baseline_commit),
    change_commit = coalesce(%(change_commit)s, change_commit), updated_at = now()
WHERE experiment_id = %(experiment_id)s

-- name: experiment_run_insert
-- Record one test-suite run (baseline or change) of the experiment's current attempt.
INSERT INTO genesis.experiment_runs (experiment_id, attempt, phase, step, commit_sha, command, returncode,
                                     timed_out, test_count, passed, failed, errors, skipped, success_rate,
                                     duration_ms, output_tail)
SELECT %(experiment_id)s, e.attempts, %(phase)s, %(step)s, %(commit)s, %(command)s, %(returncode)s, %(timed_out)s,
       %(test_count)s, %(passed)s, %(failed)s, %(errors)s, %(skipped)s, %(success_rate)s, %(duration_ms)s,
       %(output_tail)s
FROM genesis.experiments e WHERE e.experiment_id = %(experiment_id)s

-- name: experiment_finish
-- Record an experiment's outcome: status, metrics, recommendation and whether it was rolled back.
UPDATE genesis.experiments
SET status = %(status)s, success_rate = %(success_rate)s, regression = %(regression)s,
    baseline_success_rate = %(baseline_success_rate)s, test_count = %(test_count)s, failures = %(failures)s,
    duration_ms = %(duration_ms)s, recommendation = %(recommendation)s, rolled_back = %(rolled_back)s,
    baseline_commit = coalesce(%(baseline_commit)s, baseline_commit), error = NULL, result = %(result)s,
    finished_at = now(), updated_at = now()
WHERE experiment_id = %(experiment_id)s

-- name: experiment_fail
-- Record that an experiment failed before it could be measured (bad patch, timeout, escaping path, ...).
UPDATE genesis.experiments
SET status = 'failed', error = %(error)s, rolled_back = %(rolled_back)s, recommendation = 'reject',
    duration_ms = %(duration_ms)s, finished_at = now(), updated_at = now()
WHERE experiment_id = %(experiment_id)s

-- name: sandbox_event_insert
-- Record one event in the history of an experiment's sandbox.
INSERT INTO genesis.sandbox_events (experiment_id, sandbox_path, event, size_bytes, age_s, detail)
VALUES (%(experiment_id)s, %(sandbox_path)s, %(event)s, %(size_bytes)s, %(age_s)s, %(detail)s)

-- name: experiments_list
-- The latest experiments, newest first, optionally of one status.
SELECT experiment_id, instance_id, experiment_type, description, risk_level, repo, base_ref, status, attempts,
       baseline_commit, change_commit, sandbox_path, success_rate, regression, baseline_success_rate, test_count,
       failures, duration_ms, recommendation, rolled_back, error, started_at, finished_at
FROM genesis.experiments
WHERE %(status)s::text IS NULL OR status = %(status)s
ORDER BY started_at DESC, experiment_id
LIMIT %(limit)s

-- name: experiment_get
-- One experiment's record.
SELECT experiment_id, instance_id, experiment_type, description, risk_level, repo, base_ref, status, attempts,
       baseline_commit, change_commit, sandbox_path, success_rate, regression, baseline_success_rate, test_count,
       failures, duration_ms, recommendation, rolled_back, error, result, fence_attempt, started_at, finished_at
FROM genesis.experiments WHERE experiment_id = %(experiment_id)s

-- name: experiment_runs_of
-- The test runs of one experiment, in the order they ran.
SELECT attempt, phase, step, commit_sha, command, returncode, timed_out, test_count, passed, failed, errors, skipped,
       success_rate, duration_ms, output_tail, recorded_at
FROM genesis.experiment_runs WHERE experiment_id = %(experiment_id)s ORDER BY id

-- name: sandbox_events_list
-- Sandbox history, oldest first, optionally of one experiment and/or one kind of event.
SELECT experiment_id, sandbox_path, event, size_bytes, age_s, detail, recorded_at
FROM genesis.sandbox_events
WHERE (%(experiment_id)s::text IS NULL OR experiment_id = %(experiment_id)s)
  AND (%(event)s::text IS NULL OR event = %(event)s)
ORDER BY id
LIMIT %(limit)s

-- name: maintenance_try_lock
-- Take the session-level advisory lock of one maintenance job if no other consumer holds it.
SELECT pg_try_advisory_lock(hashtext('genesis.maintenance'), hashtext(%(job)s)) AS locked

-- name: maintenance_unlock
-- Release the advisory lock of one maintenance job.
SELECT pg_advisory_unlock(hashtext('genesis.maintenance'), hashtext(%(job)s)) AS unlocked

-- name: experiment_owners
-- Who owns each of some experiments, and how far they got (for the caps on kept sandbox copies).
SELECT experiment_id, instance_id, status, started_at, finished_at
FROM genesis.experiments WHERE experiment_id = ANY(%(ids)s::text[])

-- name: experiment_try_lock
-- Take the session-level advisory lock of one experiment_id if no other consumer holds it (a 64-bit key).
SELECT pg_try_advisory_lock(hashtextextended('genesis.experiment:' || %(experiment_id)s, 0)) AS locked

-- name: experiment_unlock
-- Release the advisory lock of one experiment_id.
SELECT pg_advisory_unlock(hashtextextended('genesis.experiment:' || %(experiment_id)s, 0)) AS unlocked

-- name: experiment_slot_try_lock
-- Take one of the experiment slots (max_experiments_concurrent across every consumer) if it is free.
SELECT pg_try_advisory_lock(hashtext('genesis.experiment_slots'), %(slot)s) AS locked

-- name: experiment_slot_unlock
-- Give an experiment slot back.
SELECT pg_advisory_unlock(hashtext('genesis.experiment_slots'), %(slot)s) AS unlocked

-- name: experiment_trends
-- Per day (newest first), experiment type and instance: what the experiments finished since a day came to (genesis.experiment_trends).
SELECT day, experiment_type, instance_id, experiments, succeeded, regressed, failed, success_rate, mean_regression,
       merge, merge_with_review, reject, mean_duration_ms
FROM genesis.experiment_trends
WHERE day >= %(since)s AND (%(until)s::date IS NULL OR day <= %(until)s)
ORDER BY day DESC, experiment_type, instance_id

-- name: scheduled_report_day
-- The last day a daily report was sent for, locked until the transaction that sends the next one commits.
SELECT last_day FROM genesis.scheduled_reports WHERE report = %(report)s FOR UPDATE

-- name: scheduled_report_sent
-- Record the day a daily report was just sent for (in the transaction that sent it).
INSERT INTO genesis.scheduled_reports (report, last_day, sent_at, sent_by)
VALUES (%(report)s, %(day)s, now(), %(sent_by)s)
ON CONFLICT (report) DO UPDATE SET last_day = EXCLUDED.last_day, sent_at = now(), sent_by = EXCLUDED.sent_by

-- name: scheduled_report_first
-- Make the report's row exist (so that concurrent senders lock one row), without moving its day.
INSERT INTO genesis.scheduled_reports (report, last_day, sent_at)
VALUES (%(report)s, %(day)s, now())
ON CONFLICT (report) DO NOTHING

-- name: report_today
-- The database's current UTC date (when a day has ended, for every consumer alike).
SELECT (now() AT TIME ZONE 'UTC')::date AS today
