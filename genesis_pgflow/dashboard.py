"""The dashboard: one page (static files shipped in the package, no build step) that polls a JSON
snapshot of queues, consumers, failures, dead letters and experiments; actions only when enabled.

Served by `genesis-consume --metrics-port` beside /metrics and by `genesis dashboard`. Everything
it shows is read from the database (so both show the same thing), passed through the same
redaction as the CLI (messages.redact, scrub, safe_error), and written into the page by the
script as text, never as markup: payload-derived strings are the producer's choice.

Actions (requeue a dead letter; pause or resume a queue where the store can) are POST routes that
exist only when enabled, and each must carry this process's token (in the page it serves) in a
header a cross-site form cannot set, from a Host that names this machine (no DNS rebinding)."""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from genesis_pgflow.app import App
from genesis_pgflow.errors import ConfigurationError
from genesis_pgflow.messages import REQUEST_QUEUES, redact, safe_error, scrub
from genesis_pgflow.store.admin import PgAdminStore, shown_dsn
from genesis_pgflow.store.dashboard import PgDashboardStore
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.experiments import ExperimentRecords

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "dashboard_static"
# (HTTP status, content type, body); a handler gets the request's headers (lower-case names) and body
Answer = tuple[int, str, bytes]
Handler = Callable[[Mapping[str, str], bytes], Answer]
JSON = "application/json; charset=utf-8"
TOKEN_HEADER = "x-genesis-token"
MINUTES = 60                 # the charts' window
FAILURES_SINCE_S = 24 * 3600
LIMIT = 50
CLIP = 300                   # characters of a message or body shown


def _clip(text: str, limit: int = CLIP) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _scrubbed(value: Any) -> Any:
    """Every string of a snapshot scrubbed, every field named like a secret redacted: a producer
    chooses a payload's `type`, a description, a repository URL, not only error messages."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in redact(value).items()}
    if isinstance(value, (list, tuple)):
        return [_scrubbed(v) for v in value]
    return value


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat()
    return str(value)


def _json(status: int, value: Any) -> Answer:
    return status, JSON, json.dumps(value, default=_default).encode()


def _host_name(header: str) -> str:
    """The host of a Host header (`a:80`, `[::1]:80`, `a`), lower case, without the port."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(header: str | None, bind_host: str) -> bool:
    """A request names this machine: an IP address, localhost, this host's name or the address the
    server was bound to. A page of another site reaching us through DNS rebinding names its own
    host, and is refused before it can read the page (and its token) or act."""
    if not header:
        return False
    name = _host_name(header)
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name in {"localhost", bind_host.lower(), socket.gethostname().lower()}


class Dashboard:
    """The page, its static files, the snapshot it polls (read at most every cache_s seconds,
    whatever the number of open pages) and, if enabled, its actions."""

    def __init__(self, db: Database, experiments: ExperimentRecords, *, where: dict[str, Any],
                 actions: bool = False, bind_host: str = "127.0.0.1", served_by: str = "genesis dashboard",
                 cache_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.admin = PgAdminStore(db)
        self.figures = PgDashboardStore(db)
        self.experiments = experiments
        self.where = where
        self.actions = actions
        self.bind_host = bind_host
        self.served_by = served_by
        self.cache_s = cache_s
        self.clock = clock
        self.token = secrets.token_urlsafe(32) if actions else ""
        self._lock = threading.Lock()
        self._cached: tuple[float, bytes] | None = None

    @classmethod
    def for_app(cls, app: App, *, actions: bool, bind_host: str, served_by: str) -> Dashboard:
        embedded = app.settings.dsn is None
        where = {"dsn": shown_dsn(app.dsn), "embedded": embedded,
                 "path": str(app.settings.home / "pgdata") if embedded else None}
        return cls(app.db, app.experiments, where=where, actions=actions, bind_host=bind_host, served_by=served_by)

    @property
    def can_pause(self) -> bool:
        return all(callable(getattr(self.admin, name, None)) for name in ("pause_queue", "resume_queue"))

    # --- what the page shows ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, redacted and clipped; see docs/interface.md for its keys."""
        figures = self.figures.queues(MINUTES)
        failures = [{**row, "message": _clip(scrub(row["message"] or "")), "details": redact(row["details"])}
                    for row in self.admin.failures(since_s=FAILURES_SINCE_S, limit=LIMIT)]
        letters = []
        for queue in REQUEST_QUEUES:
            for row in self.admin.dead_letters(queue, LIMIT):
                error = safe_error(row["error"]) or {}
                letters.append({
                    "queue": row["queue"], "msg_id": row["msg_id"], "original_queue": row["original_queue"],
                    "original_msg_id": row["original_msg_id"], "enqueued_at": row["enqueued_at"],
                    "attempts": row["attempts"], "code": error.get("code"),
                    "message": _clip(scrub(str(error.get("message") or ""))),
                    "body": _clip(scrub(json.dumps(redact(row["message"]), default=str)))})
        experiments = []
        for row in self.experiments.list_experiments(limit=LIMIT):
            error = safe_error(row.get("error")) or {}
            experiments.append({
                **{k: row.get(k) for k in ("experiment_id", "experiment_type", "status", "recommendation",
                                           "success_rate", "baseline_success_rate", "regression", "test_count",
                                           "failures", "duration_ms", "rolled_back", "risk_level", "started_at",
                                           "finished_at")},
                "description": _clip(scrub(str(row.get("description") or ""))),
                "repo": scrub(str(row.get("repo") or "")),
                "error": _clip(scrub(f"{error.get('code')}: {error.get('message')}")) if error else None})
        paused = getattr(self.admin, "paused_queues", None)     # where the store can pause queues
        for row in paused() if callable(paused) else []:
            if row.get("queue") in figures["queues"]:
                figures["queues"][row["queue"]]["paused"] = True
        return {"database": self.where, "served_by": self.served_by, "now": figures["now"],
                "minutes": figures["minutes"], "queues": figures["queues"], "consumers": self.admin.consumers(),
                "failures": failures, "dead_letters": letters, "experiments": experiments,
                "actions": {"requeue": self.actions, "pause": self.actions and self.can_pause}}

    def _snapshot_json(self) -> bytes:
        with self._lock:    # one reading at a time, shared by every page polling within cache_s
            if self._cached is None or self.clock() - self._cached[0] >= self.cache_s:
                self._cached = (self.clock(), json.dumps(_scrubbed(self.snapshot()), default=_default).encode())
            return self._cached[1]

    # --- routes -----------------------------------------------------------------------------

    def _guarded(self, answer: Callable[[Mapping[str, str], bytes], Answer]) -> Handler:
        def handler(headers: Mapping[str, str], body: bytes) -> Answer:
            if not host_allowed(headers.get("host"), self.bind_host):
                return 421, "text/plain; charset=utf-8", b"this dashboard answers only to its own host names\n"
            return answer(headers, body)
        return handler

    def page(self) -> bytes:
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return html.replace("{{token}}", self.token).encode()   # urlsafe base64: nothing to escape

    def get_routes(self) -> dict[str, Handler]:
        def static(name: str, content_type: str) -> Handler:
            return self._guarded(lambda _h, _b: (200, content_type, (STATIC / name).read_bytes()))

        page = self._guarded(lambda _h, _b: (200, "text/html; charset=utf-8", self.page()))
        return {
            "/": page,
            "/dashboard": page,
            "/dashboard/app.js": static("app.js", "text/javascript; charset=utf-8"),
            "/dashboard/style.css": static("style.css", "text/css; charset=utf-8"),
            "/api/snapshot": self._guarded(lambda _h, _b: (200, JSON, self._snapshot_json())),
        }

    def post_routes(self) -> dict[str, Handler]:
        """None unless actions are enabled: without them, a POST anywhere is 404 or 405."""
        if not self.actions:
            return {}
        routes = {"/api/dlq/requeue": self._action(self._requeue)}
        if self.can_pause:
            routes["/api/queues/pause"] = self._action(lambda body: self._pause(body, pause=True))
            routes["/api/queues/resume"] = self._action(lambda body: self._pause(body, pause=False))
        return routes

    def _action(self, run: Callable[[dict[str, Any]], Answer]) -> Handler:
        def handler(headers: Mapping[str, str], body: bytes) -> Answer:
            refused = self._refusal(headers)
            if refused:
                return _json(403, {"error": refused})
            try:
                request = json.loads(body or b"{}")
            except ValueError:
                return _json(400, {"error": "the body is not JSON"})
            if not isinstance(request, dict):
                return _json(400, {"error": "the body is not a JSON object"})
            try:
                answer = run(request)
            except ConfigurationError as exc:
                return _json(409, {"error": exc.message})
            self._cached = None     # the next poll shows the change
            return answer
        return self._guarded(handler)

    def _refusal(self, headers: Mapping[str, str]) -> str | None:
        """Why a POST is refused (None: it is not). The token is in this process's page only; a
        cross-site request can neither read it nor send a custom header without a CORS
        preflight, which this server never grants; a foreign Origin is refused outright."""
        given = headers.get(TOKEN_HEADER, "")
        if not self.token or not hmac.compare_digest(given.encode(), self.token.encode()):
            return "missing or wrong X-Genesis-Token"
        if not headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
            return "Content-Type must be application/json"
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in (f"http://{headers.get('host', '').lower()}",):
            return "cross-origin request"
        return None

    @staticmethod
    def _queue_of(request: dict[str, Any]) -> str:
        queue = request.get("queue")
        if queue not in REQUEST_QUEUES:
            raise ConfigurationError(f"not a request queue: {str(queue)[:80]!r}")
        return str(queue)

    def _requeue(self, request: dict[str, Any]) -> Answer:
        queue, msg_id = self._queue_of(request), request.get("msg_id")
        if not isinstance(msg_id, int) or isinstance(msg_id, bool):
            return _json(400, {"error": "msg_id must be a number"})
        moved = self.admin.requeue_dead_letters(queue, [msg_id])
        log.info("dashboard: requeued dead letter(s) %s of %s", moved, queue)
        return _json(200, {"requeued": [{"dead_letter": old, "queue": queue, "msg_id": new} for old, new in moved]})

    def _pause(self, request: dict[str, Any], *, pause: bool) -> Answer:
        queue = self._queue_of(request)
        if pause:
            # getattr: the route exists only where the store has these (can_pause)
            getattr(self.admin, "pause_queue")(queue, by=f"dashboard ({self.served_by})")  # noqa: B009
        else:
            getattr(self.admin, "resume_queue")(queue)  # noqa: B009
        log.info("dashboard: %s %s", "paused" if pause else "resumed", queue)
        return _json(200, {"queue": queue, "paused": pause})
