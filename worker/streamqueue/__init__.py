"""streamqueue: Redis Streams work queues — worker runtime, client and monitor."""

from importlib.metadata import version

from .client import Chunk, Client

__version__ = version("streamqueue")  # the package's own version (pyproject.toml, = VERSION)

__all__ = ["Chunk", "Client", "__version__"]
