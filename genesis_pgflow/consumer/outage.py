"""The database's absence as the consumer sees it: the backoff between attempts, one log line
when an outage begins, a summary while it lasts, one line when it ends, and the budget after
which the consumer gives up (exit 2). Shared by the loop, the completer and the LISTEN thread."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from genesis_pgflow.errors import DatabaseUnavailable
from genesis_pgflow.store.database import first_line

log = logging.getLogger(__package__)


@dataclass(frozen=True)
class Backoff:
    """first_s * 2**(n-1) after the n-th failure in a row, capped, times a random factor in
    [0.5, 1). The cap is short on purpose: a failed attempt costs one connection attempt, and the
    first message after the database is back should not wait out a long sleep."""

    first_s: float = 0.1
    max_s: float = 1.0

    def delay(self, failures: int, rand: float) -> float:
        return min(self.max_s, self.first_s * 2 ** max(0, min(failures, 30) - 1)) * (0.5 + rand / 2)


class Outage:
    """The database's absence as the consumer sees it (shared by the loop and the LISTEN thread):
    since when, how many failed attempts, the last error. It logs one line when the database goes,
    one summary per report period while it stays away and one when it is back, and ends the
    consumer (DatabaseUnavailable, exit 2) once the outage outlasts its budget."""

    def __init__(self, max_outage_s: float, *, monotonic: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random, report_every_s: float = 60.0,
                 backoff: Backoff = Backoff(), on_down: Callable[[], None] = lambda: None):
        self.max_outage_s = max_outage_s
        # called once when an outage begins: whoever noticed it (a periodic job, say), the loop
        # must start its own attempts, which alone end the outage, rather than sleep out its poll
        self.on_down = on_down
        self.monotonic = monotonic
        self.rand = rand
        self.report_every_s = report_every_s
        self.backoff = backoff
        self.since: float | None = None
        self.attempts = 0           # failed attempts in this outage
        self.last_error = ""
        self.count = 0              # outages since the start
        self._next_report = 0.0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException, *, budget: bool = True) -> float:
        """A failed attempt: how long to wait before the next one. Raises DatabaseUnavailable
        past the budget (unless budget is False: shutting down anyway)."""
        now = self.monotonic()
        with self._lock:
            self.last_error = first_line(exc)
            began = self.since is None
            if self.since is None:
                self.since, self.attempts, self._next_report = now, 0, now + self.report_every_s
                self.count += 1
                log.warning("database unavailable (%s); retrying quietly, giving up after %.0f s",
                            self.last_error, self.max_outage_s)
            elif now >= self._next_report:
                self._next_report = now + self.report_every_s
                log.warning("database still unavailable after %.0f s: %d failed attempt(s), last error: %s",
                            now - self.since, self.attempts + 1, self.last_error)
            self.attempts += 1
            since = self.since
            gone = now - since
            # the last attempt falls due when the budget does, not a backoff later
            delay = min(self.backoff.delay(self.attempts, self.rand()), since + self.max_outage_s - now)
        if began:
            self.on_down()
        if budget and gone >= self.max_outage_s:
            raise DatabaseUnavailable(f"database unreachable for {gone:.0f} s "
                                      f"(last error: {self.last_error}); giving up")
        return delay

    def recovered(self) -> None:
        if self.since is None:
            return
        with self._lock:
            if self.since is None:
                return
            log.info("database back after %.1f s (%d failed attempt(s))", self.monotonic() - self.since,
                     self.attempts)
            self.since, self.attempts = None, 0
