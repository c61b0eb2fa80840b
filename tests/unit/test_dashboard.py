"""The dashboard's guards without a server: which Host headers it answers, scrubbing that holds
when applied twice, and routes that exist only with actions enabled."""

from __future__ import annotations

import socket

import pytest

from genesis_pgflow.dashboard import Dashboard, _scrubbed, host_allowed
from genesis_pgflow.messages import scrub


@pytest.mark.parametrize("header", ["127.0.0.1:8642", "[::1]:8642", "localhost:8642", "localhost", "10.1.2.3",
                                    f"{socket.gethostname()}:80", "dash.internal:8642"])
def test_the_dashboard_answers_to_this_machines_names(header: str) -> None:
    assert host_allowed(header, "dash.internal")


@pytest.mark.parametrize("header", [None, "", "evil.example", "evil.example:8642", "127.0.0.1.evil.example"])
def test_a_foreign_host_is_refused_against_dns_rebinding(header: str | None) -> None:
    assert not host_allowed(header, "127.0.0.1")


def test_scrubbing_twice_changes_nothing() -> None:
    once = scrub("gave up token=sk-1 and password: 'p w' at postgres://u:secret@h/db")
    assert "sk-1" not in once and "secret@" not in once and "p w" not in once
    assert scrub(once) == once


def test_every_string_of_a_snapshot_is_scrubbed_and_secret_fields_redacted() -> None:
    snapshot = {"failures": [{"type": "x api_key=sk-2", "details": {"token": "sk-3"}}], "n": 3}
    assert _scrubbed(snapshot) == {"failures": [{"type": "x api_key=[redacted]", "details": {"token": "[redacted]"}}],
                                   "n": 3}


def test_action_routes_exist_only_with_actions() -> None:
    where = {"dsn": "", "embedded": False, "path": None}
    read_only = Dashboard(None, None, where=where)   # type: ignore[arg-type]  # routes need no database
    assert read_only.post_routes() == {} and read_only.token == ""
    acting = Dashboard(None, None, where=where, actions=True)   # type: ignore[arg-type]
    assert "/api/dlq/requeue" in acting.post_routes() and len(acting.token) >= 32
    assert set(read_only.get_routes()) == {"/", "/dashboard", "/dashboard/app.js", "/dashboard/style.css",
                                           "/api/snapshot"}
