"""The Redis side of ``kubectl sq``: ``python -m streamqueue.sqtool``, one command per run, JSON out.

It reads the queue's settings from the ``STREAMQUEUE_*`` environment exactly as the worker does, so
run in a pod with the worker Deployment's environment (``kubectl sq``'s default) it reaches Redis as
the workers do, from inside the cluster; ``kubectl sq --direct`` calls the same commands in-process.
"""
