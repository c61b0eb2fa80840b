"""The shape holds: imports flow one way, and every named SQL query used exists."""

import re
import subprocess
import sys
from pathlib import Path

from genesis_pgflow.store import queries

ROOT = Path(__file__).resolve().parents[2]


def test_import_layers_contract():
    lint = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_named_query_used_exists_and_has_a_purpose():
    loaded = queries.load()
    used = set()
    for path in (ROOT / "genesis_pgflow").rglob("*.py"):
        used |= set(re.findall(r"""(?:sql|_table)\(\s*["']([a-z_0-9]+)["']""", path.read_text()))
    assert used, "no named queries found: the pattern is stale"
    assert sorted(used - set(loaded)) == []
    assert all(q.purpose for q in loaded.values())


def test_sql_is_only_in_the_store():
    offenders = []
    for path in (ROOT / "genesis_pgflow").rglob("*.py"):
        if "store" in path.relative_to(ROOT / "genesis_pgflow").parts:
            continue
        text = path.read_text()
        if re.search(r"\bimport psycopg\b|\bfrom psycopg\b", text):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_ruff_is_clean():
    ruff = Path(sys.executable).parent / "ruff"
    run = subprocess.run([str(ruff), "check", "--no-cache", "genesis_pgflow", "tests", "benchmarks"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
