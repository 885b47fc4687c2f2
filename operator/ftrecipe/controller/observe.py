"""What the operator sees of a recipe's Jobs: Kubernetes Job objects turned into the planner's `ObservedJob`.

`observed_job` is pure (a Job as a plain dict, e.g. from a watch or a list); `list_recipe_jobs` lists a
recipe's Jobs by label with the synchronous `kubernetes` client, run in a worker thread so the operator's
event loop never blocks. The failure message comes from the Job's ``Failed`` condition; reading the pod's
termination message (more precise) can come later.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any, cast

import kubernetes.client

from ftrecipe.controller.manifests import (
    ANNOTATION_INPUTS_HASH,
    ANNOTATION_RECIPE,
    LABEL_MANAGED_BY,
    LABEL_PHASE,
    LABEL_RECIPE,
    MANAGER,
    label_value,
)
from ftrecipe.plan.cache_key import PHASES, Phase
from ftrecipe.plan.planner import JobState, ObservedJob


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
    """The planner's view of one Job; None for a Job that is not one of ours (no phase or inputs hash)."""
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
    )


def recipe_selector(recipe_name: str) -> str:
    return f"{LABEL_MANAGED_BY}={MANAGER},{LABEL_RECIPE}={label_value(recipe_name)}"


def recipe_jobs(recipe_name: str, jobs: Sequence[Mapping[str, Any]]) -> tuple[ObservedJob, ...]:
    """The recipe's Jobs among `jobs`, sorted by name: those being deleted and those of another recipe whose
    (shortened) label value happens to match are left out."""
    observed = []
    for job in jobs:
        metadata = job.get("metadata") or {}
        if metadata.get("deletionTimestamp"):
            continue
        owner = (metadata.get("annotations") or {}).get(ANNOTATION_RECIPE)
        if owner is not None and owner != recipe_name:
            continue
        seen = observed_job(job)
        if seen is not None:
            observed.append(seen)
    return tuple(sorted(observed, key=lambda j: j.name))


def _list_jobs_sync(namespace: str, selector: str) -> list[dict[str, Any]]:
    response: Any = kubernetes.client.BatchV1Api().list_namespaced_job(
        namespace, label_selector=selector, _preload_content=False
    )
    data = json.loads(response.data)
    return list(data.get("items") or [])


async def list_recipe_jobs(namespace: str, recipe_name: str) -> tuple[ObservedJob, ...]:
    """This recipe's Jobs, listed by label selector (the sync client, in a worker thread)."""
    items = await asyncio.to_thread(_list_jobs_sync, namespace, recipe_selector(recipe_name))
    return recipe_jobs(recipe_name, items)
