"""`--metrics-port`: the consumer's counters in Prometheus' text format over HTTP."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from genesis_pgflow.consumer import Consumer


def render(consumer: Consumer) -> str:
    lines = [
        "# HELP genesis_outcomes_total Outcomes written, by kind (completed, failed, retry, dead_letter).",
        "# TYPE genesis_outcomes_total counter",
    ]
    lines += [f'genesis_outcomes_total{{kind="{k}"}} {v}' for k, v in sorted(consumer.stats.outcomes.items())]
    lines += ["# HELP genesis_results_total Results published, by payload type and status.",
              "# TYPE genesis_results_total counter"]
    lines += [f'genesis_results_total{{type="{t}",status="{s}"}} {v}'
              for (t, s), v in sorted(consumer.stats.by_type.items())]
    lines += ["# HELP genesis_in_flight Handlers running now (timed-out ones still returning included).",
              "# TYPE genesis_in_flight gauge",
              f"genesis_in_flight {len(consumer.running) + len(consumer.overrun)}",
              "# HELP genesis_free_slots Workers free to start a message.",
              "# TYPE genesis_free_slots gauge",
              f"genesis_free_slots {consumer.free_slots()}",
              "# HELP genesis_store_errors_total Database failures the loop backed off from.",
              "# TYPE genesis_store_errors_total counter",
              f"genesis_store_errors_total {consumer.stats.store_errors}"]
    return "\n".join(lines) + "\n"


def serve(consumer: Consumer, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Start serving /metrics in a daemon thread; the caller shuts the server down."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path.rstrip("/") not in ("/metrics", ""):
                self.send_error(404)
                return
            body = render(consumer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="genesis-metrics", daemon=True).start()
    return server
