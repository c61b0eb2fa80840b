"""The control seam: what a consumer obeys (paused queues, a drain or stop addressed to it) and the
NOTIFY that tells it something changed. The table is genesis.fleet_control (migration 0007); the
operators' side (pause, resume, commands) is PgAdminStore's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from genesis_pgflow.store.database import Database, Listener, one
from genesis_pgflow.store.queries import sql

CHANNEL = "genesis_control"
Command = Literal["drain", "stop"]
COMMANDS: tuple[Command, ...] = ("drain", "stop")


@dataclass(frozen=True)
class ControlState:
    """What one consumer is told: the queues no one may read now, and its own command, if any."""

    paused: frozenset[str] = frozenset()
    command: Command | None = None


class ControlStore(Protocol):
    """What the consumer needs to be steered. PgControlStore and testing.MemoryQueueStore both pass
    tests/conformance."""

    def control_state(self) -> ControlState:
        """The paused queues and the command addressed to this consumer, as stored now."""

    def wait_for_control(self, timeout_s: float) -> bool:
        """Block until the control table may have changed, or timeout; True if so (also when the
        channel was opened anew: a notification may have been missed meanwhile, so read again).
        Raises StoreError when it cannot listen (the caller backs off and polls meanwhile)."""

    def command_honoured(self, command: Command) -> None:
        """Say that this consumer has begun to act on its command (status shows it)."""

    def close(self) -> None:
        """Release the listening connection."""


class PgControlStore:
    """ControlStore on genesis.fleet_control; listens on the channel genesis_control on a
    connection of its own, opened again whenever the pool has been dropped since (as
    PgQueueStore.wait_for_messages does)."""

    def __init__(self, db: Database, consumer: str):
        self.db = db
        self.consumer = consumer
        self._listener = Listener(db, "control")

    def control_state(self) -> ControlState:
        row = self.db.run(lambda conn: one(conn.execute(sql("control_state"), {"consumer": self.consumer})))
        command = row["command"] if row["command"] in COMMANDS else None
        return ControlState(frozenset(row["paused"]), command)

    def command_honoured(self, command: Command) -> None:
        self.db.run(lambda conn: conn.execute(sql("command_honoured"),
                                              {"consumer": self.consumer, "command": command}))

    def wait_for_control(self, timeout_s: float) -> bool:
        """True on a NOTIFY, or when the channel was just opened (what came before was not heard)."""
        return bool(self._listener.wait([CHANNEL], timeout_s))

    def close(self) -> None:
        self._listener.close()
