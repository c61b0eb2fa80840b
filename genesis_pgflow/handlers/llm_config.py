"""LlmConfigManager: keeps the LLM provider configuration per complexity, secrets stored but never shown.

The write is deferred (messages.Deferred): the store makes it in the message's completion
transaction, with the result, the archive and the run record."""

from __future__ import annotations

from typing import Any

from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.messages import Deferred, LlmConfigUpdate
from genesis_pgflow.store.state import LlmConfig, StateStore, llm_config_key


class LlmConfigManager:
    payload_type = "genesis_llm_config_update"
    inline = True       # it only works out the write (see handlers.base.Handler)

    def __init__(self, state: StateStore):
        self.state = state

    def __call__(self, payload: LlmConfigUpdate, ctx: WorkContext) -> Deferred:
        ctx.check()
        config = LlmConfig(payload.provider, payload.complexity, list(payload.models),
                           list(payload.task_types), dict(payload.settings))

        def finish(decision: tuple[str, int]) -> dict[str, Any]:
            status, version = decision
            return {"status": status, "provider": payload.provider, "complexity": payload.complexity,
                    "models_count": len(payload.models), "version": version}
        return Deferred(llm_config_key(config), config, ctx.workflow_id, self.state, finish)
