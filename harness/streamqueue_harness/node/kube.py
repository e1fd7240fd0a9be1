"""The configuration of the node's Kubernetes components: kubelet, kube-proxy, and their client certificates.

Each component gets a client certificate from the cluster CA with the identity RBAC and the Node
authorizer expect. The kubelet names the cluster DNS Service (``CLUSTER_DNS_IP``) in every pod's
resolv.conf, and reads no host resolv.conf: nothing outside the namespace could answer it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..controlplane import ControlPlane
from ..kubeconfig import write_kubeconfig
from ..pki import signed_certificate
from ..ports import free_port
from .network import CLUSTER_CIDR, CLUSTER_DNS_IP, CLUSTER_DOMAIN


def component_kubeconfig(
    plane: ControlPlane, pki_dir: Path, name: str, subject: str, server: str | None = None
) -> Path:
    """A client certificate from the cluster CA: its subject is what RBAC and the Node authorizer see.

    ``server`` replaces the control plane's loopback URL for a node in another network namespace.
    """
    pki_dir.mkdir(parents=True, exist_ok=True)
    pki = plane.pki
    cert = signed_certificate(pki_dir, pki.ca, name, subject, "clientAuth")
    return write_kubeconfig(
        pki_dir / f"{name}.kubeconfig",
        server=server or plane.server,
        ca_cert=pki.ca.cert,
        user=subject.rsplit("CN=", 1)[-1],
        client_cert=cert.cert,
        client_key=cert.key,
    )


def kubelet_config(
    *, node_ip: str, ca_cert: Path, socket: Path, cgroup_root: str, pod_logs: Path
) -> dict[str, Any]:
    """KubeletConfiguration for this VM: cgroup v1, swap, no CAP_SYS_RESOURCE, images never pulled."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node_ip,  # logs and exec: the apiserver calls the kubelet at its InternalIP
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_cert)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": cgroup_root,
        "failCgroupV1": False,
        "failSwapOn": False,
        "oomScoreAdj": 0,  # lowering it needs CAP_SYS_RESOURCE, which this VM lacks
        "podLogsDir": str(pod_logs),
        # ClusterFirst pods get the cluster DNS Service and the search path <ns>.svc.cluster.local,
        # svc.cluster.local, cluster.local. No host resolv.conf: nothing outside could answer.
        "clusterDNS": [CLUSTER_DNS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": "",
        "serializeImagePulls": False,
        # Images cannot be pulled again here: never collect them, and evict only when truly short.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "staticPodPath": "",
        "shutdownGracePeriod": "0s",
        # The Lease the node-lifecycle controller watches, renewed every quarter of this (2.5 s): with
        # the control plane's 10 s --node-monitor-grace-period, a stopped node is NotReady in ~10-12 s.
        "nodeLeaseDurationSeconds": 10,
    }


def proxy_config(kubeconfig: Path, node_name: str, node_ip: str) -> dict[str, Any]:
    """KubeProxyConfiguration: iptables mode, changing no global sysctl."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": node_name,
        "clusterCIDR": CLUSTER_CIDR,
        "bindAddress": node_ip,
        "healthzBindAddress": f"127.0.0.1:{free_port()}",
        "metricsBindAddress": f"127.0.0.1:{free_port()}",
        "nodePortAddresses": [f"{node_ip}/32"],
        "iptables": {"localhostNodePorts": False},  # would set route_localnet; nothing here needs it
        # Zero leaves the global conntrack sysctls as they are.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }
