"""Resumable experiments in one process: a consumer that lost its lease (a later delivery of the
request claimed the experiment) is refused its next phase write and stops, touching neither the
records nor the copy. The kill -9 at each phase boundary is tests/acceptance/test_experiment_kill.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.handlers.experiments import ExperimentRunner
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.experiments import AttemptSuperseded, ExperimentStart, Fence, MemoryExperimentRecords

from .gitrepos import git, make_repo
from .test_experiments import BASE_FILES, GatedSandbox, request

QUEUE = "genesis_experiment_requests"


def test_a_stale_attempt_stops_at_its_next_phase_write(tmp_path: Path, genesis_home: Path) -> None:
    repo = make_repo(tmp_path / "repos" / "repo", BASE_FILES)
    records, gated = MemoryExperimentRecords(), GatedSandbox()
    runner = ExperimentRunner(Settings(home=genesis_home, repo_allow=str(tmp_path / "repos")), records,
                              gated)  # type: ignore[arg-type]
    outcome: list[Any] = []

    def consume() -> None:
        try:
            outcome.append(runner(request(repo, test_command=["true"]),
                                  WorkContext(QUEUE, 5, 1, "wf-1", time.monotonic() + 60)))
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            outcome.append(exc)

    stale = threading.Thread(target=consume)
    stale.start()
    try:
        assert gated.inside.acquire(timeout=30)      # attempt 1 is in its baseline run
        copy = genesis_home / "sandboxes" / "exp-1"
        head = git(copy, "rev-parse", "HEAD")
        # its lease ran out: the message's next delivery (read_ct 2) claims the experiment
        claim = records.experiment_started(ExperimentStart("exp-1", "singularity-1", "refactor", "a change", "low",
                                                           str(repo), "HEAD", str(copy)), Fence(QUEUE, 5, 2))
        assert claim and list(claim.phases) == ["copy"]
    finally:
        gated.gate.set()
        stale.join(timeout=60)

    [error] = outcome
    assert isinstance(error, AttemptSuperseded) and error.code == "attempt_superseded"
    shown = records.show_experiment("exp-1")
    assert shown is not None and list(shown["phases"]) == ["copy"] and shown["runs"] == []
    assert (shown["status"], shown["error"]) == ("running", None)     # attempt 2's to finish
    assert [e["event"] for e in shown["sandbox_events"]] == ["created"]   # no rollback, nothing preserved
    assert git(copy, "rev-parse", "HEAD") == head
    with pytest.raises(AttemptSuperseded):
        records.phase_finished("exp-1", "baseline", {}, fence=Fence(QUEUE, 5, 1))
