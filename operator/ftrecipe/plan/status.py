"""The recipe's status, computed from the plan: phase, message, per-phase facts and metav1 conditions.

Pure: the kopf shell and `ftrecipe run` both write what this returns. Conditions keep their
`lastTransitionTime` while their status does not change, as Kubernetes conventions (and kstatus) expect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final, Literal, TypeGuard, TypeVar

from ftrecipe.api.v1alpha1 import (
    Condition,
    DataPreparationStatus,
    DataSummary,
    EvaluationStage,
    EvaluationStatus,
    FinetuneRecipeSpec,
    FinetuneRecipeStatus,
    PlannedWith,
    TrainingStatus,
)
from ftrecipe.plan.cache_key import PHASES, Phase, phase_hashes
from ftrecipe.plan.planner import (
    JOB_FAILURE_REASONS,
    PHASE_HUMAN,
    STUCK_REASONS,
    Action,
    CreateJob,
    Done,
    Fail,
    Retry,
    Reuse,
    Succeed,
    Wait,
    phases,
    queued_blocker,
    recipe_phase,
    runs_as_jobset,
    workload_name,
)
from ftrecipe.termination import PhaseReport

CONDITION_OF: dict[Phase, str] = {"data": "DataPrepared", "train": "Trained", "evaluate": "Evaluated"}
_HUMAN: Final = PHASE_HUMAN
ConditionStatus = Literal["True", "False", "Unknown"]
# The phases whose commands print progress lines while they run, by the recipe phase they run in.
ProgressPhase = Literal["train", "evaluate"]
PROGRESS_PHASES: Final[dict[str, ProgressPhase]] = {"Training": "train", "Evaluating": "evaluate"}


def _condition(
    kind: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
    previous: Mapping[str, Condition],
) -> Condition:
    before = previous.get(kind)
    since = before.last_transition_time if before is not None and before.status == status else now
    return Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )


def _phase_facts(actions: Sequence[Action], *, results_first: bool = False) -> dict[Phase, Action]:
    """The last action about each phase; with ``results_first``, a Done/Reuse wins over a later Fail (a
    failed quality gate: the evaluation's output and figures are still there to show)."""
    facts: dict[Phase, Action] = {}
    for action in actions:
        if isinstance(action, Done | Reuse | CreateJob | Wait) or (isinstance(action, Fail) and action.phase):
            phase: Phase = action.phase  # type: ignore[assignment]
            if results_first and isinstance(facts.get(phase), Done | Reuse):
                continue
            facts[phase] = action
    return facts


def compute_status(
    spec: FinetuneRecipeSpec,
    generation: int,
    actions: Sequence[Action],
    *,
    prefixes: Mapping[Phase, str],
    now: datetime,
    previous: FinetuneRecipeStatus | None = None,
    observed_retry: str | None = None,
    planned: PlannedWith | None = None,
) -> FinetuneRecipeStatus:
    """The status after applying `actions`; `prefixes` are where each phase's bundle is (or will be).

    ``observed_retry`` is the retry annotation value this pass acted on (None keeps the previous one). A
    phase that is retried starts a fresh section: the failed attempt's times and figures are not its own.
    """
    previous = previous or FinetuneRecipeStatus()
    actions = _queued_creations(actions, spec, now)
    retried = {action.phase for action in actions if isinstance(action, Retry)}
    data_before = None if "data" in retried else previous.data_preparation
    training_before = None if "train" in retried else previous.training
    evaluation_before = None if "evaluate" in retried else previous.evaluation
    before = {c.type: c for c in previous.conditions or []}
    phase = recipe_phase(spec, actions)
    facts = _phase_facts(actions)
    results = _phase_facts(actions, results_first=True)
    last = actions[-1] if actions else None
    conditions: list[Condition] = []
    for name in phases(spec):
        fact = facts.get(name)
        kind = CONDITION_OF[name]
        if isinstance(fact, Done):
            cond = _condition(
                kind, "True", "JobSucceeded", f"{_HUMAN[name]} finished", generation, now, before
            )
        elif isinstance(fact, Reuse):
            message = f"reused the output of an earlier identical run at {prefixes[name]}"
            cond = _condition(kind, "True", "Cached", message, generation, now, before)
        elif isinstance(fact, Fail):
            cond = _condition(kind, "False", fact.reason, fact.message, generation, now, before)
        elif isinstance(fact, Wait) and fact.blocker is not None:
            blocker = fact.blocker
            cond = _condition(kind, "Unknown", blocker.reason, blocker.message, generation, now, before)
        elif isinstance(fact, CreateJob | Wait):
            reason = "Suspended" if spec.suspend else "Running"
            cond = _condition(kind, "Unknown", reason, f"{_HUMAN[name]} in progress", generation, now, before)
        else:
            cond = _condition(
                kind, "Unknown", "Pending", "waiting for earlier phases", generation, now, before
            )
        conditions.append(cond)
    if isinstance(last, Succeed):
        evaluated = results.get("evaluate")
        headline = evaluation_headline(evaluated.report) if isinstance(evaluated, Done | Reuse) else ""
        ready_text = f"the adapter is ready: {headline}" if headline else "the adapter is ready"
        ready = _condition("Ready", "True", "Succeeded", ready_text, generation, now, before)
    elif isinstance(last, Fail):
        ready = _condition("Ready", "False", last.reason, last.message, generation, now, before)
    elif isinstance(last, Wait) and last.blocker is not None:
        waiting = _waiting_line(last.phase, last.name, last.blocker.message)
        ready = _condition("Ready", "False", last.blocker.reason, waiting, generation, now, before)
    else:
        ready = _condition("Ready", "False", phase, f"recipe is {phase}", generation, now, before)
    conditions.append(ready)

    message = (
        ready.message
        if phase in ("Succeeded", "Failed")
        else _progress_message(actions, spec, {"train": training_before, "evaluate": evaluation_before})
    )
    finished = phase in ("Succeeded", "Failed")
    return FinetuneRecipeStatus(
        phase=phase,
        observed_generation=generation,
        observed_retry=observed_retry if observed_retry is not None else previous.observed_retry,
        planned_with=planned if planned is not None else previous.planned_with,
        started_at=previous.started_at or now,
        completed_at=(previous.completed_at or now) if finished else None,
        message=message,
        conditions=conditions,
        data_preparation=_phase_status(
            "data", results.get("data"), prefixes, data_before, DataPreparationStatus(), now
        ),
        training=_with_restarts(
            _phase_status("train", results.get("train"), prefixes, training_before, TrainingStatus(), now),
            results.get("train"),
            jobset=runs_as_jobset(spec, "train"),
        ),
        evaluation=_phase_status(
            "evaluate", results.get("evaluate"), prefixes, evaluation_before, EvaluationStatus(), now
        )
        if "evaluate" in phases(spec)
        else None,
    )


def _queued_creations(actions: Sequence[Action], spec: FinetuneRecipeSpec, now: datetime) -> list[Action]:
    """A Job just created for Kueue waits in its queue (suspended until Kueue admits it): shown as waiting
    from the start, never as running."""
    if spec.suspend or spec.queue_name is None:
        return list(actions)
    return [
        Wait(a.phase, a.name, queued_blocker(spec.queue_name, now))
        if isinstance(a, CreateJob) and a.suspended
        else a
        for a in actions
    ]


def invalid_status(
    message: str,
    generation: int,
    now: datetime,
    previous: FinetuneRecipeStatus | None = None,
    *,
    observed_retry: str | None = None,
) -> FinetuneRecipeStatus:
    """A recipe that cannot run at all: Failed, the one line in the message and the Ready condition (its
    transition time kept while it stays False). A retry request is recorded: there is nothing to re-run."""
    before = {c.type: c for c in (previous.conditions or [])} if previous is not None else {}
    if observed_retry is None and previous is not None:
        observed_retry = previous.observed_retry
    return FinetuneRecipeStatus(
        phase="Failed",
        observed_generation=generation,
        observed_retry=observed_retry,
        started_at=previous.started_at if previous is not None else None,
        completed_at=(previous.completed_at if previous is not None else None) or now,
        message=message,
        conditions=[_condition("Ready", "False", "InvalidRecipe", message, generation, now, before)],
    )


def _progress_message(
    actions: Sequence[Action],
    spec: FinetuneRecipeSpec,
    sections: Mapping[Phase, TrainingStatus | EvaluationStatus | None],
) -> str:
    """The running phase's line; with the progress its section already has for that Job, so a reconcile
    says what the progress timer said (the message does not flap between the two)."""
    last = actions[-1] if actions else None
    if isinstance(last, Wait) and last.blocker is not None:
        return _waiting_line(
            last.phase, last.name, last.blocker.message, jobset=runs_as_jobset(spec, last.phase)
        )
    if isinstance(last, CreateJob | Wait):
        waiting = last if isinstance(last, Wait) else None
        line = _job_line(
            last.phase,
            last.name,
            suspended=spec.suspend,
            jobset=runs_as_jobset(spec, last.phase),
            restarts=waiting.restarts if waiting else None,
            max_restarts=waiting.max_restarts if waiting else None,
            preemptions=waiting.preemptions if waiting else None,
        )
        section = sections.get(last.phase)
        if section is not None and section.job_name == last.name:
            line = _figures_message(line, section)
        return line
    return "planning"


def _job_line(
    phase: Phase,
    job_name: str,
    *,
    suspended: bool = False,
    jobset: bool = False,
    restarts: int | None = None,
    max_restarts: int | None = None,
    preemptions: int | None = None,
) -> str:
    """`training running (Job X)`: the head of the message while a phase's Job exists; a multi-node
    training's reads `training running (JobSet X, restarted 1 of 3 times after a lost node)`."""
    kind = "JobSet" if jobset else "Job"
    state = "suspended" if suspended else "running"
    restarted = restarts_text(restarts, max_restarts, preemptions)
    return f"{_HUMAN[phase]} {state} ({kind} {job_name}{restarted})"


def restarts_text(restarts: int | None, max_restarts: int | None, preemptions: int | None = None) -> str:
    """`, restarted 1 of 3 times after a lost node` once a JobSet restarted its group (counted restarts),
    `, restarted after 2 preemptions` (uncounted), both joined by `and`; else nothing."""
    parts = []
    if restarts:
        times = "time" if restarts == 1 and max_restarts is None else "times"
        of = f" of {max_restarts}" if max_restarts is not None else ""
        parts.append(f"{restarts}{of} {times} after a lost node")
    if preemptions:
        parts.append(f"after {preemptions} preemption{'s' if preemptions > 1 else ''}")
    return f", restarted {' and '.join(parts)}" if parts else ""


def _waiting_line(phase: Phase, job_name: str, why: str, *, jobset: bool = False) -> str:
    """`training waiting (Job X): <why its pod has not started>`."""
    return f"{_HUMAN[phase]} waiting ({'JobSet' if jobset else 'Job'} {job_name}): {why}"


def _with_restarts(
    section: TrainingStatus | None, fact: Action | None, *, jobset: bool
) -> TrainingStatus | None:
    """A multi-node training's section with its JobSet's restarts (0 for a JobSet just created); a
    training back on one node (a Job) shows none."""
    if section is None or not isinstance(fact, CreateJob | Wait):
        return section
    if not jobset:
        if section.restarts is None and section.max_restarts is None and section.preemptions is None:
            return section
        return section.model_copy(update={"restarts": None, "max_restarts": None, "preemptions": None})
    if isinstance(fact, Wait) and fact.restarts is not None:
        return section.model_copy(
            update={
                "restarts": fact.restarts,
                "max_restarts": fact.max_restarts,
                "preemptions": fact.preemptions or None,
            }
        )
    if isinstance(fact, CreateJob) or section.restarts is None:
        return section.model_copy(update={"restarts": 0, "max_restarts": None, "preemptions": None})
    return section


def _figures_message(head: str, section: TrainingStatus | EvaluationStatus) -> str:
    if isinstance(section, TrainingStatus):
        return training_message(head, section)
    return evaluation_message(head, section)


def _eta_text(seconds: int) -> str:
    """ETA 7m30s, ETA 1h30m."""
    minutes, rest = divmod(seconds, 60)
    return f"ETA {minutes}m{rest:02d}s" if minutes < 60 else f"ETA {minutes // 60}h{minutes % 60:02d}m"


def training_message(head: str, training: TrainingStatus) -> str:
    """``head`` plus the training figures known so far: step, losses, time left."""
    parts = []
    if training.step is not None:
        parts.append(f"step {training.step}/{training.total_steps or '?'}")
    if training.train_loss is not None:
        parts.append(f"train loss {training.train_loss:.4g}")
    if training.eval_loss is not None:
        parts.append(f"eval loss {training.eval_loss:.4g}")
    if training.eta_seconds is not None:
        parts.append(_eta_text(training.eta_seconds))
    return f"{head}: {', '.join(parts)}" if parts else head


# An evaluate progress line's `stage` (ftrecipe.evaluation.progress: STAGE, E2E_STAGE) as the status names
# it, and as the message words it. A line without one (an older evaluate image) or with another leaves
# the stage unset and the message as it was: `120/480 turns`.
EVALUATION_STAGES: Final[dict[str, EvaluationStage]] = {"generate": "scoring", "e2e": "e2e"}
_STAGE_WORDS: Final[dict[EvaluationStage, str]] = {"scoring": "scoring", "e2e": "E2E tests"}


def evaluation_stage_words(stage: str) -> str | None:
    """How the status words an evaluate progress line's `stage` (`generate` → `scoring`, `e2e` →
    `E2E tests`); None for a stage it does not know. `ftrecipe run`'s display words them the same way."""
    named = EVALUATION_STAGES.get(stage)
    return _STAGE_WORDS[named] if named is not None else None


def evaluation_message(head: str, evaluation: EvaluationStatus) -> str:
    """``head`` plus the evaluation's progress: the stage, turns answered of all, time left
    (`scoring 120/480 turns, ETA 2m05s`, then `E2E tests 5/19 turns, ETA 0m30s`)."""
    parts = []
    if evaluation.turns_done is not None:
        total = evaluation.total_turns if evaluation.total_turns is not None else "?"
        stage = f"{_STAGE_WORDS[evaluation.stage]} " if evaluation.stage is not None else ""
        parts.append(f"{stage}{evaluation.turns_done}/{total} turns")
    if evaluation.eta_seconds is not None:
        parts.append(_eta_text(evaluation.eta_seconds))
    return f"{head}: {', '.join(parts)}" if parts else head


def progress_update(training: TrainingStatus, progress: Mapping[str, Any]) -> TrainingStatus:
    """``training`` with a trainer progress line's figures (fields it does not carry stay)."""
    update: dict[str, Any] = {}
    for name in ("step", "total_steps", "eta_seconds"):
        value = progress.get(name)
        if _finite(value) and value >= 0:
            update[name] = int(value)
    for name in ("epoch", "train_loss", "eval_loss"):
        value = progress.get(name)
        if _finite(value) and (name != "epoch" or value >= 0):
            update[name] = float(value)
    return training.model_copy(update=update)


def evaluation_progress_update(evaluation: EvaluationStatus, progress: Mapping[str, Any]) -> EvaluationStatus:
    """``evaluation`` with an evaluate progress line's stage, counts (``done``, ``total``: of that stage)
    and time left, which is unknown (None) before the first answer."""
    named = progress.get("stage")
    stage = EVALUATION_STAGES.get(named) if isinstance(named, str) else None
    update: dict[str, Any] = {"stage": stage}
    if (
        stage != evaluation.stage
    ):  # the counts kept so far are the other stage's: never show them as this one's
        update |= {"turns_done": None, "total_turns": None}
    for field, key in (("turns_done", "done"), ("total_turns", "total")):
        value = progress.get(key)
        if _finite(value) and value >= 0:
            update[field] = int(value)
    eta = progress.get("eta_seconds")
    update["eta_seconds"] = int(eta) if _finite(eta) and eta >= 0 else None
    return evaluation.model_copy(update=update)


def progress_job(status: FinetuneRecipeStatus | None) -> tuple[ProgressPhase, str] | None:
    """The phase whose Job prints progress lines now (train while Training, evaluate while Evaluating)
    and that Job's name; None when no such Job runs."""
    phase = PROGRESS_PHASES.get(status.phase or "") if status is not None else None
    if status is None or phase is None:
        return None
    section = status.training if phase == "train" else status.evaluation
    return (phase, section.job_name) if section is not None and section.job_name else None


def with_progress(
    status: FinetuneRecipeStatus, phase: ProgressPhase, progress: Mapping[str, Any]
) -> FinetuneRecipeStatus:
    """``status`` with a progress line of ``phase``'s running Job: its section's figures and the message,
    worded as `compute_status` words it. Unchanged when the section names no Job."""
    section: TrainingStatus | EvaluationStatus | None
    if phase == "train":
        field = "training"
        section = progress_update(status.training, progress) if status.training is not None else None
    else:
        field = "evaluation"
        section = (
            evaluation_progress_update(status.evaluation, progress) if status.evaluation is not None else None
        )
    if section is None or not section.job_name:
        return status
    training = section if isinstance(section, TrainingStatus) else None
    head = _job_line(
        phase,
        section.job_name,
        jobset=training is not None and training.restarts is not None,
        restarts=training.restarts if training else None,
        max_restarts=training.max_restarts if training else None,
        preemptions=training.preemptions if training else None,
    )
    message = _figures_message(head, section)
    return status.model_copy(update={field: section, "message": message})


PhaseStatus = TypeVar("PhaseStatus", DataPreparationStatus, TrainingStatus, EvaluationStatus)
# The status field that says where each phase's output is.
_URI_FIELD: dict[Phase, str] = {"data": "dataset_uri", "train": "adapter_uri", "evaluate": "report_uri"}


def _finite(value: Any) -> TypeGuard[float]:
    """A number JSON can carry (NaN and infinities cannot go into a Kubernetes object)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _figures_update(phase: Phase, report: PhaseReport | None) -> dict[str, Any]:
    """Status fields from what a finished phase reported (unknown figures are left as they were)."""
    if report is None or not report.ok:
        return {}
    figures = report.figures
    if phase == "data":
        known = {
            name: figures[name] for name in DataSummary.model_fields if isinstance(figures.get(name), int)
        }
        return {"summary": DataSummary(**known)} if known else {}
    if phase == "train":
        update: dict[str, Any] = {
            name: figures[name]
            for name in ("step", "total_steps", "train_loss", "eval_loss")
            if _finite(figures.get(name))
        }
        if "step" in update:
            update |= {"eta_seconds": 0, "last_checkpoint": None}
        return update
    update = {}
    turns = figures.get("num_turns")
    if _finite(turns) and turns >= 0:  # every turn answered: the last progress line may not have been read
        update |= {"turns_done": int(turns), "total_turns": int(turns), "eta_seconds": 0, "stage": None}
    accuracy = figures.get("command_accuracy")
    if _finite(accuracy) and 0 <= accuracy <= 1:
        update["command_accuracy"] = float(accuracy)
    per_command = figures.get("per_command_f1")
    if isinstance(per_command, Mapping):
        update["per_command"] = {
            str(name): float(value) for name, value in per_command.items() if _finite(value)
        }
    for name in ("e2e_tests", "e2e_passed"):  # the E2E replay (evaluation.e2e)
        count = figures.get(name)
        if _finite(count) and count >= 0:
            update[name] = int(count)
    rate = figures.get("e2e_pass_rate")
    if _finite(rate) and 0 <= rate <= 1:
        update["e2e_pass_rate"] = float(rate)
    return update


def evaluation_headline(report: PhaseReport | None) -> str:
    """`command accuracy 0.930, E2E pass rate 0.857 (6 of 7 tests)`: an evaluation report's headline
    figures, as far as it has them ("" when none)."""
    figures = report.figures if report is not None else {}
    parts = []
    accuracy = figures.get("command_accuracy")
    if _finite(accuracy):
        parts.append(f"command accuracy {accuracy:.3f}")
    rate = figures.get("e2e_pass_rate")
    if _finite(rate):
        passed, tests = figures.get("e2e_passed"), figures.get("e2e_tests")
        counted = f" ({int(passed)} of {int(tests)} tests)" if _finite(passed) and _finite(tests) else ""
        parts.append(f"E2E pass rate {rate:.3f}{counted}")
    return ", ".join(parts)


def _phase_status(
    phase: Phase,
    fact: Action | None,
    prefixes: Mapping[Phase, str],
    previous: PhaseStatus | None,
    empty: PhaseStatus,
    now: datetime,
) -> PhaseStatus | None:
    """One phase's facts: its Job, times, whether it was reused, where its output is once done, and the
    figures it reported."""
    if fact is None:
        return previous
    before = previous or empty
    started = before.started_at or now
    completed = (before.completed_at or now) if isinstance(fact, Done | Reuse | Fail) else None
    uri_field = _URI_FIELD[phase]
    update: dict[str, Any] = {
        "job_name": fact.name if isinstance(fact, CreateJob | Wait) else before.job_name,
        "started_at": started,
        "completed_at": completed,
        "cached": isinstance(fact, Reuse),
        uri_field: prefixes[phase] if isinstance(fact, Done | Reuse) else getattr(before, uri_field),
    }
    if isinstance(fact, Done | Reuse):
        update |= _figures_update(phase, fact.report)
    return before.model_copy(update=update)


def retry_requested(annotation: str | None, previous: FinetuneRecipeStatus | None) -> bool:
    """Whether the retry annotation asks for a retry: it holds a value the status has not acted on yet
    (`kubectl annotate ... ftrecipe.dev/retry="$(date +%s)" --overwrite`)."""
    acted_on = previous.observed_retry if previous is not None else None
    return annotation is not None and annotation != acted_on


def remembered(
    recipe: str,
    spec: FinetuneRecipeSpec,
    previous: FinetuneRecipeStatus | None,
    prefixes: Mapping[Phase, str],
    hashes: Mapping[Phase, str] | None = None,
) -> tuple[dict[str, PhaseReport], dict[str, str]]:
    """What the recipe's status says about the current phase hashes: (finished, failed), for `World`.

    Finished Jobs are deleted after `ttlSecondsAfterFinished`; without this memory the next event would
    run those phases again. A phase counts as finished when the status shows its output at this hash's
    prefix; as failed when its condition is `JobFailed` for this hash's Job (until a retry request: the
    planner then ignores it, and the status it computes no longer says so). The figures kept in the status
    come back as the report, so a quality gate can be checked again.
    """
    finished: dict[str, PhaseReport] = {}
    failed: dict[str, str] = {}
    if previous is None:
        return finished, failed
    conditions = {c.type: c for c in previous.conditions or []}
    sections: dict[Phase, DataPreparationStatus | TrainingStatus | EvaluationStatus | None] = {
        "data": previous.data_preparation,
        "train": previous.training,
        "evaluate": previous.evaluation,
    }
    for phase, inputs_hash in (hashes or phase_hashes(spec)).items():
        section = sections[phase]
        condition = conditions.get(CONDITION_OF[phase])
        if section is None or condition is None:
            continue
        # The output URI is written only when the phase finished (or was reused) for this hash; a failed
        # quality gate leaves it too (the evaluation finished, its figures just fell short).
        if getattr(section, _URI_FIELD[phase]) == prefixes[phase]:
            figures: dict[str, Any] = {}
            if isinstance(section, EvaluationStatus):
                figures = {
                    "command_accuracy": section.command_accuracy,
                    "per_command_f1": section.per_command,
                    "e2e_tests": section.e2e_tests,
                    "e2e_passed": section.e2e_passed,
                    "e2e_pass_rate": section.e2e_pass_rate,
                }
            finished[inputs_hash] = PhaseReport(ok=True, message="", figures=figures)
        elif (
            condition.status == "False"
            and condition.reason in JOB_FAILURE_REASONS
            and section.job_name == workload_name(recipe, spec, phase, inputs_hash)
        ):
            failed[inputs_hash] = condition.message
    return finished, failed


def failure_reasons(
    spec: FinetuneRecipeSpec,
    previous: FinetuneRecipeStatus | None,
    failed: Mapping[str, str],
    hashes: Mapping[Phase, str] | None = None,
) -> dict[str, str]:
    """The condition reason of each remembered failure in ``failed`` (`remembered`'s), for `World`: a
    phase stopped as ImagePullBackOff stays so after its Job was deleted."""
    if previous is None:
        return {}
    conditions = {c.type: c for c in previous.conditions or []}
    reasons = {}
    for phase, inputs_hash in (hashes or phase_hashes(spec)).items():
        condition = conditions.get(CONDITION_OF[phase])
        if inputs_hash in failed and condition is not None:
            reasons[inputs_hash] = condition.reason
    return reasons


def stuck_event(
    previous: FinetuneRecipeStatus | None, status: FinetuneRecipeStatus
) -> tuple[str, str] | None:
    """(reason, message) of the Warning Event to post when a phase's pod has just become stuck, or stuck
    for another reason; None otherwise (failures have their own Event, on the phase change)."""
    ready = next((c for c in status.conditions or [] if c.type == "Ready"), None)
    if ready is None or ready.reason not in STUCK_REASONS or status.phase == "Failed":
        return None
    before = next((c for c in (previous.conditions or []) if c.type == "Ready"), None) if previous else None
    if before is not None and before.reason == ready.reason:
        return None
    return ready.reason, status.message or ready.message


# The phase whose Job runs while the recipe is in each running phase.
RUNNING_PHASES: Final[dict[str, Phase]] = {
    "PreparingData": "data",
    "Training": "train",
    "Evaluating": "evaluate",
}


def running_job(status: FinetuneRecipeStatus | None) -> tuple[Phase, str] | None:
    """The phase whose Job should be running now and that Job's name; None when none should."""
    phase = RUNNING_PHASES.get(status.phase or "") if status is not None else None
    if status is None or phase is None:
        return None
    section = {"data": status.data_preparation, "train": status.training, "evaluate": status.evaluation}[
        phase
    ]
    return (phase, section.job_name) if section is not None and section.job_name else None


def phase_condition(status: FinetuneRecipeStatus, phase: Phase) -> Condition | None:
    return next((c for c in status.conditions or [] if c.type == CONDITION_OF[phase]), None)


def planned_hashes(
    spec: FinetuneRecipeSpec, generation: int, previous: FinetuneRecipeStatus | None, *, version: str
) -> tuple[dict[Phase, str], PlannedWith]:
    """The phase hashes to plan with, and the record the status keeps of them.

    The hashes include the operator's version series and every defaulted field, so an upgraded operator
    would compute new ones for an unchanged recipe: re-running finished phases and replacing running Jobs.
    While the spec's generation is the one the status recorded, the recorded hashes stand; a new generation
    (the user changed the spec) is planned with this operator's hashes, new defaults included.
    """
    record = previous.planned_with if previous is not None else None
    if record is not None and record.generation == generation:
        return {phase: getattr(record, phase) for phase in PHASES}, record
    hashes = phase_hashes(spec, version=version)
    return hashes, PlannedWith(generation=generation, operator_version=version, **hashes)


def needs_reconcile(
    generation: int, retry: str | None, status: FinetuneRecipeStatus | None, *, first_seen: bool
) -> bool:
    """Whether a recipe's watch event calls for a reconcile: it was never planned, its spec has a new
    generation, its ``ftrecipe.dev/retry`` annotation a new value, or the operator sees it for the first
    time since it started and it is not finished (its Jobs are adopted, whatever happened meanwhile).

    Anything else (the echo of the operator's own status patch, a label someone added) changes nothing
    to plan. A finished recipe stays as it is when an operator (of any version) starts: only a new
    generation or a retry moves it.
    """
    if status is None or status.phase is None or status.observed_generation != generation:
        return True
    if retry_requested(retry, status):
        return True
    return first_seen and status.phase not in ("Succeeded", "Failed")
