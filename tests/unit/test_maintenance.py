"""Sandbox maintenance on the file system: cleanup of old sandboxes, integrity checks, job locks."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from genesis_pgflow.maintenance import (
    CLEANUP_JOB,
    INTEGRITY_JOB,
    check_integrity,
    cleanup_sandboxes,
    find_sandboxes,
    scheduled_jobs,
)
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.experiments import ExperimentStart, MemoryExperimentRecords
from genesis_pgflow.workspace import RepoAllow, Workspace, tree_size

DAY = 86_400.0
NOW = 2_000_000_000.0


def make_repo(path: Path) -> Path:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(path.parent), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    path.mkdir(parents=True)
    (path / "a.py").write_text("A = 1\n" * 100)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "base"]):
        subprocess.run(["git", *args], cwd=path, env=env, check=True, capture_output=True)
    return path


def create_copy(workspace: Workspace, repo: Path) -> str:
    allow = RepoAllow.parse(str(repo.parent), home=workspace.sandboxes_dir.parent)
    return workspace.create(allow.resolve(str(repo)), allow=allow)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", sandbox_max_age_days=7, experiment_timeout_ms=3_600_000)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "source")


def sandbox_aged(settings: Settings, repo: Path, experiment_id: str, age_s: float) -> Workspace:
    workspace = Workspace(settings.sandboxes_dir, experiment_id)
    create_copy(workspace, repo)
    for path in (workspace.path, workspace.git_dir):
        os.utime(path, (NOW - age_s, NOW - age_s))
    return workspace


def test_cleanup_removes_only_sandboxes_older_than_the_max_age(settings: Settings, repo: Path) -> None:
    old = sandbox_aged(settings, repo, "old", 8 * DAY)
    older = sandbox_aged(settings, repo, "older", 30 * DAY)
    young = sandbox_aged(settings, repo, "young", 6 * DAY)
    sizes = {w.experiment_id: tree_size(w.path, w.git_dir) for w in (old, older)}
    records = MemoryExperimentRecords()

    report = cleanup_sandboxes(settings, records, now=NOW)

    assert report.ran and report.kept == ["young"]
    assert [r["experiment_id"] for r in report.removed] == ["older", "old"]
    assert report.bytes_freed == sum(sizes.values()) > 0
    for workspace in (old, older):
        assert not workspace.path.exists() and not workspace.git_dir.exists()
    assert young.path.exists() and young.git_dir.exists()
    events = records.sandbox_events(event="cleaned_up")
    assert {(e["experiment_id"], e["size_bytes"], round(e["age_s"] / DAY)) for e in events} == {
        ("old", sizes["old"], 8), ("older", sizes["older"], 30)}
    assert report.as_json()["bytes_freed"] == report.bytes_freed


def test_cleanup_never_removes_what_may_still_be_running(settings: Settings, repo: Path) -> None:
    sandbox_aged(settings, repo, "running", 600.0)
    sandbox_aged(settings, repo, "done", 2 * 3600.0)
    report = cleanup_sandboxes(settings, MemoryExperimentRecords(), now=NOW, max_age_days=0)
    assert report.kept == ["running"] and [r["experiment_id"] for r in report.removed] == ["done"]


def test_cleanup_leaves_stray_entries_and_follows_no_symlink(settings: Settings, repo: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    sandbox_aged(settings, repo, "old", 8 * DAY)
    (settings.sandboxes_dir / "link-to-victim").symlink_to(victim)
    (settings.sandboxes_dir / "a-file").write_text("x")
    (settings.sandboxes_dir / ".hidden").mkdir()
    for path in (settings.sandboxes_dir / ".hidden", settings.sandboxes_dir / "a-file"):
        os.utime(path, (NOW - 99 * DAY, NOW - 99 * DAY))

    report = cleanup_sandboxes(settings, MemoryExperimentRecords(), now=NOW)

    assert [r["experiment_id"] for r in report.removed] == ["old"]
    assert (victim / "precious").read_text() == "keep me"
    assert (settings.sandboxes_dir / "a-file").exists() and (settings.sandboxes_dir / ".hidden").exists()


def test_cleanup_removes_an_orphaned_git_directory(settings: Settings, repo: Path) -> None:
    workspace = sandbox_aged(settings, repo, "orphan", 9 * DAY)
    shutil.rmtree(workspace.path)
    report = cleanup_sandboxes(settings, MemoryExperimentRecords(), now=NOW)
    assert [r["experiment_id"] for r in report.removed] == ["orphan"] and not workspace.git_dir.exists()


def test_cleanup_removes_what_a_test_run_made_unwritable(settings: Settings, repo: Path) -> None:
    workspace = sandbox_aged(settings, repo, "locked", 9 * DAY)
    locked = workspace.path / "deep" / "er"
    locked.mkdir(parents=True)
    (locked / "f").write_text("x")
    locked.chmod(0o000)
    locked.parent.chmod(0o500)
    os.utime(workspace.path, (NOW - 9 * DAY, NOW - 9 * DAY))
    report = cleanup_sandboxes(settings, MemoryExperimentRecords(), now=NOW)
    assert not report.errors and not workspace.path.exists()


def test_a_job_whose_lock_is_held_returns_at_once(settings: Settings, repo: Path) -> None:
    sandbox_aged(settings, repo, "old", 8 * DAY)
    locks: dict = {}
    mine, theirs = MemoryExperimentRecords(locks=locks), MemoryExperimentRecords(locks=locks)
    with theirs.maintenance_lock(CLEANUP_JOB) as held:
        assert held
        started = time.monotonic()
        skipped = cleanup_sandboxes(settings, mine, now=NOW)
        assert not skipped.ran and skipped.removed == [] and time.monotonic() - started < 10  # never waits
        assert check_integrity(settings, mine).ran  # another job's lock is another lock
    assert cleanup_sandboxes(settings, mine, now=NOW).ran
    assert not (settings.sandboxes_dir / "old").exists()


def test_integrity_check_records_healthy_and_broken_sandboxes(settings: Settings, repo: Path) -> None:
    sandbox_aged(settings, repo, "healthy", DAY)
    broken = sandbox_aged(settings, repo, "broken", DAY)
    for obj in (broken.git_dir / "objects").rglob("*"):
        if obj.is_file():
            obj.chmod(0o644)
            obj.write_bytes(b"garbage")
    gone = sandbox_aged(settings, repo, "gitless", DAY)
    shutil.rmtree(gone.git_dir)
    records = MemoryExperimentRecords()

    report = check_integrity(settings, records, now=NOW)

    assert report.ran and report.ok == ["healthy"] and report.checked == 3
    assert {f["experiment_id"] for f in report.failed} == {"broken", "gitless"}
    assert {(e["experiment_id"], e["event"]) for e in records.sandbox_events()} == {
        ("healthy", "integrity_ok"), ("broken", "integrity_failed"), ("gitless", "integrity_failed")}


def test_scheduled_jobs(settings: Settings, repo: Path) -> None:
    jobs = scheduled_jobs(settings, MemoryExperimentRecords())
    assert [(name, interval) for name, interval, _job in jobs] == [
        (CLEANUP_JOB, settings.sandbox_cleanup_interval_s), (INTEGRITY_JOB, settings.sandbox_integrity_interval_s)]
    assert all(job().ran for _name, _interval, job in jobs)


def test_find_sandboxes_on_a_missing_directory(tmp_path: Path) -> None:
    assert find_sandboxes(tmp_path / "nope") == []


# --- sooner for successes, caps per producer, never what is running ------------------------------


def recorded(records: MemoryExperimentRecords, experiment_id: str, instance_id: str, status: str) -> None:
    records.experiment_started(ExperimentStart(experiment_id, instance_id, "refactor", "", "low", "/r", "HEAD",
                                               f"/s/{experiment_id}"))
    if status != "running":
        records.experiment_finished(experiment_id, {"status": status, "recommendation": "merge",
                                                    "rolled_back": False, "metrics": {}})


def test_copies_of_successful_experiments_go_sooner(settings: Settings, repo: Path) -> None:
    records = MemoryExperimentRecords()
    for experiment_id, status in [("won", "success"), ("lost", "regressed"), ("broke", "failed")]:
        sandbox_aged(settings, repo, experiment_id, 2 * DAY)
        recorded(records, experiment_id, "s1", status)
    sandbox_aged(settings, repo, "unknown", 2 * DAY)           # no record: the general rule

    report = cleanup_sandboxes(settings.model_copy(update={"sandbox_success_max_age_days": 1.0}), records, now=NOW)

    assert [r["experiment_id"] for r in report.removed] == ["won"]
    assert sorted(report.kept) == ["broke", "lost", "unknown"]


def test_cleanup_keeps_each_producer_under_its_caps(settings: Settings, repo: Path) -> None:
    records = MemoryExperimentRecords()
    for age, experiment_id in enumerate(["a1", "a2", "a3", "a4"]):
        sandbox_aged(settings, repo, experiment_id, (10 - age) * 3600.0 * 2)      # a1 the oldest
        recorded(records, experiment_id, "instance-a", "failed")
    sandbox_aged(settings, repo, "b1", 30 * 3600.0)
    recorded(records, "b1", "instance-b", "failed")
    capped = settings.model_copy(update={"experiment_copies_per_instance": 2})

    report = cleanup_sandboxes(capped, records, now=NOW)

    assert [r["experiment_id"] for r in report.removed] == ["a1", "a2"]
    assert sorted(report.kept) == ["a3", "a4", "b1"]
    assert all("instance-a" in e["detail"] for e in records.sandbox_events(event="cleaned_up"))

    one_mb = sandbox_aged(settings, repo, "a5", 3600.0 * 2)
    recorded(records, "a5", "instance-a", "failed")
    size_capped = capped.model_copy(update={"experiment_copies_per_instance": 10,
                                            "experiment_copies_mb_per_instance": 1})
    (one_mb.path / "filler.bin").write_bytes(b"\0" * 2**20)        # instance-a is now over 1 MB
    report = cleanup_sandboxes(size_capped, records, now=NOW)
    assert [r["experiment_id"] for r in report.removed] == ["a3", "a4", "a5"] and report.kept == ["b1"]


def test_a_copy_whose_experiment_is_running_somewhere_is_never_removed(settings: Settings, repo: Path) -> None:
    locks: dict = {}
    mine, running_consumer = MemoryExperimentRecords(locks=locks), MemoryExperimentRecords(locks=locks)
    busy = sandbox_aged(settings, repo, "busy", 30 * DAY)
    sandbox_aged(settings, repo, "idle", 30 * DAY)
    with running_consumer.experiment_lock("busy") as held:
        assert held
        report = cleanup_sandboxes(settings, mine, now=NOW)
    assert [r["experiment_id"] for r in report.removed] == ["idle"] and report.kept == ["busy"]
    assert busy.path.exists() and busy.git_dir.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root mounts a test run's scratch")
def test_cleanup_unmounts_the_scratch_a_killed_consumer_left(settings: Settings, repo: Path) -> None:
    workspace = sandbox_aged(settings, repo, "killed", DAY)
    left = workspace.scratch(max_bytes=2**20, max_inodes=100)     # kept referenced: never left, as if killed
    scratch = left.__enter__()
    assert os.path.ismount(scratch)
    cleanup_sandboxes(settings, MemoryExperimentRecords(), now=NOW)
    assert not os.path.ismount(scratch) and not workspace.scratch_dir.exists()
    assert workspace.path.exists()          # the copy itself is young: kept
