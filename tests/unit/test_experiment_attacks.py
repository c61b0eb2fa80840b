"""Hostile experiment requests against ExperimentRunner, checked on the host: repositories that are
not theirs, another producer's experiment_id, two consumers on one id, output kept in records,
and the disk a copy and its test runs may take."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from genesis_pgflow.errors import GenesisError
from genesis_pgflow.handlers.experiments import ExperimentBusy, ExperimentIdTaken, ExperimentRunner
from genesis_pgflow.sandbox import Sandbox
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.experiments import OUTPUT_TAIL_CHARS, MemoryExperimentRecords
from genesis_pgflow.workspace import UNAVAILABLE, repo_state, tree_size

from .gitrepos import git, make_repo
from .test_experiments import BASE_FILES, GatedSandbox, context, request

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another user's view, mounts)")


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    (tmp_path / "allowed").mkdir()
    return tmp_path / "allowed"


@pytest.fixture
def repo(allowed: Path) -> Iterator[Path]:
    repo = make_repo(allowed / "repo", BASE_FILES)
    before = repo_state(repo)
    yield repo
    assert repo_state(repo) == before


# GatedSandbox runs nothing: a command other than pytest is counted from the JUnit file it writes
GATED: dict[str, Any] = {"test_command": ["true"]}


def settings(home: Path, allowed: Path | str, **values: Any) -> Settings:
    return Settings(home=home, repo_allow=str(allowed), **values)


def failure(runner: ExperimentRunner, *args: Any, **fields: Any) -> GenesisError:
    with pytest.raises(GenesisError) as caught:
        runner(request(*args, **fields), context())
    return caught.value


def contents(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def disk_bytes(root: Path) -> int:
    """Bytes of the regular files under root on root's own file system (mounts below not entered).
    Taken while a run writes and removes its scratch: what vanishes between the listing and the
    look is no longer on disk, so it counts nothing."""
    device, total = root.stat().st_dev, 0
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if (info := _lstat(os.path.join(directory, d))) is not None
                       and info.st_dev == device]
        for name in filenames:
            info = _lstat(os.path.join(directory, name))
            total += info.st_size if info is not None and stat.S_ISREG(info.st_mode) else 0
    return total


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def mounted_bytes(path: Path) -> int:
    if not os.path.ismount(path):
        return 0
    fs = os.statvfs(path)
    return (fs.f_blocks - fs.f_bfree) * fs.f_frsize


def holds(root: Path, secret: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and secret in p.read_bytes()]


# --- repositories that are not theirs ---------------------------------------------------------


@pytest.mark.sandbox
@as_root
def test_a_root_only_repository_outside_the_allow_list_fails_like_a_missing_one(
        sandbox: Sandbox, genesis_home: Path, allowed: Path, tmp_path: Path) -> None:
    records = MemoryExperimentRecords()
    runner = ExperimentRunner(settings(genesis_home, allowed), records, sandbox)
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o700)
    secret = make_repo(vault / "secrets", {"key.txt": "TOP-SECRET-4711\n",
                                           "tests/test_leak.py": "def test_leak():\n    print(open('key.txt').read())\n"})
    secret.chmod(0o700)

    hidden = failure(runner, secret, "exp-1", test_command=["cat", "key.txt"])
    missing = failure(runner, tmp_path / "no-such-dir", "exp-1", test_command=["cat", "key.txt"])
    not_git = failure(runner, vault, "exp-1")
    missing_inside = failure(runner, allowed / "no-such-repo", "exp-1")

    for error in (hidden, missing, not_git, missing_inside):
        assert (error.code, error.message) == ("repository_unavailable", UNAVAILABLE)
        assert error.details == hidden.details == {"experiment_id": "exp-1", "instance_id": "singularity-1",
                                                   "rolled_back": False}
    assert holds(genesis_home, b"TOP-SECRET") == [] and not (genesis_home / "sandboxes" / "exp-1").exists()
    assert records.show_experiment("exp-1") is None and records.runs == []


@pytest.mark.sandbox
def test_another_experiments_copy_or_git_directory_is_refused_even_if_home_is_listed(
        sandbox: Sandbox, genesis_home: Path, allowed: Path, repo: Path) -> None:
    records = MemoryExperimentRecords()
    # an operator who lists GENESIS_HOME itself (or a root above it) still never exposes the copies
    runner = ExperimentRunner(settings(genesis_home, f"{allowed},{genesis_home}"), records, sandbox)
    done = runner(request(repo, "victim", changes={"files": [{"path": "secret.py", "content": "KEY = 'S3CR3T'\n"}]}),
                  context())
    copy = Path(done["sandbox_path"])
    (allowed / "link-to-copy").symlink_to(copy)
    targets = [copy, genesis_home / "sandboxes" / ".gitdirs" / "victim.git", genesis_home, allowed / "link-to-copy",
               f"file://{copy}"]
    for target in targets:
        error = failure(runner, target, "thief", test_command=["cat", "secret.py"])
        assert (error.code, error.message) == ("repository_unavailable", UNAVAILABLE), target
    assert not (genesis_home / "sandboxes" / "thief").exists()
    assert records.show_experiment("thief") is None


@pytest.mark.sandbox
@as_root
def test_a_copy_is_private_and_the_sandbox_still_works_under_a_0700_home(
        sandbox: Sandbox, genesis_home: Path, allowed: Path, repo: Path) -> None:
    assert stat.S_IMODE(genesis_home.stat().st_mode) == 0o700
    runner = ExperimentRunner(settings(genesis_home, allowed), MemoryExperimentRecords(), sandbox)
    result = runner(request(repo, risk_level="high"), context())
    assert result["status"] == "success" and result["metrics"]["test_count"] == 5

    sandboxes = genesis_home / "sandboxes"
    for private in (sandboxes, sandboxes / ".gitdirs", sandboxes / ".gitdirs" / "exp-1.git"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o700, private
    assert all(p.stat().st_uid == 0 for p in Path(result["sandbox_path"]).rglob("*"))  # taken back from the run
    seen = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat",
                           f"{result['sandbox_path']}/calc.py"], capture_output=True, text=True, check=False)
    assert seen.returncode != 0 and "Permission denied" in seen.stderr


@pytest.mark.sandbox
def test_run_output_is_bounded_and_shown_only_when_asked(sandbox: Sandbox, genesis_home: Path,
                                                          allowed: Path) -> None:
    records = MemoryExperimentRecords()
    runner = ExperimentRunner(settings(genesis_home, allowed), records, sandbox)
    noisy = make_repo(allowed / "noisy", {**BASE_FILES, "noisy.py": "import sys\nsys.stdout.write('x' * 50000 + 'TAIL-MARK')\n"})
    runner(request(noisy, test_command=["python", "noisy.py"]), context())
    shown = records.show_experiment("exp-1")
    assert shown is not None and shown["runs"] and all("output_tail" not in r for r in shown["runs"])
    with_output = records.show_experiment("exp-1", output=True)
    assert with_output is not None
    tails = [r["output_tail"] for r in with_output["runs"]]
    assert all(len(t) <= OUTPUT_TAIL_CHARS for t in tails) and tails[-1].endswith("TAIL-MARK")


# --- experiment ids ---------------------------------------------------------------------------


@pytest.mark.sandbox
def test_an_id_of_another_instance_is_refused_and_its_copy_and_record_untouched(
        sandbox: Sandbox, genesis_home: Path, allowed: Path, repo: Path) -> None:
    records = MemoryExperimentRecords()
    runner = ExperimentRunner(settings(genesis_home, allowed), records, sandbox)
    first = runner(request(repo, "shared-id"), context())
    copy = Path(first["sandbox_path"])
    kept = contents(copy, genesis_home / "sandboxes" / ".gitdirs")
    record = records.show_experiment("shared-id", output=True)
    other_repo = make_repo(allowed / "other", {"calc.py": "EVIL = 1\n"})

    with pytest.raises(ExperimentIdTaken) as caught:
        runner(request(other_repo, "shared-id", instance_id="intruder"), context())

    assert caught.value.code == "experiment_id_taken" and "another instance_id" in caught.value.message
    assert contents(copy, genesis_home / "sandboxes" / ".gitdirs") == kept
    assert records.show_experiment("shared-id", output=True) == record
    assert record is not None and record["instance_id"] == "singularity-1" and record["attempts"] == 1


def test_a_resend_by_the_same_instance_is_a_new_attempt(genesis_home: Path, allowed: Path, repo: Path) -> None:
    records = MemoryExperimentRecords()
    gated = GatedSandbox()
    gated.gate.set()
    runner = ExperimentRunner(settings(genesis_home, allowed), records, gated)  # type: ignore[arg-type]
    runner(request(repo, **GATED), context())
    resend = dataclasses.replace(context(), msg_id=2)   # a re-send is another message (not a redelivery)
    again = runner(request(repo, description="again", **GATED), resend)
    shown = records.show_experiment("exp-1")
    assert again["status"] == "success" and shown is not None
    assert (shown["attempts"], shown["description"]) == (2, "again")
    assert [r["attempt"] for r in shown["runs"]] == [1, 1, 2, 2]   # both ran every phase


def test_two_consumers_given_one_id_never_share_its_copy(genesis_home: Path, allowed: Path, repo: Path) -> None:
    locks: dict[str, Any] = {}
    shared = MemoryExperimentRecords(locks=locks)
    consumer_b_records = MemoryExperimentRecords(locks=locks, experiments=shared.experiments, runs=shared.runs,
                                                 events=shared.events)
    gated = GatedSandbox()
    consumer_a = ExperimentRunner(settings(genesis_home, allowed), shared, gated)  # type: ignore[arg-type]
    consumer_b = ExperimentRunner(settings(genesis_home, allowed), consumer_b_records,
                                  GatedSandbox())  # type: ignore[arg-type]
    results: list[dict[str, Any]] = []
    running = threading.Thread(target=lambda: results.append(consumer_a(request(repo, "one-id", **GATED), context())))
    running.start()
    try:
        assert gated.inside.acquire(timeout=30)      # A is in its baseline run
        copy = genesis_home / "sandboxes" / "one-id"
        before = contents(copy, genesis_home / "sandboxes" / ".gitdirs")

        with pytest.raises(ExperimentBusy) as caught:
            consumer_b(request(repo, "one-id", **GATED), context())

        assert caught.value.code == "experiment_busy"     # retryable: the queue tries it again later
        assert contents(copy, genesis_home / "sandboxes" / ".gitdirs") == before
    finally:
        gated.gate.set()
        running.join(timeout=60)
    assert [r["status"] for r in results] == ["success"]
    assert "b + a" in (genesis_home / "sandboxes" / "one-id" / "calc.py").read_text()


# --- disk -------------------------------------------------------------------------------------


def test_a_repository_over_the_copy_cap_is_refused(genesis_home: Path, allowed: Path) -> None:
    big = make_repo(allowed / "big", {**BASE_FILES, "blob.bin": ""})
    (big / "blob.bin").write_bytes(os.urandom(3 * 2**20))
    git(big, "commit", "-qam", "blob")
    records = MemoryExperimentRecords()
    runner = ExperimentRunner(settings(genesis_home, allowed, experiment_max_copy_mb=1), records,
                              GatedSandbox())  # type: ignore[arg-type]
    error = failure(runner, big, **GATED)
    assert error.code == "repository_too_large" and "GENESIS_EXPERIMENT_MAX_COPY_MB" in error.message
    assert tree_size(genesis_home) == 0
    shown = records.show_experiment("exp-1")
    assert shown is not None and shown["error"]["code"] == "repository_too_large"


WRITER = '''import os


def test_fill_the_disk():
    written, files = 0, 0
    try:
        for i in range(50):                  # 500 MB in 50 files of 10 MB
            with open(f"big-{i}.bin", "wb") as handle:
                for _ in range(10):
                    handle.write(os.urandom(2**20))
                    written += 2**20
            files += 1
    except OSError as exc:
        assert exc.errno == 28, exc          # ENOSPC: the scratch is full
    made = 0
    try:
        for made in range(300_000):          # 300,000 empty files
            open(f"e{made}", "w").close()
    except OSError as exc:
        assert exc.errno == 28, exc
    print(f"written={written} made={made}")
    assert written <= 64 * 2**20 and made <= 3_000
'''


@pytest.mark.sandbox
@pytest.mark.slow
@as_root
def test_a_test_suite_writing_500_MB_and_300000_files_stays_under_the_scratch_cap(
        sandbox: Sandbox, genesis_home: Path, allowed: Path) -> None:
    repo = make_repo(allowed / "filler", {**BASE_FILES, "tests/test_fill.py": WRITER})
    records = MemoryExperimentRecords()
    runner = ExperimentRunner(settings(genesis_home, allowed, experiment_scratch_mb=64,
                                       experiment_scratch_inodes=2_000), records, sandbox)
    free_before = shutil.disk_usage(genesis_home).free
    copy = genesis_home / "sandboxes" / "exp-1"
    scratch = genesis_home / "sandboxes" / ".scratch" / "exp-1" / "layer"
    lowest_free, largest_home, largest_scratch = [free_before], [0], [0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            lowest_free.append(shutil.disk_usage(genesis_home).free)
            largest_home.append(disk_bytes(genesis_home))
            largest_scratch.append(mounted_bytes(scratch))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = runner(request(repo, risk_level="high", test_command=["pytest", "-s", "tests/test_fill.py"]),
                        context(seconds=280))
    finally:
        done.set()
        watcher.join()

    # the suite's own assertions (written <= 64 MB, files <= 3000) passed, at the baseline and after
    assert result["status"] == "success" and result["metrics"]["test_count"] == 1
    assert result["metrics"]["success_rate"] == result["metrics"]["baseline_success_rate"] == 1.0
    assert not list(copy.glob("big-*")) and not list(copy.glob("e[0-9]*"))   # nothing reached the copy
    copy_bytes = tree_size(copy, genesis_home / "sandboxes" / ".gitdirs")
    assert max(largest_home) <= copy_bytes + 2**20                        # GENESIS_HOME never grew with it
    assert max(largest_scratch) <= 64 * 2**20                             # the writes went to the capped scratch
    shown = records.show_experiment("exp-1", output=True)
    assert shown is not None
    for run in shown["runs"]:       # what the suite managed to write, as it printed it
        written, made = (int(v) for v in re.findall(r"written=(\d+) made=(\d+)", run["output_tail"])[0])
        assert 32 * 2**20 < written <= 64 * 2**20 and 500 < made <= 3_000
    # 500 MB written uncapped would show as a drop of 500 MB; other processes share this disk, hence
    # the slack on top of the 64 MB cap
    assert free_before - min(lowest_free) < 64 * 2**20 + 256 * 2**20
    assert not (genesis_home / "sandboxes" / ".scratch" / "exp-1").exists()


def test_the_oldest_copies_of_a_producer_over_its_caps_go_first(genesis_home: Path, allowed: Path,
                                                                repo: Path) -> None:
    records = MemoryExperimentRecords()
    gated = GatedSandbox()
    gated.gate.set()
    runner = ExperimentRunner(settings(genesis_home, allowed, experiment_copies_per_instance=2), records,
                              gated)  # type: ignore[arg-type]
    sandboxes = genesis_home / "sandboxes"
    runner(request(repo, "other-1", instance_id="other", **GATED), context())
    for age, experiment_id in enumerate(["mine-1", "mine-2"]):
        runner(request(repo, experiment_id, **GATED), context())
        for path in (sandboxes / experiment_id, sandboxes / ".gitdirs" / f"{experiment_id}.git"):
            os.utime(path, (1_000_000 + age, 1_000_000 + age))          # mine-1 is the oldest

    runner(request(repo, "mine-3", **GATED), context())

    assert sorted(p.name for p in sandboxes.iterdir() if not p.name.startswith(".")) == [
        "mine-2", "mine-3", "other-1"]
    assert not (sandboxes / ".gitdirs" / "mine-1.git").exists()
    [removed] = records.sandbox_events(event="cleaned_up")
    assert removed["experiment_id"] == "mine-1" and "singularity-1" in removed["detail"]


def test_an_empty_allow_list_disables_experiments_and_says_so(genesis_home: Path, repo: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="genesis_pgflow.handlers.experiments"):
        runner = ExperimentRunner(Settings(home=genesis_home), MemoryExperimentRecords(),
                                  GatedSandbox())  # type: ignore[arg-type]
    assert any("experiments disabled: set GENESIS_REPO_ALLOW" in r.getMessage() for r in caplog.records)
    error = failure(runner, repo)
    assert (error.code, error.message) == ("repository_unavailable", UNAVAILABLE)


def test_an_unusable_allow_list_is_a_configuration_error(genesis_home: Path) -> None:
    with pytest.raises(GenesisError, match="GENESIS_REPO_ALLOW") as caught:
        ExperimentRunner(Settings(home=genesis_home, repo_allow="ftp://x"), MemoryExperimentRecords(),
                         GatedSandbox())  # type: ignore[arg-type]
    assert caught.value.code == "configuration"

