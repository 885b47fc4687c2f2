"""Stuck is not running: pods that cannot start (unschedulable, image pull errors, missing Secrets), Jobs Kueue
has not admitted, and evictions, as a real cluster shows them in pod status, classified (pure), bounded by
deadlines (pure), and seen end to end through the operator against the emulated cluster."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from ftrecipe.api.v1alpha1 import Condition, FinetuneRecipeStatus, TrainingStatus
from ftrecipe.controller.handlers import ANNOTATION_RETRY, OperatorSettings, register
from ftrecipe.controller.manifests import LABEL_QUEUE, Images
from ftrecipe.controller.observe import (
    ReportCache,
    evictions,
    job_blocker,
    list_pod_events_sync,
    list_workloads_sync,
    mount_blocker,
    pod_blocker,
    pods_blocker,
    replan_needed,
    shorten,
    waiting_to_be_created,
    with_workloads,
    workload_message,
)
from ftrecipe.plan.planner import (
    Blocker,
    DeleteJob,
    Fail,
    ObservedJob,
    StuckLimits,
    Wait,
    World,
    duration_text,
    job_name,
    plan,
    stopped,
    waited_too_long,
)
from ftrecipe.plan.status import compute_status, failure_reasons, remembered, stuck_event
from ftrecipe.termination import PhaseReport, encode
from support.k8s import CRD_GROUP, CRD_PLURAL, CRD_RESOURCE, CRD_VERSION, K8s
from test_operator import PROGRESS_LISTING, expected_job, wait_ticks
from test_planner import BASE, H
from test_status import PREFIXES

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
STAMP = "2026-11-21T10:00:00Z"
GPU_MESSAGE = (
    "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: "
    "3 No preemption victims found for incoming pod."
)

# ----------------------------------------------------------------------------------- pod states (pure)


def pending_pod(*, conditions: list[dict[str, Any]], **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "creationTimestamp": "2026-11-21T09:59:58Z"},
        "status": {"phase": "Pending", "conditions": conditions, **status},
    }


def scheduled(at: str = STAMP) -> dict[str, Any]:
    return {"type": "PodScheduled", "status": "True", "lastTransitionTime": at}


def waiting(name: str, reason: str, message: str | None, image: str = "registry.test/t:1") -> dict[str, Any]:
    state: dict[str, Any] = {"reason": reason}
    if message is not None:
        state["message"] = message
    return {"name": name, "image": image, "ready": False, "state": {"waiting": state}}


def test_an_unschedulable_pod_is_named_in_the_schedulers_words() -> None:
    pod = pending_pod(
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": GPU_MESSAGE,
                "lastTransitionTime": "2026-11-21T10:00:01Z",
            }
        ]
    )
    assert pod_blocker(pod) == Blocker(
        "Unschedulable",
        "no node can run the pod: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        datetime(2026, 11, 21, 10, 0, 1, tzinfo=UTC),
    )


def test_a_missing_persistent_volume_claim_is_not_waited_for_like_a_gpu() -> None:
    message = (
        '0/3 nodes are available: persistentvolumeclaim "model-cache" not found. preemption: 0/3 nodes are '
        "available: 3 Preemption is not helpful for scheduling."
    )
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    pod = pending_pod(conditions=[{**condition, "lastTransitionTime": STAMP}])
    assert pod_blocker(pod) == Blocker(
        "MountFailed", 'pod cannot start: persistentvolumeclaim "model-cache" not found', T0
    )
    assert LIMITS.limit("MountFailed") == 300


@pytest.mark.parametrize(
    ("reason", "message", "expected"),
    [
        (
            "ErrImagePull",
            'rpc error: code = NotFound desc = failed to pull and unpack image "registry.test/t:1": '
            'failed to resolve reference "registry.test/t:1": registry.test/t:1: not found',
            "container train cannot pull registry.test/t:1: failed to pull and unpack image "
            '"registry.test/t:1": failed to resolve reference "registry.test/t:1": registry.test/t:1: not found',
        ),
        (
            "ImagePullBackOff",
            'Back-off pulling image "registry.test/t:1"',
            'container train cannot pull registry.test/t:1: Back-off pulling image "registry.test/t:1"',
        ),
        ("InvalidImageName", None, "container train cannot pull registry.test/t:1: InvalidImageName"),
    ],
)
def test_image_pull_errors_are_one_kind_with_the_kubelets_words(
    reason: str, message: str | None, expected: str
) -> None:
    pod = pending_pod(conditions=[scheduled()], containerStatuses=[waiting("train", reason, message)])
    assert pod_blocker(pod) == Blocker("ImagePullBackOff", expected, T0)


@pytest.mark.parametrize(
    ("message", "reason", "expected"),
    [
        (
            'secret "openai-key" not found',
            "SecretMissing",
            'container prepare-data needs a missing Secret: secret "openai-key" not found',
        ),
        (
            "couldn't find key OPENAI_API_KEY in Secret ml/openai-key",
            "SecretMissing",
            "container prepare-data needs a missing Secret: couldn't find key OPENAI_API_KEY in Secret "
            "ml/openai-key",
        ),
        (
            "container has runAsNonRoot and image will run as root",
            "ContainerConfigError",
            "container prepare-data cannot be created: container has runAsNonRoot and image will run as root",
        ),
    ],
)
def test_a_container_config_error_names_the_missing_secret(message: str, reason: str, expected: str) -> None:
    pod = pending_pod(
        conditions=[scheduled()],
        containerStatuses=[waiting("prepare-data", "CreateContainerConfigError", message)],
    )
    assert pod_blocker(pod) == Blocker(reason, expected, T0)  # type: ignore[arg-type]


def test_the_init_container_is_looked_at_first_and_time_counts_from_creation_without_scheduling() -> None:
    pod = pending_pod(
        conditions=[],
        initContainerStatuses=[
            waiting("fetch-inputs", "ImagePullBackOff", 'Back-off pulling image "o:1"', "o:1")
        ],
        containerStatuses=[waiting("train", "PodInitializing", None)],
    )
    blocker = pod_blocker(pod)
    assert blocker == Blocker(
        "ImagePullBackOff",
        'container fetch-inputs cannot pull o:1: Back-off pulling image "o:1"',
        datetime(2026, 11, 21, 9, 59, 58, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    "pod",
    [
        pending_pod(
            conditions=[scheduled()], containerStatuses=[waiting("train", "ContainerCreating", None)]
        ),
        {"status": {"phase": "Running", "containerStatuses": [{"name": "train", "state": {"running": {}}}]}},
        {"status": {"phase": "Failed", "containerStatuses": [waiting("train", "ErrImagePull", "x")]}},
        pending_pod(
            conditions=[
                {"type": "PodScheduled", "status": "False", "reason": "SchedulerError", "message": "x"}
            ]
        ),
    ],
    ids=["creating", "running", "finished", "not-unschedulable"],
)
def test_a_pod_that_is_starting_running_or_done_is_not_stuck(pod: dict[str, Any]) -> None:
    assert pod_blocker(pod) is None


def test_the_newest_unfinished_pod_speaks_for_the_job() -> None:
    evicted = {
        "metadata": {"creationTimestamp": "2026-11-21T09:00:00Z"},
        "status": {"phase": "Failed", "containerStatuses": [waiting("train", "ErrImagePull", "old")]},
    }
    old = pending_pod(conditions=[scheduled()], containerStatuses=[waiting("train", "ErrImagePull", "old")])
    old["metadata"]["creationTimestamp"] = "2026-11-21T09:30:00Z"
    new = pending_pod(
        conditions=[scheduled()], containerStatuses=[waiting("train", "ImagePullBackOff", "new")]
    )
    blocker = pods_blocker([new, evicted, old])
    assert blocker is not None and blocker.message == "container train cannot pull registry.test/t:1: new"
    assert pods_blocker([evicted]) is None


def creating_pod(init: bool = False) -> dict[str, Any]:
    """Scheduled, no container created yet: what a pod whose volume cannot be mounted shows."""
    pod = pending_pod(
        conditions=[scheduled()],
        containerStatuses=[waiting("prepare-data", "PodInitializing" if init else "ContainerCreating", None)],
    )
    if init:
        pod["status"]["initContainerStatuses"] = [waiting("fetch-inputs", "PodInitializing", None)]
    pod["metadata"]["uid"] = "u1"
    return pod


def failed_mount(message: str, at: str = STAMP, pod: str = "p", uid: str = "u1") -> dict[str, Any]:
    return {
        "reason": "FailedMount",
        "type": "Warning",
        "message": message,
        "lastTimestamp": at,
        "involvedObject": {"kind": "Pod", "name": pod, "uid": uid},
    }


def test_a_volume_that_cannot_be_mounted_is_named_from_the_kubelets_event() -> None:
    events = [
        failed_mount('MountVolume.SetUp failed for volume "git-ssh" : secret "git-creds" not found'),
        failed_mount("Unable to attach or mount volumes: timed out", at="2026-11-21T09:00:00Z"),
        failed_mount('MountVolume.SetUp failed for volume "x" : secret "other" not found', pod="q"),
        failed_mount('MountVolume.SetUp failed for volume "x" : secret "old" not found', uid="earlier-pod"),
    ]
    assert mount_blocker(creating_pod(init=True), events) == Blocker(
        "SecretMissing", 'pod cannot mount volume git-ssh: secret "git-creds" not found', T0
    )
    configmap = failed_mount(
        'MountVolume.SetUp failed for volume "assistant-configmap" : configmap "moneybank" not found'
    )
    assert mount_blocker(creating_pod(), [configmap]) == Blocker(
        "MountFailed", 'pod cannot mount volume assistant-configmap: configmap "moneybank" not found', T0
    )
    assert mount_blocker(creating_pod(), []) is None  # mounting or pulling, nothing said yet
    running = {"status": {"phase": "Running", "containerStatuses": [{"name": "t", "state": {"running": {}}}]}}
    assert not waiting_to_be_created(running)
    assert mount_blocker(running, [configmap]) is None  # an old Event of a pod that started after all


def test_kueue_says_why_in_the_workloads_conditions() -> None:
    def workload(created: str, **condition: str) -> dict[str, Any]:
        return {"metadata": {"creationTimestamp": created}, "status": {"conditions": [condition]}}

    old = workload(
        "2026-11-21T09:00:00Z", type="QuotaReserved", status="False", message="LocalQueue q doesn't exist"
    )
    new = workload(
        STAMP,
        type="QuotaReserved",
        status="False",
        reason="Pending",
        message="couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in "
        "flavor a100, 1 more needed",
    )
    assert workload_message([old, new]) == (
        "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor a100, "
        "1 more needed"
    )
    reserved = workload(STAMP, type="QuotaReserved", status="True", message="Quota reserved")
    assert workload_message([reserved]) is None and workload_message([]) is None
    queued = observed(
        "data", "suspended", blocker=Blocker("Queued", "Kueue has not admitted it yet (queue q)")
    )
    assert with_workloads(queued, [old]).blocker == Blocker(
        "Queued", "Kueue has not admitted it yet (queue q): LocalQueue q doesn't exist"
    )
    assert with_workloads(queued, [reserved]) == queued


def test_a_suspended_job_with_a_queue_label_waits_for_kueue() -> None:
    job = {
        "metadata": {"name": "j", "labels": {LABEL_QUEUE: "gpu-queue"}, "creationTimestamp": STAMP},
        "spec": {"suspend": True},
    }
    assert job_blocker(job) == Blocker("Queued", "Kueue has not admitted it yet (queue gpu-queue)", T0)
    assert job_blocker({**job, "spec": {"suspend": False}}) is None  # admitted
    assert job_blocker({"metadata": {"name": "j"}, "spec": {"suspend": True}}) is None  # suspended by us


def test_evictions_are_counted_with_the_last_ones_words() -> None:
    def disrupted(reason: str, message: str, at: str) -> dict[str, Any]:
        condition = {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": message}
        return {"status": {"phase": "Failed", "conditions": [{**condition, "lastTransitionTime": at}]}}

    pods = [
        disrupted("PreemptionByScheduler", "default-scheduler: preempting", "2026-11-21T10:05:00Z"),
        disrupted(
            "DeletionByTaintManager", "Taint manager: deleting due to NoExecute taint", "2026-11-21T10:09:00Z"
        ),
        {"status": {"phase": "Running"}},
    ]
    assert evictions(pods) == (2, "DeletionByTaintManager: Taint manager: deleting due to NoExecute taint")
    assert evictions(pods[2:]) == (0, None)


def test_shorten_keeps_the_words_that_matter_on_one_line() -> None:
    assert shorten("rpc error: code = Unknown desc = a\n  b") == "a b"
    assert shorten("x" * 300, limit=10) == "xxxxxxxxx…"


# ----------------------------------------------------------------------------------- deadlines (pure)

LIMITS = StuckLimits()  # pull 5 min, secret 5 min, no limit for unschedulable and Kueue, 3 evictions


@pytest.mark.parametrize(
    ("reason", "waited", "expected"),
    [
        ("ImagePullBackOff", 299, None),
        ("ImagePullBackOff", 300, 300.0),
        ("SecretMissing", 301, 301.0),
        ("ContainerConfigError", 400, 400.0),
        ("Unschedulable", 86_400, None),  # no limit by default: an autoscaler may bring a GPU node
        ("Queued", 86_400, None),  # Kueue decides when it runs
    ],
)
def test_the_default_limits(reason: str, waited: int, expected: float | None) -> None:
    blocker = Blocker(reason, "why", T0)  # type: ignore[arg-type]
    assert waited_too_long(blocker, T0 + timedelta(seconds=waited), LIMITS) == expected


def test_a_blocker_without_a_known_start_never_times_out() -> None:
    assert waited_too_long(Blocker("ImagePullBackOff", "why", None), T0 + timedelta(days=1), LIMITS) is None


def test_configured_limits_for_unschedulable_and_queued() -> None:
    limits = StuckLimits(unschedulable=1800, queued=3600)
    assert waited_too_long(Blocker("Unschedulable", "w", T0), T0 + timedelta(minutes=29), limits) is None
    assert waited_too_long(Blocker("Unschedulable", "w", T0), T0 + timedelta(minutes=30), limits) == 1800
    assert waited_too_long(Blocker("Queued", "w", T0), T0 + timedelta(hours=1), limits) == 3600


def test_duration_text() -> None:
    assert [duration_text(s) for s in (45, 300, 372, 7500)] == ["45s", "5m00s", "6m12s", "2h05m"]


def observed(phase: str, state: str = "running", **fields: Any) -> ObservedJob:
    return ObservedJob(job_name("minimal", phase, H[phase]), phase, H[phase], state, **fields)  # type: ignore[arg-type,index]


PULL = Blocker("ImagePullBackOff", 'container prepare-data cannot pull o:1: Back-off pulling image "o:1"', T0)


def test_a_stuck_job_waits_and_says_why_until_its_limit_then_goes() -> None:
    data = observed("data", blocker=PULL)
    waiting_plan = plan("minimal", BASE, World((data,), now=T0 + timedelta(minutes=4)))
    assert waiting_plan == [Wait("data", data.name, PULL)]

    late = T0 + timedelta(minutes=6, seconds=12)
    message = (
        f"data preparation stopped after 6m12s waiting (Job {data.name} deleted): "
        'container prepare-data cannot pull o:1: Back-off pulling image "o:1"'
    )
    assert plan("minimal", BASE, World((data,), now=late)) == [
        DeleteJob(data.name, f"ImagePullBackOff: {message}"),
        Fail("data", "ImagePullBackOff", message),
    ]
    # Without a clock (`ftrecipe run`), or with the recipe suspended, nothing is failed for waiting.
    assert plan("minimal", BASE, World((data,))) == [Wait("data", data.name, PULL)]
    suspended = BASE.model_copy(update={"suspend": True})
    assert plan("minimal", suspended, World((data,), now=late))[-1] == Wait("data", data.name, None)


def test_the_third_eviction_fails_the_phase() -> None:
    data_done = observed("data", "succeeded")
    last = "EvictionByEvictionAPI: Eviction API: evicting"
    twice = observed("train", evictions=2, last_eviction=last)
    assert plan("minimal", BASE, World((data_done, twice), now=T0))[-1] == Wait("train", twice.name)
    thrice = observed("train", evictions=3, last_eviction=last)
    message = f"training stopped: its pod was evicted 3 times (Job {thrice.name} deleted); last: {last}"
    assert stopped(thrice, T0, LIMITS) == Fail("train", "Evicted", message)
    assert plan("minimal", BASE, World((data_done, thrice), now=T0))[-2:] == [
        DeleteJob(thrice.name, f"Evicted: {message}"),
        Fail("train", "Evicted", message),
    ]
    assert stopped(thrice, T0, StuckLimits(max_evictions=None)) is None


# ----------------------------------------------------------------------------------- status (pure)


def status_of(
    world: World, previous: FinetuneRecipeStatus | None = None, now: datetime = T0
) -> FinetuneRecipeStatus:
    return compute_status(
        BASE, 1, plan("minimal", BASE, world), prefixes=PREFIXES, now=now, previous=previous
    )


def reasons(st: FinetuneRecipeStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in st.conditions or []}


def test_the_status_says_what_the_pod_waits_for_and_remembers_a_stop() -> None:
    data = observed("data", blocker=PULL)
    running = status_of(World((observed("data"),)))
    stuck = status_of(World((data,), now=T0), previous=running)
    assert stuck.phase == "PreparingData"
    assert stuck.message == (
        f'data preparation waiting (Job {data.name}): container prepare-data cannot pull o:1: Back-off pulling image "o:1"'
    )
    assert reasons(stuck)["DataPrepared"] == ("Unknown", "ImagePullBackOff")
    assert reasons(stuck)["Ready"] == ("False", "ImagePullBackOff")
    assert stuck_event(running, stuck) == ("ImagePullBackOff", stuck.message)
    assert stuck_event(stuck, stuck) is None  # said once

    late = T0 + timedelta(minutes=7)
    failed = status_of(World((data,), now=late), previous=stuck, now=late)
    assert failed.phase == "Failed" and reasons(failed)["Ready"] == ("False", "ImagePullBackOff")
    assert failed.message is not None and failed.message.startswith("data preparation stopped after 7m00s")
    assert stuck_event(stuck, failed) is None  # the failure has its own Event

    # The Job is gone now: the status alone keeps the phase failed, with its reason.
    _, failed_hashes = remembered("minimal", BASE, failed, PREFIXES)
    assert failed_hashes == {H["data"]: failed.message}
    world = World(
        failed=failed_hashes, failure_reasons=failure_reasons(BASE, failed, failed_hashes), now=late
    )
    assert plan("minimal", BASE, world) == [Fail("data", "ImagePullBackOff", failed.message)]


def test_a_job_created_for_kueue_is_queued_from_the_start_never_running() -> None:
    queued_spec = BASE.model_copy(update={"queue_name": "gpu-queue"})
    actions = plan("minimal", queued_spec, World(now=T0))
    st = compute_status(queued_spec, 1, actions, prefixes=PREFIXES, now=T0)
    name = job_name("minimal", "data", H["data"])
    assert st.phase == "PreparingData"
    assert (
        st.message
        == f"data preparation waiting (Job {name}): Kueue has not admitted it yet (queue gpu-queue)"
    )
    assert reasons(st)["DataPrepared"] == ("Unknown", "Queued") and reasons(st)["Ready"] == (
        "False",
        "Queued",
    )
    assert st.data_preparation is not None and st.data_preparation.job_name == name


def previous_with(reason: str, since: datetime = T0, status: str = "Unknown") -> FinetuneRecipeStatus:
    cond = Condition(
        type="Trained",
        status=status,
        reason=reason,
        message="why",
        last_transition_time=since,
        observed_generation=1,
    )
    return FinetuneRecipeStatus(phase="Training", conditions=[cond], training=TrainingStatus(job_name="j"))


RUNNING_POD = {
    "status": {"phase": "Running", "containerStatuses": [{"name": "train", "state": {"running": {}}}]}
}
PULL_POD = pending_pod(
    conditions=[scheduled()], containerStatuses=[waiting("train", "ImagePullBackOff", "b")]
)


@pytest.mark.parametrize(
    ("reason", "pods", "minutes", "expected"),
    [
        ("Running", [RUNNING_POD], 1, False),  # nothing new
        ("Running", [], 1, False),  # no pod yet
        ("Running", [PULL_POD], 1, True),  # became stuck
        ("ImagePullBackOff", [PULL_POD], 4, False),  # already shown, within its limit
        ("ImagePullBackOff", [PULL_POD], 5, True),  # past its limit: the reconcile fails it
        ("ImagePullBackOff", [RUNNING_POD], 4, True),  # it started after all
        ("Queued", [], 600, False),  # no limit for Kueue by default
    ],
)
def test_the_progress_timer_asks_for_a_replan_only_when_the_pods_say_something_new(
    reason: str, pods: list[dict[str, Any]], minutes: int, expected: bool
) -> None:
    now = T0 + timedelta(minutes=minutes)
    assert replan_needed(previous_with(reason), "train", "j", pods, now, LIMITS) is expected


@pytest.mark.parametrize(
    ("reason", "minutes", "expected"),
    [
        ("Running", 60, False),  # its Events say more, not its status: the next reconcile reads them
        ("SecretMissing", 4, False),  # the reconcile found the missing Secret; still within its limit
        ("SecretMissing", 5, True),  # past its limit
        ("MountFailed", 5, True),
    ],
)
def test_the_timer_keeps_a_mount_failure_the_reconcile_found(
    reason: str, minutes: int, expected: bool
) -> None:
    now = T0 + timedelta(minutes=minutes)
    assert replan_needed(previous_with(reason), "train", "j", [creating_pod()], now, LIMITS) is expected


def test_the_timer_fails_a_queued_job_by_its_conditions_time_when_a_limit_is_set() -> None:
    limits = StuckLimits(queued=3600)
    assert not replan_needed(previous_with("Queued"), "train", "j", [], T0 + timedelta(minutes=59), limits)
    assert replan_needed(previous_with("Queued"), "train", "j", [], T0 + timedelta(minutes=60), limits)


# ----------------------------------------------------------------------------------- the operator

Body = dict[str, Any]
NS = "ml"
JOBS = "batch/v1/jobs"
IMAGES = Images(operator="registry.test/ftrecipe:test", trainer="registry.test/ftrecipe-trainer:test")
MINIMAL = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "minimal.yaml"


def recipe_manifest(**spec: Any) -> Body:
    body = cast(Body, yaml.safe_load(MINIMAL.read_text()))
    body["metadata"] = {"name": "minimal"}
    body["spec"]["evaluation"] = {"enabled": False}
    body["spec"].update(spec)
    return body


def apply_recipe(k8s: K8s, body: Body) -> None:
    k8s.custom.create_namespaced_custom_object(CRD_GROUP, CRD_VERSION, NS, CRD_PLURAL, body)


def annotate(k8s: K8s, key: str, value: str) -> None:
    patch = {"metadata": {"annotations": {key: value}}}
    k8s.custom.patch_namespaced_custom_object(CRD_GROUP, CRD_VERSION, NS, CRD_PLURAL, "minimal", patch)


def status(k8s: K8s) -> Body:
    return cast(Body, (k8s.get(CRD_RESOURCE, "minimal", NS) or {}).get("status") or {})


def wait_status(k8s: K8s, where: Callable[[Body], bool], message: str) -> Body:
    return cast(Body, k8s.wait_for(lambda: (st := status(k8s)) and where(st) and st, message=message))


def wait_phase(k8s: K8s, phase: str) -> Body:
    return wait_status(k8s, lambda st: st.get("phase") == phase, f"phase {phase}")


def condition(st: Body, kind: str) -> Body:
    return next(c for c in st.get("conditions", []) if c["type"] == kind)


def wait_job(k8s: K8s, name: str) -> Body:
    return k8s.wait_for_object(JOBS, name, NS)


def job_names(k8s: K8s) -> list[str]:
    return sorted(j["metadata"]["name"] for j in k8s.list(JOBS, NS))


def finish(k8s: K8s, job: str, container: str, figures_message: str) -> None:
    """The kubelet writes the pod's final status, then the Job controller the Job's (that order)."""
    k8s.set_job_pod(job, NS, "Succeeded", container=container, message=figures_message, suffix="done")
    k8s.set_job_status(job, NS, "succeeded")


def operator_run(k8s: K8s, **settings: Any) -> Any:
    options: dict[str, Any] = {
        "images": IMAGES,
        "resync_seconds": None,
        "progress_seconds": 0.2,
        "retry_delay": 0.5,
        "reports": ReportCache(),
        **settings,
    }
    chosen = OperatorSettings(**options)
    return k8s.run_operator(
        lambda registry: register(registry, settings=chosen),
        namespaces=[NS],
        posting=True,
        watching=[CRD_RESOURCE, JOBS],
    )


def warnings(k8s: K8s, reason: str) -> list[str]:
    return [e["message"] for e in k8s.events(NS) if e["type"] == "Warning" and e["reason"] == reason]


def to_training(k8s: K8s, body: dict[str, Any]) -> str:
    data = expected_job(body, "data")
    wait_job(k8s, data)
    finish(k8s, data, "prepare-data", encode(PhaseReport(True, "data published")))
    train = expected_job(body, "train")
    wait_job(k8s, train)
    wait_phase(k8s, "Training")
    k8s.set_job_status(train, NS, "running")
    return train


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_an_unschedulable_gpu_pod_shows_in_the_status_and_waits_for_a_node(k8s: K8s) -> None:
    body = recipe_manifest()
    with operator_run(k8s) as run:
        apply_recipe(k8s, body)
        train = to_training(k8s, body)
        # Two hours without a node: no default limit, the autoscaler may still bring one.
        since = stamp(datetime.now(UTC) - timedelta(hours=2))
        k8s.set_pod_unschedulable(train, NS, GPU_MESSAGE, container="train", since=since)
        expected = (
            f"training waiting (Job {train}): no node can run the pod: 0/3 nodes are available: "
            "3 Insufficient nvidia.com/gpu."
        )
        st = wait_status(k8s, lambda s: s.get("message") == expected, "the Unschedulable message")
        assert st["phase"] == "Training"
        assert condition(st, "Trained").items() >= {"status": "Unknown", "reason": "Unschedulable"}.items()
        assert condition(st, "Ready").items() >= {"status": "False", "reason": "Unschedulable"}.items()
        k8s.wait_for(lambda: warnings(k8s, "Unschedulable") == [expected], message="an Unschedulable Event")

        # A GPU node arrived: the pod runs, the status says so, the Job was never touched.
        k8s.set_job_pod(train, NS, "Running", container="train")
        st = wait_status(
            k8s, lambda s: s.get("message") == f"training running (Job {train})", "running again"
        )
        assert (
            condition(st, "Trained")["reason"] == "Running" and condition(st, "Ready")["reason"] == "Training"
        )
        assert job_names(k8s) == sorted([expected_job(body, "data"), train])
        assert warnings(k8s, "Unschedulable") == [expected]  # said once
    assert not run.errors, run.messages()


def test_an_image_that_cannot_be_pulled_fails_the_phase_after_its_deadline(k8s: K8s) -> None:
    body = recipe_manifest()
    data = expected_job(body, "data")
    image = "registry.test/ftrecipe:test"
    pull_error = (
        f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": failed to resolve '
        f'reference "{image}": {image}: not found'
    )
    with operator_run(k8s) as run:
        apply_recipe(k8s, body)
        wait_job(k8s, data)
        k8s.set_job_status(data, NS, "running")
        k8s.set_pod_waiting(
            data,
            NS,
            container="prepare-data",
            init_container="fetch-inputs",
            reason="ErrImagePull",
            message=pull_error,
            image=image,
        )
        why = (
            f'container fetch-inputs cannot pull {image}: failed to pull and unpack image "{image}": '
            f'failed to resolve reference "{image}": {image}: not found'
        )
        expected = f"data preparation waiting (Job {data}): {why}"
        st = wait_status(k8s, lambda s: s.get("message") == expected, "the ImagePullBackOff message")
        assert st["phase"] == "PreparingData"
        assert condition(st, "DataPrepared")["reason"] == "ImagePullBackOff"
        assert condition(st, "Ready")["reason"] == "ImagePullBackOff"
        assert job_names(k8s) == [data]  # within its 5 minutes: the Job stays

        # Six minutes later the kubelet still backs off: the phase fails and the Job (holding a node) goes.
        k8s.set_pod_waiting(
            data,
            NS,
            container="prepare-data",
            init_container="fetch-inputs",
            reason="ImagePullBackOff",
            message=f'Back-off pulling image "{image}"',
            image=image,
            scheduled_at=stamp(datetime.now(UTC) - timedelta(minutes=6)),
        )
        st = wait_phase(k8s, "Failed")
        assert re.fullmatch(
            rf"data preparation stopped after 6m0\ds waiting \(Job {data} deleted\): container fetch-inputs "
            rf'cannot pull {re.escape(image)}: Back-off pulling image "{re.escape(image)}"',
            st["message"],
        ), st["message"]
        assert condition(st, "Ready").items() >= {"status": "False", "reason": "ImagePullBackOff"}.items()
        assert (
            condition(st, "DataPrepared").items() >= {"status": "False", "reason": "ImagePullBackOff"}.items()
        )
        k8s.wait_for(lambda: job_names(k8s) == [], message="the stuck Job deleted")
        k8s.wait_for(
            lambda: st["message"] in warnings(k8s, "ImagePullBackOff"),
            message="a Warning Event with the failure",
        )
        # First the stuck one, then the failure: one Event each.
        assert sorted(warnings(k8s, "ImagePullBackOff")) == sorted([expected, st["message"]])
        # The deletion's own reconcile (or the next one) keeps it failed: nothing is created again.
        k8s.wait_for(
            lambda: any(f"reconciled (Job {data} deleted): Failed" in m for m in run.messages()),
            message="the reconcile of the deleted Job",
        )
        time_st = status(k8s)
        assert time_st["phase"] == "Failed" and condition(time_st, "Ready")["reason"] == "ImagePullBackOff"
        assert job_names(k8s) == []

        # The image was pushed: a retry runs the phase again.
        annotate(k8s, ANNOTATION_RETRY, "1")
        wait_job(k8s, data)
        st = wait_phase(k8s, "PreparingData")
        assert condition(st, "DataPrepared")["reason"] == "Running"
    assert not run.errors, run.messages()


def test_a_missing_secret_shows_until_it_is_created(k8s: K8s) -> None:
    body = recipe_manifest()
    data = expected_job(body, "data")
    with operator_run(k8s) as run:
        apply_recipe(k8s, body)
        wait_job(k8s, data)
        k8s.set_job_status(data, NS, "running")
        k8s.set_pod_waiting(
            data,
            NS,
            container="prepare-data",
            reason="CreateContainerConfigError",
            message="couldn't find key OPENAI_API_KEY in Secret ml/openai",
        )
        expected = (
            f"data preparation waiting (Job {data}): container prepare-data needs a missing Secret: "
            "couldn't find key OPENAI_API_KEY in Secret ml/openai"
        )
        st = wait_status(k8s, lambda s: s.get("message") == expected, "the SecretMissing message")
        assert condition(st, "Ready").items() >= {"status": "False", "reason": "SecretMissing"}.items()
        k8s.wait_for(lambda: warnings(k8s, "SecretMissing") == [expected], message="a SecretMissing Event")
        # The key was added to the Secret: the kubelet starts the container.
        k8s.set_job_pod(data, NS, "Running", container="prepare-data")
        wait_status(k8s, lambda s: s.get("message") == f"data preparation running (Job {data})", "running")
        assert job_names(k8s) == [data]
    assert not run.errors, run.messages()


def test_a_secret_volume_that_cannot_be_mounted_shows_and_fails_the_phase(k8s: K8s) -> None:
    body = recipe_manifest()
    data = expected_job(body, "data")
    mount = {"container": "prepare-data", "init_container": "fetch-inputs", "volume": "git-ssh"}
    with operator_run(k8s, resync_seconds=0.5) as run:
        apply_recipe(k8s, body)
        wait_job(k8s, data)
        k8s.set_job_status(data, NS, "running")
        k8s.set_pod_mount_failure(data, NS, why='secret "git-creds" not found', **mount)
        expected = (
            f"data preparation waiting (Job {data}): pod cannot mount volume git-ssh: "
            'secret "git-creds" not found'
        )
        st = wait_status(k8s, lambda s: s.get("message") == expected, "the SecretMissing message")
        assert condition(st, "Ready").items() >= {"status": "False", "reason": "SecretMissing"}.items()
        # Five minutes on, the Secret is still missing: the phase fails, the Job goes.
        five_minutes_ago = stamp(datetime.now(UTC) - timedelta(minutes=5))
        k8s.set_pod_mount_failure(
            data, NS, why='secret "git-creds" not found', scheduled_at=five_minutes_ago, **mount
        )
        st = wait_phase(k8s, "Failed")
        assert re.fullmatch(
            rf"data preparation stopped after 5m0\ds waiting \(Job {data} deleted\): pod cannot mount "
            r'volume git-ssh: secret "git-creds" not found',
            st["message"],
        ), st["message"]
        assert condition(st, "Ready")["reason"] == "SecretMissing"
        k8s.wait_for(lambda: job_names(k8s) == [], message="the stuck Job deleted")
    assert not run.errors, run.messages()


def test_events_unreadable_by_rbac_leave_the_pod_running_not_the_reconcile_failing(k8s: K8s) -> None:
    """Listing Events needs `list` on events (the chart grants it); an older Role without it must not
    break reconciles: the mount failure then just goes unseen."""
    k8s.ensure_namespace(NS)
    k8s.create("v1/events", {"metadata": {"name": "e1"}, **failed_mount("m", pod="p-1")}, NS)
    assert [e["metadata"]["name"] for e in list_pod_events_sync(NS, "p-1")] == ["e1"]
    assert list_pod_events_sync(NS, "other") == []
    k8s.emulator[f"get /api/v1/namespaces/{NS}/events"] << 403
    assert list_pod_events_sync(NS, "p-1") == []


def test_without_kueue_or_its_rbac_a_queued_job_just_says_it_waits(k8s: K8s) -> None:
    k8s.ensure_namespace(NS)
    workload = {"metadata": {"name": "w", "labels": {"kueue.x-k8s.io/job-uid": "u1"}}, "spec": {}}
    k8s.create("kueue.x-k8s.io/v1beta1/workloads", workload, NS)
    assert [w["metadata"]["name"] for w in list_workloads_sync(NS, "u1")] == ["w"]
    assert list_workloads_sync(NS, "u2") == []
    k8s.emulator[f"get /apis/kueue.x-k8s.io/v1beta1/namespaces/{NS}/workloads"] << 404  # no Kueue
    assert list_workloads_sync(NS, "u1") == []


def test_a_job_kueue_has_not_admitted_is_queued_not_running(k8s: K8s) -> None:
    body = recipe_manifest(queueName="gpu-queue")
    data = expected_job(body, "data")
    # Kueue's Workload may come after the Job's first events: the resync reads it.
    with operator_run(k8s, resync_seconds=0.5) as run:
        apply_recipe(k8s, body)
        job = wait_job(k8s, data)
        assert job["spec"]["suspend"] is True
        # Kueue makes a Workload of it and says why it waits; the Job controller marks it suspended.
        quota = (
            "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor "
            "default-flavor, 1 more needed"
        )
        k8s.kueue_hold(data, NS, quota)
        k8s.set_job_status(data, NS, "suspended")
        expected = (
            f"data preparation waiting (Job {data}): Kueue has not admitted it yet (queue gpu-queue): {quota}"
        )
        st = wait_status(k8s, lambda s: s.get("message") == expected, "the Queued message")
        assert st["phase"] == "PreparingData"
        assert condition(st, "DataPrepared").items() >= {"status": "Unknown", "reason": "Queued"}.items()
        assert condition(st, "Ready")["reason"] == "Queued"
        # One Event, when it became Queued (Kueue's reason may have come later).
        head = f"data preparation waiting (Job {data}): Kueue has not admitted it yet (queue gpu-queue)"
        queued_events = k8s.wait_for(lambda: warnings(k8s, "Queued"), message="a Queued Event")
        assert len(queued_events) == 1 and queued_events[0].startswith(head), queued_events

        # Kueue admits it: the Job controller starts its pod.
        k8s.kueue_admit(data, NS)
        k8s.set_job_status(data, NS, "running")
        k8s.set_job_pod(data, NS, "Running", container="prepare-data")
        st = wait_status(
            k8s, lambda s: s.get("message") == f"data preparation running (Job {data})", "admitted"
        )
        assert condition(st, "DataPrepared")["reason"] == "Running"
        assert job_names(k8s) == [data]
        assert k8s.get(JOBS, data, NS)["spec"]["suspend"] is False  # type: ignore[index]
    assert not run.errors, run.messages()


def test_the_third_eviction_fails_training_instead_of_an_endless_loop(k8s: K8s) -> None:
    body = recipe_manifest()
    with operator_run(k8s) as run:
        apply_recipe(k8s, body)
        train = to_training(k8s, body)
        drains = [
            ("EvictionByEvictionAPI", "Eviction API: evicting"),
            ("PreemptionByScheduler", "default-scheduler: preempting to accommodate a higher priority pod"),
            ("DeletionByTaintManager", "Taint manager: deleting due to NoExecute taint"),
        ]
        start = datetime.now(UTC) - timedelta(minutes=10)
        for attempt, (reason, message) in enumerate(drains, start=1):
            k8s.set_job_pod(train, NS, "Running", container="train", suffix=f"pod{attempt}")
            at = stamp(start + timedelta(minutes=attempt))
            k8s.evict_pod(
                train, NS, container="train", reason=reason, message=message, at=at, suffix=f"pod{attempt}"
            )
            if attempt < len(drains):
                # The Job controller replaces an evicted pod (podFailurePolicy Ignore): training goes on.
                wait_ticks(k8s, PROGRESS_LISTING, 3, len(k8s.requests()))  # three timer ticks
                assert status(k8s)["phase"] == "Training" and job_names(k8s) == sorted(
                    [expected_job(body, "data"), train]
                )
        st = wait_phase(k8s, "Failed")
        assert st["message"] == (
            f"training stopped: its pod was evicted 3 times (Job {train} deleted); last: "
            "DeletionByTaintManager: Taint manager: deleting due to NoExecute taint"
        )
        assert (
            condition(st, "Ready")["reason"] == "Evicted" and condition(st, "Trained")["reason"] == "Evicted"
        )
        k8s.wait_for(lambda: job_names(k8s) == [expected_job(body, "data")], message="the train Job deleted")
        k8s.wait_for(lambda: warnings(k8s, "Evicted") == [st["message"]], message="an Evicted Event")
    assert not run.errors, run.messages()
