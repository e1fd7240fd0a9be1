"""Cluster DNS on the real node: a pod resolves Services by full name and through its search path.

The node runs CoreDNS as a pod behind the `kube-dns` Service at the fixed ClusterIP every pod's
resolv.conf names (the kubelet's clusterDNS); its `kubernetes` plugin answers from the API server's
Services. A pod from the worker image asks glibc's resolver, as the worker's Redis client does.
"""

from __future__ import annotations

import json

import pytest
from streamqueue_harness import nodequeue as q
from streamqueue_harness.node import CLUSTER_DNS_IP, Node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Names a pod in `default` resolves: full names, and short ones through the search path
# (default.svc.cluster.local, svc.cluster.local, cluster.local); an unknown name must not resolve.
LOOKUP = """
import json, socket
def lookup(name):
    try:
        return socket.gethostbyname(name)
    except socket.gaierror as exc:
        return f"error: {exc.strerror}"
names = ["kubernetes.default.svc.cluster.local", "kubernetes", "kubernetes.default",
         "kube-dns.kube-system.svc.cluster.local", "kube-dns.kube-system", "no-such-service"]
print(json.dumps({name: lookup(name) for name in names}))
print(open("/etc/resolv.conf").read().replace("\\n", "; "))
"""


def test_pods_resolve_services_by_full_and_short_names(node_cluster: Node) -> None:
    plane = node_cluster.plane
    pod = "dns-lookup"
    plane.kubectl(
        "run", pod, "-n", q.NAMESPACE, f"--image={node_cluster.images.worker}", "--image-pull-policy=Never",
        "--restart=Never", "--command", "--", "python", "-c", LOOKUP,
    )  # fmt: skip
    try:
        succeeded = "--for=jsonpath={.status.phase}=Succeeded"
        plane.kubectl("wait", f"pod/{pod}", "-n", q.NAMESPACE, succeeded, "--timeout=120s", timeout=150)
        answers, resolv_conf = plane.kubectl("logs", pod, "-n", q.NAMESPACE).stdout.splitlines()[:2]
    finally:
        plane.kubectl("delete", "pod", pod, "-n", q.NAMESPACE, "--wait=false", check=False)
    assert f"nameserver {CLUSTER_DNS_IP}" in resolv_conf
    assert "search default.svc.cluster.local svc.cluster.local cluster.local" in resolv_conf
    resolved = json.loads(answers)
    assert resolved.pop("no-such-service").startswith("error"), resolved
    kubernetes_names = {k: v for k, v in resolved.items() if k.startswith("kubernetes")}
    assert set(kubernetes_names.values()) == {"10.96.0.1"}, resolved
    assert {resolved["kube-dns.kube-system.svc.cluster.local"], resolved["kube-dns.kube-system"]} == {
        CLUSTER_DNS_IP
    }, resolved
