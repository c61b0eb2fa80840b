"""`genesis db upgrade`: pgmq present, every queue created (request queues waking their consumers), schema at head."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from psycopg import sql as pgsql
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from genesis_pgflow.errors import SchemaBehind
from genesis_pgflow.messages import REQUEST_QUEUES, all_queue_names
from genesis_pgflow.store.database import one
from genesis_pgflow.store.queries import sql, with_tables

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
UPGRADE_LOCK = "genesis_pgflow.upgrade"


@dataclass
class UpgradeReport:
    pgmq: str = ""            # "extension" | "sql" | "present"
    queues_created: list[str] = field(default_factory=list)
    revision_before: str | None = None
    revision_after: str | None = None


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def _current_revision(conn: psycopg.Connection) -> str | None:
    if not one(conn.execute(sql("schema_version_table_exists")))[0]:
        return None
    row = conn.execute(sql("schema_revision")).fetchone()
    return None if row is None or row[0] is None else row[0]


def _ensure_pgmq(conn: psycopg.Connection) -> str:
    if one(conn.execute(sql("pgmq_schema_exists")))[0]:
        return "present"
    if one(conn.execute(sql("pgmq_extension_available")))[0]:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
        return "extension"
    # The SQL-only installer cannot be re-run over an existing schema: it runs only when the
    # schema is absent, under the upgrade lock, in one transaction.
    from pgmq.install import install_pgmq_from_sql

    with psycopg.connect(conn.info.dsn, autocommit=False) as install_conn:
        install_pgmq_from_sql(conn=install_conn)
        install_conn.commit()
    return "sql"


# What the consumer's statements use of a queue's row (sql/queue.sql writes pgmq's own statements
# for its tables): `headers` came with pgmq 1.5, `last_read_at` with 1.10.
PGMQ_COLUMNS = ("headers", "last_read_at")


def _pgmq_too_old(conn: psycopg.Connection) -> str | None:
    """Why the installed pgmq cannot serve the consumer, or None."""
    have = {row[0] for row in conn.execute(sql("pgmq_message_columns"))}
    missing = [column for column in PGMQ_COLUMNS if column not in have]
    if not missing:
        return None
    return (f"pgmq is too old: its messages have no {', '.join(missing)} (pgmq 1.10 or newer has them); "
            "update it (ALTER EXTENSION pgmq UPDATE), then run `genesis db upgrade`")


def _ensure_queues(conn: psycopg.Connection) -> list[str]:
    existing = {row[0] for row in conn.execute(sql("list_queues"))}
    created = []
    for name in all_queue_names():
        if name not in existing:
            with conn.transaction():
                conn.execute(sql("create_queue"), {"queue": name})
            created.append(name)
    return created


def _ensure_wakeups(conn: psycopg.Connection) -> None:
    """A statement-level trigger per request queue NOTIFYs its listeners. Not pgmq's own notify:
    that updates one shared row per insert (concurrent producers wait on each other's open
    transactions, a batch of N messages makes N updates) in an unlogged table that an immediate
    restart empties, silently ending the wake-ups."""
    with conn.transaction():
        conn.execute(sql("wakeup_function"))
    pgmq_notified = {row[0] for row in conn.execute(sql("pgmq_notify_queues"))}
    woken = {row[0] for row in conn.execute(sql("wakeup_queues"))}
    for name in REQUEST_QUEUES:
        with conn.transaction():
            if name in pgmq_notified:
                conn.execute(sql("disable_pgmq_notify"), {"queue": name})
            if name not in woken:
                conn.execute(pgsql.SQL(sql("create_wakeup_trigger")).format(table=pgsql.Identifier(f"q_{name}")))


# the archives that may hold LLM settings (migration 0006 scrubs what is archived into them)
SCRUBBED_QUEUES = ("genesis_llm_config_updates", "genesis_llm_config_updates_dlq")


def _ensure_scrubbing(conn: psycopg.Connection) -> list[str]:
    """Put back the scrub trigger where an archive lost it: a queue a DBA dropped and `db upgrade`
    created again gets a new archive, which the migration (run once) never saw. What was archived
    meanwhile is scrubbed in the same transaction."""
    scrubbed = {row[0] for row in conn.execute(sql("scrubbed_archives"))}
    restored = []
    for name in SCRUBBED_QUEUES:
        if name in scrubbed:
            continue
        table = pgsql.Identifier(f"a_{name}")
        with conn.transaction():
            conn.execute(pgsql.SQL(sql("create_scrub_trigger")).format(table=table))
            conn.execute(pgsql.SQL(sql("scrub_archive")).format(table=table))
        restored.append(name)
    return restored


def _ensure_archive_tallies(conn: psycopg.Connection) -> None:
    """genesis.archive_tallies counts each request queue's archive (migrations 0009, 0017): its
    column and triggers go on each archive here, and again on one a DBA dropped and created again."""
    tallied = {row[0] for row in conn.execute(sql("tallied_archives"))}
    for name in REQUEST_QUEUES:
        if name in tallied:
            continue
        with conn.transaction():
            conn.execute(sql("prepare_archive_tally"), {"queue": name})
            conn.execute(with_tables("reset_archive_tally", table=f"a_{name}"), {"queue": name})


def migrate_to(dsn: str, revision: str, *, down: bool = False) -> None:
    """The genesis schema upgraded (down=True: downgraded) to one Alembic revision ("head": the
    newest), in one transaction. upgrade() takes the lock and makes the queues first; tests of a
    migration's data call this directly."""
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE SCHEMA IF NOT EXISTS genesis")
            config = _alembic_config()
            config.attributes["connection"] = connection
            (command.downgrade if down else command.upgrade)(config, revision)
    finally:
        engine.dispose()


def upgrade(dsn: str) -> UpgradeReport:
    """Idempotent; concurrent callers wait for each other on an advisory lock."""
    report = UpgradeReport()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql("advisory_lock"), {"key": UPGRADE_LOCK})
        try:
            report.pgmq = _ensure_pgmq(conn)
            too_old = _pgmq_too_old(conn)
            if too_old:
                raise SchemaBehind(too_old)
            report.queues_created = _ensure_queues(conn)
            report.revision_before = _current_revision(conn)
            migrate_to(dsn, "head")
            report.revision_after = _current_revision(conn)
            _ensure_wakeups(conn)
            _ensure_archive_tallies(conn)
            restored = _ensure_scrubbing(conn)
            if restored:
                log.warning("the archive scrub trigger was missing and is back on: %s", ", ".join(restored))
        finally:
            conn.execute(sql("advisory_unlock"), {"key": UPGRADE_LOCK})
    log.info("database upgraded: pgmq %s, %d queue(s) created, revision %s -> %s", report.pgmq,
             len(report.queues_created), report.revision_before, report.revision_after)
    return report


def problems(dsn: str) -> list[str]:
    """What keeps this database from being current (empty when it is)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not one(conn.execute(sql("pgmq_schema_exists")))[0]:
            return ["pgmq is not installed"]
        too_old = _pgmq_too_old(conn)
        found: list[str] = [too_old] if too_old else []
        existing = {row[0] for row in conn.execute(sql("list_queues"))}
        missing = [q for q in all_queue_names() if q not in existing]
        if missing:
            found.append(f"missing queue(s): {', '.join(missing)}")
        revision, head = _current_revision(conn), head_revision()
        if revision != head:
            found.append(f"genesis schema is at revision {revision or 'none'}, head is {head}")
        unwoken = sorted(set(REQUEST_QUEUES) - {row[0] for row in conn.execute(sql("wakeup_queues"))})
        if unwoken:
            found.append(f"no wake-up trigger on: {', '.join(unwoken)}")
        untallied = sorted(set(REQUEST_QUEUES) - {row[0] for row in conn.execute(sql("tallied_archives"))})
        if untallied:
            found.append(f"no archive tally on: {', '.join(untallied)}")
        scrubbed = {row[0] for row in conn.execute(sql("scrubbed_archives"))}
        unscrubbed = [name for name in SCRUBBED_QUEUES if name not in scrubbed]
        if unscrubbed:
            found.append(f"no archive scrub trigger on: {', '.join(unscrubbed)}")
        return found


def require_current(dsn: str) -> None:
    """Raise SchemaBehind unless the database is at the current schema."""
    found = problems(dsn)
    if found:
        raise SchemaBehind(f"the database is behind ({'; '.join(found)}): run `genesis db upgrade`")
