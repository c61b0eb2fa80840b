"""genesis.apply_rule_versions(jsonb): a batch's rule updates decided and written in one statement,
in the order given, each under its rule's advisory lock (the lock `lock_key` takes), so that a
batch's completion transaction makes one round trip for all of its rules instead of three per rule.
The decision is store.state.decide_rule's: applied when newer than the active version (or the
first), unchanged when equal, stale when older.

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE FUNCTION genesis.apply_rule_versions(updates jsonb)
        RETURNS TABLE (ord integer, decision text, active_version integer)
        LANGUAGE plpgsql AS $$
    DECLARE
        u record;
        active integer;
    BEGIN
        FOR u IN SELECT e.ord::integer AS ord, e.value->>'namespace' AS namespace, e.value->>'rule_id' AS rule_id,
                        (e.value->>'version')::integer AS version, (e.value->>'confidence')::float8 AS confidence,
                        e.value->'rule' AS rule, (e.value->>'workflow_id')::uuid AS workflow_id
                 FROM jsonb_array_elements(updates) WITH ORDINALITY AS e(value, ord) ORDER BY e.ord LOOP
            PERFORM pg_advisory_xact_lock(hashtext('rule:' || u.namespace || ':' || u.rule_id));
            SELECT max(v.version) INTO active FROM genesis.rule_versions v
            WHERE v.namespace = u.namespace AND v.rule_id = u.rule_id;
            ord := u.ord;
            IF active IS NULL OR u.version > active THEN
                INSERT INTO genesis.rule_versions (namespace, rule_id, version, confidence, rule, workflow_id)
                VALUES (u.namespace, u.rule_id, u.version, u.confidence, u.rule, u.workflow_id);
                decision := 'applied';
                active_version := u.version;
            ELSE
                decision := CASE WHEN u.version = active THEN 'unchanged' ELSE 'stale' END;
                active_version := active;
            END IF;
            RETURN NEXT;
        END LOOP;
    END
    $$;
    COMMENT ON FUNCTION genesis.apply_rule_versions(jsonb) IS
        'Decide and write rule updates in the order given, each under its rule''s advisory lock: (ord, applied|unchanged|stale, active version).';
    """)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS genesis.apply_rule_versions(jsonb)")
