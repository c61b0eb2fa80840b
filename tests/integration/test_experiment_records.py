"""The experiment records: one conformance suite for PgExperimentRecords and its in-memory twin,
and the maintenance jobs' advisory locks across two consumers on a real PostgreSQL."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from genesis_pgflow import maintenance
from genesis_pgflow.settings import Settings
from genesis_pgflow.store import experiments as experiments_store
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.experiments import (
    AttemptSuperseded,
    ExperimentRecords,
    ExperimentStart,
    Fence,
    MemoryExperimentRecords,
    PgExperimentRecords,
    RunRecord,
    SandboxEvent,
)
from genesis_pgflow.store.queries import load

# Two handles on the same records, as two consumers would have.
Pair = tuple[ExperimentRecords, ExperimentRecords]


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.db)])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    if request.param == "memory":
        locks: dict[str, Any] = {}
        first = MemoryExperimentRecords(locks=locks)
        second = MemoryExperimentRecords(locks=locks, experiments=first.experiments, runs=first.runs,
                                         events=first.events, phases=first.phases, holders=first.holders)
        yield first, second
        return
    dsn = request.getfixturevalue("db_dsn")
    with Database(dsn, max_size=2) as one, Database(dsn, max_size=2) as two:
        yield PgExperimentRecords(one), PgExperimentRecords(two)


@pytest.fixture
def records(pair: Pair) -> ExperimentRecords:
    return pair[0]


def start(experiment_id: str = "exp-1", **fields: str) -> ExperimentStart:
    values = {"experiment_id": experiment_id, "instance_id": "singularity-1", "experiment_type": "refactor",
              "description": "try it", "risk_level": "low", "repo": "/srv/repo", "base_ref": "HEAD",
              "sandbox_path": f"/home/g/sandboxes/{experiment_id}", **fields}
    return ExperimentStart(**values)


def run(phase: str, passed: int = 4, failed: int = 0) -> RunRecord:
    return RunRecord(phase=phase, commit="c" * 40, command=["pytest", "-q"], returncode=int(bool(failed)),
                     timed_out=False, passed=passed, failed=failed, errors=0, skipped=1, duration_ms=12.5,
                     output_tail="4 passed")


RESULT = {"experiment_id": "exp-1", "instance_id": "singularity-1", "status": "regressed",
          "metrics": {"success_rate": 0.5, "regression": 0.5, "baseline_success_rate": 1.0, "test_count": 4,
                      "failures": 2, "duration_ms": 99.0},
          "recommendation": "reject", "rolled_back": True, "baseline_commit": "b" * 40,
          "sandbox_path": "/home/g/sandboxes/exp-1"}


def test_an_experiment_from_start_to_result(records: ExperimentRecords) -> None:
    records.experiment_started(start())
    running = records.show_experiment("exp-1")
    assert running is not None and running["status"] == "running" and running["attempts"] == 1
    assert running["finished_at"] is None and running["started_at"] is not None

    records.commits_recorded("exp-1", baseline_commit="b" * 40)
    records.run_recorded("exp-1", run("baseline"))
    records.commits_recorded("exp-1", change_commit="c" * 40)
    records.run_recorded("exp-1", run("change", passed=2, failed=2))
    records.sandbox_event("exp-1", "/home/g/sandboxes/exp-1", "created", size_bytes=1234)
    records.sandbox_event("exp-1", "/home/g/sandboxes/exp-1", "rolled_back", size_bytes=1300, detail="regressed")
    records.experiment_finished("exp-1", RESULT)

    shown = records.show_experiment("exp-1")
    assert shown is not None
    assert {k: shown[k] for k in ("status", "recommendation", "rolled_back", "baseline_commit", "change_commit",
                                  "error", "risk_level", "instance_id")} == {
        "status": "regressed", "recommendation": "reject", "rolled_back": True, "baseline_commit": "b" * 40,
        "change_commit": "c" * 40, "error": None, "risk_level": "low", "instance_id": "singularity-1"}
    assert shown["metrics"] == RESULT["metrics"] and shown["finished_at"] is not None
    assert [(r["phase"], r["attempt"], r["passed"], r["failed"], r["skipped"], r["test_count"])
            for r in shown["runs"]] == [("baseline", 1, 4, 0, 1, 4), ("change", 1, 2, 2, 1, 4)]
    assert shown["runs"][1]["success_rate"] == 0.5 and shown["runs"][0]["command"] == ["pytest", "-q"]
    assert shown["runs"][0]["commit_sha"] == "c" * 40
    assert [(e["event"], e["size_bytes"], e["detail"]) for e in shown["sandbox_events"]] == [
        ("created", 1234, None), ("rolled_back", 1300, "regressed")]


def test_a_new_attempt_clears_the_last_outcome(records: ExperimentRecords) -> None:
    records.experiment_started(start())
    records.experiment_failed("exp-1", {"code": "timeout", "message": "too slow", "details": {}},
                              rolled_back=True, duration_ms=5.0)
    failed = records.show_experiment("exp-1")
    assert failed is not None and failed["status"] == "failed" and failed["error"]["code"] == "timeout"
    assert failed["recommendation"] == "reject" and failed["rolled_back"] is True

    records.experiment_started(start(description="again"))
    records.run_recorded("exp-1", run("baseline"))
    again = records.show_experiment("exp-1")
    assert again is not None
    assert (again["status"], again["attempts"], again["error"], again["rolled_back"], again["description"]) == (
        "running", 2, None, False, "again")
    assert [r["attempt"] for r in again["runs"]] == [2]


def test_listing_filters_and_orders(records: ExperimentRecords) -> None:
    for name in ("exp-a", "exp-b", "exp-c"):
        records.experiment_started(start(name))
    records.experiment_finished("exp-b", {**RESULT, "experiment_id": "exp-b", "status": "success",
                                          "recommendation": "merge", "rolled_back": False})
    everything = records.list_experiments()
    assert sorted(r["experiment_id"] for r in everything) == ["exp-a", "exp-b", "exp-c"]
    assert all(set(r) >= {"metrics", "status", "sandbox_path"} for r in everything)
    assert [r["experiment_id"] for r in records.list_experiments(status="success")] == ["exp-b"]
    assert len(records.list_experiments(limit=2)) == 2
    assert records.show_experiment("nope") is None


def test_sandbox_history_filters(records: ExperimentRecords) -> None:
    records.sandbox_event("exp-1", "/s/exp-1", "created", size_bytes=10)
    records.sandbox_event("exp-2", "/s/exp-2", "cleaned_up", size_bytes=20, age_s=700000.5, detail="old")
    records.sandbox_event("exp-1", "/s/exp-1", "integrity_ok")
    assert [e["event"] for e in records.sandbox_events()] == ["created", "cleaned_up", "integrity_ok"]
    assert [e["event"] for e in records.sandbox_events(experiment_id="exp-1")] == ["created", "integrity_ok"]
    cleaned = records.sandbox_events(event="cleaned_up")
    assert [(e["experiment_id"], e["size_bytes"], e["age_s"]) for e in cleaned] == [("exp-2", 20, 700000.5)]
    with pytest.raises(ValueError):
        records.sandbox_event("exp-1", "/s/exp-1", "exploded")


def test_a_maintenance_lock_has_one_holder(pair: Pair) -> None:
    first, second = pair
    with first.maintenance_lock("sandbox_cleanup") as held:
        assert held
        with second.maintenance_lock("sandbox_cleanup") as also:
            assert not also
        with second.maintenance_lock("sandbox_integrity") as other_job:
            assert other_job
    with second.maintenance_lock("sandbox_cleanup") as now_free:
        assert now_free


def test_two_consumers_run_one_scheduled_cleanup(pair: Pair, tmp_path: Path) -> None:
    """Consumer A's cleanup is mid-way (its removal blocked) when consumer B's scheduled job fires:
    B returns at once without touching anything; A finishes the job."""
    first, second = pair
    settings = Settings(home=tmp_path / "home")
    for name in ("old-1", "old-2"):
        folder = settings.sandboxes_dir / name
        folder.mkdir(parents=True)
        (folder / "f").write_text("x" * 100)
    inside, release = threading.Event(), threading.Event()
    removed: list[Path] = []

    def slow_remove(path: Path) -> None:
        inside.set()
        release.wait(timeout=30)
        removed.append(path)
        if path.exists():
            (path / "f").unlink()
            path.rmdir()

    far_future = 10**10
    reports: list[Any] = []
    consumer_a = threading.Thread(target=lambda: reports.append(
        maintenance.cleanup_sandboxes(settings, first, now=far_future, remove=slow_remove)))
    consumer_a.start()
    assert inside.wait(timeout=10)
    _name, _interval, job = maintenance.scheduled_jobs(settings, second)[0]
    skipped = job()
    release.set()
    consumer_a.join(timeout=30)

    assert not skipped.ran and skipped.removed == []
    assert len(reports) == 1 and reports[0].ran
    assert sorted(r["experiment_id"] for r in reports[0].removed) == ["old-1", "old-2"]
    assert [e["experiment_id"] for e in second.sandbox_events(event="cleaned_up")] == ["old-1", "old-2"]


# --- PostgreSQL only ---------------------------------------------------------------------------


@pytest.mark.db
def test_the_tables_answer_the_dba_queries_of_the_docs(db_dsn: str) -> None:
    with Database(db_dsn, max_size=1) as db:
        records = PgExperimentRecords(db)
        records.experiment_started(start())
        records.run_recorded("exp-1", run("baseline"))
        records.experiment_finished("exp-1", RESULT)
    with psycopg.connect(db_dsn) as conn:
        row = conn.execute("SELECT status, recommendation, rolled_back, regression FROM genesis.experiments "
                           "WHERE experiment_id = 'exp-1'").fetchone()
        assert row == ("regressed", "reject", True, 0.5)
        runs = conn.execute("SELECT phase, passed, failed FROM genesis.experiment_runs").fetchall()
        assert runs == [("baseline", 4, 0)]
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO genesis.sandbox_events (experiment_id, sandbox_path, event) "
                         "VALUES ('x', '/x', 'exploded')")


def test_every_query_the_records_use_exists() -> None:
    source = Path(experiments_store.__file__).read_text()
    used = set(re.findall(r'sql\("([a-z_]+)"\)', source))
    assert used and used <= set(load())
    for name in used:
        assert load()[name].purpose


def test_experiment_slots_are_shared_by_every_consumer(pair: Pair) -> None:
    first, second = pair
    with first.experiment_slot(2) as one, second.experiment_slot(2) as two:
        assert one and two
        with first.experiment_slot(2) as three:
            assert not three
    with second.experiment_slot(2) as again:
        assert again


@pytest.mark.db
@pytest.mark.sandbox
def test_an_experiment_recorded_in_postgres(db_dsn: str, genesis_home: Path, tmp_path: Path) -> None:
    import subprocess

    from genesis_pgflow.handlers.base import WorkContext
    from genesis_pgflow.handlers.experiments import ExperimentRunner
    from genesis_pgflow.messages import parse_payload
    from genesis_pgflow.sandbox import Sandbox

    sandbox = Sandbox()
    if not sandbox.available:
        pytest.skip("the sandbox (bubblewrap) is not available here")
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "tests" / "test_it.py").write_text("def test_it():\n    assert True\n")
    env = {"PATH": "/usr/bin:/bin", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)
    payload = parse_payload({
        "type": "genesis_experiment_request", "experiment_id": "pg-1", "instance_id": "singularity-1",
        "experiment_type": "docs", "description": "add a module", "risk_level": "high", "repo": str(repo),
        "changes": {"files": [{"path": "extra.py", "content": "X = 1\n"}]}})
    with Database(db_dsn, max_size=2) as db:
        records = PgExperimentRecords(db)
        runner = ExperimentRunner(Settings(home=genesis_home, repo_allow=str(tmp_path)), records, sandbox)
        result = runner(payload, WorkContext("genesis_experiment_requests", 1, 1, "wf", time.monotonic() + 60))
        shown = records.show_experiment("pg-1")
    assert (result["status"], result["recommendation"]) == ("success", "merge_with_review")  # high risk
    assert shown is not None and shown["metrics"] == result["metrics"]
    assert [r["phase"] for r in shown["runs"]] == ["baseline", "change"]
    assert [e["event"] for e in shown["sandbox_events"]] == ["created"]


# --- ownership, one holder per id, sensitive output -------------------------------------------


def test_an_experiment_id_belongs_to_its_instance(records: ExperimentRecords) -> None:
    assert records.experiment_started(start())
    records.experiment_finished("exp-1", RESULT)
    before = records.show_experiment("exp-1", output=True)

    assert not records.experiment_started(start(instance_id="intruder", description="mine now"))

    assert records.show_experiment("exp-1", output=True) == before
    assert records.experiment_started(start(description="again"))     # the owner's new attempt
    again = records.show_experiment("exp-1")
    assert again is not None and (again["attempts"], again["instance_id"]) == (2, "singularity-1")
    assert records.experiment_owners(["exp-1", "nope"]) == {"exp-1": {
        "instance_id": "singularity-1", "status": "running", "started_at": again["started_at"], "finished_at": None}}


def test_an_experiment_id_has_one_holder(pair: Pair) -> None:
    first, second = pair
    with first.experiment_lock("exp-1") as held:
        assert held
        with second.experiment_lock("exp-1") as also:
            assert not also
        with second.experiment_lock("exp-2") as other:
            assert other
    with second.experiment_lock("exp-1") as now_free:
        assert now_free


def test_run_output_is_bounded_and_left_out_unless_asked(records: ExperimentRecords) -> None:
    records.experiment_started(start())
    long = "x" * 10_000 + "END"
    records.run_recorded("exp-1", RunRecord(phase="baseline", commit=None, command=["pytest"], returncode=0,
                                            timed_out=False, passed=1, failed=0, errors=0, skipped=0,
                                            duration_ms=1.0, output_tail=long))
    shown = records.show_experiment("exp-1")
    assert shown is not None and "output_tail" not in shown["runs"][0]
    asked = records.show_experiment("exp-1", output=True)
    assert asked is not None and asked["runs"][0]["output_tail"] == long[-experiments_store.OUTPUT_TAIL_CHARS:]


@pytest.mark.db
def test_the_output_tail_is_bounded_by_the_schema_too(db_dsn: str) -> None:
    with Database(db_dsn, max_size=1) as db:
        PgExperimentRecords(db).experiment_started(start())
    with psycopg.connect(db_dsn) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO genesis.experiment_runs (experiment_id, attempt, phase, output_tail) "
                     "VALUES ('exp-1', 1, 'baseline', repeat('x', 2001))")


@pytest.mark.db
def test_two_consumers_given_one_experiment_id(db_dsn: str, genesis_home: Path, tmp_path: Path) -> None:
    """Consumer A runs exp-1 (held in its baseline run); consumer B, given the same id meanwhile,
    fails at once with a retryable error and touches nothing; A finishes."""
    from unit.gitrepos import make_repo
    from unit.test_experiments import BASE_FILES, GatedSandbox, context, request

    from genesis_pgflow.handlers.experiments import ExperimentBusy, ExperimentRunner

    repo = make_repo(tmp_path / "repos" / "repo", BASE_FILES)
    settings = Settings(home=genesis_home, repo_allow=str(tmp_path / "repos"))
    gated = GatedSandbox()
    outcome: list[Any] = []
    with Database(db_dsn, max_size=2) as one, Database(db_dsn, max_size=2) as two:
        consumer_a = ExperimentRunner(settings, PgExperimentRecords(one), gated)  # type: ignore[arg-type]
        consumer_b = ExperimentRunner(settings, PgExperimentRecords(two), GatedSandbox())  # type: ignore[arg-type]
        running = threading.Thread(target=lambda: outcome.append(
            consumer_a(request(repo, test_command=["true"]), context())))
        running.start()
        try:
            assert gated.inside.acquire(timeout=30)
            copy = genesis_home / "sandboxes" / "exp-1"
            before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
            with pytest.raises(ExperimentBusy) as caught:
                consumer_b(request(repo, test_command=["true"]), context())
            assert caught.value.code == "experiment_busy"
            assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
        finally:
            gated.gate.set()
            running.join(timeout=60)
        shown = PgExperimentRecords(one).show_experiment("exp-1")
    assert [r["status"] for r in outcome] == ["success"]
    assert shown is not None and (shown["status"], shown["attempts"]) == ("success", 1)


# --- resumable phases, fenced by the delivery's attempt ------------------------------------------


QUEUE = "genesis_experiment_requests"


def test_a_later_delivery_resumes_and_a_stale_attempt_cannot_write(pair: Pair) -> None:
    """Consumer A (attempt 1 of message 7) finishes copy and baseline, then loses its lease; B gets
    attempt 2 and resumes after the baseline. A's next phase, its result and its failure are
    refused and leave nothing; so is A claiming the experiment again."""
    a, b = pair
    first, second = Fence(QUEUE, 7, 1), Fence(QUEUE, 7, 2)
    claim = a.experiment_started(start(), first)
    assert claim and claim.phases == {}
    a.phase_finished("exp-1", "copy", {"baseline_commit": "b" * 40, "runs": 0}, fence=first,
                     baseline_commit="b" * 40, events=[SandboxEvent("/s/exp-1", "created", size_bytes=10)])
    a.phase_finished("exp-1", "baseline", {"run": {"outcomes": {"t::a": "passed"}}, "runs": 1}, fence=first,
                     runs=[RunRecord(**{**run("baseline").__dict__, "step": "baseline"})])

    resumed = b.experiment_started(start(), second)
    assert resumed and list(resumed.phases) == ["copy", "baseline"]
    assert resumed.phases["baseline"] == {"run": {"outcomes": {"t::a": "passed"}}, "runs": 1}
    assert resumed.attempts == 2

    before = b.show_experiment("exp-1", output=True)
    with pytest.raises(AttemptSuperseded) as refused:
        a.phase_finished("exp-1", "change", {"change_commit": "c" * 40}, fence=first, change_commit="c" * 40,
                         runs=[run("change")])
    assert refused.value.code == "attempt_superseded" and refused.value.details["held_by_attempt"] == 2
    with pytest.raises(AttemptSuperseded):
        a.experiment_finished("exp-1", RESULT, fence=first)
    with pytest.raises(AttemptSuperseded):
        a.experiment_failed("exp-1", {"code": "timeout", "message": "late", "details": {}}, rolled_back=True,
                            duration_ms=1.0, fence=first, runs=[run("change")])
    with pytest.raises(AttemptSuperseded):
        a.experiment_started(start(), first)
    assert b.show_experiment("exp-1", output=True) == before

    b.phase_finished("exp-1", "change", {"change_commit": "c" * 40}, fence=second, change_commit="c" * 40,
                     runs=[run("change")])
    b.phase_finished("exp-1", "measure", {"reruns": 0}, fence=second)
    b.experiment_finished("exp-1", {**RESULT, "classes": {"pass->fail": 2}}, fence=second,
                          events=[SandboxEvent("/s/exp-1", "rolled_back", detail="regressed")])
    shown = b.show_experiment("exp-1")
    assert shown is not None
    assert {name: p["attempt"] for name, p in shown["phases"].items()} == {
        "copy": 1, "baseline": 1, "change": 2, "measure": 2, "decide": 2}
    assert shown["result"]["classes"] == {"pass->fail": 2} and shown["status"] == "regressed"
    assert shown["change_commit"] == "c" * 40 and shown["baseline_commit"] == "b" * 40
    assert [(r["phase"], r["step"], r["attempt"]) for r in shown["runs"]] == [
        ("baseline", "baseline", 1), ("change", None, 2)]
    assert [e["event"] for e in shown["sandbox_events"]] == ["created", "rolled_back"]

    # delivered once more (its consumer died before the result went out): decided, nothing cleared
    again = a.experiment_started(start(), Fence(QUEUE, 7, 3))
    assert again and again.phases["decide"]["classes"] == {"pass->fail": 2}
    kept = a.show_experiment("exp-1")
    assert kept is not None and (kept["status"], kept["recommendation"]) == ("regressed", "reject")

    # a new request for the id (another message) starts from its copy again
    fresh = b.experiment_started(start(description="again"), Fence(QUEUE, 8, 1))
    assert fresh and fresh.phases == {}
    restarted = b.show_experiment("exp-1")
    assert restarted is not None and restarted["phases"] == {} and restarted["result"] is None
    with pytest.raises(AttemptSuperseded):   # message 7's consumer, at any attempt, is out
        a.phase_finished("exp-1", "copy", {}, fence=Fence(QUEUE, 7, 3))


def test_phases_are_checked(records: ExperimentRecords) -> None:
    records.experiment_started(start(), Fence(QUEUE, 1, 1))
    with pytest.raises(ValueError):
        records.phase_finished("exp-1", "celebrate", {}, fence=Fence(QUEUE, 1, 1))
