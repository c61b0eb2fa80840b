"""Which tests a risk level runs, for each runner the project knows, and what the result says of it.

A request with no `test_command` runs the repository's own runner (suite.default_test_command:
`mix test`, `node --test` or pytest), narrowed by its risk level's TestSelection:

- pytest: the selection's directories that exist (tests/unit, ...), else its marker expression;
- ExUnit (`mix test`): the test files of the changed paths (`lib/foo/bar.ex` selects
  `test/foo/bar_test.exs` when it exists; a changed `*_test.exs` selects itself), with the tags
  to exclude (`--exclude slow`: `@tag :slow`, `@moduletag :slow`, `@describetag :slow`);
- node (`node --test`): the test files whose subject is a changed file (`src/calc.js` selects
  `test/calc.test.js`, `test/calc.js`, `src/calc-test.mjs`, ...; a changed test file selects itself).

The same selection runs at the baseline and after the change, so only files present at the
baseline are selected (a test file the change adds runs only with the whole suite). A selection
that runs no test at all falls back to the whole suite; an explicit `test_command` runs as given.
The result's `selection` says which one ran (Selected.as_json)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from genesis_pgflow.suite import NO_TESTS_COLLECTED, TestRun, default_test_command, runner_of
from genesis_pgflow.workspace import Workspace


@dataclass(frozen=True)
class TestSelection:
    """What one risk level narrows a suite to. pytest: the directories among `paths` that exist,
    else the `marker` expression. ExUnit: the changed paths' test files when `changed_tests`, with
    `mix test --exclude TAG` for each of `exclude_tags`. node: the changed paths' test files when
    `changed_tests`. Nothing at all means the whole suite."""

    __test__ = False  # not a pytest test class, whatever its name

    paths: tuple[str, ...] = ()
    marker: str | None = None
    exclude_tags: tuple[str, ...] = ()
    changed_tests: bool = False

    def pytest_args(self, root: Path) -> list[str]:
        present = [p for p in self.paths if (root / p).is_dir() and not (root / p).is_symlink()]
        if present:
            return present
        return ["-m", self.marker] if self.marker else []

    def exunit_args(self, root: Path, changed: Sequence[str]) -> list[str]:
        files = exunit_test_files(root, changed) if self.changed_tests else []
        return [*files, *(arg for tag in self.exclude_tags for arg in ("--exclude", tag))]

    def node_args(self, root: Path, changed: Sequence[str]) -> list[str]:
        return node_test_files(root, changed) if self.changed_tests else []


# low: unit tests, and for ExUnit and node just the tests of what changed; medium: unit and
# integration tests; high: the whole suite. pytest by path when the repository has tests/unit and
# tests/integration, else by marker; ExUnit by tag.
DEFAULT_SELECTION: Mapping[str, TestSelection] = {
    "low": TestSelection(("tests/unit",), "not integration and not slow and not e2e",
                         ("integration", "slow", "e2e"), changed_tests=True),
    "medium": TestSelection(("tests/unit", "tests/integration"), "not slow and not e2e", ("slow", "e2e")),
    "high": TestSelection(),
}


@dataclass(frozen=True)
class Selected:
    """The command an experiment runs at both commits and the arguments its risk level added:
    `by` says how they were chosen (test_command, whole suite, paths, marker, changed paths, tags,
    changed paths and tags); `instead_of` is the selection that ran no test, if the whole suite
    replaced it."""

    command: tuple[str, ...]
    args: tuple[str, ...] = ()
    by: str = "whole suite"
    instead_of: Selected | None = None

    def whole_suite(self) -> Selected:
        return Selected(self.command, (), "whole suite", self)

    def as_json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"command": list(self.command), "by": self.by, "args": list(self.args)}
        if self.instead_of is not None:
            shown["selected_nothing"] = {"by": self.instead_of.by, "args": list(self.instead_of.args)}
        return shown


def select_tests(selection: TestSelection, root: Path, test_command: Sequence[str] | None,
                 changed: Sequence[str]) -> Selected:
    """The tests an experiment runs in the copy at `root` (its baseline), given the request's
    test_command and the paths its change touches."""
    if test_command is not None:
        return Selected(tuple(test_command), (), "test_command")
    command = tuple(default_test_command(root))
    runner = runner_of(command)
    if runner == "pytest":
        args = selection.pytest_args(root)
        by = "paths" if args and args[0] != "-m" else "marker"
    elif runner == "mix":
        args = selection.exunit_args(root, changed)
        files, tags = args[0:1] != ["--exclude"], "--exclude" in args
        by = "changed paths and tags" if files and tags else "changed paths" if files else "tags"
    else:
        args = selection.node_args(root, changed)
        by = "changed paths"
    return Selected(command, tuple(args), by) if args else Selected(command)


def selected_nothing(selected: Selected, run: TestRun) -> bool:
    """True when a narrowed run ran no test (then both runs use the whole suite): pytest collected
    none (its exit status 5), or another runner's whole report counted none (every test excluded)."""
    if not selected.args or selected.by == "test_command" or run.test_count:
        return False
    if run.counted_by == "pytest-plugin":
        return run.result.returncode == NO_TESTS_COLLECTED
    return run.measured


def changed_paths(workspace: Workspace, files: Sequence[str] | None, patch: str | None) -> list[str]:
    """The repository paths a change touches: its files, or every path (old and new) of its patch."""
    return workspace.patch_paths(patch) if patch is not None else list(files or [])


# --- the test files of changed paths --------------------------------------------------------


def _plain_file(root: Path, relative: str) -> bool:
    """A regular file in the copy, reached without a symlink, whose name cannot pass for an option."""
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("-") or ".." in parts or PurePosixPath(relative).is_absolute():
        return False
    path = root.joinpath(*parts)
    here = root
    for part in parts:
        here = here / part
        if here.is_symlink():
            return False
    return path.is_file()


def exunit_test_files(root: Path, changed: Sequence[str]) -> list[str]:
    """`lib/foo/bar.ex` -> `test/foo/bar_test.exs`; a changed `test/**/*_test.exs` -> itself; each
    only if it is a file at the baseline."""
    found: list[str] = []
    for path in changed:
        parts = PurePosixPath(path).parts
        if len(parts) >= 2 and parts[0] == "lib" and parts[-1].endswith(".ex"):
            candidate = PurePosixPath("test", *parts[1:-1], parts[-1][: -len(".ex")] + "_test.exs").as_posix()
        elif len(parts) >= 2 and parts[0] == "test" and parts[-1].endswith("_test.exs"):
            candidate = PurePosixPath(*parts).as_posix()
        else:
            continue
        if _plain_file(root, candidate):
            found.append(candidate)
    return sorted(dict.fromkeys(found))


# as the node entry (reporters/genesis_node_entry.mjs) and Node 20's `node --test` find test files
_NODE_TEST_EXTENSIONS = (".js", ".mjs", ".cjs")
_NODE_SOURCE_EXTENSIONS = (*_NODE_TEST_EXTENSIONS, ".ts", ".mts", ".cts", ".jsx", ".tsx")
_NODE_TEST_NAME = re.compile(r"^test$|^test-.+|.+[.\-_]test$")
_NODE_MAX_FILES = 100_000


def _split_extension(name: str, extensions: Sequence[str]) -> str | None:
    for extension in extensions:
        if name.endswith(extension) and len(name) > len(extension):
            return name[: -len(extension)]
    return None


def _node_subject(relative: str) -> str | None:
    """The source stem a node test file tests (`calc` for test/calc.test.js, test/calc.js,
    src/calc-test.mjs, test-calc.cjs), or None if `relative` is not a test file."""
    parts = PurePosixPath(relative).parts
    stem = _split_extension(parts[-1], _NODE_TEST_EXTENSIONS) if parts else None
    if stem is None or "node_modules" in parts:
        return None
    if not _NODE_TEST_NAME.match(stem) and "test" not in parts[:-1]:
        return None
    for suffix in (".test", "-test", "_test"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    if stem.startswith("test-"):
        return stem[len("test-"):]
    return None if stem == "test" else stem


def node_test_files(root: Path, changed: Sequence[str]) -> list[str]:
    """The repository's node test files (outside node_modules and hidden folders) that test one of
    the changed files, or are one."""
    subjects: set[str] = set()
    itself: set[str] = set()
    for path in changed:
        name = PurePosixPath(path).name
        stem = _split_extension(name, _NODE_SOURCE_EXTENSIONS)
        if _node_subject(path) is not None:
            itself.add(PurePosixPath(path).as_posix())
        elif stem is not None:
            subjects.add(stem)
    found = [path for path in itself if _plain_file(root, path)]
    if subjects:
        seen = 0
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "node_modules" and not d.startswith("."))
            for name in names:
                seen += 1
                relative = Path(folder, name).relative_to(root).as_posix()
                if _node_subject(relative) in subjects and _plain_file(root, relative):
                    found.append(relative)
            if seen > _NODE_MAX_FILES:
                break
    return sorted(dict.fromkeys(found))

