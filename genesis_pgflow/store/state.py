"""The versioned state of RuleEngine and LlmConfigManager: rules and LLM configurations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from psycopg.types.json import Jsonb

from genesis_pgflow.store.database import Conn, Database, one
from genesis_pgflow.store.queries import sql

Applied = Literal["applied", "unchanged", "stale"]


@dataclass(frozen=True)
class RuleVersion:
    namespace: str
    rule_id: str
    version: int
    confidence: float
    rule: dict[str, Any]


@dataclass(frozen=True)
class LlmConfig:
    provider: str
    complexity: str
    models: list[str]
    task_types: list[str]
    settings: dict[str, Any]


class StateStore(Protocol):
    """PgStateStore and testing.MemoryStateStore both pass tests/conformance."""

    def apply_rule(self, rule: RuleVersion, workflow_id: str) -> tuple[Applied, int]:
        """Make rule the active version unless it is already (unchanged) or older (stale).
        Returns what happened and the active version afterwards."""

    def rules(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """The active version of every rule."""

    def apply_llm_config(self, config: LlmConfig, workflow_id: str) -> tuple[Applied, int]:
        """Record config as a new version unless it equals the active one (unchanged)."""

    def llm_configs(self, provider: str | None = None) -> list[dict[str, Any]]:
        """The active configuration of every provider and complexity, settings included."""


def decide_rule(active: int | None, incoming: int) -> Applied:
    if active is None or incoming > active:
        return "applied"
    return "unchanged" if incoming == active else "stale"


def same_config(active: dict[str, Any] | None, config: LlmConfig) -> bool:
    return active is not None and (active["models"], active["task_types"], active["settings"]) == (
        config.models, config.task_types, config.settings)


class PgStateStore:
    def __init__(self, db: Database):
        self.db = db

    def apply_rule(self, rule: RuleVersion, workflow_id: str) -> tuple[Applied, int]:
        def tx(conn: Conn) -> tuple[Applied, int]:
            conn.execute(sql("lock_key"), {"key": f"rule:{rule.namespace}:{rule.rule_id}"})
            active = one(conn.execute(sql("active_rule_version"), vars(rule)))["version"]
            decision = decide_rule(active, rule.version)
            if decision == "applied":
                conn.execute(sql("insert_rule_version"),
                             {**vars(rule), "rule": Jsonb(rule.rule), "workflow_id": workflow_id})
                return decision, rule.version
            return decision, active
        return self.db.run(tx)

    def rules(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.db.run(lambda conn: conn.execute(sql("list_active_rules"), {"namespace": namespace}).fetchall())

    def apply_llm_config(self, config: LlmConfig, workflow_id: str) -> tuple[Applied, int]:
        def tx(conn: Conn) -> tuple[Applied, int]:
            conn.execute(sql("lock_key"), {"key": f"llm:{config.provider}:{config.complexity}"})
            active = conn.execute(sql("active_llm_config"), vars(config)).fetchone()
            if active is not None and same_config(active, config):
                return "unchanged", active["version"]
            version = (active["version"] if active else 0) + 1
            conn.execute(sql("insert_llm_config"), {
                "provider": config.provider, "complexity": config.complexity, "version": version,
                "models": Jsonb(config.models), "task_types": Jsonb(config.task_types),
                "settings": Jsonb(config.settings), "workflow_id": workflow_id})
            return "applied", version
        return self.db.run(tx)

    def llm_configs(self, provider: str | None = None) -> list[dict[str, Any]]:
        return self.db.run(lambda conn: conn.execute(sql("list_llm_configs"), {"provider": provider}).fetchall())
