"""The node's addresses and its pod network: a bridge in the run's namespace, wired by the bridge CNI.

Nothing here is routed off the namespace (``netns``): the bridge carries the node IP and the pod
subnet, Service IPs route to the node, where kube-proxy translates them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..netns import add_bridge, add_route

BRIDGE = "sq0"
POD_SUBNET = "10.244.0.0/24"
NODE_IP = "10.244.0.1"  # on the bridge: the pods' gateway, the kubelet's and the apiserver's address
CNI_BIN_DIR = Path("/usr/lib/cni")
# The control plane's --service-cluster-ip-range is 10.96.0.0/16: .1 is the `kubernetes` Service, and
# .10 the cluster DNS Service, as kubeadm places them; every pod's resolv.conf names it.
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"


def add_node_network() -> None:
    """The bridge with the node IP, and a route for Service IPs through it.

    Pods send Service traffic to their default gateway, the node; the node's own processes (the test
    client, CoreDNS's readiness check) need the route, or the kernel refuses the packet before
    kube-proxy's OUTPUT rules can translate it. The namespace has no default route to use instead.
    """
    add_bridge(BRIDGE, f"{NODE_IP}/24")
    add_route(SERVICE_CIDR, BRIDGE)


def write_cni_config(directory: Path) -> Path:
    """One bridge network: pods get addresses of ``POD_SUBNET`` with the node IP as their gateway."""
    conf_dir = directory / "net.d"
    conf_dir.mkdir(parents=True, exist_ok=True)
    network = {
        "cniVersion": "0.4.0",
        "name": "streamqueue",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "isDefaultGateway": True,  # Service IPs route to the node, where kube-proxy translates them
                "ipMasq": False,  # nothing to masquerade to: no route leaves the namespace
                "hairpinMode": True,  # a pod may reach itself through its own Service
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP, "rangeStart": "10.244.0.10"}]],
                    "dataDir": str(directory / "ipam"),
                },
            }
        ],
    }
    path = conf_dir / "10-streamqueue.conflist"
    path.write_text(json.dumps(network, indent=2) + "\n")
    return path
