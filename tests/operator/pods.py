"""A stand-in for the pod calls of the scaler's ranking and housekeeping (list names, list one
annotation, patch one annotation) and for the leader's fence (always leading here), recording what it
is sent. Tests that use it are about which Redis keys and consumers the scaler reads, not about how a
patch reaches the API server."""

from __future__ import annotations

from streamqueue_operator.deletion_cost import ANNOTATION


class PodAnnotations:
    """Live pods by name, with their ``pod-deletion-cost`` (None: not set yet)."""

    def __init__(self, *pods: str) -> None:
        self.annotations: dict[str, str | None] = dict.fromkeys(pods)

    async def pod_names(self, namespace: str, selector: str) -> set[str]:
        return set(self.annotations)

    async def pod_annotation(self, namespace: str, selector: str, key: str) -> dict[str, str | None]:
        assert key == ANNOTATION
        return dict(self.annotations)

    async def annotate_pod(self, namespace: str, pod: str, key: str, value: str) -> None:
        assert key == ANNOTATION
        self.annotations[pod] = value

    def fence(self) -> None:
        """The one replica is the leader: its Redis writes go ahead (``kubeapi.Cluster.fence``)."""
