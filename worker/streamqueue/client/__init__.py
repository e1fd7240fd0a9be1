"""``streamqueue.client``: the Python client of a streamqueue, one module per concern.

- ``api``: ``Client``, what callers use: send, request, request_stream, responses, cancel;
- ``replies``: the values it yields and raises (``Reply``, ``Chunk``, ``ReplyError``, ...);
- ``reads``: the multiplexed reader of users' reply streams behind ``request`` and friends;
- ``sends``: the batching of one loop turn's XADDs into one pipeline.
"""

from ..wire import parse_entry_id as entry_key  # its public name here, kept for callers
from .api import DEFAULT_BLOCK_MS, Client
from .replies import Chunk, ChunkOrder, Reply, ReplyError, ReplyStream, RequestCancelled, RequestExpired

__all__ = [
    "DEFAULT_BLOCK_MS",
    "Chunk",
    "ChunkOrder",
    "Client",
    "Reply",
    "ReplyError",
    "ReplyStream",
    "RequestCancelled",
    "RequestExpired",
    "entry_key",
]
