"""The worker runtime: ``Worker`` runs one consumer of a stream's consumer group."""

from .loop import Worker

__all__ = ["Worker"]
