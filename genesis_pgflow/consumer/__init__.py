"""The consumer: producer -> executor -> completer (see loop.py for how they fit together)."""

from .loop import Consumer
from .options import ConsumerOptions
from .outage import Backoff, Outage

__all__ = ["Backoff", "Consumer", "ConsumerOptions", "Outage"]
