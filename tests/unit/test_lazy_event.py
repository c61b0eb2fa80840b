"""LazyEvent behaves as threading.Event does (it only makes its Condition later)."""

import threading

from genesis_pgflow.handlers.base import LazyEvent


def test_set_before_wait_returns_at_once():
    event = LazyEvent()
    assert not event.is_set() and event.wait(0) is False
    event.set()
    assert event.is_set() and event.wait(0) is True and event.wait() is True


def test_a_waiter_is_woken_by_set_from_another_thread():
    event, waiting, woke = LazyEvent(), threading.Event(), []

    def waiter():
        waiting.set()
        woke.append(event.wait(30))

    thread = threading.Thread(target=waiter)
    thread.start()
    assert waiting.wait(10)
    event.set()
    thread.join(10)
    assert woke == [True] and not thread.is_alive()


def test_clear_makes_wait_wait_again():
    event = LazyEvent()
    event.set()
    event.wait(0)
    event.clear()
    assert not event.is_set() and event.wait(0.01) is False
    event.set()
    assert event.wait(0) is True
