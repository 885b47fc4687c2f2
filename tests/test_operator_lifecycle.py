"""The operator's life around the recipes: an upgrade to another version, deletion while it is down, and the
Events a person sees. Against the emulated cluster, with real kopf and the real handlers."""

from __future__ import annotations

import copy
import time
from typing import Any

from ftrecipe.plan.cache_key import Phase
from support.k8s import CRD_RESOURCE, K8s
from test_operator import (
    JOBS,
    NS,
    PROGRESS_LISTING,
    RESYNC_LISTING,
    apply,
    condition,
    expected_job,
    finish,
    handlers,
    job_names,
    manifest,
    patch_spec,
    recipe_writes,
    report,
    status,
    wait_job,
    wait_phase,
    wait_status,
    wait_ticks,
)

OLD, NEW = "0.1.3", "0.2.0"
PODS = "v1/pods"
KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"


def job_at(body: dict[str, Any], phase: Phase, version: str) -> str:
    """The Job name an operator of `version` gives a new recipe's `phase` (pinned for 0.1.x)."""
    return expected_job(body, phase, version)


def reconciled(run: Any, recipe: str) -> list[str]:
    return [
        r.getMessage()
        for r in run.records
        if r.getMessage().startswith("reconciled") and getattr(r, "k8s_ref", {}).get("name") == recipe
    ]


def uid(k8s: K8s, job: str) -> str:
    found = k8s.get(JOBS, job, NS)
    assert found is not None, job
    return str(found["metadata"]["uid"])


def test_an_upgraded_operator_keeps_finished_work_and_adopts_running_jobs(k8s: K8s) -> None:
    done, running = manifest("done"), manifest("running")
    # The new version's hashes differ for every phase: without the recorded ones it would re-run them all.
    phases: tuple[Phase, ...] = ("data", "train")
    for phase in phases:
        assert job_at(done, phase, OLD) != job_at(done, phase, NEW)
    with k8s.run_operator(handlers(version=OLD), namespaces=[NS], watching=[CRD_RESOURCE, JOBS]) as old:
        apply(k8s, done)
        apply(k8s, running)
        for phase, container in (("data", "prepare-data"), ("train", "train")):
            wait_job(k8s, job_at(done, phase, OLD))
            finish(k8s, job_at(done, phase, OLD), container, report(True, f"{phase} done", step=7))
        wait_phase(k8s, "Succeeded", "done")
        wait_job(k8s, job_at(running, "data", OLD))
        finish(k8s, job_at(running, "data", OLD), "prepare-data", report(True, "data done"))
        train = job_at(running, "train", OLD)
        wait_job(k8s, train)
        k8s.set_job_pod(train, NS, "Running", container="train")
        k8s.set_job_status(train, NS, "running")
        wait_phase(k8s, "Training", "running")
    assert not old.errors, old.messages()
    jobs = job_names(k8s)
    train_uid = uid(k8s, train)
    recorded = status(k8s, "done")["plannedWith"]
    assert (recorded["generation"], recorded["operatorVersion"]) == (1, OLD)
    before = k8s.get(CRD_RESOURCE, "done", NS)
    assert before is not None

    with k8s.run_operator(handlers(version=NEW), namespaces=[NS], watching=[CRD_RESOURCE, JOBS]) as new:
        first = len(k8s.requests())
        k8s.wait_for(
            lambda: any("reconciled (recipe seen): Training" in m for m in new.messages()),
            message="the running recipe adopted",
        )
        k8s.wait_for(  # the finished recipe's event handled too (and left alone)
            lambda: any(
                r.getMessage() == "Handler 'recipe-event' succeeded."
                and getattr(r, "k8s_ref", {}).get("name") == "done"
                for r in new.records
            ),
            message="the finished recipe's event handled",
        )
        # Succeeded stays Succeeded, untouched: not even its status is written again.
        after = k8s.get(CRD_RESOURCE, "done", NS)
        assert (
            after is not None
            and after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
        )
        assert reconciled(new, "running") and not reconciled(new, "done")
        # The running Job is adopted, nothing is created or deleted.
        assert job_names(k8s) == jobs and uid(k8s, train) == train_uid
        assert not [
            r
            for r in k8s.requests()[first:]
            if r.resource is not None and r.resource.plural == "jobs" and r.method in ("POST", "DELETE")
        ]
        assert status(k8s, "running")["plannedWith"]["operatorVersion"] == OLD

        finish(k8s, train, "train", report(True, "trained", step=30, total_steps=30))
        st = wait_phase(k8s, "Succeeded", "running")
        assert st["training"]["step"] == 30
        assert job_names(k8s) == jobs

        assert recipe_writes(k8s, first) == []  # only statuses were written

        # An edited recipe is planned afresh, with this version's hashes (and defaults).
        patch_spec(k8s, "done", {"training": {"hyperparameters": {"epochs": 5}}})
        edited = copy.deepcopy(done)
        edited["spec"]["training"]["hyperparameters"] = {"epochs": 5}
        wait_job(k8s, job_at(edited, "data", NEW))
        st = wait_status(k8s, lambda s: s.get("observedGeneration") == 2, "generation 2 planned", "done")
        assert st["phase"] == "PreparingData"
        assert (st["plannedWith"]["generation"], st["plannedWith"]["operatorVersion"]) == (2, NEW)
    assert not new.errors, new.messages()


def test_a_retry_after_an_upgrade_reruns_only_the_failed_phase_with_its_recorded_inputs(k8s: K8s) -> None:
    body = manifest()
    with k8s.run_operator(handlers(version=OLD), namespaces=[NS], watching=[CRD_RESOURCE, JOBS]) as old:
        apply(k8s, body)
        wait_job(k8s, job_at(body, "data", OLD))
        finish(k8s, job_at(body, "data", OLD), "prepare-data", report(True, "data done"))
        train = job_at(body, "train", OLD)
        wait_job(k8s, train)
        k8s.set_job_status(train, NS, "failed", message="AccessDenied")
        wait_phase(k8s, "Failed")
    assert not old.errors, old.messages()
    with k8s.run_operator(handlers(version=NEW), namespaces=[NS], watching=[CRD_RESOURCE, JOBS]) as new:
        k8s.patch(CRD_RESOURCE, "minimal", {"metadata": {"annotations": {"ftrecipe.dev/retry": "1"}}}, NS)
        st = wait_status(k8s, lambda s: s.get("observedRetry") == "1", "the retry acted on")
        assert st["phase"] == "Training" and condition(st, "DataPrepared")["status"] == "True"
        assert job_names(k8s) == sorted([job_at(body, "data", OLD), train])
    assert not new.errors, new.messages()


def run_data_phase_then_stop_the_operator(k8s: K8s) -> None:
    """A recipe whose data Job runs, with the operator's progress and resync ticks, then the operator gone."""
    body = manifest()
    data = job_at(body, "data", "0.0.0")
    settings = handlers(version="0.0.0", progress_seconds=0.2, resync_seconds=0.3)
    with k8s.run_operator(settings, namespaces=[NS], watching=[CRD_RESOURCE, JOBS]) as run:
        apply(k8s, body)
        wait_job(k8s, data)
        k8s.set_job_pod(data, NS, "Running", container="prepare-data")
        k8s.set_job_status(data, NS, "running")
        wait_phase(k8s, "PreparingData")
        since = len(k8s.requests())
        wait_ticks(k8s, PROGRESS_LISTING, 5, since)  # progress and resync ticks while it runs:
        wait_ticks(k8s, RESYNC_LISTING, 3, since)  # still nothing on the recipe but its status
        recipe = k8s.get(CRD_RESOURCE, "minimal", NS)
        assert recipe is not None and not recipe["metadata"].get("finalizers")
    assert not run.errors, run.messages()


def test_deleting_a_recipe_while_the_operator_is_down_is_immediate(k8s: K8s) -> None:
    run_data_phase_then_stop_the_operator(k8s)
    # The operator is down: the recipe goes at once, its Job by its ownerReference, the pod by the Job's.
    k8s.delete(CRD_RESOURCE, "minimal", NS)
    assert k8s.get(CRD_RESOURCE, "minimal", NS) is None
    k8s.wait_for(lambda: job_names(k8s) == [], message="the Job garbage-collected")
    k8s.wait_for(lambda: k8s.list(PODS, NS) == [], message="its pod garbage-collected")


def test_deleting_the_namespace_while_the_operator_is_down_completes(k8s: K8s) -> None:
    run_data_phase_then_stop_the_operator(k8s)
    # The operator is down: the namespace controller deletes everything in it, then the namespace itself.
    k8s.delete("v1/namespaces", NS)
    assert k8s.get("v1/namespaces", NS) is None
    assert k8s.get(CRD_RESOURCE, "minimal", NS) is None
    assert job_names(k8s) == [] and k8s.list(PODS, NS) == []


def test_a_recipe_finalizer_nobody_removes_holds_its_namespace_terminating(k8s: K8s) -> None:
    """What the namespace test above guards against: the emulator, like a cluster, keeps a namespace
    Terminating while an object in it carries a finalizer (kopf's, with the operator down)."""
    body = manifest()
    body["metadata"]["finalizers"] = [KOPF_FINALIZER]
    k8s.ensure_namespace(NS)
    apply(k8s, body)
    k8s.delete("v1/namespaces", NS)
    namespace = k8s.get("v1/namespaces", NS)
    assert namespace is not None and namespace["status"]["phase"] == "Terminating"
    assert k8s.get(CRD_RESOURCE, "minimal", NS)["metadata"].get("deletionTimestamp")  # type: ignore[index]
    k8s.patch(CRD_RESOURCE, "minimal", {"metadata": {"finalizers": None}}, NS)
    assert k8s.get(CRD_RESOURCE, "minimal", NS) is None and k8s.get("v1/namespaces", NS) is None


def test_the_finalizer_an_older_operator_added_is_removed(k8s: K8s) -> None:
    body = manifest()
    body["metadata"]["finalizers"] = [KOPF_FINALIZER]  # what a kopf timer made every recipe carry
    apply(k8s, body)
    with k8s.run_operator(handlers(), namespaces=[NS], watching=[CRD_RESOURCE, JOBS]) as run:
        k8s.wait_for_object(CRD_RESOURCE, "minimal", NS, where=lambda b: not b["metadata"].get("finalizers"))
        wait_phase(k8s, "PreparingData")
    assert not run.errors, run.messages()
    k8s.delete(CRD_RESOURCE, "minimal", NS)
    assert k8s.get(CRD_RESOURCE, "minimal", NS) is None


def event_posts(k8s: K8s, first: int = 0) -> list[dict[str, Any]]:
    """Every Event the operator tried to create, also those the API would refuse (a name clash)."""
    return [
        r.data
        for r in k8s.requests()[first:]
        if r.resource is not None and r.resource.plural == "events" and r.method == "POST"
    ]


def test_a_recipe_run_end_to_end_posts_an_event_per_phase_and_none_about_handlers(k8s: K8s) -> None:
    body = manifest()
    body["spec"]["evaluation"] = {"enabled": True}
    settings = handlers(progress_seconds=0.2, resync_seconds=0.3)
    with k8s.run_operator(settings, namespaces=[NS], posting=True, watching=[CRD_RESOURCE, JOBS]) as run:
        first = len(k8s.requests())
        apply(k8s, body)
        for phase, container in (("data", "prepare-data"), ("train", "train"), ("evaluate", "evaluate")):
            name = wait_for_phase_job(k8s, phase)
            k8s.set_job_pod(name, NS, "Running", container=container)
            k8s.set_job_status(name, NS, "running")
            since = len(k8s.requests())
            wait_ticks(k8s, PROGRESS_LISTING, 2, since)  # progress ticks and resyncs while it runs
            wait_ticks(k8s, RESYNC_LISTING, 2, since)
            figures = {"command_accuracy": 0.9, "per_command_f1": {}} if phase == "evaluate" else {}
            finish(k8s, name, container, report(True, f"{phase} done", **figures))
        wait_phase(k8s, "Succeeded")
        time.sleep(1.0)  # anything still queued is posted
        posted = event_posts(k8s, first)
    assert not run.errors, run.messages()
    reasons = [e["reason"] for e in posted]
    assert reasons == ["PreparingData", "Training", "Evaluating", "Succeeded"], posted
    assert all(e["type"] == "Normal" for e in posted)
    assert not [e for e in posted if "Handler" in e.get("message", "") or e["reason"] == "Logging"]
    assert len(k8s.events(NS)) == 4  # every one accepted


def wait_for_phase_job(k8s: K8s, phase: str) -> str:
    word = {"data": "data", "train": "train", "evaluate": "eval"}[phase]
    found = k8s.wait_for(
        lambda: next((n for n in job_names(k8s) if f"-{word}-" in n), None), message=f"the {phase} Job"
    )
    assert found is not None
    return str(found)


def test_only_our_jobs_are_watched_and_pods_are_found_by_their_jobs_uid(k8s: K8s) -> None:
    k8s.ensure_namespace(NS)
    foreign = {"metadata": {"name": "someone-elses"}, "spec": {"template": {"spec": {"containers": []}}}}
    k8s.create(JOBS, foreign, NS)
    body = manifest()
    with k8s.run_operator(
        handlers(progress_seconds=0.2), namespaces=[NS], watching=[CRD_RESOURCE, JOBS]
    ) as run:
        first = len(k8s.requests())
        apply(k8s, body)
        data = wait_for_phase_job(k8s, "data")
        k8s.set_job_pod(data, NS, "Running", container="prepare-data")
        k8s.set_job_status(data, NS, "running")
        wait_ticks(k8s, PROGRESS_LISTING, 3, len(k8s.requests()))  # progress ticks list the pods
        finish(k8s, data, "prepare-data", report(True, "data done", num_ft_data_points=3))
        st = wait_status(k8s, lambda s: s.get("phase") == "Training", "Training")
        assert st["dataPreparation"]["summary"] == {"numFtDataPoints": 3}  # the report, found by uid
        k8s.patch(JOBS, "someone-elses", {"metadata": {"labels": {"touched": "yes"}}}, NS)
        time.sleep(0.3)
    assert not run.errors, run.messages()
    selector = "app.kubernetes.io/managed-by=ftrecipe-operator"
    job_reads = [
        r
        for r in k8s.requests()
        if r.resource is not None and r.resource.plural == "jobs" and r.method == "GET"
    ]
    assert job_reads and all(selector in (r.params.get("labelSelector") or "") for r in job_reads)
    pod_lists = [
        r.params.get("labelSelector") or ""
        for r in k8s.requests()[first:]
        if r.resource is not None and r.resource.plural == "pods" and r.method == "GET" and not r.name
    ]
    uid_selector = f"batch.kubernetes.io/controller-uid={uid(k8s, data)}"
    assert uid_selector in pod_lists and selector in pod_lists
    assert not [s for s in pod_lists if "job-name" in s]
    assert not [r for r in run.records if getattr(r, "k8s_ref", {}).get("name") == "someone-elses"]
