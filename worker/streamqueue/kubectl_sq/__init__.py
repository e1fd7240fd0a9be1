"""``kubectl sq``: the day-two face of streamqueue (status, pause, resume, drain, dead letters, report).

Installed with the Python package as the ``kubectl-sq`` console script, so kubectl finds it on PATH as
a plugin. The Kubernetes side runs the user's own ``kubectl`` (their kubeconfig, context and
credentials); the Redis side is ``python -m streamqueue.sqtool``, run in a short-lived pod from the
queue's worker image with the worker Deployment's environment (Redis reachable only in the cluster
is the normal case), or in-process with ``--direct`` when Redis is reachable from here.
"""
