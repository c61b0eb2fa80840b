-- The state RuleEngine and LlmConfigManager keep in the genesis schema. Named blocks: see store/queries.py.

-- name: lock_key
-- Serialise changes to one rule or one LLM configuration for the rest of the transaction.
SELECT pg_advisory_xact_lock(hashtext(%(key)s))

-- name: active_rule_version
-- The active (highest) version of one rule, if any.
SELECT max(version) AS version FROM genesis.rule_versions WHERE namespace = %(namespace)s AND rule_id = %(rule_id)s

-- name: insert_rule_version
-- Record a newly applied rule version.
INSERT INTO genesis.rule_versions (namespace, rule_id, version, confidence, rule, workflow_id)
VALUES (%(namespace)s, %(rule_id)s, %(version)s, %(confidence)s, %(rule)s, %(workflow_id)s)

-- name: list_active_rules
-- The active version of every rule, optionally of one namespace.
SELECT namespace, rule_id, version, confidence, rule, applied_at FROM genesis.active_rules
WHERE %(namespace)s::text IS NULL OR namespace = %(namespace)s ORDER BY namespace, rule_id

-- name: active_llm_config
-- The active configuration of one provider and complexity, secrets included (never printed), by index (migration 0014).
SELECT version, models, task_types, settings FROM genesis.active_llm_config(%(provider)s, %(complexity)s)

-- name: insert_llm_config
-- Record a new version of one provider's configuration.
INSERT INTO genesis.llm_config_versions (provider, complexity, version, models, task_types, settings, workflow_id)
VALUES (%(provider)s, %(complexity)s, %(version)s, %(models)s, %(task_types)s, %(settings)s, %(workflow_id)s)

-- name: list_llm_configs
-- Every active configuration with its settings (the caller redacts secrets).
SELECT DISTINCT ON (provider, complexity) provider, complexity, version, models, task_types, settings, applied_at
FROM genesis.llm_config_versions
WHERE %(provider)s::text IS NULL OR provider = %(provider)s
ORDER BY provider, complexity, version DESC

-- name: llm_settings_for_update
-- Every stored LLM configuration's settings, locked, for re-sealing their secrets with the first key.
SELECT provider, complexity, version, settings FROM genesis.llm_config_versions
ORDER BY provider, complexity, version FOR UPDATE

-- name: update_llm_settings
-- Store one configuration version's re-sealed settings.
UPDATE genesis.llm_config_versions SET settings = %(settings)s
WHERE provider = %(provider)s AND complexity = %(complexity)s AND version = %(version)s

-- name: sealed_dead_letters_for_update
-- The dead letters of one queue whose secrets are sealed, locked (skipping any being requeued), for re-sealing.
SELECT msg_id, message FROM pgmq.{table} ORDER BY msg_id FOR UPDATE SKIP LOCKED

-- name: update_sealed_dead_letter
-- Store one dead letter's re-sealed body.
UPDATE pgmq.{table} SET message = %(message)s WHERE msg_id = %(msg_id)s

-- name: apply_rule_versions
-- Decide and write a batch's rule updates (a JSON array, in order) in one statement: migration 0010; (decision, active_version) in the order given.
SELECT decision, active_version FROM genesis.apply_rule_versions(%(updates)s) ORDER BY ord
