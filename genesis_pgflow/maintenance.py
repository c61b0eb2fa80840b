"""Sandbox maintenance: removing old experiment sandboxes and checking the git health of the
live ones. Each job runs in one consumer at a time: it takes a PostgreSQL advisory lock through
the records store and returns at once (ran=False) when another consumer holds it.

    for name, interval_s, job in scheduled_jobs(settings, records):
        ...every interval_s: report = job()      # CleanupReport / IntegrityReport

A sandbox's age is the time since its directory last changed (every test run and rollback
changes it). A sandbox is kept until it is older than settings.sandbox_max_age_days (default 7),
so that failed and regressed experiments can be analysed, or settings.sandbox_success_max_age_days
(default 1) for an experiment that ended in success; and never one younger than the experiment
timeout, which may still be running.

Each producer (instance_id) keeps at most settings.experiment_copies_per_instance copies and
settings.experiment_copies_mb_per_instance MB of them: over either, its oldest copies are removed
first, by the cleanup and when one of its experiments starts (enforce_instance_caps). A copy is
only ever removed under its experiment's advisory lock, so never while a consumer runs it.
"""

from __future__ import annotations

import functools
import os
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genesis_pgflow.errors import GenesisError
from genesis_pgflow.settings import Settings
from genesis_pgflow.store.experiments import ExperimentRecords
from genesis_pgflow.workspace import (
    GIT_DIRS,
    SANDBOX_ID,
    SCRATCH,
    Workspace,
    remove_tree,
    tree_size,
)

CLEANUP_JOB = "sandbox_cleanup"
INTEGRITY_JOB = "sandbox_integrity"
DAY_S = 86_400.0


@dataclass(frozen=True)
class SandboxEntry:
    """One experiment sandbox found on disk (its working tree, its git directory, or both)."""

    experiment_id: str
    path: Path
    git_dir: Path
    age_s: float

    @property
    def size_bytes(self) -> int:
        return tree_size(self.path, self.git_dir)


def find_sandboxes(sandboxes_dir: Path, *, now: float | None = None) -> list[SandboxEntry]:
    """Every experiment sandbox under sandboxes_dir, oldest first; symlinks and stray entries are
    never followed or listed. A git directory whose working tree is gone is listed too."""
    now = time.time() if now is None else now
    found: dict[str, SandboxEntry] = {}
    git_dirs = sandboxes_dir / GIT_DIRS
    places = [(sandboxes_dir, "")]
    if git_dirs.is_dir() and not git_dirs.is_symlink():
        places.append((git_dirs, ".git"))
    for folder, suffix in places:
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            name = entry.name[:-len(suffix)] if suffix and entry.name.endswith(suffix) else entry.name
            if (suffix and not entry.name.endswith(suffix)) or not SANDBOX_ID.match(name) \
                    or not entry.is_dir(follow_symlinks=False):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
            workspace = Workspace(sandboxes_dir, name)
            previous = found.get(name)
            age = now - mtime if previous is None else min(previous.age_s, now - mtime)
            found[name] = SandboxEntry(name, workspace.path, workspace.git_dir, max(0.0, age))
    return sorted(found.values(), key=lambda e: (-e.age_s, e.experiment_id))


# --- cleanup ---------------------------------------------------------------------------------


@dataclass
class CleanupReport:
    """What one cleanup did; ran is False when another consumer held the job's lock."""

    ran: bool
    max_age_s: float = 0.0
    removed: list[dict[str, Any]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(r["size_bytes"] for r in self.removed)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_freed": self.bytes_freed}


def cleanup_sandboxes(settings: Settings, records: ExperimentRecords, *, now: float | None = None,
                      max_age_days: float | None = None,
                      remove: Callable[[Path], None] = remove_tree) -> CleanupReport:
    """Remove the sandboxes older than max_age_days (default settings.sandbox_max_age_days;
    settings.sandbox_success_max_age_days for experiments that ended in success; never younger than
    the experiment timeout), then each producer's oldest copies over its caps, and the scratch a
    killed consumer left mounted; each removal recorded as cleaned_up with its size and age.
    `genesis sandbox cleanup` and the scheduled job are this function."""
    with records.maintenance_lock(CLEANUP_JOB) as locked:
        if not locked:
            return CleanupReport(ran=False)
        now = time.time() if now is None else now
        days = settings.sandbox_max_age_days if max_age_days is None else max_age_days
        floor_s = settings.experiment_timeout_ms / 1000.0
        max_age_s = max(days * DAY_S, floor_s)
        success_age_s = max(min(days, settings.sandbox_success_max_age_days) * DAY_S, floor_s)
        report = CleanupReport(ran=True, max_age_s=max_age_s)
        entries = find_sandboxes(settings.sandboxes_dir, now=now)
        owners = records.experiment_owners([e.experiment_id for e in entries])
        kept: list[SandboxEntry] = []
        for entry in entries:
            success = (owners.get(entry.experiment_id) or {}).get("status") == "success"
            if entry.age_s < (success_age_s if success else max_age_s):
                kept.append(entry)
                continue
            limit = settings.sandbox_success_max_age_days if success else days
            if not _remove_copy(records, entry, report, remove, f"older than {min(limit, days):g} days"):
                kept.append(entry)
        by_instance: dict[str, list[SandboxEntry]] = {}
        for entry in kept:
            instance = (owners.get(entry.experiment_id) or {}).get("instance_id")
            if instance is not None:
                by_instance.setdefault(instance, []).append(entry)
        for instance, copies in by_instance.items():
            for entry in _over_caps(settings, copies, extra_bytes=0):
                if _remove_copy(records, entry, report, remove, f"over the copy caps of instance {instance}"):
                    kept.remove(entry)
        report.kept = [e.experiment_id for e in kept]
        _unmount_stale_scratch(settings, records)
        return report


def enforce_instance_caps(settings: Settings, records: ExperimentRecords, instance_id: str, *,
                          starting: str | None = None, now: float | None = None) -> CleanupReport:
    """Make room for a new copy of instance_id's experiment `starting`: its other copies, oldest
    first, are removed while they number experiment_copies_per_instance or more, or would leave
    less than GENESIS_EXPERIMENT_MAX_COPY_MB under experiment_copies_mb_per_instance."""
    report = CleanupReport(ran=True)
    entries = [e for e in find_sandboxes(settings.sandboxes_dir, now=now) if e.experiment_id != starting]
    owners = records.experiment_owners([e.experiment_id for e in entries])
    mine = [e for e in entries if (owners.get(e.experiment_id) or {}).get("instance_id") == instance_id]
    extra = settings.experiment_max_copy_mb * 2**20 if starting is not None else 0
    for entry in _over_caps(settings, mine, extra_bytes=extra, extra_copies=int(starting is not None)):
        _remove_copy(records, entry, report, remove_tree, f"over the copy caps of instance {instance_id}")
    return report


def _over_caps(settings: Settings, copies: list[SandboxEntry], *, extra_bytes: int,
               extra_copies: int = 0) -> list[SandboxEntry]:
    """The oldest of copies (oldest first, as find_sandboxes lists them) to remove so that the
    rest, plus what is about to be made, stay under the per-instance caps."""
    sizes = {e.experiment_id: e.size_bytes for e in copies}
    count, total = len(copies) + extra_copies, sum(sizes.values()) + extra_bytes
    over: list[SandboxEntry] = []
    for entry in copies:
        if count <= settings.experiment_copies_per_instance and \
                total <= settings.experiment_copies_mb_per_instance * 2**20:
            break
        over.append(entry)
        count, total = count - 1, total - sizes[entry.experiment_id]
    return over


def _remove_copy(records: ExperimentRecords, entry: SandboxEntry, report: CleanupReport,
                 remove: Callable[[Path], None], why: str) -> bool:
    """Remove one copy under its experiment's lock (never one a consumer is running); on record."""
    with records.experiment_lock(entry.experiment_id) as locked:
        if not locked:
            return False
        size = entry.size_bytes
        try:
            Workspace(entry.path.parent, entry.experiment_id).unmount_scratch()
            remove(entry.path)
            remove(entry.git_dir)
        except OSError as exc:
            report.errors.append({"experiment_id": entry.experiment_id, "error": str(exc)})
            return False
        records.sandbox_event(entry.experiment_id, str(entry.path), "cleaned_up", size_bytes=size,
                              age_s=round(entry.age_s, 3), detail=why)
        report.removed.append({"experiment_id": entry.experiment_id, "path": str(entry.path),
                               "size_bytes": size, "age_s": round(entry.age_s, 3), "reason": why})
        return True


def _unmount_stale_scratch(settings: Settings, records: ExperimentRecords) -> None:
    """A consumer killed mid-run leaves its scratch mounted: unmount those nobody is running."""
    scratch = settings.sandboxes_dir / SCRATCH
    if not scratch.is_dir() or scratch.is_symlink():
        return
    for entry in os.scandir(scratch):
        if SANDBOX_ID.match(entry.name) and entry.is_dir(follow_symlinks=False):
            with records.experiment_lock(entry.name) as locked:
                if locked:
                    Workspace(settings.sandboxes_dir, entry.name).unmount_scratch()


# --- integrity -------------------------------------------------------------------------------


@dataclass
class IntegrityReport:
    """What one integrity check found; ran is False when another consumer held the job's lock."""

    ran: bool
    ok: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def checked(self) -> int:
        return len(self.ok) + len(self.failed)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "checked": self.checked}


def sandbox_health(entry: SandboxEntry) -> str | None:
    """None if the sandbox is a healthy git copy, else what is wrong with it."""
    if not entry.path.is_dir() or entry.path.is_symlink():
        return "the working tree is missing"
    if not entry.git_dir.is_dir() or not stat.S_ISDIR(os.lstat(entry.git_dir).st_mode):
        return "the git directory is missing"
    workspace = Workspace(entry.path.parent, entry.experiment_id)
    try:
        workspace.git("rev-parse", "--verify", "--quiet", "HEAD^{commit}")
        workspace.git("fsck", "--connectivity-only", "--no-progress", "--no-dangling")
        workspace.git("status", "--porcelain")
    except GenesisError as exc:
        return exc.message
    return None


def check_integrity(settings: Settings, records: ExperimentRecords, *, now: float | None = None) -> IntegrityReport:
    """Check every live sandbox's git health (HEAD resolves, objects connected, index readable),
    recording integrity_ok or integrity_failed."""
    with records.maintenance_lock(INTEGRITY_JOB) as locked:
        if not locked:
            return IntegrityReport(ran=False)
        report = IntegrityReport(ran=True)
        for entry in find_sandboxes(settings.sandboxes_dir, now=now):
            problem = sandbox_health(entry)
            size = entry.size_bytes
            if problem is None:
                report.ok.append(entry.experiment_id)
            else:
                report.failed.append({"experiment_id": entry.experiment_id, "path": str(entry.path),
                                      "problem": problem})
            records.sandbox_event(entry.experiment_id, str(entry.path),
                                  "integrity_ok" if problem is None else "integrity_failed",
                                  size_bytes=size, age_s=round(entry.age_s, 3), detail=problem)
        return report


# --- scheduling ------------------------------------------------------------------------------


def scheduled_jobs(settings: Settings, records: ExperimentRecords) -> list[tuple[str, float, Callable[[], Any]]]:
    """(name, interval_s, job) for the consumer loop; each job takes its own advisory lock and
    returns a report whose `ran` is False if another consumer is running it."""
    return [
        (CLEANUP_JOB, settings.sandbox_cleanup_interval_s, functools.partial(cleanup_sandboxes, settings, records)),
        (INTEGRITY_JOB, settings.sandbox_integrity_interval_s, functools.partial(check_integrity, settings, records)),
    ]
