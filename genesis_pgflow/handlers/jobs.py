"""JobExecutor: analyses code (quality, linting, security) and runs its tests in the sandbox."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from genesis_pgflow.analysers import Toolchain, normalise, registry, supported
from genesis_pgflow.errors import GenesisError, UnsupportedLanguage
from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.messages import CodeExecutionRequest
from genesis_pgflow.sandbox import Limits, Sandbox

log = logging.getLogger(__name__)

HOW_TO_ADD = ("run scripts/system-deps.sh (installs bubblewrap, elixir, nodejs, python3-pytest, and Biome and "
              "TypeScript into .tools/); every other language lizard parses gets quality only")


class JobExecutor:
    """The handler for code_execution_request.

    sandbox: where `testing` runs code (probed once here; when it cannot be set up, testing
    fails with sandbox_unavailable and the static analyses still work).
    tools_dir: where scripts/system-deps.sh put the npm tools (default <repo>/.tools).
    test_limits: the sandbox limits for one test run.
    """

    payload_type = "code_execution_request"

    def __init__(self, sandbox: Sandbox | None = None, *, tools_dir: Path | None = None,
                 test_limits: Limits | None = None, python: str | None = None,
                 sandbox_python: str = "/usr/bin/python3"):
        self.sandbox = sandbox or Sandbox()
        toolchain = Toolchain(self.sandbox, sandbox_python=sandbox_python,
                              test_limits=test_limits or self.sandbox.limits)
        if python:
            toolchain = replace(toolchain, python=python)
        if tools_dir:
            toolchain = replace(toolchain, node_modules=Path(tools_dir) / "node_modules")
        self.toolchain = toolchain
        self.analysers = registry(toolchain)
        if not self.sandbox.available:
            try:
                self.sandbox.check()
            except GenesisError as exc:
                log.warning("testing requests will fail with sandbox_unavailable: %s", exc.message)

    def supported(self) -> dict[str, list[str]]:
        """language -> the analysis types available for it on this machine."""
        return supported(self.analysers)

    def __call__(self, payload: CodeExecutionRequest, ctx: WorkContext) -> dict[str, Any]:
        started = time.monotonic()
        language = normalise(payload.language)
        ids = {"id": payload.id, "language": payload.language, "analysis_type": payload.analysis_type}
        analyser = self.analysers.get((language, payload.analysis_type))
        if analyser is None:
            raise self._unsupported(language, payload.analysis_type, ids)
        ctx.check()
        try:
            analysis = analyser(payload.code, self.toolchain.bounded(time.monotonic() + ctx.remaining(), ctx.cancelled))
        except GenesisError as exc:
            exc.details = {**ids, **exc.details}
            raise
        result: dict[str, Any] = {
            "id": payload.id,
            "language": payload.language,
            "analysis_type": payload.analysis_type,
            "issues": [issue.as_json() for issue in analysis.issues],
            "metrics": {
                "execution_ms": round((time.monotonic() - started) * 1000.0, 3),
                "quality_score": analysis.quality_score,
                "issues_count": len(analysis.issues),
            },
        }
        if analysis.tests is not None:
            result["tests"] = analysis.tests.as_json()
            result["output"] = analysis.output or ""
        return result

    def _unsupported(self, language: str, analysis_type: str, ids: dict[str, Any]) -> UnsupportedLanguage:
        languages = self.supported()
        rich = ", ".join(f"{name} ({', '.join(types)})" for name, types in languages.items() if len(types) > 1)
        quality_only = ", ".join(name for name, types in languages.items() if types == ["quality"])
        if language in languages:
            only = ", ".join(languages[language])
            what = f"{analysis_type} is not available for {language} on this machine (only {only})"
        else:
            what = f"language {language!r} is not supported on this machine"
        return UnsupportedLanguage(
            f"{what}. Supported here: {rich}; quality only: {quality_only}. To add a toolchain: {HOW_TO_ADD}",
            details={**ids, "supported": languages})
