"""Finds a real PostgreSQL for the database tiers and gives each test a fresh database cloned from a
template migrated to head (pgmq, every queue, the genesis schema).

The server: GENESIS_TEST_DATABASE_URL, else one answering on 127.0.0.1:5432, else a testcontainers
PostgreSQL when a Docker engine answers, else the embedded default (pgserver)."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from genesis_pgflow.store import schema


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _docker_postgres() -> tuple[str, object] | None:
    try:
        import docker  # type: ignore[import-not-found]
        from testcontainers.postgres import PostgresContainer  # type: ignore[import-not-found]

        docker.from_env().ping()
    except Exception:  # noqa: BLE001 - no engine, no client, no package: not an option here
        return None
    container = PostgresContainer("postgres:16", driver=None).start()
    return container.get_connection_url(), container


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """A DSN (to the maintenance database) of a server the tests may create databases on."""
    explicit = os.environ.get("GENESIS_TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    local = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    if _answers(local):
        yield local
        return
    found = _docker_postgres()
    if found:
        dsn, container = found
        yield dsn
        container.stop()  # type: ignore[attr-defined]
        return
    from genesis_pgflow.store.embedded import embedded_dsn

    home = Path(os.environ.get("GENESIS_TEST_HOME", "/var/tmp/genesis-test-home"))
    yield embedded_dsn(home)


@pytest.fixture(scope="session")
def template_db(server_dsn: str) -> Iterator[str]:
    name = f"genesis_tpl_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    schema.upgrade(make_conninfo(server_dsn, dbname=name))
    yield name
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_counter = itertools.count()


@contextmanager
def _fresh_database(server_dsn: str, prefix: str, template: str | None = None) -> Iterator[str]:
    name = f"genesis_{prefix}{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{clause}')
    try:
        yield make_conninfo(server_dsn, dbname=name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_dsn(server_dsn: str, template_db: str) -> Iterator[str]:
    """A fresh database at the current schema, dropped after the test."""
    with _fresh_database(server_dsn, "t", template_db) as dsn:
        yield dsn


@pytest.fixture
def empty_db_dsn(server_dsn: str) -> Iterator[str]:
    """A fresh database with nothing in it (no pgmq, no genesis schema)."""
    with _fresh_database(server_dsn, "e") as dsn:
        yield dsn


@pytest.fixture
def genesis_home() -> Iterator[Path]:
    """A GENESIS_HOME of the test's own (0700, as mkdtemp makes it: bwrap binds the sandboxes
    below it as root, so their parents need not be traversable by the sandbox's uids)."""
    path = Path(tempfile.mkdtemp(prefix="genesis-home-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
