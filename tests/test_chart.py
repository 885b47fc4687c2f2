"""The Helm chart (charts/ftrecipe-operator), rendered and linted by the real helm binary: valid Kubernetes
objects for 1.29 and later, a strict values schema, exactly the RBAC rules the operator needs, the CRD
equal to crds/, and the GitOps health checks (Argo CD Lua, Flux CEL) executed against every phase."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from lupa import lua51

import ftrecipe
from ftrecipe.api import load_recipe
from ftrecipe.api.crd import render_crd_yaml
from ftrecipe.cli.main import make_parser
from ftrecipe.controller.manifests import DEFAULT_IMAGES, NON_ROOT_ID
from support.crd_schema import api_server_violations
from support.helm import run_helm
from support.k8s import KubeCluster

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "ftrecipe-operator"
ALL_OPTIONS = CHART / "ci" / "all-options-values.yaml"
HEALTH_LUA = CHART / "argocd" / "health.lua"
CRD_COPY = CHART / "files" / "crds" / "finetunerecipes.ftrecipe.dev.yaml"
CRD_SOURCE = ROOT / "crds" / "finetunerecipes.ftrecipe.dev.yaml"
GITOPS = ROOT / "examples" / "gitops"
NAMESPACE = "ftrecipe-system"
K8S_VERSIONS = ("1.29", "1.33", kubernetes_validate.latest_version())
HEALTH_KEY = "resource.customizations.health.ftrecipe.dev_FinetuneRecipe"
# Kinds whose schema kubernetes-validate does not have (it knows built-in kinds only):
# - ServiceMonitor (Prometheus Operator CRD): not validated here.
NOT_IN_KUBERNETES_VALIDATE = {"ServiceMonitor"}
# admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy is GA from Kubernetes 1.30 (beta before).
SINCE_1_30 = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
KEEP = {"helm.sh/resource-policy": "keep", "argocd.argoproj.io/sync-options": "Delete=false,Prune=false"}

Manifest = dict[str, Any]
Render = Callable[..., list[Manifest]]

# Value sets rendered by most tests: the defaults, every option on (a namespace list), and every option on
# while watching all namespaces.
RENDERS: dict[str, tuple[str, ...]] = {
    "default": (),
    "all-options": ("-f", str(ALL_OPTIONS)),
    "all-options-all-namespaces": (
        "-f",
        str(ALL_OPTIONS),
        "--set",
        "watch.allNamespaces=true",
        "--set-json",
        "watch.namespaces=[]",
        "--set",
        "watch.createNamespaces=false",
    ),
}


@pytest.fixture(scope="session")
def render(helm: Path, helm_env: dict[str, str]) -> Render:
    """`helm template` of the chart (release `ftrecipe` in `ftrecipe-system`) as a list of objects."""
    cache: dict[tuple[str, ...], list[Manifest]] = {}

    def rendered(*args: str) -> list[Manifest]:
        if args not in cache:
            out = run_helm(helm, helm_env, "template", "ftrecipe", CHART, "--namespace", NAMESPACE, *args)
            cache[args] = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
        return cache[args]

    return rendered


def one(objects: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(objects: list[Manifest]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def container(objects: list[Manifest]) -> Manifest:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    found: Manifest = pod["containers"][0]
    return found


def env_of(objects: list[Manifest]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container(objects)["env"]}


# ------------------------------------------------------------------------------------------ chart metadata


def test_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"], "Chart.yaml appVersion must follow pyproject.toml"
    assert chart["appVersion"] == ftrecipe.__version__


@pytest.mark.parametrize("values", sorted(RENDERS))
def test_helm_lint_strict(helm: Path, helm_env: dict[str, str], values: str) -> None:
    out = run_helm(helm, helm_env, "lint", "--strict", CHART, "--namespace", NAMESPACE, *RENDERS[values])
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


def test_default_render_objects(render: Render) -> None:
    assert kinds(render()) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]


def test_all_options_render_objects(render: Render) -> None:
    objects = render(*RENDERS["all-options"])
    assert kinds(objects) == sorted(
        [
            "ServiceAccount",
            *["CustomResourceDefinition"] * 3,  # FinetuneRecipe + kopf's two peering CRDs
            "ClusterRole",
            "ClusterRoleBinding",
            *["Namespace", "Role", "RoleBinding"] * 2,  # one of each per watched namespace
            "Service",
            "Deployment",
            "ServiceMonitor",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ]
    )


# ------------------------------------------------------------------------------------------ validity


@pytest.mark.parametrize("values", sorted(RENDERS))
def test_every_object_is_valid_kubernetes(render: Render, values: str) -> None:
    objects = render(*RENDERS[values])
    crds = {o["spec"]["names"]["kind"]: o for o in objects if o["kind"] == "CustomResourceDefinition"}
    checked = 0
    for obj in objects:
        if obj["kind"] in NOT_IN_KUBERNETES_VALIDATE:
            if obj["kind"] in crds:
                # The API server handles apiVersion, kind and metadata itself; the schema covers the rest.
                body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
                assert api_server_violations(crds[obj["kind"]], body) == [], obj["metadata"]
            continue
        for version in K8S_VERSIONS:
            if obj["kind"] in SINCE_1_30 and version == "1.29":
                continue
            kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 6


def test_namespaced_objects_have_a_namespace(render: Render) -> None:
    cluster_scoped = {
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "Namespace",
        *SINCE_1_30,
    }
    for values in RENDERS.values():
        for obj in render(*values):
            if obj["kind"] not in cluster_scoped:
                assert obj["metadata"].get("namespace"), f"{obj['kind']} {obj['metadata']['name']}"


# ------------------------------------------------------------------------------------------ values schema


def test_values_and_ci_values_match_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    for path in (CHART / "values.yaml", ALL_OPTIONS):
        jsonschema.Draft7Validator(schema).validate(yaml.safe_load(path.read_text()))


def _leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in _leaves(value, (*path, key))]
    return [path]


def test_schema_closes_every_object_and_covers_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    free_form = {"global", "podLabels", "podAnnotations", "nodeSelector", "affinity", "annotations", "labels"}

    def walk(node: Manifest, name: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{name}: additionalProperties must be false"
            for key, sub in node["properties"].items():
                walk(sub, key)
        elif node.get("type") == "object" and name not in free_form and name not in {"requests", "limits"}:
            assert name == "valueFrom", f"{name}: free-form object not expected"

    walk(schema, "(root)")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for leaf in _leaves(values):
        node = schema
        for key in leaf:
            if "properties" not in node:  # a free-form map or a pass-through Kubernetes object
                break
            assert key in node["properties"], f"{'.'.join(leaf)} is not in values.schema.json"
            node = node["properties"][key]


def test_values_yaml_documents_every_value() -> None:
    """Every value has a `# --` comment block right above it, or sits inside a value that has one;
    section keys (whose children are indented below them) need none."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented: list[int] = []  # indents of the enclosing documented keys
    missing = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match[1]), match[2], match[3].strip()
        documented = [level for level in documented if level < indent]
        comments = []
        above = number - 1
        while above >= 0 and lines[above].lstrip().startswith("#"):
            comments.append(lines[above].strip())
            above -= 1
        if any(comment.startswith("# --") for comment in comments):
            documented.append(indent)
            continue
        following = next((n for n in lines[number + 1 :] if n.strip()), "")
        is_section = rest == "" and len(following) - len(following.lstrip()) > indent
        if not (documented or is_section):
            missing.append(key)
    assert missing == [], f"values without a `# --` comment: {missing}"


WRONG_VALUES = {
    "unknown top-level key": ("--set", "replicas=2"),
    "unknown nested key": ("--set", "image.name=x"),
    "replicaCount zero": ("--set", "replicaCount=0"),
    "log format": ("--set", "operator.logFormat=xml"),
    "pull policy": ("--set", "image.pullPolicy=Sometimes"),
    "short digest": ("--set", "image.digest=sha256:abc"),
    "namespace name": ("--set", "watch.allNamespaces=false", "--set", "watch.namespaces[0]=ML_Team"),
    "metrics port": ("--set", "metrics.port=70000"),
    "resync negative": ("--set", "operator.resyncSeconds=-1"),
    "stuck limit negative": ("--set", "operator.stuck.pullSeconds=-5"),
    "unknown stuck kind": ("--set", "operator.stuck.evictedSeconds=5"),
    "max evictions fraction": ("--set", "operator.maxEvictions=1.5"),
    "crds.keep type": ("--set-string", "crds.keep=yes"),
    "scrape interval": ("--set", "metrics.serviceMonitor.interval=often"),
    "image prefix with a quote": (
        "--set",
        "admissionPolicy.enabled=true",
        "--set-json",
        """admissionPolicy.allowedImagePrefixes=["ghcr.io/x/', 'evil/"]""",
    ),
    "image prefix without an end": ("--set", "admissionPolicy.allowedImagePrefixes={ghcr.io/ftrecipe}"),
    "validation action": ("--set", "admissionPolicy.validationActions={Block}"),
    "createNamespaces type": ("--set-string", "watch.createNamespaces=yes"),
}


@pytest.mark.parametrize("args", WRONG_VALUES.values(), ids=WRONG_VALUES.keys())
def test_schema_rejects_wrong_values(helm: Path, helm_env: dict[str, str], args: tuple[str, ...]) -> None:
    for command in ("template", "lint"):
        out = run_helm(
            helm,
            helm_env,
            command,
            *(["ftrecipe"] if command == "template" else []),
            CHART,
            *args,
            check=False,
        )
        assert out.returncode != 0, f"helm {command} accepted {args}"
        assert "values don't meet the specifications of the schema" in out.stdout + out.stderr


INVALID_COMBINATIONS = {
    "replicas without peering": (("--set", "replicaCount=2"), "peering.enabled is false"),
    "no namespaces": (("--set", "watch.allNamespaces=false"), "list the namespaces to watch"),
    "namespaces with all": (("--set", "watch.namespaces={ml}"), "watch.allNamespaces is true"),
    "credentials without reuse": (
        ("--set", "reuseBundles.credentialsSecret=s3"),
        "only to reuse bundles",
    ),
    "servicemonitor without service": (
        ("--set", "metrics.service.enabled=false", "--set", "metrics.serviceMonitor.enabled=true"),
        "needs metrics.service.enabled",
    ),
    "same ports": (("--set", "metrics.port=8080"), "must differ"),
    "namespaces to create with all": (
        ("--set", "watch.createNamespaces=true"),
        "watch.createNamespaces needs a namespace list",
    ),
    "policy without images": (
        ("--set", "admissionPolicy.enabled=true"),
        "admissionPolicy.enabled needs admissionPolicy.allowedImagePrefixes",
    ),
}


@pytest.mark.parametrize(("args", "message"), INVALID_COMBINATIONS.values(), ids=INVALID_COMBINATIONS.keys())
def test_invalid_combinations_fail_with_a_message(
    helm: Path, helm_env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    out = run_helm(helm, helm_env, "template", "ftrecipe", CHART, *args, check=False)
    assert out.returncode != 0
    assert message in out.stderr


# ------------------------------------------------------------------------------------------ CRDs


def test_chart_crd_copy_equals_crds_dir() -> None:
    assert CRD_COPY.read_bytes() == CRD_SOURCE.read_bytes(), (
        "charts/ftrecipe-operator/files/crds/ differs from crds/: run `make chart-crds`"
    )
    assert CRD_COPY.read_text() == render_crd_yaml(), "the CRD is stale: run `make crds chart-crds`"


def _without_chart_metadata(crd: Manifest) -> Manifest:
    crd = json.loads(json.dumps(crd))
    crd["metadata"].pop("annotations", None)
    crd["metadata"]["labels"] = {
        key: value
        for key, value in crd["metadata"]["labels"].items()
        if key == "app.kubernetes.io/name" or not key.startswith(("app.kubernetes.io/", "helm.sh/"))
    }
    return crd


def test_rendered_crd_equals_crds_dir(render: Render) -> None:
    rendered = one(render(), "CustomResourceDefinition", "finetunerecipes.ftrecipe.dev")
    assert _without_chart_metadata(rendered) == yaml.safe_load(CRD_SOURCE.read_text())
    assert rendered["metadata"]["annotations"] == KEEP
    assert rendered["metadata"]["labels"]["app.kubernetes.io/instance"] == "ftrecipe"


def test_crd_switches(render: Render) -> None:
    assert "CustomResourceDefinition" not in kinds(render("--set", "crds.install=false"))
    assert "CustomResourceDefinition" not in kinds(
        render("-f", str(ALL_OPTIONS), "--set", "crds.install=false")
    )
    unkept = [
        o
        for o in render("-f", str(ALL_OPTIONS), "--set", "crds.keep=false")
        if o["kind"] == "CustomResourceDefinition"
    ]
    assert len(unkept) == 3
    assert all("annotations" not in crd["metadata"] for crd in unkept)
    kept = [o for o in render(*RENDERS["all-options"]) if o["kind"] == "CustomResourceDefinition"]
    assert {c["metadata"]["name"] for c in kept} == {
        "finetunerecipes.ftrecipe.dev",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }
    assert all(c["metadata"]["annotations"] == KEEP for c in kept)


# ------------------------------------------------------------------------------------------ RBAC

RECIPES = {
    "apiGroups": ["ftrecipe.dev"],
    "resources": ["finetunerecipes"],
    "verbs": ["get", "list", "watch", "patch"],
}
RECIPE_STATUS = {"apiGroups": ["ftrecipe.dev"], "resources": ["finetunerecipes/status"], "verbs": ["patch"]}
JOBS = {
    "apiGroups": ["batch"],
    "resources": ["jobs"],
    "verbs": ["create", "get", "list", "watch", "delete", "patch"],
}
JOBSETS = {
    "apiGroups": ["jobset.x-k8s.io"],
    "resources": ["jobsets"],
    "verbs": ["create", "get", "list", "watch", "delete", "patch"],
}
PODS = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}
POD_LOGS = {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}
EVENTS = {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "list"]}
WORKLOADS = {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list"]}
CRDS = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "verbs": ["list", "watch"],
}
NAMESPACES = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
CLUSTER_PEERING = {
    "apiGroups": ["kopf.dev"],
    "resources": ["clusterkopfpeerings"],
    "verbs": ["list", "watch", "patch", "create"],
}
PEERING = {
    "apiGroups": ["kopf.dev"],
    "resources": ["kopfpeerings"],
    "verbs": ["list", "watch", "patch", "create"],
}
NAMESPACED_RULES = [RECIPES, RECIPE_STATUS, JOBS, PODS, POD_LOGS, EVENTS, WORKLOADS]
# With jobset.enabled (all-options has it): the rule on JobSets, next to the one on Jobs.
WITH_JOBSETS = [RECIPES, RECIPE_STATUS, JOBS, JOBSETS, PODS, POD_LOGS, EVENTS, WORKLOADS]


def rbac(objects: list[Manifest]) -> dict[tuple[str, str, str], list[Manifest]]:
    """(kind, namespace, name) -> rules of every Role and ClusterRole."""
    return {
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o["rules"]
        for o in objects
        if o["kind"] in ("Role", "ClusterRole")
    }


def bindings(objects: list[Manifest]) -> dict[tuple[str, str, str], Manifest]:
    return {
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): {
            "roleRef": o["roleRef"],
            "subjects": o["subjects"],
        }
        for o in objects
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
    }


def test_rbac_all_namespaces_standalone(render: Render) -> None:
    objects = render()
    assert rbac(objects) == {("ClusterRole", "", "ftrecipe-ftrecipe-operator"): [*NAMESPACED_RULES, CRDS]}
    subject = [{"kind": "ServiceAccount", "name": "ftrecipe-ftrecipe-operator", "namespace": NAMESPACE}]
    assert bindings(objects) == {
        ("ClusterRoleBinding", "", "ftrecipe-ftrecipe-operator"): {
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "ftrecipe-ftrecipe-operator",
            },
            "subjects": subject,
        }
    }
    assert one(objects, "ServiceAccount")["metadata"]["name"] == "ftrecipe-ftrecipe-operator"


def test_rbac_all_namespaces_with_peering(render: Render) -> None:
    objects = render(*RENDERS["all-options-all-namespaces"])
    assert rbac(objects) == {("ClusterRole", "", "ftrecipe"): [*WITH_JOBSETS, CRDS, CLUSTER_PEERING]}
    assert list(bindings(objects)) == [("ClusterRoleBinding", "", "ftrecipe")]


def test_rbac_namespace_list_with_peering(render: Render) -> None:
    objects = render(*RENDERS["all-options"])
    assert rbac(objects) == {
        ("ClusterRole", "", "ftrecipe-discovery"): [CRDS, NAMESPACES],
        ("Role", "ml-team-a", "ftrecipe"): [*WITH_JOBSETS, PEERING],
        ("Role", "ml-team-b", "ftrecipe"): [*WITH_JOBSETS, PEERING],
    }
    subject = [{"kind": "ServiceAccount", "name": "ftrecipe-operator", "namespace": NAMESPACE}]
    found = bindings(objects)
    assert set(found) == {
        ("ClusterRoleBinding", "", "ftrecipe-discovery"),
        ("RoleBinding", "ml-team-a", "ftrecipe"),
        ("RoleBinding", "ml-team-b", "ftrecipe"),
    }
    for (kind, _, name), binding in found.items():
        assert binding["subjects"] == subject
        assert binding["roleRef"]["name"] == name
        assert binding["roleRef"]["kind"] == kind.removesuffix("Binding")


def test_rbac_namespace_list_standalone(render: Render) -> None:
    objects = render("--set", "watch.allNamespaces=false", "--set", "watch.namespaces={ml}")
    assert rbac(objects) == {
        ("ClusterRole", "", "ftrecipe-ftrecipe-operator-discovery"): [CRDS, NAMESPACES],
        ("Role", "ml", "ftrecipe-ftrecipe-operator"): NAMESPACED_RULES,
    }


def test_rbac_for_jobsets_only_when_enabled(render: Render) -> None:
    """Multi-node training needs the JobSet CRD on the cluster: the chart grants the rule on jobsets only
    when asked (jobset.enabled). The operator learns the rest from the API's answer (403/404 → a status
    that names this switch), so the switch sets nothing else."""
    off = render()
    assert JOBSETS not in [rule for rules in rbac(off).values() for rule in rules]
    on = render("--set", "jobset.enabled=true")
    assert rbac(on) == {("ClusterRole", "", "ftrecipe-ftrecipe-operator"): [*WITH_JOBSETS, CRDS]}
    listed = render(
        "--set", "jobset.enabled=true", "--set", "watch.allNamespaces=false", "--set", "watch.namespaces={ml}"
    )
    assert rbac(listed) == {
        ("ClusterRole", "", "ftrecipe-ftrecipe-operator-discovery"): [CRDS, NAMESPACES],
        ("Role", "ml", "ftrecipe-ftrecipe-operator"): WITH_JOBSETS,
    }
    for objects in (on, listed):
        for obj in objects:
            if obj["kind"] not in NOT_IN_KUBERNETES_VALIDATE:
                for version in K8S_VERSIONS:
                    kubernetes_validate.validate(obj, version, strict=True)
    # Nothing else changes with the switch (the Deployment's pod template neither: no restart).
    changed = [o for o in on if o not in off]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in changed) == [
        ("ClusterRole", "ftrecipe-ftrecipe-operator"),
    ]


def test_rbac_never_grants_secrets_configmaps_or_wildcards(render: Render) -> None:
    for values in RENDERS.values():
        for rules in rbac(render(*values)).values():
            for rule in rules:
                assert not {"secrets", "configmaps", "*"} & set(rule["resources"])
                assert "*" not in rule["verbs"] and "*" not in rule["apiGroups"]
                assert not {"update", "deletecollection", "escalate", "bind", "impersonate"} & set(
                    rule["verbs"]
                )


def test_rbac_off(render: Render) -> None:
    objects = render("--set", "rbac.create=false", "--set", "serviceAccount.create=false")
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"} & set(
        kinds(objects)
    )
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "default"


# ------------------------------------------------------------------------------------------ Deployment


def test_default_deployment(render: Render) -> None:
    objects = render()
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    main = container(objects)
    assert main["image"] == DEFAULT_IMAGES.operator == f"ghcr.io/ftrecipe/ftrecipe:{ftrecipe.__version__}"
    assert main["command"] == ["ftrecipe", "operator"]
    assert main["args"] == [
        "--all-namespaces",
        "--liveness",
        "http://0.0.0.0:8080/healthz",
        "--metrics-port",
        "9090",
        "--log-format",
        "json",
        "--standalone",
        "--resync-seconds",
        "60",
        "--stuck-pull-seconds",
        "300",
        "--stuck-secret-seconds",
        "300",
        "--stuck-unschedulable-seconds",
        "0",
        "--stuck-queued-seconds",
        "0",
        "--max-evictions",
        "3",
    ]
    # The Jobs' default images are the operator's own defaults (manifests.Images), set explicitly.
    env = env_of(objects)
    assert env["FTRECIPE_OPERATOR_IMAGE"] == DEFAULT_IMAGES.operator
    assert env["FTRECIPE_TRAINER_IMAGE"] == DEFAULT_IMAGES.trainer
    assert env["HOME"] == "/tmp"
    assert "envFrom" not in main
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == {"health": 8080, "metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_all_options_deployment(render: Render) -> None:
    objects = render(*RENDERS["all-options"])
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    main = container(objects)
    digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    assert main["image"] == f"registry.example.com/ml/ftrecipe@{digest}"
    assert main["imagePullPolicy"] == "Always"
    assert main["args"] == [
        "--namespace",
        "ml-team-a",
        "--namespace",
        "ml-team-b",
        "--liveness",
        "http://0.0.0.0:8081/healthz",
        "--metrics-port",
        "9191",
        "--log-format",
        "text",
        "--peering",
        "ftrecipe-ha",
        "--reuse-bundles",
        "--resync-seconds",
        "30",
        "--stuck-pull-seconds",
        "120",
        "--stuck-secret-seconds",
        "90",
        "--stuck-unschedulable-seconds",
        "3600",
        "--stuck-queued-seconds",
        "86400",
        "--max-evictions",
        "5",
    ]
    env = env_of(objects)
    assert env["FTRECIPE_OPERATOR_IMAGE"] == "registry.example.com/ml/ftrecipe:0.1.0-rc1"
    assert env["FTRECIPE_TRAINER_IMAGE"] == "registry.example.com/ml/ftrecipe-trainer:0.1.0-rc1-flash"
    assert env["AWS_REGION"] == "eu-west-1"
    assert main["envFrom"] == [{"secretRef": {"name": "operator-s3"}}]
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == {"health": 8081, "metrics": 9191}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ftrecipe-operator"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert "podAntiAffinity" in pod["affinity"]
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "ml"
    sa = one(objects, "ServiceAccount")
    assert sa["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/ftrecipe-operator"
    }


@pytest.mark.parametrize("values", sorted(RENDERS))
def test_operator_command_line_parses(render: Render, values: str) -> None:
    """The rendered command is one `ftrecipe operator` accepts (the chart follows the CLI's flags)."""
    main = container(render(*RENDERS[values]))
    assert main["command"][0] == "ftrecipe"
    args = make_parser().parse_args([*main["command"][1:], *main["args"]])
    assert args.command == "operator"
    assert args.metrics_port == int(main["ports"][1]["containerPort"])
    assert args.liveness == f"http://0.0.0.0:{main['ports'][0]['containerPort']}/healthz"
    assert args.all_namespaces == (values != "all-options")
    assert (args.peering is None) == (values == "default") == args.standalone
    if values == "default":  # the chart's stuck-pod limits are the operator's own defaults
        defaults = make_parser().parse_args(["operator"])
        for name in ("stuck_pull_seconds", "stuck_secret_seconds", "stuck_unschedulable_seconds"):
            assert getattr(args, name) == getattr(defaults, name), name
        assert (args.stuck_queued_seconds, args.max_evictions) == (
            defaults.stuck_queued_seconds,
            defaults.max_evictions,
        )


def test_tag_defaults_to_app_version_and_digest_wins(render: Render) -> None:
    assert container(render("--set", "image.tag=9.9.9"))["image"] == "ghcr.io/ftrecipe/ftrecipe:9.9.9"
    digest = "sha256:" + "a" * 64
    assert (
        container(render("--set", f"image.digest={digest}"))["image"] == f"ghcr.io/ftrecipe/ftrecipe@{digest}"
    )
    # The data-preparation Jobs follow the operator image unless set.
    assert (
        env_of(render("--set", "image.tag=9.9.9"))["FTRECIPE_OPERATOR_IMAGE"]
        == "ghcr.io/ftrecipe/ftrecipe:9.9.9"
    )


@pytest.mark.parametrize("values", sorted(RENDERS))
def test_restricted_security_context(render: Render, values: str) -> None:
    objects = render(*RENDERS[values])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": NON_ROOT_ID,
        "runAsGroup": NON_ROOT_ID,
        "fsGroup": NON_ROOT_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container(objects)["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert {"name": "tmp", "mountPath": "/tmp"} in container(objects)["volumeMounts"]
    assert "resources" in container(objects)


def test_peering_with_one_replica(render: Render) -> None:
    objects = render("--set", "peering.enabled=true")
    args = container(objects)["args"]
    assert "--standalone" not in args
    assert args[args.index("--peering") + 1] == "ftrecipe-ftrecipe-operator"
    # The operator creates its peering object (tests/test_operator_process.py); the chart ships none.
    assert not {"ClusterKopfPeering", "KopfPeering"} & set(kinds(objects))


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_service_and_service_monitor(render: Render) -> None:
    objects = render(*RENDERS["all-options"])
    service = one(objects, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9191, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert "ServiceMonitor" not in kinds(render())
    assert "Service" not in kinds(render("--set", "metrics.service.enabled=false"))


# ------------------------------------------------------------------------------------------ NOTES.txt


def test_notes_tell_how_to_apply_the_example(helm: Path, helm_env: dict[str, str], tmp_path: Path) -> None:
    # `helm template` does not render NOTES.txt and `helm install --dry-run` needs a cluster, so the test
    # renders a copy of the chart in which NOTES.txt is a named template shown through a ConfigMap.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "notes" -}}\n' + notes + "{{- end }}\n")
    (chart / "templates" / "notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ include "notes" . | toJson }}\n'
    )
    for args, target in (((), "my-namespace"), (("-f", str(ALL_OPTIONS)), "ml-team-a")):
        out = run_helm(
            helm,
            helm_env,
            "template",
            "ftrecipe",
            chart,
            "-n",
            NAMESPACE,
            "--show-only",
            "templates/notes.yaml",
            *args,
        )
        text = yaml.safe_load(out.stdout)["data"]["notes"]
        assert f"kubectl -n {target} apply -f examples/recipes/minimal.yaml" in text
        assert f"kubectl -n {target} get finetunerecipes --watch" in text
    assert (ROOT / "examples" / "recipes" / "minimal.yaml").is_file()


# ------------------------------------------------------------------------------------------ Argo CD health


def recipe(status: Manifest | None, *, generation: int = 3, suspend: bool = False) -> Manifest:
    obj: Manifest = {
        "apiVersion": "ftrecipe.dev/v1alpha1",
        "kind": "FinetuneRecipe",
        "metadata": {"name": "minimal", "namespace": "ml", "generation": generation},
        "spec": {"suspend": suspend},
    }
    if status is not None:
        obj["status"] = status
    return obj


def status(phase: str, *, observed: int = 3, message: str | None = None) -> Manifest:
    ready = "True" if phase == "Succeeded" else "False"
    out: Manifest = {
        "phase": phase,
        "observedGeneration": observed,
        "conditions": [{"type": "Ready", "status": ready, "reason": phase, "observedGeneration": observed}],
    }
    if message is not None:
        out["message"] = message
    return out


# (recipe, Argo CD health status, Flux verdict)
HEALTH_CASES: dict[str, tuple[Manifest, str, str]] = {
    "no status": (recipe(None), "Progressing", "inProgress"),
    "empty status": (recipe({}), "Progressing", "inProgress"),
    "Pending": (recipe(status("Pending")), "Progressing", "inProgress"),
    "PreparingData": (
        recipe(status("PreparingData", message="labelling 40 tests")),
        "Progressing",
        "inProgress",
    ),
    "Training": (recipe(status("Training", message="step 120/900")), "Progressing", "inProgress"),
    "Evaluating": (recipe(status("Evaluating")), "Progressing", "inProgress"),
    "Succeeded": (recipe(status("Succeeded", message="adapter ready")), "Healthy", "current"),
    "Failed": (recipe(status("Failed", message="train Job failed: CUDA OOM")), "Degraded", "failed"),
    "Suspended": (recipe(status("Suspended"), suspend=True), "Suspended", "inProgress"),
    "spec.suspend observed before the phase": (
        recipe(status("Training"), suspend=True),
        "Suspended",
        "inProgress",
    ),
    "Succeeded stays healthy when suspended": (
        recipe(status("Succeeded"), suspend=True),
        "Healthy",
        "current",
    ),
    "Succeeded for an older generation": (
        recipe(status("Succeeded", observed=2)),
        "Progressing",
        "inProgress",
    ),
    "Failed for an older generation": (recipe(status("Failed", observed=2)), "Progressing", "inProgress"),
    "no observedGeneration": (recipe({"phase": "Succeeded"}), "Progressing", "inProgress"),
    "unknown phase": (recipe(status("Exploding")), "Unknown", "inProgress"),
}


def _to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return runtime.table_from({k: _to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, v) for v in value])
    return value


def argocd_health(obj: Manifest) -> dict[str, str]:
    """Run health.lua the way Argo CD does: `obj` is a global, the script returns {status, message}."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = _to_lua(runtime, obj)
    result = runtime.execute(HEALTH_LUA.read_text())
    return dict(result.items())


@pytest.mark.parametrize(("obj", "expected", "_flux"), HEALTH_CASES.values(), ids=HEALTH_CASES.keys())
def test_argocd_health_check(obj: Manifest, expected: str, _flux: str) -> None:
    health = argocd_health(obj)
    assert health["status"] == expected
    assert set(health) == {"status", "message"} and health["message"]
    current = (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]
    if current and obj["status"].get("message") and expected != "Unknown":
        assert health["message"] == obj["status"]["message"]


def test_every_phase_has_a_health_case() -> None:
    phases = {"Pending", "PreparingData", "Training", "Evaluating", "Succeeded", "Failed", "Suspended"}
    assert phases <= set(HEALTH_CASES)
    crd = yaml.safe_load(CRD_SOURCE.read_text())
    status_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert "observedGeneration" in status_schema["properties"]
    assert "phase" in status_schema["properties"]


def _yaml_blocks(markdown: str) -> list[Any]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", markdown, flags=re.DOTALL)]


def test_health_check_is_embedded_verbatim() -> None:
    lua = HEALTH_LUA.read_text()
    docs = [b for b in _yaml_blocks((ROOT / "docs" / "install.md").read_text()) if isinstance(b, dict)]
    embedded = [b["data"][HEALTH_KEY] for b in docs if HEALTH_KEY in (b.get("data") or {})]
    assert embedded == [lua], "docs/install.md must embed charts/ftrecipe-operator/argocd/health.lua verbatim"
    example = yaml.safe_load((GITOPS / "argocd" / "argocd-cm-health.yaml").read_text())
    assert example["data"][HEALTH_KEY] == lua
    assert "argocd/health.lua" in (CHART / "README.md").read_text()


# ------------------------------------------------------------------------------------------ Flux health


def flux_expressions() -> Manifest:
    docs = list(yaml.safe_load_all((GITOPS / "flux" / "kustomizations.yaml").read_text()))
    recipes = next(d for d in docs if d["metadata"]["name"] == "ftrecipe-recipes")
    (check,) = recipes["spec"]["healthCheckExprs"]
    assert (check["apiVersion"], check["kind"]) == ("ftrecipe.dev/v1alpha1", "FinetuneRecipe")
    return check


def flux_verdicts(obj: Manifest) -> set[str]:
    """Which of Flux's CEL health expressions hold for `obj` (the object's fields are the variables); an
    expression that cannot be evaluated (e.g. no status yet) counts as not holding, as Flux waits then."""
    environment = celpy.Environment()
    variables = {key: celpy.json_to_cel(value) for key, value in obj.items()}
    held = set()
    for verdict in ("inProgress", "failed", "current"):
        program = environment.program(environment.compile(flux_expressions()[verdict]))
        try:
            result = program.evaluate(variables)
        except celpy.CELEvalError:
            continue
        if isinstance(result, celpy.celtypes.BoolType) and bool(result):
            held.add(verdict)
    return held


def test_docs_show_the_tested_flux_expressions() -> None:
    docs = _yaml_blocks((ROOT / "docs" / "install.md").read_text())
    shown = [b["healthCheckExprs"] for b in docs if isinstance(b, dict) and "healthCheckExprs" in b]
    assert shown == [[flux_expressions()]]


@pytest.mark.parametrize(("obj", "_argocd", "expected"), HEALTH_CASES.values(), ids=HEALTH_CASES.keys())
def test_flux_health_expressions(obj: Manifest, _argocd: str, expected: str) -> None:
    verdicts = flux_verdicts(obj)
    if "status" in obj:
        assert verdicts == {expected}
    else:  # Flux cannot evaluate expressions on an absent status and keeps waiting: in progress
        assert verdicts <= {"inProgress"}


# ------------------------------------------------------------------------------------------ GitOps examples


def test_gitops_recipe_is_valid() -> None:
    recipes = sorted((GITOPS / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        loaded = load_recipe(path)
        assert loaded.metadata.namespace == "ml"
    crd = yaml.safe_load(CRD_SOURCE.read_text())
    for path in recipes:
        assert api_server_violations(crd, yaml.safe_load(path.read_text())) == []


def test_gitops_examples_point_at_this_repository_layout() -> None:
    operator_app = yaml.safe_load((GITOPS / "argocd" / "ftrecipe-operator.yaml").read_text())
    assert (ROOT / operator_app["spec"]["source"]["path"]) == CHART
    recipes_app = yaml.safe_load((GITOPS / "argocd" / "recipes.yaml").read_text())
    assert (ROOT / recipes_app["spec"]["source"]["path"]).is_dir()
    assert (
        recipes_app["spec"]["destination"]["namespace"]
        in operator_app["spec"]["source"]["helm"]["valuesObject"]["watch"]["namespaces"]
    )
    flux = list(yaml.safe_load_all((GITOPS / "flux" / "kustomizations.yaml").read_text()))
    for kustomization in (d for d in flux if d["kind"] == "Kustomization"):
        assert (ROOT / kustomization["spec"]["path"]).is_dir(), kustomization["spec"]["path"]
    release = yaml.safe_load((GITOPS / "flux" / "operator" / "helmrelease.yaml").read_text())
    assert (ROOT / release["spec"]["chart"]["spec"]["chart"]).resolve() == CHART
    schema = json.loads((CHART / "values.schema.json").read_text())
    for values in (release["spec"]["values"], operator_app["spec"]["source"]["helm"]["valuesObject"]):
        merged = {**yaml.safe_load((CHART / "values.yaml").read_text()), **values}
        merged["operator"] = {
            **yaml.safe_load((CHART / "values.yaml").read_text())["operator"],
            **values.get("operator", {}),
        }
        jsonschema.Draft7Validator(schema).validate(merged)


def test_gitops_builtin_objects_are_valid() -> None:
    builtin = 0
    for path in sorted(GITOPS.rglob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj["apiVersion"] == "v1":  # Namespace, ConfigMap; Argo CD and Flux kinds have no schema here
                kubernetes_validate.validate(obj, K8S_VERSIONS[0], strict=True)
                builtin += 1
    assert builtin == 2


# ------------------------------------------------------------------------------------------ namespaces


def test_watched_namespaces_are_created_only_when_asked(render: Render) -> None:
    assert "Namespace" not in kinds(
        render("--set", "watch.allNamespaces=false", "--set", "watch.namespaces={ml}")
    )
    created = [o for o in render(*RENDERS["all-options"]) if o["kind"] == "Namespace"]
    assert [o["metadata"]["name"] for o in created] == ["ml-team-a", "ml-team-b"]
    for namespace in created:
        assert namespace["metadata"]["annotations"] == KEEP  # a namespace holds recipes: never deleted
        assert "namespace" not in namespace["metadata"]


def test_existing_namespaces_are_left_to_their_owners(
    helm: Path, helm_env: dict[str, str], tmp_path: Path
) -> None:
    """Rendered against a cluster (`--dry-run=server`, what `helm install` and Flux do): a watched namespace
    that exists and is not this release's is not rendered (Helm would refuse to take it over and fail the
    install), one this release created stays rendered (else an upgrade would drop it), a missing one is
    created."""
    ours = {"meta.helm.sh/release-name": "ftrecipe", "meta.helm.sh/release-namespace": NAMESPACE}
    theirs = {"meta.helm.sh/release-name": "other", "meta.helm.sh/release-namespace": NAMESPACE}
    with KubeCluster(crds=(), namespaces=("default", "ml-plain")) as k8s:
        k8s.create("v1/namespaces", {"metadata": {"name": "ml-ours", "annotations": ours}})
        k8s.create("v1/namespaces", {"metadata": {"name": "ml-theirs", "annotations": theirs}})
        env = {**helm_env, "KUBECONFIG": str(k8s.kubeconfig(tmp_path / "kubeconfig"))}
        out = run_helm(
            helm,
            env,
            "template",
            "ftrecipe",
            CHART,
            "--namespace",
            NAMESPACE,
            "--dry-run=server",
            "--set",
            "watch.allNamespaces=false",
            "--set",
            "watch.namespaces={ml-plain,ml-ours,ml-theirs,ml-new}",
            "--set",
            "watch.createNamespaces=true",
        )
    objects = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"] == ["ml-ours", "ml-new"]
    # Every watched namespace still gets its Role and RoleBinding.
    roles = {o["metadata"]["namespace"] for o in objects if o["kind"] == "RoleBinding"}
    assert roles == {"ml-plain", "ml-ours", "ml-theirs", "ml-new"}


# ------------------------------------------------------------------------------------------ admission policy

POLICY_EXAMPLE = ROOT / "examples" / "policies" / "finetunerecipes-allowlist.yaml"


def admission_failures(policy: Manifest, recipe: Manifest) -> list[str]:
    """The messages of `policy`'s validations that `recipe` fails, evaluated as the API server does for a
    CREATE: the variables in order (each may use the ones before), then every validation."""
    environment = celpy.Environment()
    variables: dict[Any, Any] = {}

    def evaluate(expression: str) -> Any:
        activation = {"object": celpy.json_to_cel(recipe), "variables": celpy.celtypes.MapType(variables)}
        return environment.program(environment.compile(expression)).evaluate(activation)

    for variable in policy["spec"]["variables"]:
        variables[celpy.celtypes.StringType(variable["name"])] = evaluate(variable["expression"])
    return [
        check["message"] for check in policy["spec"]["validations"] if not bool(evaluate(check["expression"]))
    ]


def full_recipe(**spec_changes: Any) -> Manifest:
    manifest: Manifest = yaml.safe_load((ROOT / "examples" / "recipes" / "full.yaml").read_text())
    for dotted, value in spec_changes.items():
        *parents, last = dotted.split("__")
        node = manifest["spec"]
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return manifest


IMAGES_OK = {
    "operator": "registry.example.com/ml/ftrecipe:0.1.0",
    "trainer": "ghcr.io/ftrecipe/ftrecipe:0.1.0",
}
IMAGE_RULE = "spec.images may only name images under registry.example.com/ml/, ghcr.io/ftrecipe/ftrecipe:"
PRIORITY_RULE = (
    "spec.pods.priorityClassName and spec.training.priorityClassName may only be batch-cpu, batch-gpu"
)
ACCOUNT_RULE = "spec.pods.serviceAccountName may only be ftrecipe-jobs, default"

# (recipe, the messages the all-options policy answers with)
ADMISSION_CASES: dict[str, tuple[Manifest, list[str]]] = {
    "minimal: no images, no priority, default account": (
        yaml.safe_load((ROOT / "examples" / "recipes" / "minimal.yaml").read_text()),
        [],
    ),
    "allowed images, priorities and account": (full_recipe(images=IMAGES_OK), []),
    "no spec.images: the operator's images": (full_recipe(images=None), []),
    "images of another registry": (full_recipe(), [IMAGE_RULE]),
    "the trainer only from elsewhere": (
        full_recipe(images={"trainer": "docker.io/someone/trainer:latest"}),
        [IMAGE_RULE],
    ),
    "a look-alike host": (
        full_recipe(images={"operator": "registry.example.com.evil.io/ml/x:1"}),
        [IMAGE_RULE],
    ),
    "an allowed prefix inside another reference": (
        full_recipe(images={"operator": "evil.io/registry.example.com/ml/x:1"}),
        [IMAGE_RULE],
    ),
    "another repository under an allowed registry": (
        full_recipe(images={"trainer": "ghcr.io/ftrecipe/ftrecipe-trainer:0.1.0"}),
        [IMAGE_RULE],
    ),
    "a priority class for system pods": (
        full_recipe(images=IMAGES_OK, training__priorityClassName="system-cluster-critical"),
        [PRIORITY_RULE],
    ),
    "a priority class for the data pod": (
        full_recipe(images=IMAGES_OK, pods__priorityClassName="system-node-critical"),
        [PRIORITY_RULE],
    ),
    "no priority class at all": (
        full_recipe(images=IMAGES_OK, pods__priorityClassName=None, training__priorityClassName=None),
        [],
    ),
    "another service account": (
        full_recipe(images=IMAGES_OK, pods__serviceAccountName="ci-admin"),
        [ACCOUNT_RULE],
    ),
    "the default service account": (full_recipe(images=IMAGES_OK, pods__serviceAccountName="default"), []),
    "everything wrong": (
        full_recipe(pods__serviceAccountName="ci-admin", training__priorityClassName="high"),
        [IMAGE_RULE, PRIORITY_RULE, ACCOUNT_RULE],
    ),
}


def _policy(objects: list[Manifest]) -> Manifest:
    return one(objects, "ValidatingAdmissionPolicy")


@pytest.mark.parametrize(("recipe", "expected"), ADMISSION_CASES.values(), ids=ADMISSION_CASES.keys())
def test_admission_policy_allows_and_refuses(render: Render, recipe: Manifest, expected: list[str]) -> None:
    crd = yaml.safe_load(CRD_SOURCE.read_text())
    assert api_server_violations(crd, recipe) == []  # only the policy stands between it and the cluster
    assert admission_failures(_policy(render(*RENDERS["all-options"])), recipe) == expected


def test_admission_policy_matches_recipes_and_binds_the_watched_namespaces(render: Render) -> None:
    objects = render(*RENDERS["all-options"])
    policy, binding = _policy(objects), one(objects, "ValidatingAdmissionPolicyBinding")
    assert policy["spec"]["matchConstraints"]["resourceRules"] == [
        {
            "apiGroups": ["ftrecipe.dev"],
            "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["finetunerecipes"],  # not finetunerecipes/status: the operator's writes pass
        }
    ]
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Warn", "Audit"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["ml-team-a", "ml-team-b"]}
    ]
    everywhere = render(*RENDERS["all-options-all-namespaces"])
    assert "matchResources" not in one(everywhere, "ValidatingAdmissionPolicyBinding")["spec"]
    assert not SINCE_1_30 & set(kinds(render()))
    # Without the optional lists only the image rule is there.
    images_only = render(
        "--set", "admissionPolicy.enabled=true", "--set", "admissionPolicy.allowedImagePrefixes={r.io/ml/}"
    )
    assert [c["message"] for c in _policy(images_only)["spec"]["validations"]] == [
        "spec.images may only name images under r.io/ml/"
    ]
    no_priority = render(
        "--set",
        "admissionPolicy.enabled=true",
        "--set",
        "admissionPolicy.allowedImagePrefixes={r.io/ml/}",
        "--set-json",
        "admissionPolicy.allowedPriorityClasses=[]",
    )
    chosen = full_recipe(images={"operator": "r.io/ml/op:1"})
    assert admission_failures(_policy(no_priority), chosen) == [
        "spec.pods.priorityClassName and spec.training.priorityClassName may only be unset"
    ]


def test_policy_example_is_what_the_chart_renders(render: Render) -> None:
    example = list(yaml.safe_load_all(POLICY_EXAMPLE.read_text()))
    policy, binding = (
        one(example, kind) for kind in ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    )
    rendered = render(
        "--set",
        "admissionPolicy.enabled=true",
        "--set",
        "admissionPolicy.allowedImagePrefixes={registry.example.com/ml/,ghcr.io/ftrecipe/}",
        "--set-json",
        'admissionPolicy.allowedPriorityClasses=["batch-cpu","batch-gpu"]',
        "--set-json",
        'admissionPolicy.allowedServiceAccounts=["ftrecipe-jobs"]',
    )
    assert policy["spec"] == _policy(rendered)["spec"]
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    for obj in example:
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    assert admission_failures(policy, full_recipe()) == [
        "spec.images may only name images under registry.example.com/ml/, ghcr.io/ftrecipe/"
    ]
    assert admission_failures(policy, full_recipe(images=IMAGES_OK)) == []


def test_docs_show_the_tested_policy() -> None:
    shown = [
        block
        for block in _yaml_blocks((ROOT / "docs" / "install.md").read_text())
        if isinstance(block, dict) and block.get("kind", "").startswith("ValidatingAdmissionPolicy")
    ]
    assert shown == list(yaml.safe_load_all(POLICY_EXAMPLE.read_text()))


def test_docs_tell_how_to_adopt_a_crd_applied_by_hand() -> None:
    """The labels and annotations Helm checks before taking an existing object into a release."""
    text = (ROOT / "docs" / "install.md").read_text()
    assert "kubectl label crd finetunerecipes.ftrecipe.dev app.kubernetes.io/managed-by=Helm" in text
    assert "meta.helm.sh/release-name=ftrecipe meta.helm.sh/release-namespace=ftrecipe-system" in text
