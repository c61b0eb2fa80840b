"""Poison messages sent with plain SQL: whatever PostgreSQL accepted, the consumer does not exit,
answers it with a failure, and goes on with the next message."""

from __future__ import annotations

import signal

import pytest

from .conftest import RULES, RULES_RESULTS, FaultDb
from .consumers import Consumers, cli_env

pytestmark = [pytest.mark.faults, pytest.mark.db]

DEEP = 5000


@pytest.mark.parametrize("where", ["payload", "field"])
def test_a_jsonb_nested_5000_deep_is_answered_and_the_consumer_goes_on(where: str, fault_db: FaultDb,
                                                                        consumers: Consumers, genesis_home) -> None:
    nested = "[" * DEEP + "]" * DEEP
    body = nested if where == "payload" else (
        '{"type": "genesis_rule_update", "namespace": "p", "rule_id": "deep", "confidence": 0.9, '
        f'"version": 1, "rule": {{"x": {nested}}}}}')
    [poison] = [r["msg_id"] for r in fault_db.sql("SELECT pgmq.send(%s, %s::jsonb) AS msg_id", (RULES, body))]
    fault_db.sent.setdefault(RULES, []).append(poison)
    consumer = consumers.start("--queues", RULES, "--poll-interval-ms", "100", "--no-migrate",
                               env=cli_env(genesis_home, fault_db.dsn))
    fault_db.wait_answered([poison], timeout=60)
    healthy = fault_db.send_rules(3)
    fault_db.wait_answered(healthy, timeout=60)
    assert consumer.running(), consumer.stderr()

    [answer] = fault_db.sql(f"""
        SELECT message->>'status' AS status, message->'error'->>'code' AS code
        FROM pgmq.q_{RULES_RESULTS} WHERE (message->'request'->>'msg_id')::bigint = %s""", (poison,))
    if where == "payload":
        assert answer["status"] == "failed" and answer["code"] in ("invalid_payload", "payload_too_large"), answer
    else:   # a deep rule body is the producer's business: stored or refused, but answered either way
        assert answer["status"] in ("completed", "failed"), answer
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(timeout=60) == 0, consumer.stderr()
    fault_db.check()
