"""Alembic environment: runs on the connection that `genesis db upgrade` hands over."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - `alembic` run by hand
    raise SystemExit("run migrations with `genesis db upgrade`, which supplies the connection")

context.configure(connection=connection, version_table="alembic_version", version_table_schema="genesis",
                  transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
