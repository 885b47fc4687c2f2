"""Smoke tests of the ``k8s`` fixture: the emulated API behaves like Kubernetes where the operator relies on it."""

from __future__ import annotations

import copy
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import kmock
import kopf
import kubernetes.client
import kubernetes.config
import kubernetes.watch
import pytest
from kubernetes.client.exceptions import ApiException

from support.k8s import (
    CRD_GROUP,
    CRD_KIND,
    CRD_PLURAL,
    CRD_RESOURCE,
    CRD_VERSION,
    K8s,
    _sees,
    operator_settings,
)

Body = dict[str, Any]
NAMESPACE = "team-a"
# A valid recipe (the CRD's schema prunes unknown fields, as the API server does).
SPEC: dict[str, Any] = {
    "assistant": {"source": {"git": {"url": "https://github.com/example-org/support-assistant.git"}}},
    "commandGenerator": {"llm": {"model": "gpt-4o-2024-11-20"}},
    "training": {"baseModel": {"huggingFace": {"id": "meta-llama/Llama-3.1-8B-Instruct"}}},
    "output": {"s3": {"uri": "s3://ml-artifacts/ftrecipe/"}},
}


def recipe(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{CRD_GROUP}/{CRD_VERSION}",
        "kind": CRD_KIND,
        "metadata": {"name": name},
        "spec": {**copy.deepcopy(SPEC), **spec},
    }


def create_recipe(k8s: K8s, name: str, **spec: Any) -> Body:
    return cast(
        Body,
        k8s.custom.create_namespaced_custom_object(
            CRD_GROUP, CRD_VERSION, NAMESPACE, CRD_PLURAL, recipe(name, **spec)
        ),
    )


def read_recipe(k8s: K8s, name: str) -> Body:
    return cast(
        Body, k8s.custom.get_namespaced_custom_object(CRD_GROUP, CRD_VERSION, NAMESPACE, CRD_PLURAL, name)
    )


def patch_recipe(k8s: K8s, name: str, patch: Body, *, status: bool = False) -> Body:
    api = k8s.custom
    fn = api.patch_namespaced_custom_object_status if status else api.patch_namespaced_custom_object
    return cast(Body, fn(CRD_GROUP, CRD_VERSION, NAMESPACE, CRD_PLURAL, name, patch))


def test_create_read_list_with_server_metadata(k8s: K8s) -> None:
    k8s.ensure_namespace(NAMESPACE)
    created = create_recipe(k8s, "r1")
    assert created is not None, "create must answer 201 with the object"

    got = read_recipe(k8s, "r1")
    meta = got["metadata"]
    assert meta["namespace"] == NAMESPACE
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
    assert meta["generation"] == 1
    assert got["apiVersion"] == f"{CRD_GROUP}/{CRD_VERSION}" and got["kind"] == CRD_KIND

    listed = cast(
        Body, k8s.custom.list_namespaced_custom_object(CRD_GROUP, CRD_VERSION, NAMESPACE, CRD_PLURAL)
    )
    assert listed["kind"] == f"{CRD_KIND}List"
    assert listed["apiVersion"] == f"{CRD_GROUP}/{CRD_VERSION}"
    assert [item["metadata"]["name"] for item in listed["items"]] == ["r1"]
    assert int(listed["metadata"]["resourceVersion"]) >= int(meta["resourceVersion"])

    with pytest.raises(ApiException) as conflict:
        create_recipe(k8s, "r1")
    assert conflict.value.status == 409
    with pytest.raises(ApiException) as missing:
        read_recipe(k8s, "nope")
    assert missing.value.status == 404

    # The CRD's schema is enforced like the API server does: OpenAPI (required fields), then CEL rules.
    with pytest.raises(ApiException) as invalid:
        k8s.custom.create_namespaced_custom_object(
            CRD_GROUP, CRD_VERSION, NAMESPACE, CRD_PLURAL, {**recipe("bad"), "spec": {"suspend": True}}
        )
    assert invalid.value.status == 422 and "required" in str(invalid.value.body)
    two_sources = {"git": {"url": "https://example.com/a.git"}, "configMap": {"name": "files"}}
    with pytest.raises(ApiException) as cel:
        create_recipe(k8s, "bad", assistant={"source": two_sources})
    assert cel.value.status == 422


def test_status_subresource_and_generation(k8s: K8s) -> None:
    k8s.ensure_namespace(NAMESPACE)
    created = create_recipe(k8s, "r2")
    rv0 = int(created["metadata"]["resourceVersion"])

    # The status subresource changes only status; generation stays.
    after_status = patch_recipe(
        k8s, "r2", {"status": {"phase": "Pending"}, "spec": {"suspend": True}}, status=True
    )
    assert after_status["status"]["phase"] == "Pending"
    assert after_status["spec"]["suspend"] is False
    assert after_status["metadata"]["generation"] == 1
    rv1 = int(after_status["metadata"]["resourceVersion"])
    assert rv1 > rv0

    # The main resource never changes status; a spec change bumps generation.
    after_spec = patch_recipe(k8s, "r2", {"spec": {"suspend": True}, "status": {"phase": "Failed"}})
    assert after_spec["spec"]["suspend"] is True
    assert after_spec["status"]["phase"] == "Pending"
    assert after_spec["metadata"]["generation"] == 2
    rv2 = int(after_spec["metadata"]["resourceVersion"])
    assert rv2 > rv1

    # Metadata-only changes keep generation; a no-op write keeps even the resourceVersion.
    after_labels = patch_recipe(k8s, "r2", {"metadata": {"labels": {"team": "a"}}})
    assert after_labels["metadata"]["generation"] == 2
    assert int(after_labels["metadata"]["resourceVersion"]) > rv2
    again = patch_recipe(k8s, "r2", {"metadata": {"labels": {"team": "a"}}})
    assert again["metadata"]["resourceVersion"] == after_labels["metadata"]["resourceVersion"]

    # Status writes are validated too (phase is an enum); unknown status fields are pruned.
    with pytest.raises(ApiException) as invalid:
        patch_recipe(k8s, "r2", {"status": {"phase": "Cooking"}}, status=True)
    assert invalid.value.status == 422
    pruned = patch_recipe(k8s, "r2", {"status": {"somethingElse": 1}}, status=True)
    assert "somethingElse" not in pruned["status"]

    # A stale resourceVersion is a conflict, as kopf and controllers expect.
    with pytest.raises(ApiException) as stale:
        patch_recipe(k8s, "r2", {"metadata": {"resourceVersion": str(rv0)}, "spec": {"suspend": False}})
    assert stale.value.status == 409


def test_kopf_sees_creation_and_adopts_a_job(k8s: K8s) -> None:
    registry = kopf.OperatorRegistry()
    seen = threading.Event()

    @kopf.on.create(CRD_GROUP, CRD_VERSION, CRD_PLURAL, registry=registry)
    def create_fn(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        job: dict[str, Any] = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": f"{body.metadata.name}-train"},
            "spec": {
                "template": {
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "train", "image": "busybox"}]}
                }
            },
        }
        kopf.adopt(job, owner=body)
        # No api_client argument: the fixture installed the emulator as the client's default.
        kubernetes.client.BatchV1Api().create_namespaced_job(body.metadata.namespace, job)  # type: ignore[arg-type]
        patch.status["phase"] = "Pending"
        seen.set()

    with k8s.run_operator(registry, namespaces=[NAMESPACE]) as operator:
        owner = create_recipe(k8s, "r3")
        k8s.wait_for(
            lambda: read_recipe(k8s, "r3").get("status", {}).get("phase") == "Pending",
            message="status.phase == Pending",
        )
        assert seen.is_set()

    assert not operator.errors, operator.messages()
    # Read back through the typed client: its models refuse ownerReferences without a uid.
    meta = k8s.batch.read_namespaced_job("r3-train", NAMESPACE).metadata
    assert meta is not None and meta.uid and meta.resource_version
    (ref,) = meta.owner_references or []
    assert ref.uid == owner["metadata"]["uid"]
    assert (ref.kind, ref.name, ref.controller) == (CRD_KIND, "r3", True)

    # No Job controller runs: tests play it. The typed client reads the terminal condition back.
    k8s.set_job_status("r3-train", NAMESPACE, "succeeded")
    status = k8s.batch.read_namespaced_job_status("r3-train", NAMESPACE).status
    assert status is not None and status.succeeded == 1
    assert [c.type for c in status.conditions or []] == ["SuccessCriteriaMet", "Complete"]

    # Kubernetes' garbage collector: deleting the owner deletes the Job (emulated synchronously).
    k8s.custom.delete_namespaced_custom_object(CRD_GROUP, CRD_VERSION, NAMESPACE, CRD_PLURAL, "r3")
    assert k8s.get("batch/v1/jobs", "r3-train", NAMESPACE) is None


def test_kopf_reacts_to_spec_changes_only(k8s: K8s) -> None:
    registry = kopf.OperatorRegistry()
    spec_updates: list[Any] = []

    @kopf.on.create(CRD_GROUP, CRD_VERSION, CRD_PLURAL, registry=registry)
    def created(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        kopf.info(body, reason="Accepted", message="recipe accepted")
        patch.status["phase"] = "Pending"

    @kopf.on.update(CRD_GROUP, CRD_VERSION, CRD_PLURAL, registry=registry, field="spec")
    def updated(new: Any, meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
        spec_updates.append(new)
        patch.status["observedGeneration"] = meta["generation"]

    with k8s.run_operator(
        registry, namespaces=[NAMESPACE], watching=[CRD_RESOURCE], posting=True
    ) as operator:
        create_recipe(k8s, "r4")
        k8s.wait_for(lambda: read_recipe(k8s, "r4").get("status", {}).get("phase") == "Pending")

        patch_recipe(k8s, "r4", {"spec": {"suspend": True}})
        body = k8s.wait_for(
            lambda: (b := read_recipe(k8s, "r4")).get("status", {}).get("observedGeneration") == 2 and b,
            message="observedGeneration == 2",
        )
        assert body["metadata"]["generation"] == 2
        assert [update["suspend"] for update in spec_updates] == [True]
        (event,) = k8s.wait_for(lambda: k8s.events(NAMESPACE), message="a posted k8s Event")
        assert (event["reason"], event["involvedObject"]["name"]) == ("Accepted", "r4")

    assert not operator.errors, operator.messages()


def test_helpers_and_watch_resume(k8s: K8s) -> None:
    """The sync helpers and a raw watch resumed from a resourceVersion see every later event."""
    k8s.ensure_namespace(NAMESPACE)
    first = k8s.create(CRD_RESOURCE, recipe("r5"), NAMESPACE)
    since = first["metadata"]["resourceVersion"]
    k8s.patch(CRD_RESOURCE, "r5", {"status": {"phase": "Training"}}, NAMESPACE, subresource="status")
    phases = [(v or {}).get("status", {}).get("phase") for v in k8s.history(CRD_RESOURCE, "r5", NAMESPACE)]
    assert phases == [None, "Training"]
    k8s.create("v1/configmaps", {"metadata": {"generateName": "cm-", "labels": {"app": "x"}}}, NAMESPACE)
    assert [
        cm["metadata"]["name"][:3] for cm in k8s.list("v1/configmaps", NAMESPACE, label_selector="app=x")
    ] == ["cm-"]

    # The fixture's KUBECONFIG points at the emulator too (for load_kube_config(), helm, kubectl).
    from_kubeconfig = kubernetes.config.new_client_from_config()  # type: ignore[no-untyped-call]
    namespace = kubernetes.client.CoreV1Api(from_kubeconfig).read_namespace(NAMESPACE)
    assert namespace.status is not None and namespace.status.phase == "Active"
    from_kubeconfig.close()

    watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
    events = []
    for event in watch.stream(  # type: ignore[no-untyped-call]
        k8s.custom.list_namespaced_custom_object,
        CRD_GROUP,
        CRD_VERSION,
        NAMESPACE,
        CRD_PLURAL,
        resource_version=since,
        timeout_seconds=1,
    ):
        events.append((event["type"], event["object"].get("status", {}).get("phase")))
    assert events == [("MODIFIED", "Training")]


def test_kopf_finalizers_and_watch_reconnects(k8s: K8s) -> None:
    """Deletion through kopf's finalizer (JSON-patch with a resourceVersion test), across many re-watches."""
    registry = kopf.OperatorRegistry()
    gpus: list[int] = []
    deleted: list[str] = []

    @kopf.on.update(CRD_GROUP, CRD_VERSION, CRD_PLURAL, registry=registry, field="spec.training.gpus")
    def updated(new: Any, **_: Any) -> None:
        gpus.append(new)

    @kopf.on.delete(CRD_GROUP, CRD_VERSION, CRD_PLURAL, registry=registry)
    def gone(name: str, **_: Any) -> None:
        deleted.append(name)

    settings = operator_settings()
    settings.watching.server_timeout = 0.2  # the emulator ends each watch quickly; kopf resumes from its RV
    with k8s.run_operator(registry, namespaces=[NAMESPACE], settings=settings) as operator:
        create_recipe(k8s, "r6")
        k8s.wait_for_object(
            CRD_RESOURCE, "r6", NAMESPACE, where=lambda b: bool(b["metadata"].get("finalizers"))
        )
        for count in range(2, 6):
            time.sleep(0.1)  # some changes land between two watch requests
            patch_recipe(k8s, "r6", {"spec": {"training": {"gpus": count}}})
        k8s.wait_for(lambda: gpus[-1:] == [5], message="the last spec change")
        # Under load kopf may merge quick successive changes into one; it never repeats or reorders them.
        assert gpus == sorted(set(gpus)), gpus

        k8s.custom.delete_namespaced_custom_object(CRD_GROUP, CRD_VERSION, NAMESPACE, CRD_PLURAL, "r6")
        k8s.wait_for(lambda: k8s.get(CRD_RESOURCE, "r6", NAMESPACE) is None, message="r6 to be gone")
        assert deleted == ["r6"]
    assert not operator.errors, operator.messages()


def test_operator_failures_surface_fast(k8s: K8s) -> None:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def fail(**_: Any) -> None:
        raise kopf.PermanentError("cannot start")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited before it was ready"), k8s.run_operator(registry):
        pass
    assert time.monotonic() - started < 3


def test_operator_from_a_module(k8s: K8s, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module's `@kopf.on...` handlers go into a fresh registry each run, never into the global one."""
    (tmp_path / "k8s_fixture_handlers.py").write_text(
        "import kopf\n"
        f"@kopf.on.create({CRD_GROUP!r}, {CRD_VERSION!r}, {CRD_PLURAL!r})\n"
        "def created(patch, **_):\n"
        "    patch.status['phase'] = 'Pending'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("m1", "m2"):  # the second run re-imports the module into its own registry
        with k8s.run_operator("k8s_fixture_handlers", namespaces=[NAMESPACE]):
            create_recipe(k8s, name)
            k8s.wait_for(lambda n=name: read_recipe(k8s, n).get("status", {}).get("phase") == "Pending")  # type: ignore[misc]
    assert not list(kopf.get_default_registry()._changing.get_all_handlers())
    sys.modules.pop("k8s_fixture_handlers", None)


class _CountingRequests(list[kmock.Request]):
    """The emulator's request history, counting the requests each scan of it hands out."""

    visited = 0

    def __iter__(self) -> Iterator[kmock.Request]:
        for request in super().__iter__():
            self.visited += 1
            yield request

    def __reversed__(self) -> Iterator[kmock.Request]:
        for request in super().__reversed__():
            self.visited += 1
            yield request


def test_a_request_costs_the_same_however_many_came_before(k8s: K8s) -> None:
    """kmock chose each request's reaction by scanning the whole request history once per reaction it
    tried: quadratic over a test (or a benchmark). The history is scanned no further than the request."""
    emulator = k8s.emulator

    async def count_scans() -> _CountingRequests:
        counting = _CountingRequests(emulator._requests)
        emulator._requests = counting
        return counting

    counting = k8s.call(count_scans)

    def scanned_by_one_read() -> int:
        before = counting.visited
        k8s.core.read_namespace("default")
        return counting.visited - before

    early = scanned_by_one_read()
    for _ in range(150):
        k8s.core.read_namespace("default")
    late = scanned_by_one_read()
    assert len(k8s.requests()) > 150
    assert early == late, f"reading an object scanned {early} requests, 150 requests later {late}"
    assert 0 < late <= len(emulator._payloads)  # at most one look at the newest request per reaction


def test_reactions_are_chosen_as_kmock_chooses_them(k8s: K8s) -> None:
    """`_sees` answers `request in view` as kmock does, for kmock's own reactions and for a test's
    reaction that injects an error once (a slice: kmock decides that one from the history)."""
    k8s.ensure_namespace(NAMESPACE)

    async def inject() -> None:
        k8s.emulator[f"get /api/v1/namespaces/{NAMESPACE}"][:1] << 503

    k8s.call(inject)
    with pytest.raises(ApiException) as injected:
        k8s.core.read_namespace(NAMESPACE)
    assert injected.value.status == 503
    served = k8s.core.read_namespace(NAMESPACE).metadata  # the next one is served
    assert served is not None and served.name == NAMESPACE
    create_recipe(k8s, "r7")
    patch_recipe(k8s, "r7", {"status": {"phase": "Pending"}}, status=True)
    k8s.custom.list_namespaced_custom_object(CRD_GROUP, CRD_VERSION, NAMESPACE, CRD_PLURAL)
    k8s.custom.delete_namespaced_custom_object(CRD_GROUP, CRD_VERSION, NAMESPACE, CRD_PLURAL, "r7")
    with pytest.raises(ApiException):
        read_recipe(k8s, "r7")
    for path in ("/apis", "/apis/batch/v1", "/version"):  # discovery: kmock's regex-filtered reactions
        with urllib.request.urlopen(k8s.url + path) as response:
            assert response.status == 200

    async def disagreements() -> list[tuple[str, str, bool]]:
        emulator = k8s.emulator
        return [
            (repr(payload._source), f"{request.method} {request.url}", seen)
            for payload in emulator._payloads
            for request in emulator._requests
            if (seen := _sees(payload._source, request)) != (request in payload._source)
        ]

    assert len(k8s.requests()) >= 9
    assert k8s.call(disagreements) == []


def test_cel_rules_run_once_per_spec(k8s: K8s) -> None:
    """celpy is slow: writes that leave the spec as it was reuse its verdict; a new spec is checked."""
    k8s.ensure_namespace(NAMESPACE)
    cel = k8s.emulator._cel[kmock.resource(CRD_RESOURCE)]
    before = cel.evaluations["spec"]
    create_recipe(k8s, "r8")
    create_recipe(k8s, "r9")  # the same spec as r8
    for index in range(3):
        patch_recipe(k8s, "r8", {"metadata": {"annotations": {"touched": str(index)}}})
        patch_recipe(k8s, "r8", {"status": {"observedGeneration": index}}, status=True)
    assert cel.evaluations["spec"] - before == 1

    patch_recipe(k8s, "r8", {"spec": {"suspend": True}})
    assert cel.evaluations["spec"] - before == 2
    two_sources = {"git": {"url": "https://example.com/a.git"}, "configMap": {"name": "files"}}
    for _ in range(2):  # rejected the first time, and again from the memo
        with pytest.raises(ApiException) as rejected:
            patch_recipe(k8s, "r8", {"spec": {"assistant": {"source": two_sources}}})
        assert rejected.value.status == 422 and "assistant.source" in str(rejected.value.body)
    assert cel.evaluations["spec"] - before == 3
    assert read_recipe(k8s, "r8")["spec"]["suspend"] is True


def test_a_dependent_created_after_its_owner_is_gone_is_collected(k8s: K8s) -> None:
    """The owner is looked up by its reference, and by its uid among all objects when that finds none."""
    k8s.ensure_namespace(NAMESPACE)
    owner = create_recipe(k8s, "r10")

    def job(job_name: str, kind: str = CRD_KIND, name: str = "r10") -> Body:
        reference = {"apiVersion": owner["apiVersion"], "kind": kind, "name": name}
        reference["uid"] = owner["metadata"]["uid"]
        body = {"metadata": {"name": job_name, "ownerReferences": [reference]}, "spec": {"template": {}}}
        return k8s.create("batch/v1/jobs", body, NAMESPACE)

    job("by-reference")
    job("by-uid", kind="KindTheEmulatorDoesNotServe", name="elsewhere")
    assert k8s.get("batch/v1/jobs", "by-reference", NAMESPACE) is not None
    assert k8s.get("batch/v1/jobs", "by-uid", NAMESPACE) is not None

    k8s.delete(CRD_RESOURCE, "r10", NAMESPACE)
    assert k8s.list("batch/v1/jobs", NAMESPACE) == []
    job("late")  # e.g. by an operator that had not seen the deletion yet
    assert k8s.get("batch/v1/jobs", "late", NAMESPACE) is None
    create_recipe(k8s, "r10")  # the same name, another uid: not the owner
    job("stale")
    assert k8s.get("batch/v1/jobs", "stale", NAMESPACE) is None


# ---- JobSet (kubernetes-sigs/jobset): served once installed, with its controller played by the emulator


JOBSETS = "jobset.x-k8s.io/v1alpha2/jobsets"


def jobset(name: str, *, nodes: int = 2, max_restarts: int = 2, suspend: bool = False) -> Body:
    """A JobSet like a multi-node training's: one replicated Job, Indexed, DNS hostnames, a failure policy
    that fails at once on a child Job failed by its podFailurePolicy and restarts otherwise."""
    pod = {"metadata": {"labels": {"app": "train"}}, "spec": {"restartPolicy": "Never", "containers": []}}
    pod["spec"]["containers"] = [{"name": "train", "image": "trainer:1"}]
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "labels": {"team": "a"}},
        "spec": {
            "suspend": suspend,
            "network": {"enableDNSHostnames": True},
            "failurePolicy": {
                "maxRestarts": max_restarts,
                "rules": [
                    {"name": "bad", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}
                ],
            },
            "replicatedJobs": [
                {
                    "name": "node",
                    "replicas": 1,
                    "template": {
                        "spec": {
                            "completionMode": "Indexed",
                            "parallelism": nodes,
                            "completions": nodes,
                            "backoffLimit": 0,
                            "template": pod,
                        }
                    },
                }
            ],
        },
    }


def conditions_of(body: Body | None) -> dict[str, tuple[str, str]]:
    return {
        c["type"]: (c["status"], c["reason"])
        for c in ((body or {}).get("status") or {}).get("conditions") or []
    }


def test_jobsets_are_served_only_once_installed(k8s: K8s) -> None:
    k8s.ensure_namespace(NAMESPACE)
    with pytest.raises(ApiException) as missing:
        k8s.custom.list_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", NAMESPACE, "jobsets")
    assert missing.value.status == 404
    with pytest.raises(ApiException) as refused:
        k8s.custom.create_namespaced_custom_object(
            "jobset.x-k8s.io", "v1alpha2", NAMESPACE, "jobsets", jobset("js")
        )
    assert refused.value.status == 404

    k8s.install_jobset()
    assert k8s.get("apiextensions.k8s.io/v1/customresourcedefinitions", "jobsets.jobset.x-k8s.io") is not None
    created = k8s.custom.create_namespaced_custom_object(
        "jobset.x-k8s.io", "v1alpha2", NAMESPACE, "jobsets", jobset("js")
    )
    assert created["metadata"]["uid"] and "status" not in created  # the status subresource
    listed = k8s.custom.list_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", NAMESPACE, "jobsets")
    assert [item["metadata"]["name"] for item in listed["items"]] == ["js"]


def test_the_jobset_controller_creates_its_child_job_service_and_indexed_pods(k8s: K8s) -> None:
    k8s.ensure_namespace(NAMESPACE)
    k8s.install_jobset()
    owner = k8s.create(JOBSETS, jobset("js", nodes=2), NAMESPACE)

    [child] = k8s.jobset_jobs("js", NAMESPACE)
    assert child["metadata"]["name"] == "js-node-0"
    assert child["metadata"]["ownerReferences"][0] | {} == {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "name": "js",
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    labels = child["spec"]["template"]["metadata"]["labels"]
    assert labels["app"] == "train"  # the template's own labels stay
    assert {
        k: labels[k] for k in labels if k != "jobset.sigs.k8s.io/job-key" and k.startswith("jobset.")
    } == {
        "jobset.sigs.k8s.io/jobset-name": "js",
        "jobset.sigs.k8s.io/jobset-uid": owner["metadata"]["uid"],
        "jobset.sigs.k8s.io/replicatedjob-name": "node",
        "jobset.sigs.k8s.io/replicatedjob-replicas": "1",
        "jobset.sigs.k8s.io/job-index": "0",
        "jobset.sigs.k8s.io/restart-attempt": "0",
    }
    assert child["spec"]["template"]["spec"]["subdomain"] == "js"
    assert child["spec"]["suspend"] is False and child["spec"]["completionMode"] == "Indexed"
    service = k8s.get("v1/services", "js", NAMESPACE)
    assert service is not None and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"jobset.sigs.k8s.io/jobset-name": "js"}

    # The Job controller's part, played by the test: pod 1 of the Indexed Job.
    k8s.set_job_pod("js-node-0", NAMESPACE, "Running", container="train", suffix="1-x7k2p")
    pod = k8s.get("v1/pods", "js-node-0-1-x7k2p", NAMESPACE)
    assert pod is not None
    assert pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1"
    assert pod["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"] == "js"
    assert (pod["spec"]["hostname"], pod["spec"]["subdomain"]) == ("js-node-0-1", "js")

    k8s.set_job_status("js-node-0", NAMESPACE, "running")
    body = k8s.get(JOBSETS, "js", NAMESPACE)
    assert body is not None and body["status"]["replicatedJobsStatus"][0]["active"] == 1
    assert body["status"]["restarts"] == 0 and "terminalState" not in body["status"]
    k8s.set_job_status("js-node-0", NAMESPACE, "succeeded")
    body = k8s.get(JOBSETS, "js", NAMESPACE)
    assert conditions_of(body)["Completed"] == ("True", "AllJobsCompleted")
    assert body is not None and body["status"]["terminalState"] == "Completed"

    k8s.delete(JOBSETS, "js", NAMESPACE)  # its child Job, pods and Service go with it
    assert k8s.jobset_jobs("js", NAMESPACE) == [] and k8s.list("v1/pods", NAMESPACE) == []
    assert k8s.get("v1/services", "js", NAMESPACE) is None


def test_a_failed_child_job_restarts_the_jobset_until_max_restarts(k8s: K8s) -> None:
    k8s.ensure_namespace(NAMESPACE)
    k8s.install_jobset()
    k8s.create(JOBSETS, jobset("js", max_restarts=2), NAMESPACE)
    first_uid = k8s.jobset_jobs("js", NAMESPACE)[0]["metadata"]["uid"]
    k8s.set_job_pod("js-node-0", NAMESPACE, "Failed", container="train", suffix="1-x7k2p")

    k8s.set_job_status("js-node-0", NAMESPACE, "failed")  # a lost node: restart 1 of 2
    body = k8s.get(JOBSETS, "js", NAMESPACE)
    assert body is not None and body["status"]["restarts"] == 1 and "Failed" not in conditions_of(body)
    [child] = k8s.jobset_jobs("js", NAMESPACE)
    assert child["metadata"]["uid"] != first_uid  # recreated, with the next attempt's label
    assert child["metadata"]["labels"]["jobset.sigs.k8s.io/restart-attempt"] == "1"
    assert child["spec"]["template"]["metadata"]["labels"]["jobset.sigs.k8s.io/restart-attempt"] == "1"
    assert "status" not in child
    assert k8s.get("v1/pods", "js-node-0-1-x7k2p", NAMESPACE) is None  # the old attempt's pods went

    k8s.set_job_status("js-node-0", NAMESPACE, "failed")
    body = k8s.get(JOBSETS, "js", NAMESPACE)
    assert body is not None and body["status"]["restarts"] == 2
    k8s.set_job_status("js-node-0", NAMESPACE, "failed")  # no restart left
    body = k8s.get(JOBSETS, "js", NAMESPACE)
    assert body is not None and body["status"]["restarts"] == 2
    assert conditions_of(body)["Failed"] == ("True", "ReachedMaxRestarts")
    assert body["status"]["terminalState"] == "Failed"
    failed = next(c for c in body["status"]["conditions"] if c["type"] == "Failed")
    assert (
        failed["message"]
        == "jobset failed due to reaching max number of restarts (first failed job: js-node-0)"
    )
    [child] = k8s.jobset_jobs("js", NAMESPACE)  # the failed child Job stays, for its pods' reports
    assert child["metadata"]["labels"]["jobset.sigs.k8s.io/restart-attempt"] == "2"


def test_a_failure_policy_rule_fails_the_jobset_at_once(k8s: K8s) -> None:
    k8s.ensure_namespace(NAMESPACE)
    k8s.install_jobset()
    k8s.create(JOBSETS, jobset("js", max_restarts=3), NAMESPACE)
    k8s.set_job_status("js-node-0", NAMESPACE, "failed", reason="PodFailurePolicy")
    body = k8s.get(JOBSETS, "js", NAMESPACE)
    assert body is not None and body["status"]["restarts"] == 0
    assert conditions_of(body)["Failed"] == ("True", "FailJobSetFailurePolicyAction")


def test_message_patterns_pick_the_rule_and_an_ignored_restart_is_not_counted(k8s: K8s) -> None:
    """As JobSet v0.10.0+ (pkg/controllers/failure_policy.go): a rule needs its reason and one of its
    onJobFailureMessagePatterns (a regex found anywhere in the Job's failure message; one that does not
    compile is skipped); RestartJobSetAndIgnoreMaxRestarts restarts without restartsCountTowardsMax."""
    k8s.ensure_namespace(NAMESPACE)
    k8s.install_jobset()
    body = jobset("js", max_restarts=1)
    body["spec"]["failurePolicy"]["rules"] = [
        {
            "name": "bad",
            "action": "FailJobSet",
            "onJobFailureReasons": ["PodFailurePolicy"],
            "onJobFailureMessagePatterns": ["exit (2", "exit code 2 matching"],
        },
        {
            "name": "preempted",
            "action": "RestartJobSetAndIgnoreMaxRestarts",
            "onJobFailureReasons": ["PodFailurePolicy"],
            "onJobFailureMessagePatterns": ["exit code 143 matching"],
        },
    ]
    k8s.create(JOBSETS, body, NAMESPACE)
    preempted = "Container train for pod ns/js-node-0-1-ab12c failed with exit code 143 matching FailJob rule at index 1"
    for attempt in (1, 2):  # more than maxRestarts, none counted
        k8s.set_job_status("js-node-0", NAMESPACE, "failed", reason="PodFailurePolicy", message=preempted)
        seen = k8s.get(JOBSETS, "js", NAMESPACE) or {}
        assert (seen["status"]["restarts"], seen["status"].get("restartsCountTowardsMax", 0)) == (attempt, 0)
        assert "Failed" not in conditions_of(seen)
    k8s.set_job_status("js-node-0", NAMESPACE, "failed")  # BackoffLimitExceeded: no rule, counted
    seen = k8s.get(JOBSETS, "js", NAMESPACE) or {}
    assert (seen["status"]["restarts"], seen["status"]["restartsCountTowardsMax"]) == (3, 1)
    k8s.set_job_status(  # a PodFailurePolicy failure no pattern matches: the default, and no restart left
        "js-node-0", NAMESPACE, "failed", reason="PodFailurePolicy", message="exit code 24 matching FailJob"
    )
    seen = k8s.get(JOBSETS, "js", NAMESPACE) or {}
    assert conditions_of(seen)["Failed"] == ("True", "ReachedMaxRestarts")


def test_a_message_pattern_fails_the_jobset_at_once(k8s: K8s) -> None:
    k8s.ensure_namespace(NAMESPACE)
    k8s.install_jobset()
    body = jobset("js", max_restarts=3)
    body["spec"]["failurePolicy"]["rules"][0]["onJobFailureMessagePatterns"] = ["exit code 2 matching"]
    k8s.create(JOBSETS, body, NAMESPACE)
    other = "Pod ns/js-node-0-1-ab12c has condition DisruptionTarget matching FailJob rule at index 2"
    k8s.set_job_status("js-node-0", NAMESPACE, "failed", reason="PodFailurePolicy", message=other)
    seen = k8s.get(JOBSETS, "js", NAMESPACE) or {}
    assert (seen["status"]["restarts"], "Failed" in conditions_of(seen)) == (1, False)  # no match: restarted
    message = "Container train for pod ns/js-node-0-0-ab12c failed with exit code 2 matching FailJob rule at index 0"
    k8s.set_job_status("js-node-0", NAMESPACE, "failed", reason="PodFailurePolicy", message=message)
    seen = k8s.get(JOBSETS, "js", NAMESPACE) or {}
    assert seen["status"]["restarts"] == 1
    assert conditions_of(seen)["Failed"] == ("True", "FailJobSetFailurePolicyAction")


def test_the_jobset_suspends_and_resumes_its_child_jobs(k8s: K8s) -> None:
    k8s.ensure_namespace(NAMESPACE)
    k8s.install_jobset()
    k8s.create(JOBSETS, jobset("js", suspend=True), NAMESPACE)  # e.g. for Kueue
    [child] = k8s.jobset_jobs("js", NAMESPACE)
    assert child["spec"]["suspend"] is True
    assert conditions_of(k8s.get(JOBSETS, "js", NAMESPACE))["Suspended"] == ("True", "SuspendedJobs")

    k8s.patch(JOBSETS, "js", {"spec": {"suspend": False}}, NAMESPACE)  # Kueue admits it
    [child] = k8s.jobset_jobs("js", NAMESPACE)
    assert child["spec"]["suspend"] is False
    assert conditions_of(k8s.get(JOBSETS, "js", NAMESPACE))["Suspended"] == ("False", "ResumeJobs")
    k8s.patch(JOBSETS, "js", {"spec": {"suspend": True}}, NAMESPACE)
    assert k8s.jobset_jobs("js", NAMESPACE)[0]["spec"]["suspend"] is True
