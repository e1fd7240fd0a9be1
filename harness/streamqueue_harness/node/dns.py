"""Cluster DNS on the node: CoreDNS as a pod behind the ``kube-dns`` Service, as real clusters run it.

CoreDNS's ``kubernetes`` plugin watches Services and EndpointSlices through the API server (in-cluster,
through the ``kubernetes`` Service like the operator), and answers ``<svc>.<ns>.svc.cluster.local``;
the kubelet gives every ClusterFirst pod ``CLUSTER_DNS_IP`` and the search path, so short names work.
It runs as a pod rather than a host process so the path a lookup takes is the production one: the
pod's resolv.conf, kube-proxy's NAT of the Service IP, the bridge, the CoreDNS pod.
"""

from __future__ import annotations

import secrets
import socket
import struct
from pathlib import Path
from string import Template

from ..controlplane import ControlPlane
from ..eventually import eventually
from .network import CLUSTER_DNS_IP, CLUSTER_DOMAIN
from .prerequisites import NodeError

MANIFEST = Path(__file__).with_name("manifests") / "coredns.yaml"


def cluster_dns_manifest(image: str) -> str:
    """The CoreDNS objects (ServiceAccount, RBAC, Corefile, Deployment, kube-dns Service) for ``image``."""
    return Template(MANIFEST.read_text()).substitute(
        image=image, cluster_dns_ip=CLUSTER_DNS_IP, cluster_domain=CLUSTER_DOMAIN
    )


def install_cluster_dns(plane: ControlPlane, image: str, timeout_s: float) -> None:
    """Apply the objects and wait until the ``kube-dns`` Service answers.

    CoreDNS Ready (its ``ready`` plugin: the API watch synced) is not enough: the EndpointSlice
    controller and then kube-proxy must route the Service IP to it, and a pod started before that
    sees its first lookups time out. So the wait ends on an answer through the Service IP itself.
    """
    plane.kubectl("apply", "-f", "-", input=cluster_dns_manifest(image))
    name = f"kubernetes.default.svc.{CLUSTER_DOMAIN}"
    eventually(
        lambda: _answers(CLUSTER_DNS_IP, name),
        f"{name} answered by {CLUSTER_DNS_IP}",
        timeout_s,
        0.2,
        NodeError,
    )


def _answers(server: str, name: str) -> list[str]:
    try:
        return resolve_a(server, name, timeout_s=1.0)
    except OSError:  # not routed yet (timeout), or refused
        return []


def resolve_a(server: str, name: str, timeout_s: float) -> list[str]:
    """The A records ``server`` gives for ``name``: one UDP query, no search path, no cache."""
    query_id = secrets.randbelow(1 << 16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        sock.sendto(a_query(name, query_id), (server, 53))
        reply = sock.recv(4096)
    return a_records(reply, query_id)


def a_query(name: str, query_id: int) -> bytes:
    """A recursive DNS query (RFC 1035) for the A records of ``name``."""
    labels = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", 1, 1)


def a_records(reply: bytes, query_id: int) -> list[str]:
    """The addresses in ``reply``'s A answers; none unless it answers ``query_id`` with NOERROR."""
    ident, flags, questions, answers = struct.unpack_from("!HHHH", reply)
    if ident != query_id or flags & 0x000F:
        return []
    offset = 12
    for _ in range(questions):
        offset = _skip_name(reply, offset) + 4  # QTYPE, QCLASS
    addresses = []
    for _ in range(answers):
        offset = _skip_name(reply, offset)
        rtype, _class, _ttl, length = struct.unpack_from("!HHIH", reply, offset)
        offset += 10
        if rtype == 1 and length == 4:
            addresses.append(socket.inet_ntoa(reply[offset : offset + 4]))
        offset += length
    return addresses


def _skip_name(message: bytes, offset: int) -> int:
    """The offset after the name at ``offset``: labels up to a zero byte, or a compression pointer."""
    while message[offset] != 0:
        if message[offset] & 0xC0 == 0xC0:
            return offset + 2
        offset += message[offset] + 1
    return offset + 1
