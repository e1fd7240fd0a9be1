"""Test and demo harness for streamqueue.

Nothing in here ships in an image: it starts real components on loopback (redis-server, a local
Kubernetes control plane) and stands in for the kubelet by running worker processes for Pods.
"""
