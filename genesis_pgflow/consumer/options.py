"""How a consumer runs: its queues, workers, batches, waits and limits (built from Settings by app.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConsumerOptions:
    queues: tuple[str, ...]
    parallel: int = 4
    batch_size: int = 10
    poll_interval_s: float = 1.0
    lease_s: int = 10
    drain: bool = False
    shutdown_grace_s: float = 30.0
    # a finished outcome waits at most this long for others to share its transaction
    flush_after_s: float = 0.005
    # messages are leased ahead of a free worker only when, at the handlers' measured pace,
    # they will start within this many seconds (so slow workflows are never hoarded)
    prefetch_horizon_s: float = 0.5
    # how often the loop logs what it did since the last report (0: never)
    report_every_s: float = 60.0
    # how long the database may stay away (unreachable or refusing) before the consumer gives up
    max_outage_s: float = 300.0
    # how often an outage is summed up in the log while it lasts
    outage_report_every_s: float = 60.0
    # at shutdown, how long cancelled work gets to return (its sandboxes killed) before its
    # messages are given back
    give_back_wait_s: float = 10.0
    # how often the control table is read even without a NOTIFY (the heartbeat's interval)
    control_poll_s: float = 5.0
    # a run held this long is recorded `running` in genesis.workflow_runs; one that ends sooner
    # is written once, when it ends (no write at the read, no dead row per message)
    record_running_after_s: float = 1.0
    # this consumer takes only messages that have waited this long, and a NOTIFY wakes it this much
    # later: the second and later processes of a command (processes.py) take over what the first
    # leaves waiting, a backlog, and nothing it can take alone, so their completions are not split
    take_after_s: float = 0.0
