"""An experiment's sandbox copy of a repository: which repositories may be copied, cloned at a
base ref, changed, committed, rolled back, and the capped scratch its test runs write to.

Which repositories (RepoAllow, the setting GENESIS_REPO_ALLOW): a request's `repo` is checked
against the allowed local roots and URL prefixes before anything of it is read (no stat, no git);
a local path is then resolved (symlinks followed) and must still lie under the same root, and
nothing under GENESIS_HOME is ever allowed (another experiment's copy or git directory). Every
refused or unusable repository (not allowed, missing, unreadable, not git, base_ref unknown) is
the same RepositoryUnavailable, whose text and details never depend on what exists on the host;
the precise reason goes to the consumer's log only.

Layout under the sandboxes directory (settings.sandboxes_dir, mode 0700, and so are .gitdirs,
.scratch and every git directory; a working tree is 0711, reachable only through its 0700 parent):

    <experiment_id>/                 the working tree: what the test suite sees (at /sandbox)
    .gitdirs/<experiment_id>.git     its git directory, kept apart from the working tree
    .scratch/<experiment_id>/        while a test run lasts: a size- and inode-capped tmpfs and
                                     the overlay of the working tree the run writes to

Only the consumer's user can read a copy: the sandbox's uid reaches it because bubblewrap, run as
root, binds it (its parents need not be traversable).

The repository is untrusted, and so is everything its test suite does. The test suite runs in a
sandbox whose only writable place is the working tree (seen through the scratch overlay), so the
git directory lives elsewhere: code under test can never plant hooks, filter drivers or fsmonitor
commands in the config that our own git commands read. The working tree's `.git` file (a
"gitdir:" pointer, so that `git -C <sandbox_path> log` works for a person) is rewritten after
every run and never trusted: every git command here names the git directory and the working tree
explicitly.

Every git command also runs with:
- an environment of our own: no system or global config, no inherited GIT_* variables, only the
  transport of the repository's allowed scheme, no prompts, no credential helpers, no optional
  locks (so that reading the original repository never writes to it);
- `-c core.hooksPath=/dev/null -c core.fsmonitor=false` and friends, so that no hook and no
  fsmonitor command runs, whatever a repository's own config says; filter, textconv and merge
  drivers are stripped from the clone's config (a fresh clone has none, and nothing but us can
  write it).

The original repository is only ever read: `rev-parse` to resolve the base ref, and a shallow
`fetch --depth=1` of that one commit into the copy's own git directory (objects copied through
upload-pack, never hard-linked), its pack bounded by RLIMIT_FSIZE.

Plain `git` subprocesses rather than GitPython: GitPython merges the consumer's whole environment
(GIT_DIR, GIT_CONFIG_* and the like included) into every command and offers no way to drop a
variable, and a clean environment is the point here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from genesis_pgflow.errors import PermanentError, SandboxUnavailable

log = logging.getLogger(__name__)

GIT = "/usr/bin/git"
PRLIMIT = "/usr/bin/prlimit"
MOUNT, UMOUNT = "/usr/bin/mount", "/usr/bin/umount"
GIT_DIRS = ".gitdirs"
SCRATCH = ".scratch"
URL_SCHEMES = ("file", "https", "ssh", "git")
# What one entry of a copy's tree is charged against the copy's size cap: a block on disk, and it
# bounds the entries a test run's scratch copies up as metadata (about 1 KiB of memory each).
ENTRY_BYTES = 4096
# The working tree's own mode: bwrap, root without CAP_DAC_OVERRIDE by then, must chdir into it
# once it belongs to the sandbox's uid; its parent (0700) keeps every other user out.
COPY_MODE = 0o711
GIT_TIMEOUT_S = 120.0
SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Config given on every command line: command-line config beats the repository's own.
HARDENED_CONFIG = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.untrackedCache=false",
    "core.attributesFile=/dev/null",
    "core.pager=cat",
    "core.askPass=",
    "core.sshCommand=false",
    "core.autocrlf=false",
    "core.symlinks=true",
    "credential.helper=",
    "protocol.allow=never",
    "protocol.file.allow=always",
    "submodule.recurse=false",
    "fetch.recurseSubmodules=false",
    "gc.auto=0",
    "maintenance.auto=false",
    "commit.gpgSign=false",
    "tag.gpgSign=false",
    "advice.detachedHead=false",
    "init.defaultBranch=main",
    "user.name=Genesis",
    "user.email=genesis@localhost",
    # the original repository may belong to another user; we read it with all of the above
    "safe.directory=*",
)
# config sections that make git run a program; a clone has none, and none may appear
_EXECUTABLE_CONFIG = re.compile(
    r"^(filter\..*|diff\..*\.(textconv|command)|merge\..*\.driver|core\.(fsmonitor|hookspath|sshcommand|"
    r"gitproxy|editor|pager|askpass)|uploadpack\.packobjectshook|include(if)?\..*)$", re.IGNORECASE)


class RepositoryUnavailable(PermanentError):
    """The repository is not available to experiments: it is not allowed by GENESIS_REPO_ALLOW,
    or it cannot be read as a git repository with base_ref as one of its commits."""

    code = "repository_unavailable"


class RepositoryTooLarge(PermanentError):
    """The repository's copy would be larger than GENESIS_EXPERIMENT_MAX_COPY_MB."""

    code = "repository_too_large"


class PatchDoesNotApply(PermanentError):
    """The patch does not apply to the base commit."""

    code = "patch_does_not_apply"


class PathEscapesSandbox(PermanentError):
    """A path resolves outside the experiment's sandbox."""

    code = "path_escapes_sandbox"


class InvalidChange(PermanentError):
    """A change cannot be applied to the sandbox copy."""

    code = "invalid_change"


class RollbackFailed(PermanentError):
    """The sandbox copy could not be brought back to its baseline commit."""

    code = "rollback_failed"


class GitFailed(PermanentError):
    """A git command failed."""

    code = "git_failed"


# --- running git ----------------------------------------------------------------------------


def git_environment(ceiling: Path | None = None, protocol: str = "file") -> dict[str, str]:
    """A clean environment for git: nothing inherited, no system or global config."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/nonexistent",
        "XDG_CONFIG_HOME": "/nonexistent",
        "LANG": "C",
        "LC_ALL": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_SYSTEM": "/dev/null",
        "GIT_ATTR_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "/bin/false",
        "SSH_ASKPASS": "/bin/false",
        "GIT_NO_REPLACE_OBJECTS": "1",
        "GIT_ALLOW_PROTOCOL": protocol,
        "GIT_PROTOCOL_FROM_USER": "0",
        "GIT_OPTIONAL_LOCKS": "0",
        "GIT_LFS_SKIP_SMUDGE": "1",
    }
    if ceiling is not None:
        env["GIT_CEILING_DIRECTORIES"] = str(ceiling)
    return env


def git(args: Sequence[str], *, cwd: Path | None = None, git_dir: Path | None = None,
        work_tree: Path | None = None, input: str | None = None, check: bool = True,
        timeout_s: float = GIT_TIMEOUT_S, error: type[PermanentError] = GitFailed,
        extra_config: Sequence[str] = (), protocol: str = "file",
        file_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run one hardened git command; raise `error` (with git's message) when it fails.
    protocol: the one transport allowed; file_bytes: RLIMIT_FSIZE of the command (a file past it
    kills git with SIGXFSZ)."""
    env = git_environment(ceiling=cwd.resolve().parent if cwd is not None and git_dir is None else None,
                          protocol=protocol)
    if git_dir is not None:
        env["GIT_DIR"] = str(git_dir)
    if work_tree is not None:
        env["GIT_WORK_TREE"] = str(work_tree)
    argv = [] if file_bytes is None else [PRLIMIT, f"--fsize={file_bytes}", "--"]
    argv += [GIT]
    for option in (*HARDENED_CONFIG, *extra_config):
        argv += ["-c", option]
    argv += list(args)
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=env, input=input, capture_output=True, text=True, timeout=timeout_s,
            start_new_session=True, check=False)
    except subprocess.TimeoutExpired:
        raise error(f"git {args[0]} took longer than {timeout_s:.0f}s") from None
    except OSError as exc:
        raise error(f"git {args[0]} could not be started: {exc}") from None
    if check and done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}")
        raise error(f"git {args[0]}: {message.splitlines()[-1] if message else ''}",
                    details={"git": list(args), "stderr": done.stderr[-2000:]})
    return done


def source_git(repo: Path, args: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """git in the original (untrusted) repository, with every filter and textconv driver its
    config defines switched off: command-line config beats the repository's, and an empty
    command means no filter."""
    drivers = r"^(filter|diff)\..*\.(clean|smudge|process|textconv|command)$"
    listed = git(["config", "--name-only", "--get-regexp", drivers], cwd=repo, check=False).stdout.split()
    overrides: list[str] = []
    for key in dict.fromkeys(listed):
        section, _, rest = key.partition(".")
        name = rest.rpartition(".")[0]
        if section.lower() == "filter":
            overrides += [f"filter.{name}.clean=", f"filter.{name}.smudge=", f"filter.{name}.process=",
                          f"filter.{name}.required=false"]
        else:
            overrides += [f"diff.{name}.textconv=", f"diff.{name}.command="]
    return git(args, cwd=repo, extra_config=overrides, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RepoState:
    """What 'untouched' means for a repository: its HEAD, its status and its tree."""

    head: str
    status: str
    tree: str


def repo_state(repo: Path) -> RepoState:
    """HEAD, porcelain status and HEAD's tree of a repository (read-only: no index refresh)."""
    head = source_git(repo, ["rev-parse", "HEAD"]).stdout.strip()
    status = source_git(repo, ["status", "--porcelain=v1", "--ignored", "-uall"]).stdout
    tree = source_git(repo, ["rev-parse", "HEAD^{tree}"]).stdout.strip()
    return RepoState(head, status, tree)


# --- paths ----------------------------------------------------------------------------------


def inside(path: Path, root: Path) -> bool:
    """Whether path (resolved, symlinks followed) is root or lies under it."""
    resolved, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return resolved == base or base in resolved.parents


def tree_size(*roots: Path) -> int:
    """Bytes used by the regular files under roots (symlinks not followed)."""
    total = 0
    for root in roots:
        if not root.exists():
            continue
        for directory, _dirs, files in os.walk(root):
            for name in files:
                try:
                    info = os.lstat(os.path.join(directory, name))
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    total += info.st_size
    return total


def _largest_file(root: Path) -> int:
    sizes = [os.lstat(os.path.join(d, name)).st_size for d, _dirs, files in os.walk(root) for name in files]
    return max(sizes, default=0)


def remove_tree(path: Path) -> None:
    """Remove a directory tree, whatever modes the code under test left on it; never follows a
    symlink (a symlink itself is unlinked)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return

    def make_writable_and_retry(function, failed_path, _exc_info):
        parent = os.path.dirname(failed_path)
        os.chmod(parent, stat.S_IRWXU)
        if not os.path.islink(failed_path) and os.path.isdir(failed_path):
            os.chmod(failed_path, stat.S_IRWXU)
        function(failed_path)

    shutil.rmtree(path, onerror=make_writable_and_retry)


# --- which repositories a request may use ---------------------------------------------------

UNAVAILABLE = ("the repository is not available to experiments (not allowed by GENESIS_REPO_ALLOW, "
               "or not readable as a git repository with base_ref as one of its commits)")
_REF = re.compile(r"^(HEAD|[0-9a-f]{40}|[0-9a-f]{64}|[A-Za-z0-9][A-Za-z0-9._/-]*)$")


def unavailable(repo: str, reason: str) -> RepositoryUnavailable:
    """The one error of every refused or unusable repository; the reason is logged, never returned."""
    log.info("repository %s refused: %s", _loggable(repo), reason)
    return RepositoryUnavailable(UNAVAILABLE)


def _loggable(repo: str) -> str:
    """repo for the log: a URL's user information (a token?) is left out."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1<userinfo>@", repo)[:500]


def _under(path: PurePosixPath | Path, root: PurePosixPath | Path) -> bool:
    return path == root or root in path.parents


@dataclass(frozen=True)
class Source:
    """An allowed repository: what to fetch from, and (local ones) its resolved path and root."""

    repo: str                 # the request's `repo`, as given
    fetch_url: str            # what git fetches from: a resolved local path or the URL
    protocol: str             # the one transport allowed while fetching
    local: Path | None = None
    root: Path | None = None  # the resolved allowed root a local repository lies under


@dataclass(frozen=True)
class RepoAllow:
    """GENESIS_REPO_ALLOW: the local roots (absolute paths; `file://` prefixes count as roots) and
    remote URL prefixes (https://, ssh://, git://) a request's `repo` may use, and GENESIS_HOME,
    under which nothing is ever allowed. Empty: no repository at all.

        allow = RepoAllow.parse("/srv/repos, https://github.com/acme/", home=settings.home)
        source = allow.resolve(request.repo)     # RepositoryUnavailable, whatever the reason
    """

    roots: tuple[Path, ...]
    prefixes: tuple[str, ...]
    home: Path

    @classmethod
    def parse(cls, text: str, *, home: Path) -> RepoAllow:
        """The setting's comma-separated entries; ValueError names an entry that is not usable."""
        roots: list[Path] = []
        prefixes: list[str] = []
        for entry in (e.strip() for e in text.split(",")):
            if not entry:
                continue
            if entry.startswith("/"):
                roots.append(cls._root(entry))
                continue
            scheme = entry.split("://", 1)[0].lower() if "://" in entry else ""
            if scheme not in URL_SCHEMES:
                raise ValueError(f"GENESIS_REPO_ALLOW entry {entry!r} is neither an absolute path nor a "
                                 f"{', '.join(s + '://' for s in URL_SCHEMES)} URL prefix")
            if scheme == "file":
                roots.append(cls._root(urlsplit(entry).path or "/"))
            elif not urlsplit(entry).netloc:
                raise ValueError(f"GENESIS_REPO_ALLOW entry {entry!r} names no host")
            else:
                prefixes.append(entry)
        return cls(tuple(dict.fromkeys(roots)), tuple(dict.fromkeys(prefixes)), Path(home))

    @staticmethod
    def _root(path: str) -> Path:
        if ".." in PurePosixPath(path).parts:
            raise ValueError(f"GENESIS_REPO_ALLOW root {path!r} must not contain '..'")
        return Path(os.path.normpath(path))

    @property
    def empty(self) -> bool:
        return not self.roots and not self.prefixes

    def describe(self) -> str:
        return ", ".join([*map(str, self.roots), *self.prefixes]) or "(none)"

    def resolve(self, repo: str) -> Source:
        """The Source of an allowed `repo`, else RepositoryUnavailable. Nothing of the host is read
        before `repo` is lexically under an allowed root (then only that root is looked into)."""
        if any(ord(c) < 32 or c == "\x7f" for c in repo) or "\\" in repo:
            raise unavailable(repo, "control characters or backslashes")
        if repo.startswith("/"):
            return self._local(repo, repo)
        scheme = repo.split("://", 1)[0].lower() if "://" in repo else ""
        if scheme not in URL_SCHEMES:
            raise unavailable(repo, "neither an absolute path nor a file://, https://, ssh:// or git:// URL")
        url = urlsplit(repo)
        if url.query or url.fragment or "%" in repo or ".." in PurePosixPath(url.path).parts:
            raise unavailable(repo, "URL with a query, fragment, percent-escape or '..'")
        if scheme == "file":
            if url.netloc not in ("", "localhost"):
                raise unavailable(repo, "file:// URL naming a host")
            return self._local(repo, url.path)
        if scheme != "ssh" and "@" in url.netloc:
            raise unavailable(repo, "URL with user information (credentials belong to the consumer's config)")
        if ":" in url.netloc.rpartition("@")[0]:
            raise unavailable(repo, "URL with a password")
        for prefix in self.prefixes:
            if repo == prefix or (repo.startswith(prefix) and (prefix.endswith("/") or repo[len(prefix)] == "/")):
                return Source(repo, repo, scheme)
        raise unavailable(repo, f"no URL prefix of GENESIS_REPO_ALLOW ({', '.join(self.prefixes) or 'none'}) "
                                "matches")

    def _local(self, repo: str, path: str) -> Source:
        given = PurePosixPath(path)
        if not given.is_absolute() or ".." in given.parts:
            raise unavailable(repo, "not an absolute path without '..'")
        lexical = Path(os.path.normpath(path))
        home = Path(os.path.normpath(self.home))
        if _under(lexical, home):
            raise unavailable(repo, "under GENESIS_HOME")
        for root in self.roots:
            if not _under(lexical, root):
                continue
            # only now is anything read: the root's own symlinks are the operator's choice, the
            # ones under it must not lead out of it
            real_root, real = Path(os.path.realpath(root)), Path(os.path.realpath(lexical))
            if not _under(real, real_root):
                raise unavailable(repo, f"resolves to {real}, outside the allowed root {root}")
            if _under(real, Path(os.path.realpath(home))):
                raise unavailable(repo, "resolves under GENESIS_HOME")
            return Source(repo, str(real), "file", real, real_root)
        raise unavailable(repo, f"not under an allowed root of GENESIS_REPO_ALLOW ({self.describe()})")

    def admits(self, path: Path, source: Source) -> bool:
        """Whether a path git reports for a local source (its git directory, an alternate object
        store) stays under the source's root and out of GENESIS_HOME."""
        real = Path(os.path.realpath(path))
        return (source.root is not None and _under(real, source.root)
                and not _under(real, Path(os.path.realpath(self.home))))


# --- the workspace --------------------------------------------------------------------------


class Workspace:
    """One experiment's sandbox copy. `create()` fetches it from an allowed source; the methods
    change, commit, run-clean and roll back the copy, and `scratch()` is where a test run writes;
    nothing here ever writes to the original repository."""

    def __init__(self, sandboxes_dir: Path, experiment_id: str):
        if not SANDBOX_ID.match(experiment_id):
            raise InvalidChange(f"experiment_id {experiment_id!r} is not usable as a directory name")
        self.sandboxes_dir = Path(sandboxes_dir)
        self.experiment_id = experiment_id
        self.path = self.sandboxes_dir / experiment_id
        self.git_dir = self.sandboxes_dir / GIT_DIRS / f"{experiment_id}.git"
        self.branch = branch_name(experiment_id)
        self.baseline_commit: str | None = None

    # -- git in the copy -----------------------------------------------------------------------

    def git(self, *args: str, input: str | None = None, check: bool = True,
            error: type[PermanentError] = GitFailed) -> subprocess.CompletedProcess[str]:
        return git(list(args), cwd=self.path, git_dir=self.git_dir, work_tree=self.path, input=input,
                   check=check, error=error)

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").stdout.strip()

    def status(self) -> str:
        """Porcelain status, untracked and ignored files included; '' when the copy is clean."""
        return self.git("status", "--porcelain=v1", "--ignored", "-uall").stdout

    def size_bytes(self) -> int:
        return tree_size(self.path, self.git_dir)

    # -- creating ------------------------------------------------------------------------------

    def create(self, source: Source, base_ref: str = "HEAD", *, allow: RepoAllow, max_bytes: int | None = None,
               timeout_s: float = GIT_TIMEOUT_S) -> str:
        """Fetch the one commit base_ref names from an allowed source (RepoAllow.resolve) into the
        sandbox, replacing a previous attempt's copy, and check out branch experiment/<id> there;
        return the baseline commit. RepositoryUnavailable (the one text) for any unusable source;
        RepositoryTooLarge when the copy would exceed max_bytes (nothing of it is kept)."""
        baseline = self.local_baseline(source, base_ref, allow) if source.local is not None else None
        if baseline is None and (not _REF.match(base_ref) or ".." in base_ref or base_ref.endswith((".lock", "/"))):
            raise unavailable(source.repo, f"base_ref {base_ref!r} is not HEAD, a full commit id or a ref name")
        self.remove()
        self.make_private_dirs()
        try:
            git(["init", "--quiet", "--template=", f"--separate-git-dir={self.git_dir}", str(self.path)],
                cwd=self.sandboxes_dir)
            self.path.chmod(COPY_MODE)
            self.git_dir.chmod(0o700)
            return self._fetch(source, baseline or base_ref, max_bytes, timeout_s)
        except BaseException:
            self.remove()
            raise

    def make_private_dirs(self) -> None:
        """The sandboxes directory and its git directories, readable by the consumer's user only."""
        for folder in (self.sandboxes_dir, self.sandboxes_dir / GIT_DIRS):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if stat.S_IMODE(folder.stat().st_mode) != 0o700:
                folder.chmod(0o700)

    @staticmethod
    def local_baseline(source: Source, base_ref: str, allow: RepoAllow) -> str:
        """The commit base_ref names in an allowed local repository, after checking that its git
        directories (and alternate object stores) stay under the allowed root."""
        assert source.local is not None
        try:
            found = source_git(source.local, ["rev-parse", "--absolute-git-dir", "--git-common-dir"], check=False)
            if found.returncode != 0 or len(found.stdout.splitlines()) != 2:
                raise unavailable(source.repo, "not a git repository")
            git_dir, common = (Path(source.local, line) for line in found.stdout.splitlines())
            stores = [git_dir, common]
            alternates = common / "objects" / "info" / "alternates"
            if alternates.is_file():
                stores += [Path(common / "objects", line.strip()) for line in
                           alternates.read_text(errors="replace").splitlines() if line.strip()]
            outside = [str(p) for p in stores if not allow.admits(p, source)]
            if outside:
                raise unavailable(source.repo, f"its git directory or object store {outside[0]} lies outside "
                                               "the allowed root or under GENESIS_HOME")
            resolved = source_git(source.local, ["rev-parse", "--verify", "--quiet", "--end-of-options",
                                                 f"{base_ref}^{{commit}}"], check=False)
        except (GitFailed, OSError) as exc:
            raise unavailable(source.repo, f"cannot be read: {exc}") from None
        baseline = resolved.stdout.strip()
        if resolved.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40,64}", baseline):
            raise unavailable(source.repo, f"base_ref {base_ref!r} is not a commit of it")
        return baseline

    def _fetch(self, source: Source, ref: str, max_bytes: int | None, timeout_s: float) -> str:
        """A shallow fetch of ref (one commit, kept as one pack bounded by max_bytes), the size of
        its tree checked against max_bytes, then the checkout."""
        config = ["fetch.unpackLimit=1", "transfer.unpackLimit=1", "fetch.writeCommitGraph=false"]
        if source.protocol == "ssh":
            config.append("core.sshCommand=ssh -o BatchMode=yes")
        fetched = git(["fetch", "--quiet", "--depth=1", "--no-tags", "--no-recurse-submodules", "--",
                       source.fetch_url, f"+{ref}:refs/genesis/base"],
                      cwd=self.path, git_dir=self.git_dir, work_tree=self.path, check=False, timeout_s=timeout_s,
                      extra_config=config, protocol=source.protocol, file_bytes=max_bytes)
        # git, or the index-pack it runs, killed by SIGXFSZ: the pack it wrote stopped at the limit
        if fetched.returncode != 0 and max_bytes is not None and (
                fetched.returncode == -signal.SIGXFSZ or _largest_file(self.git_dir) >= max_bytes):
            raise self._too_large(max_bytes, "its history at base_ref")
        if fetched.returncode != 0:
            raise unavailable(source.repo, f"fetch failed: {fetched.stderr.strip()[-300:]}")
        resolved = self.git("rev-parse", "--verify", "--quiet", "refs/genesis/base^{commit}", check=False)
        baseline = resolved.stdout.strip()
        if resolved.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40,64}", baseline):
            raise unavailable(source.repo, f"base_ref {ref!r} is not a commit")
        if max_bytes is not None:
            listed = self.git("ls-tree", "-r", "-t", "-l", "-z", "--full-tree", baseline).stdout.split("\0")
            entries = [line for line in listed if line]
            blobs = sum(int(size) for line in entries if (size := line.split("\t", 1)[0].split()[-1]).isdigit())
            total = tree_size(self.git_dir) + blobs + ENTRY_BYTES * len(entries)
            if total > max_bytes:
                raise self._too_large(max_bytes, f"{total // 2**20} MB ({len(entries)} entries)")
        self.strip_executable_config()
        self.git("checkout", "--quiet", "-B", self.branch, baseline)
        self.git("update-ref", "-d", "refs/genesis/base")
        self.baseline_commit = baseline
        self.restore(baseline)
        return baseline

    @staticmethod
    def _too_large(max_bytes: int | None, what: str) -> RepositoryTooLarge:
        limit = (max_bytes or 0) // 2**20
        return RepositoryTooLarge(f"the repository's copy would exceed GENESIS_EXPERIMENT_MAX_COPY_MB ({limit} MB): "
                                  f"{what}", details={"max_copy_mb": limit})

    def strip_executable_config(self) -> None:
        """Drop any config key that would make git run a program (defence in depth)."""
        listed = self.git("config", "--local", "--name-only", "--list").stdout.split()
        for key in sorted(set(listed)):
            if _EXECUTABLE_CONFIG.match(key):
                self.git("config", "--local", "--unset-all", key, check=False)

    # -- keeping the copy honest ---------------------------------------------------------------

    def _rewrite_git_file(self) -> None:
        pointer = self.path / ".git"
        if pointer.is_symlink() or pointer.is_file():
            pointer.unlink()
        elif pointer.exists():
            remove_tree(pointer)
        pointer.write_text(f"gitdir: {self.git_dir}\n", encoding="utf-8")

    def _reclaim(self) -> None:
        """Take back what a test run owned: the sandbox hands the tree to its own uid, and git (and
        a person looking at the copy) wants it to belong to us again."""
        me = os.geteuid()
        if me != 0:
            return
        for directory, dirnames, filenames in os.walk(self.path):
            for name in [*dirnames, *filenames, None]:
                path = directory if name is None else os.path.join(directory, name)
                if os.lstat(path).st_uid != me:
                    os.lchown(path, me, os.getegid())

    def restore(self, commit: str = "HEAD") -> None:
        """Bring the working tree back to exactly `commit` (the branch moves there): whatever a test
        run wrote, deleted or replaced (symlinks included) is undone."""
        self._reclaim()
        self._rewrite_git_file()
        self.strip_executable_config()
        self.git("reset", "--quiet", "--hard", commit)
        self.git("clean", "-q", "-ffdx")
        self.check_symlinks()

    def check_symlinks(self) -> None:
        """Refuse a working tree holding a symlink that resolves outside it."""
        for directory, dirnames, filenames in os.walk(self.path):
            for name in dirnames + filenames:
                link = Path(directory, name)
                if link.is_symlink() and not inside(link, self.path):
                    relative = link.relative_to(self.path)
                    raise PathEscapesSandbox(
                        f"{relative} is a symlink to {os.readlink(link)}, outside the sandbox",
                        details={"path": str(relative), "target": os.readlink(link)})

    # -- changing ------------------------------------------------------------------------------

    def _target(self, relative: str) -> Path:
        parts = PurePosixPath(relative).parts
        if (not parts or PurePosixPath(relative).is_absolute() or ".." in parts or "\\" in relative
                or "\0" in relative):
            raise PathEscapesSandbox(f"path {relative!r} must be a relative path inside the repository",
                                     details={"path": relative})
        if any(part.lower() == ".git" for part in parts):
            raise PathEscapesSandbox(f"path {relative!r} reaches into git's own files", details={"path": relative})
        target = self.path.joinpath(*parts)
        if not inside(target, self.path):
            raise PathEscapesSandbox(f"path {relative!r} resolves outside the sandbox (through a symlink)",
                                     details={"path": relative})
        resolved = Path(os.path.realpath(target))
        if resolved == Path(os.path.realpath(self.path)) or \
                resolved.relative_to(os.path.realpath(self.path)).parts[0].lower() == ".git":
            raise PathEscapesSandbox(f"path {relative!r} resolves to git's own files", details={"path": relative})
        return resolved

    def apply_files(self, files: Iterable[tuple[str, str]]) -> list[str]:
        """Write whole files (path, content); every path is checked before anything is written."""
        changes = [(path, content, self._target(path)) for path, content in files]
        for path, content, target in changes:
            if target.is_dir():
                raise InvalidChange(f"path {path!r} is a directory", details={"path": path})
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "w", encoding="utf-8", newline="") as handle:
                    handle.write(content)
            except (NotADirectoryError, FileExistsError) as exc:
                raise InvalidChange(f"path {path!r} cannot be written: {exc.strerror}",
                                    details={"path": path}) from None
        self.check_symlinks()
        return [path for path, _content, _target in changes]

    def check_files(self, paths: Iterable[str]) -> None:
        """Refuse, before anything is run or written, a path that leaves the sandbox."""
        for path in paths:
            self._target(path)

    def check_patch(self, patch: str) -> str:
        """`git apply --check` (-p1, else -p0) against the working tree; return the -p option that
        applies, or raise PatchDoesNotApply / PathEscapesSandbox."""
        attempts = []
        for strip in ("-p1", "-p0"):
            checked = self.git("apply", "--check", strip, "-", input=_terminated(patch), check=False)
            if checked.returncode == 0:
                return strip
            attempts.append(checked.stderr.strip())
        message = attempts[0] or "git apply --check refused the patch"
        if re.search(r"invalid path|beyond a symbolic link|outside repository", message):
            raise PathEscapesSandbox(f"the patch touches a path outside the sandbox: {message.splitlines()[0]}",
                                     details={"git_apply": message[-2000:]})
        raise PatchDoesNotApply(f"the patch does not apply to the base commit: {message.splitlines()[0]}",
                                details={"git_apply": message[-2000:]})

    def patch_paths(self, patch: str) -> list[str]:
        """The paths a patch that check_patch accepts touches (both names of a rename), as git
        reads them (`git apply --numstat -z`), for choosing the tests of what changed."""
        strip = self.check_patch(patch)
        fields = self.git("apply", "--numstat", "-z", strip, "-", input=_terminated(patch)).stdout.split("\0")
        paths: list[str] = []
        rename = 0
        for field in fields:
            if rename:
                paths.append(field)
                rename -= 1
            elif field.count("\t") >= 2:
                name = field.split("\t", 2)[2]
                if name:
                    paths.append(name)
                else:
                    rename = 2  # `added<TAB>deleted<TAB>` then the old and the new name
        return sorted(dict.fromkeys(p for p in paths if p))

    def apply_patch(self, patch: str) -> None:
        """Apply a unified diff once `git apply --check` has accepted it."""
        strip = self.check_patch(patch)
        self.git("apply", strip, "-", input=_terminated(patch), error=PatchDoesNotApply)
        self.check_symlinks()

    def commit(self, message: str) -> str:
        """Commit the working tree on the experiment branch; return the commit (hooks never run)."""
        self.strip_executable_config()
        self.git("add", "--all", "--", ".")
        self.git("commit", "--quiet", "--no-verify", "--allow-empty", "--no-gpg-sign", "-m", message)
        return self.head()

    # -- the scratch a test run writes to ------------------------------------------------------

    @property
    def scratch_dir(self) -> Path:
        return self.sandboxes_dir / SCRATCH / self.experiment_id

    @contextmanager
    def scratch(self, *, max_bytes: int, max_inodes: int) -> Iterator[Path]:
        """The directory a test run gets as /sandbox. As root: an overlay of the working tree whose
        writable layer is a tmpfs of max_bytes and max_inodes (plus one inode per entry of the
        tree, which the sandbox's change of owner copies up as metadata only), unmounted at exit:
        what the run writes never reaches the disk nor the copy, and a run past the cap gets
        ENOSPC. Without root nothing can be mounted: the working tree itself (writes then land on
        disk, bounded per file by the sandbox's RLIMIT_FSIZE only)."""
        if os.geteuid() != 0:
            yield self.path
            return
        if re.search(r"[,:\\\s]", str(self.sandboxes_dir)):
            raise SandboxUnavailable(f"the sandboxes directory {self.sandboxes_dir} holds a character that mount "
                                     "options cannot carry (',', ':', '\\\\' or a space)")
        self.unmount_scratch()
        self.make_private_dirs()
        (self.sandboxes_dir / SCRATCH).mkdir(mode=0o700, exist_ok=True)
        layer, merged = self.scratch_dir / "layer", self.scratch_dir / "merged"
        for folder in (self.scratch_dir, layer, merged):
            folder.mkdir(mode=0o700, exist_ok=True)
        entries = sum(len(dirs) + len(files) for _dir, dirs, files in os.walk(self.path)) + 16
        try:
            _mount(["-t", "tmpfs", "-o", f"size={max_bytes},nr_inodes={max_inodes + entries},mode=0700",
                    "genesis-scratch", str(layer)])
            (layer / "upper").mkdir(mode=COPY_MODE)
            (layer / "work").mkdir(mode=0o700)
            _mount(["-t", "overlay", "-o", f"lowerdir={self.path},upperdir={layer / 'upper'},"
                    f"workdir={layer / 'work'},metacopy=on", "genesis-overlay", str(merged)])
        except BaseException:
            self.unmount_scratch()
            raise
        try:
            yield merged
        finally:
            self.unmount_scratch()

    def unmount_scratch(self) -> None:
        """Unmount and remove a test run's scratch (also one a killed consumer left mounted)."""
        base = self.scratch_dir
        if not base.is_dir() or base.is_symlink():
            return
        for mount_point in (base / "merged", base / "layer"):
            for _ in range(3):
                if not os.path.ismount(mount_point):
                    break
                _umount(mount_point)
        if not any(os.path.ismount(p) for p in (base / "merged", base / "layer")):
            remove_tree(base)

    # -- rolling back and removing -------------------------------------------------------------

    def rollback(self, baseline: str) -> None:
        """`git reset --hard <baseline>` (and clean), then verify: HEAD is the baseline and the
        working tree is clean; RollbackFailed otherwise."""
        try:
            self.restore(baseline)
        except PermanentError as exc:
            raise RollbackFailed(f"rollback to {baseline[:12]} failed: {exc.message}",
                                 details={"baseline_commit": baseline}) from None
        head, dirty = self.head(), self.status()
        if head != baseline or dirty:
            raise RollbackFailed(f"after rollback HEAD is {head[:12]} (expected {baseline[:12]})"
                                 + (f" and the tree is dirty: {dirty.splitlines()[0]}" if dirty else ""),
                                 details={"baseline_commit": baseline, "head": head, "status": dirty[-2000:]})

    def remove(self) -> None:
        self.unmount_scratch()
        remove_tree(self.path)
        remove_tree(self.git_dir)


def _mount(args: Sequence[str]) -> None:
    try:
        done = subprocess.run([MOUNT, *args], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"cannot mount the test run's scratch: {exc}") from None
    if done.returncode != 0:
        raise SandboxUnavailable(f"cannot mount the test run's scratch: {done.stderr.strip()[:300]}")


def _umount(path: Path) -> None:
    """Unmount path; lazily if it is still busy (the sandbox's processes are already dead)."""
    for argv in ([UMOUNT, str(path)], [UMOUNT, "-l", str(path)]):
        if subprocess.run(argv, capture_output=True, timeout=60, check=False).returncode == 0:
            return
    log.warning("could not unmount %s", path)


def _terminated(patch: str) -> str:
    return patch if patch.endswith("\n") else patch + "\n"


def branch_name(experiment_id: str) -> str:
    """`experiment/<id>`, or `experiment/<hash of id>` for an id git refuses in a ref name."""
    name = f"experiment/{experiment_id}"
    if ".." in experiment_id or experiment_id.endswith((".lock", ".")) or "@{" in experiment_id:
        return f"experiment/{hashlib.sha1(experiment_id.encode()).hexdigest()[:16]}"
    return name
