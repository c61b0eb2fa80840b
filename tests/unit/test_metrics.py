"""Metrics rendered by a real prometheus-client registry, the HTTP endpoints, and the log formats."""

import datetime as dt
import json
import logging
import socket
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from genesis_pgflow import metrics
from genesis_pgflow.cli import JsonFormatter, TextFormatter
from genesis_pgflow.consumer import Consumer, ConsumerOptions
from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.errors import ConfigurationError, PermanentError, RetryableError
from genesis_pgflow.testing import FakeClock, MemoryQueueStore

Q = "genesis_rule_updates"
RESULTS = "genesis_rule_updates_results"
RULE = "genesis_rule_update"
FORGED = 'x"} 1\ngenesis_forged_total{queue="a'


def rule(i=1, **extra):
    return {"type": RULE, "namespace": "ns", "rule_id": f"r{i}", "confidence": 0.9, "rule": {}, **extra}


class Handler:
    """Succeeds, unless the rule is rule('perm'), rule('again') (retryable) or rule('slow') (blocks)."""

    payload_type = RULE

    def __call__(self, payload, ctx):
        if payload.rule_id == "rperm":
            raise PermanentError("no")
        if payload.rule_id == "ragain":
            raise RetryableError("later")
        if payload.rule_id == "rslow":
            ctx.cancelled.wait(10)
        return {"status": "applied"}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(clock):
    return MemoryQueueStore(clock=clock)


def make(store, clock, *, max_attempts=3, timeout_s=5.0):
    dispatcher = Dispatcher({RULE: Handler()}, timeout_s=timeout_s, max_attempts=max_attempts, retry_base_s=2.0,
                            retry_max_s=60.0, clock=lambda: clock.utc(), rand=lambda: 0.0)
    options = ConsumerOptions(queues=(Q,), parallel=2, batch_size=10, poll_interval_s=0.01, lease_s=10)
    return Consumer(store, dispatcher, options, monotonic=clock, rand=lambda: 0.5)


def settle(consumer, until, rounds=400):
    for _ in range(rounds):
        consumer.run_once(wait_s=0.05)
        if until():
            return
    raise AssertionError("condition not reached")


def families(watched):
    text = watched.exposition().decode()
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def value(found, family, sample_name, **labels):
    matches = [s.value for s in found[family].samples if s.name == sample_name and s.labels == labels]
    assert len(matches) == 1, (sample_name, labels, found[family].samples)
    return matches[0]


def test_a_forged_payload_type_adds_no_series_and_no_line(store, clock):
    consumer = make(store, clock)
    watched = metrics.ConsumerMetrics(consumer)
    watched.watch()
    for body in ({"type": FORGED}, rule(1, type=FORGED), {"type": "}\n"}, {"type": RULE + "\n"}, rule(2)):
        store.send(Q, body)
    settle(consumer, lambda: len(store.messages(RESULTS)) == 5)

    text, found = families(watched)
    assert "genesis_forged" not in found and not any(line.startswith("genesis_forged") for line in text.splitlines())
    results = [s for s in found["genesis_results"].samples if s.name == "genesis_results_total"]
    for sample in results:
        assert sample.labels["queue"] in metrics.KNOWN_QUEUES
        assert sample.labels["type"] in (*metrics.KNOWN_TYPES, "other")
        assert sample.labels["status"] in ("completed", "failed")
    # four known queues x two statuses, and the one "other" series the four forged types share
    assert len(results) == 9
    assert value(found, "genesis_results", "genesis_results_total", queue=Q, type="other", status="failed") == 4
    assert value(found, "genesis_results", "genesis_results_total", queue=Q, type=RULE, status="completed") == 1
    lines = [line for line in text.splitlines() if line.startswith("genesis_results_total{")]
    assert len(lines) == 9


@pytest.mark.parametrize("raw, expected", [
    (RULE, RULE), (FORGED, "other"), (None, "other"), (42, "other"), ("", "other"), ("code_execution_request", "code_execution_request"),
])
def test_type_labels_are_the_four_known_types_or_other(raw, expected):
    assert metrics.type_label(raw) == expected


def test_outcomes_are_counted_by_queue_type_and_kind(store, clock):
    consumer = make(store, clock, max_attempts=2, timeout_s=5.0)
    watched = metrics.ConsumerMetrics(consumer)
    watched.watch()
    store.send(Q, rule("ok"))
    store.send(Q, rule("perm"))
    store.send(Q, rule("again"))
    store.send(Q, [1])                                       # refused before running: no duration
    # the clock moves on, so the retry becomes visible: its second attempt is its last
    settle(consumer, lambda: clock.advance(1) or len(store.messages(RESULTS)) == 4)
    store.send(Q, rule("slow"))
    settle(consumer, lambda: consumer.running)
    clock.advance(6)                                         # past its 5 s timeout
    settle(consumer, lambda: len(store.messages(RESULTS)) == 5)

    _, found = families(watched)
    results = {(s.labels["type"], s.labels["status"]): s.value for s in found["genesis_results"].samples
               if s.name == "genesis_results_total" and s.labels["queue"] == Q}
    assert results == {(RULE, "completed"): 1, (RULE, "failed"): 3, ("other", "failed"): 1}
    assert value(found, "genesis_retries", "genesis_retries_total", queue=Q, type=RULE) == 1
    assert value(found, "genesis_dead_letters", "genesis_dead_letters_total", queue=Q, type=RULE) == 1
    assert value(found, "genesis_timeouts", "genesis_timeouts_total", queue=Q, type=RULE) == 1
    histogram = "genesis_handler_duration_seconds"
    # ok, perm, again (retry), again (dead letter), slow: five runs of the rule handler; [1] never ran
    assert value(found, histogram, histogram + "_count", type=RULE) == 5
    assert value(found, histogram, histogram + "_bucket", type=RULE, le="+Inf") == 5
    assert value(found, histogram, histogram + "_sum", type=RULE) >= 6.0        # the timed-out one: 6 s
    assert not [s for s in found[histogram].samples if s.labels.get("type") == "other"]
    assert value(found, "genesis_consumer_workers", "genesis_consumer_workers") == 2
    assert value(found, "genesis_consumer_in_flight", "genesis_consumer_in_flight") >= 0


def get(server, path):
    url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_the_endpoints_and_a_stalled_loop(store, clock):
    consumer = make(store, clock)
    watched = metrics.ConsumerMetrics(consumer, stale_after_s=30)
    server = metrics.serve(watched, "127.0.0.1", 0)
    try:
        status, content_type, body = get(server, "/metrics")
        assert status == 200 and content_type == "text/plain; version=0.0.4; charset=utf-8"
        assert "genesis_consumer_free_slots 2.0" in body
        assert get(server, "/healthz")[0] == 200
        assert get(server, "/readyz")[0] == 200
        assert get(server, "/metrics/?x=1")[0] == 200
        assert get(server, "/nothing")[0] == 404
        clock.advance(31)                       # the loop has not turned for longer than the limit
        status, _, body = get(server, "/healthz")
        assert status == 503 and "stalled" in body
    finally:
        server.shutdown()
        server.server_close()


def test_a_taken_port_is_a_configuration_error_naming_it(store, clock):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError) as raised:
            metrics.serve(metrics.ConsumerMetrics(make(store, clock)), "127.0.0.1", port)
    assert raised.value.message == f"metrics port {port} on 127.0.0.1 is already in use"


# --- logs ---------------------------------------------------------------------------------


def record(msg, *args, level=logging.INFO, exc_info=None, **extra):
    made = logging.LogRecord("genesis_pgflow.consumer", level, __file__, 1, msg, args, exc_info)
    made.__dict__.update(extra)
    made.created = dt.datetime(2026, 12, 3, 10, 0, 0, 123456, tzinfo=dt.timezone.utc).timestamp()
    return made


def test_json_lines_have_an_iso_utc_timestamp_and_the_given_fields():
    line = JsonFormatter().format(record("finished %s/%s", Q, 7, queue=Q, msg_id=7, type=RULE, status="completed",
                                         duration_ms=12.5, workflow_id="w-1", unrelated="not shown"))
    entry = json.loads(line)
    assert entry == {"ts": "2026-12-03T10:00:00.123456+00:00", "level": "INFO", "logger": "genesis_pgflow.consumer",
                     "message": f"finished {Q}/7", "queue": Q, "msg_id": 7, "type": RULE, "status": "completed",
                     "duration_ms": 12.5, "workflow_id": "w-1"}
    assert dt.datetime.fromisoformat(entry["ts"]).utcoffset() == dt.timedelta(0)


def test_secrets_never_reach_a_log_line():
    payload = {"provider": "claude", "settings": {"api_key": "sk-live-1234", "nested": [{"password": "hunter2"}]}}
    try:
        raise ValueError("bad config token=tok-5678")
    except ValueError:
        failing = sys.exc_info()
    records = [
        record("payload %s", payload),
        record("connecting to postgresql://genesis:pa55word@db/x with api_key='sk-live-1234' and \"secret\": \"s3\""),
        record("failed", exc_info=failing, type="password=hunter2"),
    ]
    for formatter in (JsonFormatter(), TextFormatter()):
        text = "\n".join(formatter.format(r) for r in records)
        for secret in ("sk-live-1234", "hunter2", "pa55word", "tok-5678", "s3\""):
            assert secret not in text, (formatter, text)
        assert "[redacted]" in text and "claude" in text


def test_text_lines_are_short_and_cannot_be_forged():
    formatter = TextFormatter()
    line = formatter.format(record("unknown type %r", FORGED, type=FORGED, queue=Q))
    assert line.startswith("2026-12-03 10:00:00.123Z INFO    consumer: unknown type ")
    assert "\n" not in line and f"queue={Q}" in line and "type=" in line
