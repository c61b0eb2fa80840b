"""A signal must reach its action even when it lands while the main thread holds the lock the
action needs: the consumer's main thread spends its idle time inside Event.wait, which takes the
Event's lock back the moment it wakes, and a SIGTERM landing then once left it waiting forever."""

from __future__ import annotations

import os
import signal
import threading

from genesis_pgflow.cli import on_signals


def test_a_signal_landing_while_the_main_thread_holds_the_events_lock_still_sets_it() -> None:
    stop = threading.Event()
    seen: list[int] = []

    def action(signum: int) -> None:
        seen.append(signum)
        stop.set()

    with on_signals((signal.SIGUSR1,), action):
        # hold the Event's own lock, as Condition.wait does while taking it back; the handler
        # runs on this thread before os.kill returns to the next line. A handler calling
        # stop.set() itself would block here on a lock this thread holds: the test would hang
        # until pytest-timeout failed it.
        with stop._cond:  # type: ignore[attr-defined]
            os.kill(os.getpid(), signal.SIGUSR1)
            assert not stop.is_set()    # not acted on inside the handler
        assert stop.wait(timeout=60)
    assert seen == [signal.SIGUSR1]


def test_the_previous_handlers_are_back_after_and_the_relay_thread_is_gone() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    with on_signals((signal.SIGUSR2,), lambda _signum: None):
        assert signal.getsignal(signal.SIGUSR2) is not before
        assert any(t.name == "genesis-signals" for t in threading.enumerate())
    assert signal.getsignal(signal.SIGUSR2) is before
    assert not any(t.name == "genesis-signals" for t in threading.enumerate())


def test_an_action_that_fails_does_not_end_the_relay() -> None:
    seen: list[int] = []

    def action(signum: int) -> None:
        seen.append(signum)
        if len(seen) == 1:
            raise RuntimeError("the first stop failed")

    with on_signals((signal.SIGUSR1,), action):
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
    assert seen == [signal.SIGUSR1, signal.SIGUSR1]


def test_every_signal_is_relayed_in_order() -> None:
    seen: list[int] = []
    with on_signals((signal.SIGUSR1, signal.SIGUSR2), seen.append):
        for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR1):
            os.kill(os.getpid(), signum)
    # leaving joins the relay, which reads every byte written before the pipe's end closed
    assert seen == [signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR1]
