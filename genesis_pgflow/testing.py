"""In-memory twins of the stores and a fake clock, so the loop and handlers are tested without a database.

The twins follow pgmq's semantics (visibility timeout, read count, archive) closely enough to pass
the same conformance suite as the PostgreSQL stores (tests/conformance)."""

from __future__ import annotations

import datetime as dt
import itertools
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genesis_pgflow.messages import (
    Outcome,
    ReadMessage,
    RunStart,
    all_queue_names,
    dead_letter_headers,
    dead_letter_queue,
    envelope,
    redact,
    request_headers,
    settle,
)
from genesis_pgflow.store.control import Command, ControlState
from genesis_pgflow.store.state import (
    Applied,
    LlmConfig,
    RuleVersion,
    decide_rule,
    same_config,
)


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
               what: str = "the condition") -> Any:
    """Poll predicate until it returns something truthy (returned), or fail after timeout seconds:
    tests wait on conditions, never on fixed sleeps."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class CliProcess:
    """A console script (`genesis-consume`, `genesis`) running in the background, its stderr
    collected line by line as it arrives: what tests that drive the real CLI wait for and show."""

    line_timeout_s = 30.0       # how long wait_for_line waits by default

    def __init__(self, script: Path, *args: str, env: dict[str, str], stdout: int = subprocess.PIPE):
        self.args = args
        self.proc = subprocess.Popen([str(script), *args], env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                     stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, pattern: str, timeout: float | None = None) -> str:
        """The first stderr line matching pattern, waiting for it; AssertionError (with stderr) if
        none comes in time or the process ends without one."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + (self.line_timeout_s if timeout is None else timeout)
        with self._changed:
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no stderr line matching {pattern!r} (exit {self.proc.poll()}); "
                                         "got:\n" + self.stderr())
                self._changed.wait(min(left, 0.2))

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stderr(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def _finish(self) -> None:
        """After exit: the reader has the last lines, and the pipes are closed."""
        self._reader.join(timeout=5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None and not self._reader.is_alive():
                pipe.close()


class FakeClock:
    """A monotonic clock that only moves when told to; sleep() moves it."""

    def __init__(self, start: float = 1000.0):
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds

    sleep = advance

    def utc(self) -> dt.datetime:
        return dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=self.now)


@dataclass
class _Stored:
    msg_id: int
    body: Any
    enqueued_at: dt.datetime
    vt: float
    read_ct: int = 0
    headers: Any = None


@dataclass
class MemoryQueueStore:
    """QueueStore in memory; `clock` gives seconds (a FakeClock in tests)."""

    consumer: str = "test:1"
    clock: Callable[[], float] = field(default_factory=lambda: FakeClock())
    queues: dict[str, dict[int, _Stored]] = field(default_factory=dict)
    archives: dict[str, list[_Stored]] = field(default_factory=dict)
    runs: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    # when set, every call the consumer makes raises it: an outage (psycopg.OperationalError) or a
    # refusal (e.g. psycopg.errors.ReadOnlySqlTransaction); producers' send() still works
    failure: BaseException | None = None
    # the control table's twin: paused queues (queue -> who paused it), commands (consumer -> command)
    paused: dict[str, str] = field(default_factory=dict)
    commands: dict[str, Command] = field(default_factory=dict)
    honoured: dict[str, Command] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        self._sends: Counter[str] = Counter()       # per queue: what wait_for_messages hears of
        self._listening = threading.local()
        self._control_changed = threading.Condition(self._lock)
        self._control_version = 0
        self._control_heard = 0
        for name in all_queue_names():
            self.queues.setdefault(name, {})
            self.archives.setdefault(name, [])

    def _now_utc(self) -> dt.datetime:
        return dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=self.clock())

    def _fail(self) -> None:
        if self.failure is not None:
            raise self.failure

    def read(self, queue: str, qty: int, lease_s: int, *, waited_s: float = 0.0) -> list[ReadMessage]:
        self._fail()
        with self._lock:
            if queue in self.paused:        # as the SQL: a paused queue is read for nothing
                return []
            now = self.clock()
            visible = sorted((m for m in self.queues[queue].values() if m.vt <= now - waited_s),
                             key=lambda m: m.msg_id)[:qty]
            out = []
            for m in visible:
                m.vt = now + lease_s
                m.read_ct += 1
                out.append(ReadMessage(queue, m.msg_id, m.read_ct, m.enqueued_at, m.body, m.headers))
            return out

    def complete(self, outcomes: Sequence[Outcome]) -> list[Outcome]:
        self._fail()
        with self._lock:
            applied = []
            # only what is still queued is finished here (a lost lease is not), deferred writes first
            mine = settle([o for o in outcomes if o.message.msg_id in self.queues[o.message.queue]], None)
            for o in mine:
                stored = self.queues[o.message.queue].pop(o.message.msg_id)
                self.archives[o.message.queue].append(stored)
                destination = o.message.destination
                if destination not in self.queues:      # a reply_to queue's first use, as pgmq.create
                    self.queues[destination], self.archives[destination] = {}, []
                self._send(destination, envelope(o, self.consumer), request_headers(o))
                if o.kind == "dead_letter":
                    self._send(dead_letter_queue(o.message.queue), o.message.body, dead_letter_headers(o))
                self.runs.setdefault((o.message.queue, o.message.msg_id), {}).update(
                    status=o.status, workflow_id=o.workflow_id, attempts=o.message.read_ct,
                    type=_type(o.message.body), consumer=self.consumer,
                    error=o.error.as_json() if o.error and o.kind != "completed" else None,
                    result=redact(o.result) if o.kind == "completed" else None)
                applied.append(o)
            return applied

    def retry(self, outcomes: Sequence[Outcome]) -> None:
        self._fail()
        with self._lock:
            for o in outcomes:
                stored = self.queues[o.message.queue].get(o.message.msg_id)
                if stored is not None and stored.read_ct == o.message.read_ct:
                    stored.vt = self.clock() + o.retry_after_s
                    run = self.runs.setdefault((o.message.queue, o.message.msg_id), {})
                    if run.get("status") not in ("completed", "failed"):
                        run.update(status="pending", attempts=o.message.read_ct, type=_type(o.message.body),
                                   consumer=self.consumer, error=o.error.as_json() if o.error else None)

    def record_running(self, runs: Sequence[RunStart]) -> None:
        self._fail()
        with self._lock:
            for r in runs:
                stored = self.queues[r.message.queue].get(r.message.msg_id)
                run = self.runs.get((r.message.queue, r.message.msg_id), {})
                if (stored is None or stored.read_ct != r.message.read_ct
                        or run.get("status") in ("completed", "failed") or run.get("attempts", 0) > r.message.read_ct):
                    continue
                self.runs[(r.message.queue, r.message.msg_id)] = {
                    **run, "status": "running", "attempts": r.message.read_ct, "type": _type(r.message.body),
                    "consumer": self.consumer, "error": None}

    def extend_leases(self, queue: str, msg_ids: Sequence[int], lease_s: int) -> set[int]:
        self._fail()
        with self._lock:
            kept = set()
            for msg_id in msg_ids:
                if msg_id in self.queues[queue]:
                    self.queues[queue][msg_id].vt = self.clock() + lease_s
                    kept.add(msg_id)
            return kept

    def release(self, queue: str, msg_ids: Sequence[int], read_cts: Sequence[int] | None = None) -> None:
        self._fail()
        with self._lock:
            for msg_id, read_ct in zip(msg_ids, read_cts if read_cts is not None else [None] * len(msg_ids),
                                       strict=True):
                stored = self.queues[queue].get(msg_id)
                if (stored is not None and stored.vt > self.clock()    # still leased: the read is uncounted
                        and read_ct in (None, stored.read_ct)):
                    stored.vt = self.clock()
                    stored.read_ct = max(0, stored.read_ct - 1)
                    run = self.runs.get((queue, msg_id))
                    if run is not None and run.get("status") == "running":
                        run.update(status="pending", attempts=max(0, run.get("attempts", 1) - 1))

    def wait_for_messages(self, queues: Sequence[str], timeout_s: float) -> set[str]:
        """As a LISTEN connection per calling thread: every queue the first time (just listening),
        then the queues sent to since that thread's last call."""
        self._fail()
        with self._arrived:
            seen: dict[str, int] | None = getattr(self._listening, "seen", None)
            if seen is None:
                self._listening.seen = {q: self._sends[q] for q in queues}
                return set(queues)

            def news() -> set[str]:
                return {q for q in queues if self._sends[q] != seen.get(q, 0)}
            self._arrived.wait_for(lambda: bool(news()), min(timeout_s, 0.05))
            heard = news()
            seen.update({q: self._sends[q] for q in heard})
            return heard

    def send(self, queue: str, body: Any, headers: Any = None) -> int:
        with self._lock:
            return self._send(queue, body, headers)

    def _send(self, queue: str, body: Any, headers: Any = None) -> int:
        msg_id = next(self._ids)
        self.queues[queue][msg_id] = _Stored(msg_id, body, self._now_utc(), self.clock(), headers=headers)
        self._sends[queue] += 1
        self._arrived.notify_all()
        return msg_id

    def depth(self, queues: Sequence[str]) -> int:
        self._fail()
        with self._lock:
            return sum(len(self.queues[q]) for q in queues)

    def close(self) -> None:
        pass

    # --- the control table (ControlStore, and the admin store's pause_queue & co.) ----------

    def control_state(self) -> ControlState:
        self._fail()
        with self._lock:
            return ControlState(frozenset(self.paused), self.commands.get(self.consumer))

    def wait_for_control(self, timeout_s: float) -> bool:
        """True if the control state changed since the last call (as notifications wait on a
        LISTEN connection until they are read)."""
        self._fail()
        with self._control_changed:
            if self._control_version == self._control_heard:
                self._control_changed.wait(min(timeout_s, 0.05))
            changed = self._control_version != self._control_heard
            self._control_heard = self._control_version
            return changed

    def command_honoured(self, command: Command) -> None:
        self._fail()
        with self._lock:
            if self.commands.get(self.consumer) == command:
                self.honoured[self.consumer] = command

    def pause_queue(self, queue: str, by: str | None = None) -> bool:
        with self._lock:
            if queue in self.paused:
                return False
            self.paused[queue] = by or "test"
            self._control_notify()
            return True

    def resume_queue(self, queue: str) -> bool:
        with self._lock:
            if self.paused.pop(queue, None) is None:
                return False
            self._control_notify()
            return True

    def paused_queues(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"queue": q, "paused_at": None, "paused_by": by} for q, by in sorted(self.paused.items())]

    def command_consumer(self, consumer: str, command: Command) -> Command:
        """Address drain or stop to a consumer; a stop is never turned into a drain."""
        with self._lock:
            if self.commands.get(consumer) != "stop":
                self.commands[consumer] = command
                self.honoured.pop(consumer, None)
                self._control_notify()
            return self.commands[consumer]

    def _control_notify(self) -> None:
        self._control_version += 1
        self._control_changed.notify_all()

    # --- for assertions -------------------------------------------------------------------

    def messages(self, queue: str) -> list[Any]:
        with self._lock:
            return [m.body for m in sorted(self.queues[queue].values(), key=lambda m: m.msg_id)]

    def headers(self, queue: str) -> list[Any]:
        """The pgmq headers of the messages in a queue, oldest first."""
        with self._lock:
            return [m.headers for m in sorted(self.queues[queue].values(), key=lambda m: m.msg_id)]

    def queue_names(self) -> set[str]:
        """Every queue that exists, as pgmq.list_queues() names them."""
        with self._lock:
            return set(self.queues)

    def archived(self, queue: str) -> list[int]:
        with self._lock:
            return [m.msg_id for m in self.archives[queue]]


def _type(body: Any) -> str | None:
    return body.get("type") if isinstance(body, dict) else None


@dataclass
class MemoryStateStore:
    """StateStore in memory."""

    rule_versions: dict[tuple[str, str], dict[int, RuleVersion]] = field(default_factory=dict)
    llm_versions: dict[tuple[str, str], list[LlmConfig]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def bound(self, tx: Any) -> MemoryStateStore:
        """No transactions in memory: every write is made at once."""
        return self

    def apply_writes(self, writes: Sequence[tuple[RuleVersion | LlmConfig, str]]) -> list[tuple[Applied, int]]:
        return [self.apply_rule(w, wf) if isinstance(w, RuleVersion) else self.apply_llm_config(w, wf)
                for w, wf in writes]

    def apply_rule(self, rule: RuleVersion, workflow_id: str) -> tuple[Applied, int]:
        with self._lock:
            versions = self.rule_versions.setdefault((rule.namespace, rule.rule_id), {})
            active = max(versions) if versions else None
            decision = decide_rule(active, rule.version)
            if decision == "applied":
                versions[rule.version] = rule
                return decision, rule.version
            return decision, active  # type: ignore[return-value]

    def rules(self, namespace: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            out = []
            for (ns, rule_id), versions in sorted(self.rule_versions.items()):
                if versions and namespace in (None, ns):
                    r = versions[max(versions)]
                    out.append({"namespace": ns, "rule_id": rule_id, "version": r.version,
                                "confidence": r.confidence, "rule": r.rule})
            return out

    def apply_llm_config(self, config: LlmConfig, workflow_id: str) -> tuple[Applied, int]:
        with self._lock:
            history = self.llm_versions.setdefault((config.provider, config.complexity), [])
            active = vars(history[-1]) | {"version": len(history)} if history else None
            if same_config(active, config):
                return "unchanged", len(history)
            history.append(config)
            return "applied", len(history)

    def llm_configs(self, provider: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [{**vars(h[-1]), "version": len(h)} for (p, _c), h in sorted(self.llm_versions.items())
                    if h and provider in (None, p)]


__all__ = ["FakeClock", "MemoryQueueStore", "MemoryStateStore", "wait_until"]
