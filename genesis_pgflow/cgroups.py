"""Per-run control groups: finding a usable hierarchy (cgroup v2, else v1) and one run's cgroup
from creation (limits written, process entered) to its end (usage read, killed, removed).

Every run (a sandboxed test run or a trusted analyser) gets a cgroup of its own under a
`genesis` parent, so that its limits hold for the run as a whole, not per process: memory
(anonymous, shared and tmpfs pages and the kernel's own, with no swap), tasks (processes and
threads), a CPU rate (cores) and, watched by the caller through `usage()`, a total of CPU time.

A run's cgroup is named `<kind>-<consumer pid>-<n>`: those of a consumer that is gone (killed
mid-run) are killed and removed when the next consumer finds the hierarchy (`remove_stale`).

v2 and v1 differ only in small named operations (`_limit_writes`, `procs_files`, `pids`,
`usage`, `_kill_everything`, `directories`), so that the v2 logic can be checked against a
directory laid out like cgroupfs where no v2 controller is available.

    hierarchy, reason = detect()          # None and why when no cgroup is writable here
    run = hierarchy.create("run-1", Budget(memory_bytes=..., processes=..., cpu_cores=1.0))
    argv = run.enter_command(argv)        # the process writes itself into the cgroup, then execs
    ...; run.usage().oom_kills; run.close()   # killed, waited for and removed
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PARENT = "genesis"
REQUIRED = ("memory", "pids")
OPTIONAL = ("cpu",)
V1_OPTIONAL = ("cpu", "cpuacct", "freezer")
CPU_PERIOD_US = 100_000

# Written as the first step of the chain, before the untrusted command exists: the shell enters
# every cgroup (one per v1 controller) and only then execs; a failed write never runs the
# command. argv: ENTERED_MARK file... -- command...
_ENTER_SCRIPT = ('while [ "$1" != -- ]; do echo $$ 2>/dev/null >"$1" || '
                 '{ echo "genesis-cgroup: cannot enter $1" >&2; exit 125; }; shift; done; shift; exec "$@"')
ENTER_FAILED = 125
ENTER_FAILED_MARK = "genesis-cgroup: cannot enter"


class CgroupError(Exception):
    """A cgroup could not be set up."""


@dataclass(frozen=True)
class Budget:
    """What one run may use as a whole. cpu_cores caps its rate (quota per period); the total
    CPU time is the caller's to enforce from usage()."""

    memory_bytes: int
    processes: int
    cpu_cores: float = 1.0


@dataclass(frozen=True)
class Usage:
    memory_peak_bytes: int | None
    cpu_s: float
    oom_kills: int


# --- one run's cgroup ------------------------------------------------------------------------


class RunCgroup(ABC):
    """One run's cgroup (one directory per v1 controller, one in v2)."""

    def __init__(self, name: str):
        self.name = name

    @abstractmethod
    def directories(self) -> list[Path]: ...

    @abstractmethod
    def procs_files(self) -> list[Path]:
        """Where the run's first process writes its pid."""

    @abstractmethod
    def pids(self) -> list[int]: ...

    @abstractmethod
    def usage(self) -> Usage: ...

    @abstractmethod
    def _limit_writes(self, budget: Budget) -> list[tuple[Path, str]]: ...

    @abstractmethod
    def _kill_everything(self) -> None:
        """SIGKILL every process in the cgroup, with no chance for one to fork past us."""

    def apply(self, budget: Budget) -> None:
        for path, value in self._limit_writes(budget):
            _write(path, value)

    def enter_command(self, argv: Sequence[str]) -> list[str]:
        return ["/bin/sh", "-c", _ENTER_SCRIPT, "genesis-cgroup", *map(str, self.procs_files()), "--", *argv]

    def kill(self, spare: int | None = None, *, timeout_s: float = 5.0) -> None:
        """Kill every process in the cgroup, or every one but `spare` (so that bwrap can reap its
        child before it goes too); returns once none (but spare) is left, or at timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = [pid for pid in self.pids() if pid != spare]
            if not pids:
                return
            if spare is None:
                self._kill_everything()
            else:
                for pid in pids:
                    _signal(pid)
            time.sleep(0.01)

    def remove(self, *, timeout_s: float = 5.0) -> None:
        """rmdir every directory (busy for a moment after the last process died)."""
        deadline = time.monotonic() + timeout_s
        for directory in self.directories():
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        raise
                    self.kill(timeout_s=0.2)
                    time.sleep(0.01)

    def close(self) -> None:
        self.kill()
        self.remove()

    def exists(self) -> bool:
        return any(directory.exists() for directory in self.directories())


class V2Run(RunCgroup):
    def __init__(self, name: str, directory: Path):
        super().__init__(name)
        self.directory = directory

    def directories(self) -> list[Path]:
        return [self.directory]

    def procs_files(self) -> list[Path]:
        return [self.directory / "cgroup.procs"]

    def pids(self) -> list[int]:
        return _read_pids(self.directory / "cgroup.procs")

    def _limit_writes(self, budget: Budget) -> list[tuple[Path, str]]:
        d = self.directory
        writes = [(d / "memory.max", str(budget.memory_bytes)), (d / "memory.oom.group", "1"),
                  (d / "pids.max", str(budget.processes))]
        if (d / "memory.swap.max").exists():
            writes.append((d / "memory.swap.max", "0"))
        if (d / "cpu.max").exists():
            writes.append((d / "cpu.max", f"{max(1000, int(budget.cpu_cores * CPU_PERIOD_US))} {CPU_PERIOD_US}"))
        return writes

    def usage(self) -> Usage:
        d = self.directory
        peak = _read_int(d / "memory.peak")
        events = _read_keyed(d / "memory.events")
        cpu = _read_keyed(d / "cpu.stat")
        return Usage(peak, cpu.get("usage_usec", 0) / 1e6, events.get("oom_kill", 0))

    def _kill_everything(self) -> None:
        if (self.directory / "cgroup.kill").exists():
            _write(self.directory / "cgroup.kill", "1")  # the kernel kills the lot, forks included
            return
        _write(self.directory / "cgroup.freeze", "1")
        for pid in self.pids():
            _signal(pid)
        _write(self.directory / "cgroup.freeze", "0")


class V1Run(RunCgroup):
    def __init__(self, name: str, directories: dict[str, Path]):
        super().__init__(name)
        self.by_controller = directories

    def directories(self) -> list[Path]:
        return list(dict.fromkeys(self.by_controller.values()))

    def procs_files(self) -> list[Path]:
        return [directory / "cgroup.procs" for directory in self.directories()]

    def pids(self) -> list[int]:
        return _read_pids(self.by_controller["pids"] / "cgroup.procs")

    def _limit_writes(self, budget: Budget) -> list[tuple[Path, str]]:
        memory = self.by_controller["memory"]
        writes = [(memory / "memory.limit_in_bytes", str(budget.memory_bytes))]
        if (memory / "memory.memsw.limit_in_bytes").exists():
            # memory + swap = memory: no swap (it must be set after the memory limit, never below it)
            writes.append((memory / "memory.memsw.limit_in_bytes", str(budget.memory_bytes)))
        else:
            writes.append((memory / "memory.swappiness", "0"))
        writes.append((self.by_controller["pids"] / "pids.max", str(budget.processes)))
        if "cpu" in self.by_controller:
            cpu = self.by_controller["cpu"]
            writes += [(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US)),
                       (cpu / "cpu.cfs_quota_us", str(max(1000, int(budget.cpu_cores * CPU_PERIOD_US))))]
        return writes

    def usage(self) -> Usage:
        memory = self.by_controller["memory"]
        peak = _read_int(memory / "memory.max_usage_in_bytes")
        oom = _read_keyed(memory / "memory.oom_control").get("oom_kill", 0)
        cpu_s = 0.0
        if "cpuacct" in self.by_controller:
            cpu_s = (_read_int(self.by_controller["cpuacct"] / "cpuacct.usage") or 0) / 1e9
        return Usage(peak, cpu_s, oom)

    def _kill_everything(self) -> None:
        freezer = self.by_controller.get("freezer")
        if freezer is not None:
            _write(freezer / "freezer.state", "FROZEN")
        try:
            for pid in self.pids():
                _signal(pid)
        finally:
            if freezer is not None:
                _write(freezer / "freezer.state", "THAWED")  # a frozen process dies once thawed


# --- hierarchies -----------------------------------------------------------------------------


class Hierarchy(ABC):
    """Where runs get their cgroups: the `genesis` parent in a usable hierarchy."""

    version: str
    _names = itertools.count()

    @property
    @abstractmethod
    def controllers(self) -> tuple[str, ...]: ...

    @abstractmethod
    def _make(self, name: str) -> RunCgroup: ...

    @abstractmethod
    def _children(self) -> list[str]: ...

    def describe(self) -> str:
        shown = [c for c in ("memory", "pids", "cpu") if c in self.controllers]
        return f"cgroup {self.version} ({', '.join(shown)})"

    def unique_name(self, kind: str) -> str:
        return f"{kind}-{os.getpid()}-{next(self._names)}"

    def create(self, name: str, budget: Budget) -> RunCgroup:
        """A fresh cgroup with the budget's limits; one of the same name (left by a consumer
        that died) is killed and removed first. CgroupError if it cannot be set up."""
        run = self._make(name)
        try:
            if run.exists():
                run.close()
            for directory in run.directories():
                directory.mkdir()
            run.apply(budget)
        except OSError as exc:
            try:
                run.remove(timeout_s=1.0)
            except OSError:
                pass
            raise CgroupError(f"cannot set up cgroup {name}: {exc}") from exc
        return run

    def remove_stale(self) -> list[str]:
        """Kill and remove the runs of consumers that are gone (their pid is in the name)."""
        removed = []
        for name in self._children():
            parts = name.split("-")
            if len(parts) >= 3 and parts[-2].isdigit() and not _alive(int(parts[-2])):
                try:
                    self._make(name).close()
                    removed.append(name)
                except OSError:
                    continue
        return removed


class V2Hierarchy(Hierarchy):
    version = "v2"

    def __init__(self, parent: Path, controllers: tuple[str, ...]):
        self.parent = parent
        self._controllers = controllers

    @property
    def controllers(self) -> tuple[str, ...]:
        return self._controllers

    @classmethod
    def open(cls, parent: Path) -> V2Hierarchy:
        """Make `parent` (a cgroup2 directory, created if missing) hand memory, pids and cpu down
        to its children. CgroupError with the reason if the hierarchy does not allow it."""
        try:
            parent.mkdir(exist_ok=True)
            available = _read_words(parent / "cgroup.controllers")
            missing = [c for c in (*REQUIRED, *OPTIONAL) if c not in available]
            if any(c in missing for c in REQUIRED):
                # the parent's parent may not hand them down yet (it must have no process of its own)
                try:
                    _write(parent.parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
                except OSError:
                    pass
                available = _read_words(parent / "cgroup.controllers")
            if not all(c in available for c in REQUIRED):
                raise CgroupError(f"{parent} has no {' or '.join(c for c in REQUIRED if c not in available)} "
                                  "controller (not delegated)")
            wanted = tuple(c for c in (*REQUIRED, *OPTIONAL) if c in available)
            _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
        except OSError as exc:
            raise CgroupError(f"cannot use {parent}: {exc}") from exc
        return cls(parent, wanted)

    def _make(self, name: str) -> RunCgroup:
        return V2Run(name, self.parent / name)

    def _children(self) -> list[str]:
        return sorted(entry.name for entry in os.scandir(self.parent) if entry.is_dir())


class V1Hierarchy(Hierarchy):
    version = "v1"

    def __init__(self, parents: dict[str, Path]):
        self.parents = parents

    @property
    def controllers(self) -> tuple[str, ...]:
        return tuple(self.parents)

    @classmethod
    def open(cls, parents: dict[str, Path]) -> V1Hierarchy:
        missing = [c for c in REQUIRED if c not in parents]
        if missing:
            raise CgroupError(f"no cgroup v1 {' or '.join(missing)} hierarchy is mounted")
        try:
            for directory in dict.fromkeys(parents.values()):
                directory.mkdir(exist_ok=True)
                if not os.access(directory / "cgroup.procs", os.W_OK):
                    raise CgroupError(f"{directory} is not writable")
        except OSError as exc:
            raise CgroupError(f"cannot use the cgroup v1 hierarchy: {exc}") from exc
        return cls(parents)

    def _make(self, name: str) -> RunCgroup:
        return V1Run(name, {controller: parent / name for controller, parent in self.parents.items()})

    def _children(self) -> list[str]:
        return sorted(entry.name for entry in os.scandir(self.parents["memory"]) if entry.is_dir())


# --- detection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    root: str  # the mount's root inside its hierarchy
    point: Path
    fstype: str
    options: tuple[str, ...]


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 10:
            continue
        after = fields.index("-")
        fstype = fields[after + 1]
        if fstype in ("cgroup", "cgroup2"):
            point = fields[4].replace("\\040", " ")
            mounts.append(Mount(fields[3], Path(point), fstype, tuple(fields[after + 3].split(","))))
    return mounts


def parse_self_cgroup(text: str) -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _inside(mount: Mount, path: str) -> Path:
    relative = path[len(mount.root):] if mount.root != "/" and path.startswith(mount.root) else path
    return mount.point / relative.lstrip("/")


def detect(parent: Path | None = None, *, mountinfo: str | None = None,
           self_cgroup: str | None = None) -> tuple[Hierarchy | None, list[str]]:
    """The hierarchy runs get their cgroups in: cgroup v2 with memory and pids delegated first,
    else v1 (under this process's own cgroup of each controller), else None; with the reasons
    each one was not usable. `parent` names a v2 directory to use (e.g. a delegated one)."""
    mountinfo = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    self_cgroup = Path("/proc/self/cgroup").read_text() if self_cgroup is None else self_cgroup
    mounts = parse_mountinfo(mountinfo)
    own = parse_self_cgroup(self_cgroup)
    reasons: list[str] = []
    v2_parents = [parent] if parent is not None else [m.point / PARENT for m in mounts if m.fstype == "cgroup2"]
    if not v2_parents:
        reasons.append("cgroup v2: not mounted")
    for candidate in v2_parents:
        try:
            return V2Hierarchy.open(candidate), reasons
        except CgroupError as exc:
            reasons.append(f"cgroup v2: {exc}")
    v1: dict[str, Path] = {}
    for mount in mounts:
        if mount.fstype != "cgroup":
            continue
        for controller in (*REQUIRED, *V1_OPTIONAL):
            if controller in mount.options and controller not in v1:
                v1[controller] = _inside(mount, own.get(controller, "/")) / PARENT
    try:
        return V1Hierarchy.open(v1), reasons
    except CgroupError as exc:
        reasons.append(f"cgroup v1: {exc}")
    return None, reasons


def cpu_quota_cores(*, mountinfo: str | None = None, self_cgroup: str | None = None) -> float | None:
    """The CPU quota on this process's cgroup or any ancestor, in cores (a container's --cpus):
    cgroup v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us; the lowest one, None if none."""
    mountinfo = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    self_cgroup = Path("/proc/self/cgroup").read_text() if self_cgroup is None else self_cgroup
    own = parse_self_cgroup(self_cgroup)
    quotas: list[float] = []
    for mount in parse_mountinfo(mountinfo):
        v2 = mount.fstype == "cgroup2"
        key = "" if v2 else "cpu"      # v2's one hierarchy, or v1's cpu controller
        if key not in own or not (v2 or "cpu" in mount.options):
            continue
        directory = _inside(mount, own[key])
        for d in (directory, *directory.parents):     # up to the mount's root
            if d != mount.point and mount.point not in d.parents:
                break
            if v2:    # "max 100000" (none) or "150000 100000"
                quota, period = (_read_words(d / "cpu.max") + ["max", "0"])[:2]
            else:     # -1 (none), or microseconds per period
                quota, period = str(_read_int(d / "cpu.cfs_quota_us")), str(_read_int(d / "cpu.cfs_period_us"))
            if quota.isdigit() and period.isdigit() and int(period) > 0:
                quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


# --- files and processes ---------------------------------------------------------------------


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _read_keyed(path: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                found[key] = int(value)
    except OSError:
        pass
    return found


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(word) for word in path.read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


def _signal(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
