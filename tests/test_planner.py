"""The phase planner: given the same world, the same plan (so a restarted operator adopts, never duplicates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.api import parse_recipe
from ftrecipe.api.v1alpha1 import FinetuneRecipeSpec
from ftrecipe.plan.cache_key import phase_hashes
from ftrecipe.plan.planner import (
    CreateJob,
    DeleteJob,
    Done,
    Fail,
    ObservedJob,
    ResumeJob,
    Retry,
    Reuse,
    Succeed,
    SuspendJob,
    Wait,
    World,
    job_name,
    plan,
    quality_gate,
    recipe_phase,
)
from ftrecipe.termination import PhaseReport

MINIMAL = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "minimal.yaml"


def spec(**changes: Any) -> FinetuneRecipeSpec:
    data = yaml.safe_load(MINIMAL.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data["spec"]
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return parse_recipe(data).spec


BASE = spec()
H = phase_hashes(BASE)


def job(phase: str, state: str, inputs_hash: str | None = None, message: str | None = None) -> ObservedJob:
    h = inputs_hash or H[phase]  # type: ignore[index]
    return ObservedJob(job_name("minimal", phase, h), phase, h, state, message)  # type: ignore[arg-type]


def test_a_new_recipe_starts_data_preparation() -> None:
    actions = plan("minimal", BASE, World())
    assert actions == [CreateJob("data", H["data"], f"minimal-data-{H['data'][:8]}", False)]
    assert recipe_phase(BASE, actions) == "PreparingData"


def test_an_existing_job_is_adopted_not_duplicated() -> None:
    actions = plan("minimal", BASE, World((job("data", "running"),)))
    assert actions == [Wait("data", job("data", "running").name)]


def test_phases_follow_each_other_to_success() -> None:
    after_data = plan("minimal", BASE, World((job("data", "succeeded"),)))
    assert after_data == [
        Done("data", H["data"]),
        CreateJob("train", H["train"], job("train", "x").name, False),
    ]
    assert recipe_phase(BASE, after_data) == "Training"
    evaluating = plan("minimal", BASE, World((job("data", "succeeded"), job("train", "succeeded"))))
    assert isinstance(evaluating[-1], CreateJob)
    assert evaluating[-1].phase == "evaluate"
    finished = plan(
        "minimal",
        BASE,
        World((job("data", "succeeded"), job("train", "succeeded"), job("evaluate", "succeeded"))),
    )
    assert finished[-1] == Succeed()
    assert recipe_phase(BASE, finished) == "Succeeded"


def test_evaluation_disabled_ends_after_training() -> None:
    no_eval = spec(evaluation={"enabled": False})
    hashes = phase_hashes(no_eval)
    jobs = tuple(
        ObservedJob(job_name("minimal", p, hashes[p]), p, hashes[p], "succeeded")
        for p in ("data", "train")  # type: ignore[arg-type]
    )
    assert plan("minimal", no_eval, World(jobs))[-1] == Succeed()


def test_complete_bundles_are_reused() -> None:
    actions = plan("minimal", BASE, World(complete=frozenset({H["data"]})))
    assert actions[0] == Reuse("data", H["data"])
    assert isinstance(actions[1], CreateJob)
    assert actions[1].phase == "train"


def test_a_training_change_keeps_data_and_replaces_the_running_training_job() -> None:
    changed = spec(training__hyperparameters={"learningRate": 3.0e-4})
    new = phase_hashes(changed)
    assert new["data"] == H["data"]
    world = World((job("data", "succeeded"), job("train", "running")), complete=frozenset({H["data"]}))
    actions = plan("minimal", changed, world)
    assert actions == [
        DeleteJob(job("train", "running").name, "inputs of phase train changed"),
        Done("data", H["data"]),
        CreateJob("train", new["train"], job_name("minimal", "train", new["train"]), False),
    ]


def test_a_failed_job_fails_the_recipe_with_its_message() -> None:
    actions = plan(
        "minimal",
        BASE,
        World((job("data", "succeeded"), job("train", "failed", message="CUDA out of memory"))),
    )
    assert actions[-1] == Fail("train", "JobFailed", "CUDA out of memory")
    assert recipe_phase(BASE, actions) == "Failed"


def test_suspend_and_resume() -> None:
    suspended = spec(suspend=True)
    assert plan("minimal", suspended, World((job("data", "running"),)))[:1] == [
        SuspendJob(job("data", "x").name)
    ]
    assert (
        recipe_phase(suspended, plan("minimal", suspended, World((job("data", "suspended"),)))) == "Suspended"
    )
    assert plan("minimal", suspended, World())[0] == CreateJob("data", H["data"], job("data", "x").name, True)
    assert plan("minimal", BASE, World((job("data", "suspended"),)))[0] == ResumeJob(job("data", "x").name)


def test_kueue_creates_suspended_and_leaves_admission_to_kueue() -> None:
    queued = spec(queueName="gpu-queue")
    assert plan("minimal", queued, World())[0] == CreateJob("data", H["data"], job("data", "x").name, True)
    assert plan("minimal", queued, World((job("data", "suspended"),))) == [
        Wait("data", job("data", "x").name)
    ]


def test_local_paths_are_rejected_in_a_cluster_but_fine_locally() -> None:
    local = spec(output={"local": {"path": "out"}})
    (failure,) = plan("minimal", local, World())
    assert isinstance(failure, Fail)
    assert failure.reason == "LocalPathInCluster"
    assert "spec.output.local" in failure.message
    assert isinstance(plan("minimal", local, World(), in_cluster=False)[0], CreateJob)


@pytest.mark.parametrize("recipe", ["r", "a" * 40, "b" * 63, "support-assistant-llama31-" + "x" * 60])
def test_job_names_fit_and_stay_unique(recipe: str) -> None:
    name = job_name(recipe, "evaluate", "f" * 64)
    assert len(name) <= 63
    assert name.endswith("-eval-ffffffff")
    assert job_name(recipe, "evaluate", "f" * 64) == name
    assert job_name(recipe + "z", "evaluate", "f" * 64) != name


# --------------------------------------------------------------------------------------------- gate, memory


def evaluated(accuracy: float | None, **per_command: float) -> ObservedJob:
    figures: dict[str, Any] = {"per_command_f1": per_command}
    if accuracy is not None:
        figures["command_accuracy"] = accuracy
    finished = job("evaluate", "succeeded")
    return ObservedJob(
        finished.name, "evaluate", finished.inputs_hash, "succeeded", report=PhaseReport(True, "", figures)
    )


@pytest.mark.parametrize(
    ("minimum", "accuracy", "outcome"),
    [
        (0.0, 0.1, "pass"),  # 0 disables the gate
        (0.8, 0.8, "pass"),  # the bound itself passes
        (0.8, 0.95, "pass"),
        (0.8, 0.79, "fail"),
        (0.8, None, "fail"),  # no figure: no pass
    ],
)
def test_quality_gate(minimum: float, accuracy: float | None, outcome: str) -> None:
    gated = spec(evaluation={"minCommandAccuracy": minimum})
    hashes = phase_hashes(gated)
    assert hashes == H  # the threshold is not an input of any phase: changing it re-runs nothing
    world = World(
        (job("data", "succeeded"), job("train", "succeeded"), evaluated(accuracy, **{"start flow": 0.9}))
    )
    actions = plan("minimal", gated, world)
    if outcome == "pass":
        assert actions[-1] == Succeed()
        return
    last = actions[-1]
    assert isinstance(last, Fail) and (last.phase, last.reason) == ("evaluate", "QualityGateNotMet")
    assert recipe_phase(gated, actions) == "Failed"
    if accuracy is not None:
        assert last.message == (
            "command accuracy 0.790 is below spec.evaluation.minCommandAccuracy 0.8; lowest F1: start flow 0.90"
        )


def test_gate_message_names_the_weakest_commands() -> None:
    failed = quality_gate(
        0.9,
        PhaseReport(
            True,
            "",
            {
                "command_accuracy": 0.5,
                "per_command_f1": {"set slot": 0.2, "clarify": 0.0, "start flow": 0.8, "cancel flow": 0.95},
            },
        ),
    )
    assert failed is not None
    assert failed.message.endswith("lowest F1: clarify 0.00, set slot 0.20, start flow 0.80")


def test_a_complete_evaluation_bundle_is_rerun_when_a_gate_needs_its_figures() -> None:
    gated = spec(evaluation={"minCommandAccuracy": 0.5})
    world = World((job("data", "succeeded"), job("train", "succeeded")), complete=frozenset({H["evaluate"]}))
    assert plan("minimal", gated, world)[-1] == CreateJob(
        "evaluate", H["evaluate"], job("evaluate", "x").name, False
    )
    assert plan("minimal", BASE, world)[-2:] == [Reuse("evaluate", H["evaluate"]), Succeed()]
    # With the figures from the bundle's manifest, the gate is checked on them and nothing runs.
    figures = PhaseReport(True, "", {"command_accuracy": 0.4})
    known = World(world.jobs, complete=world.complete, reports={H["evaluate"]: figures})
    actions = plan("minimal", gated, known)
    assert actions[-2] == Reuse("evaluate", H["evaluate"], figures)
    assert isinstance(actions[-1], Fail) and actions[-1].reason == "QualityGateNotMet"


def test_phases_the_status_remembers_are_not_run_again() -> None:
    remembered = PhaseReport(True, "", {})
    world = World(finished={H["data"]: remembered, H["train"]: remembered})
    actions = plan("minimal", BASE, world)
    assert actions == [
        Done("data", H["data"], remembered),
        Done("train", H["train"], remembered),
        CreateJob("evaluate", H["evaluate"], job("evaluate", "x").name, False),
    ]
    failed = plan("minimal", BASE, World(finished={H["data"]: remembered}, failed={H["train"]: "OOM"}))
    assert failed[-1] == Fail("train", "JobFailed", "OOM")
    # A Job seen for that hash is the fresher fact.
    running = plan(
        "minimal",
        BASE,
        World((job("train", "running"),), finished={H["data"]: remembered}, failed={H["train"]: "OOM"}),
    )
    assert running[-1] == Wait("train", job("train", "x").name)


# --------------------------------------------------------------------------------------------- retry


def test_a_retry_runs_the_failed_phase_again() -> None:
    failed = World((job("data", "succeeded"), job("train", "failed", message="AccessDenied")), retry=True)
    actions = plan("minimal", BASE, failed)
    train = job("train", "x").name
    assert actions == [
        Done("data", H["data"]),
        Retry("train", H["train"]),
        DeleteJob(train, "retry requested"),  # the new Job takes its name
        CreateJob("train", H["train"], train, False),
    ]
    assert recipe_phase(BASE, actions) == "Training"
    # The failed Job is gone (its TTL) and only the status remembers the failure: forgotten as well.
    remembered = World(
        finished={H["data"]: PhaseReport(True, "", {})}, failed={H["train"]: "OOM"}, retry=True
    )
    assert plan("minimal", BASE, remembered)[1:] == [
        Retry("train", H["train"]),
        CreateJob("train", H["train"], train, False),
    ]


@pytest.mark.parametrize(
    "jobs",
    [
        pytest.param((job("data", "succeeded"), job("train", "running")), id="running"),
        pytest.param((job("data", "succeeded"), job("train", "succeeded")), id="succeeded"),
        pytest.param((job("data", "succeeded"), job("train", "succeeded"), evaluated(0.5)), id="gate-failed"),
    ],
)
def test_a_retry_without_a_failed_job_changes_nothing(jobs: tuple[ObservedJob, ...]) -> None:
    """Succeeded phases are never run again; a failed quality gate is checked again, on the same figures."""
    gated = spec(evaluation={"minCommandAccuracy": 0.8})
    # A failure remembered for a hash with a Job of its own is stale: the Job is the fresher fact.
    remembered = {H["train"]: "OOM"}
    retried = plan("minimal", gated, World(jobs, failed=remembered, retry=True))
    assert retried == plan("minimal", gated, World(jobs, failed=remembered))
    assert not any(isinstance(action, Retry | DeleteJob) for action in retried)
