"""One Elixir experiment, from request to recommendation, as README.md walks through it: a small
real mix project in a real git repository, a genesis_experiment_request sent with plain SQL, the
real `genesis-consume --drain`, and the result read back from genesis_experiment_results.

The run keeps what the README shows (build/test-artifacts/elixir-experiment/: request.sql,
consumer.log, result.json), and checks that the README's section says what this run did: its SQL
is the request sent here (but for the repository's path) and its result agrees with this one on
everything that does not vary from run to run (times, commits, paths)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

pytestmark = [pytest.mark.db, pytest.mark.sandbox, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ARTIFACTS = ROOT / "build" / "test-artifacts" / "elixir-experiment"
README = ROOT / "README.md"
SECTION = "### One Elixir experiment, from request to recommendation"
QUEUE, RESULTS = "genesis_experiment_requests", "genesis_experiment_results"

# the repository: three modules and their ExUnit tests; Budget batches tasks four per LLM call
PROJECT = {
    "mix.exs": """\
defmodule Singularity.MixProject do
  use Mix.Project

  def project, do: [app: :singularity, version: "0.1.0", elixir: "~> 1.14", deps: []]
end
""",
    "lib/singularity/budget.ex": """\
defmodule Singularity.Budget do
  @moduledoc "How many LLM calls a list of tasks costs: tasks go to the model in batches."
  @batch 4

  def calls_for(tasks), do: div(length(tasks) + @batch - 1, @batch)

  def within?(tasks, limit), do: calls_for(tasks) <= limit
end
""",
    "lib/singularity/prompt.ex": """\
defmodule Singularity.Prompt do
  @moduledoc "Prompts from templates with {{name}} slots."
  def render(template, vars) do
    Enum.reduce(vars, template, fn {name, value}, text ->
      String.replace(text, "{{#{name}}}", to_string(value))
    end)
  end
end
""",
    "lib/singularity/router.ex": """\
defmodule Singularity.Router do
  @moduledoc "Which model a task of some complexity goes to."
  def model(:simple), do: "small"
  def model(:medium), do: "medium"
  def model(:complex), do: "large"
end
""",
    "test/test_helper.exs": "ExUnit.start()\n",
    "test/singularity/budget_test.exs": """\
defmodule Singularity.BudgetTest do
  use ExUnit.Case, async: true
  alias Singularity.Budget

  test "four tasks per call" do
    assert Budget.calls_for(Enum.to_list(1..9)) == 3
  end

  test "no tasks, no calls" do
    assert Budget.calls_for([]) == 0
  end

  test "a day of tasks stays within the budget" do
    tasks = Enum.to_list(1..20)
    metrics = System.get_env("GENESIS_METRICS_FILE")
    if metrics, do: File.write!(metrics, ~s({"llm_calls": #{Budget.calls_for(tasks)}}))
    assert Budget.within?(tasks, 5)
  end

  # stands in for a flaky test: it fails on the second suite run of an experiment
  test "the prompt cache is warm" do
    assert System.get_env("GENESIS_RUN_SEED") != "2"
  end

  @tag :slow
  test "a million tasks" do
    assert Budget.calls_for(Enum.to_list(1..1_000_000)) == 250_000
  end
end
""",
    "test/singularity/prompt_test.exs": """\
defmodule Singularity.PromptTest do
  use ExUnit.Case, async: true

  test "fills every slot" do
    assert Singularity.Prompt.render("fix {{file}} in {{repo}}", file: "a.ex", repo: "s") == "fix a.ex in s"
  end

  test "leaves unknown slots" do
    assert Singularity.Prompt.render("{{x}}", []) == "{{x}}"
  end
end
""",
    "test/singularity/router_test.exs": """\
defmodule Singularity.RouterTest do
  use ExUnit.Case, async: true

  test "simple tasks go to the small model" do
    assert Singularity.Router.model(:simple) == "small"
  end

  test "complex tasks go to the large model" do
    assert Singularity.Router.model(:complex) == "large"
  end
end
""",
}

# the request, as Singularity would send it: five tasks per call instead of four
REQUEST_SQL = """\
SELECT pgmq.send('genesis_experiment_requests', '{
  "type": "genesis_experiment_request",
  "experiment_id": "exp-elixir-1",
  "instance_id": "singularity-prod-1",
  "experiment_type": "llm_reduction",
  "description": "batch five tasks per LLM call",
  "risk_level": "low",
  "repo": "%(repo)s",
  "changes": {"files": [{"path": "lib/singularity/budget.ex",
    "content": "defmodule Singularity.Budget do\\n  @moduledoc \\"How many LLM calls a list of tasks costs: tasks go to the model in batches.\\"\\n  @batch 5\\n\\n  def calls_for(tasks), do: div(length(tasks) + @batch - 1, @batch)\\n\\n  def within?(tasks, limit), do: calls_for(tasks) <= limit\\nend\\n"}]},
  "timeout_ms": 600000
}'::jsonb);"""

RESULT_SQL = "SELECT message FROM pgmq.read('genesis_experiment_results', 30, 1);"
# the result's fields that change from run to run
VARYING = {"duration_ms", "baseline_commit", "sandbox_path", "performance"}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "init.defaultBranch=main", "-C", str(repo), *args], check=True,
                          capture_output=True, text=True).stdout


def make_project(repo: Path) -> Path:
    for name, content in PROJECT.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(content)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    return repo


# the order the handler writes the result's fields in (jsonb keeps its own: shorter keys first)
ORDER = ["experiment_id", "instance_id", "status", "metrics", "recommendation", "rolled_back", "baseline_commit",
         "sandbox_path", "counted_by", "selection", "classes", "regressions", "fixed", "flaky", "reruns",
         "performance", "flags", "test_config_changes",
         "success_rate", "regression", "baseline_success_rate", "test_count", "failures", "duration_ms",
         "command", "by", "args", "selected_nothing", "pass->pass", "pass->fail", "fail->pass", "fail->fail",
         "baseline", "change", "test", "baseline_ms", "change_ms", "relative_change", "slower_tests",
         "wall_ms", "cpu_ms", "memory_peak_bytes"]


def ordered(value: Any) -> Any:
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER))
        return {k: ordered(value[k]) for k in keys}
    if isinstance(value, list):
        return [ordered(v) for v in value]
    return value


def shown(result: dict[str, Any]) -> str:
    """The result as the README prints it: one top-level field a line, in the handler's order."""
    fields = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in ordered(result).items()]
    return "{\n" + ",\n".join(fields) + "\n}\n"


def stable(result: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in result.items() if k not in VARYING}
    kept["metrics"] = {k: v for k, v in result["metrics"].items() if k not in VARYING}
    if "performance" in result:
        kept["custom_metrics"] = result["performance"]["metrics"]
    return kept


def readme_section() -> str:
    text = README.read_text()
    assert SECTION in text, f"README.md has no {SECTION!r}"
    section = text.split(SECTION, 1)[1]
    return section.split("\n### ", 1)[0]


def test_one_elixir_experiment_from_request_to_recommendation(db_dsn: str, genesis_home: Path,
                                                               tmp_path: Path) -> None:
    repo = make_project(tmp_path / "srv" / "singularity")
    head = git(repo, "rev-parse", "HEAD")
    request_sql = REQUEST_SQL % {"repo": repo}
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute(request_sql)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENESIS_", "DATABASE_URL"))}
    env.update(GENESIS_HOME=str(genesis_home), GENESIS_DATABASE_URL=db_dsn, GENESIS_REPO_ALLOW=str(tmp_path / "srv"))
    consumer = subprocess.run([str(BIN / "genesis-consume"), "--drain", "--queues", QUEUE], env=env,
                              capture_output=True, text=True, timeout=600)
    assert consumer.returncode == 0, consumer.stderr
    with psycopg.connect(db_dsn, autocommit=True, row_factory=dict_row) as conn:
        [row] = conn.execute(RESULT_SQL).fetchall()
    message = row["message"]
    result = message["result"]

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "request.sql").write_text(request_sql + "\n")
    (ARTIFACTS / "consumer.log").write_text(consumer.stderr)
    (ARTIFACTS / "result.json").write_text(shown(result))
    (ARTIFACTS / "message.json").write_text(json.dumps(message, indent=2) + "\n")

    # the facts the README shows
    assert message["status"] == "completed"
    assert (result["status"], result["recommendation"], result["rolled_back"]) == ("regressed", "reject", True)
    assert result["counted_by"] == "exunit-formatter"
    # low risk: the changed module's test file, without the tests tagged slow (or integration, e2e)
    assert result["selection"] == {
        "command": ["mix", "test"], "by": "changed paths and tags",
        "args": ["test/singularity/budget_test.exs", "--exclude", "integration", "--exclude", "slow", "--exclude", "e2e"]}
    assert result["classes"] == {"pass->pass": 2, "pass->fail": 1, "fail->pass": 0, "fail->fail": 0}
    assert result["regressions"] == ["Singularity.BudgetTest::test four tasks per call"]
    assert result["flaky"] == ["Singularity.BudgetTest::test the prompt cache is warm"]
    assert result["reruns"] == 2 and result["flags"] == ["flaky_tests"]
    assert result["metrics"]["regression"] == pytest.approx(1 / 3, abs=1e-6)
    assert result["performance"]["metrics"] == {"llm_calls": {"baseline": 5.0, "change": 4.0, "relative_change": -0.2}}
    for side in ("baseline", "change"):
        assert result["performance"][side]["wall_ms"] > 0
    logged = consumer.stderr
    for line in ("experiment exp-elixir-1: 2 failing test(s) rerun 2 more time(s) at the change and at the baseline",
                 "experiment exp-elixir-1: regressed, reject (regression 0.333 is above the threshold 0.050)"):
        assert line in logged
    # the original is untouched; the copy is back at its baseline
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == ""
    copy = Path(result["sandbox_path"])
    assert "@batch 4" in (copy / "lib/singularity/budget.ex").read_text()

    # the README shows this run: the same request (but for the path) and the same result
    section = readme_section()
    sql = re.findall(r"```sql\n(.*?)```", section, re.DOTALL)[0]
    readme_repo = re.search(r'"repo": "([^"]+)"', sql)
    assert readme_repo is not None and sql.strip() == (REQUEST_SQL % {"repo": readme_repo.group(1)}).strip()
    assert RESULT_SQL in section
    readme_result = json.loads(re.findall(r"```json\n(.*?)```", section, re.DOTALL)[0])
    # every field the README shows (it may leave some out) is this run's
    live = stable(result)
    for key, value in stable(readme_result).items():
        assert live.get(key) == value, f"README.md shows {key} = {value!r}, this run {live.get(key)!r}"
