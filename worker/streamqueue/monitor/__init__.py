"""``streamqueue-monitor``: a live terminal view of a queue's streams, groups, consumers and backlog.

What the article's ``stream_info.py`` showed, for any queue: the names come from flags or the same
``STREAMQUEUE_*`` environment variables the worker reads, and reply streams are counted with a bounded
SCAN of the reply prefix instead of a hard-coded user list.

A partitioned queue (``<stream>:{0}`` .. ``<stream>:{N-1}``, see ``wire.partition_stream``) is shown
partition by partition with the queue's totals; N comes from ``--partitions`` (``STREAMQUEUE_PARTITIONS``,
as in the worker's pod) or, unset, is detected from which partition keys exist. With ``--redis-cluster``
the URL names one node of a Redis Cluster: every partition is read in one pipeline (one round trip per
node) and the reply-stream SCAN walks every primary.

One module per job: ``settings`` (flags and environment), ``reads`` (Redis), ``views`` (what a
refresh saw), ``render`` (the text), ``cli`` (the loop). The queue totals are
``streamqueue.observation.combine``'s, the same the operator scales on.
"""

from .cli import main
from .reads import count_streams, detect_partitions, observe
from .render import render
from .settings import MAX_PARTITIONS, MonitorSettings

__all__ = [
    "MAX_PARTITIONS",
    "MonitorSettings",
    "count_streams",
    "detect_partitions",
    "main",
    "observe",
    "render",
]
