"""The producer: reads messages, never more than the workers can start soon.

Room for a queue is the free workers plus a prefetch: as many messages as will start within
prefetch_horizon_s at the pace its handler has shown (none before a run has shown it), so that
quick handlers are fed a batch ahead while slow workflows are never hoarded. A queue whose
handler is inline (it only works out a write: rule and LLM configuration updates) has a whole
batch of room: its messages run on the loop's thread as they are read. A read is made only
once there is room for a reasonable batch (or nothing runs), the queues are taken in turn, a
paused queue is skipped, and nothing is read while the completer is backed up (the database is
slow to take what was done: reading more would only hold more leases).

A queue whose last read came back short is empty as far as anyone knows: while a LISTEN
connection tells of new messages (`listening`), it is read again only once a NOTIFY for it has
been heard (`notified`) or a poll interval has passed (messages whose retry delay or lost lease
ran out come back without a NOTIFY). So a job finishing, a batch written or a message on another
queue costs no read of it: each read is a round trip that costs the consumer about as much CPU
as the work of a small message. Without a LISTEN connection every queue is read every turn."""

from __future__ import annotations

import threading
from collections.abc import Callable

from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.messages import QUEUES, Outcome, ReadMessage
from genesis_pgflow.store.queue import QueueStore

from .completer import Completer, write_most
from .executor import Executor
from .options import ConsumerOptions


class Producer:
    def __init__(self, store: QueueStore, dispatcher: Dispatcher, executor: Executor, completer: Completer,
                 options: ConsumerOptions, monotonic: Callable[[], float]):
        self.store = store
        self.dispatcher = dispatcher
        self.executor = executor
        self.completer = completer
        self.options = options
        self.monotonic = monotonic
        # outcomes waiting to be written beyond which nothing is read
        # (two of the completer's largest writes: one under way, one waiting)
        self.max_backlog = 2 * write_most(max(options.batch_size, options.parallel))
        self.listening = False      # a LISTEN connection tells of new messages (set by the loop's listener)
        self._rotation = 0
        self._lock = threading.Lock()
        self._heard: dict[str, int] = dict.fromkeys(options.queues, 0)     # NOTIFYs heard, per queue
        # queue -> (NOTIFYs heard, when) as of the start of a read that came back short
        self._empty: dict[str, tuple[int, float]] = {}

    def notified(self, queues: set[str] | frozenset[str]) -> None:
        """New messages may be in these queues (a NOTIFY, or listening has just begun)."""
        with self._lock:
            for queue in queues:
                self._heard[queue] = self._heard.get(queue, 0) + 1

    def worth_reading(self, queue: str) -> bool:
        """Not known to be empty: no LISTEN to rely on, no short read yet, a NOTIFY heard since
        the last short read, or a poll interval gone by since it (less the poll's jitter)."""
        with self._lock:
            empty = self._empty.get(queue)
            if not self.listening or empty is None:
                return True
            heard, at = empty
            return self._heard.get(queue, 0) != heard or self.monotonic() - at >= 0.8 * self.options.poll_interval_s

    def _read(self, queue: str, qty: int) -> list[ReadMessage]:
        with self._lock:
            heard, at = self._heard.get(queue, 0), self.monotonic()
        messages = self.store.read(queue, qty, self.options.lease_s, waited_s=self.options.take_after_s)
        with self._lock:
            if len(messages) < qty:
                self._empty[queue] = (heard, at)     # a NOTIFY heard during the read counts as news
            else:
                self._empty.pop(queue, None)         # full: there may be more
        return messages

    def free_slots(self) -> int:
        """Workers neither running nor promised to a leased message."""
        return max(0, self.options.parallel - self.executor.busy())

    def prefetch(self, queue: str) -> int:
        """How many messages of a queue may wait for a worker: as many as will start within the
        horizon at the pace its handler has shown, none before the pace is known."""
        pace = self.executor.pace(QUEUES[queue][0] if queue in QUEUES else None)
        if pace is None:
            return 0
        return min(self.options.batch_size,
                   int(self.options.parallel * self.options.prefetch_horizon_s / max(pace, 1e-6)))

    def room(self, queue: str) -> int:
        if self.inline(queue):      # run as read, on this thread: no worker to wait for
            return self.options.batch_size
        return self.options.parallel + self.prefetch(queue) - self.executor.busy()

    def inline(self, queue: str) -> bool:
        """Whether the queue's handler runs on the loop's thread as it is read (handlers.base.Handler)."""
        handler = self.dispatcher.handlers.get(QUEUES[queue][0]) if queue in QUEUES else None
        return bool(getattr(handler, "inline", False))

    def fetch(self, paused: frozenset[str] = frozenset()) -> int:
        """Lease what the workers can start soon, taking the queues in turn; returns how many."""
        if self.completer.backlog() >= self.max_backlog:
            return 0
        fetched = 0
        queues = self.options.queues
        for i in range(len(queues)):
            name = queues[(self._rotation + i) % len(queues)]
            if name in paused:     # the store refuses it too; this saves the round trip
                with self._lock:
                    self._empty.pop(name, None)     # read at once when resumed
                continue
            room = self.room(name)
            worth_it = max(1, min(self.options.parallel + self.prefetch(name), self.options.batch_size) // 2)
            if room <= 0 or (self.executor.running and room < worth_it) or not self.worth_reading(name):
                continue
            messages = self._read(name, min(room, self.options.batch_size))
            # what is answered at once (inline runs, refusals) goes to the completer in one hand-over
            self.completer.add([o for o in map(self.start, messages) if o is not None])
            fetched += len(messages)
        self._rotation = (self._rotation + 1) % len(queues)
        return fetched

    def start(self, message: ReadMessage) -> Outcome | None:
        """Into the pool (None); or its outcome at once: run here when its handler is inline (it
        only works out a write), or answered before any handler runs (invalid, unknown type, too
        large, out of attempts)."""
        prepared = self.dispatcher.prepare(message)
        if isinstance(prepared, Outcome):
            return prepared
        if getattr(prepared.handler, "inline", False):
            return self.executor.run_inline(prepared)
        self.executor.start(prepared)
        return None
