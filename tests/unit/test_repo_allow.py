"""GENESIS_REPO_ALLOW: which repositories an experiment may copy, one error for every refusal,
private copies, the copy's size cap and the capped scratch of a test run, checked on the host."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from genesis_pgflow.workspace import (
    UNAVAILABLE,
    RepoAllow,
    RepositoryTooLarge,
    RepositoryUnavailable,
    Workspace,
    tree_size,
)

from .gitrepos import git, make_repo

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, another user's view)")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The one allowed root; GENESIS_HOME lies under it, to show it is refused all the same."""
    (tmp_path / "allowed").mkdir()
    return tmp_path / "allowed"


@pytest.fixture
def home(root: Path) -> Path:
    return root / "home"


@pytest.fixture
def allow(root: Path, home: Path) -> RepoAllow:
    return RepoAllow.parse(f"{root}, https://git.example.com/acme/, ssh://git@git.example.com/acme", home=home)


def refused(allow: RepoAllow, repo: str) -> RepositoryUnavailable:
    with pytest.raises(RepositoryUnavailable) as caught:
        allow.resolve(repo)
    return caught.value


def copy(allow: RepoAllow, home: Path, repo: str, experiment_id: str = "exp-1", base_ref: str = "HEAD",
         max_bytes: int | None = None) -> Workspace:
    workspace = Workspace(home / "sandboxes", experiment_id)
    workspace.create(allow.resolve(repo), base_ref, allow=allow, max_bytes=max_bytes)
    return workspace


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            and not p.is_symlink()}


# --- the setting -----------------------------------------------------------------------------


def test_the_setting_is_parsed_into_roots_and_url_prefixes(tmp_path: Path) -> None:
    allow = RepoAllow.parse(" /srv/repos/ ,file:///data/git, https://github.com/acme/,, git://mirror.local/x ",
                            home=tmp_path)
    assert allow.roots == (Path("/srv/repos"), Path("/data/git"))
    assert allow.prefixes == ("https://github.com/acme/", "git://mirror.local/x")
    assert RepoAllow.parse("", home=tmp_path).empty and not allow.empty


@pytest.mark.parametrize("entry", ["relative/path", "ftp://host/x", "https://", "/srv/../etc", "ext::sh"])
def test_an_unusable_entry_is_a_configuration_error(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ValueError, match="GENESIS_REPO_ALLOW"):
        RepoAllow.parse(entry, home=tmp_path)


def test_an_empty_setting_allows_nothing(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"a": "1"})
    allow = RepoAllow.parse("", home=tmp_path / "home")
    assert refused(allow, str(repo)).message == UNAVAILABLE


# --- refusals --------------------------------------------------------------------------------


def test_allowed_paths_and_urls(allow: RepoAllow, root: Path) -> None:
    local = allow.resolve(str(root / "team" / "repo"))
    assert (local.protocol, local.local, local.root) == ("file", root / "team" / "repo", root)
    assert allow.resolve(f"file://{root}/repo").local == root / "repo"
    assert allow.resolve("https://git.example.com/acme/app.git").protocol == "https"
    assert allow.resolve("ssh://git@git.example.com/acme/app.git").protocol == "ssh"


@pytest.mark.parametrize("repo", [
    "/etc", "relative/repo", "{root}/../outside", "{root}/a/../../outside", "{home}/sandboxes/exp-0",
    "{home}/sandboxes/.gitdirs/exp-0.git", "{home}", "file://{home}/sandboxes/exp-0", "file:///etc",
    "file://otherhost{root}/repo", "{root}/repo\n", "https://git.example.com/acme-evil/app.git",
    "https://git.example.com/other/app.git", "https://user:token@git.example.com/acme/app.git",
    "https://git.example.com/acme/app.git?x=1", "https://git.example.com/acme/%2e%2e/secret",
    "git://git.example.com/acme/app.git", "ssh://git@git.example.com/acmeX/app.git",
    "git.example.com:acme/app.git", "ext::sh -c touch% /tmp/pwned", "fd::17",
])
def test_every_refusal_has_one_text(allow: RepoAllow, root: Path, home: Path, repo: str) -> None:
    error = refused(allow, repo.format(root=root, home=home))
    assert (error.code, error.message, error.details) == ("repository_unavailable", UNAVAILABLE, {})
    assert not Path("/tmp/pwned").exists()


def test_a_symlink_under_a_root_leading_out_of_it_or_into_home_is_refused(allow: RepoAllow, root: Path,
                                                                         home: Path, tmp_path: Path) -> None:
    outside = make_repo(tmp_path / "outside", {"secret": "s3cr3t"})
    (home / "sandboxes" / "exp-0").mkdir(parents=True)
    (root / "out").symlink_to(outside)
    (root / "in-home").symlink_to(home / "sandboxes" / "exp-0")
    (root / "parent").symlink_to(tmp_path)
    for repo in (root / "out", root / "in-home", root / "parent" / "outside"):
        assert refused(allow, str(repo)).message == UNAVAILABLE


@as_root
def test_a_root_only_repository_is_refused_exactly_like_a_missing_path(allow: RepoAllow, home: Path,
                                                                       tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    secret = make_repo(private / "vault", {"secret.txt": "TOP-SECRET-4711\n"})
    secret.chmod(0o700)
    assert secret.stat().st_uid == 0

    hidden, missing = refused(allow, str(secret)), refused(allow, str(private / "nothing-here"))

    assert (hidden.code, hidden.message, hidden.details) == (missing.code, missing.message, missing.details)
    assert not home.exists()    # nothing was copied, not even a sandboxes directory was made


def test_a_repository_whose_git_directory_or_objects_lie_outside_the_root_is_refused(
        allow: RepoAllow, root: Path, home: Path, tmp_path: Path) -> None:
    outside = make_repo(tmp_path / "outside", {"secret.txt": "TOP-SECRET\n"})
    pointer = root / "pointer"
    pointer.mkdir()
    (pointer / ".git").write_text(f"gitdir: {outside / '.git'}\n")
    borrowing = make_repo(root / "borrowing", {"a": "1"})
    (borrowing / ".git" / "objects" / "info" / "alternates").write_text(f"{outside / '.git' / 'objects'}\n")
    for repo in (pointer, borrowing):
        with pytest.raises(RepositoryUnavailable) as caught:
            copy(allow, home, str(repo))
        assert caught.value.message == UNAVAILABLE
    assert not list((home / "sandboxes").glob("exp-*"))


def test_missing_unreadable_and_bad_refs_are_the_same_error(allow: RepoAllow, root: Path, home: Path) -> None:
    repo = make_repo(root / "repo", {"a": "1"})
    (root / "plain").mkdir()
    errors = []
    for path, ref in [(root / "missing", "HEAD"), (root / "plain", "HEAD"), (repo, "nope"), (repo, "-x"),
                      (repo, "HEAD~5")]:
        with pytest.raises(RepositoryUnavailable) as caught:
            copy(allow, home, str(path), base_ref=ref)
        errors.append((caught.value.code, caught.value.message, caught.value.details))
    assert all(error == ("repository_unavailable", UNAVAILABLE, {}) for error in errors)


# --- copies -----------------------------------------------------------------------------------


def test_a_file_url_under_a_root_is_fetched_shallowly_at_base_ref(allow: RepoAllow, root: Path, home: Path) -> None:
    repo = make_repo(root / "repo", {"a.py": "A = 1\n"})
    first = git(repo, "rev-parse", "HEAD").strip()
    (repo / "a.py").write_text("A = 2\n")
    git(repo, "commit", "-qam", "second")

    workspace = copy(allow, home, f"file://{repo}", base_ref=first)

    assert workspace.head() == first and (workspace.path / "a.py").read_text() == "A = 1\n"
    assert workspace.git("rev-list", "--count", "HEAD").stdout.strip() == "1"     # shallow: one commit
    assert (workspace.git_dir / "shallow").is_file()


@as_root
def test_copies_are_private_to_the_consumers_user(allow: RepoAllow, root: Path, home: Path) -> None:
    repo = make_repo(root / "repo", {"secret.txt": "TOP-SECRET\n", "pkg/mod.py": "X = 1\n"})
    workspace = copy(allow, home, str(repo))
    sandboxes = home / "sandboxes"
    assert stat.S_IMODE(sandboxes.stat().st_mode) == 0o700
    assert stat.S_IMODE((sandboxes / ".gitdirs").stat().st_mode) == 0o700
    assert stat.S_IMODE(workspace.git_dir.stat().st_mode) == 0o700
    # another local user reaches neither the copy nor its git directory
    for target in (workspace.path / "secret.txt", workspace.git_dir / "HEAD", workspace.path / "pkg" / "mod.py"):
        seen = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat",
                               str(target)], capture_output=True, text=True, check=False)
        assert seen.returncode != 0 and "Permission denied" in seen.stderr and "TOP-SECRET" not in seen.stdout


def test_a_copy_over_the_size_cap_is_refused_and_nothing_is_kept(allow: RepoAllow, root: Path, home: Path) -> None:
    noise = make_repo(root / "noise", {"blob.bin": ""})
    (noise / "blob.bin").write_bytes(os.urandom(3 * 2**20))     # incompressible: a 3 MB pack
    git(noise, "commit", "-qam", "noise")
    with pytest.raises(RepositoryTooLarge) as caught:
        copy(allow, home, str(noise), max_bytes=2**20)
    assert caught.value.code == "repository_too_large"
    assert tree_size(home) == 0

    # 64 MB of zeros pack into a few KB: refused from the tree's listing, before any checkout
    bomb = make_repo(root / "bomb", {"zeros.bin": ""})
    with open(bomb / "zeros.bin", "wb") as handle:
        handle.truncate(64 * 2**20)
    git(bomb, "add", "-A")
    git(bomb, "commit", "-qm", "zeros")
    with pytest.raises(RepositoryTooLarge):
        copy(allow, home, str(bomb), max_bytes=8 * 2**20)
    assert tree_size(home) == 0 and not (home / "sandboxes" / "exp-1").exists()

    # empty files cost nothing in bytes but an inode (and a block) each: charged too
    empties = make_repo(root / "empties", {f"e{i}": "" for i in range(300)})
    with pytest.raises(RepositoryTooLarge):
        copy(allow, home, str(empties), max_bytes=2**20)
    assert tree_size(home) == 0

    small = copy(allow, home, str(make_repo(root / "small", {"a": "1"})), max_bytes=2**20)
    assert (small.path / "a").read_text() == "1"


# --- the scratch of a test run ---------------------------------------------------------------


@pytest.fixture
def workspace(allow: RepoAllow, root: Path, home: Path) -> Iterator[Workspace]:
    workspace = copy(allow, home, str(make_repo(root / "repo", {"a.py": "A = 1\n", "pkg/b.py": "B = 2\n"})))
    yield workspace
    workspace.unmount_scratch()


@as_root
def test_a_test_runs_writes_stay_on_a_capped_scratch(workspace: Workspace) -> None:
    before = files_under(workspace.path)
    with workspace.scratch(max_bytes=16 * 2**20, max_inodes=500) as scratch:
        assert (scratch / "a.py").read_text() == "A = 1\n"      # the copy, seen through the overlay
        (scratch / "a.py").write_text("changed")
        written = 0
        with pytest.raises(OSError) as full:
            with open(scratch / "big.bin", "wb") as handle:
                for _ in range(100):                          # 100 MB asked, 16 MB given
                    handle.write(b"\0" * 2**20)
                    handle.flush()
                    os.fsync(handle.fileno())
                    written += 2**20
        assert full.value.errno == 28 and written <= 16 * 2**20
        (scratch / "big.bin").unlink()
        made = 0
        with pytest.raises(OSError) as no_inodes:
            for made in range(5000):                          # 5000 files asked, 500 inodes given
                (scratch / f"f{made}").touch()
        assert no_inodes.value.errno == 28 and made <= 500 + 32   # (+ one per entry of the copy)
        assert os.path.ismount(scratch)
    assert files_under(workspace.path) == before               # nothing of it reached the copy
    assert not workspace.scratch_dir.exists()


@as_root
def test_a_scratch_a_killed_consumer_left_mounted_is_unmounted(workspace: Workspace) -> None:
    left = workspace.scratch(max_bytes=2**20, max_inodes=100)
    scratch = left.__enter__()          # and never left: the consumer "died" here
    (scratch / "junk").write_text("x")
    assert os.path.ismount(scratch)
    workspace.remove()                  # what the next attempt (or the cleanup) does first
    assert not os.path.ismount(scratch) and not workspace.scratch_dir.exists() and not workspace.path.exists()


def test_without_root_the_scratch_is_the_copy_itself(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with workspace.scratch(max_bytes=2**20, max_inodes=100) as scratch:
        assert scratch == workspace.path


def test_nothing_is_fetched_from_a_url_when_the_host_is_unreachable(tmp_path: Path) -> None:
    # https, ssh and git cannot reach any network here: only their refusal and their failing
    # fetch are checked; both are the one error
    home = tmp_path / "home"
    allow = RepoAllow.parse("https://127.0.0.1:9/acme/", home=home)
    with pytest.raises(RepositoryUnavailable) as caught:
        copy(allow, home, "https://127.0.0.1:9/acme/app.git")
    assert caught.value.message == UNAVAILABLE
    assert not (home / "sandboxes" / "exp-1").exists()
    shutil.rmtree(home, ignore_errors=True)
