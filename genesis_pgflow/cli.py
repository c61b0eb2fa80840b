"""The two commands, `genesis-consume` and `genesis`: argument parsing and exit codes only."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import getpass
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydantic import ValidationError

from genesis_pgflow import dashboard, maintenance, metrics
from genesis_pgflow.app import App, prepare_database, resolve_dsn, upgrade_database
from genesis_pgflow.errors import EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, ConfigurationError, InvalidPayload, UnknownType
from genesis_pgflow.messages import REQUEST_QUEUES, check_request, clip, queue_role, redact
from genesis_pgflow.messages import safe_error as _safe_error
from genesis_pgflow.messages import scrub as _scrub
from genesis_pgflow.processes import Processes, how_many, usable_cores
from genesis_pgflow.settings import Settings
from genesis_pgflow.store import reports
from genesis_pgflow.store.admin import PgAdminStore, package_version, shown_dsn
from genesis_pgflow.store.retention import PgRetention, RetentionPolicy

log = logging.getLogger("genesis_pgflow")

# The collector's thresholds while consuming: the young generation is collected every 10,000 net
# allocations instead of 700 (each older one after 10 of the one below, as by default). A
# message's objects live for one batch, yet at the defaults the collector took 0.17 to 0.26 s of a
# drain of 20,000 rule updates (about 7% of the consumer's CPU; 0.04 to 0.05 s with these), and
# the drain ran 8% to 32% faster in three alternating pairs.
GC_THRESHOLDS = (10_000, 10, 10)


# what a log call may pass in `extra=` to appear as a field of its line
LOG_FIELDS = ("queue", "msg_id", "workflow_id", "type", "status", "code", "attempt", "duration_ms")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
    p.add_argument("--processes", metavar="N|auto",
                   help="consumer processes sharing --parallel (default auto: one per usable core, at most "
                        "--parallel; 1 with --metrics-port)")
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
    p.add_argument("--dashboard-actions", action="store_true", default=None,
                   help="let the dashboard on the metrics port requeue dead letters and pause queues (default off)")
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
            metrics_host=args.metrics_host, dashboard_actions=args.dashboard_actions, log_format=args.log_format,
            processes=args.processes)
        setup_logging(settings.log_format, settings.log_level)
        processes, why = how_many(settings.processes, settings.parallel, settings.metrics_port,
                                  usable_cores() if settings.processes == "auto" else 1)
        if processes > 1:
            return consume_in_processes(args, settings, processes, why)
        # Until the consumer runs, SIGTERM ends start-up as Ctrl-C does (KeyboardInterrupt, exit
        # 0): nothing is in flight yet, and a migration under way rolls back with its transaction.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            app = App.open(settings, writable=True)
        except KeyboardInterrupt:
            log.info("stopped by a signal during start-up, before consuming anything")
            return EXIT_OK
        try:
            consumer = app.consumer()
            def stop(signum: int) -> None:
                log.info("signal %s: finishing in-flight work", signum)
                consumer.stop()

            serving = (metrics.serving(app, consumer, settings.metrics_host, settings.metrics_port)
                       if settings.metrics_port is not None else contextlib.nullcontext())
            with on_signals((signal.SIGTERM, signal.SIGINT), stop), serving, _registered(app):
                log.info("consuming %s with %d worker(s)%s", ",".join(settings.queues), settings.parallel,
                         f" ({why})" if why else "")
                # What start-up made (modules, settings, pools) lives as long as the process: kept
                # out of the collector's generations, it is not traversed again by every collection.
                gc.freeze()
                gc.set_threshold(*GC_THRESHOLDS)
                consumer.run()
            log.info("stopped: %s", dict(consumer.stats.outcomes))
        finally:
            app.close()
        return EXIT_OK

    return _guarded(main)


# what each process of --processes is told again on its own command line (the rest: below)
_NOT_PASSED_ON = {"help", "dsn", "parallel", "processes", "no_migrate"}


def consume_in_processes(args: argparse.Namespace, settings: Settings, n: int, why: str) -> int:
    """N genesis-consume processes sharing --parallel, run as one command (processes.py), once
    the database is ready."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)    # start-up ends as Ctrl-C does (exit 0)
    try:
        dsn = prepare_database(settings, writable=True)
    except KeyboardInterrupt:
        log.info("stopped by a signal during start-up, before consuming anything")
        return EXIT_OK
    flags = {a.dest: a.option_strings[-1] for a in consume_parser()._actions if a.option_strings}
    passed_on = [part for dest, value in vars(args).items() if dest not in _NOT_PASSED_ON and value not in (None, False)
                 for part in ([flags[dest]] if value is True else [flags[dest], str(value)])]
    # the DSN in the environment, not on the process list; migrated above, once
    env = {**os.environ, "GENESIS_DATABASE_URL": dsn, "GENESIS_PROCESSES": "1"}
    group = Processes([*passed_on, "--no-migrate"], settings.parallel, n, env, drain=settings.drain, why=why)

    def stop(signum: int) -> None:
        log.info("signal %s: passing it on to the consumer processes", signum)
        group.stop()

    with on_signals((signal.SIGTERM, signal.SIGINT), stop):
        group.start()
        return group.wait()


@contextlib.contextmanager
def on_signals(signums: Sequence[int], action: Callable[[int], None]) -> Iterator[None]:
    """Call action(signum) on a thread of its own when one of these signals arrives, while inside.

    A Python signal handler runs on the main thread between two bytecodes, and that can be while
    the main thread holds the lock inside the very Event it waits on (Condition.wait taking its
    lock back): an Event.set() in the handler then waits for itself, forever. Seen: a SIGTERM that
    never stopped the consumer. So the handler takes no lock: it writes the signal's number to a
    pipe, and a thread that reads the pipe does the work."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def handler(signum: int, _frame: object) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe already holds a signal to act on
            os.write(write_fd, bytes([signum]))

    def relay() -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while signums_read := pipe.read(64):    # b"" once the write end is closed
                for signum in signums_read:
                    try:
                        action(signum)
                    except Exception:  # noqa: BLE001 - the next signal must still be acted on
                        log.exception("acting on signal %s failed", signum)

    thread = threading.Thread(target=relay, name="genesis-signals", daemon=True)
    thread.start()
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        os.close(write_fd)
        thread.join()


@contextlib.contextmanager
def _registered(app: App) -> Iterator[None]:
    """Listed in genesis.consumers while consuming (the heartbeat is a periodic job), stopped after."""
    presence = app.presence()
    presence.register()
    try:
        yield
    finally:
        try:
            presence.stopped()
        except Exception as exc:  # noqa: BLE001 - the database may be away; the row goes stale, shown as gone
            log.warning("could not mark this consumer stopped: %s", exc)


# --- genesis ----------------------------------------------------------------------------------


def _command(sub: Any, name: str, run: Callable[..., int], help: str | None = None) -> argparse.ArgumentParser:
    """A leaf subcommand: runs `run`, and takes --dsn after its name too (`genesis db upgrade --dsn X`)."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    parser.add_argument("--dsn", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(run=run)
    return parser


def _group(sub: Any, name: str, help: str) -> Any:
    return sub.add_parser(name, help=help, description=help).add_subparsers(
        dest=f"{name}_command", required=True, parser_class=_Parser, metavar="command")


def _duration(text: str) -> float:
    """`90s`, `15m`, `1h`, `2d`, `1w` (or plain seconds) as seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 1h, 2d)")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}[match[2]]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _json_argument(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"JSON argument is not valid JSON: {exc}") from None


def admin_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="genesis", description="Administer genesis_pgflow: schema, queues, failures, consumers, state.")
    p.add_argument("--dsn", help="libpq URL or key/value DSN (default: GENESIS_DATABASE_URL, DATABASE_URL, embedded);"
                                 " also accepted after the command")
    p.add_argument("--version", action="version", version=f"genesis {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    db = _group(sub, "db", "the database: schema and how to reach it")
    _command(db, "upgrade", _db_upgrade, "install pgmq, create the queues, migrate the genesis schema")
    url = _command(db, "url", _db_url, "print the DSN of the database (for psql); the password hidden")
    url.add_argument("--show-password", action="store_true")

    send = _command(sub, "send", _send, "send one JSON message to a request queue, checked as the consumer will")
    send.add_argument("queue", type=_request_queue_argument, metavar="QUEUE", help=", ".join(REQUEST_QUEUES))
    send.add_argument("json", type=_json_argument)
    send.add_argument("--raw", action="store_true", help="send the payload unchecked (the consumer still checks it)")
    send.add_argument("--headers", type=_json_argument, metavar="JSON", help="pgmq headers, a JSON object")
    send.add_argument("--header", action="append", default=[], metavar="KEY=VALUE",
                      help="one pgmq header, a string (repeatable; over --headers), e.g. correlation_id=c-42")

    status = _command(sub, "status", _status, "the database, queues, consumers, throughput, failures by code")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true", help="redraw every --interval seconds until Ctrl-C")
    status.add_argument("--interval", type=_duration, default=2.0, help="seconds between redraws (default 2)")

    failures = _command(sub, "failures", _failures, "recent failed runs with their error code and message")
    failures.add_argument("--queue", choices=REQUEST_QUEUES, metavar="QUEUE")
    failures.add_argument("--type", metavar="TYPE", help="payload type, e.g. code_execution_request")
    failures.add_argument("--since", type=_duration, default=86_400.0, metavar="DURATION",
                          help="how far back: 90s, 15m, 1h, 2d, 1w (default 1d)")
    failures.add_argument("--limit", type=_positive, default=50)
    failures.add_argument("--json", action="store_true")

    runs = _group(sub, "runs", "one request message's history")
    show = _command(runs, "show", _runs_show, "a request's run, errors, retries, result and where it is now")
    show.add_argument("queue", choices=REQUEST_QUEUES, metavar="QUEUE")
    show.add_argument("msg_id", type=int, metavar="MSG_ID")
    show.add_argument("--json", action="store_true")

    consumers = _command(sub, "consumers", _consumers, "the consumers registered: running, stopped or gone; "
                                                       "drain or stop them")
    consumers.add_argument("--json", action="store_true")
    steer = consumers.add_subparsers(dest="consumers_command", required=False, parser_class=_Parser, metavar="command")
    for verb, what in (("drain", "take no new messages, finish those held, exit 0"),
                       ("stop", "stop now as SIGTERM does: in-flight work finishes within the grace or is given back")):
        told = _command(steer, verb, _consumers_command, f"tell consumers (ID..., or --all) to {verb}: {what}")
        told.add_argument("ids", nargs="*", metavar="ID", help="a consumer id as `genesis consumers` lists it")
        told.add_argument("--all", action="store_true", help="every consumer not stopped")
        told.set_defaults(command_verb=verb)

    queues = _group(sub, "queues", "the request queues: pause and resume them for every consumer")
    queues_list = _command(queues, "list", _queues_list, "each request queue: paused or not, and its depth")
    queues_list.add_argument("--json", action="store_true")
    for verb, what in (("pause", "no consumer reads the queue from now on (in-flight messages finish)"),
                       ("resume", "consumers read the queue again, no restart needed")):
        paused = _command(queues, verb, _queues_pause if verb == "pause" else _queues_resume, what)
        paused.add_argument("queue", choices=REQUEST_QUEUES, metavar="QUEUE")

    dlq = _group(sub, "dlq", "dead letters")
    dlq_list = _command(dlq, "list", _dlq_list, "the dead letters of a request queue, with their original and error")
    dlq_list.add_argument("queue", choices=REQUEST_QUEUES, metavar="QUEUE")
    dlq_list.add_argument("--limit", type=_positive, default=100)
    dlq_list.add_argument("--json", action="store_true")
    requeue = _command(dlq, "requeue", _dlq_requeue, "send dead letters (all, or the ids given) back to their queue")
    requeue.add_argument("queue", choices=REQUEST_QUEUES, metavar="QUEUE")
    requeue.add_argument("msg_ids", nargs="*", type=int, metavar="MSG_ID")

    rules = _group(sub, "rules", "the active rules")
    rules_list = _command(rules, "list", _rules_list)
    rules_list.add_argument("--namespace")
    rules_list.add_argument("--json", action="store_true")

    llm = _group(sub, "llm-config", "the active LLM configurations")
    llm_show = _command(llm, "show", _llm_show)
    llm_show.add_argument("--provider")
    llm_show.add_argument("--json", action="store_true")

    exps = _group(sub, "experiments", "experiments and their metrics")
    exps_list = _command(exps, "list", _experiments_list)
    exps_list.add_argument("--status", choices=["running", "success", "regressed", "failed"])
    exps_list.add_argument("--limit", type=int, default=50)
    exps_list.add_argument("--json", action="store_true")
    exps_show = _command(exps, "show", _experiments_show)
    exps_show.add_argument("experiment_id")
    exps_show.add_argument("--output", action="store_true",
                           help="also print each run's output tail (sensitive: whatever the tested code printed)")
    exps_show.add_argument("--json", action="store_true", help="the whole record as JSON")
    exps_trends = _command(exps, "trends", _experiments_trends,
                           "per day, experiment type and instance: count, success rate, regression, recommendations")
    exps_trends.add_argument("--days", type=int, default=7, help="the last N UTC days, today included (default 7)")
    exps_trends.add_argument("--json", action="store_true")

    sandbox = _group(sub, "sandbox", "experiment sandboxes")
    cleanup = _command(sandbox, "cleanup", _sandbox_cleanup, "remove sandboxes older than the maximum age")
    cleanup.add_argument("--max-age-days", type=float)
    cleanup.add_argument("--json", action="store_true")

    prune = _command(sub, "prune", _prune, "delete archived requests, finished runs and unread results past their "
                                           "retention ages (GENESIS_RETENTION_*_DAYS); never dead letters")
    prune.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    prune.add_argument("--json", action="store_true")

    board = _command(sub, "dashboard", _dashboard, "serve the dashboard (queues, consumers, failures, dead letters, "
                                                   "experiments) for a browser, read-only unless --actions")
    board.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    board.add_argument("--port", type=int, default=8642, help="port to listen on (default 8642; 0: any free one)")
    board.add_argument("--actions", action="store_true",
                       help="allow requeueing dead letters and pausing queues from the page (POST, with its token)")

    secrets = _group(sub, "secrets", "the key sealing stored secrets (GENESIS_SECRET_KEY)")
    _command(secrets, "rotate", _secrets_rotate, "re-seal every stored secret with the first key of GENESIS_SECRET_KEY")
    return p


def admin_main(argv: Sequence[str] | None = None) -> int:
    args = admin_parser().parse_args(argv)

    def main() -> int:
        settings = Settings.from_env(dsn=args.dsn)
        setup_logging(settings.log_format, "WARNING")
        if args.run in (_db_upgrade, _db_url):   # these work on a database that is not (yet) current
            return int(args.run(settings, args))
        # Operators' commands never change a configured database's schema behind their back (a
        # behind database is exit 2 naming `genesis db upgrade`); the embedded default is ours.
        app = App.open(settings, migrate=settings.dsn is None)
        try:
            return int(args.run(app, args))
        finally:
            app.close()

    return _guarded(lambda: _quiet_on_closed_pipe(main))


def _quiet_on_closed_pipe(main: Callable[[], int]) -> int:
    """`genesis rules list | head -1`: once the reader has gone, stop writing and exit 0 quietly."""
    try:
        code = main()
        sys.stdout.flush()   # here, not at interpreter exit, where a closed pipe is a printed error
        return code
    except BrokenPipeError:
        # whatever is still buffered must not fail again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


# --- output -----------------------------------------------------------------------------------


Column = tuple[str, Callable[[dict[str, Any]], Any]]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dt.datetime):
        return f"{value.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S}Z"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return _escape(str(value))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], *, empty: str = "(none)",
          wrap_last: bool = False) -> str:
    """The one table printer: a header and one line per row, columns as wide as their widest cell
    (numbers right-aligned); the last column is never padded."""
    if not rows:
        return empty
    cells = [[_cell(get(row)) for _, get in columns] for row in rows]
    numeric = [all(isinstance(get(row), (int, float)) or get(row) is None for row in rows) for _, get in columns]
    widths = [max(len(head), *(len(line[i]) for line in cells)) for i, (head, _) in enumerate(columns)]
    last = len(columns) - 1

    def line(values: Sequence[str]) -> str:
        parts = [v if i == last and not numeric[i] else (v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i]))
                 for i, v in enumerate(values)]
        return "  ".join(parts).rstrip()

    return "\n".join([line([head for head, _ in columns]), *(line(values) for values in cells)])


def _field(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: row.get(name)


def _emit(value: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    print(json.dumps(value, indent=2, default=str) if as_json else text(value))


def _clip(text: str | None, limit: int = 100) -> str | None:
    return None if text is None else (text if len(text) <= limit else text[:limit - 1] + "…")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


# --- genesis commands: one function each -------------------------------------------------------


def _db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    report = upgrade_database(settings)
    print(f"pgmq: {report.pgmq}; queues created: {len(report.queues_created)}; "
          f"genesis schema: {report.revision_before or 'none'} -> {report.revision_after}")
    return EXIT_OK


def _db_url(settings: Settings, args: argparse.Namespace) -> int:
    print(shown_dsn(resolve_dsn(settings), show_password=args.show_password))
    return EXIT_OK


def _request_queue_argument(name: str) -> str:
    """Only request queues: a result, dead-letter or reply_to queue is written by consumers alone."""
    role = queue_role(name)
    if role == "request":
        return name
    what = {"result": "a result queue", "dead_letter": "a dead-letter queue (genesis dlq requeue sends dead "
            "letters back)", "reply_to": "a reply_to result queue"}.get(role or "", "not a queue of genesis_pgflow")
    raise argparse.ArgumentTypeError(f"{clip(name, 64)!r} is {what}; genesis send writes only to a request "
                                     f"queue: {', '.join(REQUEST_QUEUES)}")


def _send_headers(args: argparse.Namespace) -> dict[str, Any] | None:
    headers = args.headers
    if headers is not None and not isinstance(headers, dict):
        raise ConfigurationError(f"--headers must be a JSON object, not {type(headers).__name__}")
    for pair in args.header:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"--header {clip(pair, 64)!r} is not KEY=VALUE")
        headers = {**(headers or {}), key: value}
    return headers


def _send(app: App, args: argparse.Namespace) -> int:
    """Checked as the consumer will check it (unless --raw): a payload it would fail is not sent."""
    headers = _send_headers(args)
    if not args.raw:
        try:
            check_request(args.queue, args.json, headers)
        except (InvalidPayload, UnknownType) as exc:
            raise ConfigurationError(f"{exc.code}: {_scrub(exc.message)} (not sent; --raw sends it unchecked)") \
                from None
    print(app.queues.send(args.queue, args.json, headers))
    return EXIT_OK


def _where(app: App) -> dict[str, Any]:
    """The database a command looks at: the DSN without its password, or the embedded server's folder."""
    embedded = app.settings.dsn is None
    return {"dsn": shown_dsn(app.dsn), "embedded": embedded,
            "path": str(app.settings.home / "pgdata") if embedded else None}


def _status_json(app: App) -> dict[str, Any]:
    return {"database": _where(app), **PgAdminStore(app.db).status()}


def _status_text(status: dict[str, Any]) -> str:
    where = status["database"]
    lines = [f"database: embedded at {where['path']} ({where['dsn']})" if where["embedded"]
             else f"database: {where['dsn']}", ""]
    queue_rows = [{"queue": name, **row} for name, row in status["queues"].items()]
    lines.append(table(queue_rows, [("queue", _field("queue"))] + [(c, _field(c)) for c in (
        "depth", "in_flight", "oldest_age_s", "archived", "dead_lettered", "completed", "failed", "retrying")]))
    lines += ["", table([{"type": kind, **row} for kind, row in status["types"].items()],
                        [("type", _field("type"))] + [(c, _field(c)) for c in
                                                     ("completed", "failed", "retrying", "running")],
                        empty="(no runs yet)")]
    paused = status.get("paused_queues", [])
    lines += ["", "paused queues: " + (", ".join(f"{p['queue']} (since {_cell(p['paused_at'])} by {p['paused_by']})"
                                                 for p in paused) or "none")]
    consumers = status["consumers"]
    states = Counter(c["state"] for c in consumers)
    told = Counter(c.get("command") for c in consumers if c["state"] != "stopped")
    lines += ["", f"consumers: {states['running']} running, {states['gone']} gone, {states['stopped']} stopped"
                  + (f"; {told['drain']} draining, {told['stop']} stopping" if told["drain"] or told["stop"] else "")]
    live = [c for c in consumers if c["state"] != "stopped"]
    if live:
        lines.append(_consumers_table(live))
    minute, hour = status["throughput"]["last_minute"], status["throughput"]["last_hour"]
    lines += ["", f"throughput: last minute {minute['completed']} completed, {minute['failed']} failed; "
                  f"last hour {hour['completed']} completed, {hour['failed']} failed"]
    by_code = status["failures_by_code_last_hour"]
    lines += ["", "failures by code, last hour: " + (", ".join(f"{code} {n}" for code, n in by_code.items())
                                                     or "none")]
    return "\n".join(lines)


def _status(app: App, args: argparse.Namespace) -> int:
    if not args.watch:
        _emit(_status_json(app), args.json, _status_text)
        return EXIT_OK
    # Ctrl-C (or SIGTERM) ends the watch between two redraws, never inside a query: exit 0
    stop = threading.Event()
    with on_signals((signal.SIGINT, signal.SIGTERM), lambda _signum: stop.set()):
        while not stop.is_set():
            status = _status_json(app)
            if args.json:   # one object per line, for a pipe
                print(json.dumps(status, default=str), flush=True)
            else:   # clear the screen and redraw in place
                stamp = f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S}Z"
                sys.stdout.write(f"\x1b[H\x1b[2J{stamp}  every {args.interval:g} s, Ctrl-C to stop\n\n"
                                 f"{_status_text(status)}\n")
                sys.stdout.flush()
            stop.wait(args.interval)
    return EXIT_OK


def _failures(app: App, args: argparse.Namespace) -> int:
    rows = PgAdminStore(app.db).failures(since_s=args.since, queue=args.queue, type=args.type, limit=args.limit)
    rows = [{**row, "message": _scrub(row["message"] or ""), "details": redact(row["details"])} for row in rows]
    _emit(rows, args.json, lambda rows: table(rows, [
        ("finished", _field("finished_at")), ("queue", _field("queue")), ("msg_id", _field("msg_id")),
        ("type", _field("type")), ("attempts", _field("attempts")), ("code", _field("code")),
        ("message", lambda r: _clip(r["message"]))], empty="(no failures)"))
    return EXIT_OK


def _runs_show(app: App, args: argparse.Namespace) -> int:
    found = PgAdminStore(app.db).run_history(args.queue, args.msg_id)
    if found is None:
        raise ConfigurationError(f"no message {args.msg_id} in {args.queue}: not queued, archived or run")
    found = redact(found)
    if found["run"] is not None:
        found["run"]["error"] = _safe_error(found["run"]["error"])
    for entry in found["errors"]:
        entry["error"] = _safe_error(entry["error"])
    _emit(found, args.json, _run_text)
    return EXIT_OK


def _run_text(found: dict[str, Any]) -> str:
    lines = [f"{found['queue']} {found['msg_id']}"]
    run = found["run"]
    if run is None:
        lines.append("run: none recorded yet")
    else:
        error = run["error"] or {}
        lines += [f"  {key}: {_cell(run[key])}" for key in (
            "status", "type", "attempts", "workflow_id", "enqueued_at", "started_at", "finished_at",
            "next_attempt_at", "consumer")]
        if error:
            lines.append(f"  error: {error.get('code')}: {error.get('message')}")
        if run["result"] is not None:
            lines.append(f"  result: {json.dumps(run['result'], default=str)}")
    lines += ["", "errors met:", table(found["errors"], [
        ("at", _field("at")), ("attempt", _field("attempt")), ("outcome", _field("outcome")),
        ("code", lambda e: e["error"].get("code")), ("retry_at", _field("retry_at")),
        ("message", lambda e: _clip(e["error"].get("message")))], empty="  (none)")]
    queued, archived, letter = found["in_queue"], found["archived"], found["dead_letter"]
    lines += ["", "where it is: " + (
        f"queued (read {queued['read_ct']} time(s), {'leased' if queued['leased'] else 'visible'} "
        f"at {_cell(queued['vt'])})" if queued else
        f"archived at {_cell(archived['archived_at'])} after {archived['read_ct']} read(s)" if archived else "gone")]
    if letter:
        lines.append(f"dead letter: {letter['queue']} {letter['msg_id']}")
    results = found["results_waiting"]
    lines.append(f"results waiting in {found['results_queue']}: {len(results)}")
    for r in results:
        outcome = r["message"].get("error") or r["message"].get("result")
        lines.append(f"  {r['msg_id']}: {r['message'].get('status')} {json.dumps(outcome, default=str)}")
    return "\n".join(lines)


def _consumer_state(row: dict[str, Any]) -> str:
    """running, gone or stopped; `running, draining` while a drain (or stop) addressed to it is pending."""
    command = row.get("command")
    if command is None or row["state"] == "stopped":
        return str(row["state"])
    return f"{row['state']}, {'draining' if command == 'drain' else 'stopping'}"


def _consumers_table(rows: Sequence[dict[str, Any]]) -> str:
    return table(rows, [
        ("id", _field("id")), ("state", _consumer_state), ("version", _field("version")),
        ("parallel", _field("parallel")), ("in_flight", _field("in_flight")), ("started", _field("started_at")),
        ("heartbeat", lambda c: f"{_age(c['heartbeat_age_s'])} ago"), ("queues", _field("queues"))],
        empty="(no consumers registered)")


def _consumers(app: App, args: argparse.Namespace) -> int:
    _emit(PgAdminStore(app.db).consumers(), args.json, _consumers_table)
    return EXIT_OK


def _operator() -> str:
    """Who issued a pause or a command, as genesis.fleet_control records it: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):     # no name for this uid (a container)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _consumers_command(app: App, args: argparse.Namespace) -> int:
    if bool(args.ids) == args.all:
        raise ConfigurationError(f"`genesis consumers {args.command_verb}` takes consumer ids or --all, "
                                 f"not {'both' if args.all else 'neither'}")
    told = PgAdminStore(app.db).command_consumers(args.command_verb, args.ids, all=args.all, by=_operator())
    if not told:
        print(f"no running consumer to {args.command_verb}")
        return EXIT_OK
    for row in told:
        print(f"{row['id']}: {row['command']}" + ("" if row["command"] == args.command_verb
                                                  else " (already stopping; a stop is not turned into a drain)"))
    print(f"told {len(told)} consumer(s) to {args.command_verb}; `genesis consumers` shows them leave")
    return EXIT_OK


def _queues_list(app: App, args: argparse.Namespace) -> int:
    _emit(PgAdminStore(app.db).queues(), args.json, lambda rows: table(rows, [
        ("queue", _field("queue")), ("type", _field("type")),
        ("state", lambda r: "paused" if r["paused"] else "active"), ("depth", _field("depth")),
        ("paused_since", _field("paused_at")), ("paused_by", _field("paused_by"))]))
    return EXIT_OK


def _queues_pause(app: App, args: argparse.Namespace) -> int:
    if PgAdminStore(app.db).pause_queue(args.queue, by=_operator()):
        print(f"paused {args.queue}: no consumer reads it until `genesis queues resume {args.queue}`")
    else:
        print(f"{args.queue} was paused already")
    return EXIT_OK


def _queues_resume(app: App, args: argparse.Namespace) -> int:
    if PgAdminStore(app.db).resume_queue(args.queue):
        print(f"resumed {args.queue}: the consumers read it again")
    else:
        print(f"{args.queue} was not paused")
    return EXIT_OK


def _dlq_list(app: App, args: argparse.Namespace) -> int:
    letters = [{**row, "message": redact(row["message"]), "error": _safe_error(row["error"])}
               for row in PgAdminStore(app.db).dead_letters(args.queue, args.limit)]
    _emit(letters, args.json, lambda rows: table(rows, [
        ("msg_id", _field("msg_id")), ("dead_since", _field("enqueued_at")),
        ("original", lambda r: f"{r['original_queue']} {r['original_msg_id'] or '?'}"),
        ("attempts", _field("attempts")), ("code", lambda r: (r["error"] or {}).get("code")),
        ("last_error", lambda r: _clip((r["error"] or {}).get("message")))], empty="(no dead letters)"))
    return EXIT_OK


def _dlq_requeue(app: App, args: argparse.Namespace) -> int:
    moved = PgAdminStore(app.db).requeue_dead_letters(args.queue, args.msg_ids)
    for old, new in moved:
        print(f"{old} -> {args.queue} {new}")
    print(f"requeued {len(moved)} message(s)")
    return EXIT_OK


def _rules_list(app: App, args: argparse.Namespace) -> int:
    _emit(app.state.rules(args.namespace), args.json, lambda rows: table(rows, [
        ("rule", lambda r: f"{r['namespace']}/{r['rule_id']}"), ("version", _field("version")),
        ("confidence", _field("confidence")), ("applied", _field("applied_at"))], empty="(no rules)"))
    return EXIT_OK


def _llm_show(app: App, args: argparse.Namespace) -> int:
    _emit(redact(app.state.llm_configs(args.provider)), args.json, lambda rows: table(rows, [
        ("provider", _field("provider")), ("complexity", _field("complexity")), ("version", _field("version")),
        ("models", _field("models")), ("settings", lambda r: json.dumps(r["settings"]))],
        empty="(no LLM configurations)"))
    return EXIT_OK


def _experiments_list(app: App, args: argparse.Namespace) -> int:
    rows = app.experiments.list_experiments(status=args.status, limit=args.limit)
    _emit(rows, args.json, lambda rows: table(rows, [
        ("experiment_id", _field("experiment_id")), ("status", _field("status")),
        ("recommendation", _field("recommendation")), ("started", _field("started_at")),
        ("description", _field("description"))], empty="(no experiments)"))
    return EXIT_OK


def _experiments_show(app: App, args: argparse.Namespace) -> int:
    found = app.experiments.show_experiment(args.experiment_id, output=args.output)
    if found is None:
        raise ConfigurationError(f"no experiment {args.experiment_id!r}")
    _emit(redact(found), args.json, _experiment_text)
    return EXIT_OK


def _experiment_text(found: dict[str, Any]) -> str:
    """One experiment for a person: outcome, per-test classes, flaky tests, performance deltas,
    phases, runs and sandbox history (the result's parts once it is decided)."""
    result = found.get("result") or {}
    metrics_ = found.get("metrics") or {}
    outcome = ", ".join(str(v) for v in (found["status"], found.get("recommendation"),
                                         "rolled back" if found.get("rolled_back") else None) if v)
    lines = [f"experiment {found['experiment_id']} ({found['experiment_type']}, instance {found['instance_id']}, "
             f"risk {found['risk_level']}): {outcome}",
             f"repo {found['repo']} @ {found['base_ref']}; baseline {(found.get('baseline_commit') or '-')[:12]}, "
             f"change {(found.get('change_commit') or '-')[:12]}; attempts {found.get('attempts')}",
             "metrics: " + ", ".join(f"{k} {v}" for k, v in metrics_.items() if v is not None)
             + (f"; counted by {result['counted_by']}" if result.get("counted_by") else "")]
    if found.get("error"):
        lines.append(f"error: {found['error'].get('code')}: {found['error'].get('message')}")
    phases = found.get("phases") or {}
    if phases:
        lines.append("phases: " + ", ".join(f"{name} (attempt {p['attempt']})" for name, p in phases.items()))
    if "classes" in result:
        order = ["pass->pass", "pass->fail", "fail->pass", "fail->fail"]   # the record's JSON keeps no order
        classes = sorted(result["classes"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9)
        lines += ["", table([{"class": k, "tests": v} for k, v in classes],
                            [("class", _field("class")), ("tests", _field("tests"))])]
        for title, key in (("regressions", "regressions"), ("fixed", "fixed"), ("flaky tests", "flaky")):
            tests = result.get(key) or []
            lines.append(f"{title}: " + (", ".join(tests) if tests else "(none)"))
    lines += _performance_lines(result.get("performance"))
    runs = found.get("runs") or []
    lines += ["", table(runs, [("attempt", _field("attempt")), ("step", _field("step")), ("phase", _field("phase")),
                               ("commit", lambda r: (r.get("commit_sha") or "-")[:12]), ("passed", _field("passed")),
                               ("failed", _field("failed")), ("errors", _field("errors")),
                               ("skipped", _field("skipped")), ("duration_ms", _field("duration_ms"))],
                        empty="(no test runs)")]
    for run in runs:
        if "output_tail" in run:
            lines += ["", f"output of the {run['phase']} run (attempt {run['attempt']}):", run["output_tail"] or ""]
    events = found.get("sandbox_events") or []
    lines.append("sandbox: " + (", ".join(e["event"] for e in events) if events else "(no events)"))
    return "\n".join(lines)


def _performance_lines(perf: dict[str, Any] | None) -> list[str]:
    """The performance section as a table of baseline, change and relative change."""
    if not perf:
        return []
    before, after, change = perf.get("baseline") or {}, perf.get("change") or {}, perf.get("relative_change") or {}
    rows = [{"measure": k, "baseline": before.get(k), "change": after.get(k), "relative_change": change.get(k)}
            for k in before]
    rows += [{"measure": f"metric {name}", **m} for name, m in (perf.get("metrics") or {}).items()]
    lines = ["", table(rows, [("measure", _field("measure")), ("baseline", _field("baseline")),
                              ("change", _field("change")), ("relative_change", _field("relative_change"))])]
    slower = perf.get("slower_tests") or []
    lines.append("slower tests: " + (", ".join(f"{s['test']} {s['baseline_ms']:g} -> {s['change_ms']:g} ms"
                                               for s in slower) if slower else "(none)"))
    return lines


def _experiments_trends(app: App, args: argparse.Namespace) -> int:
    rows = reports.trends(app.db, args.days)
    _emit(rows, args.json, lambda rows: table(rows, [
        ("day", _field("day")), ("type", _field("experiment_type")), ("instance", _field("instance_id")),
        ("experiments", _field("experiments")), ("success_rate", _field("success_rate")),
        ("mean_regression", _field("mean_regression")), ("merge", _field("merge")),
        ("review", _field("merge_with_review")), ("reject", _field("reject"))],
        empty=f"(no experiment finished in the last {args.days} day(s))"))
    return EXIT_OK


def _sandbox_cleanup(app: App, args: argparse.Namespace) -> int:
    report = maintenance.cleanup_sandboxes(app.settings, app.experiments, max_age_days=args.max_age_days)
    _emit(report.as_json(), args.json, lambda r: (
        f"removed {len(r['removed'])} sandbox(es), freed {r['bytes_freed']} bytes; kept {len(r['kept'])}"
        + (f"; errors: {r['errors']}" if r["errors"] else "")) if r["ran"] else
        "another process is cleaning up right now; nothing done")
    return EXIT_OK


def _prune(app: App, args: argparse.Namespace) -> int:
    report = PgRetention(app.db).prune(RetentionPolicy.of(app.settings), dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    _emit(report.as_json(), args.json, lambda r: (
        f"{verb} {r['total']} row(s)" + "".join(f"\n  {table}: {n}" for table, n in r["deleted"].items() if n)
        + ("" if args.dry_run else f"\n({r['batches']} batch(es), {r['seconds']:g} s)")) if r["ran"] else
        "another process is pruning right now; nothing done")
    return EXIT_OK


def _secrets_rotate(app: App, args: argparse.Namespace) -> int:
    changed = app.state.reseal_secrets()
    print(f"re-sealed with the first key: the secrets of {changed['configurations']} stored LLM configuration(s) "
          f"and {changed['dead_letters']} dead letter(s)")
    return EXIT_OK


def _dashboard(app: App, args: argparse.Namespace) -> int:
    board = dashboard.Dashboard.for_app(app, actions=args.actions, bind_host=args.host, served_by="genesis dashboard")
    server = metrics.serve_http(args.host, args.port, board.get_routes(), board.post_routes(), what="dashboard")
    stop = threading.Event()
    try:
        shown = f"[{args.host}]" if ":" in args.host else args.host
        mode = "actions enabled" if args.actions else "read-only"
        print(f"dashboard on http://{shown}:{server.server_port}/ ({mode}); Ctrl-C to stop", flush=True)
        with on_signals((signal.SIGINT, signal.SIGTERM), lambda _signum: stop.set()):
            stop.wait()     # until SIGTERM or Ctrl-C: exit 0
    finally:
        server.shutdown()
        server.server_close()
    return EXIT_OK
