"""The StreamQueue API: pydantic models that are the single source of truth for the CRD schema.

``crdgen`` turns these models into the OpenAPI schema of ``streamqueues.streamqueue.io``; the
operator parses every object's ``spec`` with the same models, so the defaults and ranges the API
server applies are the ones the code sees. Cross-field rules are CEL expressions attached with
``x-kubernetes-validations`` because only the API server can reject a bad ``kubectl apply``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic.alias_generators import to_camel
from streamqueue import wire
from streamqueue.settings import RULES, TUNING_FIELDS, WorkerSettings

GROUP = "streamqueue.io"
# The API version the operator reads and writes, the CRD's storage version and the one kubectl prefers.
VERSION = "v1beta1"
# Every version the CRD serves, oldest first. The schemas are identical (conversion strategy None:
# the API server only rewrites apiVersion), so an object written as one reads as any other.
SERVED_VERSIONS = ("v1alpha1", VERSION)
KIND = "StreamQueue"
PLURAL = "streamqueues"
SINGULAR = "streamqueue"
SHORT_NAMES = ["sq"]
QUEUE_LABEL = f"{GROUP}/queue"

# Free-form Kubernetes objects (tolerations, resources, env sources) are validated by the API server
# when the operator writes the Deployment; the CRD only keeps them intact.
_PRESERVE: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def _rule(rule: str, message: str, *, field_path: str | None = None) -> Any:
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def _validations(*rules: Any) -> ConfigDict:
    """A model's CEL rules (``_rule``), for the API server to check on every write of the object."""
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": list(rules)})


class _Model(BaseModel):
    """camelCase on the wire (Kubernetes convention), snake_case in Python."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
        use_attribute_docstrings=True,  # a field's docstring is its CRD description
    )


class SecretKeyRef(_Model):
    """A key in a Secret in the StreamQueue's namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Secret name."""
    key: str = Field(default="password", min_length=1, max_length=253)
    """Key inside the Secret."""


class CASecretKeyRef(SecretKeyRef):
    """A Secret key holding a PEM CA bundle."""

    key: str = Field(default="ca.crt", min_length=1, max_length=253)
    """Key inside the Secret."""


class APIKeySecretRef(SecretKeyRef):
    """A Secret key holding the model API's key."""

    key: str = Field(default="api-key", min_length=1, max_length=253)
    """Key inside the Secret."""


class TLSSpec(_Model):
    """TLS to Redis. A ``rediss://`` URL turns TLS on as well."""

    enabled: bool = False
    """Connect with TLS (implied by a rediss:// URL)."""
    ca_secret_ref: CASecretKeyRef | None = None
    """Secret key holding the PEM CA bundle that signs the Redis server certificate."""


class RedisSpec(_Model):
    """Where the queue lives. Credentials come only from Secrets, never from the object itself."""

    model_config = _validations(
        _rule(
            "!self.url.matches('^rediss?://[^/@]*:[^/@]*@')",
            "redis.url must not contain a password: store it in a Secret and set "
            "redis.passwordSecretRef (the username may go in redis.username)",
            field_path=".url",
        ),
        _rule(
            "!has(self.tls) || !has(self.tls.caSecretRef) || self.tls.enabled || "
            "self.url.startsWith('rediss://')",
            "redis.tls.caSecretRef needs TLS: set redis.tls.enabled: true or use a rediss:// URL",
            field_path=".tls.caSecretRef",
        ),
    )

    url: str = Field(default="redis://redis:6379/0", max_length=2048, pattern=r"^rediss?://")
    """redis://host:port/db or rediss://host:port/db (TLS). The path selects the database.
    A host without a dot (the default redis) is the Service in the queue's namespace: the operator
    dials <host>.<namespace>.svc, and with TLS checks that name in the certificate."""
    username: str | None = Field(default=None, max_length=256)
    """ACL user name."""
    password_secret_ref: SecretKeyRef | None = None
    """Secret key holding the Redis password (ACL or requirepass)."""
    tls: Annotated[TLSSpec, Field(json_schema_extra={"default": {}})] = TLSSpec()
    cluster: bool = False
    """The URL names one node of a Redis Cluster (partitions spread over its slots)."""

    @property
    def tls_on(self) -> bool:
        return self.tls.enabled or self.url.startswith("rediss://")


class EnvVar(_Model):
    """A container environment variable; ``valueFrom`` is any Kubernetes EnvVarSource."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    value: str | None = None
    value_from: Annotated[dict[str, Any] | None, Field(json_schema_extra=_PRESERVE)] = None


class LocalObjectReference(_Model):
    name: Annotated[str, Field(min_length=1, max_length=253)]


# StreamQueue names that predate the derivation and differ from to_camel(field); kept so existing
# objects stay valid (the env variable is still the field's: STREAMQUEUE_REPLY_MAXLEN).
_SPEC_NAMES = {"reply_maxlen": "replyMaxLen"}


def _copy(name: str) -> Any:
    """``WorkerSettings.<name>`` as a spec field with the worker's default, type, bounds and description."""
    info = WorkerSettings.model_fields[name]
    assert info.annotation is not None
    return (Annotated[(info.annotation, *info.metadata, Field(description=info.description))], info.default)


def _optional_copy(name: str) -> Any:
    """``WorkerSettings.<name>`` as an optional spec field: same type, bounds and description.

    Unset (None) means "the worker's own default", so the operator renders no variable for it.
    """
    info = WorkerSettings.model_fields[name]
    assert info.annotation is not None
    alias = _SPEC_NAMES.get(name, to_camel(name))
    field = Field(default=None, alias=alias, description=info.description)
    return (Annotated[(info.annotation | None, *info.metadata, field)], None)


_WorkerTuning: type[_Model] = create_model(
    "_WorkerTuning", __base__=_Model, **{name: _optional_copy(name) for name in TUNING_FIELDS}
)
WORKER_TUNING = {_SPEC_NAMES.get(name, to_camel(name)): name for name in TUNING_FIELDS}


class WorkerSpec(_WorkerTuning):  # type: ignore[misc, valid-type]
    """The worker Deployment. Unset tuning fields fall back to the worker's own defaults."""

    model_config = _validations(
        _rule(
            "!has(self.terminationGracePeriodSeconds) || !has(self.shutdownGraceSeconds) || "
            "self.terminationGracePeriodSeconds > self.shutdownGraceSeconds",
            "worker.terminationGracePeriodSeconds must be greater than worker.shutdownGraceSeconds, "
            "so Kubernetes does not kill a worker that is still finishing its messages",
        ),
        _rule(
            "!has(self.env) || self.env.all(e, e.name != 'STREAMQUEUE_REDIS_PASSWORD' || has(e.valueFrom))",
            "worker.env must not set STREAMQUEUE_REDIS_PASSWORD as a literal value: "
            "use redis.passwordSecretRef",
            field_path=".env",
        ),
        _rule(
            "!has(self.env) || self.env.all(e, e.name != 'STREAMQUEUE_OPENAI_API_KEY' || has(e.valueFrom))",
            "worker.env must not set STREAMQUEUE_OPENAI_API_KEY as a literal value: "
            "use worker.openaiApiKeySecretRef",
            field_path=".env",
        ),
    )

    image: str | None = Field(default=None, max_length=1024)
    """Worker image; the operator's default worker image when unset."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    termination_grace_period_seconds: int | None = Field(default=None, ge=1, le=3700)
    """Pod grace period; defaults to shutdownGraceSeconds + 15 (or 45)."""
    openai_api_key_secret_ref: APIKeySecretRef | None = None
    """Secret key holding the model handler's API key (STREAMQUEUE_OPENAI_API_KEY, via secretKeyRef)."""
    env: list[EnvVar] | None = Field(default=None, max_length=256)
    """Extra environment variables (Kubernetes EnvVar)."""
    resources: Annotated[dict[str, Any] | None, Field(json_schema_extra=_PRESERVE)] = None
    node_selector: dict[str, str] | None = None
    tolerations: Annotated[list[dict[str, Any]] | None, Field(json_schema_extra={"items": _PRESERVE})] = None
    affinity: Annotated[dict[str, Any] | None, Field(json_schema_extra=_PRESERVE)] = None
    service_account_name: Annotated[str | None, Field(max_length=253)] = None
    image_pull_secrets: list[LocalObjectReference] | None = None
    pod_labels: dict[str, str] | None = None
    pod_annotations: dict[str, str] | None = None


class ScalingSpec(_Model):
    """Scaling policy: see docs/operator.md, "Scaling behaviour"."""

    model_config = _validations(
        _rule(
            "self.minReplicas <= self.maxReplicas",
            "scaling.minReplicas must not exceed scaling.maxReplicas: lower minReplicas or raise maxReplicas",
        ),
        _rule(
            "!has(self.fallbackReplicas) || "
            "(self.fallbackReplicas >= self.minReplicas && "
            "self.fallbackReplicas <= self.maxReplicas)",
            "scaling.fallbackReplicas must lie within [minReplicas, maxReplicas]: "
            "change it, or unset it to hold the current count while Redis is unreachable",
            field_path=".fallbackReplicas",
        ),
    )

    min_replicas: int = Field(default=1, ge=0, le=1000)
    """0 allows scale to zero."""
    max_replicas: int = Field(default=10, ge=1, le=1000)
    target_backlog_per_replica: int = Field(default=5, ge=1, le=1_000_000)
    """Backlog (lag + pending) one replica should carry."""
    target_drain_seconds: int = Field(default=30, ge=1, le=86_400)
    """Size for draining the backlog within this many seconds."""
    poll_interval_seconds: float = Field(default=1.0, ge=0.2, le=300)
    """How often Redis is observed."""
    scale_down_stabilization_seconds: int = Field(default=60, ge=0, le=3600)
    """Scale down only to the highest recommendation of this window."""
    idle_cooldown_seconds: int = Field(default=120, ge=0, le=86_400)
    """With minReplicas 0: idle time before scaling to zero."""
    activation_backlog: int = Field(default=0, ge=0, le=1_000_000)
    """From zero, wake once the backlog exceeds this."""
    fallback_replicas: int | None = Field(default=None, ge=0, le=1000)
    """Replicas while Redis is unreachable; unset holds the current count."""
    cold_start_seconds: int = Field(default=60, ge=0, le=3600)
    """Longest a further scale-up waits for the pods of the last one to become Ready; 0: no wait."""


class HousekeepingSpec(_Model):
    dead_consumer_cleanup: bool = True
    """Delete consumers whose Pod is gone once their pending list is empty."""
    trim_stream: bool = False
    """XTRIM MINID the input stream below the oldest entry any group still needs."""
    interval_seconds: int = Field(default=30, ge=5, le=3600)


PERCENT_PATTERN = r"^(100|[1-9][0-9]?)%$"


class DisruptionSpec(_Model):
    """Voluntary disruptions of the workers (node drains, evictions): docs/upgrading.md."""

    model_config = _validations(
        _rule(
            "type(self.maxUnavailable) == string ? "
            f"self.maxUnavailable.matches('{PERCENT_PATTERN}') : self.maxUnavailable >= 1",
            "disruption.maxUnavailable must be at least 1 or a percentage from 1% to 100%: "
            "0 would block every node drain",
            field_path=".maxUnavailable",
        ),
    )

    max_unavailable: int | str = 1
    """Workers evictions may take down at once (the PodDisruptionBudget's): >= 1, or 1%-100% rounded up."""

    @field_validator("max_unavailable")
    @classmethod
    def _at_least_one(cls, value: int | str) -> int | str:
        """The CEL rule above, for specs the operator reads without the API server (tests, older CRDs)."""
        if isinstance(value, str) and not re.match(PERCENT_PATTERN, value):
            raise ValueError(f"{value!r} is not a percentage from 1% to 100%")
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1: 0 would block every node drain")
        return value


# The queue's shape, declared once by the worker: the operator renders them into the pods and observes
# every partition.
_QUEUE_SHAPE = ("partitions", "ordering", "group_start_id")
_QueueShape: type[_Model] = create_model(
    "_QueueShape", __base__=_Model, **{name: _copy(name) for name in _QUEUE_SHAPE}
)


class StreamQueueSpec(_QueueShape):  # type: ignore[misc, valid-type]
    model_config = _validations(
        _rule(
            "!has(self.ordering) || self.ordering != 'perUser' || !has(self.scaling) || "
            "!has(self.scaling.maxReplicas) || self.scaling.maxReplicas <= "
            "(has(self.partitions) ? self.partitions : 1)",
            "with ordering: perUser each partition has one worker at a time: "
            "scaling.maxReplicas must be at most partitions (more pods would stand idle)",
            field_path=".scaling.maxReplicas",
        ),
        # The worker's own cross-field rules, with the message the worker prints.
        *(_rule(r.cel, r.message, field_path=r.field_path) for r in RULES),
    )

    redis: Annotated[RedisSpec, Field(json_schema_extra={"default": {}})] = RedisSpec()
    stream: str = Field(default=wire.DEFAULT_STREAM, min_length=1, max_length=256)
    """Input stream."""
    group: str = Field(default=wire.DEFAULT_GROUP, min_length=1, max_length=256)
    """Consumer group of the workers."""
    reply_prefix: str = Field(default=wire.DEFAULT_REPLY_PREFIX, min_length=1, max_length=256)
    """Reply stream is <replyPrefix><user_id>."""
    worker: Annotated[WorkerSpec, Field(json_schema_extra={"default": {}})] = WorkerSpec()
    scaling: Annotated[ScalingSpec, Field(json_schema_extra={"default": {}})] = ScalingSpec()
    housekeeping: Annotated[HousekeepingSpec, Field(json_schema_extra={"default": {}})] = HousekeepingSpec()
    disruption: Annotated[DisruptionSpec, Field(json_schema_extra={"default": {}})] = DisruptionSpec()


class Condition(_Model):
    """A status condition, as in the Kubernetes API conventions (metav1.Condition)."""

    type: Annotated[str, Field(max_length=316)]
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, Field(max_length=1024)]
    message: Annotated[str, Field(max_length=32768)] = ""
    last_transition_time: str
    observed_generation: int | None = None


class StreamQueueStatus(_Model):
    observed_generation: int | None = None
    conditions: list[Condition] | None = None
    deployment: str | None = None
    backlog: int | None = Field(default=None, description="lag + pending.")
    lag: int | None = None
    lag_estimated: bool | None = Field(
        default=None, description="Redis reported lag as nil; lag is an estimate."
    )
    pending: int | None = None
    stream_length: int | None = None
    consumers: int | None = None
    partitions: dict[str, int] | None = Field(
        default=None, description="Backlog (lag + pending) of each partition stream, when there are several."
    )
    desired_replicas: int | None = None
    current_replicas: int | None = None
    replicas: str | None = Field(default=None, description="current/desired, for kubectl get.")
    ready_replicas: int | None = None
    paused: bool | None = Field(
        default=None, description="The pause annotations hold the replica count (see the Paused condition)."
    )
    last_scale_time: str | None = None
    last_scale_reason: str | None = None


def parse_spec(spec: dict[str, Any]) -> StreamQueueSpec:
    """The typed spec of a StreamQueue object (the API server has already applied defaults)."""
    return StreamQueueSpec.model_validate(spec)
