"""RuleEngine: applies versioned rule updates that are confident enough.

The write is deferred (messages.Deferred): the store makes it in the message's completion
transaction, so the new version, the result, the archive and the run record commit together."""

from __future__ import annotations

from typing import Any

from genesis_pgflow.errors import LowConfidence, StaleVersion
from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.messages import Deferred, RuleUpdate
from genesis_pgflow.store.state import RuleVersion, StateStore, rule_key


class RuleEngine:
    payload_type = "genesis_rule_update"
    inline = True       # it only works out the write (see handlers.base.Handler)

    def __init__(self, state: StateStore, min_confidence: float = 0.85):
        self.state = state
        self.min_confidence = min_confidence

    def __call__(self, payload: RuleUpdate, ctx: WorkContext) -> Deferred:
        ids = payload.identifiers()
        if payload.confidence < self.min_confidence:
            raise LowConfidence(
                f"confidence {payload.confidence} is below the minimum {self.min_confidence}",
                details={**ids, "confidence": payload.confidence, "min_confidence": self.min_confidence})
        ctx.check()
        rule = RuleVersion(payload.namespace, payload.rule_id, payload.version, payload.confidence, payload.rule)

        def finish(decision: tuple[str, int]) -> dict[str, Any]:
            status, active = decision
            if status == "stale":
                raise StaleVersion(f"version {payload.version} is older than the active version {active}",
                                   details={**ids, "active_version": active})
            return {"status": status, **ids, "confidence": payload.confidence}
        return Deferred(rule_key(rule), rule, ctx.workflow_id, self.state, finish)
