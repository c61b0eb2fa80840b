"""Secrets at rest: the archived copies of LLM configuration requests (and of their dead letters,
once requeued) are scrubbed as they are archived, by genesis.redact(jsonb) in a trigger, and the
copies archived before this revision are scrubbed now.

genesis.redact follows messages.redact: every value under a key named like a secret (api_key,
token, secret, password, passwd, credential, authorization; any case) becomes "[redacted]", in
objects and arrays at any depth; past a depth of 100 the rest is redacted whole, so that no
body, however nested, can make an archive fail. The stored configurations' own secrets are sealed
by the application (cipher.py): run `genesis secrets rotate` once to seal those stored before.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SCRUBBED = ("genesis_llm_config_updates", "genesis_llm_config_updates_dlq")


def upgrade() -> None:
    op.execute(r"""
    CREATE FUNCTION genesis.redact(value jsonb, depth integer DEFAULT 0) RETURNS jsonb
        LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
    BEGIN
        IF depth > 100 THEN
            RETURN '"[redacted]"'::jsonb;
        END IF;
        CASE jsonb_typeof(value)
        WHEN 'object' THEN
            RETURN (SELECT coalesce(jsonb_object_agg(e.key, CASE
                        WHEN e.key ~* '(api[_-]?key|token|secret|password|passwd|credential|authorization)'
                        THEN '"[redacted]"'::jsonb ELSE genesis.redact(e.value, depth + 1) END), '{}'::jsonb)
                    FROM jsonb_each(value) AS e);
        WHEN 'array' THEN
            RETURN (SELECT coalesce(jsonb_agg(genesis.redact(a.value, depth + 1) ORDER BY a.n), '[]'::jsonb)
                    FROM jsonb_array_elements(value) WITH ORDINALITY AS a(value, n));
        ELSE
            RETURN value;
        END CASE;
    END
    $$;
    COMMENT ON FUNCTION genesis.redact(jsonb, integer) IS
        'A copy of a JSON value with every field named like a secret replaced by "[redacted]" (as messages.redact).';

    CREATE FUNCTION genesis.scrub_archived() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.message := genesis.redact(NEW.message);
        NEW.headers := genesis.redact(NEW.headers);
        RETURN NEW;
    END
    $$;
    COMMENT ON FUNCTION genesis.scrub_archived() IS
        'BEFORE INSERT on a pgmq archive: the archived copy keeps no secret (in the archiving transaction).';
    """)
    for queue in SCRUBBED:
        # the queues exist: `genesis db upgrade` creates them before it migrates
        op.execute(f"""
        DO $$
        BEGIN
            IF to_regclass('pgmq.a_{queue}') IS NOT NULL THEN
                CREATE TRIGGER scrub_archived BEFORE INSERT ON pgmq.a_{queue}
                    FOR EACH ROW EXECUTE FUNCTION genesis.scrub_archived();
                UPDATE pgmq.a_{queue} SET message = genesis.redact(message), headers = genesis.redact(headers)
                WHERE message IS DISTINCT FROM genesis.redact(message) OR headers IS DISTINCT FROM genesis.redact(headers);
            END IF;
        END
        $$;
        """)
    op.execute("""
    COMMENT ON TABLE genesis.llm_config_versions IS
        'Every applied LLM configuration; the values of secret settings are sealed (genesis-sealed:v1:..., Fernet) '
        'with GENESIS_SECRET_KEY or <GENESIS_HOME>/secret.key.';
    """)


def downgrade() -> None:
    for queue in SCRUBBED:
        op.execute(f"""
        DO $$
        BEGIN
            IF to_regclass('pgmq.a_{queue}') IS NOT NULL THEN
                DROP TRIGGER IF EXISTS scrub_archived ON pgmq.a_{queue};
            END IF;
        END
        $$;
        """)
    op.execute("""
    DROP FUNCTION IF EXISTS genesis.scrub_archived();
    DROP FUNCTION IF EXISTS genesis.redact(jsonb, integer);
    COMMENT ON TABLE genesis.llm_config_versions IS 'Every applied LLM configuration; settings may hold secrets: grant with care.';
    """)
