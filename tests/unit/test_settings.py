"""Settings: flags over environment over defaults, and clear errors."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from genesis_pgflow.settings import ROOT_HOME, Settings, default_home


def test_flags_win_over_environment_over_defaults():
    env = {"GENESIS_DATABASE_URL": "postgresql://a/b", "DATABASE_URL": "postgresql://c/d",
           "GENESIS_PARALLEL": "8", "GENESIS_QUEUES": "genesis_rule_updates,code_execution_requests"}
    s = Settings.from_env(env, parallel=2, batch_size=None)
    assert s.dsn == "postgresql://a/b" and s.parallel == 2 and s.batch_size == 10
    assert s.queues == ("genesis_rule_updates", "code_execution_requests")
    assert Settings.from_env({"DATABASE_URL": "postgresql://c/d"}).dsn == "postgresql://c/d"
    assert Settings.from_env({}).dsn is None


def test_home():
    assert default_home({"GENESIS_HOME": "/srv/g"}) == Path("/srv/g")
    assert default_home({}, euid=0) == ROOT_HOME
    assert default_home({}, euid=1000) == Path.home() / ".genesis"


@pytest.mark.parametrize("overrides, field", [
    ({"parallel": 0}, "parallel"),
    ({"queues": ("nope",)}, "queues"),
    ({"timeout_ms": 0}, "timeout_ms"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValidationError) as info:
        Settings.from_env({}, **overrides)
    assert info.value.errors()[0]["loc"][0] == field


def test_the_npm_tools_are_found_wherever_the_package_is_installed(tmp_path):
    explicit = Settings.from_env({"GENESIS_TOOLS_DIR": str(tmp_path / "tools"), "GENESIS_HOME": str(tmp_path)})
    assert explicit.npm_tools_dir == tmp_path / "tools"
    default = Settings.from_env({"GENESIS_HOME": str(tmp_path)})
    checkout_tools = Path(__file__).resolve().parents[2] / ".tools"
    assert default.npm_tools_dir == (checkout_tools if checkout_tools.is_dir() else tmp_path / "tools")
