"""The versioned state of RuleEngine and LlmConfigManager: rules and LLM configurations.

The secrets of an LLM configuration's `settings` are stored sealed (cipher.SecretCipher) and opened
only here, on the way out: a DBA reading genesis.llm_config_versions sees
`genesis-sealed:v1:...` strings where the api_key and tokens were. A sealed value arriving in a
request (a dead letter requeued from a dump of this table, say) is opened before it is compared.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from psycopg import sql as pgsql
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from genesis_pgflow.cipher import SEALED_DEAD_LETTERS, SecretCipher
from genesis_pgflow.messages import dead_letter_queue
from genesis_pgflow.store.database import Conn, Database, one
from genesis_pgflow.store.queries import sql

Applied = Literal["applied", "unchanged", "stale"]


# a plain dataclass, as messages.ReadMessage (made for every rule update)
@dataclass
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

    def bound(self, tx: Any) -> StateStore:
        """This store with its writes made in the open transaction tx (a connection, as a queue
        store passes to messages.settle); with None, in a transaction of its own per call."""

    def apply_writes(self, writes: Sequence[tuple[RuleVersion | LlmConfig, str]]) -> list[tuple[Applied, int]]:
        """Several rule versions and LLM configurations (each with its workflow id) applied in the
        order given, as apply_rule and apply_llm_config would one by one."""

    def apply_rule(self, rule: RuleVersion, workflow_id: str) -> tuple[Applied, int]:
        """Make rule the active version unless it is already (unchanged) or older (stale).
        Returns what happened and the active version afterwards."""

    def rules(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """The active version of every rule."""

    def apply_llm_config(self, config: LlmConfig, workflow_id: str) -> tuple[Applied, int]:
        """Record config as a new version unless it equals the active one (unchanged)."""

    def llm_configs(self, provider: str | None = None) -> list[dict[str, Any]]:
        """The active configuration of every provider and complexity, settings included."""


def rule_key(rule: RuleVersion) -> str:
    """What serialises changes to one rule (an advisory lock), and orders a batch's writes."""
    return f"rule:{rule.namespace}:{rule.rule_id}"


def llm_config_key(config: LlmConfig) -> str:
    return f"llm:{config.provider}:{config.complexity}"


def decide_rule(active: int | None, incoming: int) -> Applied:
    if active is None or incoming > active:
        return "applied"
    return "unchanged" if incoming == active else "stale"


def same_config(active: dict[str, Any] | None, config: LlmConfig) -> bool:
    return active is not None and (active["models"], active["task_types"], active["settings"]) == (
        config.models, config.task_types, config.settings)


class PgStateStore:
    """StateStore on PostgreSQL. Without a cipher (tests of other concerns) settings are stored as
    given; App always passes the configured one."""

    def __init__(self, db: Database, cipher: SecretCipher | None = None):
        self.db = db
        self.cipher = cipher

    def _sealed(self, settings: dict[str, Any]) -> dict[str, Any]:
        return self.cipher.seal_secrets(settings) if self.cipher else settings

    def _opened(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "settings": self.cipher.open_secrets(row["settings"])} if self.cipher else row

    def bound(self, tx: Any) -> StateStore:
        return self if tx is None else _BoundState(self, tx)

    def apply_writes(self, writes: Sequence[tuple[RuleVersion | LlmConfig, str]]) -> list[tuple[Applied, int]]:
        return self.db.run(lambda conn: self._apply_writes(conn, writes))

    def _apply_writes(self, conn: Conn, writes: Sequence[tuple[RuleVersion | LlmConfig, str]]
                      ) -> list[tuple[Applied, int]]:
        """Consecutive rule versions in one statement (genesis.apply_rule_versions, migration 0010)."""
        decisions: list[tuple[Applied, int]] = []
        for is_rule, run in itertools.groupby(writes, key=lambda w: isinstance(w[0], RuleVersion)):
            items = list(run)
            if is_rule:
                updates = [{**vars(rule), "workflow_id": workflow_id} for rule, workflow_id in items]
                # (decision, active_version) tuples, in the order given
                cur = conn.cursor(row_factory=tuple_row).execute(sql("apply_rule_versions"),
                                                                 {"updates": Jsonb(updates)})
                decisions += cur.fetchall()
            else:
                decisions += [self._apply_llm_config(conn, config, workflow_id)  # type: ignore[arg-type]
                              for config, workflow_id in items]
        return decisions

    def apply_rule(self, rule: RuleVersion, workflow_id: str) -> tuple[Applied, int]:
        return self.db.run(lambda conn: self._apply_rule(conn, rule, workflow_id))

    def _apply_rule(self, conn: Conn, rule: RuleVersion, workflow_id: str) -> tuple[Applied, int]:
        conn.execute(sql("lock_key"), {"key": rule_key(rule)})
        active = one(conn.execute(sql("active_rule_version"), vars(rule)))["version"]
        decision = decide_rule(active, rule.version)
        if decision == "applied":
            conn.execute(sql("insert_rule_version"),
                         {**vars(rule), "rule": Jsonb(rule.rule), "workflow_id": workflow_id})
            return decision, rule.version
        return decision, active

    def rules(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.db.run(lambda conn: conn.execute(sql("list_active_rules"), {"namespace": namespace}).fetchall())

    def apply_llm_config(self, config: LlmConfig, workflow_id: str) -> tuple[Applied, int]:
        return self.db.run(lambda conn: self._apply_llm_config(conn, config, workflow_id))

    def _apply_llm_config(self, conn: Conn, config: LlmConfig, workflow_id: str) -> tuple[Applied, int]:
        if self.cipher:
            config = replace(config, settings=self.cipher.open_secrets(config.settings))
        conn.execute(sql("lock_key"), {"key": llm_config_key(config)})
        active = conn.execute(sql("active_llm_config"), vars(config)).fetchone()
        if active is not None and same_config(self._opened(active), config):
            return "unchanged", active["version"]
        version = (active["version"] if active else 0) + 1
        conn.execute(sql("insert_llm_config"), {
            "provider": config.provider, "complexity": config.complexity, "version": version,
            "models": Jsonb(config.models), "task_types": Jsonb(config.task_types),
            "settings": Jsonb(self._sealed(config.settings)), "workflow_id": workflow_id})
        return "applied", version

    def llm_configs(self, provider: str | None = None) -> list[dict[str, Any]]:
        """Settings opened: the caller redacts them for display."""
        rows = self.db.run(lambda conn: conn.execute(sql("list_llm_configs"), {"provider": provider}).fetchall())
        return [self._opened(row) for row in rows]

    def reseal_secrets(self) -> dict[str, int]:
        """`genesis secrets rotate`: the secrets of every stored configuration (plain ones stored
        before sealing too) and of every LLM configuration dead letter sealed with the first key,
        in one transaction; returns how many of each changed."""
        if self.cipher is None:
            raise ValueError("reseal_secrets needs a cipher")
        cipher = self.cipher
        dlqs = [pgsql.Identifier(f"q_{dead_letter_queue(q)}") for q in sorted(SEALED_DEAD_LETTERS)]

        def tx(conn: Conn) -> dict[str, int]:
            changed = {"configurations": 0, "dead_letters": 0}
            for row in conn.execute(sql("llm_settings_for_update")).fetchall():
                settings = cipher.reseal_secrets(row["settings"])
                if settings != row["settings"]:
                    conn.execute(sql("update_llm_settings"), {**row, "settings": Jsonb(settings)})
                    changed["configurations"] += 1
            for dlq in dlqs:
                update = pgsql.SQL(sql("update_sealed_dead_letter")).format(table=dlq)
                for row in conn.execute(pgsql.SQL(sql("sealed_dead_letters_for_update")).format(table=dlq)).fetchall():
                    message = cipher.reseal_secrets(row["message"])
                    if message != row["message"]:
                        conn.execute(update, {"msg_id": row["msg_id"], "message": Jsonb(message)})
                        changed["dead_letters"] += 1
            return changed
        return self.db.run(tx)


class _BoundState:
    """A PgStateStore's writes inside a transaction someone else opened and will commit."""

    def __init__(self, store: PgStateStore, conn: Conn):
        self.store, self.conn = store, conn

    def bound(self, tx: Any) -> StateStore:
        return self.store.bound(tx)

    def apply_writes(self, writes: Sequence[tuple[RuleVersion | LlmConfig, str]]) -> list[tuple[Applied, int]]:
        return self.store._apply_writes(self.conn, writes)

    def apply_rule(self, rule: RuleVersion, workflow_id: str) -> tuple[Applied, int]:
        return self.store._apply_rule(self.conn, rule, workflow_id)

    def apply_llm_config(self, config: LlmConfig, workflow_id: str) -> tuple[Applied, int]:
        return self.store._apply_llm_config(self.conn, config, workflow_id)

    def rules(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.store.rules(namespace)

    def llm_configs(self, provider: str | None = None) -> list[dict[str, Any]]:
        return self.store.llm_configs(provider)
