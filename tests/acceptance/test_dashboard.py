"""The dashboard in a real browser: Debian's chromium driven by Playwright, against a real consumer
and `genesis dashboard` processes on a real PostgreSQL holding runs, failures (one whose message
carries `<script>` and a secret), a dead letter and an experiment, all made by the real consumer or
the real store. Keeps a screenshot (build/test-artifacts/dashboard.png, or GENESIS_DASHBOARD_SCREENSHOT)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from genesis_pgflow.messages import Failure, Outcome
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.experiments import ExperimentStart, PgExperimentRecords
from genesis_pgflow.store.queue import PgQueueStore

from .conftest import Background

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHROMIUM = os.environ.get("GENESIS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(os.environ.get("GENESIS_DASHBOARD_SCREENSHOT") or ROOT / "build" / "test-artifacts" / "dashboard.png")

pytestmark = [pytest.mark.db, pytest.mark.slow]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                    "(scripts/system-deps.sh, run by `make test`, installs it)")

RULES, LLM, EXPERIMENTS = "genesis_rule_updates", "genesis_llm_config_updates", "genesis_experiment_requests"
SCRIPT_TYPE = "<script>window.pwned=1</script> api_key=sk-dashboard-secret"
DLQ_SECRET = "sk-dead-letter-secret"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send(dsn: str, queue: str, body: Any) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgmq.send(%s, %s::jsonb)", (queue, json.dumps(body)))


def count(dsn: str, sql: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        return int(row[0]) if row else 0


def http(port: int, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers or {},
                                     method="POST" if body is not None else "GET")
    try:
        with NO_PROXY.open(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def rule(i: int) -> dict[str, Any]:
    return {"type": "genesis_rule_update", "namespace": "dash", "rule_id": f"r{i}", "confidence": 0.95,
            "rule": {"when": "x"}}


@pytest.fixture
def env(db_dsn: str, genesis_home: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GENESIS_", "DATABASE_URL"))}
    return {**clean, "GENESIS_HOME": str(genesis_home), "GENESIS_DATABASE_URL": db_dsn,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # root in a container: chromium's own sandbox needs user namespaces it may not get
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox", "--no-proxy-server"])
        yield launched
        launched.close()


def made_by_the_real_parts(dsn: str, env: dict[str, str]) -> None:
    """Runs and failures by the real consumer; a dead letter and an experiment by the real store;
    messages waiting in a queue no consumer here reads."""
    for i in range(3):
        send(dsn, RULES, rule(i))
    send(dsn, RULES, {"type": SCRIPT_TYPE})
    drained = subprocess.run([str(BIN / "genesis-consume"), "--drain", "--queues", RULES, "--poll-interval-ms", "100"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert drained.returncode == 0, drained.stderr

    with Database(dsn) as db:
        queues = PgQueueStore(db, "dashboard-test:1")
        queues.send(LLM, {"type": "genesis_llm_config_update", "provider": "p", "complexity": "simple",
                          "models": ["m"], "settings": {"api_key": DLQ_SECRET}})
        [message] = queues.read(LLM, 1, 30)
        now = dt.datetime.now(dt.timezone.utc)
        failure = Failure("max_attempts_exceeded", f"gave up: <img src=x onerror=window.pwned=2> token={DLQ_SECRET}")
        assert queues.complete([Outcome(message, "dead_letter", now, now, error=failure)])
        records = PgExperimentRecords(db)
        assert records.experiment_started(ExperimentStart(
            "exp-dash-1", "inst-1", "refactor", "<b>split</b> the parser", "low", "/srv/repo", "main", "/tmp/sandbox"))
        records.experiment_finished("exp-dash-1", {
            "status": "success", "recommendation": "merge_with_review", "rolled_back": False, "baseline_commit": "abc123",
            "metrics": {"success_rate": 0.98, "regression": -0.01, "baseline_success_rate": 0.97, "test_count": 120,
                        "failures": 2, "duration_ms": 4200.0}})
    for i in range(4):
        send(dsn, EXPERIMENTS, {"type": "genesis_experiment_request", "n": i})


@contextmanager
def genesis_dashboard(env: dict[str, str], *args: str) -> Iterator[str]:
    """`genesis dashboard ARGS` running; yields its first line; stopped by SIGTERM, exit 0."""
    proc = subprocess.Popen([str(BIN / "genesis"), "dashboard", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline()
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def open_dashboard(browser: Browser, port: int) -> Page:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    scripts_run: list[str] = []
    page.on("dialog", lambda dialog: (scripts_run.append(dialog.message), dialog.dismiss()))
    page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
    expect(page.locator("body[data-loaded=yes]")).to_have_count(1, timeout=60_000)
    return page


@needs_chromium
def test_the_dashboard_shows_what_happened_and_acts_only_with_actions(
        browser: Browser, db_dsn: str, env: dict[str, str], background: Callable[..., Background]) -> None:
    made_by_the_real_parts(db_dsn, env)

    # --- served by a running consumer, beside /metrics: read-only by default ----------------------
    port = free_port()
    consumer = background(BIN / "genesis-consume", "--queues", RULES, "--metrics-port", str(port), env=env)
    consumer.wait_for_line(r"dashboard on http://127\.0\.0\.1:\d+/ \(read-only\)", timeout=120)
    page = open_dashboard(browser, port)

    experiments_card = page.locator('[data-queue="genesis_experiment_requests"]')
    expect(experiments_card.locator(".depth-now")).to_have_text("4", timeout=30_000)
    expect(page.locator('[data-queue="genesis_llm_config_updates"] .dead-now')).to_have_text("1")
    expect(page.locator('[data-queue="genesis_rule_updates"]')).to_contain_text("3 ok / 1 failed")
    assert experiments_card.locator("svg.chart polyline.depth").count() == 1
    assert page.locator('[data-queue="genesis_rule_updates"] svg.chart rect.completed').count() >= 1

    # consumers: this one alive, the drained one stopped
    consumers = page.locator("#consumers")
    expect(consumers).to_contain_text("running", timeout=30_000)
    expect(consumers).to_contain_text("stopped")

    # the failure: its code, and its message as text (the <script> shown, never run; the secret scrubbed)
    failures = page.locator("#failures")
    # newest first: the dead letter's final failure, then the consumer's refusal of the unknown type
    expect(failures.locator("td.code")).to_have_text(["max_attempts_exceeded", "unknown_type"])
    message = failures.locator("tbody tr").filter(has_text="unknown_type").locator("td.message").inner_text()
    assert "<script>window.pwned=1</script>" in message, message
    assert "sk-dashboard-secret" not in message and "[redacted]" in message
    assert page.evaluate("window.pwned") is None
    assert failures.locator("script").count() == 0 and page.locator("img[src=x]").count() == 0

    # the dead letter, its original, its error as text, its body's secret redacted
    letters = page.locator("#dead-letters")
    expect(letters).to_contain_text("genesis_llm_config_updates_dlq")
    expect(letters.locator("td.code")).to_have_text(["max_attempts_exceeded"])
    assert "<img src=x onerror=window.pwned=2>" in letters.inner_text()
    # the experiment with its metrics and recommendation
    experiments = page.locator("#experiments")
    expect(experiments.locator("td.recommendation")).to_have_text(["merge_with_review"])
    expect(experiments).to_contain_text("98.0%")
    expect(experiments).to_contain_text("<b>split</b> the parser")

    whole = page.content()
    assert DLQ_SECRET not in whole and "sk-dashboard-secret" not in whole
    assert DLQ_SECRET not in http(port, "/api/snapshot")[1]
    # read-only: no buttons, and the action routes are absent
    assert page.locator("button").count() == 0
    assert http(port, "/api/dlq/requeue", body=b"{}", headers={"Content-Type": "application/json"})[0] == 404
    assert http(port, "/metrics")[0] == 200

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    page.close()

    # --- genesis dashboard, on a machine that runs no consumer ------------------------------------
    readonly_port = free_port()
    with genesis_dashboard(env, "--port", str(readonly_port)) as first_line:
        assert "(read-only)" in first_line
        page = open_dashboard(browser, readonly_port)
        expect(page.locator("#dead-letters td.code")).to_have_text(["max_attempts_exceeded"])
        assert page.locator("button.requeue").count() == 0
        assert http(readonly_port, "/api/dlq/requeue", body=b"{}")[0] == 404
        page.close()

    acting_port = free_port()
    with genesis_dashboard(env, "--actions", "--port", str(acting_port)) as first_line:
        assert "(actions enabled)" in first_line
        # a request without the page's token, or from another origin, does nothing
        letter = json.dumps({"queue": LLM, "msg_id": 1}).encode()
        assert http(acting_port, "/api/dlq/requeue", body=letter, headers={"Content-Type": "application/json"})[0] == 403
        page = open_dashboard(browser, acting_port)
        token = page.locator('meta[name="genesis-token"]').get_attribute("content")
        assert token and len(token) >= 32
        forged = {"Content-Type": "application/json", "X-Genesis-Token": token, "Origin": "http://evil.example"}
        assert http(acting_port, "/api/dlq/requeue", body=letter, headers=forged)[0] == 403
        assert http(acting_port, "/api/snapshot", headers={"Host": "evil.example"})[0] == 421   # DNS rebinding
        assert count(db_dsn, f"SELECT count(*) FROM pgmq.q_{LLM}_dlq") == 1

        page.locator("#dead-letters button.requeue").click()
        expect(page.locator("#notice")).to_contain_text(re.compile(r"requeued as genesis_llm_config_updates \d+"))
        expect(page.locator("#dead-letters")).to_contain_text("No dead letter.", timeout=30_000)
        assert count(db_dsn, f"SELECT count(*) FROM pgmq.q_{LLM}_dlq") == 0
        assert count(db_dsn, f"SELECT count(*) FROM pgmq.q_{LLM}") == 1   # back in its queue
        page.close()

    consumer.signal(15)
    assert consumer.wait(timeout=120) == 0


def test_a_taken_dashboard_port_exits_2_with_one_line(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([str(BIN / "genesis"), "dashboard", "--port", str(port)], env=env,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: dashboard port {port} on 127.0.0.1 is already in use"]
