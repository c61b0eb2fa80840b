"""The producer: reads messages, never more than the workers can start soon.

Room for a queue is the free workers plus a prefetch: as many messages as will start within
prefetch_horizon_s at the pace its handler has shown (none before a run has shown it), so that
quick handlers are fed a batch ahead while slow workflows are never hoarded. A read is made only
once there is room for a reasonable batch (or nothing runs), the queues are taken in turn, a
paused queue is skipped, and nothing is read while the completer is backed up (the database is
slow to take what was done: reading more would only hold more leases)."""

from __future__ import annotations

from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.messages import QUEUES, Outcome, ReadMessage
from genesis_pgflow.store.queue import QueueStore

from .completer import Completer
from .executor import Executor
from .options import ConsumerOptions


class Producer:
    def __init__(self, store: QueueStore, dispatcher: Dispatcher, executor: Executor, completer: Completer,
                 options: ConsumerOptions):
        self.store = store
        self.dispatcher = dispatcher
        self.executor = executor
        self.completer = completer
        self.options = options
        # outcomes waiting to be written beyond which nothing is read
        self.max_backlog = 2 * max(options.batch_size, options.parallel)
        self._rotation = 0

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
        return self.options.parallel + self.prefetch(queue) - self.executor.busy()

    def fetch(self, paused: frozenset[str] = frozenset()) -> int:
        """Lease what the workers can start soon, taking the queues in turn; returns how many."""
        if self.completer.backlog() >= self.max_backlog:
            return 0
        fetched = 0
        queues = self.options.queues
        for i in range(len(queues)):
            name = queues[(self._rotation + i) % len(queues)]
            if name in paused:     # the store refuses it too; this saves the round trip
                continue
            room = self.room(name)
            worth_it = max(1, min(self.options.parallel + self.prefetch(name), self.options.batch_size) // 2)
            if room <= 0 or (self.executor.running and room < worth_it):
                continue
            for message in self.store.read(name, min(room, self.options.batch_size), self.options.lease_s):
                self.start(message)
                fetched += 1
        self._rotation = (self._rotation + 1) % len(queues)
        return fetched

    def start(self, message: ReadMessage) -> None:
        """Into the pool, or straight to the completer when the message is answered before any
        handler runs (invalid, unknown type, too large, out of attempts)."""
        prepared = self.dispatcher.prepare(message)
        if isinstance(prepared, Outcome):
            self.completer.add([prepared])
        else:
            self.executor.start(prepared)
