"""The consumer: producer -> executor -> completer (see loop.py for how they fit together)."""

from .completer import Stats
from .executor import Job, WorkerPool
from .loop import LISTEN_SLICE_S, STOP_CALL_CAP_S, Consumer, PeriodicJob
from .options import ConsumerOptions
from .outage import Backoff, Outage

__all__ = ["LISTEN_SLICE_S", "STOP_CALL_CAP_S", "Backoff", "Consumer", "ConsumerOptions", "Job", "Outage",
           "PeriodicJob", "Stats", "WorkerPool"]
