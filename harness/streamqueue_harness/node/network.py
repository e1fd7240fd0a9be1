"""The nodes' addresses and pod networks: a bridge per node, wired by the bridge CNI, routed between nodes.

Nothing here is routed off the run's namespaces (``netns``). The first node lives in the run's own
namespace, beside the control plane: its bridge carries its node IP and pod subnet, and Service IPs
route to it, where kube-proxy translates them. Every further node gets a network namespace of its
own with its own bridge and pod subnet, joined to the first by a veth pair with routes for each
other's pod subnets, so pods talk across nodes by pod IP and the control plane (at the first node's
IP) is reachable from every node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..netns import (
    add_bridge,
    add_route,
    add_veth_pair,
    delete_link,
    delete_network_namespace,
    new_network_namespace,
    run_in_namespace,
)

CNI_BIN_DIR = Path("/usr/lib/cni")
# The control plane's --service-cluster-ip-range is 10.96.0.0/16: .1 is the `kubernetes` Service, and
# .10 the cluster DNS Service, as kubeadm places them; every pod's resolv.conf names it.
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
CLUSTER_CIDR = "10.244.0.0/16"  # every node's pod subnet: kube-proxy treats it as in-cluster traffic
# The veth pairs between the first node's namespace and each other node's: a /30 per pair.
LINK_PREFIX = "10.245"


@dataclass(frozen=True)
class NodeNetwork:
    """Node ``index``'s bridge, pod subnet 10.244.<index>.0/24 and node IP 10.244.<index>.1."""

    index: int

    @property
    def bridge(self) -> str:
        return f"sq{self.index}"

    def address(self, host: int) -> str:
        """Address ``host`` of this node's pod subnet: the one place that says how it is numbered."""
        return f"10.244.{self.index}.{host}"

    @property
    def pod_subnet(self) -> str:
        return f"{self.address(0)}/24"

    @property
    def node_ip(self) -> str:
        """On the bridge: the pods' gateway, the kubelet's address (and for the first, the apiserver's)."""
        return self.address(1)

    @property
    def first_pod_ip(self) -> str:
        return self.address(10)

    def link_ips(self) -> tuple[str, str]:
        """The veth pair's addresses: the first node's end, this node's end."""
        base = 4 * self.index
        return f"{LINK_PREFIX}.0.{base + 1}", f"{LINK_PREFIX}.0.{base + 2}"


FIRST = NodeNetwork(0)
NODE_IP = FIRST.node_ip


def add_node_network() -> None:
    """The first node's bridge with its node IP, and a route for Service IPs through it.

    Pods send Service traffic to their default gateway, the node; the node's own processes (the test
    client, CoreDNS's readiness check) need the route, or the kernel refuses the packet before
    kube-proxy's OUTPUT rules can translate it. The namespace has no default route to use instead.
    """
    add_bridge(FIRST.bridge, f"{FIRST.node_ip}/24")
    add_route(SERVICE_CIDR, FIRST.bridge)


def add_joined_node_network(network: NodeNetwork, namespace: Path) -> None:
    """A network namespace (bound to the file ``namespace``) for node ``network``, joined to the first.

    Inside it: loopback, the node's bridge, the Service route (kube-proxy there translates Service
    IPs), and a veth to the first node's namespace with routes for the pod subnets on either side.
    """
    new_network_namespace(namespace)
    outside, inside = network.link_ips()
    here, there = f"sqv{network.index}", f"sqv{network.index}n"
    add_veth_pair(here, there, namespace)
    run_in_namespace(None, "ip", "addr", "add", f"{outside}/30", "dev", here)
    run_in_namespace(None, "ip", "link", "set", here, "up")
    run_in_namespace(None, "ip", "route", "add", network.pod_subnet, "via", inside)
    for command in (
        ("ip", "link", "set", "lo", "up"),
        ("ip", "addr", "add", f"{inside}/30", "dev", there),
        ("ip", "link", "set", there, "up"),
        ("ip", "link", "add", network.bridge, "type", "bridge"),
        ("ip", "addr", "add", f"{network.node_ip}/24", "dev", network.bridge),
        ("ip", "link", "set", network.bridge, "up"),
        ("ip", "route", "add", SERVICE_CIDR, "dev", network.bridge),
        ("ip", "route", "add", FIRST.pod_subnet, "via", outside),
        ("sysctl", "-qw", "net.ipv4.ip_forward=1"),
    ):
        run_in_namespace(namespace, *command)


def remove_joined_node_network(network: NodeNetwork, namespace: Path) -> None:
    """Undo ``add_joined_node_network`` once the node stopped: the veth pair, then the namespace."""
    if namespace.exists():
        delete_link(f"sqv{network.index}")
        delete_network_namespace(namespace)


def write_cni_config(directory: Path, network: NodeNetwork = FIRST) -> Path:
    """One bridge network: pods get addresses of the node's pod subnet with the node IP as gateway."""
    conf_dir = directory / "net.d"
    conf_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "cniVersion": "0.4.0",
        "name": "streamqueue",
        "plugins": [
            {
                "type": "bridge",
                "bridge": network.bridge,
                "isGateway": True,
                "isDefaultGateway": True,  # Service IPs route to the node, where kube-proxy translates them
                "ipMasq": False,  # nothing to masquerade to: no route leaves the run's namespaces
                "hairpinMode": True,  # a pod may reach itself through its own Service
                "ipam": {
                    "type": "host-local",
                    "ranges": [
                        [
                            {
                                "subnet": network.pod_subnet,
                                "gateway": network.node_ip,
                                "rangeStart": network.first_pod_ip,
                            }
                        ]
                    ],
                    "dataDir": str(directory / "ipam"),
                },
            }
        ],
    }
    path = conf_dir / "10-streamqueue.conflist"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path
