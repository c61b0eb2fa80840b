"""Named SQL blocks: every runtime query lives in sql/*.sql under a `-- name:` line and a purpose line."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from psycopg import sql as pgsql

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
_HEADER = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.M)


@dataclass(frozen=True)
class Query:
    name: str
    purpose: str
    sql: str


def parse(text: str, source: str = "<sql>") -> dict[str, Query]:
    """Split a file into blocks; each starts with `-- name: x` and a `-- purpose` comment line."""
    queries: dict[str, Query] = {}
    headers = list(_HEADER.finditer(text))
    for i, header in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        body = text[header.end():end].strip("\n")
        lines = body.splitlines()
        if not lines or not lines[0].startswith("--"):
            raise ValueError(f"{source}: query {header.group(1)} has no purpose line")
        purpose = lines[0].lstrip("- ").strip()
        sql = "\n".join(lines[1:]).strip().rstrip(";")
        if not sql:
            raise ValueError(f"{source}: query {header.group(1)} is empty")
        if header.group(1) in queries:
            raise ValueError(f"{source}: query {header.group(1)} is defined twice")
        queries[header.group(1)] = Query(header.group(1), purpose, sql)
    return queries


@cache
def load(sql_dir: Path = SQL_DIR) -> dict[str, Query]:
    """Every named query of every file in sql/, loaded once."""
    queries: dict[str, Query] = {}
    for path in sorted(sql_dir.glob("*.sql")):
        for name, query in parse(path.read_text(encoding="utf-8"), path.name).items():
            if name in queries:
                raise ValueError(f"{path.name}: query {name} is also defined in another file")
            queries[name] = query
    return queries


def sql(name: str) -> str:
    """The text of one named query."""
    try:
        return load()[name].sql
    except KeyError:
        raise KeyError(f"no SQL query named {name!r} in {SQL_DIR}") from None


@lru_cache(maxsize=512)     # a few statements for a few queues each: composed once
def with_tables(name: str, **tables: str) -> pgsql.Composed:
    """A named query whose {placeholders} name tables (a queue's `q_<queue>`, its archive
    `a_<queue>`), each quoted as an identifier."""
    return pgsql.SQL(sql(name)).format(**{k: pgsql.Identifier(v) for k, v in tables.items()})
