"""Rule lookups by index, whatever the statistics say: genesis.apply_rule_versions runs with
enable_seqscan off. PL/pgSQL keeps a plan per session; one made while genesis.rule_versions was
empty (a new install, or statistics taken of an empty table) is a sequential scan, kept as the
table grows, so every rule update read the whole table: a batch of 100 took 140 ms at 20,000 rows
instead of 2.6 ms. Each of its statements is a lookup of one rule by the primary key, which
only the index serves well.

Revision ID: 0012
Revises: 0011
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER FUNCTION genesis.apply_rule_versions(jsonb) SET enable_seqscan = off")


def downgrade() -> None:
    op.execute("ALTER FUNCTION genesis.apply_rule_versions(jsonb) RESET enable_seqscan")
