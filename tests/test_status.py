"""Status from the plan: the phase, per-phase facts and conditions people and GitOps tools read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from ftrecipe.api import parse_recipe
from ftrecipe.api.crd import custom_resource_definition
from ftrecipe.api.v1alpha1 import EvaluationStatus, FinetuneRecipeSpec, TrainingStatus
from ftrecipe.evaluation import progress
from ftrecipe.plan.cache_key import phase_hashes, phase_prefix
from ftrecipe.plan.planner import ObservedJob, World, job_name, plan
from ftrecipe.plan.status import (
    ProgressPhase,
    compute_status,
    evaluation_message,
    evaluation_progress_update,
    invalid_status,
    progress_job,
    progress_update,
    remembered,
    retry_requested,
    training_message,
    with_progress,
)
from ftrecipe.termination import PhaseReport
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


def status_for(  # type: ignore[no-untyped-def]
    world: World, *, previous=None, now: datetime = T0, spec: FinetuneRecipeSpec = SPEC, observed_retry=None
):
    return compute_status(
        spec,
        3,
        plan("minimal", spec, world),
        prefixes=PREFIXES,
        now=now,
        previous=previous,
        observed_retry=observed_retry,
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


# --------------------------------------------------------------------------------------------- figures


def reported(phase: str, **figures: object) -> ObservedJob:
    plain = job(phase, "succeeded")
    return ObservedJob(
        plain.name, plain.phase, plain.inputs_hash, "succeeded", report=PhaseReport(True, "", figures)
    )


def test_reported_figures_fill_the_phase_sections() -> None:
    world = World(
        (
            reported(
                "data", num_ft_data_points=120, num_val_data_points=24, llm_calls=7, rephrasing_warnings=3
            ),
            reported("train", step=96, total_steps=96, train_loss=0.41, eval_loss=float("nan")),
            reported("evaluate", command_accuracy=0.875, per_command_f1={"start flow": 1.0, "set slot": 0.5}),
        )
    )
    status = status_for(world)
    assert status.phase == "Succeeded"
    assert status.data_preparation is not None and status.data_preparation.summary is not None
    assert status.data_preparation.summary.model_dump(exclude_none=True) == {
        "num_ft_data_points": 120,
        "num_val_data_points": 24,
        "llm_calls": 7,
    }
    training = status.training
    assert training is not None
    assert (training.step, training.total_steps, training.train_loss, training.eval_loss) == (
        96,
        96,
        0.41,
        None,
    )
    assert status.evaluation is not None
    assert status.evaluation.command_accuracy == 0.875
    assert status.evaluation.per_command == {"start flow": 1.0, "set slot": 0.5}
    # What the API server will store: valid against the CRD's status schema.
    dumped = {
        "apiVersion": "ftrecipe.dev/v1alpha1",
        "kind": "FinetuneRecipe",
        "metadata": {"name": "minimal"},
        "spec": manifest()["spec"],
        "status": status.model_dump(by_alias=True, exclude_none=True, mode="json"),
    }
    assert api_server_violations(custom_resource_definition(), dumped) == []


def test_the_status_remembers_finished_and_failed_phases() -> None:
    finished = status_for(
        World(
            (job("data", "succeeded"), job("train", "succeeded"), reported("evaluate", command_accuracy=0.9))
        )
    )
    done, failed = remembered("minimal", SPEC, finished, PREFIXES)
    assert set(done) == set(H.values()) and failed == {}
    assert done[H["evaluate"]].figures["command_accuracy"] == 0.9
    running = status_for(World((job("data", "succeeded"), job("train", "running"))))
    broken = status_for(
        World((job("data", "succeeded"), job("train", "failed", "OOMKilled"))), previous=running
    )
    done, failed = remembered("minimal", SPEC, broken, PREFIXES)
    assert set(done) == {H["data"]} and failed == {H["train"]: "OOMKilled"}
    # A training change: data is still remembered (same hash), the failed training is not.
    data = manifest()
    data["spec"]["training"]["gpus"] = 2
    other = parse_recipe(data).spec
    hashes = phase_hashes(other)
    prefixes = {p: phase_prefix("s3://ml-artifacts/ftrecipe", "minimal", p, hashes[p]) for p in hashes}
    assert remembered("minimal", other, broken, prefixes) == ({H["data"]: done[H["data"]]}, {})


# --------------------------------------------------------------------------------------------- retry


@pytest.mark.parametrize(
    ("annotation", "acted_on", "requested"),
    [
        (None, None, False),
        ("1732190000", None, True),  # the first value ever set
        ("1732190000", "1732190000", False),  # the same value again: already done
        ("1732193600", "1732190000", True),
        (None, "1732190000", False),  # the annotation removed: nothing to do
    ],
)
def test_a_retry_is_requested_by_a_value_not_acted_on_yet(
    annotation: str | None, acted_on: str | None, requested: bool
) -> None:
    previous = status_for(World((job("data", "running"),)), observed_retry=acted_on)
    assert previous.observed_retry == acted_on
    assert retry_requested(annotation, previous) is requested


def test_a_retry_forgets_the_failure_and_records_the_value() -> None:
    running = status_for(World((job("data", "succeeded"), job("train", "running"))))
    assert running.training is not None
    progressed = progress_update(running.training, {"step": 40, "total_steps": 96})
    running = running.model_copy(update={"training": progressed})
    failed_job = job("train", "failed", "AccessDenied")
    broken = status_for(World((job("data", "succeeded"), failed_job)), previous=running)
    assert broken.phase == "Failed"
    assert retry_requested("1732190000", broken)
    finished, failed = remembered("minimal", SPEC, broken, PREFIXES)
    assert failed == {H["train"]: "AccessDenied"}

    later = T0 + timedelta(hours=2)
    world = World((failed_job,), finished=finished, failed=failed, retry=True)
    retried = status_for(world, previous=broken, now=later, observed_retry="1732190000")
    assert retried.phase == "Training" and retried.observed_retry == "1732190000"
    assert conditions(retried)["Trained"] == ("Unknown", "Running")
    assert conditions(retried)["DataPrepared"] == ("True", "JobSucceeded")
    assert remembered("minimal", SPEC, retried, PREFIXES) == (finished, {})
    assert not retry_requested("1732190000", retried)
    # The new attempt has a section of its own: not the failed one's start, step or end.
    training = retried.training
    assert training is not None
    assert (training.started_at, training.completed_at, training.step) == (later, None, None)
    assert retried.message == f"training running (Job {failed_job.name})"
    assert retried.completed_at is None and retried.started_at == broken.started_at
    # The next pass (the new Job running, no new request) keeps the value.
    again = status_for(World((job("data", "succeeded"), job("train", "running"))), previous=retried)
    assert again.observed_retry == "1732190000"


def test_a_retry_without_a_failure_is_only_recorded() -> None:
    running = status_for(World((job("data", "running"),)))
    assert retry_requested("1732190000", running)
    retried = status_for(
        World((job("data", "running"),), retry=True), previous=running, observed_retry="1732190000"
    )
    assert retried == running.model_copy(update={"observed_retry": "1732190000"})
    # An invalid recipe has nothing to re-run either; the value acted on stays across it.
    invalid = invalid_status("spec.training: bad", 4, T0, retried)
    assert invalid.observed_retry == "1732190000"
    assert invalid_status(
        "spec.training: bad", 4, T0, invalid, observed_retry="1732193600"
    ).observed_retry == ("1732193600")
    document = {**manifest(), "status": retried.model_dump(by_alias=True, exclude_none=True, mode="json")}
    assert document["status"]["observedRetry"] == "1732190000"
    assert api_server_violations(custom_resource_definition(), document) == []


def test_training_progress_line_and_message() -> None:
    training = progress_update(
        TrainingStatus(job_name="j", step=3),
        {
            "step": 40,
            "total_steps": 120,
            "epoch": 1.0,
            "train_loss": 0.5123,
            "eval_loss": None,
            "eta_seconds": 5400,
        },
    )
    assert (training.step, training.total_steps, training.epoch, training.eta_seconds) == (40, 120, 1.0, 5400)
    assert training_message("training running (Job j)", training) == (
        "training running (Job j): step 40/120, train loss 0.5123, ETA 1h30m"
    )
    assert progress_update(training, {"train_loss": float("inf"), "step": -1}) == training


def test_evaluation_progress_line_and_message() -> None:
    started = evaluation_progress_update(
        EvaluationStatus(job_name="j"), {"done": 0, "total": 480, "eta_seconds": None}
    )
    assert (
        evaluation_message("evaluation running (Job j)", started) == "evaluation running (Job j): 0/480 turns"
    )
    evaluation = evaluation_progress_update(started, {"done": 120, "total": 480, "eta_seconds": 125.3})
    assert (evaluation.turns_done, evaluation.total_turns, evaluation.eta_seconds) == (120, 480, 125)
    assert evaluation_message("evaluation running (Job j)", evaluation) == (
        "evaluation running (Job j): 120/480 turns, ETA 2m05s"
    )
    # Counts a line cannot carry are kept; an unknown time left is unknown, not the last estimate.
    broken = evaluation_progress_update(evaluation, {"done": -1, "total": True, "eta_seconds": float("nan")})
    assert (broken.turns_done, broken.total_turns, broken.eta_seconds) == (120, 480, None)
    assert evaluation_message("head", EvaluationStatus(job_name="j")) == "head"


def test_the_evaluation_stage_is_named_and_each_stage_counts_its_own_turns() -> None:
    # `evaluate --e2e` prints the scoring's lines (stage generate: the validation turns) and then the E2E
    # replay's (stage e2e: the turns the held-out tests can reach), each counting from 0.
    assert (progress.STAGE, progress.E2E_STAGE) == ("generate", "e2e")  # the lines the operator reads
    head = "evaluation running (Job j)"
    scoring = evaluation_progress_update(
        EvaluationStatus(job_name="j"), {"stage": "generate", "done": 12, "total": 19, "eta_seconds": 61.0}
    )
    assert (scoring.stage, scoring.turns_done, scoring.total_turns) == ("scoring", 12, 19)
    assert evaluation_message(head, scoring) == "evaluation running (Job j): scoring 12/19 turns, ETA 1m01s"
    scored = evaluation_progress_update(
        scoring, {"stage": "generate", "done": 19, "total": 19, "eta_seconds": 0}
    )
    assert evaluation_message(head, scored) == "evaluation running (Job j): scoring 19/19 turns, ETA 0m00s"

    # The switch: the replay's first line (done 0, time left unknown) restarts the count under its name.
    replay = evaluation_progress_update(scored, {"stage": "e2e", "done": 0, "total": 7, "eta_seconds": None})
    assert (replay.stage, replay.turns_done, replay.total_turns, replay.eta_seconds) == ("e2e", 0, 7, None)
    assert evaluation_message(head, replay) == "evaluation running (Job j): E2E tests 0/7 turns"
    replay = evaluation_progress_update(replay, {"stage": "e2e", "done": 5, "total": 7, "eta_seconds": 30.4})
    assert evaluation_message(head, replay) == "evaluation running (Job j): E2E tests 5/7 turns, ETA 0m30s"
    # A replay line whose counts cannot be read keeps none of the scoring's: 19/19 is not the replay's.
    unreadable = evaluation_progress_update(scored, {"stage": "e2e", "done": None, "total": -3})
    assert (unreadable.stage, unreadable.turns_done, unreadable.total_turns) == ("e2e", None, None)
    assert evaluation_message(head, unreadable) == "evaluation running (Job j)"

    # An older evaluate image prints no stage, and a newer one may print a stage this operator does not
    # know: the counts as they come, the message as before.
    for line in (
        {"done": 120, "total": 480, "eta_seconds": 125.3},
        {"stage": "rerank", "done": 120, "total": 480, "eta_seconds": 125.3},
    ):
        unnamed = evaluation_progress_update(EvaluationStatus(job_name="j"), line)
        assert (unnamed.stage, unnamed.turns_done, unnamed.total_turns) == (None, 120, 480)
        assert evaluation_message(head, unnamed) == "evaluation running (Job j): 120/480 turns, ETA 2m05s"


HUMAN = {"train": "training", "evaluate": "evaluation"}
RUNNING: dict[str, World] = {
    "train": World((job("data", "succeeded"), job("train", "running"))),
    "evaluate": World((job("data", "succeeded"), job("train", "succeeded"), job("evaluate", "running"))),
}


@pytest.mark.parametrize(
    ("phase", "progress", "figures"),
    [
        (
            "train",
            {"step": 30, "total_steps": 120, "train_loss": 1.25, "eval_loss": None, "eta_seconds": 450},
            "step 30/120, train loss 1.25, ETA 7m30s",
        ),
        (
            "evaluate",
            {"stage": "generate", "done": 120, "total": 480, "eta_seconds": 125.3},
            "scoring 120/480 turns, ETA 2m05s",
        ),
        (
            "evaluate",
            {"stage": "e2e", "done": 5, "total": 19, "eta_seconds": 30.4},
            "E2E tests 5/19 turns, ETA 0m30s",
        ),
        ("evaluate", {"done": 120, "total": 480, "eta_seconds": 125.3}, "120/480 turns, ETA 2m05s"),
    ],
    ids=["train", "evaluate", "evaluate-e2e", "evaluate-older-image"],
)
def test_progress_reaches_the_message_and_stays_there_across_reconciles(
    phase: ProgressPhase, progress: dict[str, object], figures: str
) -> None:
    running = status_for(RUNNING[phase])
    assert progress_job(running) == (phase, job(phase, "x").name)
    updated = with_progress(running, phase, progress)
    assert updated.message == f"{HUMAN[phase]} running (Job {job(phase, 'x').name}): {figures}"
    document = {**manifest(), "status": updated.model_dump(by_alias=True, exclude_none=True, mode="json")}
    assert api_server_violations(custom_resource_definition(), document) == []
    # The next reconcile computes the same message from the figures it keeps: no flapping.
    assert status_for(RUNNING[phase], previous=updated, now=T0 + timedelta(minutes=1)) == updated


def test_a_finished_evaluation_counts_every_turn() -> None:
    running = status_for(RUNNING["evaluate"])
    midway = with_progress(running, "evaluate", {"stage": "e2e", "done": 3, "total": 19, "eta_seconds": 30})
    assert midway.evaluation is not None and midway.evaluation.stage == "e2e"
    world = World((job("data", "succeeded"), job("train", "succeeded"), reported("evaluate", num_turns=480)))
    done = status_for(world, previous=midway)
    assert done.phase == "Succeeded" and done.message == "the adapter is ready"
    assert done.evaluation is not None
    # The counts are the validation turns now, no stage's.
    assert (
        done.evaluation.stage,
        done.evaluation.turns_done,
        done.evaluation.total_turns,
        done.evaluation.eta_seconds,
    ) == (None, 480, 480, 0)
    assert progress_job(done) is None


def test_progress_is_read_only_from_a_running_training_or_evaluation() -> None:
    preparing = status_for(World((job("data", "running"),)))
    assert progress_job(preparing) is None
    assert progress_job(None) is None
    # A status without the phase's section (written by an older operator) names no Job: nothing changes.
    bare = preparing.model_copy(update={"phase": "Evaluating"})
    assert progress_job(bare) is None
    assert with_progress(bare, "evaluate", {"done": 1, "total": 2, "eta_seconds": 1}) == bare
