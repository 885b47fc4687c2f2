"""The recipe's status, computed from the plan: phase, message, per-phase facts and metav1 conditions.

Pure: the kopf shell and `ftrecipe run` both write what this returns. Conditions keep their
`lastTransitionTime` while their status does not change, as Kubernetes conventions (and kstatus) expect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Literal, TypeVar

from ftrecipe.api.v1alpha1 import (
    Condition,
    DataPreparationStatus,
    EvaluationStatus,
    FinetuneRecipeSpec,
    FinetuneRecipeStatus,
    TrainingStatus,
)
from ftrecipe.plan.cache_key import Phase
from ftrecipe.plan.planner import Action, CreateJob, Done, Fail, Reuse, Succeed, Wait, phases, recipe_phase

CONDITION_OF: dict[Phase, str] = {"data": "DataPrepared", "train": "Trained", "evaluate": "Evaluated"}
_HUMAN: dict[Phase, str] = {"data": "data preparation", "train": "training", "evaluate": "evaluation"}
ConditionStatus = Literal["True", "False", "Unknown"]


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


def _phase_facts(actions: Sequence[Action]) -> dict[Phase, Action]:
    facts: dict[Phase, Action] = {}
    for action in actions:
        if isinstance(action, Done | Reuse | CreateJob | Wait) or (isinstance(action, Fail) and action.phase):
            facts[action.phase] = action  # type: ignore[index]
    return facts


def compute_status(
    spec: FinetuneRecipeSpec,
    generation: int,
    actions: Sequence[Action],
    *,
    prefixes: Mapping[Phase, str],
    now: datetime,
    previous: FinetuneRecipeStatus | None = None,
) -> FinetuneRecipeStatus:
    """The status after applying `actions`; `prefixes` are where each phase's bundle is (or will be)."""
    previous = previous or FinetuneRecipeStatus()
    before = {c.type: c for c in previous.conditions or []}
    phase = recipe_phase(spec, actions)
    facts = _phase_facts(actions)
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
        elif isinstance(fact, CreateJob | Wait):
            reason = "Suspended" if spec.suspend else "Running"
            cond = _condition(kind, "Unknown", reason, f"{_HUMAN[name]} in progress", generation, now, before)
        else:
            cond = _condition(
                kind, "Unknown", "Pending", "waiting for earlier phases", generation, now, before
            )
        conditions.append(cond)
    if isinstance(last, Succeed):
        ready = _condition("Ready", "True", "Succeeded", "the adapter is ready", generation, now, before)
    elif isinstance(last, Fail):
        ready = _condition("Ready", "False", last.reason, last.message, generation, now, before)
    else:
        ready = _condition("Ready", "False", phase, f"recipe is {phase}", generation, now, before)
    conditions.append(ready)

    message = ready.message if phase in ("Succeeded", "Failed") else _progress_message(actions, spec)
    finished = phase in ("Succeeded", "Failed")
    return FinetuneRecipeStatus(
        phase=phase,
        observed_generation=generation,
        started_at=previous.started_at or now,
        completed_at=(previous.completed_at or now) if finished else None,
        message=message,
        conditions=conditions,
        data_preparation=_phase_status(
            "data", facts.get("data"), prefixes, previous.data_preparation, DataPreparationStatus(), now
        ),
        training=_phase_status(
            "train", facts.get("train"), prefixes, previous.training, TrainingStatus(), now
        ),
        evaluation=_phase_status(
            "evaluate", facts.get("evaluate"), prefixes, previous.evaluation, EvaluationStatus(), now
        )
        if "evaluate" in phases(spec)
        else None,
    )


def _progress_message(actions: Sequence[Action], spec: FinetuneRecipeSpec) -> str:
    last = actions[-1] if actions else None
    if isinstance(last, CreateJob | Wait):
        verb = "suspended" if spec.suspend else "running"
        return f"{_HUMAN[last.phase]} {verb} (Job {last.name})"
    return "planning"


PhaseStatus = TypeVar("PhaseStatus", DataPreparationStatus, TrainingStatus, EvaluationStatus)
# The status field that says where each phase's output is.
_URI_FIELD: dict[Phase, str] = {"data": "dataset_uri", "train": "adapter_uri", "evaluate": "report_uri"}


def _phase_status(
    phase: Phase,
    fact: Action | None,
    prefixes: Mapping[Phase, str],
    previous: PhaseStatus | None,
    empty: PhaseStatus,
    now: datetime,
) -> PhaseStatus | None:
    """One phase's facts: its Job, times, whether it was reused, and where its output is once done."""
    if fact is None:
        return previous
    before = previous or empty
    started = before.started_at or now
    completed = (before.completed_at or now) if isinstance(fact, Done | Reuse | Fail) else None
    uri_field = _URI_FIELD[phase]
    return before.model_copy(
        update={
            "job_name": fact.name if isinstance(fact, CreateJob | Wait) else before.job_name,
            "started_at": started,
            "completed_at": completed,
            "cached": isinstance(fact, Reuse),
            uri_field: prefixes[phase] if isinstance(fact, Done | Reuse) else getattr(before, uri_field),
        }
    )
