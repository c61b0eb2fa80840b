"""requirements-dev.lock, the development environment's versions, agrees with pyproject.toml: every
dependency (runtime and test) is locked at a version its specifier allows, and what pyproject pins
exactly is locked at that version. `make lock` re-resolves it; `make install` installs with it as
constraints."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
ENVIRONMENT = {"python_version": "3.11", "platform_machine": "x86_64", "sys_platform": "linux", "extra": "test"}


def locked() -> dict[str, str]:
    versions = {}
    for line in (ROOT / "requirements-dev.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert match, f"requirements-dev.lock: not a pinned line: {line!r}"
        versions[canonicalize_name(match[1])] = match[2]
    return versions


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_every_dependency_is_locked_at_a_version_pyproject_allows() -> None:
    versions = locked()
    checked = 0
    for requirement in declared():
        if requirement.marker is not None and not requirement.marker.evaluate(ENVIRONMENT):
            continue
        name = canonicalize_name(requirement.name)
        assert name in versions, f"{requirement} is not in requirements-dev.lock: run `make lock`"
        assert requirement.specifier.contains(versions[name], prereleases=True), (
            f"requirements-dev.lock has {name}=={versions[name]}, pyproject.toml asks {requirement}: run `make lock`")
        checked += 1
    assert checked >= 15


def test_runtime_libraries_are_bounded_and_result_deciding_tools_pinned() -> None:
    """Below the next major for libraries; exact for the pgmq SQL and the analysers."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    for name in ("pgmq", "ruff", "bandit", "radon", "lizard"):
        assert [s.operator for s in runtime[name].specifier] == ["=="], runtime[name]
    for name in ("psycopg", "psycopg-pool", "sqlalchemy", "alembic", "pydantic", "prometheus-client"):
        assert "<" in {s.operator for s in runtime[name].specifier}, f"{runtime[name]} has no upper bound"
