"""streamqueue: Redis Streams work queues — worker runtime, client and monitor."""

__version__ = "0.1.0"
