"""A property-based (hypothesis) state machine of the message lifecycle: send, read, complete, fail,
retry, release, lease expiry, time passing and dead-lettering, in any order, against the in-memory
store and the PostgreSQL one with the same rules. After every step: no request answered twice, a
request is archived exactly when it is answered, handlers never run more than max_attempts times;
at the end, everything drained: every request answered once, none lost."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from genesis_pgflow.dispatcher import Dispatcher, Task
from genesis_pgflow.errors import LowConfidence, RetryableError
from genesis_pgflow.handlers.base import WorkContext
from genesis_pgflow.messages import Outcome, dead_letter_queue, result_queue
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.queue import PgQueueStore
from genesis_pgflow.testing import FakeClock, MemoryQueueStore

from .conftest import RULES, FaultDb

pytestmark = [pytest.mark.faults]

MAX_ATTEMPTS = 3
LEASE_S = 600          # real seconds for PostgreSQL: no lease runs out by itself during an example
RETRY_BASE_S = 600     # ditto for retry delays: only the `time_passes` rule makes them visible
RESULTS, DLQ = result_queue(RULES), dead_letter_queue(RULES)


class Adapter(Protocol):
    """One store under test, plus what the machine needs to look inside it and move time."""

    store: Any

    def expire(self, msg_id: int) -> None: ...
    def time_passes(self) -> None: ...
    def answers(self) -> list[int]: ...          # request msg_ids of the result messages, with repeats
    def archived(self) -> list[int]: ...
    def queued(self) -> list[int]: ...
    def dead_letters(self) -> int: ...
    def run_status(self) -> dict[int, str]: ...
    def close(self) -> None: ...


class MemoryAdapter:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.store = MemoryQueueStore(clock=self.clock)

    def expire(self, msg_id: int) -> None:
        stored = self.store.queues[RULES].get(msg_id)
        if stored is not None:
            stored.vt = self.clock()

    def time_passes(self) -> None:
        self.clock.advance(10 * max(LEASE_S, RETRY_BASE_S))

    def answers(self) -> list[int]:
        return [m["request"]["msg_id"] for m in self.store.messages(RESULTS)]

    def archived(self) -> list[int]:
        return self.store.archived(RULES)

    def queued(self) -> list[int]:
        return sorted(self.store.queues[RULES])

    def dead_letters(self) -> int:
        return len(self.store.messages(DLQ))

    def run_status(self) -> dict[int, str]:
        return {msg_id: run["status"] for (queue, msg_id), run in self.store.runs.items() if queue == RULES}

    def close(self) -> None:
        pass


class PgAdapter:
    """PgQueueStore on one database of the throwaway server, emptied before each example."""

    def __init__(self, db: Database):
        self.db = db
        self.store = PgQueueStore(db, "machine:1")
        self._sql(f"TRUNCATE pgmq.q_{RULES}, pgmq.a_{RULES}, pgmq.q_{RESULTS}, pgmq.a_{RESULTS}, pgmq.q_{DLQ}, pgmq.a_{DLQ}, "
                  "genesis.workflow_runs")

    def _sql(self, statement: str, params: Any = None) -> list[Any]:
        def tx(conn: Any) -> list[Any]:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []
        return self.db.run(tx)

    def expire(self, msg_id: int) -> None:
        self._sql("SELECT pgmq.set_vt(%s, %s::bigint, 0)", (RULES, msg_id))

    def time_passes(self) -> None:
        self._sql(f"SELECT pgmq.set_vt(%s, msg_id, 0) FROM pgmq.q_{RULES}", (RULES,))

    def answers(self) -> list[int]:
        return [r["id"] for r in self._sql(
            f"SELECT (message->'request'->>'msg_id')::bigint AS id FROM pgmq.q_{RESULTS}")]

    def archived(self) -> list[int]:
        return [r["msg_id"] for r in self._sql(f"SELECT msg_id FROM pgmq.a_{RULES}")]

    def queued(self) -> list[int]:
        return [r["msg_id"] for r in self._sql(f"SELECT msg_id FROM pgmq.q_{RULES} ORDER BY msg_id")]

    def dead_letters(self) -> int:
        return int(self._sql(f"SELECT count(*) AS n FROM pgmq.q_{DLQ}")[0]["n"])

    def run_status(self) -> dict[int, str]:
        return {r["msg_id"]: r["status"] for r in self._sql(
            "SELECT msg_id, status FROM genesis.workflow_runs WHERE queue = %s", (RULES,))}

    def close(self) -> None:
        self.store.close()


class Scripted:
    """The rule handler of the machine: does what the rule being played tells it to."""

    payload_type = "genesis_rule_update"

    def __init__(self) -> None:
        self.next: str = "ok"
        self.runs: dict[int, int] = {}

    def __call__(self, payload: Any, ctx: WorkContext) -> dict[str, Any]:
        self.runs[ctx.msg_id] = self.runs.get(ctx.msg_id, 0) + 1
        if self.next == "permanent":
            raise LowConfidence("below the minimum confidence")
        if self.next == "transient":
            raise RetryableError("try again later")
        return {"rule_id": payload.rule_id}


@dataclass
class Message:
    """The model of one request: what the store must show."""

    visible: bool = True
    read_ct: int = 0
    done: bool = False
    dead: bool = False
    answers: int = 0


@dataclass
class Lease:
    """A task this machine (a consumer) holds, possibly stale."""

    task: Task
    read_ct: int = field(default=0)


def lifecycle_machine(make_adapter: Callable[[], Adapter]) -> type[RuleBasedStateMachine]:
    class Lifecycle(RuleBasedStateMachine):
        leases = Bundle("leases")

        def __init__(self) -> None:
            super().__init__()
            self.adapter = make_adapter()
            self.store = self.adapter.store
            self.handler = Scripted()
            self.dispatcher = Dispatcher({Scripted.payload_type: self.handler}, timeout_s=30,
                                         max_attempts=MAX_ATTEMPTS, retry_base_s=RETRY_BASE_S,
                                         retry_max_s=RETRY_BASE_S * 2)
            self.model: dict[int, Message] = {}

        # --- producers and consumers --------------------------------------------------------

        @rule(n=st.integers(1, 3))
        def send(self, n: int) -> None:
            for _ in range(n):
                msg_id = self.store.send(RULES, {"type": "genesis_rule_update", "namespace": "m",
                                                 "rule_id": f"r{len(self.model)}", "confidence": 0.9,
                                                 "rule": {}})
                assert msg_id not in self.model
                self.model[msg_id] = Message()

        @rule(target=leases, qty=st.integers(1, 4))
        def read(self, qty: int) -> Any:
            visible = sorted(i for i, m in self.model.items() if m.visible and not m.done)
            got = self.store.read(RULES, qty, LEASE_S)
            assert [m.msg_id for m in got] == visible[:qty], "read the oldest visible messages, no others"
            held = []
            for message in got:
                model = self.model[message.msg_id]
                model.read_ct += 1
                model.visible = False
                assert message.read_ct == model.read_ct
                prepared = self.dispatcher.prepare(message)
                if isinstance(prepared, Outcome):       # read more than max_attempts times: not run
                    assert prepared.kind == "dead_letter" and model.read_ct > MAX_ATTEMPTS
                    self._finish(prepared)
                else:
                    held.append(Lease(prepared, message.read_ct))
            return multiple(*held)

        def _run(self, lease: Lease, behaviour: str) -> Outcome:
            self.handler.next = behaviour
            ctx = self.dispatcher.context(lease.task, float("inf"))
            return self.dispatcher.execute(lease.task, ctx)

        def _finish(self, outcome: Outcome) -> None:
            model = self.model[outcome.message.msg_id]
            applied = self.store.complete([outcome])
            # pgmq knows no lease owner: whoever archives first answers, and nobody after
            assert len(applied) == (0 if model.done else 1)
            if applied:
                model.done, model.visible, model.answers = True, False, model.answers + 1
                model.dead = outcome.kind == "dead_letter"

        @rule(lease=consumes(leases), behaviour=st.sampled_from(["ok", "permanent"]))
        def finish(self, lease: Lease, behaviour: str) -> None:
            self._finish(self._run(lease, behaviour))

        @rule(lease=consumes(leases))
        def fail_transiently(self, lease: Lease) -> None:
            outcome = self._run(lease, "transient")
            if outcome.kind == "dead_letter":
                assert lease.read_ct >= MAX_ATTEMPTS
                self._finish(outcome)
                return
            assert outcome.kind == "retry" and lease.read_ct < MAX_ATTEMPTS
            self.store.retry([outcome])
            # a retry delays the message if still queued and this read is its latest; it stays
            # invisible until time passes. A stale lease's retry (read again since) changes nothing.
            model = self.model[lease.task.message.msg_id]
            if not model.done and lease.read_ct == model.read_ct:
                model.visible = False

        @rule(lease=consumes(leases))
        def give_back(self, lease: Lease) -> None:
            """A graceful shutdown hands the message back unrun: visible at once, no attempt spent."""
            model = self.model[lease.task.message.msg_id]
            if model.done or model.visible or lease.read_ct != model.read_ct:
                return               # a stale lease: its message moved on, nothing to give back
            self.store.release(RULES, [lease.task.message.msg_id])
            model.visible = True
            model.read_ct -= 1

        @rule(lease=leases)
        def lease_expires(self, lease: Lease) -> None:
            model = self.model[lease.task.message.msg_id]
            self.adapter.expire(lease.task.message.msg_id)
            if not model.done:
                model.visible = True

        @rule()
        def time_passes(self) -> None:
            self.adapter.time_passes()
            for model in self.model.values():
                if not model.done:
                    model.visible = True

        # --- what must hold after every step -----------------------------------------------------

        @invariant()
        def answered_once_archived_once(self) -> None:
            answers = self.adapter.answers()
            assert len(answers) == len(set(answers)), f"answered twice: {sorted(answers)}"
            archived = self.adapter.archived()
            assert sorted(answers) == sorted(archived), "answered exactly what was archived"
            assert set(archived) == {i for i, m in self.model.items() if m.done}
            assert self.adapter.queued() == sorted(i for i, m in self.model.items() if not m.done)

        @invariant()
        def attempts_bounded(self) -> None:
            assert all(n <= MAX_ATTEMPTS for n in self.handler.runs.values()), self.handler.runs

        @invariant()
        def finished_runs_are_terminal(self) -> None:
            status = self.adapter.run_status()
            for msg_id, model in self.model.items():
                if model.done:
                    assert status.get(msg_id) in ("completed", "failed"), (msg_id, status.get(msg_id))

        def teardown(self) -> None:
            try:
                self._drain()
            finally:
                self.adapter.close()

        def _drain(self) -> None:
            """Everything still queued is read and answered: none was lost."""
            for _ in range(MAX_ATTEMPTS + 3):
                if all(m.done for m in self.model.values()):
                    break
                self.time_passes()
                for lease in self.read(qty=1000).values:
                    self.finish(lease, "ok")
            assert all(m.done and m.answers == 1 for m in self.model.values())
            self.answered_once_archived_once()
            self.finished_runs_are_terminal()
            assert self.adapter.dead_letters() == sum(m.dead for m in self.model.values())

    return Lifecycle


SETTINGS = settings(max_examples=30, stateful_step_count=30, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
# each step is a few round trips: fewer, shorter examples keep it within a minute on a loaded machine
PG_SETTINGS = settings(SETTINGS, max_examples=15, stateful_step_count=20)


def test_the_lifecycle_in_memory() -> None:
    run_state_machine_as_test(lifecycle_machine(MemoryAdapter), settings=SETTINGS)


@pytest.mark.db
@pytest.mark.slow
def test_the_lifecycle_in_postgresql(fault_db: FaultDb) -> None:
    db = Database(fault_db.dsn, max_size=2).open()
    try:
        run_state_machine_as_test(lifecycle_machine(lambda: PgAdapter(db)), settings=PG_SETTINGS)
    finally:
        db.close()
    # the machine checks its own invariants after every step, over messages it sent itself (the
    # fixture's teardown check knows only what fault_db.send sent, so it would see strangers)
    fault_db.checked = True
