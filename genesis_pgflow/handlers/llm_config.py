"""LlmConfigManager: keeps the LLM provider configuration per complexity, secrets stored but never shown."""

from __future__ import annotations

from typing import Any

from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.messages import LlmConfigUpdate
from genesis_pgflow.store.state import LlmConfig, StateStore


class LlmConfigManager:
    payload_type = "genesis_llm_config_update"

    def __init__(self, state: StateStore):
        self.state = state

    def __call__(self, payload: LlmConfigUpdate, ctx: WorkContext) -> dict[str, Any]:
        ctx.check()
        config = LlmConfig(payload.provider, payload.complexity, list(payload.models),
                           list(payload.task_types), dict(payload.settings))
        status, version = self.state.apply_llm_config(config, ctx.workflow_id)
        return {"status": status, "provider": payload.provider, "complexity": payload.complexity,
                "models_count": len(payload.models), "version": version}
