"""The core genesis schema: workflow runs, rule and LLM config state, queue health.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE genesis.workflow_runs (
        queue        text        NOT NULL,
        msg_id       bigint      NOT NULL,
        workflow_id  uuid,
        type         text,
        status       text        NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed')),
        attempts     integer     NOT NULL DEFAULT 0,
        enqueued_at  timestamptz,
        started_at   timestamptz,
        finished_at  timestamptz,
        updated_at   timestamptz NOT NULL DEFAULT now(),
        next_attempt_at timestamptz,
        consumer     text,
        error        jsonb,
        result       jsonb,
        PRIMARY KEY (queue, msg_id)
    );
    COMMENT ON TABLE genesis.workflow_runs IS 'One row per request message: its latest attempt and final outcome.';
    CREATE INDEX workflow_runs_status_idx ON genesis.workflow_runs (status, type);
    CREATE INDEX workflow_runs_finished_idx ON genesis.workflow_runs (finished_at);

    CREATE TABLE genesis.rule_versions (
        namespace   text        NOT NULL,
        rule_id     text        NOT NULL,
        version     integer     NOT NULL CHECK (version >= 1),
        confidence  double precision NOT NULL,
        rule        jsonb       NOT NULL,
        applied_at  timestamptz NOT NULL DEFAULT now(),
        workflow_id uuid,
        PRIMARY KEY (namespace, rule_id, version)
    );
    COMMENT ON TABLE genesis.rule_versions IS 'Every applied rule version; the highest version of a rule is the active one.';
    CREATE VIEW genesis.active_rules AS
        SELECT DISTINCT ON (namespace, rule_id) namespace, rule_id, version, confidence, rule, applied_at
        FROM genesis.rule_versions
        ORDER BY namespace, rule_id, version DESC;

    CREATE TABLE genesis.llm_config_versions (
        provider    text        NOT NULL,
        complexity  text        NOT NULL CHECK (complexity IN ('simple', 'medium', 'complex')),
        version     integer     NOT NULL,
        models      jsonb       NOT NULL,
        task_types  jsonb       NOT NULL DEFAULT '[]',
        settings    jsonb       NOT NULL DEFAULT '{}',
        applied_at  timestamptz NOT NULL DEFAULT now(),
        workflow_id uuid,
        PRIMARY KEY (provider, complexity, version)
    );
    COMMENT ON TABLE genesis.llm_config_versions IS 'Every applied LLM configuration; settings may hold secrets: grant with care.';
    CREATE VIEW genesis.active_llm_configs AS
        SELECT DISTINCT ON (provider, complexity) provider, complexity, version, models, task_types, applied_at
        FROM genesis.llm_config_versions
        ORDER BY provider, complexity, version DESC;
    COMMENT ON VIEW genesis.active_llm_configs IS 'The active configuration per provider and complexity, without settings (secrets).';

    CREATE TABLE genesis.queue_map (
        queue        text PRIMARY KEY,
        type         text NOT NULL,
        result_queue text NOT NULL,
        dlq          text NOT NULL
    );
    INSERT INTO genesis.queue_map VALUES
        ('genesis_rule_updates', 'genesis_rule_update', 'genesis_rule_updates_results', 'genesis_rule_updates_dlq'),
        ('genesis_llm_config_updates', 'genesis_llm_config_update', 'genesis_llm_config_updates_results', 'genesis_llm_config_updates_dlq'),
        ('code_execution_requests', 'code_execution_request', 'code_execution_results', 'code_execution_requests_dlq'),
        ('genesis_experiment_requests', 'genesis_experiment_request', 'genesis_experiment_results', 'genesis_experiment_requests_dlq');

    CREATE VIEW genesis.queue_health AS
        SELECT m.queue,
               m.type,
               q.queue_length                         AS depth,
               q.queue_length - q.queue_visible_length AS in_flight,
               q.oldest_msg_age_sec                   AS oldest_age_s,
               (SELECT count(*) FROM genesis.workflow_runs r WHERE r.queue = m.queue AND r.status = 'completed') AS completed,
               (SELECT count(*) FROM genesis.workflow_runs r WHERE r.queue = m.queue AND r.status = 'failed')    AS failed,
               (SELECT count(*) FROM genesis.workflow_runs r WHERE r.queue = m.queue AND r.status = 'pending')   AS retrying,
               d.queue_length                         AS dead_lettered,
               r.queue_length                         AS results_waiting
        FROM genesis.queue_map m
        CROSS JOIN LATERAL pgmq.metrics(m.queue) q
        CROSS JOIN LATERAL pgmq.metrics(m.dlq) d
        CROSS JOIN LATERAL pgmq.metrics(m.result_queue) r;
    COMMENT ON VIEW genesis.queue_health IS 'Per request queue: depth, in flight, oldest age, outcomes, dead letters.';
    """)


def downgrade() -> None:
    op.execute("""
    DROP VIEW IF EXISTS genesis.queue_health;
    DROP TABLE IF EXISTS genesis.queue_map;
    DROP VIEW IF EXISTS genesis.active_llm_configs;
    DROP TABLE IF EXISTS genesis.llm_config_versions;
    DROP VIEW IF EXISTS genesis.active_rules;
    DROP TABLE IF EXISTS genesis.rule_versions;
    DROP TABLE IF EXISTS genesis.workflow_runs;
    """)
