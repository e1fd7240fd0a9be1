"""Certificates and keys for the local control plane, made with the ``openssl`` CLI.

The apiserver needs a serving certificate, client certificates for the admin and the
controller-manager (the certificate's O is the Kubernetes group, so ``O=system:masters`` makes the
admin), and a key pair to sign service-account tokens. ``openssl`` is on every Debian machine, so
the harness needs no crypto package; EC P-256 keys keep a fresh set per test session to milliseconds.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

_REQ_CONFIG = "[req]\ndistinguished_name = dn\n[dn]\n"
_CA_EXTENSIONS = (
    "[v3_ca]\nbasicConstraints = critical, CA:TRUE\n"
    "keyUsage = critical, keyCertSign, cRLSign, digitalSignature\nsubjectKeyIdentifier = hash\n"
)
# Names the apiserver answers to: loopback for the harness, the ``kubernetes`` Service's cluster IP
# (the first of the service range) and DNS names for pods.
APISERVER_NAMES = (
    "IP:127.0.0.1",
    "IP:10.96.0.1",
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class CertKey:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ClusterPKI:
    """Every file the control plane's components are started with."""

    ca: CertKey
    apiserver: CertKey
    admin: CertKey
    controller_manager: CertKey
    apiserver_kubelet_client: CertKey  # the apiserver's identity toward kubelets (logs, exec)
    service_account_key: Path
    service_account_public_key: Path


class OpenSSLError(RuntimeError):
    pass


def _openssl(*args: str) -> None:
    try:
        result = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise OpenSSLError("the openssl CLI is missing: install the Debian package openssl") from None
    if result.returncode != 0:
        raise OpenSSLError(f"openssl {args[0]} failed ({result.returncode}): {result.stderr.strip()}")


def _ec_key(path: Path) -> Path:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)
    return path


def certificate_authority(directory: Path, common_name: str) -> CertKey:
    key = _ec_key(directory / "ca.key")
    config = directory / "ca.cnf"
    config.write_text(_REQ_CONFIG + _CA_EXTENSIONS)
    cert = directory / "ca.crt"
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-subj", f"/CN={common_name}", "-days", "3650",
        "-config", str(config), "-extensions", "v3_ca", "-out", str(cert),
    )  # fmt: skip
    return CertKey(cert, key)


def signed_certificate(
    directory: Path, ca: CertKey, name: str, subject: str, usage: str, alt_names: tuple[str, ...] = ()
) -> CertKey:
    """A leaf certificate signed by ``ca``; ``usage`` is ``serverAuth`` or ``clientAuth``."""
    key = _ec_key(directory / f"{name}.key")
    config = directory / f"{name}.cnf"
    extensions = [
        "basicConstraints = critical, CA:FALSE",
        "keyUsage = critical, digitalSignature",
        f"extendedKeyUsage = {usage}",
        "authorityKeyIdentifier = keyid",
    ]
    if alt_names:
        extensions.append("subjectAltName = " + ", ".join(alt_names))
    config.write_text(_REQ_CONFIG + "[leaf]\n" + "\n".join(extensions) + "\n")
    csr = directory / f"{name}.csr"
    cert = directory / f"{name}.crt"
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-config", str(config), "-out", str(csr))
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-set_serial", str(secrets.randbits(63)), "-days", "365",
        "-extfile", str(config), "-extensions", "leaf", "-out", str(cert),
    )  # fmt: skip
    csr.unlink()
    return CertKey(cert, key)


def create_pki(directory: Path, apiserver_ips: tuple[str, ...] = ()) -> ClusterPKI:
    """Write a fresh CA, serving and client certificates and the token signing key into ``directory``.

    ``apiserver_ips`` are further addresses the apiserver's certificate must name (a node's IP).
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = certificate_authority(directory, "streamqueue-local-ca")
    sa_key = _ec_key(directory / "service-account.key")
    sa_pub = directory / "service-account.pub"
    _openssl("pkey", "-in", str(sa_key), "-pubout", "-out", str(sa_pub))
    return ClusterPKI(
        ca=ca,
        apiserver=signed_certificate(
            directory,
            ca,
            "apiserver",
            "/CN=kube-apiserver",
            "serverAuth",
            APISERVER_NAMES + tuple(f"IP:{ip}" for ip in apiserver_ips),
        ),
        admin=signed_certificate(
            directory, ca, "admin", "/O=system:masters/CN=streamqueue-admin", "clientAuth"
        ),
        controller_manager=signed_certificate(
            directory, ca, "controller-manager", "/CN=system:kube-controller-manager", "clientAuth"
        ),
        apiserver_kubelet_client=signed_certificate(
            directory,
            ca,
            "apiserver-kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "clientAuth",
        ),
        service_account_key=sa_key,
        service_account_public_key=sa_pub,
    )
