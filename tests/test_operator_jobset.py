"""Multi-node training (issue 22) as the operator runs it: a recipe with training.nodes >= 2 trains in one
JobSet instead of a Job, and its status follows the JobSet. Against the emulated cluster, whose JobSet
controller (tests/support/k8s.py, installed per test) creates the child Job, restarts the group after a
failed child Job and fails it past failurePolicy.maxRestarts; the tests play the Job controller and the
kubelet for the child Job's pods, as the other operator tests do for Jobs."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from ftrecipe.controller.handlers import jobset_changes
from ftrecipe.controller.observe import jobset_state, observed_jobset
from ftrecipe.plan.planner import jobset_name
from ftrecipe.plan.status import restarts_text
from support.k8s import CRD_RESOURCE, K8s, OperatorRun
from test_operator import (
    JOBS,
    NS,
    PROGRESS_LISTING,
    RESYNC_LISTING,
    apply,
    condition,
    expected_hash,
    expected_job,
    finish,
    handlers,
    job_names,
    manifest,
    patch_spec,
    progress_line,
    report,
    requests_since,
    status,
    wait_job,
    wait_phase,
    wait_status,
    wait_ticks,
)

JOBSETS = "jobset.x-k8s.io/v1alpha2/jobsets"
OPTIONS: dict[str, Any] = {"namespaces": [NS], "posting": True, "watching": [CRD_RESOURCE, JOBS]}


def two_nodes(name: str = "minimal", **spec: Any) -> dict[str, Any]:
    body = manifest(name, **spec)
    body["spec"]["training"]["nodes"] = 2
    return body


def jobset_of(body: dict[str, Any]) -> str:
    return jobset_name(body["metadata"]["name"], "train", expected_hash(body, "train"))


def prepare_data(k8s: K8s, body: dict[str, Any]) -> None:
    data = expected_job(body, "data")
    wait_job(k8s, data)
    finish(k8s, data, "prepare-data", report(True, "data published", num_ft_data_points=40))


def child_of(k8s: K8s, jobset: str, attempt: int = 0) -> str:
    """The JobSet controller's child Job of restart attempt `attempt` (once it exists)."""

    def probe() -> str | None:
        jobs = k8s.jobset_jobs(jobset, NS)
        labels = jobs[0]["metadata"]["labels"] if jobs else {}
        current = labels.get("jobset.sigs.k8s.io/restart-attempt") == str(attempt)
        return str(jobs[0]["metadata"]["name"]) if current else None

    found = k8s.wait_for(probe, message=f"the child Job of {jobset}, attempt {attempt}")
    assert found is not None
    return found


def run_nodes(k8s: K8s, child: str, *, logs: tuple[str, str] = ("", "")) -> None:
    """Both nodes' pods run (index 0 and 1 of the Indexed child Job), then the Job controller says so."""
    for index, log in enumerate(logs):
        k8s.set_job_pod(
            child, NS, "Running", container="train", suffix=f"{index}-p{attempt_tag(k8s, child)}", log=log
        )
    k8s.set_job_status(child, NS, "running")


def attempt_tag(k8s: K8s, child: str) -> str:
    job = k8s.get(JOBS, child, NS) or {}
    return str(((job.get("metadata") or {}).get("uid") or "x")[:4])


@contextlib.contextmanager
def training_jobset(k8s: K8s) -> Iterator[tuple[OperatorRun, str, str]]:
    """A two-node recipe under a running operator, its data prepared and both pods of its JobSet's first
    child Job running: (the operator run, the JobSet's name, the child Job's name)."""
    k8s.install_jobset()
    body = two_nodes()
    jobset = jobset_of(body)
    with k8s.run_operator(handlers(progress_seconds=0.2), **OPTIONS) as run:
        apply(k8s, body)
        prepare_data(k8s, body)
        child = child_of(k8s, jobset)
        run_nodes(k8s, child)
        yield run, jobset, child


def lose_node(k8s: K8s, child: str) -> None:
    """Node 1's pod fails (no report: the node went away under it), and with backoffLimit 0 its child Job."""
    k8s.set_job_pod(
        child, NS, "Failed", container="train", suffix=f"1-p{attempt_tag(k8s, child)}", exit_code=1
    )
    k8s.set_job_status(child, NS, "failed")


def test_a_two_node_recipe_trains_in_one_jobset_and_its_status_follows_it(k8s: K8s) -> None:
    k8s.install_jobset()
    body = two_nodes()
    jobset = jobset_of(body)
    with k8s.run_operator(handlers(progress_seconds=0.2), **OPTIONS) as run:
        apply(k8s, body)
        prepare_data(k8s, body)
        created = k8s.wait_for_object(JOBSETS, jobset, NS)
        st = wait_phase(k8s, "Training")
        assert st["message"] == f"training running (JobSet {jobset})"
        assert st["training"]["jobName"] == jobset and st["training"]["restarts"] == 0
        # One JobSet, labelled as the Job would be, and no train Job: the only Jobs are the data Job and the
        # JobSet's child.
        assert created["metadata"]["labels"]["ftrecipe.dev/phase"] == "train"
        child = child_of(k8s, jobset)
        assert child == f"{jobset}-node-0"
        assert job_names(k8s) == sorted([expected_job(body, "data"), child])
        assert [r.data["metadata"]["name"] for r in requests_since(k8s, 0, "jobsets", "POST")] == [jobset]

        # Progress comes from rank 0's log (pod index 0), not from node 1's, though node 1's pod is newer.
        tag = attempt_tag(k8s, child)
        rank0, rank1 = f"0-p{tag}", f"1-p{tag}"
        k8s.set_job_pod(child, NS, "Running", container="train", suffix=rank0, log="starting\n")
        time.sleep(1.1)  # creation timestamps have whole seconds
        k8s.set_job_pod(
            child, NS, "Running", container="train", suffix=rank1, log=progress_line(30, 40, 9.0, 1)
        )
        k8s.set_job_pod(
            child, NS, "Running", container="train", suffix=rank0, log=progress_line(12, 40, 0.5, 300)
        )
        k8s.set_job_status(child, NS, "running")
        st = wait_status(k8s, lambda s: "step 12/40" in s.get("message", ""), "rank 0's progress")
        assert st["message"] == f"training running (JobSet {jobset}): step 12/40, train loss 0.5, ETA 5m00s"

        # Both pods finish; rank 0's report carries the figures, then the child Job and the JobSet complete.
        k8s.set_job_pod(
            child,
            NS,
            "Succeeded",
            container="train",
            suffix=f"0-p{tag}",
            message=report(True, "adapter published", step=40, total_steps=40, train_loss=0.25),
        )
        k8s.set_job_pod(
            child, NS, "Succeeded", container="train", suffix=f"1-p{tag}", message=report(True, "", step=3)
        )
        k8s.set_job_status(child, NS, "succeeded")
        st = wait_phase(k8s, "Succeeded")
        assert st["training"]["step"] == 40 and st["training"]["trainLoss"] == 0.25
        assert condition(st, "Trained")["reason"] == "JobSucceeded"
        assert st["training"]["restarts"] == 0
    assert not run.errors, run.messages()


def test_a_lost_node_restarts_the_group_and_the_status_says_so_until_the_restarts_run_out(k8s: K8s) -> None:
    with training_jobset(k8s) as (run, jobset, child):
        wait_status(k8s, lambda s: s.get("phase") == "Training", "training")

        lose_node(k8s, child)  # restart 1 of 3: the phase keeps running
        st = wait_status(k8s, lambda s: s.get("training", {}).get("restarts") == 1, "the first restart")
        assert st["phase"] == "Training"
        assert (
            st["message"] == f"training running (JobSet {jobset}, restarted 1 of 3 times after a lost node)"
        )
        assert (st["training"]["restarts"], st["training"]["maxRestarts"]) == (1, 3)
        assert condition(st, "Trained")["status"] == "Unknown"

        for attempt in (1, 2):
            child = child_of(k8s, jobset, attempt)
            run_nodes(k8s, child)
            lose_node(k8s, child)
            wait_status(
                k8s,
                lambda s, n=attempt + 1: s.get("training", {}).get("restarts") == n,
                f"restart {attempt + 1}",
            )
        child = child_of(k8s, jobset, 3)
        run_nodes(k8s, child)
        lose_node(k8s, child)  # no restart left: the JobSet fails, and the phase with it
        st = wait_phase(k8s, "Failed")
        expected = (
            f"container train ended with Error (exit code 1) (JobSet {jobset} failed after 3 of 3 restarts)"
        )
        assert st["message"] == expected
        assert condition(st, "Trained")["reason"] == "JobFailed"
        assert condition(st, "Ready")["message"] == expected
        # Only one JobSet was ever created: the restarts are the JobSet controller's, not new JobSets.
        assert len(requests_since(k8s, 0, "jobsets", "POST")) == 1
    assert not run.errors, run.messages()


def preempt_nodes(k8s: K8s, child: str) -> None:
    """A spot reclaim of node 1: every pod checkpoints and exits 143 (training.md, several nodes), and the
    child Job fails through its podFailurePolicy's exit-143 rule, with the Job controller's message."""
    tag = attempt_tag(k8s, child)
    for index in (0, 1):
        k8s.set_job_pod(child, NS, "Failed", container="train", suffix=f"{index}-p{tag}", exit_code=143)
    k8s.set_job_status(
        child,
        NS,
        "failed",
        reason="PodFailurePolicy",
        message=f"Container train for pod {NS}/{child}-1-p{tag} failed with exit code 143 matching FailJob rule "
        "at index 1",
    )


def test_a_preempted_group_restarts_without_using_up_max_restarts_and_the_eviction_cap_ends_a_loop(
    k8s: K8s,
) -> None:
    with training_jobset(k8s) as (run, jobset, child):
        wait_status(k8s, lambda s: s.get("phase") == "Training", "training")

        preempt_nodes(k8s, child)  # restarted, maxRestarts untouched
        child = child_of(k8s, jobset, 1)
        run_nodes(k8s, child)
        seen = k8s.get(JOBSETS, jobset, NS) or {}
        assert (seen["status"]["restarts"], seen["status"].get("restartsCountTowardsMax", 0)) == (1, 0)
        st = wait_status(k8s, lambda s: s.get("training", {}).get("preemptions") == 1, "the preemption")
        assert st["phase"] == "Training" and st["training"]["restarts"] == 0
        assert st["message"] == f"training running (JobSet {jobset}, restarted after 1 preemption)"

        lose_node(k8s, child)  # a crash still counts: 1 of 3
        st = wait_status(k8s, lambda s: s.get("training", {}).get("restarts") == 1, "the counted restart")
        assert st["message"] == (
            f"training running (JobSet {jobset}, restarted 1 of 3 times after a lost node and after 1 preemption)"
        )
        child = child_of(k8s, jobset, 2)
        run_nodes(k8s, child)

        preempt_nodes(k8s, child)  # the second preemption
        child = child_of(k8s, jobset, 3)
        run_nodes(k8s, child)
        st = wait_status(
            k8s, lambda s: s.get("training", {}).get("preemptions") == 2, "the second preemption"
        )
        assert st["training"]["restarts"] == 1
        assert st["message"] == (
            f"training running (JobSet {jobset}, restarted 1 of 3 times after a lost node and after 2 preemptions)"
        )

        preempt_nodes(k8s, child)  # the third: --max-evictions (3) ends the loop as for a Job
        st = wait_phase(k8s, "Failed")
        expected = (
            f"training stopped: its pod was evicted 3 times (JobSet {jobset} deleted); last: a node was "
            "preempted, and the JobSet restarted every node without counting it toward maxRestarts"
        )
        assert st["message"] == expected
        assert condition(st, "Trained")["reason"] == "Evicted"
        assert k8s.get(JOBSETS, jobset, NS) is None
    assert not run.errors, run.messages()


def test_bad_input_after_a_preemption_still_fails_the_jobset_at_once(k8s: K8s) -> None:
    with training_jobset(k8s) as (run, jobset, child):
        preempt_nodes(k8s, child)
        child = child_of(k8s, jobset, 1)
        run_nodes(k8s, child)
        tag = attempt_tag(k8s, child)
        line = "rank 0 of 2: error: data s3://data/bot: no train.jsonl"
        k8s.set_job_pod(
            child,
            NS,
            "Failed",
            container="train",
            suffix=f"0-p{tag}",
            exit_code=2,
            message=report(False, line),
        )
        k8s.set_job_status(
            child,
            NS,
            "failed",
            reason="PodFailurePolicy",
            message=f"Container train for pod {NS}/{child}-0-p{tag} failed with exit code 2 matching FailJob "
            "rule at index 0",
        )
        st = wait_phase(k8s, "Failed")
        assert st["message"] == line  # no counted restart to tell
        seen = k8s.get(JOBSETS, jobset, NS) or {}
        assert (seen["status"]["restarts"], seen["status"].get("restartsCountTowardsMax", 0)) == (1, 0)
        assert [c["reason"] for c in seen["status"]["conditions"] if c["type"] == "Failed"] == [
            "FailJobSetFailurePolicyAction"
        ]
    assert not run.errors, run.messages()


def test_a_restarted_operator_adopts_the_running_jobset(k8s: K8s) -> None:
    k8s.install_jobset()
    body = two_nodes()
    jobset = jobset_of(body)
    with k8s.run_operator(handlers(progress_seconds=0.2), **OPTIONS) as first:
        apply(k8s, body)
        prepare_data(k8s, body)
        child = child_of(k8s, jobset)
        wait_phase(k8s, "Training")
    uid = (k8s.get(JOBSETS, jobset, NS) or {})["metadata"]["uid"]
    run_nodes(k8s, child)  # it started while no operator ran
    before = len(k8s.requests())
    with k8s.run_operator(handlers(progress_seconds=0.2), **OPTIONS) as second:
        k8s.wait_for(
            lambda: any("reconciled (recipe seen): Training" in m for m in second.messages()),
            message="the recipe reconciled at start-up",
        )
        wait_ticks(k8s, PROGRESS_LISTING, 3, before)
        # Adopted: no JobSet created (not even a request answered 409), none deleted, the same one runs.
        assert requests_since(k8s, before, "jobsets", "POST") == []
        assert requests_since(k8s, before, "jobsets", "DELETE") == []
        assert [j["metadata"]["uid"] for j in k8s.list(JOBSETS, NS)] == [uid]

        lose_node(k8s, child)  # and it keeps following it
        st = wait_status(k8s, lambda s: s.get("training", {}).get("restarts") == 1, "the restart")
        assert st["phase"] == "Training"
        child = child_of(k8s, jobset, 1)
        finish(
            k8s, child, "train", report(True, "adapter published", step=9, total_steps=9), suffix="0-pdone"
        )
        st = wait_phase(k8s, "Succeeded")
        assert st["training"]["step"] == 9
    assert not first.errors and not second.errors, second.messages()


def test_without_jobset_on_the_cluster_the_recipe_waits_with_one_clear_line(k8s: K8s) -> None:
    body = two_nodes()
    jobset = jobset_of(body)
    settings = handlers(progress_seconds=0.2, resync_seconds=0.3)
    with k8s.run_operator(settings, log_level=logging.DEBUG, **OPTIONS) as run:
        apply(k8s, body)
        prepare_data(k8s, body)
        wait_phase(k8s, "Training")
        why = (
            "training.nodes: 2 needs JobSet on the cluster (kubectl apply --server-side -f "
            "https://github.com/kubernetes-sigs/jobset/releases/latest/download/manifests.yaml) and the "
            "chart's jobset.enabled switch; or set training.nodes: 1"
        )
        st = wait_status(
            k8s, lambda s: s.get("message", "").startswith("training waiting"), "the waiting line"
        )
        assert st["message"] == f"training waiting (JobSet {jobset}): {why}"
        assert condition(st, "Ready")["reason"] == condition(st, "Trained")["reason"] == "JobSetNotInstalled"
        assert condition(st, "Trained")["status"] == "Unknown"
        since = len(k8s.requests())
        wait_ticks(k8s, RESYNC_LISTING, 3, since)  # retried at every resync, nothing else changes
        assert status(k8s)["message"] == st["message"]
        warnings = [e for e in k8s.events(NS) if e["reason"] == "JobSetNotInstalled"]
        assert [(e["type"], e["message"]) for e in warnings] == [("Warning", st["message"])]  # posted once
        assert job_names(k8s) == [expected_job(body, "data")]  # no train Job instead

        k8s.install_jobset()  # the cluster's admin installs JobSet: the next resync creates it
        k8s.wait_for_object(JOBSETS, jobset, NS)
        st = wait_status(k8s, lambda s: s.get("message") == f"training running (JobSet {jobset})", "running")
        assert condition(st, "Ready")["reason"] == "Training"
    assert not run.errors, run.messages()
    assert not [
        r for r in run.records if r.exc_info or (r.levelno >= logging.WARNING and "JobSet" in r.getMessage())
    ]


def test_a_queued_jobset_waits_for_kueue_as_one_workload(k8s: K8s) -> None:
    k8s.install_jobset()
    body = two_nodes(queueName="gpu-queue")
    jobset = jobset_of(body)
    with k8s.run_operator(handlers(progress_seconds=0.2, resync_seconds=0.3), **OPTIONS) as run:
        apply(k8s, body)
        prepare_data(k8s, body)
        created = k8s.wait_for_object(JOBSETS, jobset, NS)
        assert created["spec"]["suspend"] is True  # Kueue unsuspends it when it admits it
        assert created["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert child_of(k8s, jobset) and k8s.jobset_jobs(jobset, NS)[0]["spec"]["suspend"] is True
        quota = "couldn't assign flavors to pod set node: insufficient unused quota for nvidia.com/gpu"
        k8s.kueue_hold(jobset, NS, quota, jobset=True)
        waiting = (
            f"training waiting (JobSet {jobset}): Kueue has not admitted it yet (queue gpu-queue): {quota}"
        )
        st = wait_status(k8s, lambda s: s.get("message") == waiting, "Kueue's reason")
        assert condition(st, "Ready")["reason"] == "Queued" and st["phase"] == "Training"

        k8s.kueue_admit(jobset, NS, jobset=True)
        assert k8s.jobset_jobs(jobset, NS)[0]["spec"]["suspend"] is False
        st = wait_status(k8s, lambda s: s.get("message") == f"training running (JobSet {jobset})", "admitted")
        assert condition(st, "Ready")["reason"] == "Training"
    assert not run.errors, run.messages()


def test_suspend_resume_and_back_to_one_node(k8s: K8s) -> None:
    k8s.install_jobset()
    body = two_nodes()
    jobset = jobset_of(body)
    with k8s.run_operator(handlers(progress_seconds=0.2), **OPTIONS) as run:
        apply(k8s, body)
        prepare_data(k8s, body)
        child = child_of(k8s, jobset)
        run_nodes(k8s, child)
        wait_status(k8s, lambda s: s.get("phase") == "Training", "training")

        patch_spec(k8s, "minimal", {"suspend": True})  # the JobSet suspends its child Job (its pods go)
        k8s.wait_for_object(JOBSETS, jobset, NS, where=lambda j: j["spec"].get("suspend") is True)
        k8s.wait_for(
            lambda: k8s.jobset_jobs(jobset, NS)[0]["spec"]["suspend"] is True, message="child suspended"
        )
        st = wait_phase(k8s, "Suspended")
        assert st["message"] == f"training suspended (JobSet {jobset})"
        patch_spec(k8s, "minimal", {"suspend": False})
        k8s.wait_for_object(JOBSETS, jobset, NS, where=lambda j: j["spec"].get("suspend") is False)
        wait_phase(k8s, "Training")

        # Back to one node: the JobSet goes (its inputs changed), a plain train Job takes over.
        patch_spec(k8s, "minimal", {"training": {"nodes": 1}})
        one = manifest()
        train = expected_job(one, "train")
        wait_job(k8s, train)
        k8s.wait_for(lambda: k8s.get(JOBSETS, jobset, NS) is None, message="the JobSet deleted")
        assert job_names(k8s) == sorted([expected_job(body, "data"), train])
        st = wait_status(k8s, lambda s: s.get("observedGeneration") == 4, "generation 4")
        assert st["message"] == f"training running (Job {train})"
        assert "restarts" not in st["training"]
        deleted = [e["message"] for e in k8s.events(NS) if e["reason"] == "JobDeleted"]
        assert deleted == [f"deleted JobSet {jobset}: inputs of phase train changed"]
    assert not run.errors, run.messages()


def test_one_node_that_cannot_start_holds_the_group_and_fails_it_past_its_limit(k8s: K8s) -> None:
    k8s.install_jobset()
    body = two_nodes()
    jobset = jobset_of(body)
    image = "registry.test/ftrecipe-trainer:test"
    with k8s.run_operator(handlers(progress_seconds=0.2), **OPTIONS) as run:
        apply(k8s, body)
        prepare_data(k8s, body)
        child = child_of(k8s, jobset)
        tag = attempt_tag(k8s, child)
        no_gpu = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
        k8s.set_pod_unschedulable(child, NS, no_gpu, container="train", suffix=f"1-p{tag}")
        time.sleep(1.1)  # node 0's pod is the newer one: node 1's still holds the group
        k8s.set_job_pod(child, NS, "Running", container="train", suffix=f"0-p{tag}")  # node 0 runs
        k8s.set_job_status(child, NS, "running")
        waiting = f"training waiting (JobSet {jobset}): no node can run the pod: {no_gpu}"
        st = wait_status(k8s, lambda s: s.get("message") == waiting, "node 1 unschedulable")
        assert condition(st, "Ready")["reason"] == "Unschedulable" and st["phase"] == "Training"

        # Scheduled at last, its image cannot be pulled, for six minutes: the JobSet goes, the phase fails.
        k8s.set_pod_waiting(
            child,
            NS,
            container="train",
            reason="ImagePullBackOff",
            message=f'Back-off pulling image "{image}"',
            image=image,
            scheduled_at=(datetime.now(UTC) - timedelta(minutes=6)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            suffix=f"1-p{tag}",
        )
        st = wait_phase(k8s, "Failed")
        assert st["message"].startswith("training stopped after 6m0")
        assert st["message"].endswith(
            f'waiting (JobSet {jobset} deleted): container train cannot pull {image}: Back-off pulling image "{image}"'
        )
        assert condition(st, "Trained")["reason"] == "ImagePullBackOff"
        k8s.wait_for(lambda: k8s.get(JOBSETS, jobset, NS) is None, message="the stuck JobSet deleted")
        assert k8s.jobset_jobs(jobset, NS) == []  # its child Job and pods went with it
    assert not run.errors, run.messages()


# ---- the pure pieces, on JobSet bodies as the JobSet controller writes them


def jobset_body(
    conditions: Sequence[tuple[str, str]] = (),
    *,
    suspend: bool = False,
    active: int = 0,
    restarts: int = 0,
    uncounted: int = 0,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "r-train-1",
            "uid": "u1",
            "labels": {"ftrecipe.dev/phase": "train"},
            "annotations": {"ftrecipe.dev/inputs-hash": "h" * 12, "ftrecipe.dev/recipe": "r"},
        },
        "spec": {"suspend": suspend, "failurePolicy": {"maxRestarts": 3}},
        "status": {
            "restarts": restarts,
            "restartsCountTowardsMax": restarts - uncounted,
            "replicatedJobsStatus": [{"name": "node", "active": active, "ready": 0}],
            "conditions": [
                {"type": kind, "status": "True", "reason": reason, "message": f"{reason} words"}
                for kind, reason in conditions
            ],
        },
    }


def test_a_jobsets_state_comes_from_its_conditions() -> None:
    assert jobset_state(jobset_body([("Completed", "AllJobsCompleted")])) == "succeeded"
    assert jobset_state(jobset_body([("Failed", "ReachedMaxRestarts")], active=1)) == "failed"
    assert jobset_state(jobset_body([("Suspended", "SuspendedJobs")], suspend=True)) == "suspended"
    assert jobset_state(jobset_body(active=1)) == "running"
    assert jobset_state(jobset_body(restarts=1)) == "pending"  # recreated after a restart
    seen = observed_jobset(jobset_body([("Failed", "ReachedMaxRestarts")], restarts=3))
    assert seen is not None
    assert (seen.kind, seen.state, seen.restarts, seen.max_restarts) == ("JobSet", "failed", 3, 3)
    assert seen.message == "JobSet r-train-1 failed: ReachedMaxRestarts words"
    assert seen.failure_reason == "ReachedMaxRestarts"
    # Two of five restarts were preemptions (RestartJobSetAndIgnoreMaxRestarts): evictions, not restarts.
    preempted = observed_jobset(jobset_body(active=1, restarts=5, uncounted=2))
    assert preempted is not None and (preempted.restarts, preempted.evictions) == (3, 2)


def test_jobset_listings_report_changes_restarts_and_disappearances() -> None:
    known, changed = jobset_changes({}, [jobset_body()])
    assert changed == []  # a pending JobSet first seen: the reconcile that created it knows
    known, changed = jobset_changes(known, [jobset_body(active=1)])
    assert changed == [("r", "JobSet r-train-1 running, 0 restarts")]
    known, changed = jobset_changes(known, [jobset_body(active=1)])
    assert changed == []
    known, changed = jobset_changes(known, [jobset_body(restarts=1)])
    assert changed == [("r", "JobSet r-train-1 pending, 1 restarts")]
    assert jobset_changes({}, [jobset_body(restarts=1)])[1] == [("r", "JobSet r-train-1 pending, 1 restarts")]
    assert jobset_changes(known, [])[1] == [("r", "JobSet r-train-1 deleted")]


def test_the_restarts_read_as_a_person_would_say_them() -> None:
    assert restarts_text(None, None) == restarts_text(0, 3) == ""
    assert restarts_text(1, 3) == ", restarted 1 of 3 times after a lost node"
    assert restarts_text(1, None) == ", restarted 1 time after a lost node"
    assert restarts_text(0, 3, 1) == ", restarted after 1 preemption"
    assert restarts_text(2, 3, 3) == ", restarted 2 of 3 times after a lost node and after 3 preemptions"
    assert restarts_text(0, 3, 0) == ""


def test_a_jobset_older_than_v0_10_is_named_in_one_warning_event(k8s: K8s) -> None:
    """A JobSet release before v0.10.0 prunes onJobFailureMessagePatterns from the rules the operator sends,
    so a preemption would fail the training at once: the operator says so when it creates the JobSet."""
    k8s.install_jobset(version="v0.9.1")
    body = two_nodes()
    jobset = jobset_of(body)
    with k8s.run_operator(handlers(progress_seconds=0.2), **OPTIONS):
        apply(k8s, body)
        prepare_data(k8s, body)
        stored = k8s.wait_for_object(JOBSETS, jobset, NS)
        rules = stored["spec"]["failurePolicy"]["rules"]
        assert [sorted(rule) for rule in rules] == [["action", "name", "onJobFailureReasons"]] * 3  # pruned
        warned = k8s.wait_for(
            lambda: [e for e in k8s.events(NS) if e["reason"] == "JobSetTooOld"] or None,
            message="the JobSetTooOld Event",
        )
        wait_phase(k8s, "Training")
        assert [(e["type"], e["message"]) for e in warned] == [
            (
                "Warning",
                "the cluster's JobSet dropped failurePolicy.rules[].onJobFailureMessagePatterns (rules "
                "badInput, preempted): it is older than v0.10.0, so a preempted node fails this training at "
                "once instead of restarting the group from its checkpoint; upgrade JobSet to v0.10.0 or later",
            )
        ]


def test_a_current_jobset_keeps_the_message_patterns_and_gets_no_warning(k8s: K8s) -> None:
    k8s.install_jobset()  # v0.10.0
    body = two_nodes()
    jobset = jobset_of(body)
    with k8s.run_operator(handlers(progress_seconds=0.2), **OPTIONS):
        apply(k8s, body)
        prepare_data(k8s, body)
        stored = k8s.wait_for_object(JOBSETS, jobset, NS)
        # Events are posted in order: the phase's Event comes after a JobSetTooOld one would have.
        k8s.wait_for(
            lambda: any(e["reason"] == "Training" for e in k8s.events(NS)), message="the Training Event"
        )
    assert [
        rule["name"]
        for rule in stored["spec"]["failurePolicy"]["rules"]
        if "onJobFailureMessagePatterns" in rule
    ] == [
        "badInput",
        "preempted",
    ]
    assert [e for e in k8s.events(NS) if e["reason"] == "JobSetTooOld"] == []
