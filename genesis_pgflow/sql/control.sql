-- Steering the fleet (genesis.fleet_control, migration 0007): queue pauses, consumer commands. Named blocks: see store/queries.py.

-- name: control_state
-- What one consumer obeys: the paused queues, and the command (drain or stop) addressed to it, if any.
SELECT coalesce(array_agg(target ORDER BY target) FILTER (WHERE scope = 'queue'), '{}') AS paused,
       max(command) FILTER (WHERE scope = 'consumer' AND target = %(consumer)s) AS command
FROM genesis.fleet_control

-- name: command_honoured
-- A consumer began to act on the command addressed to it (shown by status; notifies nobody).
UPDATE genesis.fleet_control SET honoured_at = now()
WHERE scope = 'consumer' AND target = %(consumer)s AND command = %(command)s AND honoured_at IS NULL

-- name: queue_pause
-- Pause a queue; returns its row if it was not paused yet (nothing if it already was).
INSERT INTO genesis.fleet_control (scope, target, command, issued_by)
VALUES ('queue', %(queue)s, 'pause', coalesce(%(by)s, session_user))
ON CONFLICT (scope, target) DO NOTHING
RETURNING target AS queue, issued_at AS paused_at, issued_by AS paused_by

-- name: queue_resume
-- Resume a queue; returns its pause row if it was paused.
DELETE FROM genesis.fleet_control WHERE scope = 'queue' AND target = %(queue)s
RETURNING target AS queue, issued_at AS paused_at, issued_by AS paused_by

-- name: queues_paused
-- The paused queues, with since when and by whom.
SELECT target AS queue, issued_at AS paused_at, issued_by AS paused_by
FROM genesis.fleet_control WHERE scope = 'queue' ORDER BY target

-- name: consumers_commandable
-- The consumers a command may be addressed to (not stopped: running, or silent but maybe alive), with their current command.
SELECT c.id, c.state, f.command
FROM genesis.consumers c
LEFT JOIN genesis.fleet_control f ON f.scope = 'consumer' AND f.target = c.id
WHERE c.state <> 'stopped'
ORDER BY c.id

-- name: consumers_command
-- Address drain or stop to consumers; stop overrides drain, never the reverse. Returns each target's command now.
INSERT INTO genesis.fleet_control AS f (scope, target, command, issued_by)
SELECT 'consumer', id, %(command)s, coalesce(%(by)s, session_user) FROM unnest(%(ids)s::text[]) AS id
ON CONFLICT (scope, target) DO UPDATE
    SET command = CASE WHEN f.command = 'stop' THEN 'stop' ELSE EXCLUDED.command END,
        issued_at = CASE WHEN f.command IN ('stop', EXCLUDED.command) THEN f.issued_at ELSE now() END,
        issued_by = CASE WHEN f.command IN ('stop', EXCLUDED.command) THEN f.issued_by ELSE EXCLUDED.issued_by END,
        honoured_at = CASE WHEN f.command IN ('stop', EXCLUDED.command) THEN f.honoured_at END
RETURNING target AS id, command

-- name: consumer_commands_clear
-- Forget the command addressed to a consumer (it registered again, or exited).
DELETE FROM genesis.fleet_control WHERE scope = 'consumer' AND target = %(id)s

-- name: consumer_commands_forget
-- Forget commands addressed to consumers no longer listed, or stopped.
DELETE FROM genesis.fleet_control f
WHERE f.scope = 'consumer'
  AND NOT EXISTS (SELECT 1 FROM genesis.consumers c WHERE c.id = f.target AND c.state <> 'stopped')
