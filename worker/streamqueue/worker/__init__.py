"""The worker runtime: ``Worker`` runs one consumer of a stream's consumer group."""

from .worker import Worker

__all__ = ["Worker"]
