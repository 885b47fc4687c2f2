"""The kopf shell around the pure planner: observe a recipe's Jobs, plan, apply the actions, write status.

One `Controller` per operator keeps what it needs between events: each recipe's latest body (from the
watch) and the status it last wrote (it is the status's only writer), behind one lock per recipe, so
that no two reconciles of a recipe ever overlap. Handlers (added to a registry by `register`, never at
import):

* ``recipe-event`` (``@kopf.on.event`` on FinetuneRecipes): keeps the body and, when the event asks for it
  (`ftrecipe.plan.status.needs_reconcile`: a recipe never planned, a new spec generation, a new value of
  the ``ftrecipe.dev/retry`` annotation, or an unfinished recipe seen for the first time since the
  operator started), reconciles it: parse, list its Jobs by label, ask which phase bundles already
  exist (S3 output only, when ``OperatorSettings.read_bundle`` is given), run `plan`, apply its actions
  (create/delete/suspend/resume Jobs), write `compute_status` with one status patch, and post Events on
  phase changes. A finished recipe is not reconciled again at start-up: an upgraded operator leaves it
  as it is, and the phase hashes the status recorded (``status.plannedWith``) stand until the spec's
  generation changes. Level-based: a restarted operator re-plans from what exists, and a Job that
  already exists (409) is simply adopted. Also keeps the ``ftrecipe_recipes{phase}`` gauge.
* ``job-event`` (``@kopf.on.event`` on our Jobs, watched with a server-side label selector): a Job
  finished, went away or changed state (admitted by Kueue, running, suspended), so its recipe is
  reconciled at once; a Job that was just created changes nothing the status shows and costs no request,
  nor do the Jobs listed when the operator starts (the unfinished recipes are reconciled anyway).
* one operator-wide task (started by ``@kopf.on.startup``), every few seconds: retries reconciles that
  hit an API error; every ``OperatorSettings.resync_seconds``, as a safety net for lost watch events,
  lists the namespace's unfinished Jobs of ours once and reconciles the recipes whose Job it shows
  otherwise than the watch did (one request per namespace, not per recipe: a GPU phase runs for hours),
  and those whose Job waits for something no Job event reports (Kueue's Workload, a stuck pod);
  and every
  ``OperatorSettings.progress_seconds`` lists the namespace's unfinished pods of ours once: a phase whose
  pod says what its status does not (stuck, unstuck, evicted too often) is reconciled, and a Training or
  Evaluating recipe takes the running pod's latest progress line into ``status.training`` (step, losses,
  ETA) or ``status.evaluation`` (turns answered, ETA) and the message: at most one status patch per
  interval, none when nothing moved.

No timers or daemons per object and no on-delete handlers: kopf adds its finalizer to every object that
has one, and a recipe (or its namespace) deleted while the operator is down would hang. Without them the
recipes carry no finalizer (kopf removes the one an older version added), deletion is immediate and the
Jobs go by their ownerReferences. Nothing is written to the recipe but its status: no kopf annotations
(event handlers keep no state), no annotations of ours.

What the Jobs did comes from their pods' termination messages (`ftrecipe.termination`), and what
finished before stays known through the recipe's own status (`ftrecipe.plan.status.remembered`), so
Jobs deleted by their TTL are not run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from ftrecipe import __version__
from ftrecipe.api import GROUP, PLURAL, VERSION, RecipeError, parse_recipe
from ftrecipe.api.v1alpha1 import FinetuneRecipeSpec, FinetuneRecipeStatus
from ftrecipe.api.v1alpha1 import S3Location as OutputS3
from ftrecipe.controller.kube_client import use_api_executor
from ftrecipe.controller.manifests import (
    ANNOTATION_RECIPE,
    DEFAULT_IMAGES,
    LABEL_MANAGED_BY,
    MAIN_CONTAINER,
    MANAGER,
    Images,
    build_job,
    build_jobset,
    jobset_too_old,
    uses_jobset,
)
from ftrecipe.controller.metrics import OperatorMetrics
from ftrecipe.controller.observe import (
    CONTROLLER_UID_LABEL,
    JOB_NAME_LABEL,
    JOBSET_NAME_LABEL,
    JOBSET_UNAVAILABLE,
    REPORTS,
    JobSetsUnavailable,
    ReportCache,
    core_path,
    job_state,
    jobs_path,
    jobset_restarts,
    jobset_state,
    jobsets_path,
    kube_request,
    latest_progress,
    list_items,
    list_jobsets_sync,
    list_recipe_jobs,
    newest_live_pod,
    pod_log_sync,
    rank_zero,
    replan_needed,
    waiting_to_be_created,
)
from ftrecipe.plan.cache_key import Phase, phase_prefix
from ftrecipe.plan.planner import (
    DEFAULT_STUCK_LIMITS,
    STUCK_REASONS,
    Action,
    CreateJob,
    DeleteJob,
    Fail,
    ResumeJob,
    Retry,
    StuckLimits,
    SuspendJob,
    Wait,
    World,
    jobset_missing_blocker,
    phases,
    plan,
)
from ftrecipe.plan.status import (
    RUNNING_PHASES,
    ProgressPhase,
    compute_status,
    failure_reasons,
    invalid_status,
    needs_reconcile,
    planned_hashes,
    progress_job,
    remembered,
    retry_requested,
    running_job,
    stuck_event,
    with_progress,
)
from ftrecipe.storage import S3Settings, read_manifest
from ftrecipe.storage.s3 import make_client
from ftrecipe.termination import PhaseReport, report_from_metadata

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# Set by people (`kubectl annotate ... ftrecipe.dev/retry="$(date +%s)" --overwrite`): each new value
# re-runs the recipe's failed phase.
ANNOTATION_RETRY: Final = "ftrecipe.dev/retry"
FINISHED: Final = ("Succeeded", "Failed")
# At most this many recipes are progressed or resynced at once by the operator-wide task.
_CONCURRENCY: Final = 16
_LOG = logging.getLogger(__name__)
# kopf's own object logger: our lines about a recipe read like kopf's (`[ns/name] ...`, the `object` key
# in JSON logs); k8s_skip keeps them from ever becoming Events.
_OBJECTS = logging.getLogger("kopf.objects")

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class OperatorSettings:
    """ftrecipe's own operator settings (kopf's are separate)."""

    images: Images = DEFAULT_IMAGES
    # The manifest metadata of the complete bundle at an output prefix of the recipe's `spec.output.s3`,
    # None when there is none (e.g. `bundle_reader`): asked for phases without a succeeded Job, for S3
    # output only. None: never reuse earlier runs' bundles.
    read_bundle: Callable[[str, OutputS3], Mapping[str, Any] | None] | None = None
    # How often the unfinished Jobs are listed to catch lost watch events (one request per namespace);
    # None: never.
    resync_seconds: float | None = 60.0
    # Delay before a reconcile that hit an API error is tried again.
    retry_delay: float = 5.0
    # How often running phases' pods are checked (stuck, evicted) and a Training or Evaluating recipe's
    # status takes the running phase's latest progress line; None: never.
    progress_seconds: float | None = 10.0
    metrics: OperatorMetrics | None = None
    reports: ReportCache = REPORTS
    # How long a phase's pod may be stuck (unschedulable, image pull, missing Secret, Kueue) or how often
    # evicted before the phase fails; checked on every reconcile and progress tick.
    stuck: StuckLimits = DEFAULT_STUCK_LIMITS
    # The operator's version, recorded with the phase hashes of new and edited recipes (its major.minor
    # is part of them); recipes planned by another version keep their recorded hashes.
    version: str = __version__


# --------------------------------------------------------------------------------------------- helpers


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch from `old` to `new`: changed keys, and None for keys that went away."""
    out: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_patch(before, value)
            if nested:
                out[key] = nested
        elif value != before:
            out[key] = value
    return out


def _dump(status: FinetuneRecipeStatus) -> dict[str, Any]:
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")


def _parse_status(raw: Mapping[str, Any] | None) -> tuple[FinetuneRecipeStatus | None, dict[str, Any]]:
    """The status model and its normalised JSON form; (None, raw) when it cannot be read."""
    try:
        previous = FinetuneRecipeStatus.model_validate(dict(raw or {}))
    except ValidationError:
        return None, dict(raw or {})
    return previous, _dump(previous)


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return body.get("metadata") or {}


def _annotations(body: Mapping[str, Any]) -> Mapping[str, str]:
    return _meta(body).get("annotations") or {}


def _one_line(error: RecipeError) -> str:
    return "; ".join(error.lines) or str(error)


def _output_root(spec: FinetuneRecipeSpec) -> str | None:
    return spec.output.s3.uri if spec.output.s3 is not None else None


def _prefixes(spec: FinetuneRecipeSpec, recipe: str, hashes: Mapping[Phase, str]) -> dict[Phase, str]:
    root = _output_root(spec) or "(local output)"
    return {phase: phase_prefix(root, recipe, phase, h) for phase, h in hashes.items()}


# Big annotations the operator never reads (kubectl's copy of the whole applied object).
_UNREAD_ANNOTATIONS: Final = ("kubectl.kubernetes.io/last-applied-configuration",)


def slim_recipe(raw: Mapping[str, Any]) -> kopf.RawBody:
    """What the operator keeps of a recipe between events (thousands of them): its spec, status and the
    metadata it reads or passes on to its Jobs; not managedFields or kubectl's last-applied copy."""
    meta = raw.get("metadata") or {}
    kept = {k: meta[k] for k in ("name", "namespace", "uid", "generation", "labels") if k in meta}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in _UNREAD_ANNOTATIONS}
    if annotations:
        kept["annotations"] = annotations
    slim = {k: raw[k] for k in ("apiVersion", "kind", "spec", "status") if k in raw}
    return cast(kopf.RawBody, slim | {"metadata": kept})


def _object_log(body: Mapping[str, Any]) -> logging.LoggerAdapter[logging.Logger]:
    meta = _meta(body)
    ref = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "namespace": meta.get("namespace"),
    }
    return logging.LoggerAdapter(_OBJECTS, {"k8s_ref": ref, "k8s_skip": True})


def reader_settings(base: S3Settings, output: OutputS3) -> S3Settings:
    """The operator's S3 settings with the recipe's own store (endpoint, region, path style) where it names
    one: a bundle is looked for where the recipe's Jobs publish it. Credentials stay the operator's own."""
    return dataclasses.replace(
        base,
        endpoint_url=output.endpoint or base.endpoint_url,
        region=output.region or base.region,
        addressing_style="path" if output.force_path_style else base.addressing_style,
    )


def bundle_reader(base: S3Settings) -> Callable[[str, OutputS3], Mapping[str, Any] | None]:
    """`OperatorSettings.read_bundle` over S3 with one client per distinct store settings (not per recipe:
    thousands of recipes share a few stores; boto3 clients are thread-safe)."""
    clients: dict[S3Settings, S3Client] = {}
    lock = threading.Lock()

    def read_bundle(prefix: str, output: OutputS3) -> Mapping[str, Any] | None:
        settings = reader_settings(base, output)
        with lock:
            client = clients.get(settings)
            if client is None:
                client = clients[settings] = make_client(settings)
        manifest = read_manifest(prefix, settings, client)
        return None if manifest is None else manifest.metadata

    return read_bundle


async def _complete_bundles(
    spec: FinetuneRecipeSpec,
    recipe: str,
    world: World,
    settings: OperatorSettings,
    hashes: Mapping[Phase, str],
) -> tuple[frozenset[str], dict[str, PhaseReport]]:
    """Hashes of phases (without a succeeded Job) whose bundle is already complete in S3, with the
    figures their manifests carry."""
    output = spec.output.s3
    if settings.read_bundle is None or output is None:
        return frozenset(), {}
    root = output.uri
    done = {(j.phase, j.inputs_hash) for j in world.jobs if j.state == "succeeded"}
    complete: set[str] = set()
    reports: dict[str, PhaseReport] = {}
    for phase, inputs_hash in hashes.items():
        if phase not in phases(spec) or (phase, inputs_hash) in done:
            continue
        prefix = phase_prefix(root, recipe, phase, inputs_hash)
        try:
            metadata = await asyncio.to_thread(settings.read_bundle, prefix, output)
        except Exception as error:  # storage trouble must not stop the recipe: run the phase instead
            _LOG.warning("cannot tell whether %s is complete: %s", prefix, error)
            continue
        if metadata is not None:
            complete.add(inputs_hash)
            reports[inputs_hash] = report_from_metadata(metadata, prefix)
    return frozenset(complete), reports


# --------------------------------------------------------------------------------------------- Kubernetes


WorkloadKind = Literal["Job", "JobSet"]


def _workload_path(namespace: str, kind: str, name: str | None = None) -> str:
    return jobsets_path(namespace, name) if kind == "JobSet" else jobs_path(namespace, name)


def _create_job(namespace: str, job: dict[str, Any]) -> dict[str, Any] | None:
    """Create the Job (or JobSet): the object as the API server stored it; None when it already exists (a
    restarted operator adopts it). A JobSet where the cluster has none (404) or the operator may not
    create one (403) raises JobSetsUnavailable."""
    try:
        created = kube_request(
            "POST", _workload_path(namespace, job["kind"]), body=job, content_type="application/json"
        )
    except ApiException as error:
        if error.status == 409:
            return None
        if job["kind"] == "JobSet" and error.status in JOBSET_UNAVAILABLE:
            raise JobSetsUnavailable(f"{error.status} {error.reason}") from None
        raise
    stored = json.loads(created or b"{}")
    return stored if isinstance(stored, dict) else {}


def _delete_job(namespace: str, name: str, kind: str = "Job") -> None:
    """Delete a Job, or a JobSet (its child Jobs and pods go with it), in the background."""
    try:
        kube_request(
            "DELETE", _workload_path(namespace, kind, name), query={"propagationPolicy": "Background"}
        )
    except ApiException as error:
        if error.status != 404:
            raise


def _suspend_job(namespace: str, name: str, suspend: bool, kind: str = "Job") -> None:
    """Suspend or resume a Job, or a JobSet (the JobSet controller suspends its child Jobs)."""
    kube_request(
        "PATCH",
        _workload_path(namespace, kind, name),
        body={"spec": {"suspend": suspend}},
        # Custom resources take no strategic merge patch.
        content_type="application/merge-patch+json"
        if kind == "JobSet"
        else "application/strategic-merge-patch+json",
    )


def _patch_status(namespace: str, name: str, changes: Mapping[str, Any]) -> bool:
    """One merge patch of the recipe's status subresource; False when the recipe is gone."""
    try:
        kube_request(
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status",
            body={"status": dict(changes)},
            content_type="application/merge-patch+json",
        )
    except ApiException as error:
        if error.status == 404:  # deleted meanwhile (its Jobs are being garbage-collected)
            return False
        raise
    return True


def _unfinished_pods(namespace: str) -> list[dict[str, Any]]:
    """Our pods in `namespace` that have not succeeded (running, waiting, failed or evicted): one request,
    selected by label on the server, for every recipe of the namespace."""
    return list_items(
        core_path(namespace, "pods"),
        labelSelector=f"{LABEL_MANAGED_BY}={MANAGER}",
        fieldSelector="status.phase!=Succeeded",
    )


def _unfinished_jobs(namespace: str) -> dict[str, tuple[str, str]]:
    """Our Jobs in `namespace` that have not succeeded, by name, with their uid and state: one request,
    selected on the server (``status.successful`` is a Job's field selector; our Jobs complete once)."""
    items = list_items(
        jobs_path(namespace),
        labelSelector=f"{LABEL_MANAGED_BY}={MANAGER}",
        fieldSelector="status.successful!=1",
    )
    return {
        (j.get("metadata") or {}).get("name") or "": (
            (j.get("metadata") or {}).get("uid") or "",
            job_state(j),
        )
        for j in items
    }


def _pod_log(namespace: str, pod: str, container: str, tail_lines: int = 40) -> str:
    return pod_log_sync(namespace, pod, container, tail_lines)


async def _apply(
    actions: Sequence[Action],
    body: kopf.Body,
    spec: FinetuneRecipeSpec,
    settings: OperatorSettings,
    prefixes: Mapping[Phase, str],
    kinds: Mapping[str, WorkloadKind] | None = None,
) -> list[Action]:
    """Apply the Job actions in order; returns the actions as they turned out (a Job that cannot be built
    becomes a `Fail`, a JobSet the cluster cannot take a `Wait` that says so, and nothing after it runs).
    `kinds`: the observed workloads' kinds by name (a multi-node training's is a JobSet)."""
    name = _meta(body).get("name") or ""
    namespace = _meta(body).get("namespace") or ""
    kinds = kinds or {}
    applied: list[Action] = []
    for action in actions:
        if isinstance(action, CreateJob):
            build = build_jobset if uses_jobset(spec, action.phase) else build_job
            try:
                job = build(
                    name,
                    namespace,
                    spec,
                    action,
                    output_prefix=prefixes[action.phase],
                    images=settings.images,
                    data_prefix=prefixes["data"] if _output_root(spec) else None,
                    adapter_prefix=prefixes["train"] if _output_root(spec) else None,
                )
            except ValueError as error:
                applied.append(Fail(action.phase, "InvalidForCluster", str(error)))
                return applied
            kopf.adopt(job, owner=body)
            try:
                created = await asyncio.to_thread(_create_job, namespace, job)
            except JobSetsUnavailable:  # removed since the listing, or never allowed: wait, and say why
                applied.append(Wait(action.phase, action.name, jobset_missing_blocker(spec)))
                return applied
            if created is not None and settings.metrics is not None:
                settings.metrics.jobs_created.labels(action.phase).inc()
            if created is not None and job["kind"] == "JobSet" and (old := jobset_too_old(job, created)):
                kopf.warn(body, reason="JobSetTooOld", message=old)
        elif isinstance(action, Retry):
            kopf.info(body, reason="RetryRequested", message=f"Retry requested: re-running {action.phase}")
        elif isinstance(action, DeleteJob):
            kind = kinds.get(action.name, "Job")
            await asyncio.to_thread(_delete_job, namespace, action.name, kind)
            kopf.info(body, reason="JobDeleted", message=f"deleted {kind} {action.name}: {action.reason}")
        elif isinstance(action, SuspendJob | ResumeJob):
            suspend = isinstance(action, SuspendJob)
            await asyncio.to_thread(
                _suspend_job, namespace, action.name, suspend, kinds.get(action.name, "Job")
            )
        applied.append(action)
    return applied


def _post_transition(body: kopf.Body, before: str | None, status: FinetuneRecipeStatus, last: Action) -> None:
    """One Event when the recipe's phase changes (a phase started, the recipe succeeded or failed)."""
    if status.phase == before or status.phase is None:
        return
    if isinstance(last, Fail):
        kopf.warn(body, reason=last.reason, message=last.message)
    elif status.phase == "Failed":
        kopf.warn(body, reason="Failed", message=status.message or "")
    else:
        kopf.info(body, reason=status.phase, message=status.message or "")


# --------------------------------------------------------------------------------------------- reconcile


async def reconcile(
    body: kopf.Body, raw_status: Mapping[str, Any] | None, settings: OperatorSettings
) -> dict[str, Any] | None:
    """Observe, plan, apply, write status: one level-based pass for one recipe. `raw_status` is the
    recipe's status as it stands (the one last written). Returns the status now written (None when the
    recipe is gone); raises ApiException when the API failed (nothing about the status was written)."""
    meta = _meta(body)
    name = meta.get("name") or ""
    namespace = meta.get("namespace") or ""
    generation = int(meta.get("generation") or 0)
    previous, old = _parse_status(raw_status)
    before = previous.phase if previous is not None else None
    retry_value = _annotations(body).get(ANNOTATION_RETRY)
    retry = retry_requested(retry_value, previous)
    try:
        recipe = parse_recipe(
            {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "metadata": {"name": name, "namespace": namespace},
                "spec": dict(body.get("spec") or {}),
            },
            f"{namespace}/{name}",
        )
    except RecipeError as error:
        message = _one_line(error)
        status = invalid_status(message, generation, _now(), previous, observed_retry=retry_value)
        new = _dump(status)
        if not await _write_status(namespace, name, old, new, settings):
            return None
        if before != "Failed":
            kopf.warn(body, reason="InvalidRecipe", message=message)
        return new
    spec = recipe.spec
    metrics = settings.metrics
    if metrics is not None:
        metrics.reconciles.inc()
    hashes, planned = planned_hashes(spec, generation, previous, version=settings.version)
    prefixes = _prefixes(spec, name, hashes)
    finished, failed = remembered(name, spec, previous, prefixes, hashes)
    jobs, jobsets_missing = await list_recipe_jobs(
        namespace, name, reports=settings.reports, jobsets=_may_run_jobset(spec, previous)
    )
    complete, reports = await _complete_bundles(spec, name, World(jobs=jobs), settings, hashes)
    world = World(
        jobs=jobs,
        complete=complete,
        finished=finished,
        failed=failed,
        reports=reports,
        retry=retry,
        failure_reasons=failure_reasons(spec, previous, failed, hashes),
        now=_now(),
        hashes=hashes,
        jobsets_missing=jobsets_missing,
    )
    kinds = {job.name: job.kind for job in jobs}
    actions = await _apply(
        plan(name, spec, world, limits=settings.stuck), body, spec, settings, prefixes, kinds
    )
    status = compute_status(
        spec,
        generation,
        actions,
        prefixes=prefixes,
        now=_now(),
        previous=previous,
        observed_retry=retry_value,
        planned=planned,
    )
    new = _dump(status)
    if not await _write_status(namespace, name, old, new, settings):
        return None
    if retry and status.phase == "Failed" and not any(isinstance(a, Retry) for a in actions):
        # E.g. a quality gate: the evaluation finished, its figures were just checked again.
        kopf.info(
            body,
            reason="RetryRequested",
            message=f"Retry requested: no failed Job to re-run; still failed: {status.message}",
        )
    if metrics is not None:
        metrics.transitions(previous, status)
        last = actions[-1] if actions else None
        if isinstance(last, Fail) and last.reason == "JobFailed" and before != "Failed":
            job = next((j for j in jobs if j.phase == last.phase and j.state == "failed"), None)
            reason = (job.failure_reason if job is not None else None) or "Unknown"
            metrics.job_failures.labels(last.phase or "recipe", reason).inc()
    if actions:
        _post_transition(body, before, status, actions[-1])
    if (stuck := stuck_event(previous, status)) is not None:
        kopf.warn(body, reason=stuck[0], message=stuck[1])
    return new


def _may_run_jobset(spec: FinetuneRecipeSpec, previous: FinetuneRecipeStatus | None) -> bool:
    """Whether the recipe's JobSets must be listed: it trains on several nodes, or its training ran as a
    JobSet and has not finished (the spec went back to one node: that JobSet must go). One request more
    only for these recipes; clusters without JobSet never see it for the others."""
    if uses_jobset(spec, "train"):
        return True
    training = previous.training if previous is not None else None
    return training is not None and training.restarts is not None and training.completed_at is None


async def _write_status(
    namespace: str, name: str, old: Mapping[str, Any], new: Mapping[str, Any], settings: OperatorSettings
) -> bool:
    """Patch what changed from `old` to `new` (nothing when nothing did); False when the recipe is gone."""
    changes = merge_patch(old, new)
    if not changes:
        return True
    written = await asyncio.to_thread(_patch_status, namespace, name, changes)
    if written and settings.metrics is not None:
        settings.metrics.status_patches.inc()
    return written


ResyncFinding = Literal["waiting", "differs", "no job"]


def resync_finding(
    status: FinetuneRecipeStatus | None, seen: Mapping[str, str], unfinished: Mapping[str, str]
) -> tuple[ResyncFinding, str] | None:
    """What a resync finds about a running recipe, with its Job's name: its Job waits for something no Job
    event reports ("waiting": Kueue's Workload, a pod that cannot start; its Ready condition says Queued,
    Unschedulable, ...), or the listing shows the Job otherwise than the watch did ("differs": it finished
    or went away, so it is not among the `unfinished` Jobs, or its state is not the one `seen`), or the
    recipe runs no Job ("no job": Pending, Suspended; the listing cannot tell). None: nothing to do."""
    running = running_job(status)
    if running is None or status is None:
        return "no job", ""
    job = running[1]
    ready = next((c for c in status.conditions or [] if c.type == "Ready"), None)
    if ready is not None and ready.reason in STUCK_REASONS:
        return "waiting", job
    if job not in unfinished or seen.get(job) != unfinished[job]:
        return "differs", job
    return None


def pods_by_job(pods: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Pods grouped by their Job's uid (the Job controller's own label), else by the Job's name; the pods
    of a multi-node training also by their JobSet's name (the JobSet controller's label)."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        key = labels.get(CONTROLLER_UID_LABEL) or labels.get(JOB_NAME_LABEL)
        if key:
            grouped.setdefault(key, []).append(pod)
        if jobset := labels.get(JOBSET_NAME_LABEL):
            grouped.setdefault(jobset, []).append(pod)
    return grouped


def check_stuck(
    status: FinetuneRecipeStatus, pods: Sequence[Mapping[str, Any]], settings: OperatorSettings
) -> bool:
    """While a phase's Job should run: whether its pods say what the status does not (stuck, unstuck, past
    a limit, evicted too often), so that a reconcile must re-plan it now. A stuck pod changes nothing in
    its Job, so no Job event would."""
    running = running_job(status)
    if running is None:
        return False
    phase, job = running
    # A Job waiting for Kueue has no pods; once it has some, Kueue admitted it (replan_needed says so).
    return replan_needed(status, phase, job, pods, _now(), settings.stuck)


def progressed(
    status: FinetuneRecipeStatus, pods: Sequence[Mapping[str, Any]]
) -> tuple[ProgressPhase, str, str] | None:
    """While Training or Evaluating: (phase, pod, container) whose log has the running phase's latest
    progress line (the newest Running pod of its Job); None when there is none to read."""
    running = progress_job(status)
    if running is None:
        return None
    phase, _ = running
    # A multi-node training's progress is rank 0's (pod index 0); a Job has one pod that runs.
    alive = rank_zero([p for p in pods if (p.get("status") or {}).get("phase") == "Running"])
    if not alive:
        return None
    newest = max(alive, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    return phase, (newest.get("metadata") or {}).get("name") or "", MAIN_CONTAINER[phase]


# --------------------------------------------------------------------------------------------- controller


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _trains_on_nodes(spec: Mapping[str, Any]) -> bool:
    """Whether a recipe's (raw) spec trains on several nodes, i.e. in a JobSet the periodic task watches."""
    nodes = (spec.get("training") or {}).get("nodes")
    return isinstance(nodes, int) and nodes >= 2


JobSetSeen = tuple[str, str, str]  # (uid, state and restarts, recipe)


def jobset_changes(
    seen: Mapping[str, JobSetSeen], listed: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, JobSetSeen], list[tuple[str, str]]]:
    """What one listing of a namespace's JobSets of ours says against what the last one said: the JobSets
    now known (by name), and (recipe, why) for each recipe whose JobSet changed state or restarted since,
    appeared other than pending, or went away. The JobSet stands in for the Job watch a Job has."""
    now: dict[str, JobSetSeen] = {}
    changed: list[tuple[str, str]] = []
    for jobset in listed:
        meta = jobset.get("metadata") or {}
        name = meta.get("name") or ""
        recipe = (meta.get("annotations") or {}).get(ANNOTATION_RECIPE) or ""
        state = jobset_state(jobset)
        restarts, _ = jobset_restarts(jobset)
        now[name] = (meta.get("uid") or "", f"{state}/{restarts}", recipe)
        before = seen.get(name)
        # First seen: a pending JobSet is what the reconcile that created it knows; anything else is news.
        if (before[:2] != now[name][:2]) if before is not None else (state != "pending" or restarts > 0):
            changed.append((recipe, f"JobSet {name} {state}, {restarts} restarts"))
    changed += [
        (recipe, f"JobSet {name} deleted") for name, (_, _, recipe) in seen.items() if name not in now
    ]
    return now, [(recipe, why) for recipe, why in changed if recipe]


class RecipeState:
    """What the operator keeps of one recipe between events, for thousands of recipes: the metadata it
    reads (`slim_recipe`), and the spec and statuses as compact JSON text, decoded when a reconcile or a
    resync needs them (a decoded spec and status take tens of KiB in Python objects; the text a few),
    with the phase at hand for the periodic task."""

    __slots__ = (
        "api_version",
        "kind",
        "lock",
        "meta",
        "multinode",
        "phase",
        "progressed_at",
        "reconciled_at",
        "retry_at",
        "spec",
        "waiting",
        "watched",
        "written",
    )

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.written: str | None = None  # the status this operator last wrote; None: the watched one
        self.lock = asyncio.Lock()
        self.reconciled_at = 0.0  # time.monotonic() of the last reconcile
        self.progressed_at = 0.0
        self.retry_at: float | None = None  # when a reconcile that failed is tried again
        self.waiting = 0  # reconciles asked for and not started yet (waiting for the lock or a slot)
        self.see(body)

    def see(self, body: Mapping[str, Any]) -> None:
        """The recipe as the watch shows it now."""
        slim = slim_recipe(body)
        self.api_version: str = slim.get("apiVersion") or f"{GROUP}/{VERSION}"
        self.kind: str = slim.get("kind") or "FinetuneRecipe"
        self.meta: dict[str, Any] = dict(slim["metadata"])
        self.spec = _compact(slim.get("spec") or {})
        self.multinode = _trains_on_nodes(slim.get("spec") or {})
        status = slim.get("status")
        self.watched = _compact(status) if status is not None else None
        self._phase()

    def write(self, status: Mapping[str, Any] | None) -> None:
        """The status this operator just wrote (None: forget it, the watched one counts again)."""
        self.written = _compact(status) if status is not None else None
        self._phase()

    def _phase(self) -> None:
        self.phase: str | None = (self.status() or {}).get("phase")

    def status(self) -> dict[str, Any] | None:
        """The status as it stands: the one this operator last wrote, else the watched one."""
        text = self.written if self.written is not None else self.watched
        return cast(dict[str, Any], json.loads(text)) if text is not None else None

    def body(self) -> kopf.Body:
        """The recipe's body (without its status) for a reconcile, Job owner references and Events."""
        raw = {"apiVersion": self.api_version, "kind": self.kind, "metadata": self.meta}
        return kopf.Body(cast(kopf.RawBody, raw | {"spec": json.loads(self.spec)}))

    def ref(self) -> Mapping[str, Any]:
        """Enough of the body to name the recipe in log lines."""
        return {"apiVersion": self.api_version, "kind": self.kind, "metadata": self.meta}


class Controller:
    """The operator's state and its one periodic task; the kopf handlers call into it."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.recipes: dict[Key, RecipeState] = {}
        self.jobs: dict[Key, tuple[str, str]] = {}  # (namespace, Job name) -> (uid, state), from the watch
        # Multi-node trainings' JobSets by namespace and name, from the periodic task's listings.
        self.jobsets: dict[str, dict[str, JobSetSeen]] = {}
        self.paused = False
        self.resynced_at = time.monotonic()
        # (namespace, Job, state listed) the last resync found otherwise than the watch showed.
        self.suspects: set[tuple[str, str, str]] = set()
        self.thread: int | None = None
        self._reconciling = asyncio.Semaphore(_CONCURRENCY)
        # kopf posts Events through a queue it names in the context of each object's handler task only: the
        # periodic task borrows a handler's context to post them too.
        self._context: contextvars.Context | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- what the status is now

    def status_of(self, entry: RecipeState) -> Mapping[str, Any] | None:
        return entry.status()

    # ---- events

    async def recipe_event(self, body: Mapping[str, Any], event_type: str | None) -> None:
        if self._context is None:
            self._context = contextvars.copy_context()
        meta = _meta(body)
        key = (meta.get("namespace") or "", meta.get("name") or "")
        metrics = self.settings.metrics
        if event_type == "DELETED":
            self.recipes.pop(key, None)
            if metrics is not None:
                metrics.recipe_seen(f"{key[0]}/{key[1]}", None)
            return
        entry = self.recipes.get(key)
        first = entry is None
        if entry is None or entry.meta.get("uid") != meta.get("uid"):
            entry = self.recipes[key] = RecipeState(body)
            first = True
        else:
            entry.see(body)
        previous, _ = _parse_status(self.status_of(entry))
        generation = int(meta.get("generation") or 0)
        retry = _annotations(body).get(ANNOTATION_RETRY)
        if needs_reconcile(generation, retry, previous, first_seen=first):
            await self.reconcile(key, "recipe changed" if not first else "recipe seen")
        elif metrics is not None:
            metrics.recipe_seen(f"{key[0]}/{key[1]}", (previous.phase if previous else None) or "Pending")

    async def job_event(self, body: Mapping[str, Any], event_type: str | None) -> None:
        meta = _meta(body)
        namespace, name = meta.get("namespace") or "", meta.get("name") or ""
        seen = self.jobs.get((namespace, name))
        state: str
        if event_type == "DELETED":
            self.jobs.pop((namespace, name), None)
            state = "deleted"
        else:
            state = job_state(body)
            self.jobs[(namespace, name)] = (meta.get("uid") or "", state)
        recipe = _annotations(body).get(ANNOTATION_RECIPE)
        if event_type is None:
            return  # the listing at start-up: the recipes' own listing reconciles the unfinished ones
        # A Job just created and pending changes nothing the status shows; one waiting for Kueue does
        # (Queued), and so does any later change of state (admitted, running, suspended, finished, gone).
        changed = seen[1] != state if seen is not None else state != "pending"

        if recipe and changed and (namespace, recipe) in self.recipes:
            await self.reconcile((namespace, recipe), f"Job {name} {state}")

    # ---- reconcile, serialised per recipe

    async def reconcile(self, key: Key, why: str) -> None:
        entry = self.recipes.get(key)
        if entry is None:
            return
        entry.waiting += 1  # the resync leaves it alone: this reconcile will see what the resync would
        started = False
        try:
            async with entry.lock:
                if self.recipes.get(key) is not entry:
                    return  # deleted while waiting
                # At most a few reconciles at once hold a parsed recipe, its Jobs and their API responses:
                # thousands of recipes arriving together would otherwise all be mid-reconcile, waiting for
                # the same few worker threads, and the memory of that burst stays with the process.
                async with self._reconciling:
                    entry.waiting -= 1
                    started = True
                    await self._reconcile_now(key, entry, why)
        finally:
            if not started:
                entry.waiting -= 1

    async def _reconcile_now(self, key: Key, entry: RecipeState, why: str) -> None:
        """One reconcile pass, under the recipe's lock and a reconcile slot."""
        log = _object_log(entry.ref())
        entry.retry_at = None
        entry.reconciled_at = time.monotonic()
        try:
            written = await reconcile(entry.body(), self.status_of(entry), self.settings)
        except ApiException as error:
            if self.settings.metrics is not None:
                self.settings.metrics.api_errors.labels("reconcile").inc()
            log.warning(
                "Kubernetes API error %s: %s; retrying in %gs",
                error.status,
                error.reason,
                self.settings.retry_delay,
            )
            entry.retry_at = time.monotonic() + self.settings.retry_delay
            return
        except Exception:
            log.exception("reconcile failed (%s); retrying in %gs", why, self.settings.retry_delay)
            entry.retry_at = time.monotonic() + self.settings.retry_delay
            return
        if written is None:  # the recipe is gone
            self.recipes.pop(key, None)
            return
        entry.write(written)
        log.info("reconciled (%s): %s", why, written.get("phase"))
        if self.settings.metrics is not None:
            self.settings.metrics.recipe_seen(f"{key[0]}/{key[1]}", written.get("phase") or "Pending")

    # ---- the periodic task

    def start(self) -> None:
        self.thread = threading.get_ident()
        self._task = asyncio.create_task(self._run(), name="ftrecipe periodic")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def pause(self, paused: bool) -> None:
        """kopf paused (or resumed) this replica in favour of another: the statuses it knew may be stale."""
        self.paused = paused
        for entry in self.recipes.values():
            entry.write(None)

    def _tick(self) -> float:
        periods = [self.settings.progress_seconds, self.settings.resync_seconds, self.settings.retry_delay]
        return max(0.05, min(p for p in periods if p is not None and p > 0))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._tick())
            if self.paused:
                continue
            try:
                await self.tick()
            except Exception:  # never let the periodic task die: the next tick tries again
                _LOG.exception("periodic task failed")

    async def tick(self) -> None:
        """Retry failed reconciles, resync unfinished recipes, check running phases' pods."""
        now = time.monotonic()
        settings = self.settings
        reconciles: list[tuple[Key, str]] = []
        progress: dict[str, list[Key]] = {}
        resync = settings.resync_seconds is not None and now - self.resynced_at >= settings.resync_seconds
        unfinished: dict[str, list[Key]] = {}
        for key, entry in list(self.recipes.items()):
            phase = entry.phase
            if entry.retry_at is not None and now >= entry.retry_at:
                reconciles.append((key, "retry after an error"))
            elif resync and phase not in FINISHED:
                unfinished.setdefault(key[0], []).append(key)
            elif (
                settings.progress_seconds is not None
                and phase in RUNNING_PHASES
                and now - entry.progressed_at >= settings.progress_seconds
            ):
                entry.progressed_at = now
                progress.setdefault(key[0], []).append(key)
        if resync:
            self.resynced_at = now
            reconciles += await self._resync(unfinished, now)
        for namespace, keys in progress.items():
            if any(self._multinode_training(key) for key in keys):
                reconciles += await self._list_jobsets(namespace)
        work: list[Callable[[], Awaitable[None]]] = [
            functools.partial(self.reconcile, key, why) for key, why in reconciles
        ]
        for namespace, keys in progress.items():
            try:
                pods = pods_by_job(await asyncio.to_thread(_unfinished_pods, namespace))
            except ApiException as error:
                if settings.metrics is not None:
                    settings.metrics.api_errors.labels("list_pods").inc()
                _LOG.debug("cannot list the pods in %s: %s", namespace, error)
                continue
            work += [functools.partial(self.progress, key, pods) for key in keys]
        if work:
            await asyncio.create_task(_bounded(work, _CONCURRENCY), context=self._context)

    def _multinode_training(self, key: Key) -> bool:
        entry = self.recipes.get(key)
        return entry is not None and entry.multinode and entry.phase == "Training"

    async def _list_jobsets(self, namespace: str) -> list[tuple[Key, str]]:
        """List the namespace's JobSets of ours (one request; the operator has no JobSet watch, so that a
        cluster without JobSet, or a chart without its switch, costs nothing) and return the recipes whose
        JobSet changed since the last listing: finished, restarted, admitted, gone."""
        try:
            listed = await asyncio.to_thread(list_jobsets_sync, namespace, f"{LABEL_MANAGED_BY}={MANAGER}")
        except (ApiException, JobSetsUnavailable) as error:  # the reconcile says so in the status
            _LOG.debug("cannot list the JobSets in %s: %s", namespace, error)
            return []
        known, changed = jobset_changes(self.jobsets.get(namespace, {}), listed)
        self.jobsets[namespace] = known
        return [((namespace, recipe), why) for recipe, why in changed if (namespace, recipe) in self.recipes]

    async def _resync(self, unfinished: Mapping[str, Sequence[Key]], now: float) -> list[tuple[Key, str]]:
        """The safety net for lost watch events, at one request per namespace (not per recipe): the
        unfinished recipes whose Job the listing shows otherwise than the watch did at two resyncs in a
        row, those whose Job waits for Kueue or a stuck pod, and those running no Job that were not
        reconciled for an interval."""
        due: list[tuple[Key, str]] = []
        suspects: set[tuple[str, str, str]] = set()
        for namespace, keys in unfinished.items():
            try:
                listed = await asyncio.to_thread(_unfinished_jobs, namespace)
            except ApiException as error:
                if self.settings.metrics is not None:
                    self.settings.metrics.api_errors.labels("list_jobs").inc()
                _LOG.debug("cannot list the Jobs in %s: %s", namespace, error)
                continue
            seen = {name: state for (ns, name), (_, state) in self.jobs.items() if ns == namespace}
            states = {name: state for name, (_, state) in listed.items()}
            if any(self._multinode_training(key) for key in keys):
                # JobSets are listed, not watched: what this listing says is what the watch would have.
                due += await self._list_jobsets(namespace)
                for name, (_, state, _) in self.jobsets.get(namespace, {}).items():
                    seen[name] = state
                    if not state.startswith("succeeded/"):
                        states[name] = state
            for key in keys:
                entry = self.recipes.get(key)
                if entry is None or entry.waiting:
                    continue  # a reconcile about to start lists its Jobs anyway
                status, _ = _parse_status(self.status_of(entry))
                found = resync_finding(status, seen, states)
                if found is None:
                    continue
                finding, job = found
                if finding == "differs":
                    # A watch event in flight (the operator is busy) differs for a moment too: only a
                    # difference that lasted a whole interval counts as lost.
                    suspect = (namespace, job, states.get(job, "finished"))
                    suspects.add(suspect)
                    if suspect not in self.suspects:
                        continue
                    if job in listed:  # what the watch would have said: the next resync compares with it
                        self.jobs[(namespace, job)] = listed[job]
                elif finding == "no job" and now - entry.reconciled_at < (self.settings.resync_seconds or 0):
                    continue
                due.append((key, "resync"))
        self.suspects = suspects
        return due

    async def progress(self, key: Key, pods: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        """A running phase: re-plan when its pods say so, else take the latest progress line."""
        entry = self.recipes.get(key)
        if entry is None:
            return
        previous, old = _parse_status(self.status_of(entry))
        running = running_job(previous)
        if previous is None or running is None:
            return
        job = running[1]
        uid = self.jobs.get((key[0], job), ("", ""))[0]
        job_pods = list(pods.get(uid, ())) if uid else []
        job_pods += [p for p in pods.get(job, ()) if p not in job_pods]  # pods without the uid label
        if check_stuck(previous, job_pods, self.settings):
            await self.reconcile(key, "its pods changed")
            return
        newest = newest_live_pod(job_pods)
        resync = self.settings.resync_seconds
        if (
            newest is not None
            and waiting_to_be_created(newest)
            and resync is not None
            and time.monotonic() - entry.reconciled_at >= resync
        ):
            # Mounting a volume or pulling an image: only the kubelet's Events say whether it is stuck, and
            # a reconcile reads them (at most once per resync interval).
            await self.reconcile(key, "its pod waits to be created")
            return
        source = progressed(previous, job_pods)
        if source is None:
            return
        phase, pod, container = source
        try:
            log = await asyncio.to_thread(_pod_log, key[0], pod, container)
        except ApiException as error:  # a pod that just went away, a log not there yet: try next time
            if self.settings.metrics is not None:
                self.settings.metrics.api_errors.labels("read_pod_log").inc()
            _LOG.debug("no %s progress for %s: %s", phase, pod, error)
            return
        line = latest_progress(log, phase)
        if line is None:
            return
        async with entry.lock:
            if self.recipes.get(key) is not entry:
                return
            current, old = _parse_status(self.status_of(entry))
            if current is None or progress_job(current) != progress_job(previous):
                return  # a reconcile moved it on meanwhile
            new = _dump(with_progress(current, phase, line))
            try:
                if not await _write_status(key[0], key[1], old, new, self.settings):
                    return
            except ApiException as error:
                _LOG.debug("cannot write the progress of %s/%s: %s", key[0], key[1], error)
                return
            entry.write(new)


async def _bounded(work: Sequence[Callable[[], Awaitable[None]]], limit: int) -> None:
    semaphore = asyncio.Semaphore(limit)

    async def one(run: Callable[[], Awaitable[None]]) -> None:
        async with semaphore:
            await run()

    await asyncio.gather(*(one(run) for run in work))


class _PauseWatch(logging.Handler):
    """kopf pauses a replica when a peer of higher priority is alive, and resumes it when that peer is
    gone; it tells handlers nothing, only its log does. The periodic task must pause with it."""

    def __init__(self, controller: Controller) -> None:
        super().__init__(logging.INFO)
        self.controller = controller

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.controller.thread:
            return  # another operator in this process (tests run replicas side by side)
        text = record.getMessage()
        if text.startswith("Pausing"):
            self.controller.pause(True)
        elif text.startswith("Resuming operations"):
            self.controller.pause(False)


_PEERING_LOGGER: Final = "kopf._core.engines.peering"


# --------------------------------------------------------------------------------------------- registry


def register(registry: kopf.OperatorRegistry, *, settings: OperatorSettings | None = None) -> Controller:
    """Add ftrecipe's handlers to `registry` (a fresh one per operator, so tests never share handlers)."""
    controller = Controller(settings or OperatorSettings())
    pause_watch = _PauseWatch(controller)

    @kopf.on.startup(registry=registry, id="ftrecipe-startup")
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Only our Jobs reach the operator: the API server filters the watch (kopf's `labels=` filter on
        # a handler is applied after the whole stream arrived).
        settings.watching.label_selectors["batch", "v1", "jobs"] = f"{LABEL_MANAGED_BY}={MANAGER}"
        # Events are what we post ourselves (phase changes, failures, gate, stuck, retry), never log lines.
        settings.posting.loggers = False
        # Our blocking API calls (asyncio.to_thread) run on as many threads as the client keeps connections.
        use_api_executor()
        logging.getLogger(_PEERING_LOGGER).addHandler(pause_watch)
        controller.start()

    @kopf.on.cleanup(registry=registry, id="ftrecipe-cleanup")
    async def cleanup(**_: Any) -> None:
        logging.getLogger(_PEERING_LOGGER).removeHandler(pause_watch)
        await controller.stop()

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="recipe-event")
    async def recipe_event(event: kopf.RawEvent, **_: Any) -> None:
        await controller.recipe_event(event["object"], event.get("type"))

    @kopf.on.event(
        "batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGER}, registry=registry, id="job-event"
    )
    async def job_event(event: kopf.RawEvent, **_: Any) -> None:
        await controller.job_event(event["object"], event.get("type"))

    return controller
