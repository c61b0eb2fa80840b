"""The admin CLI's pure parts: its one table printer, durations, and where --dsn may go."""

from __future__ import annotations

import argparse
import datetime as dt

import pytest

from genesis_pgflow.cli import _duration, admin_parser, table


def test_table_aligns_columns_and_right_aligns_numbers() -> None:
    rows = [{"queue": "genesis_rule_updates", "n": 7, "at": dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.timezone.utc),
             "note": "a"}, {"queue": "q", "n": 1234, "at": None, "note": "a longer note"}]
    text = table(rows, [("queue", lambda r: r["queue"]), ("n", lambda r: r["n"]), ("at", lambda r: r["at"]),
                        ("note", lambda r: r["note"])])
    assert text.splitlines() == [
        "queue                    n  at                    note",
        "genesis_rule_updates     7  2026-12-03 10:00:00Z  a",
        "q                     1234  -                     a longer note",
    ]
    assert table([], [("x", lambda r: r)], empty="(nothing)") == "(nothing)"


def test_table_escapes_control_characters_so_no_cell_forges_a_line() -> None:
    text = table([{"m": "one\ntwo\x1b[2J"}], [("m", lambda r: r["m"])])
    assert text.splitlines() == ["m", "one\\ntwo\\x1b[2J"]


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172_800),
                                           ("1w", 604_800), ("0.5h", 1800)])
def test_durations(text: str, seconds: float) -> None:
    assert _duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1y", "-1h", "yesterday"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _duration(text)


@pytest.mark.parametrize("argv", [["--dsn", "X", "db", "upgrade"], ["db", "upgrade", "--dsn", "X"],
                                  ["--dsn", "Y", "failures", "--dsn", "X"], ["dlq", "list", "code_execution_requests",
                                                                             "--dsn", "X"]])
def test_dsn_before_or_after_the_command(argv: list[str]) -> None:
    assert admin_parser().parse_args(argv).dsn == "X"


def test_no_dsn_is_none() -> None:
    assert admin_parser().parse_args(["status"]).dsn is None
