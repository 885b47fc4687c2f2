"""`helm install` of the chart into the emulated cluster, with the commands docs/install.md shows.

The real helm binary talks to the kmock emulator (tests/support/k8s.py) as to an API server: discovery,
OpenAPI v3, the ownership check on objects that already exist, the objects it creates, and its release
record (a Secret, sent as protobuf). What is checked here is what a user meets on a cluster: a CRD applied
by hand stops the install until it is adopted with the documented labels and annotations, adopting it
leaves the recipes under it alone, and `watch.createNamespaces` creates the watched namespaces that are
missing and leaves the ones that exist to their owners.
"""

from __future__ import annotations

import json
import re
import shlex
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.helm import run_helm
from support.k8s import CRD, KubeCluster

ROOT = Path(__file__).resolve().parents[1]
INSTALL_DOC = ROOT / "docs" / "install.md"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"
RECIPES = CRD.resource
RELEASE, RELEASE_NAMESPACE = "ftrecipe", "ftrecipe-system"
# What `kubectl apply` adds to an object it creates (the CRD "applied by hand").
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
KEEP = {"helm.sh/resource-policy": "keep", "argocd.argoproj.io/sync-options": "Delete=false,Prune=false"}
OWNED_BY_RELEASE = {"meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": RELEASE_NAMESPACE}

Manifest = dict[str, Any]


# ------------------------------------------------------------------------------------ the docs' commands


def _bash_blocks(markdown: str) -> list[list[str]]:
    """The commands of every ```bash block, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands.append([line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()])
    return commands


def _section(markdown: str, title: str) -> str:
    start = markdown.index(f"\n{title}\n")
    end = markdown.find("\n#", start + len(title) + 2)
    return markdown[start : end if end != -1 else None]


def docs_helm_installs() -> list[list[str]]:
    """The `helm install` commands of docs/install.md's "Install" section, as argument lists."""
    section = _section(INSTALL_DOC.read_text(), "## Install")
    return [
        shlex.split(command)
        for block in _bash_blocks(section)
        for command in block
        if command.startswith("helm install ")
    ]


def docs_adoption_commands() -> list[list[str]]:
    """The commands of the first block of docs/install.md's "When the CRD is already there"."""
    section = _section(INSTALL_DOC.read_text(), "### When the CRD is already there")
    return [shlex.split(command) for command in _bash_blocks(section)[0]]


def kubectl_label_or_annotate(k8s: KubeCluster, argv: list[str]) -> None:
    """`kubectl label|annotate crd NAME KEY=VALUE... [--overwrite]` as kubectl sends it: a JSON merge patch
    of the object's labels or annotations. Anything else in the docs fails the test."""
    assert argv[:3] in (["kubectl", "label", "crd"], ["kubectl", "annotate", "crd"]), argv
    name, rest = argv[3], argv[4:]
    assert "--overwrite" in rest, f"without --overwrite kubectl refuses to change an existing key: {argv}"
    pairs = dict(item.split("=", 1) for item in rest if item != "--overwrite")
    assert pairs and all("=" not in key for key in pairs), argv
    field = "labels" if argv[1] == "label" else "annotations"
    request = urllib.request.Request(
        f"{k8s.url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}",
        data=json.dumps({"metadata": {field: pairs}}).encode(),
        headers={"Content-Type": "application/merge-patch+json"},
        method="PATCH",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def cluster_env(helm_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[KubeCluster, dict[str, str]]]:
    """An emulated cluster holding the CRD as `kubectl apply -f crds/` leaves it, and helm's env for it."""
    with KubeCluster(crds=(CRD,), namespaces=("default", "ml")) as k8s:
        manifest = yaml.safe_load(
            (ROOT / "crds" / "finetunerecipes.ftrecipe.dev.yaml").read_text(encoding="utf-8")
        )
        k8s.patch(CRDS, CRD.name, {"metadata": {"annotations": {LAST_APPLIED: json.dumps(manifest)}}})
        yield k8s, {**helm_env, "KUBECONFIG": str(k8s.kubeconfig(tmp_path / "kubeconfig"))}


def helm_install(helm: Path, env: dict[str, str], argv: list[str], *, check: bool = True) -> Any:
    assert argv[:2] == ["helm", "install"], argv
    return run_helm(helm, env, *argv[1:], check=check, cwd=ROOT)


def recipe(name: str) -> Manifest:
    body: Manifest = yaml.safe_load((ROOT / "examples" / "recipes" / "minimal.yaml").read_text())
    body["metadata"]["name"] = name
    return body


# ------------------------------------------------------------------------------------ a CRD applied by hand


def test_docs_install_commands_are_the_tested_ones() -> None:
    assert docs_helm_installs() == [
        ["helm", "install", "ftrecipe", "charts/ftrecipe-operator", "--namespace", "ftrecipe-system",
         "--create-namespace"],
        ["helm", "install", "ftrecipe", "charts/ftrecipe-operator", "--namespace", "ftrecipe-system",
         "--create-namespace", "--set", "watch.allNamespaces=false", "--set", "watch.namespaces={ml,ml-staging}",
         "--set", "watch.createNamespaces=true"],
    ]  # fmt: skip
    assert docs_adoption_commands() == [
        ["kubectl", "label", "crd", "finetunerecipes.ftrecipe.dev", "app.kubernetes.io/managed-by=Helm",
         "--overwrite"],
        ["kubectl", "annotate", "crd", "finetunerecipes.ftrecipe.dev", "--overwrite",
         "meta.helm.sh/release-name=ftrecipe", "meta.helm.sh/release-namespace=ftrecipe-system"],
    ]  # fmt: skip


def test_install_stops_at_a_crd_applied_by_hand(
    helm: Path, cluster_env: tuple[KubeCluster, dict[str, str]]
) -> None:
    k8s, env = cluster_env
    before = k8s.get(CRDS, CRD.name)
    out = helm_install(helm, env, docs_helm_installs()[0], check=False)
    assert out.returncode == 1
    assert (
        "Error: INSTALLATION FAILED: Unable to continue with install: CustomResourceDefinition "
        '"finetunerecipes.ftrecipe.dev" in namespace "" exists and cannot be imported into the current '
        "release: invalid ownership metadata; label validation error: missing key "
        '"app.kubernetes.io/managed-by": must be set to "Helm"; annotation validation error: missing key '
        '"meta.helm.sh/release-name": must be set to "ftrecipe"; annotation validation error: missing key '
        '"meta.helm.sh/release-namespace": must be set to "ftrecipe-system"'
    ) in out.stderr
    assert k8s.get(CRDS, CRD.name) == before
    assert k8s.list("apps/v1/deployments", namespace=RELEASE_NAMESPACE) == []
    assert k8s.list("v1/secrets", namespace=RELEASE_NAMESPACE) == []  # no release record either


def test_adopted_crd_installs_and_keeps_the_recipes(
    helm: Path, cluster_env: tuple[KubeCluster, dict[str, str]]
) -> None:
    k8s, env = cluster_env
    stored = [k8s.create(RECIPES, recipe(name), namespace="ml") for name in ("first", "second")]
    for argv in docs_adoption_commands():
        kubectl_label_or_annotate(k8s, argv)

    helm_install(helm, env, docs_helm_installs()[0])

    crd = k8s.get(CRDS, CRD.name)
    assert crd is not None
    assert crd["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "Helm",
        "app.kubernetes.io/instance": "ftrecipe",
        "app.kubernetes.io/name": "ftrecipe",  # the CRD's own (crds/), kept by the chart
        "app.kubernetes.io/component": "operator",
        "app.kubernetes.io/part-of": "ftrecipe",
        "app.kubernetes.io/version": "0.1.0",
        "helm.sh/chart": "ftrecipe-operator-0.1.0",
    }
    assert {k: v for k, v in crd["metadata"]["annotations"].items() if k != LAST_APPLIED} == {
        **OWNED_BY_RELEASE,
        **KEEP,
    }
    assert k8s.list(RECIPES, namespace="ml") == stored  # same objects, same resourceVersions
    assert [d["metadata"]["name"] for d in k8s.list("apps/v1/deployments", namespace=RELEASE_NAMESPACE)] == [
        "ftrecipe-ftrecipe-operator"
    ]
    listed = run_helm(helm, env, "list", "--namespace", RELEASE_NAMESPACE, "--output", "json")
    assert [(r["name"], r["status"]) for r in json.loads(listed.stdout)] == [("ftrecipe", "deployed")]


def test_take_ownership_adopts_the_crd_without_the_labels_first(
    helm: Path, cluster_env: tuple[KubeCluster, dict[str, str]]
) -> None:
    """docs/install.md: Helm 3.17 and later can adopt at install time with `--take-ownership`."""
    k8s, env = cluster_env
    stored = k8s.create(RECIPES, recipe("kept"), namespace="ml")
    helm_install(helm, env, [*docs_helm_installs()[0], "--take-ownership"])
    crd = k8s.get(CRDS, CRD.name)
    assert crd is not None
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert {k: crd["metadata"]["annotations"][k] for k in OWNED_BY_RELEASE} == OWNED_BY_RELEASE
    assert k8s.list(RECIPES, namespace="ml") == [stored]


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (payloads here are shorter than 128 bytes)."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_emulator_refuses_protobuf_it_does_not_decode() -> None:
    """The emulator decodes a Secret's fields from protobuf (what helm's release storage sends); any other
    kind, or a field it does not know, is refused with 415 instead of being stored half-read."""
    secret_meta = _field(1, b"s") + _field(11, _field(1, b"owner") + _field(2, b"helm"))
    secret = (
        _field(1, secret_meta)
        + _field(2, _field(1, b"release") + _field(2, b"\x00\xff"))
        + _field(3, b"Opaque")
    )
    configmap = _field(1, _field(1, b"v1") + _field(2, b"ConfigMap")) + _field(2, _field(1, _field(1, b"c")))
    odd_secret = _field(1, _field(1, b"v1") + _field(2, b"Secret")) + _field(2, _field(1, _field(13, b"x")))

    def post(kind: str, body: bytes) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"{k8s.url}/api/v1/namespaces/default/{kind}",
            data=b"k8s\x00" + body,
            headers={"Content-Type": "application/vnd.kubernetes.protobuf", "Accept": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    with KubeCluster(crds=()) as k8s:
        code, stored = post("secrets", _field(1, _field(1, b"v1") + _field(2, b"Secret")) + _field(2, secret))
        assert code == 201, stored
        assert stored["metadata"]["labels"] == {"owner": "helm"}
        assert (stored["type"], stored["data"]) == ("Opaque", {"release": "AP8="})
        code, status = post("configmaps", configmap)
        assert (code, status["reason"]) == (415, "UnsupportedMediaType"), status
        assert "decodes only v1 Secrets from protobuf" in status["message"]
        code, status = post("secrets", odd_secret)
        assert (code, status["reason"]) == (415, "UnsupportedMediaType"), status
        assert "ObjectMeta field 13" in status["message"]  # ownerReferences: not decoded, so refused


# ------------------------------------------------------------------------------------ watched namespaces


@pytest.mark.parametrize("existing", [(), ("ml-staging",), ("ml", "ml-staging")], ids=["none", "one", "both"])
def test_install_creates_the_missing_watched_namespaces(
    helm: Path, helm_env: dict[str, str], tmp_path: Path, existing: tuple[str, ...]
) -> None:
    """The docs' `watch.createNamespaces` command: missing namespaces are created (and kept), ones that
    exist (someone else's) are left as they are; every watched namespace gets its RoleBinding."""
    watched = ("ml", "ml-staging")
    with KubeCluster(crds=(), namespaces=("default", *existing)) as k8s:  # a fresh cluster: no CRD yet
        env = {**helm_env, "KUBECONFIG": str(k8s.kubeconfig(tmp_path / "kubeconfig"))}
        before = {name: k8s.get("v1/namespaces", name) for name in existing}

        helm_install(helm, env, docs_helm_installs()[1])

        for name in watched:
            namespace = k8s.get("v1/namespaces", name)
            assert namespace is not None, name
            if name in existing:
                assert namespace == before[name]
            else:
                assert namespace["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
                assert namespace["metadata"]["annotations"] == {**OWNED_BY_RELEASE, **KEEP}
            bindings = k8s.list("rbac.authorization.k8s.io/v1/rolebindings", namespace=name)
            assert [b["metadata"]["name"] for b in bindings] == ["ftrecipe-ftrecipe-operator"], name

        # An upgrade still renders the namespaces this release created (the chart's lookup finds them ours),
        # and still leaves the others out.
        run_helm(
            helm, env, "upgrade", RELEASE, "charts/ftrecipe-operator", "--namespace", RELEASE_NAMESPACE,
            "--reuse-values", cwd=ROOT,
        )  # fmt: skip
        manifest = run_helm(helm, env, "get", "manifest", RELEASE, "--namespace", RELEASE_NAMESPACE).stdout
        rendered = [
            o["metadata"]["name"] for o in yaml.safe_load_all(manifest) if o and o["kind"] == "Namespace"
        ]
        assert rendered == [name for name in watched if name not in existing]
        assert all(k8s.get("v1/namespaces", name) is not None for name in watched)
