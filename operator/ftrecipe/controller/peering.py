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

import kubernetes.client
from kubernetes.client.exceptions import ApiException

PEERING_GROUP: Final = "kopf.dev"
PEERING_VERSION: Final = "v1"


class PeeringError(Exception):
    """The peering object cannot be made; one line saying what to grant or create."""


def _create(namespace: str | None, name: str) -> bool:
    custom = kubernetes.client.CustomObjectsApi()
    kind = "ClusterKopfPeering" if namespace is None else "KopfPeering"
    body = {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": kind, "metadata": {"name": name}}
    try:
        if namespace is None:
            custom.create_cluster_custom_object(PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", body)
        else:
            custom.create_namespaced_custom_object(
                PEERING_GROUP, PEERING_VERSION, namespace, "kopfpeerings", body
            )
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
