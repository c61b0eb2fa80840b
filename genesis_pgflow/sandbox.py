"""Running untrusted code and test suites: limits, isolation, cleanup.

A command runs as

    sh (writes itself into the run's own cgroup, then execs; see cgroups.py)
      -> prlimit (CPU time, memory, processes, file size, open files: per process)
        -> bwrap (new pid, network, ipc, uts and mount namespaces; a seccomp filter; --die-with-parent;
                  --as-pid-1)
          -> setpriv (an unprivileged uid of its own, no new privileges, no capabilities left)
            -> the command

each one exec()ing the next, so the whole chain is one process of ours, started in its own
process group. (bwrap runs as root and needs no user namespace, so the host paths it binds need
not be reachable by the sandbox's uid; without root, bwrap makes a user namespace instead and
setpriv is skipped.) Inside the sandbox the command sees only a read-only /usr (with the /bin,
/lib, /lib64 and /sbin links), /proc, a minimal /dev, any extra read-only paths it is given, and
`/sandbox`, its working directory and the only writable place:

- by default a fresh tmpfs of `Limits.tmpfs_bytes` and `Limits.tmpfs_inodes` (as root, mounted
  here with nr_inodes on a private directory and bound in; bwrap's own --tmpfs has no inode
  limit), into which `files` are copied; it is unmounted after the run, so nothing is written on
  the host;
- or `writable`, an existing host directory bind-mounted read-write (e.g. an experiment's copy
  of a repository). When the consumer runs as root that directory is handed (chowned) to the
  sandbox's uid, so that the code can write there.

Limits hold per run, not per process, where a cgroup is writable (`limits_mode`, announced once
at start): each run has a cgroup of its own with its memory (everything its processes use:
heap, shared memory, the scratch's pages, kernel memory; no swap), tasks and CPU rate, and its
total CPU time is watched; a run past its memory or CPU time is killed and reported
(`SandboxResult.limit`). Without a writable cgroup only the per-process rlimits hold: a run may
then use `processes` x `memory_bytes`.

The seccomp filter (seccomp.py) denies new namespaces, the kernel keyring, mounting, ptrace,
BPF, io_uring and the like. Where it, bwrap or the run's cgroup cannot be set up, nothing runs:
SandboxUnavailable.

No network (not even loopback to the host's PostgreSQL), none of the host's files but /usr.
At the end (normal exit, timeout, a limit or cancellation) the run's cgroup (or, without one,
its process group and everything running under its uid) is killed and removed: nothing is left
behind.

Each concurrent run takes a uid of its own from `uids` (locked with flock, so that several
consumer processes can share a machine): RLIMIT_NPROC counts per uid, so runs sharing one uid
would share one process budget. Without root the sandbox runs as the consumer's own user, and
the process limit then counts that user's other processes too.

    sandbox = Sandbox()
    sandbox.check()                      # SandboxUnavailable if bwrap cannot run here
    result = sandbox.run(["/usr/bin/python3", "main.py"], files={"main.py": code},
                         timeout_s=ctx.remaining(), cancelled=ctx.cancelled)
    result.returncode, result.stdout, result.timed_out, result.limit

`Sandbox.run_tool` runs a trusted tool (an analyser, on untrusted input) with the same limits
minus the isolation: its own cgroup (else rlimits), own process group, bounded output, killed on
timeout, a limit or cancellation. `run_bounded` is the process-group part of both.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import IO

from genesis_pgflow import cgroups, seccomp
from genesis_pgflow.errors import SandboxUnavailable

log = logging.getLogger(__name__)

SANDBOX_DIR = "/sandbox"
_SYSTEM_LINKS = {"/bin": "usr/bin", "/sbin": "usr/sbin", "/lib": "usr/lib", "/lib64": "usr/lib64"}
_SIGXCPU_EXITS = (-signal.SIGXCPU, 128 + signal.SIGXCPU)  # the process itself; bwrap reporting its child
_MS_NOSUID, _MS_NODEV, _MNT_DETACH = 2, 4, 2
_SCRATCH_DIR = "genesis-sandbox-scratch"  # beside the uid locks: one mount point per uid


@dataclass(frozen=True)
class Limits:
    """What one sandboxed run may use.

    With a cgroup (see `Sandbox.limits_mode`) memory_bytes, processes (tasks: threads count),
    cpu_s and cpu_cores hold for the run as a whole; memory counts everything its processes use
    (heap, shared memory, the scratch's files, kernel memory), with no swap. Each process also
    has rlimits: cpu_s of CPU time, memory_bytes of RLIMIT_DATA (heap and private mappings:
    unlike RLIMIT_AS it does not count the address space that V8 and the BEAM reserve), file_bytes
    per file, open_files; which, without a cgroup, are all there is."""

    cpu_s: int = 10
    memory_bytes: int = 512 * 2**20
    processes: int = 64
    file_bytes: int = 16 * 2**20
    open_files: int = 256
    wall_s: float = 30.0
    tmpfs_bytes: int = 64 * 2**20
    output_bytes: int = 1 * 2**20
    tmpfs_inodes: int = 16_384
    cpu_cores: float = 1.0


@dataclass(frozen=True)
class SandboxResult:
    """returncode is None when the run was killed for running out of time, past a limit or
    being cancelled. limit names the run's limit it went past ("memory", "cpu"); the usage
    figures and the cgroup (directories, removed by now) are there when it had one."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    cancelled: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    limit: str | None = None
    memory_peak_bytes: int | None = None
    cpu_s: float | None = None
    cgroup: tuple[str, ...] = ()


def run_bounded(argv: Sequence[str], *, timeout_s: float, cancelled: threading.Event | None = None,
                cwd: Path | None = None, env: dict[str, str] | None = None, stdin: bytes | None = None,
                output_bytes: int = 8 * 2**20, pass_fds: Sequence[int] = (),
                stop: Callable[[int], None] | None = None, watch: Callable[[], str | None] | None = None,
                finish: Callable[[], None] | None = None) -> SandboxResult:
    """Run argv in its own process group; kill the whole group on timeout, on cancellation, when
    `watch()` names a limit it went past, and after it exits. Output beyond output_bytes per
    stream is dropped. `stop(pid)`, if given, is called first, so that the process can reap what
    it started before the group is killed; `finish()` after, to kill what left the group."""
    started = time.monotonic()
    proc = subprocess.Popen(
        list(argv), cwd=cwd, env=env, start_new_session=True, pass_fds=tuple(pass_fds),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    readers = [_Reader(proc.stdout, output_bytes), _Reader(proc.stderr, output_bytes)]  # type: ignore[arg-type]
    if stdin is not None:
        threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True).start()
    timed_out = was_cancelled = False
    limit: str | None = None
    deadline = started + max(0.0, timeout_s)
    try:
        while True:
            try:
                proc.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                pass
            if cancelled is not None and cancelled.is_set():
                was_cancelled = True
                break
            if watch is not None and (limit := watch()) is not None:
                break
            if time.monotonic() >= deadline:
                timed_out = True
                break
    finally:
        if stop is not None and proc.poll() is None:
            stop(proc.pid)
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(proc.pid)
        if finish is not None:
            finish()
        proc.wait()
        for reader in readers:
            reader.join()
    out, err = readers
    return SandboxResult(
        returncode=None if (timed_out or was_cancelled or limit) else proc.returncode,
        stdout=out.text(), stderr=err.text(), timed_out=timed_out,
        duration_s=time.monotonic() - started, cancelled=was_cancelled,
        stdout_truncated=out.truncated, stderr_truncated=err.truncated, limit=limit)


class Sandbox:
    """Runs commands under bubblewrap with resource limits; see the module docstring.

    bwrap, setpriv and prlimit are paths (point bwrap at a missing file to force the sandbox
    to be unavailable); uids is the pool of unprivileged uids handed out to concurrent runs;
    ro_paths are host paths every run sees read-only at the same place (besides /usr).
    use_cgroups=False uses the per-process rlimits only; cgroup_parent names a (delegated) cgroup v2
    directory to create the runs' cgroups in, instead of the hierarchy's `genesis`;
    seccomp_library a path to libseccomp (default: found by its usual name)."""

    def __init__(self, limits: Limits = Limits(), *, bwrap: str = "/usr/bin/bwrap",
                 setpriv: str = "/usr/bin/setpriv", prlimit: str = "/usr/bin/prlimit",
                 uids: range = range(1_900_000_000, 1_900_000_256),
                 ro_paths: Sequence[Path] = (), lock_dir: Path | None = None,
                 use_cgroups: bool = True, cgroup_parent: Path | None = None,
                 seccomp_library: str | None = None, recheck_s: float = 60.0,
                 monotonic: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.bwrap, self.setpriv, self.prlimit = bwrap, setpriv, prlimit
        self.uids = uids
        self.ro_paths = tuple(Path(p) for p in ro_paths)
        self.lock_dir = lock_dir or Path(tempfile.gettempdir()) / "genesis-sandbox-uids"
        self.use_cgroups = use_cgroups
        self.cgroup_parent = cgroup_parent
        self.seccomp_library = seccomp_library
        self._probe_lock = threading.Lock()
        self._hierarchy_lock = threading.Lock()
        self._unavailable: str | None = None
        self._probed = False
        # an unavailable sandbox is probed again after recheck_s: installing bubblewrap (say)
        # needs no consumer restart
        self.recheck_s = recheck_s
        self._monotonic = monotonic
        self._probed_at = 0.0
        self._seccomp: bytes | None = None
        self._hierarchy: cgroups.Hierarchy | None = None
        self._hierarchy_reasons: list[str] = []
        self._hierarchy_probed = False

    @property
    def as_root(self) -> bool:
        return os.geteuid() == 0

    @property
    def hierarchy(self) -> cgroups.Hierarchy | None:
        """Where runs get their cgroups (found once), or None: rlimits only."""
        with self._hierarchy_lock:
            if not self._hierarchy_probed:
                self._hierarchy_probed = True
                if not self.use_cgroups:
                    self._hierarchy_reasons = ["cgroups turned off"]
                else:
                    try:
                        self._hierarchy, self._hierarchy_reasons = cgroups.detect(self.cgroup_parent)
                        if self._hierarchy is not None:
                            self._hierarchy.remove_stale()
                    except OSError as exc:
                        self._hierarchy, self._hierarchy_reasons = None, [str(exc)]
        return self._hierarchy

    @property
    def limits_mode(self) -> str:
        """How limits are enforced here, for the start-up line and the status: "cgroup v2 (memory,
        pids, cpu)", "cgroup v1 (...)" or "rlimits only (...)"."""
        hierarchy = self.hierarchy
        if hierarchy is not None:
            return hierarchy.describe()
        return (f"rlimits only (no writable cgroup): per-process limits, a request may use "
                f"{self.limits.processes} x memory")

    def check(self) -> None:
        """Raise SandboxUnavailable (with the reason) if the sandbox cannot be set up here.
        A working sandbox is probed once; an unavailable one again every recheck_s. Each answer
        that differs from the last is announced in one log line."""
        with self._probe_lock:
            now = self._monotonic()
            if not self._probed or (self._unavailable is not None and now - self._probed_at >= self.recheck_s):
                before, first = self._unavailable, not self._probed
                self._unavailable = self._probe()
                self._probed, self._probed_at = True, now
                if first or self._unavailable != before:
                    self._announce()
        if self._unavailable is not None:
            raise SandboxUnavailable(f"the sandbox cannot be set up here: {self._unavailable}",
                                     details={"reason": self._unavailable})

    def _announce(self) -> None:
        mode = self.limits_mode
        if self._unavailable is not None:
            log.warning("sandbox limits: %s; sandbox unavailable (untrusted code is not run): %s",
                        mode, self._unavailable)
        elif self.hierarchy is None:
            log.warning("sandbox limits: %s (%s); seccomp on", mode, "; ".join(self._hierarchy_reasons))
        else:
            log.info("sandbox limits: %s; seccomp on", mode)

    @property
    def available(self) -> bool:
        try:
            self.check()
        except SandboxUnavailable:
            return False
        return True

    def run(self, argv: Sequence[str], *, files: Mapping[str, str | bytes] | None = None,
            writable: Path | None = None, cwd: str = ".", env: dict[str, str] | None = None,
            ro_paths: Sequence[Path] = (), limits: Limits | None = None,
            timeout_s: float | None = None, cancelled: threading.Event | None = None,
            pass_fds: Sequence[int] = ()) -> SandboxResult:
        """Run argv in the sandbox with /sandbox/<cwd> as its working directory.

        files: relative path -> content, written into the fresh scratch tmpfs (not with writable).
        writable: an existing host directory mounted read-write at /sandbox instead of the tmpfs.
        env: extra environment (the host's is never passed; HOME, TMPDIR, PATH and LANG are set).
        ro_paths: extra host paths visible read-only at the same place, for this run only.
        pass_fds: descriptors the command inherits, same numbers (a report channel, suite.py).
        The wall time is the smaller of limits.wall_s and timeout_s. Raises SandboxUnavailable
        if the sandbox cannot be set up, never running the command unsandboxed."""
        self.check()
        return self._run(argv, files=files, writable=writable, cwd=cwd, env=env, ro_paths=ro_paths,
                         limits=limits or self.limits, timeout_s=timeout_s, cancelled=cancelled,
                         pass_fds=pass_fds)

    def run_tool(self, argv: Sequence[str], *, limits: Limits, timeout_s: float,
                 cancelled: threading.Event | None = None, cwd: Path | None = None,
                 env: dict[str, str] | None = None, stdin: bytes | None = None) -> SandboxResult:
        """Run a trusted tool (never the code itself) bounded like a sandboxed run, without the
        isolation: its own cgroup where there is one (a cgroup that cannot be made leaves the
        rlimits, with a warning), the rlimits, its own process group; wall time the smaller of
        limits.wall_s and timeout_s (`timed_out` at limits.wall_s is `limit == "wall"`)."""
        run = None
        hierarchy = self.hierarchy
        if hierarchy is not None:
            try:
                run = hierarchy.create(hierarchy.unique_name("tool"), _budget(limits, extra_tasks=0))
            except cgroups.CgroupError as exc:
                log.warning("%s runs with rlimits only: %s", Path(argv[0]).name, exc)
        command = list(argv)
        if os.path.isfile(self.prlimit):
            # with a cgroup, memory is the cgroup's alone: a tool then runs out of it as a kill we
            # can tell (a limit), not as an allocation failure it reports as a crash of its own
            memory = [] if run is not None else [f"--data={limits.memory_bytes}"]
            command = [self.prlimit, _cpu_rlimit(limits), *memory, f"--fsize={limits.file_bytes}",
                       f"--nofile={limits.open_files}", "--core=0", "--", *command]
        wall_s = min(limits.wall_s, timeout_s)
        try:
            result = self._execute(command, limits, run, timeout_s=wall_s, cancelled=cancelled, cwd=cwd, env=env,
                                   stdin=stdin, output_bytes=limits.output_bytes)
        finally:
            if run is not None:
                run.close()
        if result.timed_out and limits.wall_s < timeout_s:
            result = replace(result, limit="wall")
        return result

    # --- one run -----------------------------------------------------------------------------

    def _run(self, argv: Sequence[str], *, files: Mapping[str, str | bytes] | None, writable: Path | None,
             cwd: str, env: dict[str, str] | None, ro_paths: Sequence[Path], limits: Limits,
             timeout_s: float | None, cancelled: threading.Event | None,
             pass_fds: Sequence[int] = ()) -> SandboxResult:
        if writable is not None and files:
            raise ValueError("files are for the scratch tmpfs; write them into `writable` instead")
        wall_s = limits.wall_s if timeout_s is None else min(limits.wall_s, timeout_s)
        with ExitStack() as stack:
            uid = stack.enter_context(self._lease_uid())
            run = stack.enter_context(self._run_cgroup(limits))
            scratch = None if writable is not None else stack.enter_context(self._scratch(uid, limits))
            fds: list[int] = [*pass_fds]
            mounts = self._mounts(files or {}, writable, scratch, uid, list(ro_paths), limits, fds, stack)
            mounts += ["--seccomp", str(self._seccomp_fd(stack, fds))]
            command = self._command(argv, uid, limits, mounts, cwd, env or {})

            # kill the command (pid 1 of the sandbox: the kernel then kills everything in it) but
            # not bwrap, so that bwrap reaps it and no zombie is left to the host's init
            def stop(bwrap_pid: int) -> None:
                if run is not None:
                    run.kill(spare=bwrap_pid, timeout_s=2.0)
                elif self.as_root:
                    _kill_uid(uid, spare=bwrap_pid)

            result = self._execute(command, limits, run, timeout_s=wall_s, cancelled=cancelled, pass_fds=fds,
                                   output_bytes=limits.output_bytes, stop=stop)
            if run is None and self.as_root:
                _kill_uid(uid)
            if run is None and result.limit is None and result.returncode == 128 + signal.SIGKILL:
                # the command is the namespace's init: it ignores SIGXCPU, and nothing in the
                # sandbox can SIGKILL it, so without a cgroup this is its RLIMIT_CPU's hard limit
                result = replace(result, limit="cpu")
            if run is not None and result.returncode == cgroups.ENTER_FAILED \
                    and result.stderr.startswith(cgroups.ENTER_FAILED_MARK):
                raise SandboxUnavailable(f"the run's cgroup could not be entered: {result.stderr.strip()[-300:]}")
            return result

    def _execute(self, command: list[str], limits: Limits, run: cgroups.RunCgroup | None,
                 **kwargs: object) -> SandboxResult:
        """run_bounded inside `run` (entered before the command execs), watching its memory and
        CPU time; the usage is read before the cgroup goes."""
        if run is None:
            result = run_bounded(command, **kwargs)  # type: ignore[arg-type]
        else:
            def watch() -> str | None:
                return _past_limit(run.usage(), limits)

            result = run_bounded(run.enter_command(command), watch=watch, finish=run.kill,
                                 **kwargs)  # type: ignore[arg-type]
            usage = run.usage()
            result = replace(result, limit=result.limit or _past_limit(usage, limits),
                             memory_peak_bytes=usage.memory_peak_bytes, cpu_s=usage.cpu_s,
                             cgroup=tuple(str(d) for d in run.directories()))
        if result.limit is None and result.returncode in _SIGXCPU_EXITS:
            result = replace(result, limit="cpu")  # one process's RLIMIT_CPU
        return result

    @contextmanager
    def _run_cgroup(self, limits: Limits) -> Iterator[cgroups.RunCgroup | None]:
        """The run's own cgroup (killed and removed at the end); None without a hierarchy. A
        hierarchy that refuses a new cgroup fails the run closed: its limits would not hold."""
        hierarchy = self.hierarchy
        if hierarchy is None:
            yield None
            return
        try:
            run = hierarchy.create(hierarchy.unique_name("run"), _budget(limits, extra_tasks=1))
        except cgroups.CgroupError as exc:
            raise SandboxUnavailable(f"the run's cgroup cannot be set up: {exc}") from exc
        try:
            yield run
        finally:
            run.close()

    @contextmanager
    def _scratch(self, uid: int, limits: Limits) -> Iterator[Path | None]:
        """As root, a tmpfs of its own with a size and an inode limit, owned by the run's uid and
        mounted on a private directory (bound at /sandbox by bwrap); None otherwise (bwrap's own
        --tmpfs, with no inode limit)."""
        if not self.as_root:
            yield None
            return
        base = _private_dir(self.lock_dir.parent / _SCRATCH_DIR)
        point = base / str(uid)
        _unmount(point)  # left by a consumer that died mid-run
        point.mkdir(mode=0o700, exist_ok=True)
        options = (f"size={limits.tmpfs_bytes},nr_inodes={limits.tmpfs_inodes},mode=0777,"
                   f"uid={uid},gid={uid}")
        try:
            _mount_tmpfs(point, options)
        except OSError as exc:
            raise SandboxUnavailable(f"the scratch tmpfs cannot be mounted: {exc}") from exc
        try:
            yield point
        finally:
            _unmount(point)
            try:
                point.rmdir()
            except OSError:
                pass

    def _seccomp_fd(self, stack: ExitStack, fds: list[int]) -> int:
        """A descriptor bwrap reads the filter from (its --seccomp), kept open by stack."""
        if self._seccomp is None:
            self._seccomp = seccomp.build_filter(self.seccomp_library)
        handle = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 - closed by stack
        handle.write(self._seccomp)
        handle.flush()
        handle.seek(0)
        fds.append(handle.fileno())
        return handle.fileno()

    # --- building the command ---------------------------------------------------------------

    def _command(self, argv: Sequence[str], uid: int, limits: Limits, mounts: list[str], cwd: str,
                 env: dict[str, str]) -> list[str]:
        workdir = PurePosixPath(SANDBOX_DIR) / cwd
        if ".." in workdir.parts:
            raise ValueError(f"cwd {cwd!r} leaves the sandbox directory")
        command = [self.prlimit, _cpu_rlimit(limits), f"--data={limits.memory_bytes}",
                   f"--nproc={limits.processes}", f"--fsize={limits.file_bytes}",
                   f"--nofile={limits.open_files}", "--core=0", "--", self.bwrap]
        if self.as_root:
            # bwrap as root needs no user namespace (so host paths it binds need not be reachable
            # by the sandbox's uid); setpriv, inside, drops to that uid and every capability
            command += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                        "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                        "--cap-add", "CAP_SETPCAP"]
            inner = [self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
                     "--inh-caps=-all", "--bounding-set=-all", "--", *argv]
        else:
            command += ["--unshare-all", "--cap-drop", "ALL"]
            inner = list(argv)
        # --as-pid-1: bwrap's own init would report the exit status and let bwrap exit before
        # reaping it, leaving a zombie to the host's init
        command += ["--as-pid-1", "--die-with-parent", "--new-session", "--clearenv", "--ro-bind", "/usr", "/usr"]
        for link, target in _SYSTEM_LINKS.items():
            if Path(link).exists():
                command += ["--symlink", target, link]
        command += ["--proc", "/proc", "--dev", "/dev", *mounts, "--chdir", str(workdir)]
        variables = {"HOME": SANDBOX_DIR, "TMPDIR": SANDBOX_DIR, "PATH": "/usr/local/bin:/usr/bin:/bin",
                     "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **env}
        for name, value in variables.items():
            command += ["--setenv", name, value]
        return command + ["--remount-ro", "/", "--", *inner]

    def _mounts(self, files: Mapping[str, str | bytes], writable: Path | None, scratch: Path | None, uid: int,
                ro_paths: list[Path], limits: Limits, fds: list[int], stack: ExitStack) -> list[str]:
        """bwrap's mount arguments; the files' descriptors go to fds, kept open by stack."""
        mounts: list[str] = []
        for path in (*self.ro_paths, *ro_paths):
            resolved = Path(path).resolve()
            if not resolved.exists():
                raise ValueError(f"read-only path {path} does not exist")
            # bwrap as root makes missing parents 0700: the sandbox's uid could not reach the path
            for ancestor in reversed(resolved.parents[:-1]):
                mounts += ["--perms", "0755", "--dir", str(ancestor)]
            mounts += ["--ro-bind", str(resolved), str(resolved)]
        if writable is not None:
            writable = Path(writable).resolve()
            if not writable.is_dir():
                raise ValueError(f"writable directory {writable} does not exist")
            if self.as_root:
                _chown_tree(writable, uid)
            return mounts + ["--bind", str(writable), SANDBOX_DIR]
        if scratch is not None:
            mounts += ["--bind", str(scratch), SANDBOX_DIR]
        else:
            mounts += ["--perms", "0700", "--size", str(limits.tmpfs_bytes), "--tmpfs", SANDBOX_DIR]
        made: set[str] = set()
        for name, content in sorted(files.items()):
            relative = PurePosixPath(name)
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                raise ValueError(f"file name {name!r} must be a relative path inside the sandbox")
            for parent in reversed(relative.parents[:-1]):
                if str(parent) not in made:
                    made.add(str(parent))
                    mounts += ["--dir", f"{SANDBOX_DIR}/{parent}"]
            # an unnamed temporary file: bwrap (inside the run's cgroup, so the pages are the
            # run's) copies it into the scratch; nothing stays on disk
            handle = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 - closed by stack
            handle.write(content.encode("utf-8") if isinstance(content, str) else content)
            handle.flush()
            handle.seek(0)
            fds.append(handle.fileno())
            mounts += ["--perms", "0644", "--file", str(handle.fileno()), f"{SANDBOX_DIR}/{relative}"]
        return mounts

    # --- probing and uids --------------------------------------------------------------------

    def _probe(self) -> str | None:
        for tool in ([self.setpriv] if self.as_root else []) + [self.prlimit, self.bwrap]:
            if not (os.path.isfile(tool) and os.access(tool, os.X_OK)):
                return f"{tool} is missing (install bubblewrap and util-linux: scripts/system-deps.sh)"
        try:
            self._seccomp = seccomp.build_filter(self.seccomp_library)
        except seccomp.SeccompUnavailable as exc:
            return f"the seccomp filter cannot be built: {exc}"
        try:
            self._sweep_scratch()
        except (OSError, SandboxUnavailable) as exc:
            return str(exc)
        probe = replace(self.limits, wall_s=10.0)
        try:
            result = self._run(["/usr/bin/cat", "probe"], files={"probe": "ok"}, writable=None, cwd=".", env=None,
                               ro_paths=(), limits=probe, timeout_s=None, cancelled=None)
        except (OSError, SandboxUnavailable) as exc:
            return exc.message if isinstance(exc, SandboxUnavailable) else str(exc)
        if result.returncode != 0 or result.stdout != "ok":
            reason = (result.stderr.strip() or f"exit status {result.returncode}").splitlines()[-1]
            return f"bwrap failed: {reason}"
        return None

    @contextmanager
    def _lease_uid(self) -> Iterator[int]:
        """An unused uid from the pool, held (flock) until the run is over."""
        if not self.as_root:
            yield os.getuid()
            return
        for uid in self.uids:
            handle = self._try_lock(uid)
            if handle is None:
                continue
            try:
                _kill_uid(uid)  # a run of a consumer that died may have left something
                yield uid
            finally:
                handle.close()
            return
        raise SandboxUnavailable(f"all {len(self.uids)} sandbox uids are in use")

    def _try_lock(self, uid: int) -> IO[str] | None:
        """uid's lock file, locked (closing it unlocks), or None if another run holds it."""
        _private_dir(self.lock_dir)
        handle = open(self.lock_dir / str(uid), "a+")  # noqa: SIM115 - the caller closes it
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return handle

    def _sweep_scratch(self) -> None:
        """Unmount the scratches that consumers which died mid-run left mounted (their uid is
        free again): a tmpfs keeps its pages until it is unmounted."""
        base = self.lock_dir.parent / _SCRATCH_DIR
        if not self.as_root or not base.is_dir():
            return
        for entry in os.scandir(base):
            if not entry.name.isdigit() or (handle := self._try_lock(int(entry.name))) is None:
                continue
            try:
                _unmount(Path(entry.path))
                os.rmdir(entry.path)
            except OSError as exc:
                log.warning("cannot remove the stale sandbox scratch %s: %s", entry.path, exc)
            finally:
                handle.close()


def _budget(limits: Limits, *, extra_tasks: int) -> cgroups.Budget:
    """The cgroup's share of limits; extra_tasks for what the chain adds (bwrap's own process)."""
    return cgroups.Budget(memory_bytes=limits.memory_bytes, processes=limits.processes + extra_tasks,
                          cpu_cores=limits.cpu_cores)


def _cpu_rlimit(limits: Limits) -> str:
    """SIGXCPU (which we can tell from any other end) at cpu_s; SIGKILL a second later for a
    process that ignores it."""
    return f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}"


def _past_limit(usage: cgroups.Usage, limits: Limits) -> str | None:
    if usage.oom_kills:
        return "memory"
    if usage.cpu_s >= limits.cpu_s:
        return "cpu"
    return None


# --- mounts ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _mount_tmpfs(point: Path, options: str) -> None:
    if _libc.mount(b"genesis-scratch", os.fsencode(point), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                   options.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount tmpfs on {point}: {os.strerror(code)}")


def _unmount(point: Path) -> None:
    """Lazily unmount point if something is mounted there."""
    if _libc.umount2(os.fsencode(point), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):
            raise OSError(code, f"umount {point}: {os.strerror(code)}")


def _private_dir(path: Path) -> Path:
    """path as a directory of ours alone (0700): never one that someone else made or a symlink,
    since it sits in the shared temporary directory."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise SandboxUnavailable(f"{path} is not a directory of the consumer's own user")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


# --- processes ------------------------------------------------------------------------------


class _Reader:
    """Drains a pipe in a thread, keeping at most `limit` bytes."""

    def __init__(self, pipe: IO[bytes], limit: int):
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.truncated = False
        self.thread = threading.Thread(target=self._drain, args=(pipe,), daemon=True)
        self.thread.start()

    def _drain(self, pipe: IO[bytes]) -> None:
        with pipe:
            while chunk := pipe.read1(65536):  # type: ignore[attr-defined]
                room = self.limit - self.size
                if room > 0:
                    self.chunks.append(chunk[:room])
                    self.size += min(room, len(chunk))
                if len(chunk) > room:
                    self.truncated = True

    def join(self) -> None:
        self.thread.join(timeout=5)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")


def _feed(pipe: IO[bytes], data: bytes) -> None:
    try:
        with pipe:
            pipe.write(data)
    except (BrokenPipeError, OSError):
        pass  # the process exited without reading everything: its business


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _uid_processes(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as status:
                for line in status:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry.name))
                        break
        except OSError:
            continue
    return pids


def _kill_uid(uid: int, spare: int | None = None) -> None:
    """SIGKILL every process running as uid (but spare) until none is left: the uid is ours alone."""
    for _ in range(100):
        pids = [pid for pid in _uid_processes(uid) if pid != spare]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def _chown_tree(root: Path, uid: int) -> None:
    os.chown(root, uid, uid, follow_symlinks=False)
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(directory, name), uid, uid, follow_symlinks=False)

