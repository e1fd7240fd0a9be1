"""The chart's gateway (gateway.enabled): what it renders, checked against the chart's own rules.

Off by default. On: a locked-down Deployment whose probes, port and config file are the ones the image
and the gateway serve, a Service, an autoscaling/v2 HPA on CPU, a PDB only when more than one replica
can run, the config file rendered from ``gateway.config`` and parsed by the gateway's own model, every
secret only by reference (the chart renders no Secret), a NetworkPolicy beside the chart's others, a
ServiceMonitor with the operator's, and a values schema that refuses typos inside ``gateway``.
"""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from streamqueue_gateway.config import GatewayConfig

from tests.chart.helm import CHART, KUBE_VERSION, ROOT, by_kind, helm, render

ON = "gateway.enabled=true"
SECRETS = (
    "gateway.secrets.apiKeys.name=gw-keys",
    "gateway.secrets.jwtHs256.name=gw-jwt",
    "gateway.secrets.jwks.name=gw-jwks",
    "gateway.secrets.redisPassword.name=redis-auth",
    "gateway.secrets.redisCa.name=redis-ca",
)
TYPOS = [
    ("gateway.enabld=true", "'enabld' not allowed"),
    ("gateway.confg.redis.url=redis://r:6379", "'confg' not allowed"),
    ("gateway.config.tiers.free.maxRequest=3", "'maxRequest' not allowed"),
    ("gateway.config.models[0].replyPrefx=x", "'replyPrefx' not allowed"),
    ("gateway.secrets.apiKeys.nme=keys", "'nme' not allowed"),
    ("gateway.config.auth.apiKeysFile=/keys.json", "'apiKeysFile' not allowed"),  # a Secret's, not a path
    ("gateway.config.redis.url=http://redis:6379", "does not match pattern"),
    ("networkPolicy.gateway.cidrs={clients.internal}", "does not match pattern"),
]


def sets(*settings: str) -> list[str]:
    """``--set`` arguments for helm."""
    return [arg for setting in settings for arg in ("--set", setting)]


def gateway(*settings: str) -> dict[str, list[dict[str, Any]]]:
    """The gateway's rendered objects by kind (the chart's other objects left out)."""
    objects: dict[str, list[dict[str, Any]]] = {}
    for manifest in render(ON, *settings):
        if manifest["metadata"]["name"].endswith("-gateway"):
            objects.setdefault(manifest["kind"], []).append(manifest)
    return objects


def pod_of(objects: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (deployment,) = objects["Deployment"]
    return deployment["spec"]["template"]


def config_of(objects: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (config_map,) = objects["ConfigMap"]
    return yaml.safe_load(config_map["data"]["config.yaml"])


def test_off_by_default() -> None:
    assert [m for m in render() if "gateway" in m["metadata"]["name"]] == []


def test_the_pod_is_locked_down_and_probed_on_the_one_port_the_image_exposes() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pod = pod_of(gateway())
    spec = pod["spec"]
    assert spec["securityContext"] == values["podSecurityContext"]  # as the operator's pod
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    assert container["securityContext"] == values["securityContext"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == f"streamqueue/gateway:{(ROOT / 'VERSION').read_text().strip()}"
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": values["gateway"]["port"], "protocol": "TCP"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert f"--port={port['containerPort']}" in container["args"]
    assert container["resources"]["requests"]["cpu"]  # the HPA's utilization is relative to it
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/tmp"] == "tmp"  # the only writable place (read-only root)
    dockerfile = (ROOT / "Dockerfile.gateway").read_text()
    config_path = next(a.removeprefix("--config=") for a in container["args"] if a.startswith("--config="))
    assert f'"--config", "{config_path}"' in dockerfile  # `docker run` and the chart agree
    assert config_path.rsplit("/", 1)[0] in mounts


def test_its_pods_are_not_the_operators_and_its_service_selects_them() -> None:
    manifests = render(ON)
    operator, gateway_deployment = sorted(
        by_kind(manifests, "Deployment"), key=lambda d: d["metadata"]["name"]
    )
    assert gateway_deployment["metadata"]["name"].endswith("-gateway")
    labels = gateway_deployment["spec"]["template"]["metadata"]["labels"]
    operator_selector = operator["spec"]["selector"]["matchLabels"]
    assert not all(labels.get(k) == v for k, v in operator_selector.items())  # PDB, Service, policy
    objects = gateway()
    (service,) = objects["Service"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"


def test_hpa_on_cpu_owns_the_replicas_and_a_rollout_surges() -> None:
    objects = gateway()
    (deployment,) = objects["Deployment"]
    assert "replicas" not in deployment["spec"]  # else every helm upgrade resets what the HPA chose
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    (hpa,) = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    fixed = gateway("gateway.autoscaling.enabled=false", "gateway.replicaCount=3")
    assert "HorizontalPodAutoscaler" not in fixed and fixed["Deployment"][0]["spec"]["replicas"] == 3
    template = ["template", "sq", str(CHART), "--kube-version", KUBE_VERSION]
    refused = helm(*template, *sets(ON, "gateway.resources.requests=null"), check=False)
    assert refused.returncode != 0 and "needs gateway.resources.requests.cpu" in refused.stderr


@pytest.mark.parametrize(
    ("settings", "budget"),
    [
        ((), True),
        (("gateway.autoscaling.maxReplicas=1", "gateway.autoscaling.minReplicas=1"), False),
        (("gateway.autoscaling.enabled=false", "gateway.replicaCount=1"), False),
        (("gateway.autoscaling.enabled=false", "gateway.replicaCount=2"), True),
    ],
)
def test_a_disruption_budget_only_when_more_than_one_replica_can_run(
    settings: tuple[str, ...], budget: bool
) -> None:
    objects = gateway(*settings)
    assert ("PodDisruptionBudget" in objects) is budget
    for pdb in objects.get("PodDisruptionBudget", []):
        assert (
            pdb["spec"]["selector"]["matchLabels"]
            == objects["Deployment"][0]["spec"]["selector"]["matchLabels"]
        )


def test_config_is_the_values_with_the_mounted_secret_files_and_the_gateway_parses_it() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]["config"]
    assert config_of(gateway()) == values
    objects = gateway(*SECRETS)
    config = config_of(objects)
    pod = pod_of(objects)["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {
        config["auth"]["apiKeysFile"]: ("gw-keys", "keys.json"),
        config["auth"]["jwt"]["hs256SecretFile"]: ("gw-jwt", "secret"),
        config["auth"]["jwt"]["jwksFile"]: ("gw-jwks", "jwks.json"),
        config["redis"]["tlsCaFile"]: ("redis-ca", "ca.crt"),
    }
    for path, (secret, key) in files.items():
        directory, name = path.rsplit("/", 1)
        (volume,) = [v for v, at in mounts.items() if at == directory]
        assert volumes[volume]["secret"] == {"secretName": secret, "items": [{"key": key, "path": name}]}
    GatewayConfig.model_validate(config_of(gateway()))
    GatewayConfig.model_validate(config)


def test_the_pods_grace_outlasts_the_gateways_own_bounded_stop() -> None:
    """SIGKILL comes terminationGracePeriodSeconds after SIGTERM: the gateway's stop (readiness off,
    shutdownDelaySeconds, then shutdownTimeoutSeconds for open streams) must end first. The chart's
    check, with the keys left out, uses the gateway's own defaults; a grace that is too short fails."""
    objects = gateway()
    grace = pod_of(objects)["spec"]["terminationGracePeriodSeconds"]
    assert GatewayConfig.model_validate(config_of(objects)).shutdown_bound_seconds < grace
    unset = ("gateway.config.shutdownDelaySeconds=null", "gateway.config.shutdownTimeoutSeconds=null")
    defaults = GatewayConfig.model_validate(config_of(gateway(*unset))).shutdown_bound_seconds
    least = f"gateway.terminationGracePeriodSeconds={int(defaults) + 1}"
    assert "ConfigMap" in gateway(*unset, least)  # the chart's defaults are the gateway's
    for too_short in (
        f"gateway.terminationGracePeriodSeconds={int(defaults)}",
        "gateway.config.shutdownTimeoutSeconds=60",
    ):
        result = helm(
            "template", "sq", str(CHART), "--kube-version", KUBE_VERSION, *sets(ON, too_short), check=False
        )
        assert result.returncode != 0 and "the pod would be killed mid-stop" in result.stderr, result.stderr


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds: itself, optional, or as a list's items or a dict's values."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _keys(model: type[BaseModel], chart_owned: frozenset[str], at: str = "") -> dict[str, Any]:
    """The file's keys as a tree (nested models expanded), minus what the chart itself fills in."""
    tree: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = field.alias or name
        if at + key not in chart_owned:
            inner = _model_in(field.annotation)
            tree[key] = _keys(inner, chart_owned, f"{at}{key}.") if inner else None
    return tree


def _schema_keys(schema: dict[str, Any]) -> dict[str, Any] | None:
    """The same tree from the values schema (an array's items, a map's values)."""
    schema = schema.get("items", schema)
    if isinstance(schema.get("additionalProperties"), dict):
        schema = schema["additionalProperties"]
    if "properties" not in schema:
        return None
    return {key: _schema_keys(sub) for key, sub in schema["properties"].items()}


def test_the_schema_knows_exactly_the_config_files_keys() -> None:
    """A key the gateway adds (or renames) must reach the values schema, or helm would refuse it;
    file paths are the chart's: it mounts the Secrets and writes their paths."""
    chart_owned = frozenset(
        {
            "auth.apiKeysFile",
            "auth.jwt.hs256SecretFile",
            "auth.jwt.jwksFile",
            "redis.passwordFile",
            "redis.tlsCaFile",
        }
    )
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert _schema_keys(schema["properties"]["gateway"]["properties"]["config"]) == _keys(
        GatewayConfig, chart_owned
    )


def test_secrets_only_by_reference() -> None:
    objects = gateway(*SECRETS)
    assert "Secret" not in objects
    (container,) = pod_of(objects)["spec"]["containers"]
    assert container["env"] == [
        {
            "name": "STREAMQUEUE_REDIS_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}},
        }
    ]
    assert "env" not in pod_of(gateway())["spec"]["containers"][0]  # no password: none asked for


def test_a_network_policy_for_the_gateway_beside_the_others() -> None:
    assert "NetworkPolicy" not in gateway()
    (policy,) = gateway("networkPolicy.enabled=true")["NetworkPolicy"]
    labels = pod_of(gateway())["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["spec"]["ingress"]
    assert ingress == {"ports": [{"protocol": "TCP", "port": 8080}]}  # from anywhere by default
    egress = [{(p["protocol"], p["port"]) for p in rule["ports"]} for rule in policy["spec"]["egress"]]
    assert egress == [{("UDP", 53), ("TCP", 53)}, {("TCP", 6379)}]
    (narrow,) = gateway(
        "networkPolicy.enabled=true",
        "networkPolicy.gateway.cidrs={10.3.0.0/16}",
        "networkPolicy.gateway.peers[0].namespaceSelector.matchLabels.team=web",
        "networkPolicy.redis.cidrs={10.1.0.0/16}",
    )["NetworkPolicy"]
    assert narrow["spec"]["ingress"][0]["from"] == [
        {"ipBlock": {"cidr": "10.3.0.0/16"}},
        {"namespaceSelector": {"matchLabels": {"team": "web"}}},
    ]
    assert narrow["spec"]["egress"][1]["to"] == [{"ipBlock": {"cidr": "10.1.0.0/16"}}]


def test_scraped_by_a_service_monitor_with_the_operators() -> None:
    assert "ServiceMonitor" not in gateway()
    objects = gateway("metrics.serviceMonitor.enabled=true")
    (monitor,) = objects["ServiceMonitor"]
    (service,) = objects["Service"]
    assert monitor["spec"]["selector"]["matchLabels"] == {
        k: v
        for k, v in service["metadata"]["labels"].items()
        if k in monitor["spec"]["selector"]["matchLabels"]
    }
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"


@pytest.mark.parametrize(("setting", "complaint"), TYPOS)
def test_a_typo_in_the_gateway_values_fails_helm(setting: str, complaint: str) -> None:
    result = helm(
        "template", "sq", str(CHART), "--kube-version", KUBE_VERSION, *sets(ON, setting), check=False
    )
    assert result.returncode != 0
    assert complaint in result.stderr, result.stderr


def test_helm_lint_passes_with_everything_on() -> None:
    on = sets(ON, "networkPolicy.enabled=true", "metrics.serviceMonitor.enabled=true", *SECRETS)
    result = helm("lint", str(CHART), "--strict", *on, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.kube
def test_the_gateway_objects_pass_a_server_side_dry_run(control_plane, kube_namespace: str) -> None:
    on = sets(ON, "networkPolicy.enabled=true", *SECRETS)
    manifest = helm(
        "template", "sq", str(CHART), "--namespace", kube_namespace, "--kube-version", KUBE_VERSION, *on,
        *[a for t in ("configmap", "deployment", "service", "hpa", "pdb", "networkpolicy")
          for a in ("--show-only", f"templates/gateway-{t}.yaml")],
    ).stdout  # fmt: skip
    result = control_plane.dry_run(manifest, kube_namespace)
    assert result.stdout.count("(server dry run)") == 6, result.stdout


@pytest.mark.kube
def test_notes_tell_how_to_reach_it_and_what_is_missing(control_plane, kube_namespace: str) -> None:
    install = ["install", "sq", str(CHART), "--namespace", kube_namespace, "--dry-run=server", *sets(ON)]
    bare = helm(*install, kubeconfig=control_plane.kubeconfig).stdout
    assert "port-forward svc/sq-streamqueue-operator-gateway 8080:80" in bare
    assert "every request is refused with 401" in bare and "without a password" in bare
    configured = helm(*install, *sets(*SECRETS), kubeconfig=control_plane.kubeconfig)
    assert "refused with 401" not in configured.stdout and "without a password" not in configured.stdout
