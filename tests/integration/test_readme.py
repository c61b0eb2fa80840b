"""The README's SQL examples run, as written, against a migrated database."""

import re
from pathlib import Path

import psycopg
import pytest

from genesis_pgflow.messages import ExperimentRequest, RuleUpdate, parse_payload

pytestmark = pytest.mark.db
README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_sql_example_of_the_readme_runs(db_dsn):
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), re.DOTALL)
    statements = [s.strip() for block in blocks for s in block.split(";\n") if s.strip()]
    assert len(statements) >= 15
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)
        experiment = conn.execute("SELECT message FROM pgmq.read('genesis_experiment_requests', 1, 1)").fetchone()
        rule = conn.execute("SELECT message FROM pgmq.read('genesis_rule_updates', 1, 1)").fetchone()
    assert isinstance(parse_payload(experiment[0]), ExperimentRequest)
    assert isinstance(parse_payload(rule[0]), RuleUpdate)
