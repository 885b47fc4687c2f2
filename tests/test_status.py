"""Status from the plan: the phase, per-phase facts and conditions people and GitOps tools read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from ftrecipe.api import parse_recipe
from ftrecipe.api.crd import custom_resource_definition
from ftrecipe.api.v1alpha1 import FinetuneRecipeSpec
from ftrecipe.plan.cache_key import phase_hashes, phase_prefix
from ftrecipe.plan.planner import ObservedJob, World, job_name, plan
from ftrecipe.plan.status import compute_status
from support.crd_schema import api_server_violations

MINIMAL = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "minimal.yaml"
T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def manifest() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load(MINIMAL.read_text())


SPEC: FinetuneRecipeSpec = parse_recipe(manifest()).spec
H = phase_hashes(SPEC)
PREFIXES = {p: phase_prefix("s3://ml-artifacts/ftrecipe", "minimal", p, H[p]) for p in H}  # type: ignore[index]


def job(phase: str, state: str, message: str | None = None) -> ObservedJob:
    return ObservedJob(job_name("minimal", phase, H[phase]), phase, H[phase], state, message)  # type: ignore[arg-type,index]


def status_for(world: World, *, previous=None, now: datetime = T0, spec: FinetuneRecipeSpec = SPEC):  # type: ignore[no-untyped-def]
    return compute_status(
        spec, 3, plan("minimal", spec, world), prefixes=PREFIXES, now=now, previous=previous
    )


def conditions(status) -> dict[str, tuple[str, str]]:  # type: ignore[no-untyped-def]
    return {c.type: (c.status, c.reason) for c in status.conditions}


def test_running_data_preparation() -> None:
    status = status_for(World((job("data", "running"),)))
    assert status.phase == "PreparingData"
    assert status.observed_generation == 3
    assert status.message == f"data preparation running (Job {job('data', 'x').name})"
    assert conditions(status) == {
        "DataPrepared": ("Unknown", "Running"),
        "Trained": ("Unknown", "Pending"),
        "Evaluated": ("Unknown", "Pending"),
        "Ready": ("False", "PreparingData"),
    }
    assert status.data_preparation is not None
    assert status.data_preparation.job_name == job("data", "x").name
    assert status.training is None


def test_cached_data_and_running_training() -> None:
    status = status_for(World((job("train", "running"),), complete=frozenset({H["data"]})))
    assert status.phase == "Training"
    assert conditions(status)["DataPrepared"] == ("True", "Cached")
    assert status.data_preparation is not None
    assert status.data_preparation.cached is True
    assert status.data_preparation.dataset_uri == PREFIXES["data"]


def test_success_sets_ready_and_uris() -> None:
    world = World((job("data", "succeeded"), job("train", "succeeded"), job("evaluate", "succeeded")))
    status = status_for(world)
    assert status.phase == "Succeeded"
    assert conditions(status)["Ready"] == ("True", "Succeeded")
    assert status.training is not None
    assert status.training.adapter_uri == PREFIXES["train"]
    assert status.completed_at == T0
    assert status.evaluation is not None
    assert status.evaluation.report_uri == PREFIXES["evaluate"]


def test_failure_carries_the_jobs_message() -> None:
    status = status_for(
        World((job("data", "succeeded"), job("train", "failed", "CUDA out of memory at step 40")))
    )
    assert status.phase == "Failed"
    assert conditions(status)["Trained"] == ("False", "JobFailed")
    assert conditions(status)["Ready"] == ("False", "JobFailed")
    assert status.message == "CUDA out of memory at step 40"


def test_transition_times_move_only_when_a_condition_changes() -> None:
    first = status_for(World((job("data", "running"),)))
    later = status_for(World((job("data", "running"),)), previous=first, now=T0 + timedelta(minutes=5))
    assert {c.type: c.last_transition_time for c in later.conditions} == {
        c.type: T0 for c in first.conditions
    }
    done = status_for(World((job("data", "succeeded"),)), previous=later, now=T0 + timedelta(minutes=9))
    times = {c.type: c.last_transition_time for c in done.conditions}
    assert times["DataPrepared"] == T0 + timedelta(minutes=9)
    assert times["Evaluated"] == T0
    assert done.started_at == T0
    assert done.data_preparation is not None
    assert done.data_preparation.completed_at == T0 + timedelta(minutes=9)


def test_suspended() -> None:
    spec = parse_recipe({**manifest(), "spec": {**manifest()["spec"], "suspend": True}}).spec
    status = status_for(World((job("data", "suspended"),)), spec=spec)
    assert status.phase == "Suspended"
    assert conditions(status)["DataPrepared"] == ("Unknown", "Suspended")


def test_status_is_valid_for_the_crd() -> None:
    world = World((job("data", "succeeded"), job("train", "failed", "boom")))
    status = status_for(world)
    document = {**manifest(), "status": status.model_dump(by_alias=True, exclude_none=True, mode="json")}
    assert api_server_violations(custom_resource_definition(), document) == []
