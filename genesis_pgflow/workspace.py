"""An experiment's sandbox copy of a repository: cloned at a base ref, changed, committed, rolled back.

Layout under the sandboxes directory (settings.sandboxes_dir):

    <experiment_id>/                 the working tree: what the test suite sees (at /sandbox)
    .gitdirs/<experiment_id>.git     its git directory, kept apart from the working tree

The repository is untrusted, and so is everything its test suite does. The test suite runs in a
sandbox whose only writable place is the working tree (handed to the sandbox's uid), so the git
directory lives elsewhere: code under test can never plant hooks, filter drivers or fsmonitor
commands in the config that our own git commands read. The working tree's `.git` file (a
"gitdir:" pointer, so that `git -C <sandbox_path> log` works for a person) is rewritten after
every run and never trusted: every git command here names the git directory and the working tree
explicitly.

Every git command also runs with:
- an environment of our own: no system or global config, no inherited GIT_* variables, only the
  `file` transport, no prompts, no optional locks (so that reading the original repository never
  writes to it);
- `-c core.hooksPath=/dev/null -c core.fsmonitor=false` and friends, so that no hook and no
  fsmonitor command runs, whatever a repository's own config says; filter, textconv and merge
  drivers are stripped from the clone's config (a fresh clone has none, and nothing but us can
  write it).

The original repository is only ever read: `rev-parse` to resolve the base ref and a
`clone --no-local --no-hardlinks` (objects copied through upload-pack, never hard-linked).

Plain `git` subprocesses rather than GitPython: GitPython merges the consumer's whole environment
(GIT_DIR, GIT_CONFIG_* and the like included) into every command and offers no way to drop a
variable, and a clean environment is the point here.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from genesis_pgflow.errors import PermanentError

GIT = "/usr/bin/git"
GIT_DIRS = ".gitdirs"
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
    """The repository cannot be read, or is not a git repository."""

    code = "repository_unavailable"


class BaseRefNotFound(PermanentError):
    """The base ref does not name a commit of the repository."""

    code = "base_ref_not_found"


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


def git_environment(ceiling: Path | None = None) -> dict[str, str]:
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
        "GIT_ALLOW_PROTOCOL": "file",
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
        extra_config: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run one hardened git command; raise `error` (with git's message) when it fails."""
    env = git_environment(ceiling=cwd.resolve().parent if cwd is not None and git_dir is None else None)
    if git_dir is not None:
        env["GIT_DIR"] = str(git_dir)
    if work_tree is not None:
        env["GIT_WORK_TREE"] = str(work_tree)
    argv = [GIT]
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


# --- the workspace --------------------------------------------------------------------------


class Workspace:
    """One experiment's sandbox copy. `create()` clones; the methods change, commit, run-clean and
    roll back the copy; nothing here ever writes to the original repository."""

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

    def create(self, repo: str | Path, base_ref: str = "HEAD", *, timeout_s: float = GIT_TIMEOUT_S) -> str:
        """Clone repo at base_ref into the sandbox (replacing a previous attempt's copy) and check
        out branch experiment/<id> there; return the baseline commit."""
        source = Path(repo)
        if not source.is_dir():
            raise RepositoryUnavailable(f"repository {repo} is not a directory this consumer can read",
                                        details={"repo": str(repo)})
        found = source_git(source, ["rev-parse", "--git-dir"], check=False)
        if found.returncode != 0:
            raise RepositoryUnavailable(f"{repo} is not a git repository", details={"repo": str(repo)})
        resolved = source_git(source, ["rev-parse", "--verify", "--quiet", "--end-of-options",
                                       f"{base_ref}^{{commit}}"], check=False)
        baseline = resolved.stdout.strip()
        if resolved.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40,64}", baseline):
            raise BaseRefNotFound(f"base_ref {base_ref!r} is not a commit of {repo}",
                                  details={"repo": str(repo), "base_ref": base_ref})
        self.remove()
        self.git_dir.parent.mkdir(parents=True, exist_ok=True)
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        git(["clone", "--quiet", "--no-local", "--no-hardlinks", "--no-checkout", "--template=",
             f"--separate-git-dir={self.git_dir}", "--", str(source.resolve()), str(self.path)],
            cwd=self.sandboxes_dir, error=RepositoryUnavailable, timeout_s=timeout_s)
        self.strip_executable_config()
        checkout = self.git("checkout", "--quiet", "-B", self.branch, baseline, check=False)
        if checkout.returncode != 0:
            raise BaseRefNotFound(f"base_ref {base_ref!r} ({baseline[:12]}) is not reachable from a ref "
                                  f"of {repo}", details={"repo": str(repo), "base_ref": base_ref})
        self.baseline_commit = baseline
        self.restore(baseline)
        return baseline

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
        remove_tree(self.path)
        remove_tree(self.git_dir)


def _terminated(patch: str) -> str:
    return patch if patch.endswith("\n") else patch + "\n"


def branch_name(experiment_id: str) -> str:
    """`experiment/<id>`, or `experiment/<hash of id>` for an id git refuses in a ref name."""
    name = f"experiment/{experiment_id}"
    if ".." in experiment_id or experiment_id.endswith((".lock", ".")) or "@{" in experiment_id:
        return f"experiment/{hashlib.sha1(experiment_id.encode()).hexdigest()[:16]}"
    return name
