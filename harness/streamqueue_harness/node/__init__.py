"""A real Kubernetes node beside the local control plane: containerd, kubelet, kube-scheduler, kube-proxy,
and cluster DNS (CoreDNS).

Pods run from images built here (no registry is reachable, so the images, including the sandbox
image, are imported into containerd from archives). The design keeps every byte of node traffic
inside the run's own network namespace (``netns``): a bridge there carries the node IP and the pod
subnet, the bridge CNI plugin wires each pod to it, and kube-proxy (iptables mode) makes Services
reach their endpoints, so in-cluster clients (the operator) work unchanged. CoreDNS, a pod behind
the ``kube-dns`` Service, answers cluster names; nothing is routed off the namespace.

The modules, one concern each: ``network`` (addresses, bridge CNI), ``containerd`` (runtime config,
image import), ``kube`` (kubelet and kube-proxy configuration, client certificates), ``dns`` (the
cluster DNS addon), ``host`` (what the node changes on the host and its teardown), ``lifecycle``
(``Node``, ``running_node``, ``stop_node``), ``cli`` (``python -m streamqueue_harness.node``).
"""

from .lifecycle import NODE_NAME, Node, running_cluster, running_node, stop_node
from .network import CLUSTER_DNS_IP, CLUSTER_DOMAIN, NODE_IP
from .prerequisites import NodeError

__all__ = [
    "CLUSTER_DNS_IP",
    "CLUSTER_DOMAIN",
    "NODE_IP",
    "NODE_NAME",
    "Node",
    "NodeError",
    "running_cluster",
    "running_node",
    "stop_node",
]
