"""The kopf shell around the pure planner: observe a recipe's Jobs, plan, apply the actions, write status.

Handlers (added to a registry by `register`, never at import):

* ``reconcile`` on FinetuneRecipe create, update and resume: parse the recipe, list its Jobs by label, ask
  which phase bundles already exist (S3 output only, when ``OperatorSettings.read_bundle`` is given), run
  `plan`, apply its actions (create/delete/suspend/resume Jobs), then write `compute_status` through
  ``patch.status`` and post Events on phase changes. Level-based: a restarted operator re-plans from what
  exists, and a Job that already exists (409) is simply adopted.
  A new value of the ``ftrecipe.dev/retry`` annotation (an update like any other) asks to run the failed
  phase again: the pass that sees it plans with ``World.retry``, posts a ``RetryRequested`` Event and
  records the value in ``status.observedRetry``.
* ``job_event`` on our Jobs (label ``app.kubernetes.io/managed-by=ftrecipe-operator``): a Job changed, so its
  recipe must be re-planned. It writes ``<job>=<state>`` into the recipe's ``ftrecipe.dev/last-job-event``
  annotation, which kopf sees as an update of the recipe. That keeps every reconcile of one recipe in
  kopf's single per-object worker (no two reconciles race on the same status), unlike a second handler
  calling the reconcile directly.
* ``resync`` (a timer, when ``OperatorSettings.resync_seconds`` is set): touches the
  ``ftrecipe.dev/resync`` annotation of recipes that are not finished, the same way, as a safety net for
  missed watch events and for bundles that appear in storage.
* ``phase-progress`` (a timer, every ``OperatorSettings.progress_seconds``): while a recipe is
  ``Training`` or ``Evaluating``, reads the last progress line from the running pod's log and patches
  ``status.training`` (step, losses, ETA) or ``status.evaluation`` (turns answered, ETA) and the message:
  at most one status patch per interval, none when nothing moved. Before that, while any phase's Job
  should run, it lists the Job's pods: when they say what the status does not (a pod that cannot start,
  a limit passed, too many evictions), it touches ``ftrecipe.dev/resync`` so a reconcile re-plans now.
* ``recipe-metrics`` (an event handler): keeps the ``ftrecipe_recipes{phase}`` gauge.

What the Jobs did comes from their pods' termination messages (`ftrecipe.termination`), and what
finished before stays known through the recipe's own status (`ftrecipe.plan.status.remembered`), so
Jobs deleted by their TTL are not run again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import kopf
import kubernetes.client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from ftrecipe.api import GROUP, PLURAL, VERSION, RecipeError, parse_recipe
from ftrecipe.api.v1alpha1 import FinetuneRecipeSpec, FinetuneRecipeStatus
from ftrecipe.controller.manifests import (
    ANNOTATION_RECIPE,
    DEFAULT_IMAGES,
    LABEL_MANAGED_BY,
    MANAGER,
    Images,
    build_job,
)
from ftrecipe.controller.metrics import OperatorMetrics
from ftrecipe.controller.observe import (
    REPORTS,
    ReportCache,
    job_pods,
    job_state,
    list_recipe_jobs,
    phase_progress,
    replan_needed,
)
from ftrecipe.plan.cache_key import Phase, phase_hashes, phase_prefix
from ftrecipe.plan.planner import (
    DEFAULT_STUCK_LIMITS,
    Action,
    CreateJob,
    DeleteJob,
    Fail,
    ResumeJob,
    Retry,
    StuckLimits,
    SuspendJob,
    World,
    phases,
    plan,
)
from ftrecipe.plan.status import (
    PROGRESS_PHASES,
    RUNNING_PHASES,
    compute_status,
    failure_reasons,
    invalid_status,
    progress_job,
    remembered,
    retry_requested,
    running_job,
    stuck_event,
    with_progress,
)
from ftrecipe.termination import PhaseReport, report_from_metadata

ANNOTATION_LAST_JOB_EVENT: Final = "ftrecipe.dev/last-job-event"
ANNOTATION_RESYNC: Final = "ftrecipe.dev/resync"
# Set by people (`kubectl annotate ... ftrecipe.dev/retry="$(date +%s)" --overwrite`): each new value
# re-runs the recipe's failed phase.
ANNOTATION_RETRY: Final = "ftrecipe.dev/retry"
FINISHED: Final = ("Succeeded", "Failed")
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorSettings:
    """ftrecipe's own operator settings (kopf's are separate)."""

    images: Images = DEFAULT_IMAGES
    # The manifest metadata of the complete bundle at an output prefix, None when there is none (e.g. from
    # `storage.read_manifest`): asked for phases without a succeeded Job, for S3 output only. None: never
    # reuse earlier runs' bundles.
    read_bundle: Callable[[str], Mapping[str, Any] | None] | None = None
    # How often unfinished recipes are re-planned even without events; None: never.
    resync_seconds: float | None = 60.0
    # Delay before kopf retries a reconcile that hit an API error.
    retry_delay: float = 5.0
    # How often a Training or Evaluating recipe's status takes the running phase's latest progress line;
    # None: never.
    progress_seconds: float | None = 10.0
    metrics: OperatorMetrics | None = None
    reports: ReportCache = REPORTS
    # How long a phase's pod may be stuck (unschedulable, image pull, missing Secret, Kueue) or how often
    # evicted before the phase fails; checked on every reconcile and progress tick.
    stuck: StuckLimits = DEFAULT_STUCK_LIMITS


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


def _previous_status(body: kopf.Body) -> tuple[FinetuneRecipeStatus | None, dict[str, Any]]:
    raw = dict(body.get("status") or {})
    try:
        previous = FinetuneRecipeStatus.model_validate(raw)
    except ValidationError:
        return None, raw
    return previous, _dump(previous)


def _one_line(error: RecipeError) -> str:
    return "; ".join(error.lines) or str(error)


def _output_root(spec: FinetuneRecipeSpec) -> str | None:
    return spec.output.s3.uri if spec.output.s3 is not None else None


def _prefixes(spec: FinetuneRecipeSpec, recipe: str) -> dict[Phase, str]:
    root = _output_root(spec) or "(local output)"
    return {phase: phase_prefix(root, recipe, phase, h) for phase, h in phase_hashes(spec).items()}


async def _complete_bundles(
    spec: FinetuneRecipeSpec, recipe: str, world: World, settings: OperatorSettings
) -> tuple[frozenset[str], dict[str, PhaseReport]]:
    """Hashes of phases (without a succeeded Job) whose bundle is already complete in S3, with the
    figures their manifests carry."""
    root = _output_root(spec)
    if settings.read_bundle is None or root is None:
        return frozenset(), {}
    done = {(j.phase, j.inputs_hash) for j in world.jobs if j.state == "succeeded"}
    complete: set[str] = set()
    reports: dict[str, PhaseReport] = {}
    for phase, inputs_hash in phase_hashes(spec).items():
        if phase not in phases(spec) or (phase, inputs_hash) in done:
            continue
        prefix = phase_prefix(root, recipe, phase, inputs_hash)
        try:
            metadata = await asyncio.to_thread(settings.read_bundle, prefix)
        except Exception as error:  # storage trouble must not stop the recipe: run the phase instead
            _LOG.warning("cannot tell whether %s is complete: %s", prefix, error)
            continue
        if metadata is not None:
            complete.add(inputs_hash)
            reports[inputs_hash] = report_from_metadata(metadata, prefix)
    return frozenset(complete), reports


# --------------------------------------------------------------------------------------------- Kubernetes


def _create_job(namespace: str, job: dict[str, Any]) -> bool:
    """Create the Job; False when it already exists (a restarted operator adopts it)."""
    try:
        kubernetes.client.BatchV1Api().create_namespaced_job(namespace, job)  # type: ignore[arg-type]
    except ApiException as error:
        if error.status == 409:
            return False
        raise
    return True


def _delete_job(namespace: str, name: str) -> None:
    try:
        kubernetes.client.BatchV1Api().delete_namespaced_job(name, namespace, propagation_policy="Background")
    except ApiException as error:
        if error.status != 404:
            raise


def _suspend_job(namespace: str, name: str, suspend: bool) -> None:
    kubernetes.client.BatchV1Api().patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})


def _annotate_recipe(namespace: str, name: str, key: str, value: str) -> None:
    try:
        kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"annotations": {key: value}}}
        )
    except ApiException as error:
        if error.status != 404:  # the recipe is gone (its Jobs are being garbage-collected)
            raise


async def _apply(
    actions: Sequence[Action],
    body: kopf.Body,
    spec: FinetuneRecipeSpec,
    settings: OperatorSettings,
) -> list[Action]:
    """Apply the Job actions in order; returns the actions as they turned out (a Job that cannot be built
    becomes a `Fail`, and nothing after it runs)."""
    name = body.meta.name or ""
    namespace = body.meta.namespace or ""
    prefixes = _prefixes(spec, name)
    applied: list[Action] = []
    for action in actions:
        if isinstance(action, CreateJob):
            try:
                job = build_job(
                    name,
                    namespace,
                    spec,
                    action,
                    output_prefix=prefixes[action.phase],
                    images=settings.images,
                )
            except ValueError as error:
                applied.append(Fail(action.phase, "InvalidForCluster", str(error)))
                return applied
            kopf.adopt(job, owner=body)
            if await asyncio.to_thread(_create_job, namespace, job):
                kopf.info(body, reason="JobCreated", message=f"created Job {action.name} ({action.phase})")
                if settings.metrics is not None:
                    settings.metrics.jobs_created.labels(action.phase).inc()
        elif isinstance(action, Retry):
            kopf.info(body, reason="RetryRequested", message=f"Retry requested: re-running {action.phase}")
        elif isinstance(action, DeleteJob):
            await asyncio.to_thread(_delete_job, namespace, action.name)
            kopf.info(body, reason="JobDeleted", message=f"deleted Job {action.name}: {action.reason}")
        elif isinstance(action, SuspendJob | ResumeJob):
            await asyncio.to_thread(_suspend_job, namespace, action.name, isinstance(action, SuspendJob))
        applied.append(action)
    return applied


def _post_transition(body: kopf.Body, before: str | None, status: FinetuneRecipeStatus, last: Action) -> None:
    if status.phase == before or status.phase is None:
        return
    if isinstance(last, Fail):
        kopf.warn(body, reason=last.reason, message=last.message)
    elif status.phase == "Failed":
        kopf.warn(body, reason="Failed", message=status.message or "")
    else:
        kopf.info(body, reason=status.phase, message=status.message or "")


async def reconcile(body: kopf.Body, patch: kopf.Patch, settings: OperatorSettings) -> None:
    """Observe, plan, apply, write status: one level-based pass for one recipe."""
    name = body.meta.name or ""
    namespace = body.meta.namespace or ""
    generation = int(body.meta.get("generation") or 0)
    previous, old = _previous_status(body)
    before = previous.phase if previous is not None else None
    retry_value = body.meta.annotations.get(ANNOTATION_RETRY)
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
        patch.status.update(merge_patch(old, _dump(status)))
        if before != "Failed":
            kopf.warn(body, reason="InvalidRecipe", message=message)
        return
    spec = recipe.spec
    metrics = settings.metrics
    if metrics is not None:
        metrics.reconciles.inc()
    prefixes = _prefixes(spec, name)
    finished, failed = remembered(name, spec, previous, prefixes)
    try:
        jobs = await list_recipe_jobs(namespace, name, reports=settings.reports)
        complete, reports = await _complete_bundles(spec, name, World(jobs=jobs), settings)
        world = World(
            jobs=jobs,
            complete=complete,
            finished=finished,
            failed=failed,
            reports=reports,
            retry=retry,
            failure_reasons=failure_reasons(spec, previous, failed),
            now=_now(),
        )
        actions = await _apply(plan(name, spec, world, limits=settings.stuck), body, spec, settings)
    except ApiException as error:
        if metrics is not None:
            metrics.api_errors.labels("reconcile").inc()
        raise kopf.TemporaryError(
            f"Kubernetes API error {error.status}: {error.reason}", delay=settings.retry_delay
        ) from error
    status = compute_status(
        spec,
        generation,
        actions,
        prefixes=prefixes,
        now=_now(),
        previous=previous,
        observed_retry=retry_value,
    )
    if retry and status.phase == "Failed" and not any(isinstance(a, Retry) for a in actions):
        # E.g. a quality gate: the evaluation finished, its figures were just checked again.
        kopf.info(
            body,
            reason="RetryRequested",
            message=f"Retry requested: no failed Job to re-run; still failed: {status.message}",
        )
    changes = merge_patch(old, _dump(status))
    patch.status.update(changes)
    if metrics is not None:
        if changes:
            metrics.status_patches.inc()
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


async def check_stuck(body: kopf.Body, patch: kopf.Patch, settings: OperatorSettings) -> None:
    """While a phase's Job should run: when its pods say what the status does not (stuck, unstuck, past a
    limit, evicted too often), touch the recipe so that a reconcile re-plans it now. A stuck pod changes
    nothing in its Job, so no Job event would."""
    if (body.get("status") or {}).get("phase") not in RUNNING_PHASES:
        return  # before parsing the status, as in report_progress
    previous, _ = _previous_status(body)
    running = running_job(previous)
    if previous is None or running is None:
        return
    phase, job = running
    try:
        pods = await job_pods(body.meta.namespace or "", job)
    except ApiException as error:
        if settings.metrics is not None:
            settings.metrics.api_errors.labels("list_pods").inc()
        _LOG.debug("cannot list the pods of %s: %s", job, error)
        return
    if replan_needed(previous, phase, job, pods, _now(), settings.stuck):
        patch.metadata.annotations[ANNOTATION_RESYNC] = _now().isoformat()


async def report_progress(body: kopf.Body, patch: kopf.Patch, settings: OperatorSettings) -> None:
    """While Training or Evaluating: the running phase's latest progress line into its status section
    and the message."""
    if (body.get("status") or {}).get("phase") not in PROGRESS_PHASES:
        return  # before parsing the status: the timer ticks for every recipe, and most run nothing
    previous, old = _previous_status(body)
    running = progress_job(previous)
    if previous is None or running is None:
        return
    phase, job = running
    try:
        progress = await phase_progress(body.meta.namespace or "", job, phase)
    except ApiException as error:  # a pod that just went away, a log not there yet: try next time
        if settings.metrics is not None:
            settings.metrics.api_errors.labels("read_pod_log").inc()
        _LOG.debug("no %s progress for %s: %s", phase, job, error)
        return
    if progress is None:
        return
    changes = merge_patch(old, _dump(with_progress(previous, phase, progress)))
    if changes:
        patch.status.update(changes)
        if settings.metrics is not None:
            settings.metrics.status_patches.inc()


# --------------------------------------------------------------------------------------------- registry


def register(registry: kopf.OperatorRegistry, *, settings: OperatorSettings | None = None) -> None:
    """Add ftrecipe's handlers to `registry` (a fresh one per operator, so tests never share handlers)."""
    chosen = settings or OperatorSettings()

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry, id="reconcile-resume")
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, id="reconcile-create")
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry, id="reconcile-update")
    async def reconcile_handler(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        await reconcile(body, patch, chosen)

    @kopf.on.event(
        "batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGER}, registry=registry, id="job-event"
    )
    async def job_event(body: kopf.Body, **kwargs: Any) -> None:
        recipe = body.meta.annotations.get(ANNOTATION_RECIPE)
        namespace = body.meta.namespace
        if not recipe or not namespace:
            return
        state = "deleted" if kwargs.get("type") == "DELETED" else job_state(body)
        value = f"{body.meta.name}={state}"
        await asyncio.to_thread(_annotate_recipe, namespace, recipe, ANNOTATION_LAST_JOB_EVENT, value)

    if chosen.progress_seconds is not None:

        @kopf.timer(
            GROUP,
            VERSION,
            PLURAL,
            registry=registry,
            id="phase-progress",
            interval=chosen.progress_seconds,
        )
        async def progress_timer(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
            await check_stuck(body, patch, chosen)
            await report_progress(body, patch, chosen)

    if chosen.metrics is not None:
        metrics = chosen.metrics

        @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="recipe-metrics")
        def recipe_metrics(body: kopf.Body, **kwargs: Any) -> None:
            key = f"{body.meta.namespace}/{body.meta.name}"
            deleted = kwargs.get("type") == "DELETED"
            metrics.recipe_seen(
                key, None if deleted else (body.get("status") or {}).get("phase") or "Pending"
            )

    if chosen.resync_seconds is not None:
        # The initial delay: a new recipe was just reconciled, it needs no resync yet.
        @kopf.timer(
            GROUP,
            VERSION,
            PLURAL,
            registry=registry,
            id="resync",
            interval=chosen.resync_seconds,
            initial_delay=chosen.resync_seconds,
        )
        def resync(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
            if (body.get("status") or {}).get("phase") in FINISHED:
                return
            patch.metadata.annotations[ANNOTATION_RESYNC] = _now().isoformat()
