"""streamqueue: Redis Streams work queues — worker runtime, client and monitor."""

from .client import Client

__version__ = "0.1.0"

__all__ = ["Client", "__version__"]
