"""genesis.active_llm_config(provider, complexity): the active LLM configuration looked up by the
primary key's index whatever the statistics say (enable_seqscan off, as genesis.apply_rule_versions
since 0012). The lookup was a prepared statement whose plan, made while
genesis.llm_config_versions looked empty, read the whole table for every configuration update as
the table grew (300 updates read 44,850 rows).

Revision ID: 0014
Revises: 0013
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE FUNCTION genesis.active_llm_config(of_provider text, of_complexity text)
        RETURNS TABLE (version integer, models jsonb, task_types jsonb, settings jsonb)
        LANGUAGE sql STABLE SET enable_seqscan = off AS $$
        SELECT c.version, c.models, c.task_types, c.settings FROM genesis.llm_config_versions c
        WHERE c.provider = of_provider AND c.complexity = of_complexity ORDER BY c.version DESC LIMIT 1
    $$;
    COMMENT ON FUNCTION genesis.active_llm_config(text, text) IS
        'The active configuration of one provider and complexity, secrets included (never printed).';
    """)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS genesis.active_llm_config(text, text)")
