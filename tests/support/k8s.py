"""A fake-but-real-HTTP Kubernetes API for tests (fixture ``k8s``), plus a kopf runner against it.

Why: the operator talks to Kubernetes through the real ``kubernetes`` client and kopf (aiohttp). Tests need
a real HTTP API on 127.0.0.1 that keeps objects, serves list/watch/patch like the API server does, and is
fast and hermetic. kmock's ``KubernetesEmulator`` (by kopf's author) is that server; ``FakeKubernetes``
below closes the gaps that matter for an operator (server-set metadata, resourceVersions and watch resume,
the status subresource, generateName, 201 on create, list kinds, schema pruning/validation, ...).

The emulator runs on its own event loop in a background thread, so sync tests, async tests, the blocking
``kubernetes`` client and an operator (in yet another thread, see ``run_operator``) can all use it at once.

Usage::

    def test_it(k8s: K8s) -> None:
        registry = kopf.OperatorRegistry()

        @kopf.on.create(CRD_GROUP, CRD_VERSION, CRD_PLURAL, registry=registry)
        def create_fn(patch: kopf.Patch, **_: Any) -> None:
            patch.status["phase"] = "Pending"

        with k8s.run_operator(registry, namespaces=["ns"]) as operator:
            k8s.custom.create_namespaced_custom_object(CRD_GROUP, CRD_VERSION, "ns", CRD_PLURAL, body)
            k8s.wait_for_object(CRD_RESOURCE, "name", "ns", where=lambda b: "status" in b)
        assert not operator.errors

Tested against kmock 0.8, kopf 1.45 and kubernetes 37; ``FakeKubernetes`` overrides kmock internals
(``_handle``, ``_serve_*``, ``_lock``, ``_buses``) and reads its views' fields (``_sees``, checked at import),
so re-run ``tests/test_fixture_k8s.py`` after upgrades.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import collections
import contextlib
import copy
import datetime
import functools
import gzip
import hashlib
import importlib
import importlib.metadata
import importlib.resources
import json
import logging
import random
import re
import sys
import threading
import time
import types
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeAlias, TypeVar, cast

import aiohttp.web
import attrs
import celpy
import jsonpatch
import jsonpointer
import jsonschema
import kmock
import kopf
import kubernetes.client
import kubernetes.config
import kubernetes.config.kube_config
import pytest
import yaml
from celpy.adapter import json_to_cel
from kmock._internal import dsl as _kmock_dsl  # only for `_sees`: kmock's view classes
from kmock._internal import parsing as _kmock_parsing  # only to fix the parsing of /api/v1/namespaces
from kmock._internal.rendering import ReactionMismatchError  # = kmock.ReactionMismatchError, not in __all__

Json: TypeAlias = Any
Body: TypeAlias = dict[str, Any]
ResourceSpec: TypeAlias = "str | kmock.resource"
T = TypeVar("T")

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
CRD_PATH: Final = REPO_ROOT / "crds" / "finetunerecipes.ftrecipe.dev.yaml"
# How long helpers wait for the emulator thread; a healthy call takes milliseconds.
_CALL_TIMEOUT: Final = 10.0
# Bounds how long stopping the emulator waits for open (watch) connections.
_SHUTDOWN_TIMEOUT: Final = 1.0
_NAME_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME_RE: Final = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE_RE: Final = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Kubernetes' generateName alphabet: no vowels, no look-alike digits.
_GENERATE_ALPHABET: Final = "bcdfghjklmnpqrstvwxz2456789"
_LOG = logging.getLogger(__name__)
# celpy logs every CEL evaluation at DEBUG (kilobytes each); keep `--log-level=DEBUG` runs readable.
logging.getLogger("celpy").setLevel(logging.INFO)


# --------------------------------------------------------------------------------------------------------
# Our custom resource's identity. Read from the CRD manifest when it exists, so tests follow the real CRD.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrdInfo:
    """Names and shape of one custom resource, as the API server's discovery would report them."""

    group: str
    version: str
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    namespaced: bool = True
    status_subresource: bool = True
    # The openAPIV3Schema of `version`: the emulator prunes, defaults and validates with it.
    schema: Json = None
    manifest: Json = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def resource(self) -> str:
        """The kmock-style resource key, e.g. ``ftrecipe.dev/v1alpha1/finetunerecipes``."""
        return f"{self.group}/{self.version}/{self.plural}"

    @property
    def name(self) -> str:
        return f"{self.plural}.{self.group}"

    @classmethod
    def from_manifest(cls, manifest: Json, version: str | None = None) -> CrdInfo:
        """Read the served storage version (or `version`) of a CustomResourceDefinition manifest."""
        spec = manifest["spec"]
        names = spec["names"]
        versions = spec["versions"]
        chosen = next(
            (v for v in versions if v["name"] == version)
            if version
            else (v for v in versions if v.get("storage")),
            versions[0],
        )
        return cls(
            group=spec["group"],
            version=chosen["name"],
            kind=names["kind"],
            plural=names["plural"],
            singular=names.get("singular") or names["kind"].lower(),
            short_names=tuple(names.get("shortNames", ())),
            categories=tuple(names.get("categories", ())),
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            status_subresource="status" in (chosen.get("subresources") or {}),
            schema=(chosen.get("schema") or {}).get("openAPIV3Schema"),
            manifest=manifest,
        )

    def synthetic_manifest(self) -> Json:
        """A minimal CRD object for the emulator when no manifest file exists yet."""
        version: Json = {
            "name": self.version,
            "served": True,
            "storage": True,
            "schema": {
                "openAPIV3Schema": self.schema
                or {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            },
        }
        if self.status_subresource:
            version["subresources"] = {"status": {}}
        return {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": self.name},
            "spec": {
                "group": self.group,
                "names": {
                    "kind": self.kind,
                    "listKind": f"{self.kind}List",
                    "plural": self.plural,
                    "singular": self.singular,
                    "shortNames": list(self.short_names),
                },
                "scope": "Namespaced" if self.namespaced else "Cluster",
                "versions": [version],
            },
        }


def _load_crd() -> CrdInfo:
    if CRD_PATH.exists():
        return CrdInfo.from_manifest(yaml.safe_load(CRD_PATH.read_text()))
    return CrdInfo(
        group="ftrecipe.dev",
        version="v1alpha1",
        kind="FinetuneRecipe",
        plural="finetunerecipes",
        singular="finetunerecipe",
        short_names=("ftr",),
    )


CRD: Final = _load_crd()
CRD_GROUP: Final = CRD.group
CRD_VERSION: Final = CRD.version
CRD_KIND: Final = CRD.kind
CRD_PLURAL: Final = CRD.plural
CRD_SINGULAR: Final = CRD.singular
CRD_SHORT_NAMES: Final = CRD.short_names
CRD_API_VERSION: Final = CRD.api_version
CRD_RESOURCE: Final = CRD.resource  # "ftrecipe.dev/v1alpha1/finetunerecipes"
# kopf's peering resources (charts/ftrecipe-operator installs them): kopf patches their `status` directly.
KOPF_PEERINGS: Final = (
    CrdInfo(
        group="kopf.dev",
        version="v1",
        kind="KopfPeering",
        plural="kopfpeerings",
        singular="kopfpeering",
        status_subresource=False,
    ),
    CrdInfo(
        group="kopf.dev",
        version="v1",
        kind="ClusterKopfPeering",
        plural="clusterkopfpeerings",
        singular="clusterkopfpeering",
        namespaced=False,
        status_subresource=False,
    ),
)


# Kueue's Workload (what Kueue makes of a Job in a queue; its conditions say why it is not admitted).
KUEUE_WORKLOAD: Final = CrdInfo(
    group="kueue.x-k8s.io",
    version="v1beta1",
    kind="Workload",
    plural="workloads",
    singular="workload",
)

# kubernetes-sigs/jobset's JobSet: served only when a test installs it (`KubeCluster.install_jobset`), so that
# a cluster without it (404 on jobsets) can be tested too. No schema: the emulator stores what it is sent.
JOBSET: Final = CrdInfo(
    group="jobset.x-k8s.io",
    version="v1alpha2",
    kind="JobSet",
    plural="jobsets",
    singular="jobset",
)


def _release(version: str) -> tuple[int, ...]:
    """`v0.9.1` -> (0, 9, 1)."""
    return tuple(int(part) for part in version.removeprefix("v").split("."))


# The labels (and annotations) the JobSet controller puts on its child Jobs and their pod templates.
JOBSET_NAME_LABEL: Final = "jobset.sigs.k8s.io/jobset-name"
JOBSET_UID_LABEL: Final = "jobset.sigs.k8s.io/jobset-uid"
REPLICATED_JOB_LABEL: Final = "jobset.sigs.k8s.io/replicatedjob-name"
REPLICATED_JOB_REPLICAS_LABEL: Final = "jobset.sigs.k8s.io/replicatedjob-replicas"
JOB_INDEX_LABEL: Final = "jobset.sigs.k8s.io/job-index"
JOB_KEY_LABEL: Final = "jobset.sigs.k8s.io/job-key"
RESTART_ATTEMPT_LABEL: Final = "jobset.sigs.k8s.io/restart-attempt"
# The Job controller's label (and annotation) on each pod of an Indexed Job (Kubernetes 1.28+).
COMPLETION_INDEX_LABEL: Final = "batch.kubernetes.io/job-completion-index"


# --------------------------------------------------------------------------------------------------------
# kmock gap: the `namespaces` resource itself is mis-parsed (GET /api/v1/namespaces -> ValueError -> 500;
# GET /api/v1/namespaces/default -> namespace="default", no resource). kopf lists and watches namespaces in
# namespaced mode, so this breaks it. The fix wraps kmock's path parser; other paths parse as before.
# --------------------------------------------------------------------------------------------------------

_NAMESPACE_SUBRESOURCES: Final = frozenset({"status", "finalize"})


def _fixed_parse_path(path: str) -> _kmock_parsing.ParsedPath:
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"]:
        rest = parts[3:]
        if not rest:
            return _kmock_parsing.ParsedPath("", "v1", "namespaces")
        if len(rest) == 1:
            return _kmock_parsing.ParsedPath("", "v1", "namespaces", name=rest[0])
        if len(rest) == 2 and rest[1] in _NAMESPACE_SUBRESOURCES:
            return _kmock_parsing.ParsedPath("", "v1", "namespaces", name=rest[0], subresource=rest[1])
    return _ORIGINAL_PARSE_PATH(path)


_ORIGINAL_PARSE_PATH: Final = getattr(_kmock_parsing.parse_path, "__wrapped__", _kmock_parsing.parse_path)
_fixed_parse_path.__wrapped__ = _ORIGINAL_PARSE_PATH  # type: ignore[attr-defined]
_kmock_parsing.parse_path = _fixed_parse_path


# --------------------------------------------------------------------------------------------------------
# API errors: rendered as a real `Status` object with the status code clients and kopf expect.
# --------------------------------------------------------------------------------------------------------

_REASONS: Final = {
    400: "BadRequest",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
}


class ApiError(Exception):
    """An error the real API server would answer with (404, 409, 422, ...), not an emulator crash."""

    def __init__(self, code: int, message: str, *, reason: str | None = None, details: Json = None) -> None:
        super().__init__(f"{code} {reason or _REASONS.get(code, 'Failure')}: {message}")
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Failure")
        self.details = details or {}

    def status(self) -> Body:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


# --------------------------------------------------------------------------------------------------------
# What helm needs beyond kmock's JSON: Secrets written as Kubernetes protobuf. helm keeps its release
# record in a Secret through client-go's typed clientset, which sends protobuf (and accepts JSON back).
# Only a Secret's fields are decoded; anything else is refused with 415, never guessed.
# --------------------------------------------------------------------------------------------------------

PROTOBUF: Final = "application/vnd.kubernetes.protobuf"
_PROTOBUF_MAGIC: Final = b"k8s\x00"
# Field numbers from generated.proto of k8s.io/apimachinery (ObjectMeta) and k8s.io/api core/v1 (Secret).
_META_STRINGS: Final = {1: "name", 2: "generateName", 3: "namespace", 5: "uid", 6: "resourceVersion"}
_META_MAPS: Final = {11: "labels", 12: "annotations"}
_META_FINALIZERS: Final = 14
_META_SERVER_SET: Final = frozenset({4, 7, 8, 9, 10})  # selfLink, generation, timestamps: set by the server


def _protobuf_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: varints as int, length-delimited fields as bytes."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(data):
                raise ApiError(400, "truncated protobuf body")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(data):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            yield number, varint()
        elif wire_type == 2:
            length = varint()
            yield number, data[pos : pos + length]
            pos += length
        else:
            raise ApiError(
                415, f"the emulator does not decode protobuf wire type {wire_type} (field {number})"
            )


def _protobuf_bytes(value: int | bytes) -> bytes:
    if isinstance(value, int):
        raise ApiError(400, "protobuf varint where a string or message belongs")
    return value


def _protobuf_map_entry(entry: int | bytes) -> tuple[str, bytes]:
    fields = {number: _protobuf_bytes(value) for number, value in _protobuf_fields(_protobuf_bytes(entry))}
    return fields.get(1, b"").decode(), fields.get(2, b"")


def _object_meta_from_protobuf(data: bytes) -> Body:
    meta: Body = {}
    for number, value in _protobuf_fields(data):
        if number in _META_STRINGS:
            if text := _protobuf_bytes(value).decode():
                meta[_META_STRINGS[number]] = text
        elif number in _META_MAPS:
            key, item = _protobuf_map_entry(value)
            meta.setdefault(_META_MAPS[number], {})[key] = item.decode()
        elif number == _META_FINALIZERS:
            meta.setdefault("finalizers", []).append(_protobuf_bytes(value).decode())
        elif number not in _META_SERVER_SET:
            raise ApiError(415, f"the emulator does not decode protobuf ObjectMeta field {number}; send JSON")
    return meta


def secret_from_protobuf(body: bytes) -> Body:
    """A v1 Secret sent as Kubernetes protobuf (``k8s\\0`` + runtime.Unknown) as the JSON object it means."""
    if not body.startswith(_PROTOBUF_MAGIC):
        raise ApiError(400, "protobuf body without the k8s\\0 envelope")
    unknown = {n: _protobuf_bytes(v) for n, v in _protobuf_fields(body[len(_PROTOBUF_MAGIC) :])}
    type_meta = {n: _protobuf_bytes(v).decode() for n, v in _protobuf_fields(unknown.get(1, b""))}
    if (type_meta.get(1), type_meta.get(2)) != ("v1", "Secret"):
        raise ApiError(415, f"the emulator decodes only v1 Secrets from protobuf, not {type_meta}; send JSON")
    secret: Body = {"apiVersion": "v1", "kind": "Secret", "metadata": {}}
    for number, value in _protobuf_fields(unknown.get(2, b"")):
        if number == 1:
            secret["metadata"] = _object_meta_from_protobuf(_protobuf_bytes(value))
        elif number == 2:
            key, item = _protobuf_map_entry(value)
            secret.setdefault("data", {})[key] = base64.b64encode(item).decode()
        elif number == 3:
            secret["type"] = _protobuf_bytes(value).decode()
        elif number == 4:
            key, item = _protobuf_map_entry(value)
            secret.setdefault("stringData", {})[key] = item.decode()
        elif number == 5:
            secret["immutable"] = bool(value)
        else:
            raise ApiError(415, f"the emulator does not decode protobuf Secret field {number}; send JSON")
    return secret


# --------------------------------------------------------------------------------------------------------
# Pure helpers: timestamps, merge-patch, selectors, schema pruning/defaulting, validation.
# --------------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge_patch(target: Json, patch: Json) -> Json:
    """RFC 7386 JSON merge-patch: dicts merge recursively, ``None`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _split_selector(text: str) -> list[str]:
    """Split a selector on top-level commas (``a in (x,y),b`` has two terms)."""
    terms: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(char)
    terms.append("".join(current))
    return [term.strip() for term in terms if term.strip()]


_SET_TERM_RE: Final = re.compile(r"^(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)$")
_EQ_TERM_RE: Final = re.compile(r"^(?P<key>[^\s!=()]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=()]*)$")
_EXISTS_TERM_RE: Final = re.compile(r"^(?P<neg>!)?\s*(?P<key>[^\s!=()]+)$")

Predicate: TypeAlias = Callable[[Body], bool]


def _label_selector(text: str) -> Predicate:
    """Compile a label selector (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``)."""
    # Each requirement: (key, operator, values); operators as in k8s.io/apimachinery/pkg/labels.
    requirements: list[tuple[str, str, frozenset[str]]] = []
    for term in _split_selector(text):
        if m := _SET_TERM_RE.match(term):
            values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
            requirements.append((m["key"], m["op"], values))
        elif m := _EQ_TERM_RE.match(term):
            requirements.append((m["key"], "!=" if m["op"] == "!=" else "=", frozenset([m["value"]])))
        elif m := _EXISTS_TERM_RE.match(term):
            requirements.append((m["key"], "!exists" if m["neg"] else "exists", frozenset()))
        else:
            raise ApiError(400, f"unable to parse requirement: {term!r} in labelSelector {text!r}")

    def predicate(obj: Body) -> bool:
        labels: Mapping[str, str] = obj.get("metadata", {}).get("labels") or {}
        for key, op, values in requirements:
            value = labels.get(key)
            ok = {
                "=": value in values,
                "in": value in values,
                "!=": value not in values,
                "notin": value not in values,
                "exists": key in labels,
                "!exists": key not in labels,
            }[op]
            if not ok:
                return False
        return True

    return predicate


# Field labels that name another field than their path (the API server's field label conversions).
_FIELD_LABELS: Final = {"status.successful": "status.succeeded"}  # Jobs


def _field_value(obj: Body, dotted: str) -> str:
    node: Json = obj
    for part in _FIELD_LABELS.get(dotted, dotted).split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return "" if node is None else str(node)


def _field_selector(text: str) -> Predicate:
    """Compile a field selector (``metadata.name=x``, ``status.phase!=Running``; ANDed)."""
    requirements: list[tuple[str, str, bool]] = []
    for term in _split_selector(text):
        m = _EQ_TERM_RE.match(term)
        if not m:
            raise ApiError(400, f"invalid field selector term {term!r}")
        requirements.append((m["key"], m["value"], m["op"] == "!="))

    def predicate(obj: Body) -> bool:
        return all((_field_value(obj, path) == value) != negated for path, value, negated in requirements)

    return predicate


def _prune(schema: Json, value: Json, *, root: bool = False) -> Json:
    """Drop fields the structural schema does not declare, as the API server does for custom resources."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        result = {}
        for key, item in value.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                result[key] = item
            elif key in properties:
                result[key] = _prune(properties[key], item)
            elif isinstance(additional, dict):
                result[key] = _prune(additional, item)
            elif additional is True:
                result[key] = item
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune(schema["items"], item) for item in value]
    return value


def _apply_defaults(schema: Json, value: Json) -> Json:
    """Structural defaulting: fill absent properties that declare a default, recursing into what exists."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        result = dict(value)
        properties = schema.get("properties") or {}
        for key, sub in properties.items():
            if key not in result and isinstance(sub, dict) and "default" in sub:
                result[key] = copy.deepcopy(sub["default"])
            if key in result:
                result[key] = _apply_defaults(sub, result[key])
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            for key in result:
                if key not in properties:
                    result[key] = _apply_defaults(additional, result[key])
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_apply_defaults(schema["items"], item) for item in value]
    return value


def _validate_metadata(obj: Body, *, max_name_length: int) -> None:
    """Reject names and labels the real API server rejects (422), so operators see those bugs in tests."""
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    problems: list[str] = []
    if len(name) > max_name_length or not _NAME_RE.match(name):
        problems.append(
            f"metadata.name: Invalid value: {name!r}: must be a lowercase RFC 1123 subdomain "
            f"of at most {max_name_length} characters"
        )
    for key, value in (meta.get("labels") or {}).items():
        label_name = key.rsplit("/", 1)[-1]
        if len(label_name) > 63 or not _LABEL_NAME_RE.match(label_name):
            problems.append(f"metadata.labels: Invalid value: {key!r}: name part must be a valid label name")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE_RE.match(value):
            problems.append(
                f"metadata.labels: Invalid value: {value!r}: a valid label must be 63 characters or less"
            )
    if problems:
        raise ApiError(422, "; ".join(problems), details={"name": name})


def _condition(kind: str, reason: str, message: str, now: str) -> Body:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message or reason,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }


def _job_condition(job: Body, kind: str) -> Body | None:
    """The Job's (or JobSet's) condition of type `kind` when True."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return cast(Body, condition)
    return None


def _owner(obj: Body) -> Body:
    """A controller ownerReference to `obj`, as controllers set it on what they create."""
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _jobset_attempt(job: Body) -> int:
    labels = job["metadata"].get("labels") or {}
    try:
        return int(labels.get(RESTART_ATTEMPT_LABEL, "0"))
    except ValueError:
        return 0


def _jobset_children(jobset: Body, attempt: int, subdomain: str | None) -> dict[str, Body]:
    """The child Jobs of one restart attempt of a JobSet, by name (`<jobset>-<replicatedJob>-<index>`),
    labelled and annotated as the JobSet controller does (its labels also go on the pod template)."""
    meta = jobset["metadata"]
    spec = jobset.get("spec") or {}
    children: dict[str, Body] = {}
    for replicated in spec.get("replicatedJobs") or []:
        replicas = int(replicated.get("replicas", 1))
        for index in range(replicas):
            name = f"{meta['name']}-{replicated['name']}-{index}"
            ours = {
                JOBSET_NAME_LABEL: meta["name"],
                JOBSET_UID_LABEL: meta["uid"],
                REPLICATED_JOB_LABEL: replicated["name"],
                REPLICATED_JOB_REPLICAS_LABEL: str(replicas),
                JOB_INDEX_LABEL: str(index),
                JOB_KEY_LABEL: hashlib.sha1(f"{meta['namespace']}/{name}".encode()).hexdigest(),
                RESTART_ATTEMPT_LABEL: str(attempt),
            }
            template = copy.deepcopy(replicated.get("template") or {})
            template_meta = template.get("metadata") or {}
            job_spec = template.get("spec") or {}
            job_spec["suspend"] = bool(spec.get("suspend"))
            pod = job_spec.setdefault("template", {})
            pod_meta = pod.setdefault("metadata", {})
            pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **ours}
            pod_meta["annotations"] = {**(pod_meta.get("annotations") or {}), **ours}
            if subdomain:
                pod.setdefault("spec", {})["subdomain"] = subdomain
            children[name] = {
                "metadata": {
                    "name": name,
                    "labels": {**(template_meta.get("labels") or {}), **ours},
                    "annotations": {**(template_meta.get("annotations") or {}), **ours},
                    "ownerReferences": [_owner(jobset)],
                },
                "spec": job_spec,
            }
    return children


def _set_condition(conditions: list[Body], kind: str, status: str, reason: str, message: str) -> None:
    """metav1 SetStatusCondition: the transition time changes only with the status."""
    for index, condition in enumerate(conditions):
        if condition.get("type") == kind:
            if (condition.get("status"), condition.get("reason"), condition.get("message")) == (
                status,
                reason,
                message,
            ):
                return
            since = condition.get("lastTransitionTime") if condition.get("status") == status else _now()
            conditions[index] = {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since,
            }
            return
    conditions.append(
        {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": _now()}
    )


def _message_matches(patterns: Sequence[str], message: str) -> bool:
    """JobSet's anyMatchFound (pkg/controllers/failure_policy.go, v0.10.0+): Go's regexp.MatchString, a
    search anywhere in the message; an invalid pattern is logged and skipped. Python's re reads the RE2
    patterns we use alike."""
    for pattern in patterns:
        try:
            if re.search(pattern, message):
                return True
        except re.error:
            continue
    return False


def _failure_rule(policy: Body, child: Body, reason: str, message: str) -> Body | None:
    """The first failurePolicy rule that matches a failed child Job (its failure reason, its failure
    message: any of onJobFailureMessagePatterns, its replicated Job); an empty list matches anything."""
    replicated = (child["metadata"].get("labels") or {}).get(REPLICATED_JOB_LABEL)
    for rule in policy.get("rules") or []:
        reasons = rule.get("onJobFailureReasons") or []
        patterns = rule.get("onJobFailureMessagePatterns") or []
        targets = rule.get("targetReplicatedJobs") or []
        if (
            (not reasons or reason in reasons)
            and (not patterns or _message_matches(patterns, message))
            and (not targets or replicated in targets)
        ):
            return cast(Body, rule)
    return None


def _jobset_status(jobset: Body, status: Body, children: Sequence[Body], expected: int) -> Body:
    """The JobSet's status after one look at the child Jobs of its current attempt."""
    status = copy.deepcopy(status)
    spec = jobset.get("spec") or {}
    conditions: list[Body] = list(status.get("conditions") or [])
    restarts = int(status.get("restarts") or 0)
    status["restarts"] = restarts
    counts: dict[str, Body] = {}
    for replicated in spec.get("replicatedJobs") or []:
        counts[replicated["name"]] = {
            "name": replicated["name"],
            "ready": 0,
            "succeeded": 0,
            "failed": 0,
            "active": 0,
            "suspended": 0,
        }
    for child in children:
        entry = counts.get((child["metadata"].get("labels") or {}).get(REPLICATED_JOB_LABEL, ""))
        if entry is None:
            continue
        child_status = child.get("status") or {}
        if _job_condition(child, "Complete") is not None:
            entry["succeeded"] += 1
        elif _job_condition(child, "Failed") is not None:
            entry["failed"] += 1
        elif (child.get("spec") or {}).get("suspend"):
            entry["suspended"] += 1
        elif child_status.get("active"):
            entry["active"] += 1
            if child_status.get("ready"):
                entry["ready"] += 1
    status["replicatedJobsStatus"] = list(counts.values())
    if spec.get("suspend"):
        _set_condition(conditions, "Suspended", "True", "SuspendedJobs", "jobset is suspended")
    elif any(c.get("type") == "Suspended" and c.get("status") == "True" for c in conditions):
        _set_condition(conditions, "Suspended", "False", "ResumeJobs", "jobset is resumed")
    failed = [c for c in children if _job_condition(c, "Failed") is not None]
    if failed:
        first = failed[0]
        failure = _job_condition(first, "Failed") or {}
        reason = str(failure.get("reason") or "")
        policy = spec.get("failurePolicy") or {}
        rule = _failure_rule(policy, first, reason, str(failure.get("message") or ""))
        action = rule.get("action") if rule is not None else "RestartJobSet"
        first_job = f"(first failed job: {first['metadata']['name']})"
        # JobSet counts a restart toward maxRestarts in restartsCountTowardsMax (omitted while 0); status
        # restarts counts them all (and names the restart attempt).
        counted = int(status.get("restartsCountTowardsMax") or 0)
        if action == "FailJobSet":
            why = ("FailJobSetFailurePolicyAction", f"applying FailJobSet failure policy action {first_job}")
        elif action == "RestartJobSetAndIgnoreMaxRestarts":
            status["restarts"] = restarts + 1
            status["conditions"] = conditions
            return status
        elif counted >= int(policy.get("maxRestarts") or 0):
            why = ("ReachedMaxRestarts", f"jobset failed due to reaching max number of restarts {first_job}")
        else:
            status["restarts"] = restarts + 1
            status["restartsCountTowardsMax"] = counted + 1
            status["conditions"] = conditions
            return status
        _set_condition(conditions, "Failed", "True", why[0], why[1])
        status["terminalState"] = "Failed"
    elif expected and len([c for c in children if _job_condition(c, "Complete") is not None]) == expected:
        _set_condition(conditions, "Completed", "True", "AllJobsCompleted", "jobset completed successfully")
        status["terminalState"] = "Completed"
    status["conditions"] = conditions
    return status


def _completion_index(job: Body, suffix: str | None) -> int | None:
    """The completion index of an Indexed Job's pod named `<job>-<suffix>`: suffix `<index>-<random>`
    (the Job controller's naming), else 0; None for a Job that is not Indexed."""
    if (job.get("spec") or {}).get("completionMode") != "Indexed":
        return None
    head = (suffix or "").split("-", 1)[0]
    return int(head) if head.isdigit() and "-" in (suffix or "") else 0


def _indexed_pod_spec(job: Body, suffix: str | None) -> Body:
    """What the Job controller adds to an Indexed Job's pod with a `subdomain`: its stable hostname
    ``<job>-<index>`` (so the pod answers to ``<job>-<index>.<subdomain>``)."""
    index = _completion_index(job, suffix)
    template = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    if index is None or not template.get("subdomain"):
        return {}
    return {"hostname": f"{job['metadata']['name']}-{index}", "subdomain": template["subdomain"]}


def _without(obj: Body, *keys: str) -> Body:
    return {key: value for key, value in obj.items() if key not in keys}


@functools.cache
def _cel_program(rule: str) -> Any:
    return _CEL.program(_CEL.compile(rule))


_CEL: Final = celpy.Environment()


def _cel_violations(schema: Json, value: Json, path: str = "") -> Iterator[str]:
    """`x-kubernetes-validations` rules that evaluate to false (rules on ``oldSelf`` are skipped)."""
    if not isinstance(schema, dict):
        return
    for rule in schema.get("x-kubernetes-validations") or []:
        if "oldSelf" in rule["rule"]:
            continue
        try:
            verdict = _cel_program(rule["rule"]).evaluate({"self": json_to_cel(value)})
        except Exception:  # celpy lacks some of Kubernetes' CEL: never reject on what it cannot evaluate
            continue
        if verdict is False or (isinstance(verdict, celpy.celtypes.BoolType) and not verdict):
            yield f"{path.lstrip('.') or '<root>'}: Invalid value: {rule.get('message') or rule['rule']}"
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                yield from _cel_violations(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _cel_violations(schema["items"], item, f"{path}[{index}]")


class _CelMemo:
    """``_cel_violations`` of one resource's objects, each top-level field's verdict memoised by its JSON.

    Why: celpy takes about 10 ms per recipe spec, and most writes (kopf's annotations, the operator's
    status) leave the spec as it was. Rules on the root itself (none in our CRD) run every time.
    """

    def __init__(self, schema: Json, limit: int = 4096) -> None:
        self.schema = schema
        self.limit = limit
        self.evaluations: collections.Counter[str] = collections.Counter()  # celpy runs, by field
        self._verdicts: dict[tuple[str, str], tuple[str, ...]] = {}

    def violations(self, body: Body) -> list[str]:
        problems = list(_cel_violations(_without(self.schema, "properties"), body))
        for key, sub in (self.schema.get("properties") or {}).items():
            if key not in body:
                continue
            memo_key = (key, json.dumps(body[key], sort_keys=True))
            verdict = self._verdicts.get(memo_key)
            if verdict is None:
                if len(self._verdicts) >= self.limit:
                    self._verdicts.clear()  # bounded; a miss only costs one evaluation
                verdict = self._verdicts[memo_key] = tuple(_cel_violations(sub, body[key], f".{key}"))
                self.evaluations[key] += 1
            problems.extend(verdict)
        return problems


def _schema_violations(
    validator: jsonschema.Draft4Validator, value: Json, cel: _CelMemo | None = None
) -> list[str]:
    """What the API server's OpenAPI and CEL validation of a custom resource would reject."""
    schema = validator.schema
    problems = [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator.iter_errors(value)
    ]
    if problems:
        return problems
    if cel is not None and isinstance(value, dict):
        return cel.violations(value)
    return list(_cel_violations(schema, value))


# --------------------------------------------------------------------------------------------------------
# kmock's request dispatch without its quadratic cost. kmock picks the reaction that serves a request
# with `request in view`, and a view answers that by filtering its whole request history: each request
# cost (reactions tried) x (requests so far) criteria checks, so a test's or benchmark's emulator slowed
# down as it went (benchmarks/operator_scale.py: 20 recipes' lifecycle took 270 s, 90 % of it there).
# For the views the emulator and tests build (the root, filters on it, priority markers), a request
# being served is in the view iff the filters accept the request itself: `_sees` answers from it alone
# and leaves every other view (slices, groups, exclusions, streams) to kmock. FakeKubernetes._handle uses
# it; kmock's classes and functions stay as they are.
# --------------------------------------------------------------------------------------------------------


def _check_kmock_views() -> None:
    """Fail at import, saying what moved, if kmock's views no longer work the way `_sees` assumes."""
    fields: dict[type[Any], set[str]] = {
        _kmock_dsl.Root: {"_requests", "_payloads"},
        _kmock_dsl.Filter: {"_source", "criteria"},
        _kmock_dsl.Priority: {"_source"},
        _kmock_dsl.Reaction: {"_source", "_disabled"},
    }
    problems = [
        f"kmock.dsl.{cls.__name__} has no {name}"
        for cls, names in fields.items()
        for name in sorted(names - {f.name for f in attrs.fields(cls)})
    ]
    # Membership is iteration: a Root yields its requests, a Priority its source's, a Filter its
    # source's that its criteria accept; none of them answers `in` another way.
    if _kmock_dsl.Priority.__iter__ is not _kmock_dsl.Chained.__iter__:
        problems.append("kmock.dsl.Priority filters what it iterates")
    for cls in (_kmock_dsl.Root, _kmock_dsl.Filter, _kmock_dsl.Priority):
        if cls.__contains__ is not _kmock_dsl.View.__contains__:
            problems.append(f"kmock.dsl.{cls.__name__} has its own __contains__")
    if not isinstance(getattr(_kmock_dsl.Reaction, "priorities", None), property):
        problems.append("kmock.dsl.Reaction has no priorities")
    if problems:
        raise ImportError(
            f"kmock {importlib.metadata.version('kmock')} differs from what tests/support/k8s.py's "
            f"_sees and FakeKubernetes._handle were written for (kmock 0.8): {'; '.join(problems)}"
        )


_check_kmock_views()


def _sees(view: _kmock_dsl.View, request: kmock.Request) -> bool:
    """``request in view`` (kmock: a scan of the view's whole history) from the request alone, where the
    view allows it; `request` is one its root has received (the one being served)."""
    kind = type(view)
    if kind is _kmock_dsl.Filter:
        return _sees(view._source, request) and bool(view.criteria(request))  # type: ignore[attr-defined]
    if kind is _kmock_dsl.Priority:
        return _sees(view._source, request)  # type: ignore[attr-defined]
    if isinstance(view, _kmock_dsl.Root) and type(view).__iter__ is _kmock_dsl.Root.__iter__:
        # By identity, as kmock does; newest first: the request being served is at or near the end.
        return any(seen is request for seen in reversed(view._requests))
    return request in view


# --------------------------------------------------------------------------------------------------------
# The emulator: kmock's KubernetesEmulator with the gaps closed.
# --------------------------------------------------------------------------------------------------------


@functools.cache
def _bundled_resources() -> str:
    """kmock's bundled discovery data for built-in resources (a K3s cluster's: Jobs, Pods, Events, ...)."""
    data = importlib.resources.files("kmock._internal").joinpath("resources.json.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")


# Server-managed metadata: never taken from a client's patch or replacement.
_SERVER_META: Final = (
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "name",
    "namespace",
)
_WATCH_EVENT_LOG_LIMIT: Final = 100_000


@attrs.define(kw_only=True)
class FakeKubernetes(kmock.KubernetesEmulator):
    """kmock's emulator, closer to a real API server. Every override closes a gap found in kmock 0.8.

    * Create answers 201 (kmock: 200, so ``CustomObjectsApi.create_*`` returned ``None``), sets ``uid``,
      ``resourceVersion``, ``creationTimestamp``, ``generation=1``, ``namespace`` (from the URL),
      ``apiVersion``/``kind``, supports ``generateName`` (kmock: ``name=None``, then 409 on the second),
      drops ``status`` when the status subresource exists, validates names and labels.
    * PATCH (merge, strategic treated as merge for built-ins, JSON-patch) and PUT (kmock: 404) honour the
      status subresource: ``/status`` changes only status, the main resource never changes status
      (kmock applied the whole body either way). Server-managed metadata is kept, ``resourceVersion``
      preconditions give 409, failed JSON-patch ``test`` ops give 422 (kmock: 500; kopf needs 422).
      ``generation`` bumps only when something outside metadata/status changes; a no-op write changes
      nothing (no new resourceVersion, no watch event), as in Kubernetes.
    * Every write gets a new, increasing ``resourceVersion``; lists carry ``kind: <Kind>List``,
      ``apiVersion`` and the current ``resourceVersion`` (kmock: none, ``'...'``).
    * Watches resume from ``?resourceVersion=`` by replaying logged events (kmock replayed every object
      as ADDED and could lose events between its snapshot and subscribing); ``timeoutSeconds``,
      ``labelSelector``/``fieldSelector`` (also on lists) and ``sendInitialEvents`` work.
    * DELETE honours finalizers (as kmock did) and then garbage-collects dependents by
      ``ownerReferences`` (Background/Foreground; Orphan strips the references).
    * Custom resources are pruned, defaulted and validated (OpenAPI schema and CEL rules, 422) by the
      CRD's schema, as the API server does; status writes are validated too. CEL verdicts are memoised
      per top-level field (``_CelMemo``): celpy is slow, and most writes leave the spec unchanged.
    * A request costs the same however many came before it: kmock matched it against its whole request
      history once per reaction tried (``_sees``); LIST compares plurals before kmock's resources.
    * Errors are real ``Status`` objects with the usual ``reason``/``code``.
    """

    crds: Sequence[CrdInfo] = ()
    garbage_collection: bool = True
    # OpenAPI + CEL validation of custom resources (422 on violations), like the API server.
    validation: bool = True
    _rv: int = attrs.field(default=1000, init=False)
    _event_log: dict[kmock.resource, collections.deque[tuple[int, Body]]] = attrs.field(
        factory=lambda: collections.defaultdict(lambda: collections.deque(maxlen=_WATCH_EVENT_LOG_LIMIT)),
        init=False,
    )
    _schemas: dict[kmock.resource, Json] = attrs.field(factory=dict, init=False)
    # What `GET pods/NAME/log` returns, by (namespace, pod, container): the kubelet's side of logs.
    pod_logs: dict[tuple[str, str, str], str] = attrs.field(factory=dict, init=False)
    _validators: dict[kmock.resource, jsonschema.Draft4Validator] = attrs.field(factory=dict, init=False)
    _cel: dict[kmock.resource, _CelMemo] = attrs.field(factory=dict, init=False)
    # The JobSet controller (`_sync_jobsets`): runs after writes to JobSets and Jobs, never re-entered.
    _jobset_busy: bool = attrs.field(default=False, init=False)
    _jobset_again: set[str] = attrs.field(factory=set, init=False)
    # Fields of spec.failurePolicy.rules[] the installed JobSet's CRD does not know: its structural schema
    # prunes them on writes, as an older release does (`KubeCluster.install_jobset(version=...)`).
    jobset_unknown_rule_fields: tuple[str, ...] = attrs.field(default=(), init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # kmock gap: PUT (replace) has no action and fell through to "404 endpoint not found".
        self.fallback[kmock.method.PUT] << self._serve_replace
        self.fallback["get /openapi/v3"] << self._serve_openapi_index
        self.fallback["get", re.compile(r"/openapi/v3/.+")] << self._serve_openapi_group_version
        # = self.resources.load_bundled(), minus its DeprecationWarning and the re-reading.
        self.resources.load_data(_bundled_resources())
        for crd in self.crds:
            self.serve(crd)

    def serve(self, crd: CrdInfo) -> None:
        """Serve a custom resource from now on (its CRD object is the caller's business)."""
        self.resources[crd.resource] = kmock.ResourceInfo(
            kind=crd.kind,
            singular=crd.singular,
            namespaced=crd.namespaced,
            shortnames=set(crd.short_names),
            categories=set(crd.categories),
            subresources={"status"} if crd.status_subresource else set(),
            verbs={"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"},
        )
        if crd.schema:
            self._schemas[kmock.resource(crd.resource)] = crd.schema
            self._validators[kmock.resource(crd.resource)] = jsonschema.Draft4Validator(crd.schema)
            self._cel[kmock.resource(crd.resource)] = _CelMemo(crd.schema)

    # ---- what helm asks beyond kmock: the server version, discovery, OpenAPI v3, protobuf Secrets ----

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock reads every body as JSON text; helm's release record (a Secret) comes as protobuf. Decode it
        # into the JSON the API server would have made of it before kmock parses the request.
        if raw_request.content_type == PROTOBUF:
            try:
                decoded = secret_from_protobuf(await raw_request.read())
            except ApiError as exc:
                return await self._render_error(exc)
            raw_request._read_bytes = json.dumps(decoded).encode()  # aiohttp's cached body, read by kmock
        return await super().__call__(raw_request)

    async def _serve_server_version(self, request: kmock.Request) -> kmock.Payload:
        # kmock says v1.26 (k3s); helm checks charts' kubeVersion (ours: >=1.29) against this.
        return {"major": "1", "minor": "31", "gitVersion": "v1.31.0", "platform": "linux/amd64"}

    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        # kmock names the core group-version `/v1`; client-go (helm, kubectl) needs `v1` to find core kinds.
        served = await super()._serve_version(request)
        if isinstance(served, dict) and served.get("groupVersion") == "/v1":
            served["groupVersion"] = "v1"
        return served

    def _group_versions(self) -> dict[str, builtins.list[tuple[kmock.resource, kmock.ResourceInfo]]]:
        """The served resources by their OpenAPI v3 group-version path (``api/v1``, ``apis/apps/v1``)."""
        groups: dict[str, builtins.list[tuple[kmock.resource, kmock.ResourceInfo]]] = {}
        for resource in builtins.list(self.resources):
            if resource.group is None or not isinstance(resource.version, str) or not resource.plural:
                continue
            path = (
                f"apis/{resource.group}/{resource.version}" if resource.group else f"api/{resource.version}"
            )
            groups.setdefault(path, []).append((resource, self.resources[resource]))
        return groups

    async def _serve_openapi_index(self, request: kmock.Request) -> kmock.Payload:
        paths = self._group_versions()
        return {"paths": {path: {"serverRelativeURL": f"/openapi/v3/{path}?hash=emulator"} for path in paths}}

    async def _serve_openapi_group_version(self, request: kmock.Request) -> kmock.Payload:
        """Each resource's PATCH operation with its GVK and the ``fieldValidation`` parameter, no schemas.

        That is what kubectl's validation (used by helm) asks first: does the server validate fields itself
        (every API server since 1.27 does)? Then it sends objects as they are and leaves validation to the
        server. The emulator validates custom resources (schema, CEL) but not built-in ones' fields.
        """
        path = request.url.path.removeprefix("/openapi/v3/")
        if (resources := self._group_versions().get(path)) is None:
            raise ApiError(404, f"no OpenAPI v3 document for {path}")
        operations: Body = {}
        for resource, info in resources:
            scope = "/namespaces/{namespace}" if info.namespaced else ""
            gvk = {"group": resource.group, "version": resource.version, "kind": self._kind(resource)}
            parameter = {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
            patch = {"x-kubernetes-group-version-kind": gvk, "parameters": [parameter], "responses": {}}
            operations[f"/{path}{scope}/{resource.plural}/{{name}}"] = {"patch": patch}
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "v1.31.0"},
            "paths": operations,
        }

    # ---- bookkeeping ----

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo:
        # NB: `self.resources[x]` auto-creates entries (defaultdict-like), so check membership first.
        if resource.plural is None or resource not in self.resources:
            raise ApiError(404, "the server could not find the requested resource")
        return self.resources[resource]

    @staticmethod
    def _api_version(resource: kmock.resource) -> str:
        return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)

    def _kind(self, resource: kmock.resource) -> str:
        info = self._info(resource)
        return info.kind or (resource.plural or "").capitalize()

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    @property
    def resource_version(self) -> int:
        """The latest resourceVersion handed out (a single counter, like etcd's revision)."""
        return self._rv

    def _live(self, resource: kmock.resource, namespace: str | None, name: str) -> kmock.Object | None:
        key = (resource, namespace, name)
        if key not in self.objects:
            return None
        obj = self.objects[key]
        return None if obj.deleted else obj

    def _require(self, resource: kmock.resource, namespace: str | None, name: str) -> kmock.Object:
        obj = self._live(resource, namespace, name)
        if obj is None:
            what = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
            raise ApiError(
                404,
                f'{what} "{name}" not found',
                details={"name": name, "group": resource.group, "kind": resource.plural},
            )
        return obj

    def _namespace_of(self, resource: kmock.resource, namespace: str | None) -> str | None:
        return namespace if self._info(resource).namespaced else None

    async def _emit(self, resource: kmock.resource, event_type: str, body: Body) -> None:
        event = {"type": event_type, "object": copy.deepcopy(body)}
        self._event_log[resource].append((int(body["metadata"]["resourceVersion"]), event))
        await self._buses[resource].put(event)

    def _normalise(self, resource: kmock.resource, body: Body) -> Body:
        """Prune, default and validate custom resources by their schema, as the API server does on writes."""
        schema = self._schemas.get(resource)
        if schema:
            body = _apply_defaults(schema, _prune(schema, body, root=True))
            problems = (
                _schema_violations(self._validators[resource], body, self._cel[resource])
                if self.validation
                else []
            )
            if problems:
                name = body.get("metadata", {}).get("name")
                raise ApiError(
                    422,
                    f'{body.get("kind")}.{resource.group} "{name}" is invalid: {"; ".join(problems)}',
                    details={"name": name, "group": resource.group, "kind": body.get("kind")},
                )
        if resource.group == JOBSET.group and self.jobset_unknown_rule_fields:
            for rule in ((body.get("spec") or {}).get("failurePolicy") or {}).get("rules") or []:
                for field in self.jobset_unknown_rule_fields:
                    rule.pop(field, None)
        max_length = 63 if resource.plural in ("jobs", "namespaces", "services") else 253
        _validate_metadata(body, max_name_length=max_length)
        return body

    # ---- writes (always under self._lock) ----

    async def create_object(self, resource: kmock.resource, namespace: str | None, data: Json) -> Body:
        """POST semantics: validate, fill server-side metadata, store, emit ADDED."""
        info = self._info(resource)
        if not isinstance(data, dict):
            raise ApiError(400, "the body of the request was in an unknown format")
        body: Body = copy.deepcopy(data)
        meta = body.setdefault("metadata", {})
        if info.namespaced:
            if namespace and meta.get("namespace") and meta["namespace"] != namespace:
                raise ApiError(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            namespace = namespace or meta.get("namespace")
            if not namespace:
                raise ApiError(404, "the server could not find the requested resource (namespace missing)")
            meta["namespace"] = namespace
        else:
            namespace = None
            meta.pop("namespace", None)
        if meta.get("resourceVersion"):
            raise ApiError(422, "metadata.resourceVersion: Invalid value: must be empty on create")
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise ApiError(422, "metadata.name: Required value: name or generateName is required")
            for _ in range(100):
                candidate = prefix + "".join(random.choices(_GENERATE_ALPHABET, k=5))
                if self._live(resource, namespace, candidate) is None:
                    break
            meta["name"] = candidate
        name = meta["name"]
        if self._live(resource, namespace, name) is not None:
            raise ApiError(
                409,
                f'{resource.plural} "{name}" already exists',
                reason="AlreadyExists",
                details={"name": name, "group": resource.group, "kind": resource.plural},
            )
        body["apiVersion"] = self._api_version(resource)
        body["kind"] = self._kind(resource)
        for field_name in (
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "uid",
            "generation",
            "selfLink",
        ):
            meta.pop(field_name, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        if "status" in info.subresources:
            body.pop("status", None)
        if resource == "v1/namespaces":
            body["status"] = {"phase": "Active"}
        body = self._normalise(resource, body)
        body["metadata"]["resourceVersion"] = self._next_rv()
        key = (resource, namespace, name)
        if key in self.objects:
            self.objects[key].create(body)  # re-creation after deletion keeps kmock's history
        else:
            self.objects[key] = body
        await self._emit(resource, "ADDED", body)
        created = copy.deepcopy(body)
        owners = body["metadata"].get("ownerReferences") or []
        if self.garbage_collection and owners and not self._any_owner_live(namespace, owners):
            # Kubernetes' garbage collector deletes a dependent whose owners are all gone (e.g. a Job
            # created by an operator that had not yet seen its recipe's deletion).
            await self.delete_object(resource, namespace, name)
        await self._after_write(resource, namespace)
        return created

    def _any_owner_live(self, namespace: str | None, refs: Sequence[Body]) -> bool:
        """Whether a stored object has the uid of one of `refs`. Looked up by each reference first, as
        Kubernetes' garbage collector does; every stored object is scanned only when that finds none
        (a scan per created Job made creating them quadratic in the number of objects)."""
        uids = {ref.get("uid") for ref in refs} - {None}
        for ref in refs:
            for resource in self.resources:
                if resource.plural is None or self._api_version(resource) != ref.get("apiVersion"):
                    continue
                if self.resources[resource].kind == ref.get("kind") and isinstance(ref.get("name"), str):
                    owner = self._live(resource, self._namespace_of(resource, namespace), ref["name"])
                    if owner is not None and owner.raw["metadata"].get("uid") in uids:
                        return True
        return any(obj.raw["metadata"].get("uid") in uids for obj in self.objects.values() if not obj.deleted)

    async def update_object(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        change: Callable[[Body], Body],
        *,
        subresource: str | None = None,
        require_rv: bool = False,
    ) -> Body:
        """PATCH/PUT semantics; `change` maps the current body to the requested one."""
        info = self._info(resource)
        namespace = self._namespace_of(resource, namespace)
        if subresource is not None and subresource not in info.subresources:
            raise ApiError(404, f"the server could not find the requested resource ({subresource})")
        if subresource not in (None, "status"):
            raise ApiError(405, f"the emulator does not implement writes to /{subresource}")
        obj = self._require(resource, namespace, name)
        old: Body = copy.deepcopy(obj.raw)
        wanted = change(copy.deepcopy(old))
        if not isinstance(wanted, dict):
            raise ApiError(422, "the patched object is not a JSON object")
        wanted_rv = (wanted.get("metadata") or {}).get("resourceVersion")
        if require_rv and not wanted_rv:
            raise ApiError(422, "metadata.resourceVersion: Invalid value: 0: must be specified for an update")
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                details={"name": name, "group": resource.group, "kind": resource.plural},
            )
        has_status = "status" in info.subresources
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in wanted:
                new["status"] = wanted["status"]
            else:
                new.pop("status", None)
        else:
            new = wanted
            new["metadata"] = wanted.get("metadata") or {}
            if has_status:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
        for key in _SERVER_META:
            if key in old["metadata"]:
                new["metadata"][key] = old["metadata"][key]
            else:
                new["metadata"].pop(key, None)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        new = self._normalise(resource, new)
        if new == old:
            return old  # a no-op write: no new resourceVersion, no event (as in Kubernetes)
        if _without(new, "metadata", "status") != _without(old, "metadata", "status"):
            new["metadata"]["generation"] = old["metadata"].get("generation", 0) + 1
        new["metadata"]["resourceVersion"] = self._next_rv()
        obj.history.append(new)
        await self._emit(resource, "MODIFIED", new)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            await self._finalise(resource, namespace, name)
        await self._after_write(resource, namespace)
        return copy.deepcopy(new)

    async def delete_object(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        options: Mapping[str, Any] | None = None,
    ) -> Body:
        """DELETE semantics: finalizers defer the removal; dependents are garbage-collected after it."""
        namespace = self._namespace_of(resource, namespace)
        obj = self._require(resource, namespace, name)
        options = options or {}
        preconditions = options.get("preconditions") or {}
        meta = obj.raw["metadata"]
        for key in ("uid", "resourceVersion"):
            if preconditions.get(key) and preconditions[key] != meta.get(key):
                raise ApiError(409, f"Precondition failed: {key} in precondition: {preconditions[key]}")
        if meta.get("deletionTimestamp"):
            return copy.deepcopy(obj.raw)
        if resource == "v1/namespaces":
            return await self._delete_namespace(name)
        if meta.get("finalizers"):
            new = copy.deepcopy(obj.raw)
            new["metadata"]["deletionTimestamp"] = _now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["generation"] = new["metadata"].get("generation", 0) + 1
            new["metadata"]["resourceVersion"] = self._next_rv()
            obj.history.append(new)
            await self._emit(resource, "MODIFIED", new)
            return copy.deepcopy(new)
        return await self._finalise(resource, namespace, name, options.get("propagationPolicy"))

    async def _finalise(
        self, resource: kmock.resource, namespace: str | None, name: str, propagation: str | None = None
    ) -> Body:
        obj = self._require(resource, namespace, name)
        last = copy.deepcopy(obj.raw)
        last["metadata"]["resourceVersion"] = self._next_rv()
        obj.history[-1] = last
        obj.delete()
        await self._emit(resource, "DELETED", last)
        if self.garbage_collection:
            await self._collect_dependents(last["metadata"]["uid"], propagation or "Background")
        await self._after_write(resource, namespace)
        if namespace is not None and resource != "v1/namespaces":
            await self._remove_namespace_when_empty(namespace)
        return last

    async def _delete_namespace(self, name: str) -> Body:
        """Kubernetes' namespace controller: the namespace turns Terminating, everything in it is deleted
        (each object honouring its finalizers), and the namespace goes once nothing is left in it. An
        object whose finalizer nobody removes keeps the namespace Terminating, as on a real cluster."""
        namespaces = kmock.resource("", "v1", "namespaces")
        obj = self._require(namespaces, None, name)
        new = copy.deepcopy(obj.raw)
        new["metadata"]["deletionTimestamp"] = _now()
        new.setdefault("status", {})["phase"] = "Terminating"
        new["metadata"]["resourceVersion"] = self._next_rv()
        obj.history.append(new)
        await self._emit(namespaces, "MODIFIED", new)
        for resource, namespace, object_name in self._objects_in(name):
            live = self._live(resource, namespace, object_name)
            if live is not None and not live.raw["metadata"].get("deletionTimestamp"):
                await self.delete_object(resource, namespace, object_name)
        return await self._remove_namespace_when_empty(name) or copy.deepcopy(new)

    def _objects_in(self, namespace: str) -> builtins.list[tuple[kmock.resource, str | None, str]]:
        return [key for key, obj in self.objects.items() if key[1] == namespace and not obj.deleted]

    async def _remove_namespace_when_empty(self, name: str) -> Body | None:
        namespaces = kmock.resource("", "v1", "namespaces")
        obj = self._live(namespaces, None, name)
        if obj is None or not obj.raw["metadata"].get("deletionTimestamp") or self._objects_in(name):
            return None
        return await self._finalise(namespaces, None, name)

    async def _collect_dependents(self, owner_uid: str, propagation: str) -> None:
        """Kubernetes' garbage collector, synchronously: delete what the owner owned, or orphan it.

        A dependent with another live owner only loses the reference, as in Kubernetes.
        """
        live_uids = {obj.raw["metadata"]["uid"] for obj in self.objects.values() if not obj.deleted}
        for (resource, namespace, name), obj in list(self.objects.items()):
            if obj.deleted:
                continue
            refs = obj.raw["metadata"].get("ownerReferences") or []
            if not any(ref.get("uid") == owner_uid for ref in refs):
                continue
            others = [ref for ref in refs if ref.get("uid") != owner_uid]
            if propagation == "Orphan" or any(ref.get("uid") in live_uids for ref in others):

                def drop_reference(body: Body, others: list[Body] = others) -> Body:
                    return _merge_patch(body, {"metadata": {"ownerReferences": others or None}})  # type: ignore[no-any-return]

                await self.update_object(resource, namespace, name, drop_reference)
            else:
                await self.delete_object(resource, namespace, name)

    # ---- the JobSet controller (kubernetes-sigs/jobset), played after writes to JobSets and Jobs ----

    async def _after_write(self, resource: kmock.resource, namespace: str | None) -> None:
        if namespace is None or resource.group not in ("batch", JOBSET.group):
            return
        if (
            resource.plural not in ("jobs", "jobsets")
            or kmock.resource(JOBSET.resource) not in self.resources
        ):
            return
        if self._jobset_busy:  # a write of the controller itself: one more pass once this one ends
            self._jobset_again.add(namespace)
            return
        self._jobset_busy = True
        try:
            pending = {namespace}
            for _ in range(20):  # each pass converges; a bound keeps a bug from hanging the emulator
                if not pending:
                    break
                for ns in sorted(pending):
                    await self._sync_jobsets(ns)
                pending, self._jobset_again = self._jobset_again, set()
        finally:
            self._jobset_busy = False
            self._jobset_again = set()

    def _stored(self, resource: kmock.resource, namespace: str) -> builtins.list[Body]:
        return [
            obj.raw
            for (res, ns, _), obj in self.objects.items()
            if res.plural == resource.plural and res == resource and ns == namespace and not obj.deleted
        ]

    async def _delete_child(self, namespace: str, name: str) -> None:
        with contextlib.suppress(ApiError):  # already gone
            await self.delete_object(
                kmock.resource("batch", "v1", "jobs"), namespace, name, {"propagationPolicy": "Background"}
            )

    async def _sync_jobsets(self, namespace: str) -> None:
        """One pass of the JobSet controller over the namespace's JobSets, as kubernetes-sigs/jobset
        behaves: child Jobs `<jobset>-<replicatedJob>-<index>` (labelled, owned, `subdomain` set for DNS
        hostnames) and a headless Service; suspend propagated; `Completed` once every child Job completed;
        a failed child Job restarts the group (child Jobs deleted, `status.restarts` + 1, recreated with the
        next `restart-attempt`) until `failurePolicy.maxRestarts` (counted in `restartsCountTowardsMax`),
        or fails it at once when a `FailJobSet` rule matches its failure reason and message; a
        `RestartJobSetAndIgnoreMaxRestarts` rule restarts it without counting; a finished JobSet's active
        child Jobs are deleted."""
        jobsets = kmock.resource(JOBSET.resource)
        jobs = kmock.resource("batch", "v1", "jobs")
        for jobset in [copy.deepcopy(b) for b in self._stored(jobsets, namespace)]:
            meta = jobset["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            name, uid = meta["name"], meta["uid"]
            spec = jobset.get("spec") or {}
            status = dict(jobset.get("status") or {})
            restarts = int(status.get("restarts") or 0)
            children = [
                job
                for job in self._stored(jobs, namespace)
                if any(ref.get("uid") == uid for ref in job["metadata"].get("ownerReferences") or [])
                and not job["metadata"].get("deletionTimestamp")
            ]
            attempt = {c["metadata"]["name"]: c for c in children if _jobset_attempt(c) == restarts}
            for child in children:
                if _jobset_attempt(child) != restarts:  # an earlier attempt's, left by a restart
                    await self._delete_child(namespace, child["metadata"]["name"])
            terminal = status.get("terminalState")
            if terminal:
                for child in attempt.values():  # a finished JobSet leaves no child Job running
                    if _job_condition(child, "Complete") is None and _job_condition(child, "Failed") is None:
                        await self._delete_child(namespace, child["metadata"]["name"])
                continue
            network = spec.get("network") or {}
            subdomain = (network.get("subdomain") or name) if network.get("enableDNSHostnames") else None
            if subdomain and self._live(kmock.resource("", "v1", "services"), namespace, subdomain) is None:
                service = {
                    "metadata": {"name": subdomain, "ownerReferences": [_owner(jobset)]},
                    "spec": {
                        "clusterIP": "None",
                        "selector": {JOBSET_NAME_LABEL: name},
                        "publishNotReadyAddresses": True,
                    },
                }
                await self.create_object(kmock.resource("", "v1", "services"), namespace, service)
            wanted = _jobset_children(jobset, restarts, subdomain)
            for child_name, child in wanted.items():
                if child_name not in attempt and self._live(jobs, namespace, child_name) is None:
                    attempt[child_name] = await self.create_object(jobs, namespace, child)
            suspend = bool(spec.get("suspend"))
            for child_name, child in list(attempt.items()):
                if bool((child.get("spec") or {}).get("suspend")) != suspend:
                    attempt[child_name] = await self.update_object(
                        jobs,
                        namespace,
                        child_name,
                        lambda old, suspend=suspend: _merge_patch(old, {"spec": {"suspend": suspend}}),
                    )
            new = _jobset_status(jobset, status, list(attempt.values()), len(wanted))
            if (
                new.get("restarts", 0) > restarts
            ):  # a restart: this attempt's child Jobs go, the next pass recreates them
                for child_name in attempt:
                    await self._delete_child(namespace, child_name)
            if new != jobset.get("status"):
                await self.update_object(
                    jobsets, namespace, name, lambda old, new=new: old | {"status": new}, subresource="status"
                )

    # ---- request dispatch ----

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Skip KubernetesEmulator._handle: it applies kmock's own (gap-ridden) writes before any reaction.
        # Here, writes happen in the fallback `_serve_*` methods, i.e. only when no test reaction answers:
        # a reaction that injects an error (`k8s.emulator[...] << 500`) means the write did not happen.
        # The rest is kmock's RawHandler._handle, with `_sees` for its `request in payload._source`.
        for payload in self._by_priority():
            if _sees(payload._source, request) and not payload._disabled.is_set():
                try:
                    return await payload(request)
                except ReactionMismatchError:  # either mismatch or depletion
                    payload._disabled.set()
                except NotImplementedError:  # matched, but nothing to respond with
                    pass
        raise NotImplementedError(
            "Undefined server behaviour: no reaction matching the request is defined. "
            "Consider adding a catch-all fallback reaction: `kmock.fallback << 404`."
        )

    def _by_priority(self) -> builtins.list[_kmock_dsl.Reaction]:
        """The reactions, highest priority first, in the order kmock's RawHandler._handle tries them."""
        # Priorities of mixed lengths are padded with zeroes, so that `fallback ** N` is a sub-priority.
        priorities = [payload.priorities for payload in self._payloads]
        width = max((len(priority) for priority in priorities), default=0)
        keys = [tuple(-p for p in priority) + (0,) * (width - len(priority)) for priority in priorities]
        return [self._payloads[index] for index in sorted(range(len(keys)), key=keys.__getitem__)]

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        resource = request.resource
        assert resource is not None
        if request.subresource:
            raise ApiError(405, f"the emulator does not implement POST to /{request.subresource}")
        async with self._lock:
            body = await self.create_object(resource, request.namespace, request.data)
        # NB: kmock keeps a Response's status on its reaction; all creates are 201, so that is safe.
        return kmock.Response(status=201, payload=body)  # type: ignore[attr-defined]

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        resource = request.resource
        assert resource is not None and request.name is not None
        options = dict(request.data) if isinstance(request.data, Mapping) else {}
        if "propagationPolicy" in request.params:
            options["propagationPolicy"] = request.params["propagationPolicy"]
        async with self._lock:
            return await self.delete_object(resource, request.namespace, request.name, options)

    def _is_custom(self, resource: kmock.resource) -> bool:
        return any(crd.resource == resource for crd in self.crds)

    async def _serve_replace(self, request: kmock.Request) -> kmock.Payload:
        resource = request.resource
        if resource is None or resource.plural is None or request.name is None:
            raise kmock.KubernetesEndpointNotFoundError()
        data = request.data
        if not isinstance(data, dict):
            raise ApiError(400, "the body of the request was in an unknown format")
        name_in_body = (data.get("metadata") or {}).get("name")
        if name_in_body and name_in_body != request.name:
            raise ApiError(400, "the name of the object does not match the name on the URL")
        async with self._lock:
            return await self.update_object(
                resource,
                request.namespace,
                request.name,
                lambda _old: copy.deepcopy(data),
                subresource=request.subresource,
                require_rv=self._is_custom(resource),  # custom resources refuse unconditional updates
            )

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        resource = request.resource
        assert resource is not None and request.name is not None
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        patch = request.data
        change: Callable[[Body], Body]
        if content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise ApiError(400, "a JSON patch must be a list of operations")

            def change(old: Body) -> Body:
                try:
                    return jsonpatch.apply_patch(old, patch)  # type: ignore[no-any-return]
                except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
                    raise ApiError(422, f"the server rejected our request due to an error: {e}") from e

        elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if content_type.startswith("application/strategic") and self._is_custom(resource):
                raise ApiError(415, "strategic merge patch is not supported for custom resources")
            if not isinstance(patch, dict):
                raise ApiError(400, "a merge patch must be a JSON object")

            # NB: strategic merge patches are applied as merge patches: lists are replaced, not merged by key.
            def change(old: Body) -> Body:
                return _merge_patch(old, patch)  # type: ignore[no-any-return]

        else:
            raise ApiError(415, f"the emulator does not support the patch type {content_type!r}")
        async with self._lock:
            return await self.update_object(
                resource, request.namespace, request.name, change, subresource=request.subresource
            )

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        resource = request.resource
        assert resource is not None and request.name is not None
        async with self._lock:
            obj = self._require(resource, self._namespace_of(resource, request.namespace), request.name)
            if request.subresource == "log" and resource.plural == "pods":
                return self._pod_log(obj.raw, request.params)
            return copy.deepcopy(obj.raw)

    def _pod_log(self, pod: Body, params: Mapping[str, str]) -> bytes:
        """``GET pods/NAME/log`` as the kubelet answers it: plain text, ``container`` and ``tailLines``."""
        containers = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
        container = params.get("container") or (containers[0] if len(containers) == 1 else None)
        if container is None:
            raise ApiError(400, "a container name must be specified for a pod with several containers")
        meta = pod["metadata"]
        text = self.pod_logs.get((meta.get("namespace") or "", meta["name"], container), "")
        lines = text.splitlines(keepends=True)
        if params.get("tailLines"):
            lines = lines[-int(params["tailLines"]) :] if int(params["tailLines"]) > 0 else []
        return "".join(lines).encode()

    def _matcher(self, request: kmock.Request) -> Predicate:
        resource = request.resource
        assert resource is not None
        namespaced = self._info(resource).namespaced
        namespace = request.namespace if namespaced else None
        name = request.name
        labels = (
            _label_selector(request.params["labelSelector"]) if request.params.get("labelSelector") else None
        )
        fields = (
            _field_selector(request.params["fieldSelector"]) if request.params.get("fieldSelector") else None
        )

        def matches(body: Body) -> bool:
            meta = body.get("metadata", {})
            return (
                (namespace is None or meta.get("namespace") == namespace)
                and (name is None or meta.get("name") == name)
                and (labels is None or labels(body))
                and (fields is None or fields(body))
            )

        return matches

    def _snapshot(self, resource: kmock.resource, matches: Predicate) -> list[Body]:
        plural = resource.plural
        bodies = [
            obj.raw
            for (res, _, _), obj in self.objects.items()
            # The plural first: kmock's resource equality costs a pattern match per stored object.
            if res.plural == plural and res == resource and not obj.deleted and matches(obj.raw)
        ]
        bodies.sort(key=lambda b: (b["metadata"].get("namespace") or "", b["metadata"]["name"]))
        return [copy.deepcopy(body) for body in bodies]

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        resource = request.resource
        assert resource is not None
        async with self._lock:
            matches = self._matcher(request)
            items = self._snapshot(resource, matches)
            return {
                "apiVersion": self._api_version(resource),
                "kind": f"{self._kind(resource)}List",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        resource = request.resource
        assert resource is not None
        params = request.params
        matches = self._matcher(request)  # raises 404/400 before the stream starts
        since = params.get("resourceVersion") or "0"
        initial = params.get("sendInitialEvents") == "true"
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        bus = self._buses[resource]
        async with self._lock:
            # Subscribing and snapshotting under the writers' lock: no event can fall in between.
            mark = await bus.mark()
            backlog: list[Body]
            if initial or since == "0":
                backlog = [{"type": "ADDED", "object": o} for o in self._snapshot(resource, matches)]
                if initial:
                    backlog.append(self._bookmark(resource, initial_end=True))
            elif not since.isdigit():
                backlog = [self._gone(f"invalid resourceVersion {since!r}")]
            else:
                log = self._event_log[resource]
                if log and len(log) == log.maxlen and log[0][0] > int(since):
                    backlog = [self._gone(f"too old resource version: {since} ({log[0][0]})")]
                else:
                    backlog = [ev for rv, ev in log if rv > int(since) and matches(ev["object"])]
        try:
            yield b""  # send the headers now: clients wait for them before reading the stream
            for event in backlog:
                yield event
            if backlog and backlog[-1]["type"] == "ERROR":
                return
            stream = cast(AsyncGenerator[Body, None], bus.stream(since=mark))
            try:
                while True:
                    remaining = None if deadline is None else deadline - loop.time()
                    if remaining is not None and remaining <= 0:
                        return
                    try:
                        async with asyncio.timeout(remaining):
                            event = await anext(stream)
                    except TimeoutError:
                        return
                    if matches(event["object"]):
                        yield event
            finally:
                await stream.aclose()
        finally:
            with contextlib.suppress(Exception):
                await bus.unmark(mark)

    def _bookmark(self, resource: kmock.resource, *, initial_end: bool = False) -> Body:
        meta: Body = {"resourceVersion": str(self._rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {
            "type": "BOOKMARK",
            "object": {
                "apiVersion": self._api_version(resource),
                "kind": self._kind(resource),
                "metadata": meta,
            },
        }

    @staticmethod
    def _gone(message: str) -> Body:
        return {"type": "ERROR", "object": ApiError(410, message, reason="Expired").status()}

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, ApiError):
            return aiohttp.web.json_response(exc.status(), status=exc.code)
        if not isinstance(exc, kmock.KubernetesError):  # kmock's own 404s for unknown URLs are expected
            _LOG.warning("k8s emulator failed on a request: %r", exc, exc_info=exc)
        return await super()._render_error(exc)


# --------------------------------------------------------------------------------------------------------
# The server thread and the test-facing handle.
# --------------------------------------------------------------------------------------------------------


def _resource(spec: ResourceSpec) -> kmock.resource:
    res = spec if isinstance(spec, kmock.resource) else kmock.resource(spec)
    if res.group is None or res.version is None or res.plural is None:
        raise ValueError(f"need group/version/plural, e.g. 'batch/v1/jobs' or 'v1/pods'; got {spec!r}")
    return res


class KubeCluster:
    """A running ``FakeKubernetes`` on 127.0.0.1 in a background thread, with sync helpers for tests.

    Helpers run on the emulator's loop (thread-safe) and skip HTTP; use ``api_client()`` to go through
    the wire like the operator does. ``emulator`` is the kmock object for kmock's own DSL (reactions,
    request history); mutate it only via these helpers while the server runs.
    """

    def __init__(
        self,
        *,
        crds: Sequence[CrdInfo] = (CRD, *KOPF_PEERINGS, KUEUE_WORKLOAD),
        namespaces: Sequence[str] = ("default",),
        validation: bool = True,
    ) -> None:
        self.crds = tuple(crds)
        self.initial_namespaces = tuple(namespaces)
        self.validation = validation  # FakeKubernetes.validation: OpenAPI and CEL checks of custom resources
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._emulator: FakeKubernetes | None = None
        self._port: int | None = None
        self._clients: list[kubernetes.client.ApiClient] = []
        self._api: kubernetes.client.ApiClient | None = None
        # Operators started by `run_operator`: `wait_for` fails fast when one dies, and shows their errors.
        self.operators: builtins.list[OperatorRun] = []

    # ---- lifecycle ----

    def start(self, timeout: float = _CALL_TIMEOUT) -> KubeCluster:
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._failure is not None:
            self.stop()
            raise RuntimeError("the Kubernetes emulator did not start") from self._failure
        return self

    def stop(self, timeout: float = _CALL_TIMEOUT) -> None:
        for client in self._clients:
            client.close()  # type: ignore[no-untyped-call]
        self._clients.clear()
        self._api = None
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("the Kubernetes emulator thread did not stop")

    def __enter__(self) -> KubeCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # reported by start()
            self._failure = e
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        emulator = FakeKubernetes(crds=self.crds, validation=self.validation)
        async with emulator:
            for namespace in self.initial_namespaces:
                await self._create_async(emulator, "v1/namespaces", {"metadata": {"name": namespace}})
            for crd in self.crds:
                manifest = copy.deepcopy(crd.manifest or crd.synthetic_manifest())
                manifest.pop("status", None)
                resource = "apiextensions.k8s.io/v1/customresourcedefinitions"
                await self._create_async(emulator, resource, manifest)
            # handler_cancellation: a client hanging up a watch cancels its handler (else it idles forever).
            runner = aiohttp.web.ServerRunner(
                aiohttp.web.Server(emulator, handler_cancellation=True), shutdown_timeout=_SHUTDOWN_TIMEOUT
            )
            await runner.setup()
            try:
                site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                self._port = runner.addresses[0][1]
                self._emulator = emulator
                self._ready.set()
                await self._stopping.wait()
            finally:
                await runner.cleanup()

    @staticmethod
    async def _create_async(emulator: FakeKubernetes, spec: ResourceSpec, body: Body) -> Body:
        async with emulator._lock:
            return await emulator.create_object(_resource(spec), None, body)

    # ---- plumbing ----

    @property
    def emulator(self) -> FakeKubernetes:
        if self._emulator is None:
            raise RuntimeError("the Kubernetes emulator is not running")
        return self._emulator

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the Kubernetes emulator is not running")
        return f"http://127.0.0.1:{self._port}"

    def call(self, coro_fn: Callable[[], Coroutine[Any, Any, T]], timeout: float = _CALL_TIMEOUT) -> T:
        """Run ``coro_fn()`` on the emulator's loop and return its result (thread-safe access)."""
        if self._loop is None:
            raise RuntimeError("the Kubernetes emulator is not running")
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout)

    def _locked(self, fn: Callable[[FakeKubernetes], Coroutine[Any, Any, T]]) -> T:
        emulator = self.emulator

        async def run() -> T:
            async with emulator._lock:
                return await fn(emulator)

        return self.call(run)

    # ---- clients and credentials ----

    def configuration(self) -> kubernetes.client.Configuration:
        """A ``kubernetes`` client configuration for the emulator (plain HTTP, no auth)."""
        config = kubernetes.client.Configuration(host=self.url)
        config.verify_ssl = False
        return config

    def api_client(self) -> kubernetes.client.ApiClient:
        """A new ``kubernetes.client.ApiClient`` for the emulator; closed when the cluster stops."""
        client = kubernetes.client.ApiClient(self.configuration())
        self._clients.append(client)
        return client

    @property
    def api(self) -> kubernetes.client.ApiClient:
        """A shared ``kubernetes`` ApiClient for the emulator (the fixture installs it as the default)."""
        if self._api is None:
            self._api = self.api_client()
        return self._api

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api)

    @property
    def batch(self) -> kubernetes.client.BatchV1Api:
        return kubernetes.client.BatchV1Api(self.api)

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.api)

    def run_operator(
        self, handlers: HandlerSource = None, **kwargs: Any
    ) -> contextlib.AbstractContextManager[OperatorRun]:
        """``run_operator(self, handlers, **kwargs)``: see the module-level function."""
        return run_operator(self, handlers, **kwargs)

    def connection_info(self, namespace: str = "default") -> kopf.ConnectionInfo:
        """kopf credentials for the emulator (what a ``@kopf.on.login`` handler would return)."""
        return kopf.ConnectionInfo(server=self.url, insecure=True, default_namespace=namespace)

    def install_login(self, registry: kopf.OperatorRegistry) -> None:
        """Add a ``@kopf.on.login`` handler for the emulator to `registry` (``run_operator`` needs none)."""
        info = self.connection_info()

        @kopf.on.login(registry=registry, id="k8s-emulator")
        def _login(**_: Any) -> kopf.ConnectionInfo:
            return info

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """Write a kubeconfig for the emulator (for ``kubernetes.config.load_kube_config``, kubectl, helm)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "k8s-emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "k8s-emulator", "user": {"token": "emulator"}}],
            "contexts": [
                {
                    "name": "k8s-emulator",
                    "context": {"cluster": "k8s-emulator", "user": "k8s-emulator", "namespace": namespace},
                }
            ],
            "current-context": "k8s-emulator",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # ---- object helpers (no HTTP; the same write semantics and watch events) ----

    def create(self, resource: ResourceSpec, body: Body, namespace: str | None = None) -> Body:
        res = _resource(resource)
        return self._locked(lambda e: e.create_object(res, namespace, body))

    def get(self, resource: ResourceSpec, name: str, namespace: str | None = None) -> Body | None:
        """The object as stored now, or ``None`` if absent."""
        res = _resource(resource)

        async def read(e: FakeKubernetes) -> Body | None:
            obj = e._live(res, e._namespace_of(res, namespace), name)
            return None if obj is None else copy.deepcopy(obj.raw)

        return self._locked(read)

    def history(
        self, resource: ResourceSpec, name: str, namespace: str | None = None
    ) -> builtins.list[Body | None]:
        """Every stored version of the object, oldest first (``None`` marks a deletion), from kmock.

        E.g. the phases an operator went through: ``[v["status"].get("phase") for v in history if v]``.
        """
        res = _resource(resource)

        async def read(e: FakeKubernetes) -> builtins.list[Body | None]:
            key = (res, e._namespace_of(res, namespace), name)
            if key not in e.objects:
                return []
            return [None if v is None else copy.deepcopy(v.raw) for v in e.objects[key].history]

        return self._locked(read)

    def list(
        self, resource: ResourceSpec, namespace: str | None = None, *, label_selector: str | None = None
    ) -> builtins.list[Body]:
        res = _resource(resource)
        labels = _label_selector(label_selector) if label_selector else None

        async def read(e: FakeKubernetes) -> builtins.list[Body]:
            ns = e._namespace_of(res, namespace)
            return e._snapshot(
                res,
                lambda b: (
                    (ns is None or b["metadata"].get("namespace") == ns) and (labels is None or labels(b))
                ),
            )

        return self._locked(read)

    def patch(
        self,
        resource: ResourceSpec,
        name: str,
        patch: Body,
        namespace: str | None = None,
        *,
        subresource: str | None = None,
    ) -> Body:
        """Merge-patch an object, e.g. ``k8s.patch('batch/v1/jobs', 'j', {'status': {...}}, 'ns', subresource='status')``."""
        res = _resource(resource)
        return self._locked(
            lambda e: e.update_object(
                res, namespace, name, lambda old: _merge_patch(old, patch), subresource=subresource
            )
        )

    def delete(self, resource: ResourceSpec, name: str, namespace: str | None = None) -> Body:
        res = _resource(resource)
        return self._locked(lambda e: e.delete_object(res, namespace, name))

    def set_job_status(
        self,
        name: str,
        namespace: str,
        state: str,
        *,
        message: str = "",
        reason: str = "BackoffLimitExceeded",
    ) -> Body:
        """Play the Job controller (the emulator runs none): ``state`` is running, succeeded, failed (with
        `reason`: BackoffLimitExceeded, PodFailurePolicy, DeadlineExceeded) or suspended (a Job created
        with ``spec.suspend``, e.g. waiting for Kueue).

        Writes ``status`` as Kubernetes 1.31+ does, incl. the terminal conditions operators look for.
        """
        now = _now()
        status: Body = {"startTime": now, "active": 1 if state == "running" else 0, "ready": 0}
        if state == "suspended":
            status = {"conditions": [_condition("Suspended", "JobSuspended", "Job suspended", now)]}
        elif state == "succeeded":
            status |= {
                "succeeded": 1,
                "completionTime": now,
                "conditions": [
                    _condition("SuccessCriteriaMet", "CompletionsReached", message, now),
                    _condition("Complete", "CompletionsReached", message, now),
                ],
            }
        elif state == "failed":
            status |= {
                "failed": 1,
                "conditions": [
                    _condition("FailureTarget", reason, message, now),
                    _condition("Failed", reason, message, now),
                ],
            }
        elif state != "running":
            raise ValueError(f"state must be running, succeeded, failed or suspended; got {state!r}")
        return self.patch("batch/v1/jobs", name, {"status": status}, namespace, subresource="status")

    def job_pod_metadata(self, job_name: str, namespace: str, suffix: str | None = None) -> Body:
        """The labels and owner a Job's pod gets from the Job controller (Kubernetes 1.27+): the pod
        template's labels (and annotations), the Job's name and uid (``batch.kubernetes.io/controller-uid``,
        the Job's own selector), and an ownerReference to the Job (so its pods go when it goes). A pod of an
        Indexed Job also gets its completion index (label and annotation), read from the pod name's
        `suffix` ``<index>-<random>`` as the Job controller names them (index 0 otherwise)."""
        job = self.get("batch/v1/jobs", job_name, namespace) or {}
        template = ((job.get("spec") or {}).get("template") or {}).get("metadata") or {}
        labels = dict(template.get("labels") or {})
        labels |= {"batch.kubernetes.io/job-name": job_name, "job-name": job_name}
        metadata: Body = {"labels": labels}
        if template.get("annotations"):
            metadata["annotations"] = dict(template["annotations"])
        index = _completion_index(job, suffix)
        if index is not None:
            labels[COMPLETION_INDEX_LABEL] = str(index)
            metadata.setdefault("annotations", {})[COMPLETION_INDEX_LABEL] = str(index)
        uid = (job.get("metadata") or {}).get("uid")
        if uid:
            labels |= {"batch.kubernetes.io/controller-uid": uid, "controller-uid": uid}
            metadata["ownerReferences"] = [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": job_name,
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
        return metadata

    def set_job_pod(
        self,
        job_name: str,
        namespace: str,
        phase: str,
        *,
        container: str,
        message: str = "",
        exit_code: int | None = None,
        reason: str | None = None,
        log: str | None = None,
        suffix: str = "a1b2c",
    ) -> Body:
        """Play the Job controller and the kubelet for one pod of Job `job_name`: create it (labelled like
        Kubernetes 1.27+ does) or update its status. ``phase`` Running, Succeeded or Failed; a finished
        container gets ``message`` as its termination message; ``log`` becomes its log text."""
        name = f"{job_name}-{suffix}"
        now = _now()
        if phase == "Running":
            state: Body = {"running": {"startedAt": now}}
        elif phase in ("Succeeded", "Failed"):
            code = exit_code if exit_code is not None else (0 if phase == "Succeeded" else 1)
            terminated = {
                "exitCode": code,
                "reason": reason or ("Completed" if code == 0 else "Error"),
                "startedAt": now,
                "finishedAt": now,
            }
            if message:
                terminated["message"] = message
            state = {"terminated": terminated}
        else:
            raise ValueError(f"phase must be Running, Succeeded or Failed; got {phase!r}")
        ready = "True" if phase == "Running" else "False"
        status = {
            "phase": phase,
            # As the kubelet writes them: scheduled and initialised; ready while it runs.
            "conditions": [
                {"type": kind, "status": value, "lastProbeTime": None, "lastTransitionTime": now}
                | ({} if value == "True" else {"reason": "PodCompleted"})
                for kind, value in (
                    ("PodReadyToStartContainers", ready),
                    ("Initialized", "True"),
                    ("Ready", ready),
                    ("ContainersReady", ready),
                    ("PodScheduled", "True"),
                )
            ],
            "containerStatuses": [
                {
                    "name": container,
                    "ready": phase == "Running",
                    "restartCount": 0,
                    "image": "x",
                    "imageID": "",
                    "state": state,
                }
            ],
        }
        if self.get("v1/pods", name, namespace) is None:
            job = self.get("batch/v1/jobs", job_name, namespace) or {}
            self.create(
                "v1/pods",
                {
                    "metadata": {"name": name, **self.job_pod_metadata(job_name, namespace, suffix)},
                    "spec": {"restartPolicy": "Never", "containers": [{"name": container, "image": "x"}]}
                    | _indexed_pod_spec(job, suffix),
                },
                namespace,
            )
        if log is not None:

            async def store(e: FakeKubernetes) -> None:
                e.pod_logs[(namespace, name, container)] = log

            self._locked(store)
        return self.patch("v1/pods", name, {"status": status}, namespace, subresource="status")

    # ---- pods that cannot start, and evictions: what a real cluster writes into pod status ----

    def _job_pod(
        self, job_name: str, namespace: str, suffix: str, containers: Sequence[tuple[str, str]]
    ) -> str:
        """Create pod ``<job>-<suffix>`` of Job `job_name` unless it exists (labelled as Kubernetes 1.27+
        labels a Job's pods); `containers` are (name, image), an ``init:`` prefix marks init containers."""
        name = f"{job_name}-{suffix}"
        if self.get("v1/pods", name, namespace) is None:
            spec: Body = {"restartPolicy": "Never", "containers": []}
            for container, image in containers:
                if container.startswith("init:"):
                    spec.setdefault("initContainers", []).append({"name": container[5:], "image": image})
                else:
                    spec["containers"].append({"name": container, "image": image})
            spec |= _indexed_pod_spec(self.get("batch/v1/jobs", job_name, namespace) or {}, suffix)
            metadata = {"name": name, **self.job_pod_metadata(job_name, namespace, suffix)}
            self.create("v1/pods", {"metadata": metadata, "spec": spec}, namespace)
        return name

    def set_pod_unschedulable(
        self,
        job_name: str,
        namespace: str,
        message: str,
        *,
        container: str,
        since: str | None = None,
        suffix: str = "a1b2c",
    ) -> Body:
        """Play the scheduler failing to place the Job's pod: Pending, condition PodScheduled False with
        reason Unschedulable and the scheduler's `message` (e.g. ``0/3 nodes are available: 3 Insufficient
        nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming
        pod.``), since `since` (default now). No node, no container statuses: the kubelet never saw it."""
        name = self._job_pod(job_name, namespace, suffix, [(container, "x")])
        scheduled = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastProbeTime": None,
            "lastTransitionTime": since or _now(),
        }
        status = {"phase": "Pending", "conditions": [scheduled], "qosClass": "Burstable"}
        return self.patch("v1/pods", name, {"status": status}, namespace, subresource="status")

    def set_pod_waiting(
        self,
        job_name: str,
        namespace: str,
        *,
        container: str,
        reason: str,
        message: str | None,
        image: str = "x",
        init_container: str | None = None,
        scheduled_at: str | None = None,
        suffix: str = "a1b2c",
    ) -> Body:
        """Play the kubelet failing to start a scheduled pod: a container waiting with `reason` and the
        kubelet's `message` (ErrImagePull / ImagePullBackOff with the runtime's words,
        CreateContainerConfigError with ``secret "x" not found``). With `init_container`, that one waits
        and the main container waits with PodInitializing, as the kubelet shows it. `scheduled_at`: when
        the scheduler bound it (default now); the kubelet's waiting states carry no time of their own."""
        containers = [(container, image)]
        if init_container is not None:
            containers.insert(0, (f"init:{init_container}", image))
        name = self._job_pod(job_name, namespace, suffix, containers)
        now = _now()
        bound = scheduled_at or now
        stuck = init_container or container

        def waiting(who: str, why: str, words: str | None) -> Body:
            state: Body = {"reason": why}
            if words is not None:
                state["message"] = words
            return {
                "name": who,
                "image": image,
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "started": False,
                "state": {"waiting": state},
            }

        def unready(kind: str, what: str) -> Body:
            return {
                "type": kind,
                "status": "False",
                "reason": "ContainersNotReady" if kind != "Initialized" else "ContainersNotInitialized",
                "message": f"containers with {what} status: [{stuck if kind == 'Initialized' else container}]",
                "lastProbeTime": None,
                "lastTransitionTime": bound,
            }

        # Volumes are mounted before the sandbox exists: a pod still mounting has no sandbox yet.
        sandbox = "False" if reason in ("ContainerCreating", "PodInitializing") else "True"
        conditions: list[Body] = [
            {
                "type": "PodReadyToStartContainers",
                "status": sandbox,
                "lastProbeTime": None,
                "lastTransitionTime": bound,
            },
            unready("Initialized", "incomplete")
            if init_container is not None
            else {
                "type": "Initialized",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": bound,
            },
            unready("Ready", "unready"),
            unready("ContainersReady", "unready"),
            {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": bound},
        ]
        status: Body = {
            "phase": "Pending",
            "conditions": conditions,
            "hostIP": "10.0.0.7",
            "podIP": "10.42.0.17",
            "qosClass": "Burstable",
            "startTime": bound,
        }
        if init_container is not None:
            status["initContainerStatuses"] = [waiting(init_container, reason, message)]
            status["containerStatuses"] = [waiting(container, "PodInitializing", None)]
        else:
            status["containerStatuses"] = [waiting(container, reason, message)]
        self.patch(
            "v1/pods", name, {"spec": {"nodeName": "gpu-node-1"}}, namespace
        )  # the scheduler's binding
        return self.patch("v1/pods", name, {"status": status}, namespace, subresource="status")

    def set_pod_mount_failure(
        self,
        job_name: str,
        namespace: str,
        *,
        container: str,
        volume: str,
        why: str,
        init_container: str | None = None,
        scheduled_at: str | None = None,
        suffix: str = "a1b2c",
    ) -> Body:
        """Play the kubelet failing to mount a volume of the Job's scheduled pod (a Secret or ConfigMap that
        does not exist): the containers wait with ContainerCreating (PodInitializing with an init
        container) and no message, and only a ``FailedMount`` Warning Event says why, as on a real node:
        ``MountVolume.SetUp failed for volume "<volume>" : <why>`` (e.g. ``secret "git-creds" not found``).
        Returns the Event."""
        self.set_pod_waiting(
            job_name,
            namespace,
            container=container,
            reason="PodInitializing" if init_container is not None else "ContainerCreating",
            message=None,
            init_container=init_container,
            scheduled_at=scheduled_at,
            suffix=suffix,
        )
        pod = self.get("v1/pods", f"{job_name}-{suffix}", namespace) or {}
        now = _now()
        event = {
            "metadata": {"name": f"{job_name}-{suffix}.{uuid.uuid4().hex[:16]}"},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": f"{job_name}-{suffix}",
                "namespace": namespace,
                "uid": pod.get("metadata", {}).get("uid"),
            },
            "reason": "FailedMount",
            "message": f'MountVolume.SetUp failed for volume "{volume}" : {why}',
            "type": "Warning",
            "source": {"component": "kubelet", "host": "gpu-node-1"},
            "reportingComponent": "kubelet",
            "reportingInstance": "gpu-node-1",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        return self.create("v1/events", event, namespace)

    def evict_pod(
        self,
        job_name: str,
        namespace: str,
        *,
        container: str,
        reason: str = "EvictionByEvictionAPI",
        message: str = "Eviction API: evicting",
        at: str | None = None,
        suffix: str = "a1b2c",
    ) -> Body:
        """Play a disruption of the Job's running pod (a drain's Eviction API call, the scheduler's
        preemption ``PreemptionByScheduler``, the taint manager ``DeletionByTaintManager``): condition
        DisruptionTarget True with `reason` and `message`, then the container killed (exit code 143) and the
        pod Failed, as the kubelet leaves it, at `at` (default now). The Job controller's replacement is the
        test's next pod."""
        name = self._job_pod(job_name, namespace, suffix, [(container, "x")])
        now = at or _now()
        status = {
            "phase": "Failed",
            "conditions": [
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastProbeTime": None,
                    "lastTransitionTime": now,
                },
                {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": now},
            ],
            "containerStatuses": [
                {
                    "name": container,
                    "image": "x",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "started": False,
                    "state": {
                        "terminated": {
                            "exitCode": 143,
                            "reason": "Error",
                            "startedAt": now,
                            "finishedAt": now,
                        }
                    },
                }
            ],
        }
        return self.patch("v1/pods", name, {"status": status}, namespace, subresource="status")

    def kueue_hold(
        self, job_name: str, namespace: str, message: str, *, reason: str = "Pending", jobset: bool = False
    ) -> Body:
        """Play Kueue holding a suspended Job (or, with `jobset`, a JobSet: Kueue admits it as one workload):
        its Workload (labelled with the Job's uid, owned by the Job) with condition QuotaReserved False and
        Kueue's `message`, e.g. ``couldn't assign flavors to pod set main: insufficient unused quota for
        nvidia.com/gpu in flavor default-flavor, 1 more needed`` (reason Pending), or ``LocalQueue gpu-queue
        doesn't exist`` (reason Inadmissible)."""
        resource = JOBSET.resource if jobset else "batch/v1/jobs"
        job = self.get(resource, job_name, namespace) or {}
        uid = (job.get("metadata") or {}).get("uid", "")
        queue = ((job.get("metadata") or {}).get("labels") or {}).get("kueue.x-k8s.io/queue-name", "")
        name = f"{'jobset' if jobset else 'job'}-{job_name}-{uid[:5]}"
        if self.get(KUEUE_WORKLOAD.resource, name, namespace) is None:
            metadata = {
                "name": name,
                "labels": {"kueue.x-k8s.io/job-uid": uid},
                "ownerReferences": [
                    {
                        "apiVersion": JOBSET.api_version if jobset else "batch/v1",
                        "kind": "JobSet" if jobset else "Job",
                        "name": job_name,
                        "uid": uid,
                        "controller": True,
                    }
                ],
            }
            spec = {"queueName": queue, "podSets": [{"name": "main", "count": 1}]}
            self.create(KUEUE_WORKLOAD.resource, {"metadata": metadata, "spec": spec}, namespace)
        now = _now()
        condition = {
            "type": "QuotaReserved",
            "status": "False",
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
        }
        return self.patch(
            KUEUE_WORKLOAD.resource,
            name,
            {"status": {"conditions": [condition]}},
            namespace,
            subresource="status",
        )

    def kueue_admit(self, job_name: str, namespace: str, *, jobset: bool = False) -> Body:
        """Play Kueue admitting a Job (or JobSet) it holds: it unsuspends it (the Job controller then starts
        its pods; a JobSet's controller first unsuspends its child Jobs)."""
        resource = JOBSET.resource if jobset else "batch/v1/jobs"
        return self.patch(resource, job_name, {"spec": {"suspend": False}}, namespace)

    def install_jobset(self, version: str = "v0.10.0") -> None:
        """Install JobSet (kubernetes-sigs/jobset) on the running cluster, as ``kubectl apply
        --server-side -f .../manifests.yaml`` would: the jobsets API (its CRD object too, so kopf's
        discovery sees it) and its controller, played by the emulator from now on (`_sync_jobsets`).
        Without it, the jobsets resource answers 404 as on a cluster without JobSet. A `version` before
        v0.10.0 has no `onJobFailureMessagePatterns` in its CRD: the API server prunes it from rules."""

        async def install(e: FakeKubernetes) -> None:
            e.jobset_unknown_rule_fields = (
                ("onJobFailureMessagePatterns",) if _release(version) < (0, 10, 0) else ()
            )
            if e.crds and JOBSET in e.crds:
                return
            e.crds = (*e.crds, JOBSET)
            e.serve(JOBSET)
            manifest = JOBSET.synthetic_manifest()
            await e.create_object(
                kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions"), None, manifest
            )

        self._locked(install)

    def jobset_jobs(self, jobset: str, namespace: str) -> builtins.list[Body]:
        """The child Jobs of a JobSet's current restart attempt, by name (the JobSet controller's)."""
        return [
            job
            for job in self.list("batch/v1/jobs", namespace, label_selector=f"{JOBSET_NAME_LABEL}={jobset}")
            if not job["metadata"].get("deletionTimestamp")
        ]

    def ensure_namespace(self, name: str) -> None:
        if self.get("v1/namespaces", name) is None:
            with contextlib.suppress(ApiError):
                self.create("v1/namespaces", {"metadata": {"name": name}})

    def events(self, namespace: str | None = None) -> builtins.list[Body]:
        """Kubernetes Events (core/v1), e.g. those kopf posts for handler progress."""
        return self.list("v1/events", namespace)

    def requests(self) -> builtins.list[kmock.Request]:
        """Every HTTP request the emulator has received so far (kmock's request history)."""
        return list(self.emulator._requests)

    def wait_for(
        self,
        predicate: Callable[[], T],
        *,
        timeout: float = 15.0,
        interval: float = 0.05,
        message: str = "condition",
    ) -> T:
        """Poll `predicate` until it returns something truthy; return that, or fail the test on timeout.

        Fails at once if an operator from ``run_operator`` died; a timeout shows the operators' errors.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            for run in self.operators:
                if run.died:
                    raise AssertionError(f"the kopf operator died while waiting for {message}") from run.error
            if time.monotonic() >= deadline:
                errors = [r.getMessage() for run in self.operators for r in run.errors][-5:]
                hint = f"; kopf errors: {errors}" if errors else ""
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {message}; last: {result!r}{hint}"
                )
            time.sleep(interval)

    def wait_for_object(
        self,
        resource: ResourceSpec,
        name: str,
        namespace: str | None = None,
        *,
        where: Callable[[Body], bool] = lambda _: True,
        timeout: float = 15.0,
    ) -> Body:
        """Wait until the object exists and satisfies `where`; return it."""

        def probe() -> Body | None:
            body = self.get(resource, name, namespace)
            return body if body is not None and where(body) else None

        body = self.wait_for(probe, timeout=timeout, message=f"{resource} {namespace}/{name}")
        assert body is not None
        return body

    def watching(self, resource: ResourceSpec, namespace: str | None = None) -> bool:
        """Whether some client has opened a watch on `resource` (in `namespace`, if given)."""
        res = _resource(resource)
        return any(
            r.action == kmock.action.WATCH
            and r.resource == res
            and (namespace is None or r.namespace in (None, namespace))
            for r in self.requests()
        )


# --------------------------------------------------------------------------------------------------------
# Running a kopf operator against the emulator: own thread, own loop, always stopped.
# --------------------------------------------------------------------------------------------------------

HandlerSource: TypeAlias = (
    "kopf.OperatorRegistry | Callable[[kopf.OperatorRegistry], object] | types.ModuleType | str | None"
)


def operator_settings(*, posting: bool = False) -> kopf.OperatorSettings:
    """kopf settings for tests: standalone, quick to retry and reconnect, never SIGKILLs the process."""
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True
    settings.peering.mandatory = False
    settings.posting.enabled = posting
    # Short server-side watch timeouts: streams end and kopf re-lists/re-watches, as against a real cluster.
    settings.watching.server_timeout = 10
    settings.watching.client_timeout = 20
    settings.watching.connect_timeout = 2
    settings.watching.reconnect_backoff = 0.05
    settings.networking.request_timeout = 10
    settings.networking.connect_timeout = 2
    settings.networking.error_backoffs = [0.1, 0.2, 0.5]
    # Workers still busy (e.g. sleeping before a handler retry) get this long before they are cancelled.
    settings.queueing.exit_timeout = 0.5
    # kopf sends SIGKILL to its own thread (= the whole pytest process) if it exits without the stop-flag.
    settings.process.ultimate_exiting_timeout = None
    return settings


def _prepopulated_vault(info: kopf.ConnectionInfo) -> Any | None:
    """kopf's credentials vault, pre-filled: no login handler needed, so any registry works unchanged."""
    try:
        from kopf._cogs.structs.credentials import Vault  # kopf keeps Vault private; fall back if it moves
    except ImportError:  # pragma: no cover
        return None
    return Vault({"k8s-emulator": info})


@contextlib.contextmanager
def _registry_from(source: HandlerSource) -> Iterator[kopf.OperatorRegistry]:
    """A fresh registry per run, so handlers never leak between tests."""
    if isinstance(source, kopf.OperatorRegistry):
        yield source
        return
    registry = kopf.OperatorRegistry()
    if source is None:
        yield registry
    elif isinstance(source, types.ModuleType | str):
        # Modules register with `@kopf.on...` into the default registry at import: (re)import them
        # with a fresh default registry, then restore the previous one.
        previous = kopf.get_default_registry()
        kopf.set_default_registry(registry)
        try:
            name = source if isinstance(source, str) else source.__name__
            if name in sys.modules:
                importlib.reload(sys.modules[name])
            else:
                importlib.import_module(name)
        finally:
            kopf.set_default_registry(previous)
        yield registry
    else:
        source(registry)
        yield registry


@dataclass
class OperatorRun:
    """A kopf operator running in its own thread; see ``run_operator``."""

    registry: kopf.OperatorRegistry
    settings: kopf.OperatorSettings
    memo: Any = None
    records: list[logging.LogRecord] = field(default_factory=list)
    error: BaseException | None = None
    thread: threading.Thread | None = None
    stopping: bool = False
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def died(self) -> bool:
        """It ended on its own (a crash), not because it was asked to stop."""
        return (
            self.thread is not None
            and self.thread.ident is not None
            and not self.running
            and not self.stopping
        )

    @property
    def errors(self) -> list[logging.LogRecord]:
        """kopf's log records at ERROR and above (handler failures, crashed watchers, ...)."""
        return [r for r in self.records if r.levelno >= logging.ERROR]

    def messages(self, level: int = logging.INFO) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    def stop(self, timeout: float = 15.0) -> None:
        """Ask kopf to stop and wait for its thread; idempotent."""
        self.stopping = True
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                self._loop.call_soon_threadsafe(self._stop.set)
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                raise RuntimeError(f"the kopf operator did not stop within {timeout}s")


class _ListHandler(logging.Handler):
    """Keeps the kopf records of one operator: those logged in its thread (kopf logs from its event loop,
    also for handlers it runs in executors), so operators running side by side have separate records."""

    def __init__(self, records: list[logging.LogRecord], run: OperatorRun) -> None:
        super().__init__(logging.DEBUG)
        self.records = records
        self.run = run

    def emit(self, record: logging.LogRecord) -> None:
        thread = self.run.thread
        if thread is None or thread.ident is None or record.thread == thread.ident:
            self.records.append(record)


@contextlib.contextmanager
def run_operator(
    cluster: KubeCluster,
    handlers: HandlerSource = None,
    *,
    namespaces: Iterable[str] = ("default",),
    clusterwide: bool = False,
    settings: kopf.OperatorSettings | None = None,
    posting: bool = False,
    memo: Any = None,
    ready_timeout: float = 15.0,
    stop_timeout: float = 15.0,
    watching: Iterable[ResourceSpec] = (),
    log_level: int = logging.INFO,
    peering: str | None = None,
    priority: int = 0,
) -> Iterator[OperatorRun]:
    """Run ``kopf.operator`` against `cluster` in its own thread and event loop; always stop it.

    Why a thread: kopf treats every task created after its start in its loop as its own and cancels them
    as "hung" on exit; in the test's loop that includes the emulator's and the test's tasks.

    `handlers`: a ``kopf.OperatorRegistry`` (used as is), a callable that fills a fresh registry, a module
    (or its name) whose ``@kopf.on...`` decorators are re-run into a fresh registry, or ``None`` (empty).
    `watching`: resources to wait for kopf's watch requests on before yielding (e.g. ``CRD_RESOURCE``),
    for tests that assert that nothing happens. `posting`: post k8s Events (``kopf.info()`` & co.).
    kopf's log records at `log_level`+ are kept in ``.records`` (and reach pytest's log capture).
    `peering`: the (Cluster)KopfPeering to coordinate through, with `priority` (default: standalone).
    Exceptions that end the operator re-raise on exit.
    """
    namespaces = [namespaces] if isinstance(namespaces, str) else list(namespaces)
    for namespace in namespaces:
        cluster.ensure_namespace(namespace)
    with _registry_from(handlers) as registry:
        vault = _prepopulated_vault(cluster.connection_info(namespaces[0] if namespaces else "default"))
        if vault is None:  # pragma: no cover
            cluster.install_login(registry)
        run = OperatorRun(
            registry=registry, settings=settings or operator_settings(posting=posting), memo=memo
        )
        ready = threading.Event()
        started = threading.Event()
        kopf_logger = logging.getLogger("kopf")
        capture = _ListHandler(run.records, run)
        previous_level = kopf_logger.level
        kopf_logger.addHandler(capture)
        kopf_logger.setLevel(log_level)

        async def main() -> None:
            # = kopf.operator(), plus: when any root task ends (e.g. a failed startup), raise the stop-flag,
            # else kopf waits 5s for its own stop-flag waiter as a "hung" task before exiting.
            stop = run._stop = asyncio.Event()
            started.set()
            existing = asyncio.all_tasks()
            tasks = await kopf.spawn_tasks(
                registry=registry,
                settings=run.settings,
                clusterwide=clusterwide,
                namespaces=[] if clusterwide else namespaces,
                standalone=peering is None,
                peering_name=peering,
                priority=priority,
                stop_flag=stop,
                ready_flag=ready,
                memo=memo,
                **({"vault": vault} if vault is not None else {}),
            )
            for task in tasks:
                task.add_done_callback(lambda _: stop.set())
            await kopf.run_tasks(tasks, ignored=existing)

        def target() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            run._loop = loop
            try:
                loop.run_until_complete(main())
            except BaseException as e:
                run.error = e
            finally:
                started.set()
                try:
                    loop.run_until_complete(loop.shutdown_asyncgens())
                    loop.run_until_complete(loop.shutdown_default_executor())
                finally:
                    loop.close()
                    run.settings.execution.executor.shutdown(wait=False, cancel_futures=True)

        run.thread = threading.Thread(target=target, name="kopf-operator", daemon=True)
        cluster.operators.append(run)
        try:
            run.thread.start()
            started.wait(ready_timeout)
            deadline = time.monotonic() + ready_timeout
            while not ready.wait(0.02):
                if not run.thread.is_alive():
                    raise RuntimeError("the kopf operator exited before it was ready") from run.error
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the kopf operator was not ready within {ready_timeout}s")
            for spec in watching:
                scopes: list[str | None] = [None] if clusterwide else list(namespaces)
                for scope in scopes:
                    cluster.wait_for(
                        functools.partial(cluster.watching, spec, scope),
                        timeout=max(0.1, deadline - time.monotonic()),
                        message=f"kopf to watch {spec} in {scope or 'all namespaces'}",
                    )
            yield run
        finally:
            try:
                run.stop(stop_timeout)
            finally:
                cluster.operators.remove(run)
                kopf_logger.removeHandler(capture)
                kopf_logger.setLevel(previous_level)
        if run.error is not None:
            raise RuntimeError("the kopf operator failed") from run.error


# --------------------------------------------------------------------------------------------------------
# The fixture.
# --------------------------------------------------------------------------------------------------------


K8s = KubeCluster  # the ``k8s`` fixture's type, for annotations: ``def test_x(k8s: K8s) -> None``


@pytest.fixture
def k8s(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[KubeCluster]:
    """A fresh fake Kubernetes API per test, wired in as the default for the `kubernetes` client and kubeconfig.

    ``kubernetes.client.BatchV1Api()`` without arguments, ``kubernetes.config.load_kube_config()`` and
    ``KUBECONFIG`` users (helm, kubectl) all reach the emulator for the duration of the test.
    """
    cluster = KubeCluster()
    cluster.start()
    try:
        kubeconfig = cluster.kubeconfig(tmp_path_factory.mktemp("k8s") / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        # The client reads $KUBECONFIG once, at import: point its default location here as well.
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        monkeypatch.setattr(kubernetes.config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
        previous_config = kubernetes.client.Configuration._default
        previous_client = kubernetes.client.ApiClient._default
        kubernetes.client.Configuration.set_default(cluster.configuration())
        kubernetes.client.ApiClient.set_default(cluster.api)  # type: ignore[no-untyped-call]
        try:
            yield cluster
        finally:
            kubernetes.client.Configuration.set_default(previous_config)
            kubernetes.client.ApiClient._default = previous_client
    finally:
        cluster.stop()
