"""genesis.apply_rule_versions decides a batch's rules in two statements instead of three per rule:
the advisory locks first, in the order given (a statement of its own, so that the versions read
next are those committed before the locks were granted: in READ COMMITTED each statement of a
volatile function takes a new snapshot), then one statement that reads each rule's stored version
by index, decides every update against it and against the updates of the same rule earlier in the
batch, and inserts the applied ones. The decisions are the row-by-row function's (migration 0010):
applied when newer than both (or the first), unchanged when equal, stale when older; the active
version returned is the update's own when applied, else the newest before it. A batch of 100
distinct rules: 1.3 to 1.7 ms against 2.5 to 2.9 ms.

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE OR REPLACE FUNCTION genesis.apply_rule_versions(updates jsonb)
        RETURNS TABLE (ord integer, decision text, active_version integer)
        LANGUAGE plpgsql SET enable_seqscan = off AS $$
    BEGIN
        -- volatile functions in a target list run after the sort: the locks are taken in this order
        PERFORM pg_advisory_xact_lock(hashtext('rule:' || (e.value->>'namespace') || ':' || (e.value->>'rule_id')))
        FROM jsonb_array_elements(updates) WITH ORDINALITY AS e(value, n) ORDER BY e.n;
        RETURN QUERY
        WITH u AS (
            SELECT e.n::integer AS n, e.value->>'namespace' AS namespace, e.value->>'rule_id' AS rule_id,
                   (e.value->>'version')::integer AS version, (e.value->>'confidence')::float8 AS confidence,
                   e.value->'rule' AS rule, (e.value->>'workflow_id')::uuid AS workflow_id
            FROM jsonb_array_elements(updates) WITH ORDINALITY AS e(value, n)),
        decided AS (
            -- the newest version before this update: stored, or an earlier update of the batch
            -- (an earlier one not applied was no newer than what it met, so the max is the same)
            SELECT u.*, greatest(stored.version, max(u.version) OVER earlier) AS before
            FROM u LEFT JOIN LATERAL (SELECT max(v.version) AS version FROM genesis.rule_versions v
                                      WHERE v.namespace = u.namespace AND v.rule_id = u.rule_id) AS stored ON true
            WINDOW earlier AS (PARTITION BY u.namespace, u.rule_id ORDER BY u.n
                               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)),
        written AS (
            INSERT INTO genesis.rule_versions (namespace, rule_id, version, confidence, rule, workflow_id)
            SELECT d.namespace, d.rule_id, d.version, d.confidence, d.rule, d.workflow_id
            FROM decided d WHERE d.before IS NULL OR d.version > d.before)
        SELECT d.n,
               CASE WHEN d.before IS NULL OR d.version > d.before THEN 'applied'
                    WHEN d.version = d.before THEN 'unchanged' ELSE 'stale' END,
               CASE WHEN d.before IS NULL OR d.version > d.before THEN d.version ELSE d.before END
        FROM decided d ORDER BY d.n;
    END
    $$;
    """)


def downgrade() -> None:
    op.execute("""
    CREATE OR REPLACE FUNCTION genesis.apply_rule_versions(updates jsonb)
        RETURNS TABLE (ord integer, decision text, active_version integer)
        LANGUAGE plpgsql SET enable_seqscan = off AS $$
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
    """)
