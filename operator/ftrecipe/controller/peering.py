"""The kopf peering object replicas meet in (`ftrecipe operator --peering NAME`).

kopf never creates it, and a replica started with a peering name that does not exist would wait forever;
so the operator creates it at start-up when missing: a ClusterKopfPeering when watching all namespaces,
else a KopfPeering in each watched namespace (kopf peers per namespace). Creating it here, rather than as
a Helm object, keeps it out of every upgrade and sync (a replaced peering object briefly forgets who is
active).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from kubernetes.client.exceptions import ApiException

from ftrecipe.controller.observe import kube_request

PEERING_GROUP: Final = "kopf.dev"
PEERING_VERSION: Final = "v1"


class PeeringError(Exception):
    """The peering object cannot be made; one line saying what to grant or create."""


def _create(namespace: str | None, name: str) -> bool:
    kind = "ClusterKopfPeering" if namespace is None else "KopfPeering"
    body = {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": kind, "metadata": {"name": name}}
    where_path = "" if namespace is None else f"/namespaces/{namespace}"
    path = f"/apis/{PEERING_GROUP}/{PEERING_VERSION}{where_path}/{kind.lower()}s"
    try:
        # The operator's one client (kube_client): its connection is the first the operator keeps.
        kube_request("POST", path, body=body, content_type="application/json")
    except ApiException as error:
        if error.status == 409:
            return False
        where = "cluster-wide" if namespace is None else f"in namespace {namespace}"
        if error.status == 404:
            raise PeeringError(
                f"cannot create {kind} {name} {where}: the kopf.dev peering CRDs are not installed "
                "(the Helm chart installs them with peering.enabled)"
            ) from None
        if error.status == 403:
            raise PeeringError(
                f"cannot create {kind} {name} {where}: forbidden; grant `create` on "
                f"{kind.lower()}s.kopf.dev to the operator, or create the object yourself"
            ) from None
        raise PeeringError(f"cannot create {kind} {name} {where}: {error.status} {error.reason}") from None
    return True


def ensure_peering(name: str, *, namespaces: Sequence[str], clusterwide: bool) -> list[str]:
    """Create the peering object(s) that do not exist yet; returns what was created."""
    created = []
    for namespace in [None] if clusterwide else list(namespaces):
        if _create(namespace, name):
            created.append(
                f"ClusterKopfPeering {name}" if namespace is None else f"KopfPeering {namespace}/{name}"
            )
    return created
