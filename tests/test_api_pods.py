"""Pod settings of a recipe (spec.pods, training's placement and GPU fields, resources per phase): the
models and the generated CRD accept the same good values and refuse the same bad ones, each with one line
naming the field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.api import RecipeError, parse_recipe
from ftrecipe.api.crd import custom_resource_definition
from support.crd_schema import api_server_violations

ROOT = Path(__file__).resolve().parents[1]
Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def crd() -> Manifest:
    return custom_resource_definition()


def minimal() -> Manifest:
    loaded: Manifest = yaml.safe_load((ROOT / "examples" / "recipes" / "minimal.yaml").read_text())
    return loaded


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    def mutate(manifest: Manifest) -> None:
        *parents, last = path.split(".")
        node = manifest
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return mutate


TOO_MANY_LABELS = {f"label-{n}": "x" for n in range(33)}

# (id, mutation of the minimal recipe, field path the error must name, words of the rule it must state)
INVALID: list[tuple[str, Callable[[Manifest], None], str, str]] = [
    (
        "service-account-name",
        _set("spec.pods.serviceAccountName", "ML_Jobs"),
        "pods.serviceAccountName",
        "lowercase Kubernetes name",
    ),
    (
        "pull-secret-name",
        _set("spec.pods.imagePullSecrets", [{"name": "Registry Credentials"}]),
        "imagePullSecrets[0].name",
        "lowercase Kubernetes name",
    ),
    (
        "pull-secret-without-name",
        _set("spec.pods.imagePullSecrets", [{}]),
        "imagePullSecrets[0].name",
        "required",
    ),
    ("our-label", _set("spec.pods.labels", {"ftrecipe.dev/recipe": "x"}), "pods.labels", "set by ftrecipe"),
    (
        "our-name-label",
        _set("spec.pods.labels", {"app.kubernetes.io/name": "x"}),
        "pods.labels",
        "set by ftrecipe",
    ),
    ("job-controller-label", _set("spec.pods.labels", {"job-name": "x"}), "pods.labels", "set by ftrecipe"),
    (
        "job-controller-prefixed-label",
        _set("spec.pods.labels", {"batch.kubernetes.io/job-name": "x"}),
        "pods.labels",
        "set by ftrecipe",
    ),
    (
        "kueue-queue-label",
        _set("spec.pods.labels", {"kueue.x-k8s.io/queue-name": "gpu"}),
        "pods.labels",
        "set by ftrecipe",
    ),
    ("label-key-syntax", _set("spec.pods.labels", {"cost center": "x"}), "pods.labels", "not valid"),
    (
        "label-key-too-long",
        _set("spec.pods.labels", {"team-" + "x" * 60: "x"}),
        "pods.labels",
        "not valid",
    ),
    (
        "label-prefix-not-dns",
        _set("spec.pods.labels", {"Example.COM/team": "x"}),
        "pods.labels",
        "not valid",
    ),
    ("label-value-syntax", _set("spec.pods.labels", {"team": "ml team"}), "pods.labels.team", "label value"),
    ("label-value-too-long", _set("spec.pods.labels", {"team": "x" * 64}), "pods.labels.team", "at most 63"),
    ("too-many-labels", _set("spec.pods.labels", TOO_MANY_LABELS), "pods.labels", "at most 32 labels"),
    (
        "our-annotation",
        _set("spec.pods.annotations", {"ftrecipe.dev/inputs-hash": "x"}),
        "pods.annotations",
        "set by ftrecipe",
    ),
    ("annotation-key-syntax", _set("spec.pods.annotations", {"/x": "y"}), "pods.annotations", "not valid"),
    ("runtime-class", _set("spec.pods.runtimeClassName", "NVIDIA"), "pods.runtimeClassName", "lowercase"),
    (
        "training-runtime-class",
        _set("spec.training.runtimeClassName", "nvidia runtime"),
        "training.runtimeClassName",
        "lowercase",
    ),
    ("priority-class", _set("spec.pods.priorityClassName", "Batch"), "pods.priorityClassName", "lowercase"),
    (
        "gpu-resource-without-domain",
        _set("spec.training.gpuResourceName", "gpu"),
        "gpuResourceName",
        "device plugin's resource name",
    ),
    (
        "gpu-resource-without-name",
        _set("spec.training.gpuResourceName", "nvidia.com/"),
        "gpuResourceName",
        "device plugin's resource name",
    ),
    (
        "grace-period-too-short",
        _set("spec.training.terminationGracePeriodSeconds", 5),
        "terminationGracePeriodSeconds",
        ">= 30",
    ),
    (
        "grace-period-too-long",
        _set("spec.training.terminationGracePeriodSeconds", 86400),
        "terminationGracePeriodSeconds",
        "<= 7200",
    ),
    ("model-cache-without-claim", _set("spec.training.modelCache", {}), "modelCache.claimName", "required"),
    (
        "model-cache-claim-name",
        _set("spec.training.modelCache", {"claimName": "HF Cache"}),
        "modelCache.claimName",
        "lowercase",
    ),
    (
        "evaluation-quantity",
        _set("spec.evaluation.resources", {"requests": {"memory": "lots"}}),
        "evaluation.resources.requests.memory",
        "resource quantity",
    ),
    (
        "fetch-inputs-quantity",
        _set("spec.pods.fetchInputsResources", {"limits": {"cpu": "two"}}),
        "fetchInputsResources.limits.cpu",
        "resource quantity",
    ),
    ("unknown-pod-field", _set("spec.pods.serviceAccount", "jobs"), "spec.pods", "unknown field"),
    ("node-selector-value", _set("spec.pods.nodeSelector", {"pool": 3}), "pods.nodeSelector.pool", "string"),
]


@pytest.mark.parametrize(("case", "mutate", "where", "rule"), INVALID, ids=[c[0] for c in INVALID])
def test_models_reject_with_one_clear_line(
    case: str, mutate: Callable[[Manifest], None], where: str, rule: str
) -> None:
    manifest = minimal()
    mutate(manifest)
    with pytest.raises(RecipeError) as caught:
        parse_recipe(manifest, "recipe.yaml")
    lines = caught.value.lines
    assert all("\n" not in line and line.startswith("recipe.yaml: ") for line in lines)
    assert any(where in line and rule in line for line in lines), lines


@pytest.mark.parametrize(("case", "mutate", "where", "rule"), INVALID, ids=[c[0] for c in INVALID])
def test_crd_rejects_the_same(
    case: str, mutate: Callable[[Manifest], None], where: str, rule: str, crd: Manifest
) -> None:
    manifest = minimal()
    mutate(manifest)
    assert api_server_violations(crd, manifest) != []


VALID: dict[str, Callable[[Manifest], None]] = {
    "prefixed-label-and-empty-value": _set(
        "spec.pods.labels", {"example.com/team": "nlu", "billing": "", "a.b-c_d": "X.y-z_1"}
    ),
    "annotations-with-long-values": _set(
        "spec.pods.annotations",
        {"sidecar.istio.io/inject": "false", "example.com/notes": "free text, spaces: fine " * 20},
    ),
    "thirty-two-labels": _set("spec.pods.labels", {f"label-{n}": "x" for n in range(32)}),
    "kueue-annotation": _set("spec.pods.annotations", {"kueue.x-k8s.io/podset-preferred-topology": "rack"}),
    "mig-slice": _set("spec.training.gpuResourceName", "nvidia.com/mig-1g.10gb"),
    "amd": _set("spec.training.gpuResourceName", "amd.com/gpu"),
    "intel": _set("spec.training.gpuResourceName", "gpu.intel.com/i915"),
    "identity": _set(
        "spec.pods",
        {"serviceAccountName": "ftrecipe-jobs", "imagePullSecrets": [{"name": "ghcr"}, {"name": "ecr.pull"}]},
    ),
    "grace-bounds": _set("spec.training.terminationGracePeriodSeconds", 30),
    "request-equals-limit": _set(
        "spec.training.resources", {"requests": {"memory": "64Gi"}, "limits": {"memory": "65536Mi"}}
    ),
}


@pytest.mark.parametrize("mutate", VALID.values(), ids=VALID.keys())
def test_good_values_pass_both(mutate: Callable[[Manifest], None], crd: Manifest) -> None:
    manifest = minimal()
    mutate(manifest)
    assert api_server_violations(crd, manifest) == []
    parse_recipe(manifest)


def test_request_above_limit_is_refused_while_reading_the_recipe() -> None:
    """The CRD cannot compare quantities (CEL's quantity library is newer than Kubernetes 1.29); the models
    refuse it, so `ftrecipe validate` and the operator say so before a Job is refused by the API server."""
    manifest = minimal()
    manifest["spec"]["training"]["resources"] = {
        "requests": {"memory": "128Gi"},
        "limits": {"memory": "96Gi"},
    }
    with pytest.raises(RecipeError) as caught:
        parse_recipe(manifest, "recipe.yaml")
    assert caught.value.lines == [
        "recipe.yaml: spec.training.resources: requests.memory (128Gi) is above limits.memory (96Gi): raise "
        "the limit or lower the request"
    ]
    manifest["spec"]["training"]["resources"] = {"requests": {"cpu": "1500m"}, "limits": {"cpu": "1.5"}}
    parse_recipe(manifest)
    # The CRD's pattern is Kubernetes' own and lets odd suffixes through; the models parse the value.
    manifest["spec"]["training"]["resources"] = {"requests": {"memory": "16KM"}}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(manifest, "recipe.yaml")
    assert caught.value.lines == [
        "recipe.yaml: spec.training.resources.requests.memory: must be a resource quantity such as 2, 500m or "
        "16Gi (got '16KM')"
    ]


def test_defaults_of_the_new_fields(crd: Manifest) -> None:
    spec = parse_recipe(minimal()).spec
    assert spec.training.gpu_resource_name == "nvidia.com/gpu"
    assert spec.training.termination_grace_period_seconds == 600
    assert spec.training.model_cache is None and spec.evaluation.resources is None
    assert spec.pods.model_dump(exclude_none=True) == {}
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert schema["training"]["properties"]["gpuResourceName"]["default"] == "nvidia.com/gpu"
    assert schema["training"]["properties"]["terminationGracePeriodSeconds"]["default"] == 600
    assert schema["pods"]["properties"]["labels"]["maxProperties"] == 32
