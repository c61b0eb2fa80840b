"""The two commands, `genesis-consume` and `genesis`: argument parsing and exit codes only."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from genesis_pgflow import maintenance, metrics
from genesis_pgflow.app import App, upgrade_database
from genesis_pgflow.errors import ConfigurationError
from genesis_pgflow.messages import REDACTED, REQUEST_QUEUES, all_queue_names, redact
from genesis_pgflow.settings import Settings

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("genesis_pgflow")


# what a log call may pass in `extra=` to appear as a field of its line
LOG_FIELDS = ("queue", "msg_id", "workflow_id", "type", "status", "code", "attempt", "duration_ms")
# a secret written as key=value, key: value or "key": "value" in free text, and a URL's password
_SECRET_PAIR = re.compile(r"""(?P<key>["']?[\w.-]*(?:api[_-]?key|token|secret|password|passwd|credential|"""
                          r"""authorization)[\w.-]*["']?\s*[:=]\s*)(?P<value>"[^"]*"|'[^']*'|[^\s,;&}\]]+)""", re.I)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]+@", re.I)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _scrub(text: str) -> str:
    """Free text with the secrets it may quote replaced by the redaction marker."""
    def pair(match: re.Match[str]) -> str:
        quote = match["value"][0] if match["value"][0] in "\"'" else ""
        return f"{match['key']}{quote}{REDACTED}{quote}"

    return _URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}@", _SECRET_PAIR.sub(pair, text))


def _message(record: logging.LogRecord) -> str:
    """The record's message with structured arguments redacted (messages.redact) and secrets in
    free text scrubbed: a payload's secrets never reach the logs."""
    args: Any = record.args
    if isinstance(args, dict):
        args = redact(args)
    elif isinstance(args, tuple):
        args = tuple(redact(a) if isinstance(a, (dict, list)) else a for a in args)
    text = str(record.msg)
    if args:
        try:
            text = text % args
        except (TypeError, ValueError):
            text = f"{text} {args!r}"
    return _scrub(text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    values = {name: getattr(record, name) for name in LOG_FIELDS if getattr(record, name, None) is not None}
    return {k: _scrub(v) if isinstance(v, str) else redact(v) for k, v in values.items()}


def _utc(record: logging.LogRecord) -> dt.datetime:
    return dt.datetime.fromtimestamp(record.created, tz=dt.timezone.utc)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO-8601, UTC), level, logger, message, the LOG_FIELDS given, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"ts": _utc(record).isoformat(timespec="microseconds"), "level": record.levelname,
                                 "logger": record.name, "message": _message(record), **_fields(record)}
        if record.exc_info:
            entry["exception"] = _scrub(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`2026-12-03 10:00:00.123Z INFO    consumer: message  queue=... msg_id=...`; control characters
    are escaped, so that no message can forge a line, and a traceback follows indented."""

    def format(self, record: logging.LogRecord) -> str:
        name = "genesis" if record.name == "genesis_pgflow" else record.name.removeprefix("genesis_pgflow.")
        fields = "".join(f" {k}={_escape(json.dumps(v, default=str) if not isinstance(v, str) else v)}"
                         for k, v in _fields(record).items())
        ts = _utc(record)
        line = (f"{ts:%Y-%m-%d %H:%M:%S}.{ts.microsecond // 1000:03d}Z "
                f"{record.levelname:<7} {name}: {_escape(_message(record))}" + (f" {fields}" if fields else ""))
        if record.exc_info:
            trace = _scrub(self.formatException(record.exc_info))
            line += "\n" + "\n".join("    " + part for part in trace.splitlines())
        return line


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic's "Context impl PostgresqlImpl." at every start says nothing to an operator
    logging.getLogger("alembic").setLevel(max(root.level, logging.WARNING))


class _Parser(argparse.ArgumentParser):
    """argparse, but bad usage is exit 2 with one line (argparse's own code is 2 as well)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _settings_error(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)]
    return "invalid configuration: " + "; ".join(parts)


def _guarded(main: Callable[[], int]) -> int:
    """Map failures to the contract's exit codes with a one-line reason."""
    try:
        return main()
    except ConfigurationError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:
        print(f"error: {_settings_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - anything unexpected is exit 1, with its traceback logged
        log.exception("unexpected error")
        print(f"error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_UNEXPECTED


# --- genesis-consume --------------------------------------------------------------------------


def consume_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="genesis-consume",
                description="Consume the Genesis pgmq queues and publish one result per request.")
    p.add_argument("--dsn", help="libpq URL or key/value DSN (default: GENESIS_DATABASE_URL, DATABASE_URL, embedded)")
    p.add_argument("--parallel", type=int, help="handlers running at once (default 4; 1 = sequential)")
    p.add_argument("--batch-size", type=int, help="most messages read from a queue at once (default 10)")
    p.add_argument("--poll-interval-ms", type=int, help="polling interval when no NOTIFY arrives (default 1000)")
    p.add_argument("--timeout-ms", type=int, help="per-workflow timeout (default 30000)")
    p.add_argument("--max-timeout-ms", type=int, help="most a request's timeout_ms may ask for (default 300000)")
    p.add_argument("--max-experiment-timeout-ms", type=int,
                   help="most an experiment's timeout_ms may ask for (default 3600000)")
    p.add_argument("--max-payload-bytes", type=int,
                   help="larger messages fail as payload_too_large, unread (default 2097152)")
    p.add_argument("--max-attempts", type=int, help="deliveries before dead-lettering (default 3)")
    p.add_argument("--queues", help=f"comma-separated request queues (default: {','.join(REQUEST_QUEUES)})")
    p.add_argument("--drain", action="store_true", default=None, help="exit 0 once the queues are empty")
    p.add_argument("--no-migrate", action="store_true", help="do not upgrade the database; exit 2 if it is behind")
    p.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz and /readyz on this port")
    p.add_argument("--metrics-host", help="address the metrics port listens on (default 127.0.0.1)")
    p.add_argument("--log-format", choices=["text", "json"], help="log format (default text)")
    return p


def consume_main(argv: Sequence[str] | None = None) -> int:
    args = consume_parser().parse_args(argv)

    def main() -> int:
        settings = Settings.from_env(
            dsn=args.dsn, parallel=args.parallel, batch_size=args.batch_size,
            poll_interval_ms=args.poll_interval_ms, timeout_ms=args.timeout_ms, max_attempts=args.max_attempts,
            max_timeout_ms=args.max_timeout_ms, max_experiment_timeout_ms=args.max_experiment_timeout_ms,
            max_payload_bytes=args.max_payload_bytes,
            queues=tuple(q.strip() for q in args.queues.split(",") if q.strip()) if args.queues else None,
            drain=args.drain, migrate=False if args.no_migrate else None, metrics_port=args.metrics_port,
            metrics_host=args.metrics_host, log_format=args.log_format)
        setup_logging(settings.log_format, settings.log_level)
        app = App.open(settings)
        try:
            consumer = app.consumer()
            def stop(signum: int, _frame: object) -> None:
                log.info("signal %s: finishing in-flight work", signum)
                consumer.stop()

            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
            serving = (metrics.serving(app, consumer, settings.metrics_host, settings.metrics_port)
                       if settings.metrics_port is not None else contextlib.nullcontext())
            with serving:
                log.info("consuming %s with %d worker(s)", ",".join(settings.queues), settings.parallel)
                consumer.run()
            log.info("stopped: %s", dict(consumer.stats.outcomes))
        finally:
            app.close()
        return EXIT_OK

    return _guarded(main)


# --- genesis ----------------------------------------------------------------------------------


def admin_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="genesis", description="Administer genesis_pgflow: schema, queues, dead letters, state.")
    p.add_argument("--dsn", help="libpq URL or key/value DSN (default: GENESIS_DATABASE_URL, DATABASE_URL, embedded)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="install pgmq, create the queues, migrate the genesis schema")
    send = sub.add_parser("send", help="send one JSON message to a queue")
    send.add_argument("queue", choices=all_queue_names(), metavar="QUEUE")
    send.add_argument("json")
    status = sub.add_parser("status", help="queue depths, in flight, outcomes")
    status.add_argument("--json", action="store_true")
    dlq = sub.add_parser("dlq", help="dead letters").add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq.add_parser("list", help="list the dead letters of a request queue")
    dlq_list.add_argument("queue", choices=REQUEST_QUEUES, metavar="QUEUE")
    dlq_list.add_argument("--json", action="store_true")
    requeue = dlq.add_parser("requeue", help="send dead letters back to their request queue")
    requeue.add_argument("queue", choices=REQUEST_QUEUES, metavar="QUEUE")
    requeue.add_argument("msg_ids", nargs="*", type=int, metavar="MSG_ID")
    rules = sub.add_parser("rules", help="the active rules").add_subparsers(dest="rules_command", required=True)
    rules_list = rules.add_parser("list")
    rules_list.add_argument("--namespace")
    rules_list.add_argument("--json", action="store_true")
    llm = sub.add_parser("llm-config", help="the active LLM configurations").add_subparsers(
        dest="llm_command", required=True)
    llm_show = llm.add_parser("show")
    llm_show.add_argument("--provider")
    llm_show.add_argument("--json", action="store_true")
    exps = sub.add_parser("experiments", help="experiments and their metrics").add_subparsers(
        dest="experiments_command", required=True)
    exps_list = exps.add_parser("list")
    exps_list.add_argument("--status", choices=["running", "success", "regressed", "failed"])
    exps_list.add_argument("--limit", type=int, default=50)
    exps_list.add_argument("--json", action="store_true")
    exps_show = exps.add_parser("show")
    exps_show.add_argument("experiment_id")
    exps_show.add_argument("--output", action="store_true",
                           help="also print each run's output tail (sensitive: whatever the tested code printed)")
    sandbox = sub.add_parser("sandbox", help="experiment sandboxes").add_subparsers(
        dest="sandbox_command", required=True)
    cleanup = sandbox.add_parser("cleanup", help="remove sandboxes older than the maximum age")
    cleanup.add_argument("--max-age-days", type=float)
    cleanup.add_argument("--json", action="store_true")
    return p


def _print(value: Any, as_json: bool, table: Callable[[Any], str]) -> None:
    print(json.dumps(value, indent=2, default=str) if as_json else table(value))


def _status_table(status: dict[str, Any]) -> str:
    cols = ["depth", "in_flight", "oldest_age_s", "archived", "dead_lettered", "completed", "failed", "retrying"]
    lines = [f"{'queue':<30}" + "".join(f"{c:>14}" for c in cols)]
    for name, row in status["queues"].items():
        lines.append(f"{name:<30}" + "".join(f"{'-' if row[c] is None else row[c]:>14}" for c in cols))
    lines += ["", f"{'type':<30}{'completed':>14}{'failed':>14}{'retrying':>14}{'running':>14}"]
    for kind, row in status["types"].items():
        lines.append(f"{kind:<30}{row['completed']:>14}{row['failed']:>14}{row['retrying']:>14}{row['running']:>14}")
    return "\n".join(lines)


def admin_main(argv: Sequence[str] | None = None) -> int:
    args = admin_parser().parse_args(argv)

    def main() -> int:
        settings = Settings.from_env(dsn=args.dsn)
        setup_logging(settings.log_format, "WARNING")
        if args.command == "db":
            report = upgrade_database(settings)
            print(f"pgmq: {report.pgmq}; queues created: {len(report.queues_created)}; "
                  f"genesis schema: {report.revision_before or 'none'} -> {report.revision_after}")
            return EXIT_OK
        if args.command == "send":
            try:
                body = json.loads(args.json)
            except json.JSONDecodeError as exc:
                raise ConfigurationError(f"JSON argument is not valid JSON: {exc}") from None
        # Operators' commands never change a configured database's schema behind their back (a
        # behind database is exit 2 naming `genesis db upgrade`); the embedded default is ours.
        app = App.open(settings, migrate=settings.dsn is None)
        try:
            return _admin(app, args, body if args.command == "send" else None)
        finally:
            app.close()

    return _guarded(main)


def _admin(app: App, args: argparse.Namespace, body: Any) -> int:
    if args.command == "send":
        print(app.queues.send(args.queue, body))
    elif args.command == "status":
        _print(app.queues.status(), args.json, _status_table)
    elif args.command == "dlq" and args.dlq_command == "list":
        letters = [{**row, "message": redact(row["message"])} for row in app.queues.dead_letters(args.queue)]
        _print(letters, args.json, lambda rows: "\n".join(
            f"{r['msg_id']}\t{r['enqueued_at']:%Y-%m-%d %H:%M:%S}\t{json.dumps(r['message'])}" for r in rows)
            or "(no dead letters)")
    elif args.command == "dlq" and args.dlq_command == "requeue":
        moved = app.queues.requeue_dead_letters(args.queue, args.msg_ids)
        for old, new in moved:
            print(f"{old} -> {args.queue} {new}")
        print(f"requeued {len(moved)} message(s)")
    elif args.command == "rules":
        _print(app.state.rules(args.namespace), args.json, lambda rows: "\n".join(
            f"{r['namespace']}/{r['rule_id']}\tv{r['version']}\tconfidence {r['confidence']}" for r in rows)
            or "(no rules)")
    elif args.command == "llm-config":
        configs = redact(app.state.llm_configs(args.provider))
        _print(configs, args.json, lambda rows: "\n".join(
            f"{r['provider']}/{r['complexity']}\tv{r['version']}\tmodels {', '.join(r['models'])}\tsettings "
            f"{json.dumps(r['settings'])}" for r in rows) or "(no LLM configurations)")
    elif args.command == "experiments" and args.experiments_command == "list":
        rows = app.experiments.list_experiments(status=args.status, limit=args.limit)
        _print(rows, args.json, lambda rows: "\n".join(
            f"{r['experiment_id']}\t{r['status']}\t{r.get('recommendation') or '-'}"
            f"\t{r['started_at']:%Y-%m-%d %H:%M:%S}\t{r['description']}" for r in rows) or "(no experiments)")
    elif args.command == "experiments" and args.experiments_command == "show":
        found = app.experiments.show_experiment(args.experiment_id, output=args.output)
        if found is None:
            raise ConfigurationError(f"no experiment {args.experiment_id!r}")
        print(json.dumps(redact(found), indent=2, default=str))
    elif args.command == "sandbox":
        report = maintenance.cleanup_sandboxes(app.settings, app.experiments, max_age_days=args.max_age_days)
        _print(report.as_json(), args.json, lambda r: (
            f"removed {len(r['removed'])} sandbox(es), freed {r['bytes_freed']} bytes; kept {len(r['kept'])}"
            + (f"; errors: {r['errors']}" if r["errors"] else "")) if r["ran"] else
            "another process is cleaning up right now; nothing done")
    return EXIT_OK

