"""The experiment's sandbox copy: isolation from the original, hardened git, changes, rollback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from genesis_pgflow.workspace import (
    UNAVAILABLE,
    PatchDoesNotApply,
    PathEscapesSandbox,
    RepoAllow,
    RepositoryUnavailable,
    Workspace,
    branch_name,
    repo_state,
)

from .gitrepos import git as plain_git
from .gitrepos import make_repo as build_repo

BASE_FILES = {
    "calc.py": "def add(a, b):\n    return a + b\n",
    "tests/unit/test_calc.py": "from calc import add\n\ndef test_add():\n    assert add(1, 2) == 3\n",
    "README.md": "calc\n",
}


def make_repo(path: Path, files: dict[str, str] = BASE_FILES) -> Path:
    return build_repo(path, files)


def create_copy(workspace: Workspace, repo: Path, base_ref: str = "HEAD", **options: object) -> str:
    """workspace.create with repo's parent folder as the one allowed root."""
    allow = RepoAllow.parse(str(repo.parent), home=workspace.sandboxes_dir.parent)
    return workspace.create(allow.resolve(str(repo)), base_ref, allow=allow, **options)  # type: ignore[arg-type]


def arm_traps(repo: Path, marker: Path) -> None:
    """Make every way a repository can make git run a program write `marker`."""
    script = f"#!/bin/sh\necho \"$0\" >> {marker}\ncat\n"
    hooks = repo / ".git" / "hooks"
    for hook in ("post-checkout", "post-commit", "pre-commit", "commit-msg", "reference-transaction",
                 "post-index-change", "pre-auto-gc", "post-rewrite"):
        (hooks / hook).write_text(script)
        (hooks / hook).chmod(0o755)
    trap = repo.parent / "trap.sh"
    trap.write_text(script)
    trap.chmod(0o755)
    with open(repo / ".git" / "config", "a") as config:
        config.write(f"[core]\n\tfsmonitor = {trap}\n[filter \"evil\"]\n\tclean = {trap}\n\tsmudge = {trap}\n"
                     f"\trequired = true\n[diff \"evil\"]\n\ttextconv = {trap}\n")


@pytest.fixture
def sandboxes(tmp_path: Path) -> Path:
    return tmp_path / "home" / "sandboxes"


@pytest.fixture
def source(tmp_path: Path):
    """The original repository; at teardown it must be exactly as it was (HEAD, status, tree)."""
    repo = make_repo(tmp_path / "source")
    before = repo_state(repo)
    yield repo
    assert repo_state(repo) == before


def test_copy_is_at_base_ref_on_its_own_branch(tmp_path: Path, sandboxes: Path) -> None:
    source = make_repo(tmp_path / "source")
    first = plain_git(source, "rev-parse", "HEAD").strip()
    plain_git(source, "checkout", "-q", "-b", "later")
    plain_git(source, "commit", "-qam", "second", "--allow-empty")
    (source / "calc.py").write_text("# uncommitted edit in the original\n")
    before = repo_state(source)
    workspace = Workspace(sandboxes, "exp-1")

    baseline = create_copy(workspace, source, "HEAD~1")
    assert repo_state(source) == before

    assert baseline == first == workspace.head()
    assert workspace.status() == ""
    assert workspace.path == sandboxes / "exp-1"
    assert (workspace.path / "calc.py").read_text() == BASE_FILES["calc.py"]
    assert workspace.git("symbolic-ref", "--short", "HEAD").stdout.strip() == "experiment/exp-1"
    assert not (workspace.path / ".git").is_dir()  # the git directory lives out of the tests' reach
    assert workspace.git_dir.is_dir() and not workspace.git_dir.is_relative_to(workspace.path)
    # the copy shares no file with the original (no hard links into its object store)
    for obj in workspace.git_dir.rglob("*"):
        if obj.is_file():
            assert os.stat(obj).st_nlink == 1


def test_files_change_is_committed_and_rolled_back(source: Path, sandboxes: Path) -> None:
    workspace = Workspace(sandboxes, "exp-2")
    baseline = create_copy(workspace, source)
    workspace.apply_files([("calc.py", "def add(a, b):\n    return b + a\n"), ("new/module.py", "X = 1\n")])
    change = workspace.commit("experiment exp-2")
    assert change != baseline and workspace.status() == ""
    assert workspace.git("rev-parse", "HEAD~1").stdout.strip() == baseline

    (workspace.path / "junk.txt").write_text("left by a test run")
    workspace.rollback(baseline)

    assert workspace.head() == baseline and workspace.status() == ""
    assert not (workspace.path / "new").exists() and not (workspace.path / "junk.txt").exists()


def test_patch_applies_after_check(source: Path, sandboxes: Path) -> None:
    workspace = Workspace(sandboxes, "exp-3")
    create_copy(workspace, source)
    patch = ("diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n"
             " def add(a, b):\n-    return a + b\n+    return sum((a, b))\n")
    workspace.apply_patch(patch)
    assert "sum((a, b))" in (workspace.path / "calc.py").read_text()


def test_patch_that_does_not_apply_is_refused_untouched(source: Path, sandboxes: Path) -> None:
    workspace = Workspace(sandboxes, "exp-4")
    create_copy(workspace, source)
    patch = "--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a * b\n+    return 0\n"
    with pytest.raises(PatchDoesNotApply) as caught:
        workspace.apply_patch(patch)
    assert caught.value.code == "patch_does_not_apply"
    assert workspace.status() == ""


@pytest.mark.parametrize("path", ["../outside.py", "/etc/passwd", "a/../../x", ".git/hooks/post-commit",
                                  "sub/.GIT/config", ".git"])
def test_file_paths_outside_the_copy_are_refused(source: Path, sandboxes: Path, tmp_path: Path, path: str) -> None:
    workspace = Workspace(sandboxes, "exp-5")
    create_copy(workspace, source)
    with pytest.raises(PathEscapesSandbox) as caught:
        workspace.apply_files([(path, "pwned\n")])
    assert caught.value.code == "path_escapes_sandbox"
    assert not (tmp_path / "home" / "outside.py").exists()
    assert workspace.status() == ""


def test_a_path_through_a_symlink_out_of_the_copy_is_refused(tmp_path: Path, sandboxes: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    repo = make_repo(tmp_path / "source")
    (repo / "escape").symlink_to(outside)
    plain_git(repo, "add", "escape")
    plain_git(repo, "commit", "-qm", "a symlink out")
    with pytest.raises(PathEscapesSandbox, match="escape"):
        create_copy(Workspace(sandboxes, "exp-6"), repo)
    assert list(outside.iterdir()) == []


def test_a_symlink_inside_the_copy_is_fine_but_writing_through_one_out_is_not(tmp_path: Path,
                                                                              sandboxes: Path) -> None:
    repo = make_repo(tmp_path / "source")
    (repo / "alias.py").symlink_to("calc.py")
    plain_git(repo, "add", "alias.py")
    plain_git(repo, "commit", "-qm", "an inner symlink")
    workspace = Workspace(sandboxes, "exp-7")
    create_copy(workspace, repo)
    workspace.apply_files([("alias.py", "X = 2\n")])
    assert (workspace.path / "calc.py").read_text() == "X = 2\n"
    # a symlink a test run planted (the copy is restored before changes are applied, but a
    # symlink found at apply time is still refused)
    (workspace.path / "planted").symlink_to(tmp_path)
    with pytest.raises(PathEscapesSandbox):
        workspace.apply_files([("planted/evil.py", "pwned\n")])
    assert not (tmp_path / "evil.py").exists()


def test_a_patch_creating_a_symlink_out_is_refused(source: Path, sandboxes: Path) -> None:
    workspace = Workspace(sandboxes, "exp-8")
    create_copy(workspace, source)
    patch = ("diff --git a/out b/out\nnew file mode 120000\n--- /dev/null\n+++ b/out\n@@ -0,0 +1 @@\n"
             "+/etc\n\\ No newline at end of file\n")
    with pytest.raises(PathEscapesSandbox):
        workspace.apply_patch(patch)


def test_a_patch_reaching_out_with_dotdot_is_refused(source: Path, sandboxes: Path, tmp_path: Path) -> None:
    workspace = Workspace(sandboxes, "exp-9")
    create_copy(workspace, source)
    patch = "--- /dev/null\n+++ b/../../../escaped.py\n@@ -0,0 +1 @@\n+pwned\n"
    with pytest.raises((PathEscapesSandbox, PatchDoesNotApply)):
        workspace.apply_patch(patch)
    assert not list(tmp_path.rglob("escaped.py"))


def test_hooks_fsmonitor_and_filters_of_the_repository_never_run(tmp_path: Path, sandboxes: Path) -> None:
    repo = make_repo(tmp_path / "source", {**BASE_FILES, ".gitattributes": "* filter=evil diff=evil\n"})
    marker = tmp_path / "marker"
    arm_traps(repo, marker)
    before = repo_state(repo)
    workspace = Workspace(sandboxes, "exp-10")

    baseline = create_copy(workspace, repo)
    workspace.apply_files([("calc.py", "X = 3\n")])
    workspace.commit("change")
    workspace.rollback(baseline)

    assert not marker.exists()
    assert repo_state(repo) == before


def test_a_test_run_planting_git_config_in_the_copy_changes_nothing(source: Path, sandboxes: Path,
                                                                    tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    workspace = Workspace(sandboxes, "exp-11")
    baseline = create_copy(workspace, source)
    # what code under test could do: point .git at a git directory of its own, with a hook
    evil = workspace.path / "evil"
    (evil / "hooks").mkdir(parents=True)
    plain_git(evil.parent, "init", "-q", "--bare", "evil2")
    (workspace.path / ".git").unlink()
    (workspace.path / ".git").write_text(f"gitdir: {workspace.path / 'evil2'}\n")
    hook = workspace.path / "evil2" / "hooks" / "post-commit"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)

    workspace.restore(baseline)
    workspace.apply_files([("calc.py", "X = 4\n")])
    workspace.commit("change")

    assert not marker.exists()
    assert (workspace.path / ".git").read_text() == f"gitdir: {workspace.git_dir}\n"
    assert workspace.head() != baseline


def test_unknown_repository_and_base_ref_are_one_error(tmp_path: Path, source: Path, sandboxes: Path) -> None:
    (tmp_path / "plain").mkdir()
    for repo, ref in [(tmp_path / "missing", "HEAD"), (tmp_path / "plain", "HEAD"), (source, "no-such-branch"),
                      (source, "--output=/tmp/x")]:
        with pytest.raises(RepositoryUnavailable) as caught:
            create_copy(Workspace(sandboxes, "exp-12"), repo, ref)
        assert (caught.value.code, caught.value.message, caught.value.details) == (
            "repository_unavailable", UNAVAILABLE, {})
    assert not (sandboxes / "exp-12").exists()
    assert not Path("/tmp/x").exists()


def test_a_second_attempt_replaces_the_first_copy(source: Path, sandboxes: Path) -> None:
    first = Workspace(sandboxes, "exp-13")
    create_copy(first, source)
    (first.path / "leftover").write_text("x")
    again = Workspace(sandboxes, "exp-13")
    create_copy(again, source)
    assert not (again.path / "leftover").exists() and again.status() == ""


def test_branch_names_git_would_refuse_are_hashed() -> None:
    assert branch_name("exp-1") == "experiment/exp-1"
    assert branch_name("a..b").startswith("experiment/") and ".." not in branch_name("a..b")
    assert not branch_name("x.lock").endswith(".lock")


def test_git_ignores_the_consumers_own_git_environment(source: Path, sandboxes: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    config = tmp_path / "evil.gitconfig"
    config.write_text(f"[core]\n\thooksPath = {tmp_path}\n[alias]\n\tstatus = !touch {marker}\n")
    (tmp_path / "post-commit").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (tmp_path / "post-commit").chmod(0o755)
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "core.hooksPath")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", str(tmp_path))
    workspace = Workspace(sandboxes, "exp-14")
    baseline = create_copy(workspace, source)
    workspace.apply_files([("calc.py", "X = 5\n")])
    assert workspace.commit("change") != baseline
    assert not marker.exists()
