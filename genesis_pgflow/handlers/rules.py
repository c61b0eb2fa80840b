"""RuleEngine: applies versioned rule updates that are confident enough."""

from __future__ import annotations

from typing import Any

from genesis_pgflow.errors import LowConfidence, StaleVersion
from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.messages import RuleUpdate
from genesis_pgflow.store.state import RuleVersion, StateStore


class RuleEngine:
    payload_type = "genesis_rule_update"

    def __init__(self, state: StateStore, min_confidence: float = 0.85):
        self.state = state
        self.min_confidence = min_confidence

    def __call__(self, payload: RuleUpdate, ctx: WorkContext) -> dict[str, Any]:
        ids = payload.identifiers()
        if payload.confidence < self.min_confidence:
            raise LowConfidence(
                f"confidence {payload.confidence} is below the minimum {self.min_confidence}",
                details={**ids, "confidence": payload.confidence, "min_confidence": self.min_confidence})
        ctx.check()
        rule = RuleVersion(payload.namespace, payload.rule_id, payload.version, payload.confidence, payload.rule)
        status, active = self.state.apply_rule(rule, ctx.workflow_id)
        if status == "stale":
            raise StaleVersion(f"version {payload.version} is older than the active version {active}",
                               details={**ids, "active_version": active})
        return {"status": status, **ids, "confidence": payload.confidence}
