"""Issue 7's host-exhaustion attacks sent through SQL to a real consumer: each fails alone with a
clear permanent code, the consumer goes on, and nothing of the runs is left on the host."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psycopg
import pytest

from genesis_pgflow.app import App
from genesis_pgflow.cgroups import V1Hierarchy, detect
from genesis_pgflow.settings import Settings

pytestmark = [pytest.mark.db, pytest.mark.sandbox]

EIGHT_TIMES_100_MIB = """
import os, time

def test_many_processes_of_100_mib():
    for _ in range(8):
        if os.fork() == 0:
            block = bytearray(100 * 2**20)
            time.sleep(30)
            os._exit(0)
    time.sleep(30)
"""
DEEP_EXPRESSION = "x = " + "1+" * 200_000 + "1\n"  # radon dies of RecursionError on it


def send(dsn: str, body: dict) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT pgmq.send('code_execution_requests', %s::jsonb)", (json.dumps(body),)).fetchone()[0]


def own_cgroups() -> list[str]:
    """The cgroups this process's runs made that are still on the host (other processes' are theirs)."""
    hierarchy, _ = detect()
    if hierarchy is None:
        return []
    parents = hierarchy.parents.values() if isinstance(hierarchy, V1Hierarchy) else [hierarchy.parent]  # type: ignore[attr-defined]
    return [e.name for p in parents for e in os.scandir(p) if e.name.split("-")[1:2] == [str(os.getpid())]]


def test_memory_past_the_request_and_an_analyser_crash_fail_alone(db_dsn: str, genesis_home: Path) -> None:
    if detect()[0] is None:
        pytest.skip("without a writable cgroup a request's memory is only bounded per process")
    request = {"type": "code_execution_request", "language": "python"}
    send(db_dsn, {**request, "id": "memory", "analysis_type": "testing", "code": EIGHT_TIMES_100_MIB})
    send(db_dsn, {**request, "id": "crash", "analysis_type": "quality", "code": DEEP_EXPRESSION})
    send(db_dsn, {**request, "id": "fine", "analysis_type": "linting", "code": "x = 1\n"})

    app = App.open(Settings(dsn=db_dsn, home=genesis_home, drain=True, poll_interval_ms=50))
    try:
        app.consumer().run()
    finally:
        app.close()

    with psycopg.connect(db_dsn, autocommit=True) as conn:
        rows = [r[0] for r in conn.execute("SELECT message FROM pgmq.q_code_execution_results").fetchall()]
        queued = conn.execute("SELECT count(*) FROM pgmq.q_code_execution_requests").fetchone()[0]
    by_id = {(m["result"] or m["error"]["details"])["id"]: m for m in rows}
    assert set(by_id) == {"memory", "crash", "fine"} and queued == 0

    memory = by_id["memory"]
    assert memory["status"] == "failed" and memory["error"]["code"] == "resource_limit", memory["error"]
    assert memory["error"]["details"]["limit"] == "memory"
    if "memory_peak_bytes" in memory["error"]["details"]:  # with a cgroup: the kernel's high-water mark
        assert memory["error"]["details"]["memory_peak_bytes"] <= 512 * 2**20
    crash = by_id["crash"]
    assert crash["error"]["code"] == "analyser_failed" and crash["request"]["attempt"] == 1  # not retried
    assert by_id["fine"]["status"] == "completed"
    assert own_cgroups() == []
