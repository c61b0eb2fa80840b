"""Running untrusted code and test suites: limits, isolation, cleanup.

A command runs as

    prlimit (CPU time, memory, processes, file size, open files)
      -> bwrap (new pid, network, ipc, uts and mount namespaces; --die-with-parent; --as-pid-1)
        -> setpriv (an unprivileged uid of its own, no new privileges, no capabilities left)
          -> the command

each one exec()ing the next, so the whole chain is one process of ours, started in its own
process group. (bwrap runs as root and needs no user namespace, so the host paths it binds need
not be reachable by the sandbox's uid; without root, bwrap makes a user namespace instead and
setpriv is skipped.) Inside the sandbox the command sees only a read-only /usr (with the /bin,
/lib, /lib64 and /sbin links), /proc, a minimal /dev, any extra read-only paths it is given, and
`/sandbox`, its working directory and the only writable place:

- by default a fresh tmpfs of `Limits.tmpfs_bytes`, into which `files` are copied; it vanishes
  with the sandbox, so nothing is written on the host;
- or `writable`, an existing host directory bind-mounted read-write (e.g. an experiment's copy
  of a repository). When the consumer runs as root that directory is handed (chowned) to the
  sandbox's uid, so that the code can write there.

No network (not even loopback to the host's PostgreSQL), none of the host's files but /usr.
At the end (normal exit, timeout or cancellation) the process group is killed, and so is any
process still running under the run's uid: nothing is left behind.

Each concurrent run takes a uid of its own from `uids` (locked with flock, so that several
consumer processes can share a machine): RLIMIT_NPROC counts per uid, so runs sharing one uid
would share one process budget. Without root the sandbox runs as the consumer's own user, and
the process limit then counts that user's other processes too.

    sandbox = Sandbox()
    sandbox.check()                      # SandboxUnavailable if bwrap cannot run here
    result = sandbox.run(["/usr/bin/python3", "main.py"], files={"main.py": code},
                         timeout_s=ctx.remaining(), cancelled=ctx.cancelled)
    result.returncode, result.stdout, result.timed_out

`run_bounded` runs a trusted tool (an analyser) the same way minus the isolation: own process
group, bounded output, killed on timeout or cancellation.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import IO

from genesis_pgflow.errors import SandboxUnavailable

SANDBOX_DIR = "/sandbox"
_SYSTEM_LINKS = {"/bin": "usr/bin", "/sbin": "usr/sbin", "/lib": "usr/lib", "/lib64": "usr/lib64"}


@dataclass(frozen=True)
class Limits:
    """What one sandboxed run may use. memory_bytes is RLIMIT_DATA (heap and private mappings:
    unlike RLIMIT_AS it does not count the address space that V8 and the BEAM reserve)."""

    cpu_s: int = 10
    memory_bytes: int = 512 * 2**20
    processes: int = 64
    file_bytes: int = 16 * 2**20
    open_files: int = 256
    wall_s: float = 30.0
    tmpfs_bytes: int = 64 * 2**20
    output_bytes: int = 1 * 2**20


@dataclass(frozen=True)
class SandboxResult:
    """returncode is None when the run was killed for running out of time or being cancelled."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    cancelled: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False


def run_bounded(argv: Sequence[str], *, timeout_s: float, cancelled: threading.Event | None = None,
                cwd: Path | None = None, env: dict[str, str] | None = None, stdin: bytes | None = None,
                output_bytes: int = 8 * 2**20, pass_fds: Sequence[int] = (),
                stop: Callable[[int], None] | None = None) -> SandboxResult:
    """Run argv in its own process group; kill the whole group on timeout, on cancellation and
    after it exits. Output beyond output_bytes per stream is dropped. `stop(pid)`, if given, is
    called first, so that the process can reap what it started before the group is killed."""
    started = time.monotonic()
    proc = subprocess.Popen(
        list(argv), cwd=cwd, env=env, start_new_session=True, pass_fds=tuple(pass_fds),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    readers = [_Reader(proc.stdout, output_bytes), _Reader(proc.stderr, output_bytes)]  # type: ignore[arg-type]
    if stdin is not None:
        threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True).start()
    timed_out = was_cancelled = False
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
        proc.wait()
        for reader in readers:
            reader.join()
    out, err = readers
    return SandboxResult(
        returncode=None if (timed_out or was_cancelled) else proc.returncode,
        stdout=out.text(), stderr=err.text(), timed_out=timed_out,
        duration_s=time.monotonic() - started, cancelled=was_cancelled,
        stdout_truncated=out.truncated, stderr_truncated=err.truncated)


class Sandbox:
    """Runs commands under bubblewrap with resource limits; see the module docstring.

    bwrap, setpriv and prlimit are paths (point bwrap at a missing file to force the sandbox
    to be unavailable); uids is the pool of unprivileged uids handed out to concurrent runs;
    ro_paths are host paths every run sees read-only at the same place (besides /usr)."""

    def __init__(self, limits: Limits = Limits(), *, bwrap: str = "/usr/bin/bwrap",
                 setpriv: str = "/usr/bin/setpriv", prlimit: str = "/usr/bin/prlimit",
                 uids: range = range(1_900_000_000, 1_900_000_256),
                 ro_paths: Sequence[Path] = (), lock_dir: Path | None = None):
        self.limits = limits
        self.bwrap, self.setpriv, self.prlimit = bwrap, setpriv, prlimit
        self.uids = uids
        self.ro_paths = tuple(Path(p) for p in ro_paths)
        self.lock_dir = lock_dir or Path(tempfile.gettempdir()) / "genesis-sandbox-uids"
        self._probe_lock = threading.Lock()
        self._unavailable: str | None = None
        self._probed = False

    @property
    def as_root(self) -> bool:
        return os.geteuid() == 0

    def check(self) -> None:
        """Raise SandboxUnavailable (with the reason) if the sandbox cannot be set up here.
        The probe runs once; its answer is kept."""
        with self._probe_lock:
            if not self._probed:
                self._unavailable = self._probe()
                self._probed = True
        if self._unavailable is not None:
            raise SandboxUnavailable(f"the sandbox cannot be set up here: {self._unavailable}",
                                     details={"reason": self._unavailable})

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
            timeout_s: float | None = None, cancelled: threading.Event | None = None) -> SandboxResult:
        """Run argv in the sandbox with /sandbox/<cwd> as its working directory.

        files: relative path -> content, written into the fresh scratch tmpfs (not with writable).
        writable: an existing host directory mounted read-write at /sandbox instead of the tmpfs.
        env: extra environment (the host's is never passed; HOME, TMPDIR, PATH and LANG are set).
        ro_paths: extra host paths visible read-only at the same place, for this run only.
        The wall time is the smaller of limits.wall_s and timeout_s. Raises SandboxUnavailable
        if the sandbox cannot be set up, never running the command unsandboxed."""
        self.check()
        limits = limits or self.limits
        if writable is not None and files:
            raise ValueError("files are for the scratch tmpfs; write them into `writable` instead")
        wall_s = limits.wall_s if timeout_s is None else min(limits.wall_s, timeout_s)
        with ExitStack() as stack:
            uid = stack.enter_context(self._lease_uid())
            fds: list[int] = []
            mounts = self._mounts(files or {}, writable, uid, list(ro_paths), limits.tmpfs_bytes, fds, stack)
            command = self._command(argv, uid, limits, mounts, cwd, env or {})
            # kill the command (pid 1 of the sandbox: the kernel then kills everything in it) but
            # not bwrap, so that bwrap reaps it and no zombie is left to the host's init
            stop = (lambda bwrap_pid: _kill_uid(uid, spare=bwrap_pid)) if self.as_root else None
            try:
                return run_bounded(command, timeout_s=wall_s, cancelled=cancelled, pass_fds=fds,
                                   output_bytes=limits.output_bytes, stop=stop)
            finally:
                if self.as_root:
                    _kill_uid(uid)

    # --- building the command ---------------------------------------------------------------

    def _command(self, argv: Sequence[str], uid: int, limits: Limits, mounts: list[str], cwd: str,
                 env: dict[str, str]) -> list[str]:
        workdir = PurePosixPath(SANDBOX_DIR) / cwd
        if ".." in workdir.parts:
            raise ValueError(f"cwd {cwd!r} leaves the sandbox directory")
        command = [self.prlimit, f"--cpu={limits.cpu_s}", f"--data={limits.memory_bytes}",
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

    def _mounts(self, files: Mapping[str, str | bytes], writable: Path | None, uid: int, ro_paths: list[Path],
                tmpfs_bytes: int, fds: list[int], stack: ExitStack) -> list[str]:
        """bwrap's mount arguments; the files' descriptors go to fds, kept open by stack."""
        mounts: list[str] = []
        for path in (*self.ro_paths, *ro_paths):
            resolved = Path(path).resolve()
            if not resolved.exists():
                raise ValueError(f"read-only path {path} does not exist")
            mounts += ["--ro-bind", str(resolved), str(resolved)]
        if writable is not None:
            writable = Path(writable).resolve()
            if not writable.is_dir():
                raise ValueError(f"writable directory {writable} does not exist")
            if self.as_root:
                _chown_tree(writable, uid)
            return mounts + ["--bind", str(writable), SANDBOX_DIR]
        mounts += ["--perms", "0777" if self.as_root else "0700", "--size", str(tmpfs_bytes), "--tmpfs", SANDBOX_DIR]
        made: set[str] = set()
        for name, content in sorted(files.items()):
            relative = PurePosixPath(name)
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                raise ValueError(f"file name {name!r} must be a relative path inside the sandbox")
            for parent in reversed(relative.parents[:-1]):
                if str(parent) not in made:
                    made.add(str(parent))
                    mounts += ["--dir", f"{SANDBOX_DIR}/{parent}"]
            # an unnamed temporary file: bwrap copies it into the tmpfs; nothing stays on disk
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
        probe = replace(self.limits, wall_s=10.0)
        fds: list[int] = []
        try:
            with ExitStack() as stack:
                uid = stack.enter_context(self._lease_uid())
                mounts = self._mounts({"probe": "ok"}, None, uid, [], probe.tmpfs_bytes, fds, stack)
                command = self._command(["/usr/bin/cat", "probe"], uid, probe, mounts, ".", {})
                result = run_bounded(command, timeout_s=probe.wall_s, pass_fds=fds)
        except (OSError, SandboxUnavailable) as exc:
            return str(exc)
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
        self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for uid in self.uids:
            handle = open(self.lock_dir / str(uid), "a+")  # noqa: SIM115 - held across the yield
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                _kill_uid(uid)  # a run of a consumer that died may have left something
                yield uid
            finally:
                handle.close()
            return
        raise SandboxUnavailable(f"all {len(self.uids)} sandbox uids are in use")


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

