"""Quality for every language lizard parses: cyclomatic complexity per function."""

from __future__ import annotations

import json
from functools import partial

import lizard_languages

from genesis_pgflow.analysers import (
    Analyser,
    Analysis,
    Function,
    Toolchain,
    normalise,
    quality_analysis,
)

# run in a subprocess: lizard only tokenises the code, read from stdin
_LIZARD = """
import json, sys
import lizard
info = lizard.analyze_file.analyze_source_code(sys.argv[1], sys.stdin.read())
print(json.dumps([[f.name, f.start_line, f.cyclomatic_complexity] for f in info.function_list]))
"""


def lizard_functions(code: str, extension: str, tools: Toolchain) -> list[Function]:
    result = tools.run([tools.python, "-I", "-c", _LIZARD, f"code.{extension}"], stdin=code)
    if result.returncode != 0:
        raise RuntimeError(f"lizard failed: {result.stderr.strip()[-500:]}")
    return [Function(name, line, ccn) for name, line, ccn in json.loads(result.stdout)]


def lizard_quality(code: str, tools: Toolchain, *, extension: str) -> Analysis:
    return quality_analysis(lizard_functions(code, extension, tools))


def _languages() -> dict[str, str]:
    """lizard's languages (each by its first name; ALIASES maps the others) -> an extension."""
    found: dict[str, str] = {}
    for reader in lizard_languages.languages():
        names = getattr(reader, "language_names", None)
        if names:
            found.setdefault(normalise(names[0]), reader.ext[0])
    return found


def analysers(tools: Toolchain) -> dict[tuple[str, str], Analyser]:
    return {(name, "quality"): partial(lizard_quality, extension=ext) for name, ext in _languages().items()}

