"""What the operator sees of a recipe's Jobs: Kubernetes Job objects turned into the planner's `ObservedJob`.

`observed_job` is pure (a Job as a plain dict, e.g. from a watch or a list); `list_recipe_jobs` lists a
recipe's Jobs by label with the synchronous `kubernetes` client, run in a worker thread so the operator's
event loop never blocks.

While a Job has not finished, its pods say whether it can start at all (`pod_blocker`: unschedulable, an
image that cannot be pulled, a missing Secret; `job_blocker`: a Job that Kueue has not admitted) and how
often they were evicted (`evictions`): the planner fails a phase that waited or was evicted too long.

A finished phase's result comes from its pod: the main container's termination message carries the
`PhaseReport` the phase command wrote (figures, and the one-line reason of a failure). Without one (a
crash, an OOM kill) the container's termination reason and exit code stand in, then the Job's ``Failed``
condition. A finished Job's pods never change again, so reports are cached by Job uid: a reconcile of a
finished recipe lists no pods.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Final, cast

import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from ftrecipe.api.v1alpha1 import FinetuneRecipeStatus
from ftrecipe.controller.kube_client import api_client
from ftrecipe.controller.manifests import (
    ANNOTATION_INPUTS_HASH,
    ANNOTATION_RECIPE,
    JOBSET_API_VERSION,
    LABEL_MANAGED_BY,
    LABEL_PHASE,
    LABEL_QUEUE,
    LABEL_RECIPE,
    MAIN_CONTAINER,
    MANAGER,
    label_value,
)
from ftrecipe.plan.cache_key import PHASES, Phase
from ftrecipe.plan.planner import (
    JOBSET_NOT_INSTALLED,
    Blocker,
    JobState,
    ObservedJob,
    StuckLimits,
    StuckReason,
    queued_blocker,
    stopped,
)
from ftrecipe.plan.status import ProgressPhase, phase_condition
from ftrecipe.termination import FAILED_AT_FIGURE, PhaseReport, decode, failure_order

JOB_NAME_LABEL: Final = "batch.kubernetes.io/job-name"  # set on a Job's pods by Kubernetes 1.27+
# The Job controller's own selector label on its pods (Kubernetes 1.27+): unlike the name, it never
# matches the pods of an earlier Job of the same name (a retry deletes the failed Job and creates anew).
CONTROLLER_UID_LABEL: Final = "batch.kubernetes.io/controller-uid"
# The JobSet controller's labels on its child Jobs' pods (a multi-node training), and the Job controller's
# completion index on each pod of an Indexed Job: pod 0 is the training's rank 0.
JOBSET_NAME_LABEL: Final = "jobset.sigs.k8s.io/jobset-name"
RESTART_ATTEMPT_LABEL: Final = "jobset.sigs.k8s.io/restart-attempt"
COMPLETION_INDEX_LABEL: Final = "batch.kubernetes.io/job-completion-index"


def pods_selector(job_name: str, uid: str | None) -> str:
    """The label selector of one Job's pods: by its uid when known, else by its name."""
    return f"{CONTROLLER_UID_LABEL}={uid}" if uid else f"{JOB_NAME_LABEL}={job_name}"


def _condition(job: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return cast(Mapping[str, Any], condition)
    return None


def job_state(job: Mapping[str, Any]) -> JobState:
    """succeeded/failed from the terminal conditions, then suspended, running (active pods) or pending."""
    if _condition(job, "Complete") is not None:
        return "succeeded"
    if _condition(job, "Failed") is not None:
        return "failed"
    if (job.get("spec") or {}).get("suspend"):
        return "suspended"
    if (job.get("status") or {}).get("active"):
        return "running"
    return "pending"


def failure_message(job: Mapping[str, Any]) -> str | None:
    """The ``Failed`` condition's message (or its reason), when the Job failed."""
    condition = _condition(job, "Failed")
    if condition is None:
        return None
    name = (job.get("metadata") or {}).get("name", "?")
    text = condition.get("message") or condition.get("reason")
    return f"Job {name} failed: {text}" if text else None


def observed_job(job: Mapping[str, Any]) -> ObservedJob | None:
    """The planner's view of one Job; None for a Job that is not one of ours (no phase or inputs hash).
    Its pods are not looked at here (`with_pods`)."""
    metadata = job.get("metadata") or {}
    phase = (metadata.get("labels") or {}).get(LABEL_PHASE)
    inputs_hash = (metadata.get("annotations") or {}).get(ANNOTATION_INPUTS_HASH)
    name = metadata.get("name")
    if phase not in PHASES or not inputs_hash or not name:
        return None
    return ObservedJob(
        name=name,
        phase=cast(Phase, phase),
        inputs_hash=inputs_hash,
        state=job_state(job),
        message=failure_message(job),
        failure_reason=(_condition(job, "Failed") or {}).get("reason"),
        blocker=job_blocker(job),
    )


# --------------------------------------------------------------------------------------------- JobSets


def jobset_state(jobset: Mapping[str, Any]) -> JobState:
    """A multi-node training's JobSet as the planner sees a Job: succeeded/failed from its terminal
    conditions (``Completed``, ``Failed``), then suspended (by us or for Kueue), running while a child Job
    has active pods, else pending (being created, or recreated after a restart)."""
    if _condition(jobset, "Completed") is not None:
        return "succeeded"
    if _condition(jobset, "Failed") is not None:
        return "failed"
    if (jobset.get("spec") or {}).get("suspend"):
        return "suspended"
    replicated = (jobset.get("status") or {}).get("replicatedJobsStatus") or []
    if any(r.get("active") or r.get("ready") for r in replicated):
        return "running"
    return "pending"


def jobset_restarts(jobset: Mapping[str, Any]) -> tuple[int, int]:
    """(restarts so far, counted or not, ``failurePolicy.maxRestarts``) of a JobSet."""
    restarts = (jobset.get("status") or {}).get("restarts") or 0
    policy = (jobset.get("spec") or {}).get("failurePolicy") or {}
    return int(restarts), int(policy.get("maxRestarts") or 0)


def jobset_uncounted_restarts(jobset: Mapping[str, Any]) -> int:
    """A JobSet's restarts that did not count toward maxRestarts: our preemption rule's
    (RestartJobSetAndIgnoreMaxRestarts). JobSet (v0.6.0+) counts every restart in ``status.restarts`` and
    the counted ones in ``restartsCountTowardsMax`` (omitted while 0)."""
    status = jobset.get("status") or {}
    restarts = int(status.get("restarts") or 0)
    return restarts - min(int(status.get("restartsCountTowardsMax") or 0), restarts)


JOBSET_PREEMPTED = (
    "a node was preempted, and the JobSet restarted every node without counting it toward maxRestarts"
)


def observed_jobset(jobset: Mapping[str, Any]) -> ObservedJob | None:
    """The planner's view of a multi-node training's JobSet (carrying the labels a Job would), with its
    restarts; None when it is not one of ours."""
    job = observed_job({**jobset, "status": {}})  # its labels and annotations are a Job's
    if job is None:
        return None
    state = jobset_state(jobset)
    failed = _condition(jobset, "Failed")
    text = (failed or {}).get("message") or (failed or {}).get("reason")
    restarts, max_restarts = jobset_restarts(jobset)
    preemptions = jobset_uncounted_restarts(jobset)
    return replace(
        job,
        state=state,
        message=f"JobSet {job.name} failed: {text}" if failed is not None and text else None,
        failure_reason=(failed or {}).get("reason"),
        blocker=job_blocker(jobset) if state == "suspended" else None,
        kind="JobSet",
        restarts=restarts - preemptions,  # the ones that use up maxRestarts
        max_restarts=max_restarts,
        # A preempted group restarts without using up maxRestarts; it counts as an eviction instead, so
        # --max-evictions bounds a node pool that keeps reclaiming, as for a single-node Job.
        evictions=preemptions,
        last_eviction=JOBSET_PREEMPTED if preemptions else None,
    )


def jobset_pods_selector(jobset_name: str) -> str:
    return f"{JOBSET_NAME_LABEL}={jobset_name}"


def current_attempt(job: ObservedJob, pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A JobSet's pods of its current restart attempt (an earlier attempt's may linger until the garbage
    collector removes them)."""
    attempt = str((job.restarts or 0) + job.evictions)  # every restart, counted or a preemption's
    return [
        p
        for p in pods
        if ((p.get("metadata") or {}).get("labels") or {}).get(RESTART_ATTEMPT_LABEL, attempt) == attempt
    ]


def rank_zero(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods with completion index 0 (rank 0 of a multi-node training: it reports and logs progress);
    all of them when none carries a completion index (a plain Job's)."""
    indexed = [p for p in pods if COMPLETION_INDEX_LABEL in ((p.get("metadata") or {}).get("labels") or {})]
    if not indexed:
        return list(pods)
    return [p for p in indexed if p["metadata"]["labels"][COMPLETION_INDEX_LABEL] == "0"]


def jobset_report(job: ObservedJob, pods: Sequence[Mapping[str, Any]]) -> PhaseReport | None:
    """The report of a finished JobSet from its current attempt's pods: rank 0's when it succeeded (the
    one that publishes the adapter and its figures), else the failed pod's that tells the root cause,
    whichever node it ran on: a rank's own failure before a pod's that does not say, before the ranks that
    broke because another failed or were torn down (`termination.failure_order`), the earliest first."""
    attempt = current_attempt(job, pods)
    if job.state == "succeeded":
        return job_report(job, rank_zero(attempt))
    failed = []
    for pod in attempt:
        report = pod_report(pod, job.phase)
        if report is not None and not report.ok:
            failed.append((failure_order(report), _failed_at(report, pod), report))
    return min(failed, key=lambda item: item[:2])[2] if failed else None


def _failed_at(report: PhaseReport, pod: Mapping[str, Any]) -> datetime:
    """When the report says its rank failed, else when the pod's containers finished."""
    return (
        parse_time(report.figures.get(FAILED_AT_FIGURE))
        or parse_time(_finished_at(pod))
        or datetime.max.replace(tzinfo=UTC)
    )


def with_jobset_report(job: ObservedJob, report: PhaseReport | None) -> ObservedJob:
    """The JobSet with its report; a failure reads as its pod's one line, with the restarts it took."""
    job = with_report(job, report)
    if job.state == "failed" and report is not None and not report.ok and report.message and job.restarts:
        limit = f" of {job.max_restarts}" if job.max_restarts else ""
        return replace(
            job, message=f"{report.message} (JobSet {job.name} failed after {job.restarts}{limit} restarts)"
        )
    return job


# --------------------------------------------------------------------------------------------- stuck pods

# Container waiting reasons of an image that cannot be pulled (kubelet's images package).
_PULL_REASONS: Final = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable"}
)
# The scheduler's words for a pod whose PersistentVolumeClaim does not exist.
_MISSING_CLAIM: Final = re.compile(r'persistentvolumeclaim "[^"]+" not found')
_RPC_PREFIX: Final = re.compile(r"^rpc error: code = \w+ desc = ")
MESSAGE_LIMIT: Final = 240


def parse_time(text: object) -> datetime | None:
    """A Kubernetes timestamp (``2026-11-21T10:00:00Z``); None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def shorten(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """The scheduler's or kubelet's words on one line, without the noise around them: the container
    runtime's ``rpc error: code = … desc =`` wrapper, the scheduler's ``preemption: …`` tail (it repeats
    why preempting others would not help), and anything past ``limit`` characters."""
    line = " ".join(text.split())
    line = _RPC_PREFIX.sub("", line)
    line = line.split(" preemption: ", 1)[0]
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _pod_condition(pod: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return cast(Mapping[str, Any], condition)
    return None


def _finished_pod(pod: Mapping[str, Any]) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase in ("Succeeded", "Failed") or bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def pod_blocker(pod: Mapping[str, Any]) -> Blocker | None:
    """Why this pod has not started, from its status as the scheduler and the kubelet write it; None when
    nothing keeps it (it runs, is being pulled or created, or has finished).

    * ``Unschedulable``: condition PodScheduled False, reason Unschedulable (the scheduler's message, e.g.
      ``0/3 nodes are available: 3 Insufficient nvidia.com/gpu.``), since that condition's transition;
      ``MountFailed`` when what it lacks is a PersistentVolumeClaim that does not exist.
    * ``ImagePullBackOff``: a container (init containers first) waiting with ErrImagePull,
      ImagePullBackOff, InvalidImageName, ...
    * ``SecretMissing`` / ``ContainerConfigError``: a container waiting with CreateContainerConfigError
      (``secret "x" not found``, ``couldn't find key k in Secret ns/x``; other config errors).

    The kubelet's waiting states carry no time: they count from when the pod was scheduled (the kubelet
    starts pulling then), else from the pod's creation.
    """
    if _finished_pod(pod):
        return None
    scheduled = _pod_condition(pod, "PodScheduled")
    if (
        scheduled is not None
        and scheduled.get("status") == "False"
        and scheduled.get("reason") == "Unschedulable"
    ):
        words = shorten(str(scheduled.get("message") or "no node fits the pod"))
        since = parse_time(scheduled.get("lastTransitionTime"))
        if (claim := _MISSING_CLAIM.search(words)) is not None:
            # No node will ever do: a claim the recipe names (base model, model cache) does not exist.
            return Blocker("MountFailed", f"pod cannot start: {claim[0]}", since)
        return Blocker("Unschedulable", f"no node can run the pod: {words}", since)
    since = None
    if scheduled is not None and scheduled.get("status") == "True":
        since = parse_time(scheduled.get("lastTransitionTime"))
    since = since or parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
    status = pod.get("status") or {}
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        name = container.get("name", "?")
        words = shorten(str(waiting.get("message") or reason or ""))
        if reason in _PULL_REASONS:
            image = container.get("image") or "its image"
            return Blocker("ImagePullBackOff", f"container {name} cannot pull {image}: {words}", since)
        if reason == "CreateContainerConfigError":
            if "secret" in words.lower():
                return Blocker("SecretMissing", f"container {name} needs a missing Secret: {words}", since)
            return Blocker("ContainerConfigError", f"container {name} cannot be created: {words}", since)
    return None


_MOUNT_FAILURE: Final = re.compile(r'^MountVolume\.\w+ failed for volume "(?P<volume>[^"]+)" : (?P<why>.+)$')
# Waiting reasons of containers the kubelet has not created yet (volumes, images, the sandbox).
_NOT_CREATED: Final = frozenset({"ContainerCreating", "PodInitializing"})


def waiting_to_be_created(pod: Mapping[str, Any]) -> bool:
    """Scheduled, and none of its containers created yet: the kubelet is still mounting its volumes or
    pulling its images. A volume that cannot be mounted shows only in the pod's Events (`mount_blocker`)."""
    if _finished_pod(pod) or (pod.get("status") or {}).get("phase") != "Pending":
        return False
    scheduled = _pod_condition(pod, "PodScheduled")
    if scheduled is None or scheduled.get("status") != "True":
        return False
    status = pod.get("status") or {}
    containers = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    return all(
        ((c.get("state") or {}).get("waiting") or {}).get("reason") in _NOT_CREATED for c in containers
    )


def _scheduled_at(pod: Mapping[str, Any]) -> datetime | None:
    scheduled = _pod_condition(pod, "PodScheduled")
    since = parse_time(scheduled.get("lastTransitionTime")) if scheduled is not None else None
    return since or parse_time((pod.get("metadata") or {}).get("creationTimestamp"))


def mount_blocker(pod: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> Blocker | None:
    """Why a pod that waits to be created cannot mount a volume, from the kubelet's latest ``FailedMount``
    Event about it (``MountVolume.SetUp failed for volume "git-ssh" : secret "git-creds" not found``):
    ``SecretMissing`` for a Secret, ``MountFailed`` otherwise (a ConfigMap, a volume plugin); since the
    pod was scheduled. None when it is not waiting or no such Event is about it."""
    if not waiting_to_be_created(pod):
        return None
    metadata = pod.get("metadata") or {}
    mine = [
        event
        for event in events
        if event.get("reason") == "FailedMount"
        and (event.get("involvedObject") or {}).get("name") == metadata.get("name")
        and (event.get("involvedObject") or {}).get("uid") in (None, metadata.get("uid"))
    ]
    if not mine:
        return None
    last = max(mine, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    text = " ".join(str(last.get("message") or "").split())
    found = _MOUNT_FAILURE.match(text)
    why = shorten(found["why"] if found else text)
    words = (
        f"pod cannot mount volume {found['volume']}: {why}" if found else f"pod cannot mount a volume: {why}"
    )
    reason: StuckReason = "SecretMissing" if re.search(r'\bsecrets? "', why) else "MountFailed"
    return Blocker(reason, words, _scheduled_at(pod))


def job_blocker(job: Mapping[str, Any]) -> Blocker | None:
    """``Queued`` for a Job created suspended for Kueue (its queue label) that Kueue has not admitted yet;
    since the Job's creation. Whether the recipe itself is suspended is the planner's business."""
    metadata = job.get("metadata") or {}
    queue = (metadata.get("labels") or {}).get(LABEL_QUEUE)
    if not queue or not (job.get("spec") or {}).get("suspend") or job_state(job) != "suspended":
        return None
    return queued_blocker(queue, parse_time(metadata.get("creationTimestamp")))


# Kueue's Workload of a Job carries the Job's uid in this label.
KUEUE_JOB_UID_LABEL: Final = "kueue.x-k8s.io/job-uid"
KUEUE_WORKLOADS: Final = ("kueue.x-k8s.io", "v1beta1", "workloads")


def workload_message(workloads: Sequence[Mapping[str, Any]]) -> str | None:
    """Why Kueue has not admitted a Job, in Kueue's words, from its newest Workload's conditions
    (``QuotaReserved`` False: ``couldn't assign flavors to pod set main: insufficient unused quota for
    nvidia.com/gpu in flavor default-flavor, 1 more needed``, ``LocalQueue gpu-queue doesn't exist``; else
    ``Admitted`` False); None when it says nothing."""
    for workload in sorted(workloads, key=_created, reverse=True):
        for kind in ("QuotaReserved", "Admitted"):
            condition = _pod_condition(workload, kind)  # same shape: status.conditions[type]
            if condition is not None and condition.get("status") == "False" and condition.get("message"):
                return shorten(str(condition["message"]))
    return None


def with_workloads(job: ObservedJob, workloads: Sequence[Mapping[str, Any]]) -> ObservedJob:
    """A Job waiting for Kueue, with Kueue's reason in its blocker's message."""
    why = workload_message(workloads)
    if job.blocker is None or job.blocker.reason != "Queued" or why is None:
        return job
    return replace(job, blocker=replace(job.blocker, message=f"{job.blocker.message}: {why}"))


def list_workloads_sync(namespace: str, job_uid: str) -> list[dict[str, Any]]:
    """Kueue's Workloads of one Job; none when Kueue is not installed (404) or the operator may not read
    them (403): the status then says only that the Job waits for Kueue."""
    group, version, plural = KUEUE_WORKLOADS
    try:
        return list_items(
            f"/apis/{group}/{version}/namespaces/{namespace}/{plural}",
            labelSelector=f"{KUEUE_JOB_UID_LABEL}={job_uid}",
        )
    except ApiException as error:
        if error.status in (401, 403, 404):
            return []
        raise


def _created(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("creationTimestamp") or "")


def pods_blocker(pods: Sequence[Mapping[str, Any]]) -> Blocker | None:
    """Why a pod of the Job that has not finished cannot start (`pod_blocker`), the newest first; None when
    all can. A Job has one such pod; a multi-node training's JobSet one per node, and one that cannot
    start holds back all the others."""
    for pod in sorted((p for p in pods if not _finished_pod(p)), key=_created, reverse=True):
        if (blocker := pod_blocker(pod)) is not None:
            return blocker
    return None


def evictions(pods: Sequence[Mapping[str, Any]]) -> tuple[int, str | None]:
    """How many of a Job's pods were disrupted (condition DisruptionTarget True: preemption, a drain, the
    taint manager, node pressure), with the last one's reason and message."""
    disrupted = []
    for pod in pods:
        condition = _pod_condition(pod, "DisruptionTarget")
        if condition is not None and condition.get("status") == "True":
            disrupted.append((str(condition.get("lastTransitionTime") or ""), _created(pod), condition))
    if not disrupted:
        return 0, None
    *_, last = max(disrupted, key=lambda seen: seen[:2])
    words = shorten(str(last.get("message") or ""))
    reason = str(last.get("reason") or "DisruptionTarget")
    return len(disrupted), f"{reason}: {words}" if words else reason


def newest_live_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    live = sorted((p for p in pods if not _finished_pod(p)), key=_created)
    return live[-1] if live else None


def with_pods(
    job: ObservedJob, pods: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]] = ()
) -> ObservedJob:
    """The unfinished Job with what its pods say: why the current one cannot start (its status, else the
    kubelet's FailedMount `events` about it), how many were evicted."""
    count, last = evictions(pods)
    newest = newest_live_pod(pods)
    blocker = pods_blocker(pods) or (mount_blocker(newest, events) if newest is not None else None)
    # A JobSet's evictions so far are its preempted groups' restarts (`observed_jobset`); a Job's are 0.
    return replace(
        job,
        blocker=blocker or job.blocker,
        evictions=job.evictions + count,
        last_eviction=last or job.last_eviction,
    )


def replan_needed(
    status: FinetuneRecipeStatus,
    phase: Phase,
    job_name: str,
    pods: Sequence[Mapping[str, Any]],
    now: datetime,
    limits: StuckLimits,
) -> bool:
    """Whether the running phase's pods say something its status does not: its pod became stuck, stuck for
    another reason, unstuck, or waited (or was evicted) past the limits. A stuck pod changes nothing in its
    Job, so no Job event would ask for a re-plan; the progress timer asks this instead.

    A Job waiting for Kueue has no pods: the status's own condition says since when; once it has pods,
    Kueue admitted it."""
    condition = phase_condition(status, phase)
    if condition is None or condition.status != "Unknown" or condition.reason == "Suspended":
        return False
    if condition.reason == JOBSET_NOT_INSTALLED:
        return False  # no JobSet, no pods: the resync retries it
    if condition.reason == "Queued":
        if pods:
            return True
        queued = Blocker("Queued", condition.message, condition.last_transition_time)
        job = ObservedJob(job_name, phase, "", "suspended", blocker=queued)
        return stopped(job, now, limits) is not None
    count, last = evictions(pods)
    blocker = pods_blocker(pods)
    newest = newest_live_pod(pods)
    if blocker is None and newest is not None and waiting_to_be_created(newest):
        if condition.reason not in ("SecretMissing", "MountFailed"):
            return False  # mounting or pulling: only its Events could say more, and a reconcile reads them
        # A volume the reconcile found unmountable (its Events, not read here): it still waits.
        reason: StuckReason = "SecretMissing" if condition.reason == "SecretMissing" else "MountFailed"
        blocker = Blocker(reason, condition.message, _scheduled_at(newest))
    job = ObservedJob(job_name, phase, "", "running", blocker=blocker, evictions=count, last_eviction=last)
    if stopped(job, now, limits) is not None:
        return True
    expected = job.blocker.reason if job.blocker is not None else "Running"
    return condition.reason != expected


def _terminated(pod: Mapping[str, Any], container: str) -> Mapping[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            terminated = (status.get("state") or {}).get("terminated")
            return cast(Mapping[str, Any], terminated) if terminated else None
    return None


def _init_failure(pod: Mapping[str, Any]) -> str | None:
    """The init container's (fetch-inputs) report or reason when it failed: then the main one never ran."""
    for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated") or {}
        if terminated.get("exitCode", 0) != 0:
            report = decode(terminated.get("message"))
            name = status.get("name", "init")
            if report is not None and report.message:
                return f"{name}: {report.message}"
            return f"{name}: {terminated.get('reason') or 'Error'} (exit code {terminated.get('exitCode')})"
    return None


def pod_report(pod: Mapping[str, Any], phase: Phase) -> PhaseReport | None:
    """What a finished pod of ``phase`` says: its main container's report, else a report made from the
    termination reason and exit code; None while it runs."""
    if (init := _init_failure(pod)) is not None:
        return PhaseReport(ok=False, message=init)
    terminated = _terminated(pod, MAIN_CONTAINER[phase])
    if terminated is None:
        return None
    code = terminated.get("exitCode")
    report = decode(terminated.get("message"))
    if report is not None and not (report.ok and code != 0):  # a success report from a crashed container
        return report
    if code == 0:
        return PhaseReport(ok=True, message="")
    reason = terminated.get("reason") or "Error"
    return PhaseReport(
        ok=False, message=f"container {MAIN_CONTAINER[phase]} ended with {reason} (exit code {code})"
    )


def _finished_at(pod: Mapping[str, Any]) -> str:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    times = [((s.get("state") or {}).get("terminated") or {}).get("finishedAt") or "" for s in statuses]
    return max(times, default="")


def job_report(job: ObservedJob, pods: Sequence[Mapping[str, Any]]) -> PhaseReport | None:
    """The report of a finished Job: from a succeeded pod when it succeeded, else from the last failed one."""
    reports = []
    for pod in sorted(pods, key=_finished_at):
        report = pod_report(pod, job.phase)
        if report is not None:
            reports.append(report)
    if job.state == "succeeded":
        return next((r for r in reversed(reports) if r.ok), None)
    return next((r for r in reversed(reports) if not r.ok), None)


def with_report(job: ObservedJob, report: PhaseReport | None) -> ObservedJob:
    """The Job with its report; a failure's message becomes the report's one line, when there is one."""
    if report is None:
        return job
    message = report.message if job.state == "failed" and not report.ok and report.message else job.message
    return replace(job, report=report, message=message)


# What each phase's progress lines carry for the status (`ftrecipe.plan.status.with_progress`).
PROGRESS_FIELDS: Final[dict[ProgressPhase, tuple[str, ...]]] = {
    "train": ("step", "total_steps", "epoch", "train_loss", "eval_loss", "eta_seconds"),
    "evaluate": ("stage", "done", "total", "eta_seconds"),
}


def latest_progress(log: str, phase: ProgressPhase) -> dict[str, Any] | None:
    """The last ``{"event": "progress", …}`` line of a phase command's log (train's steps, evaluate's
    answered turns), reduced to the fields that phase's status takes."""
    for line in reversed(log.splitlines()):
        line = line.strip()
        if not line.startswith("{") or '"progress"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "progress":
            return {key: event.get(key) for key in PROGRESS_FIELDS[phase]}
    return None


def recipe_selector(recipe_name: str) -> str:
    return f"{LABEL_MANAGED_BY}={MANAGER},{LABEL_RECIPE}={label_value(recipe_name)}"


def recipe_jobs(
    recipe_name: str, jobs: Sequence[Mapping[str, Any]], *, kind: str = "Job"
) -> tuple[ObservedJob, ...]:
    """The recipe's Jobs (or JobSets) among `jobs`, sorted by name: those being deleted and those of
    another recipe whose (shortened) label value happens to match are left out."""
    observed = []
    for job in jobs:
        metadata = job.get("metadata") or {}
        if metadata.get("deletionTimestamp"):
            continue
        owner = (metadata.get("annotations") or {}).get(ANNOTATION_RECIPE)
        if owner is not None and owner != recipe_name:
            continue
        seen = observed_jobset(job) if kind == "JobSet" else observed_job(job)
        if seen is not None:
            observed.append(seen)
    return tuple(sorted(observed, key=lambda j: j.name))


# --------------------------------------------------------------------------------------------- requests


# Writes urllib3 does not send again when a connection breaks under them (it cannot know they were not
# acted on); `kube_request` sends them once more.
WRITES_SENT_AGAIN: Final = frozenset({"POST", "PATCH"})


def kube_request(
    method: str,
    path: str,
    *,
    query: Mapping[str, str | int] | None = None,
    body: Any = None,
    content_type: str | None = None,
) -> bytes:
    """One request to the API server with the `kubernetes` client's default configuration (the pod's
    service account, or kubeconfig): the response's body as it came. Raises `ApiException` on a status
    other than 2xx, as the client's API methods do. Not through the client's generated API classes:
    importing BatchV1Api and CoreV1Api loads some 280 pydantic models (about 22 MiB of the operator's
    memory, a tenth of it at 2,000 recipes) for the handful of calls the operator makes. Every request
    goes through the process's one client and its pool of kept-alive connections (`kube_client`)."""
    client = api_client()
    headers = {"Accept": "application/json"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    request = client.param_serialize(
        method,
        path,
        query_params=[(k, v) for k, v in (query or {}).items()],
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    try:
        response = client.call_api(*request)
    except urllib3.exceptions.ProtocolError:
        if method not in WRITES_SENT_AGAIN:
            raise  # urllib3's Retry already sent a GET, PUT or DELETE again
        # The connection broke before any answer: most often a kept-alive one the API server (or a load
        # balancer) closed just as the request went out, so nothing was done. Once more, on another
        # connection. Safe for this operator's writes whatever happened: a create sent twice gets 409 (the
        # object is adopted), its patches merge the same values again, an Event at worst shows twice.
        response = client.call_api(*request)
    response.read()  # type: ignore[no-untyped-call]  # the whole body: the connection goes back to the pool
    if not 200 <= response.status <= 299:
        raise ApiException.from_response(http_resp=response, body=None, data=None)
    return bytes(response.data or b"")


def list_items(path: str, **query: str) -> list[dict[str, Any]]:
    """The items of one list request (``labelSelector=``, ``fieldSelector=`` ... as keywords)."""
    return list(json.loads(kube_request("GET", path, query=query)).get("items") or [])


def jobs_path(namespace: str, name: str | None = None) -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs" + (f"/{name}" if name else "")


def core_path(namespace: str, plural: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")


def _list_jobs_sync(namespace: str, selector: str) -> list[dict[str, Any]]:
    return list_items(jobs_path(namespace), labelSelector=selector)


def jobsets_path(namespace: str, name: str | None = None) -> str:
    return f"/apis/{JOBSET_API_VERSION}/namespaces/{namespace}/jobsets" + (f"/{name}" if name else "")


class JobSetsUnavailable(Exception):
    """The cluster has no JobSet API (404) or the operator may not use it (403: the chart's jobset switch)."""


# What the API server answers where JobSet is not installed (404), or not allowed to the operator (403).
JOBSET_UNAVAILABLE: Final = (403, 404)


def list_jobsets_sync(namespace: str, selector: str) -> list[dict[str, Any]]:
    """JobSets by label selector; raises `JobSetsUnavailable` where the operator cannot use JobSets."""
    try:
        return list_items(jobsets_path(namespace), labelSelector=selector)
    except ApiException as error:
        if error.status in JOBSET_UNAVAILABLE:
            raise JobSetsUnavailable(f"{error.status} {error.reason}") from None
        raise


def _list_pods_sync(namespace: str, selector: str) -> list[dict[str, Any]]:
    return list_items(core_path(namespace, "pods"), labelSelector=selector)


def list_pod_events_sync(namespace: str, pod: str) -> list[dict[str, Any]]:
    """The Events about one pod; none when the operator may not list Events (an older chart's RBAC): the
    pod then just shows as running, as before."""
    try:
        return list_items(
            core_path(namespace, "events"), fieldSelector=f"involvedObject.kind=Pod,involvedObject.name={pod}"
        )
    except ApiException as error:
        if error.status in (401, 403):
            return []
        raise


class ReportCache:
    """Reports of finished Jobs by Job uid (bounded): a finished Job's pods never change."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._reports: OrderedDict[str, PhaseReport | None] = OrderedDict()

    def get(self, uid: str) -> tuple[bool, PhaseReport | None]:
        if uid not in self._reports:
            return False, None
        self._reports.move_to_end(uid)
        return True, self._reports[uid]

    def put(self, uid: str, report: PhaseReport | None) -> None:
        self._reports[uid] = report
        self._reports.move_to_end(uid)
        while len(self._reports) > self._size:
            self._reports.popitem(last=False)


REPORTS: Final = ReportCache()


async def list_recipe_jobs(
    namespace: str, recipe_name: str, *, reports: ReportCache = REPORTS, jobsets: bool = False
) -> tuple[tuple[ObservedJob, ...], bool]:
    """This recipe's Jobs, listed by label selector, finished ones with their pod's report (the sync
    client, in worker threads); with `jobsets` (a multi-node training) its JobSets too. Also whether
    JobSets were asked for and are unavailable (`JobSetsUnavailable`): the planner then waits."""
    items = await asyncio.to_thread(_list_jobs_sync, namespace, recipe_selector(recipe_name))
    found = recipe_jobs(recipe_name, items)
    missing = False
    if jobsets:
        try:
            sets = await asyncio.to_thread(list_jobsets_sync, namespace, recipe_selector(recipe_name))
        except JobSetsUnavailable:
            sets, missing = [], True
        items += sets
        found = tuple(sorted((*found, *recipe_jobs(recipe_name, sets, kind="JobSet")), key=lambda j: j.name))
    uids = {(j.get("metadata") or {}).get("name"): (j.get("metadata") or {}).get("uid") or "" for j in items}
    observed = []
    for job in found:
        pods: Sequence[Mapping[str, Any]]
        if job.state in ("pending", "running"):
            # Can its pod start, how often was it evicted: unfinished Jobs' pods are few (one, plus the
            # evicted ones), and they change without a Job event only while stuck.
            if job.kind == "JobSet":
                selector = jobset_pods_selector(job.name)
                pods = current_attempt(job, await asyncio.to_thread(_list_pods_sync, namespace, selector))
            else:
                selector = pods_selector(job.name, uids.get(job.name))
                pods = await asyncio.to_thread(_list_pods_sync, namespace, selector)
            newest = newest_live_pod(pods)
            events: list[dict[str, Any]] = []
            if newest is not None and pod_blocker(newest) is None and waiting_to_be_created(newest):
                # Not created yet: a volume that cannot be mounted says so only in the pod's Events.
                pod_name = (newest.get("metadata") or {}).get("name", "")
                events = await asyncio.to_thread(list_pod_events_sync, namespace, pod_name)
            job = with_pods(job, pods, events)
        elif job.blocker is not None and job.blocker.reason == "Queued" and uids.get(job.name):
            # Why Kueue holds it (no quota, no such LocalQueue) is in its Workload.
            workloads = await asyncio.to_thread(list_workloads_sync, namespace, uids[job.name])
            job = with_workloads(job, workloads)
        elif job.state in ("succeeded", "failed"):
            uid = uids.get(job.name, "")
            known, report = reports.get(uid)
            if not known:
                if job.kind == "JobSet":
                    selector = jobset_pods_selector(job.name)
                    pods = await asyncio.to_thread(_list_pods_sync, namespace, selector)
                    report = jobset_report(job, pods)
                else:
                    pods = await asyncio.to_thread(_list_pods_sync, namespace, pods_selector(job.name, uid))
                    report = job_report(job, pods)
                if uid and (report is not None or not pods):
                    # No pods left (garbage-collected) will not change either; a pod without a
                    # report yet might (its status is written after the Job's), so ask again.
                    reports.put(uid, report)
            job = with_jobset_report(job, report) if job.kind == "JobSet" else with_report(job, report)
        observed.append(job)
    return tuple(observed), missing


def _running_pod_log_sync(namespace: str, job_name: str, container: str, tail_lines: int) -> str | None:
    pods = [
        p
        for p in _list_pods_sync(namespace, f"{JOB_NAME_LABEL}={job_name}")
        if (p.get("status") or {}).get("phase") == "Running"
    ]
    if not pods:
        return None
    newest = max(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    return pod_log_sync(namespace, newest["metadata"]["name"], container, tail_lines)


def pod_log_sync(namespace: str, pod: str, container: str, tail_lines: int) -> str:
    """The last `tail_lines` lines of one container's log."""
    path = core_path(namespace, "pods", pod) + "/log"
    data = kube_request("GET", path, query={"container": container, "tailLines": tail_lines})
    return data.decode("utf-8", errors="replace")


async def job_pods(namespace: str, job_name: str) -> list[dict[str, Any]]:
    """The pods of one Job (the sync client, in a worker thread)."""
    return await asyncio.to_thread(_list_pods_sync, namespace, f"{JOB_NAME_LABEL}={job_name}")


async def phase_progress(
    namespace: str, job_name: str, phase: ProgressPhase, *, tail_lines: int = 40
) -> dict[str, Any] | None:
    """The latest progress line of the running pod of ``phase``'s Job, read from its main container's log
    (the trainer prints one per logging step, evaluate one per quarter of the turns or every 5 seconds)."""
    log = await asyncio.to_thread(
        _running_pod_log_sync, namespace, job_name, MAIN_CONTAINER[phase], tail_lines
    )
    return latest_progress(log, phase) if log is not None else None
