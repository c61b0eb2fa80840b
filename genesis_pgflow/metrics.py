"""`--metrics-port`: a consumer's Prometheus metrics, /healthz and /readyz, on a registry of its own."""

from __future__ import annotations

import errno
import logging
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from genesis_pgflow.app import App, consumer_name
from genesis_pgflow.consumer import Consumer
from genesis_pgflow.dashboard import Dashboard
from genesis_pgflow.errors import ConfigurationError
from genesis_pgflow.messages import QUEUES, Outcome, all_queue_names
from genesis_pgflow.store import schema
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.metrics import DatabaseProbe, DatabaseReading, PgDatabaseProbe, pool_figures

log = logging.getLogger(__name__)

# Label values are chosen from these closed sets, never copied from a message: a producer must
# not be able to add series (or, through quotes and newlines, lines) to the exposition.
KNOWN_TYPES = tuple(kind for kind, _results in QUEUES.values())
KNOWN_QUEUES = tuple(all_queue_names())
STATUSES = ("completed", "failed")
OTHER = "other"
# outcomes decided before any handler ran: they have no handler duration
REFUSED_CODES = frozenset({"invalid_payload", "unknown_type", "payload_too_large"})
# from a rule update (milliseconds) to an experiment (up to an hour)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                    600.0, 1800.0, 3600.0, float("inf"))


def type_label(value: object) -> str:
    return value if isinstance(value, str) and value in KNOWN_TYPES else OTHER


def queue_label(value: object) -> str:
    return value if isinstance(value, str) and value in KNOWN_QUEUES else OTHER


def status_label(value: object) -> str:
    return value if isinstance(value, str) and value in STATUSES else OTHER


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dataclass(frozen=True)
class Probed:
    """The last good reading of the database (None before the first) and the last attempt's failure."""

    reading: DatabaseReading | None = None
    read_at: float | None = None
    error: str | None = None           # the exception's class name; the details go to the log
    attempted_at: float | None = None


class ConsumerMetrics(Collector):
    """Every metric of one consumer, collected at scrape time into a registry of its own.

    Outcomes arrive through observe(); the consumer's slots and counters, the pool's occupancy and
    the database's queue figures are read when scraped, the latter through a probe whose reading is
    kept for cache_s seconds (one query for every queue, whatever the number of scrapers)."""

    def __init__(self, consumer: Consumer, *, probe: DatabaseProbe | None = None, db: Database | None = None,
                 cache_s: float = 5.0, stale_after_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.consumer = consumer
        self.probe = probe
        self.db = db
        self.cache_s = cache_s
        # A database outage makes one loop turn last up to the store's 30 s of retries plus the
        # loop's 30 s backoff; an outage is no reason to restart the consumer.
        self.stale_after_s = stale_after_s if stale_after_s is not None else max(
            120.0, 3 * consumer.options.poll_interval_s)
        self.clock = clock
        self.head = schema.head_revision() if probe is not None else ""
        self._lock = threading.Lock()
        self._results: Counter[tuple[str, str, str]] = Counter()
        self._retries: Counter[tuple[str, str]] = Counter()
        self._dead_letters: Counter[tuple[str, str]] = Counter()
        self._timeouts: Counter[tuple[str, str]] = Counter()
        self._buckets: dict[str, list[int]] = {}
        self._seconds: dict[str, float] = {}
        for queue, (kind, _results) in QUEUES.items():    # known series start at 0, so rate() sees the first
            for status in STATUSES:
                self._results[(queue, kind, status)] = 0
            for tally in (self._retries, self._dead_letters, self._timeouts):
                tally[(queue, kind)] = 0
        self._probe_lock = threading.Lock()
        self._probed = Probed()
        self._started_at = consumer.monotonic()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    @classmethod
    def for_app(cls, app: App, consumer: Consumer) -> ConsumerMetrics:
        """The metrics of a consumer of this app, watching what its store stores."""
        metrics = cls(consumer, probe=PgDatabaseProbe(app.dsn), db=app.db)
        metrics.watch()
        return metrics

    def watch(self) -> None:
        """Have the consumer report what it stores to observe()."""
        if self.observe not in self.consumer.observers:
            self.consumer.observers.append(self.observe)

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()

    # --- what happened --------------------------------------------------------------------

    def observe(self, outcomes: Sequence[Outcome]) -> None:
        """Count stored outcomes: results, retries, dead letters, timeouts, handler durations."""
        with self._lock:
            for outcome in outcomes:
                queue, kind = queue_label(outcome.message.queue), type_label(outcome.message.type)
                code = outcome.error.code if outcome.error is not None else None
                if code not in REFUSED_CODES:
                    self._observe_duration(kind, (outcome.finished_at - outcome.started_at).total_seconds())
                if outcome.kind == "retry":
                    self._retries[(queue, kind)] += 1
                    continue
                self._results[(queue, kind, status_label(outcome.status))] += 1
                if outcome.kind == "dead_letter":
                    self._dead_letters[(queue, kind)] += 1
                if code == "timeout":
                    self._timeouts[(queue, kind)] += 1

    def _observe_duration(self, kind: str, seconds: float) -> None:
        seconds = max(0.0, seconds)
        buckets = self._buckets.setdefault(kind, [0] * len(DURATION_BUCKETS))
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
                break
        self._seconds[kind] = self._seconds.get(kind, 0.0) + seconds

    # --- reading the database, at most every cache_s ----------------------------------------

    def reading(self) -> Probed:
        """The last reading of the database, taken anew when older than cache_s. While one scraper
        reads, the others are answered with the previous reading rather than kept waiting."""
        if self.probe is None:
            return self._probed
        first = self._probed.attempted_at is None
        if self._due() and self._probe_lock.acquire(blocking=first):
            try:
                if self._due():
                    self._probed = self._probe_once(self.probe, self._probed)
            finally:
                self._probe_lock.release()
        return self._probed

    def _due(self) -> bool:
        attempted = self._probed.attempted_at
        return attempted is None or self.clock() - attempted >= self.cache_s

    def _probe_once(self, probe: DatabaseProbe, last: Probed) -> Probed:
        now = self.clock()
        try:
            reading = probe.read()
        except Exception as exc:  # noqa: BLE001 - a failed reading must never fail the scrape
            if last.error is None:
                log.warning("metrics: cannot read the database (%s); serving the last figures", _first_line(exc))
            return Probed(last.reading, last.read_at, type(exc).__name__, now)
        if last.error is not None:
            log.info("metrics: the database answers again")
        return Probed(reading, now, None, now)

    # --- the endpoints --------------------------------------------------------------------

    def loop_age_s(self) -> float:
        """Seconds since the consumer loop last turned (since these metrics began, before its first turn)."""
        last = getattr(self.consumer, "last_iteration", None)
        return max(0.0, self.consumer.monotonic() - (self._started_at if last is None else last))

    def health(self) -> tuple[bool, str]:
        age = self.loop_age_s()
        if age <= self.stale_after_s:
            return True, f"ok: the consumer loop turned {age:.1f} s ago"
        return False, f"stalled: the consumer loop last turned {age:.1f} s ago (limit {self.stale_after_s:g} s)"

    def readiness(self) -> tuple[bool, str]:
        if self.probe is None:
            return True, "ok: no database probe configured"
        probed = self.reading()
        if probed.error is not None or probed.reading is None:
            return False, "not ready: the database is unreachable"
        problems = probed.reading.problems(self.head)
        if problems:
            return False, "not ready: " + "; ".join(problems) + ": run `genesis db upgrade`"
        return True, "ok: database reachable, schema current"

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # --- the Collector protocol -------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        yield from self._outcome_families()
        yield from self._consumer_families()
        yield from self._pool_families()
        yield from self._database_families()

    def _outcome_families(self) -> Iterator[Metric]:
        with self._lock:
            results, retries = dict(self._results), dict(self._retries)
            dead_letters, timeouts = dict(self._dead_letters), dict(self._timeouts)
            buckets = {kind: list(counts) for kind, counts in self._buckets.items()}
            seconds = dict(self._seconds)
        family = CounterMetricFamily("genesis_results", "Results published, by request queue, payload type and "
                                     "status (dead letters included, as failed).", labels=["queue", "type", "status"])
        for result, value in sorted(results.items()):
            family.add_metric(list(result), value)
        yield family
        for name, doc, tally in (
                ("genesis_retries", "Transient failures sent back to their queue to be tried again.", retries),
                ("genesis_dead_letters", "Requests copied to their dead-letter queue.", dead_letters),
                ("genesis_timeouts", "Handlers that ran past their timeout.", timeouts)):
            family = CounterMetricFamily(name, doc, labels=["queue", "type"])
            for labels, value in sorted(tally.items()):
                family.add_metric(list(labels), value)
            yield family
        histogram = HistogramMetricFamily(
            "genesis_handler_duration_seconds",
            "Seconds from reading a message to its outcome (the handler's run), by payload type; requests "
            "refused before running (invalid payload, unknown type) are not counted.", labels=["type"])
        for kind in sorted(buckets):
            cumulative, total = [], 0
            for bound, count in zip(DURATION_BUCKETS, buckets[kind], strict=True):
                total += count
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), total))
            histogram.add_metric([kind], cumulative, seconds[kind])
        yield histogram

    def _consumer_families(self) -> Iterator[Metric]:
        consumer = self.consumer
        yield GaugeMetricFamily("genesis_consumer_workers", "Handlers this consumer runs at once (--parallel).",
                                value=consumer.options.parallel)
        yield GaugeMetricFamily("genesis_consumer_in_flight", "Handlers running now, timed-out ones still "
                                "returning included.", value=len(consumer.running) + len(consumer.overrun))
        yield GaugeMetricFamily("genesis_consumer_overrun", "Handlers past their timeout whose thread has not "
                                "returned yet (each keeps its worker).", value=len(consumer.overrun))
        yield GaugeMetricFamily("genesis_consumer_free_slots", "Workers free to start a message.",
                                value=consumer.free_slots())
        yield GaugeMetricFamily("genesis_consumer_loop_age_seconds", "Seconds since the consumer loop last "
                                "turned (/healthz fails past its limit).", value=self.loop_age_s())
        yield CounterMetricFamily("genesis_database_errors", "Database failures the consumer loop backed off "
                                  "from, after the store's own brief retries.", value=consumer.stats.store_errors)

    def _pool_families(self) -> Iterator[Metric]:
        if self.db is None:
            return
        pool = pool_figures(self.db)
        if pool is None:
            return
        yield GaugeMetricFamily("genesis_db_pool_max_connections", "The most connections the pool may open.",
                                value=pool.max_size)
        connections = GaugeMetricFamily("genesis_db_pool_connections", "Connections the pool holds open, "
                                        "lent out (in_use) or not (idle).", labels=["state"])
        connections.add_metric(["in_use"], max(0, pool.size - pool.idle))
        connections.add_metric(["idle"], pool.idle)
        yield connections
        yield GaugeMetricFamily("genesis_db_pool_requests_waiting", "Callers waiting for a connection.",
                                value=pool.waiting)
        yield CounterMetricFamily("genesis_db_pool_connections_lost", "Pooled connections found broken and "
                                  "replaced (reconnects).", value=pool.connections_lost)
        yield CounterMetricFamily("genesis_db_pool_connection_errors", "Attempts to open a pooled connection "
                                  "that failed.", value=pool.connection_errors)

    def _database_families(self) -> Iterator[Metric]:
        if self.probe is None:
            return
        probed = self.reading()
        yield GaugeMetricFamily("genesis_database_up", "1 if the last reading of the database succeeded, else 0 "
                                "(the queue figures are then the last ones read).", value=0 if probed.error else 1)
        reading = probed.reading
        if reading is None or probed.read_at is None:
            return
        yield GaugeMetricFamily("genesis_queue_figures_age_seconds", "Seconds since the queue figures were read.",
                                value=max(0.0, self.clock() - probed.read_at))
        depth = GaugeMetricFamily("genesis_queue_depth", "Messages in the queue, visible or not "
                                  "(pgmq.metrics_all).", labels=["queue"])
        in_flight = GaugeMetricFamily("genesis_queue_in_flight", "Messages of the queue leased by a consumer "
                                      "right now (invisible).", labels=["queue"])
        oldest = GaugeMetricFamily("genesis_queue_oldest_message_age_seconds", "Age of the queue's oldest "
                                   "message; 0 when it is empty.", labels=["queue"])
        for name in KNOWN_QUEUES:       # reply_to queues are unbounded in number: not exported
            figures = reading.queues.get(name)
            if figures is None:
                continue
            depth.add_metric([name], figures.depth)
            in_flight.add_metric([name], figures.in_flight)
            oldest.add_metric([name], figures.oldest_age_s or 0.0)
        yield from (depth, in_flight, oldest)


# --- HTTP ---------------------------------------------------------------------------------

# path -> () -> (HTTP status, content type, body)
Route = Callable[[], tuple[int, str, bytes]]
# path -> (request headers with lower-case names, request body) -> (HTTP status, content type, body)
Handler = Callable[[Mapping[str, str], bytes], tuple[int, str, bytes]]
TEXT = "text/plain; charset=utf-8"
MAX_POST_BYTES = 16 * 1024
# every answer: no sniffing, no framing, scripts and styles only from this server (the dashboard's)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}


def routes(metrics: ConsumerMetrics) -> dict[str, Route]:
    def probe(check: Callable[[], tuple[bool, str]]) -> Route:
        def answer() -> tuple[int, str, bytes]:
            ok, text = check()
            return (200 if ok else 503), TEXT, (text + "\n").encode()
        return answer

    return {
        "/": lambda: (200, TEXT, b"genesis-consume: /metrics /healthz /readyz\n"),
        "/metrics": lambda: (200, CONTENT_TYPE_PLAIN_0_0_4, metrics.exposition()),
        "/healthz": probe(metrics.health),
        "/readyz": probe(metrics.readiness),
    }


def _plain(route: Route) -> Handler:
    return lambda _headers, _body: route()


def serve(metrics: ConsumerMetrics, host: str = "127.0.0.1", port: int = 0,
          extra: Mapping[str, Route] | None = None, dashboard: Dashboard | None = None) -> ThreadingHTTPServer:
    """Serve the metrics routes (and the dashboard's, which take / over) in daemon threads; the
    caller shuts the server down. A port that cannot be bound is a ConfigurationError (exit 2)."""
    get = {path: _plain(route) for path, route in {**routes(metrics), **(extra or {})}.items()}
    if dashboard is not None:
        get.update(dashboard.get_routes())
    return serve_http(host, port, get, dashboard.post_routes() if dashboard is not None else {})


def serve_http(host: str, port: int, get: Mapping[str, Handler], post: Mapping[str, Handler],
               what: str = "metrics") -> ThreadingHTTPServer:
    """GET (and HEAD) and POST routes in daemon threads. A path with no route is 404; a path
    routed for the other method only is 405. `what` names the port in a binding error."""

    class Handler(BaseHTTPRequestHandler):
        timeout = 10        # a client that sends nothing does not hold a thread for ever

        def _route(self, table: Mapping[str, Any], other: Mapping[str, Any]) -> tuple[str, Any]:
            path = urlsplit(self.path).path
            path = path if path == "/" else path.rstrip("/")
            route = table.get(path)
            if route is None:
                self.send_error(405 if path in other else 404)
            return path, route

        def _answer(self, path: str, route: Any, body: bytes, with_body: bool) -> None:
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                status, content_type, content = route(headers, body)
            except Exception:  # noqa: BLE001 - one failing page must not take the server down
                log.exception("http: %s failed", path)
                self.send_error(500)
                return
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(content)))
            self.send_header("Cache-Control", "no-store")
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            if with_body:
                self.wfile.write(content)

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path, route = self._route(get, post)
            if route is not None:
                self._answer(path, route, b"", with_body=True)

        def do_HEAD(self) -> None:  # noqa: N802 - the http.server API
            path, route = self._route(get, post)
            if route is not None:
                self._answer(path, route, b"", with_body=False)

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            path, route = self._route(post, get)
            if route is None:
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.send_error(411)
                return
            if not 0 <= length <= MAX_POST_BYTES:
                self.send_error(413)
                return
            self._answer(path, route, self.rfile.read(length), with_body=True)

        def log_message(self, *args: object) -> None:
            pass

    server = _bind(host, port, Handler, what)
    threading.Thread(target=server.serve_forever, name=f"genesis-{what}", daemon=True).start()
    return server


def _bind(host: str, port: int, handler: type[BaseHTTPRequestHandler], what: str = "metrics") -> ThreadingHTTPServer:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except OSError as exc:
        raise ConfigurationError(f"{what} host {host!r} cannot be resolved: {exc.strerror or exc}") from None

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

        def server_bind(self) -> None:
            # HTTPServer's own looks the host up with getfqdn(), which can hang on a slow DNS
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = host, self.server_address[1]

    try:
        return Server((host, port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(f"{what} port {port} on {host} is already in use") from None
        raise ConfigurationError(f"cannot serve {what} on {host} port {port}: {exc.strerror or exc}") from None


@contextmanager
def serving(app: App, consumer: Consumer, host: str, port: int) -> Iterator[ConsumerMetrics]:
    """`genesis-consume --metrics-port`: the consumer's metrics served while the block runs."""
    watched = ConsumerMetrics.for_app(app, consumer)
    actions = app.settings.dashboard_actions
    board = Dashboard.for_app(app, actions=actions, bind_host=host, served_by=f"genesis-consume {consumer_name()}")
    try:
        server = serve(watched, host, port, dashboard=board)
        try:
            shown = f"[{host}]" if ":" in host else host
            log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz); dashboard on http://%s:%d/ (%s)",
                     shown, server.server_address[1], shown, server.server_address[1],
                     "actions enabled" if actions else "read-only")
            yield watched
        finally:
            server.shutdown()
            server.server_close()
    finally:
        watched.close()
