"""Steering the loop (genesis.fleet_control's twin in memory): a paused queue is not read and is
read again once resumed; drain finishes what is held and returns; stop is SIGTERM's path; a lost
or silent control channel is made up for by reading the table at the heartbeat."""

import threading

import pytest

from genesis_pgflow.consumer import Consumer, ConsumerOptions
from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.testing import FakeClock, MemoryQueueStore, wait_until

Q, OTHER = "genesis_rule_updates", "genesis_llm_config_updates"
RESULTS = "genesis_rule_updates_results"
ME = "test:1"


def rule(i):
    return {"type": "genesis_rule_update", "namespace": "ns", "rule_id": f"r{i}", "confidence": 0.9, "rule": {}}


class Handler:
    """Answers at once, or (gated) waits until released or cancelled."""

    payload_type = "genesis_rule_update"

    def __init__(self, gated=False):
        self.gated = gated
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    def __call__(self, payload, ctx):
        self.calls += 1
        self.entered.set()
        if self.gated:
            while not self.release.is_set() and not ctx.cancelled.is_set():
                self.release.wait(0.01)
        return {"rule_id": payload.rule_id}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(clock):
    return MemoryQueueStore(consumer=ME, clock=clock)


def make(store, clock, handler, *, queues=(Q,), control=None, parallel=1, grace=30.0, drain=False,
         control_poll_s=5.0):
    dispatcher = Dispatcher({handler.payload_type: handler}, timeout_s=30.0, max_attempts=3, retry_base_s=2.0,
                            retry_max_s=60.0, clock=lambda: clock.utc(), rand=lambda: 0.0)
    options = ConsumerOptions(queues=queues, parallel=parallel, batch_size=10, poll_interval_s=0.01, lease_s=60,
                              shutdown_grace_s=grace, drain=drain, control_poll_s=control_poll_s)
    return Consumer(store, dispatcher, options, monotonic=clock, rand=lambda: 0.5,
                    control=store if control is None else control)


def running(consumer):
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    return thread


def test_a_paused_queue_is_skipped_and_read_again_once_resumed(store, clock):
    consumer = make(store, clock, Handler())
    store.pause_queue(Q)
    assert consumer.refresh_control() and consumer.paused == {Q}
    msg_id = store.send(Q, rule(1))
    for _ in range(5):
        consumer.run_once(wait_s=0.01)
    assert store.messages(RESULTS) == [] and store.runs == {}       # never leased

    store.resume_queue(Q)
    consumer.refresh_control()
    assert consumer.paused == frozenset()
    wait_until(lambda: consumer.run_once(wait_s=0.01) is not None and store.messages(RESULTS), 10,
               what="the result after resume")
    assert store.archived(Q) == [msg_id]


def test_a_running_consumer_obeys_pause_and_resume_without_a_restart(store, clock):
    consumer = make(store, clock, Handler())
    thread = running(consumer)
    try:
        store.pause_queue(Q)
        wait_until(lambda: consumer.paused == {Q}, 10, what="the pause, through the channel")
        store.send(Q, rule(1))
        store.send(OTHER, {"type": "genesis_llm_config_update"})     # not consumed here: untouched
        assert store.messages(RESULTS) == []
        assert store.runs == {}
        store.resume_queue(Q)
        wait_until(lambda: store.messages(RESULTS), 10, what="the result after resume")
    finally:
        consumer.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_drain_takes_nothing_new_finishes_what_it_holds_and_returns(store, clock):
    handler = Handler(gated=True)
    consumer = make(store, clock, handler)
    held = store.send(Q, rule(1))
    thread = running(consumer)
    assert handler.entered.wait(10)
    store.command_consumer(ME, "drain")
    wait_until(consumer.draining.is_set, 10, what="the drain, through the channel")
    assert store.honoured == {ME: "drain"}
    later = store.send(Q, rule(2))
    handler.release.set()
    thread.join(10)
    assert not thread.is_alive()
    [result] = store.messages(RESULTS)
    assert result["status"] == "completed" and result["request"]["msg_id"] == held
    assert store.messages(Q) == [rule(2)] and (Q, later) not in store.runs     # left for another consumer


def test_stop_is_the_sigterm_path_and_gives_unfinished_work_back(store, clock):
    handler = Handler(gated=True)
    consumer = make(store, clock, handler, grace=0.0)
    msg_id = store.send(Q, rule(1))
    thread = running(consumer)
    assert handler.entered.wait(10)
    store.command_consumer(ME, "stop")
    thread.join(10)
    assert not thread.is_alive() and consumer.stopping.is_set()
    assert store.messages(RESULTS) == []
    [again] = store.read(Q, 1, lease_s=10)
    assert again.msg_id == msg_id and again.read_ct == 1        # given back, the attempt uncounted


class Deaf(MemoryQueueStore):
    """A control channel that never says anything changed (notifications lost), or cannot listen."""

    broken = False

    def wait_for_control(self, timeout_s):
        if self.broken:
            raise OSError("control channel lost")
        threading.Event().wait(min(timeout_s, 0.01))
        return False


@pytest.mark.parametrize("broken", [False, True], ids=["silent", "lost"])
def test_a_missed_notification_is_made_up_for_at_the_next_heartbeat_read(clock, broken):
    store = Deaf(consumer=ME, clock=clock)
    store.broken = broken
    consumer = make(store, clock, Handler(), control_poll_s=5.0)
    thread = running(consumer)
    try:
        store.pause_queue(Q)
        clock.advance(1.0)
        assert consumer.paused == frozenset()               # not heard, not yet read
        def read_at_the_heartbeat():
            clock.advance(5.0)
            return consumer.paused == {Q}
        wait_until(read_at_the_heartbeat, 10, what="the pause, read at the heartbeat")
        store.command_consumer(ME, "drain")
        wait_until(lambda: clock.advance(5.0) or not thread.is_alive(), 10, what="the drain, read at the heartbeat")
    finally:
        consumer.stop()
        thread.join(10)
    assert store.honoured == {ME: "drain"}


def test_drain_mode_does_not_wait_for_a_paused_queue(store, clock):
    store.send(Q, rule(1))
    store.pause_queue(Q)
    consumer = make(store, clock, Handler(), drain=True)
    thread = running(consumer)
    thread.join(10)
    assert not thread.is_alive()
    assert store.messages(Q) == [rule(1)] and store.messages(RESULTS) == []
