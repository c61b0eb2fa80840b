"""kill -9 of the real consumer at random points, across --parallel and --batch-size, restarted each
time until the queue is drained: nothing lost, nothing answered twice."""

from __future__ import annotations

import os
import random
import time
from collections import Counter

import psycopg
import pytest

from genesis_pgflow.testing import wait_until

from .conftest import RULES, FaultDb, rule
from .consumers import Consumers, cli_env, run_cli

pytestmark = [pytest.mark.faults, pytest.mark.db, pytest.mark.slow]

KILLS_PER_CONFIGURATION = 4         # x 6 configurations: 24 kills per run
STEP = 60                           # answers between two kills at most (a random share of it)
TOP_UP = 2000                       # unanswered requests kept ahead of each kill, per 10 of the batch size


def _seed() -> int:
    return int(os.environ.get("GENESIS_FAULTS_SEED") or random.SystemRandom().randrange(2**32))


@pytest.mark.parametrize(("parallel", "batch_size"), [(1, 1), (1, 10), (1, 100), (4, 1), (4, 10), (4, 100)],
                         ids=lambda v: str(v))
def test_kill_9_at_random_points_then_restart_until_drained(parallel: int, batch_size: int, fault_db: FaultDb,
                                                             consumers: Consumers, genesis_home) -> None:
    seed = _seed()
    rng = random.Random(seed)
    # enough that the last kill comes before the drain, at whatever speed: a batch answers up to
    # batch_size at once, and what a killed consumer held is answered again after its lease
    total = KILLS_PER_CONFIGURATION * (STEP + 150 + 3 * batch_size) + 100
    ids = fault_db.send_rules(total)
    # what a killed consumer held comes back within 2 s; five reads before a dead letter, so that
    # a message leased in several killed batches is still run
    env = cli_env(genesis_home, fault_db.dsn, GENESIS_LEASE_S="2")
    args = ("--parallel", str(parallel), "--batch-size", str(batch_size), "--queues", RULES,
            "--poll-interval-ms", "100", "--max-attempts", "5", "--no-migrate")

    # topped up so that the kill comes before the drain however fast the consumer is: in the random
    # pause below it answers as many as its rate allows (at -p 4 -b 100, two processes, over 3,000
    # in the 0.2 s)
    top_up = TOP_UP * (1 + batch_size // 10)
    killed_with_leases = 0
    for _ in range(KILLS_PER_CONFIGURATION):
        if total - fault_db.answered() < top_up:
            ids += fault_db.send_rules(top_up, start=total)
            total += top_up
        victim = consumers.start(*args, env=env)
        target = min(fault_db.answered() + rng.randint(0, STEP), total - 1)   # 0: killed while starting up
        wait_until(lambda t=target, v=victim: fault_db.answered() >= t or not v.running(), timeout=120, interval=0.02,
                   what=f"{target} answers (seed {seed})")
        time.sleep(rng.uniform(0, 0.2))
        assert victim.running(), f"the consumer exited on its own (seed {seed}):\n{victim.stderr()}"
        victim.kill()
        killed_with_leases += fault_db.held() > 0
    assert fault_db.answered() < total, f"drained before the last kill (seed {seed}): send more messages"

    drained = run_cli("--drain", *args, env=env, timeout=300)
    assert drained.returncode == 0, drained.stderr

    fault_db.check()
    outcomes = Counter((m["status"], (m["error"] or {}).get("code")) for m in fault_db.results())
    assert set(outcomes) <= {("completed", None), ("failed", "max_attempts_exceeded")}, (seed, outcomes)
    assert outcomes[("completed", None)] >= total - 50, (seed, outcomes)
    assert sorted(fault_db.answered_ids()) == sorted(ids)


def test_a_consumer_killed_between_a_rules_write_and_its_result_leaves_one_outcome(
        fault_db: FaultDb, consumers: Consumers, genesis_home) -> None:
    """The rule's new version is written in the completion transaction of its message (issue 9):
    held after the write, as its result is written (a trigger on the results queue waits on a lock
    this test holds), the consumer is killed; the write goes with the transaction, and the next
    delivery applies it and answers `applied`, once. Were the write committed on its own, as it was
    before, the retry would answer `unchanged`."""
    fault_db.sql("""
        CREATE FUNCTION genesis.test_hold_result() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_lock(4242);
            PERFORM pg_advisory_unlock(4242);
            RETURN NULL;
        END $$;
        CREATE TRIGGER test_hold AFTER INSERT ON pgmq.q_genesis_rule_updates_results
            FOR EACH ROW EXECUTE FUNCTION genesis.test_hold_result();""")
    [msg_id] = fault_db.send(RULES, [rule("held")])
    env = cli_env(genesis_home, fault_db.dsn, GENESIS_LEASE_S="2")
    args = ("--queues", RULES, "--poll-interval-ms", "100", "--no-migrate")
    with psycopg.connect(fault_db.dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(4242)")
        victim = consumers.start(*args, env=env)

        def waiting_backend() -> int | None:
            rows = fault_db.sql("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 "
                                "AND NOT granted")
            return rows[0]["pid"] if rows else None
        wait_until(lambda: waiting_backend() is not None or not victim.running(), timeout=120, interval=0.02,
                   what="the consumer's completion transaction waiting as it writes the result")
        backend = waiting_backend()
        assert backend is not None, victim.stderr()
        victim.kill()
        holder.execute("SELECT pg_advisory_unlock(4242)")
    # the orphaned transaction finds its client gone and rolls back
    wait_until(lambda: not fault_db.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)),
               timeout=120, interval=0.05, what="the killed consumer's backend gone")
    assert fault_db.scalar("SELECT count(*) FROM genesis.rule_versions") == 0
    assert fault_db.answered() == 0

    drained = run_cli("--drain", *args, env=env, timeout=300)
    assert drained.returncode == 0, drained.stderr
    fault_db.check()
    [answer] = fault_db.results()
    assert answer["request"]["msg_id"] == msg_id
    assert answer["status"] == "completed" and answer["result"]["status"] == "applied", answer
    assert fault_db.scalar("SELECT count(*) FROM genesis.rule_versions") == 1
