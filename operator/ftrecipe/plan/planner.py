"""What to do next for a recipe: a pure function of (spec, observed Jobs, complete bundles).

The operator's handlers only observe (Jobs by label, bundles in storage) and apply the returned actions;
`ftrecipe run` applies the same actions with local processes. Level-based: given the same world, the same
plan, so a restarted operator adopts what exists instead of duplicating it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal

from ftrecipe.api.v1alpha1 import MAX_NODES, FinetuneRecipeSpec
from ftrecipe.plan.cache_key import HASH_LENGTH, Phase, phase_hashes
from ftrecipe.termination import PhaseReport

JobState = Literal["pending", "running", "suspended", "succeeded", "failed"]
MAX_NAME = 63  # Job names become pod label values: at most 63 characters
PHASE_WORDS: dict[Phase, str] = {"data": "data", "train": "train", "evaluate": "eval"}
PHASE_HUMAN: Final[dict[Phase, str]] = {
    "data": "data preparation",
    "train": "training",
    "evaluate": "evaluation",
}

# Why a phase's pod has not started: the condition reason the status shows while it waits, and the
# phase's failure reason once it waited longer than its `StuckLimits` allow.
StuckReason = Literal[
    "Unschedulable",
    "ImagePullBackOff",
    "SecretMissing",
    "ContainerConfigError",
    "MountFailed",
    "Queued",
    "JobSetNotInstalled",
]
STUCK_REASONS: Final[tuple[StuckReason, ...]] = (
    "Unschedulable",
    "ImagePullBackOff",
    "SecretMissing",
    "ContainerConfigError",
    "MountFailed",
    "Queued",
    "JobSetNotInstalled",
)
# A multi-node training's JobSet cannot be created: the cluster has no JobSet API (404) or the operator may
# not use it (403, the chart's jobset.enabled off). It waits, retried at every resync; never a failure.
JOBSET_NOT_INSTALLED: Final = "JobSetNotInstalled"
JOBSET_MANIFESTS: Final = "https://github.com/kubernetes-sigs/jobset/releases/latest/download/manifests.yaml"
EVICTED: Final = "Evicted"
# Reasons of a phase that failed with its Job (the status remembers them after the Job is gone).
JOB_FAILURE_REASONS: Final = frozenset({"JobFailed", EVICTED, *STUCK_REASONS})


@dataclass(frozen=True)
class Blocker:
    """What keeps a Job's pod from starting, in the scheduler's, kubelet's or Kueue's words."""

    reason: StuckReason
    message: str  # what the pod waits for and why, shortened (`ftrecipe.controller.observe.pod_blocker`)
    since: datetime | None = None  # when it started waiting, as the cluster recorded it; None: unknown


@dataclass(frozen=True)
class StuckLimits:
    """How long a phase's pod may wait, by reason, before the phase fails (seconds; None: no limit, the
    Job's own ``activeDeadlineSeconds`` still applies), and how many evictions a Job survives."""

    image_pull: float | None = 300.0
    # A missing Secret or key (CreateContainerConfigError, or a volume that cannot be mounted); a GitOps tool
    # or an external-secrets controller usually creates it within a minute or two.
    secret: float | None = 300.0
    # No limit: a pending pod costs nothing, and GPU autoscalers take minutes (scale-up from zero, capacity
    # shortages) to bring a node.
    unschedulable: float | None = None
    queued: float | None = None  # Kueue decides when a Job runs: waiting in its queue is its job
    # The eviction (DisruptionTarget) that fails the phase: the Job does not count them (podFailurePolicy
    # Ignore), so a node pool that keeps evicting would restart it for ever. None: no bound.
    max_evictions: int | None = 3

    def limit(self, reason: StuckReason) -> float | None:
        if reason == "Unschedulable":
            return self.unschedulable
        if reason == "ImagePullBackOff":
            return self.image_pull
        if reason == "Queued":
            return self.queued
        if reason == JOBSET_NOT_INSTALLED:
            return None  # installing JobSet (or switching to one node) is a person's decision
        return self.secret


DEFAULT_STUCK_LIMITS: Final = StuckLimits()


def queued_blocker(queue: str, since: datetime | None) -> Blocker:
    """A Job held in Kueue's ``queue`` (created suspended; Kueue unsuspends it when it admits it)."""
    return Blocker("Queued", f"Kueue has not admitted it yet (queue {queue})", since)


def jobset_missing_blocker(spec: FinetuneRecipeSpec) -> Blocker:
    """Why a multi-node training cannot start on a cluster without JobSet (or without the operator's
    permission to use it), and the two ways out."""
    return Blocker(
        JOBSET_NOT_INSTALLED,
        f"training.nodes: {spec.training.nodes} needs JobSet on the cluster (kubectl apply --server-side -f "
        f"{JOBSET_MANIFESTS}) and the chart's jobset.enabled switch; or set training.nodes: 1",
    )


@dataclass(frozen=True)
class ObservedJob:
    name: str
    phase: Phase
    inputs_hash: str  # the full phase hash the Job was created for (from its label)
    state: JobState
    message: str | None = None  # the container's termination message when it failed
    report: PhaseReport | None = None  # what the finished phase container reported (figures, one line)
    failure_reason: str | None = None  # the Job controller's reason, e.g. BackoffLimitExceeded
    blocker: Blocker | None = None  # why its pod has not started (None: it runs, or nothing is known)
    # Its pods evicted so far (DisruptionTarget), which the Job itself does not count; for a JobSet, the
    # group restarts after a preemption, which do not use up its maxRestarts.
    evictions: int = 0
    last_eviction: str | None = None  # the last eviction's reason and message
    kind: Literal["Job", "JobSet"] = "Job"  # a multi-node training runs as a JobSet
    restarts: int | None = None  # a JobSet's restarts of the whole group so far (None: a Job)
    max_restarts: int | None = None  # a JobSet's failurePolicy.maxRestarts


@dataclass(frozen=True)
class World:
    """What the shell saw: this recipe's Jobs, the phase hashes whose output bundle is complete, and what
    the recipe's own status remembers (its Jobs may be gone: `ttlSecondsAfterFinished` deletes them)."""

    jobs: tuple[ObservedJob, ...] = ()
    complete: frozenset[str] = frozenset()
    # Phase hashes the status records as finished, with the figures it kept.
    finished: Mapping[str, PhaseReport] = field(default_factory=dict)
    # Phase hashes whose Job the status records as failed: the one-line reason.
    failed: Mapping[str, str] = field(default_factory=dict)
    # The figures of complete bundles (from their manifests), where the shell could read them.
    reports: Mapping[str, PhaseReport] = field(default_factory=dict)
    # The user asked to run failed phases again (the cause was fixed outside the spec): failed Jobs of the
    # current phase hashes and the failures the status remembers no longer count.
    retry: bool = False
    # The phase hashes the recipe was planned with (`ftrecipe.plan.status.planned_hashes`: kept across
    # operator upgrades); None: this version's hashes of the spec.
    hashes: Mapping[Phase, str] | None = None
    # The reason of each remembered failure (`failed`), when not JobFailed: e.g. ImagePullBackOff.
    failure_reasons: Mapping[str, str] = field(default_factory=dict)
    # When the shell looked; None (e.g. `ftrecipe run`): no stuck Job is ever failed for waiting too long.
    now: datetime | None = None
    # The cluster has no JobSet API, or the operator may not use it: a multi-node training waits.
    jobsets_missing: bool = False


@dataclass(frozen=True)
class CreateJob:
    phase: Phase
    inputs_hash: str
    name: str
    suspended: bool  # created suspended: the recipe is suspended, or Kueue admits it


@dataclass(frozen=True)
class DeleteJob:
    name: str
    reason: str


@dataclass(frozen=True)
class SuspendJob:
    name: str


@dataclass(frozen=True)
class ResumeJob:
    name: str


@dataclass(frozen=True)
class Retry:
    """A retry request runs this failed phase again: its failure is forgotten, its failed Job (if still
    there) deleted, and a new Job created for the same inputs."""

    phase: Phase
    inputs_hash: str


@dataclass(frozen=True)
class Wait:
    phase: Phase
    name: str
    blocker: Blocker | None = None  # its pod cannot start (yet): why
    restarts: int | None = None  # a JobSet's restarts so far (None: a Job)
    max_restarts: int | None = None
    preemptions: int | None = None  # a JobSet's restarts after a preemption (not counted in `restarts`)


@dataclass(frozen=True)
class Reuse:
    """The phase's output already exists for these inputs: skip it (reported as `cached`)."""

    phase: Phase
    inputs_hash: str
    report: PhaseReport | None = None


@dataclass(frozen=True)
class Done:
    phase: Phase
    inputs_hash: str
    report: PhaseReport | None = None  # None: the figures are already in the status (or unknown)


@dataclass(frozen=True)
class Fail:
    phase: Phase | None
    reason: str  # CamelCase
    message: str


@dataclass(frozen=True)
class Succeed:
    pass


Action = CreateJob | DeleteJob | SuspendJob | ResumeJob | Retry | Wait | Reuse | Done | Fail | Succeed


def job_name(recipe: str, phase: Phase, inputs_hash: str) -> str:
    """`<recipe>-<phase>-<hash8>`, shortened (with a digest of the full name) to fit 63 characters."""
    suffix = f"-{PHASE_WORDS[phase]}-{inputs_hash[:8]}"
    if len(recipe) + len(suffix) <= MAX_NAME:
        return f"{recipe}{suffix}"
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:6]
    head = recipe[: MAX_NAME - len(suffix) - len(digest) - 1].rstrip("-.")
    return f"{head}-{digest}{suffix}"


# A multi-node training runs as a JobSet (`ftrecipe.controller.manifests.build_jobset`): one replicated
# Job `node` whose pods are named `<jobset>-node-0-<index>-<5 random>` and answer to the hostname
# `<jobset>-node-0-<index>`. The JobSet webhook wants that pod name to be a DNS-1035 label (at most 63
# characters, a letter first, no dots), so the JobSet's own name leaves room for it.
JOBSET_REPLICATED_JOB: Final = "node"
JOBSET_POD_INFIX: Final = f"-{JOBSET_REPLICATED_JOB}-0-"
MAX_JOBSET_NAME: Final = MAX_NAME - len(JOBSET_POD_INFIX) - len(str(MAX_NODES - 1)) - len("-abcde")


def runs_as_jobset(spec: FinetuneRecipeSpec, phase: Phase) -> bool:
    """Training on 2 or more nodes runs as a JobSet; everything else (and nodes 1) as a plain Job."""
    return phase == "train" and spec.training.nodes >= 2


def jobset_name(recipe: str, phase: Phase, inputs_hash: str) -> str:
    """`<recipe>-<phase>-<hash8>` as `job_name` makes it, shortened (with a digest of the recipe name) to
    `MAX_JOBSET_NAME` characters and made a DNS-1035 label: dots become dashes, and a name that does not
    start with a letter gets `r-` in front."""
    label = recipe.replace(".", "-")
    if not label[:1].isalpha():
        label = f"r-{label}"
    suffix = f"-{PHASE_WORDS[phase]}-{inputs_hash[:8]}"
    if len(label) + len(suffix) <= MAX_JOBSET_NAME and label == recipe:
        return f"{label}{suffix}"
    # Shortened, or changed: the digest keeps recipes that differ only in what was cut or changed apart.
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:6]
    head = label[: MAX_JOBSET_NAME - len(suffix) - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}{suffix}"


def workload_name(recipe: str, spec: FinetuneRecipeSpec, phase: Phase, inputs_hash: str) -> str:
    """The name of the phase's Job, or of its JobSet when it trains on several nodes."""
    if runs_as_jobset(spec, phase):
        return jobset_name(recipe, phase, inputs_hash)
    return job_name(recipe, phase, inputs_hash)


def local_paths(spec: FinetuneRecipeSpec) -> list[str]:
    """Fields that name the operator machine's disk: pods cannot see them."""
    used = []
    if spec.assistant.source.local is not None:
        used.append("spec.assistant.source.local")
    if spec.training.base_model.local is not None:
        used.append("spec.training.baseModel.local")
    if spec.output.local is not None:
        used.append("spec.output.local")
    return used


def phases(spec: FinetuneRecipeSpec) -> tuple[Phase, ...]:
    return ("data", "train", "evaluate") if spec.evaluation.enabled else ("data", "train")


def plan(
    recipe: str,
    spec: FinetuneRecipeSpec,
    world: World,
    *,
    in_cluster: bool = True,
    limits: StuckLimits = DEFAULT_STUCK_LIMITS,
) -> list[Action]:
    """The actions that move the recipe forward, in order. The last one says where it stands.

    A Job whose pod waited longer than ``limits`` allow (or was evicted too often) is deleted and its
    phase fails with the reason, instead of waiting for the Job's own active deadline."""
    if in_cluster and (fields := local_paths(spec)):
        return [
            Fail(
                None,
                "LocalPathInCluster",
                f"{', '.join(fields)} is for `ftrecipe run` on one machine; in a cluster use s3, git, "
                "configMap or pvc",
            )
        ]
    hashes = world.hashes or phase_hashes(spec)
    wanted = set(phases(spec))
    actions: list[Action] = []
    current: dict[Phase, list[ObservedJob]] = {}
    for job in world.jobs:
        if job.phase in wanted and job.inputs_hash == hashes[job.phase]:
            current.setdefault(job.phase, []).append(job)
        elif job.state in ("pending", "running", "suspended"):
            # The spec changed under a Job that is still going: its result would be thrown away.
            actions.append(DeleteJob(job.name, f"inputs of phase {job.phase} changed"))
    held = spec.suspend or spec.queue_name is not None
    for phase in phases(spec):
        inputs_hash = hashes[phase]
        jobs = current.get(phase, [])
        succeeded = next((j for j in jobs if j.state == "succeeded"), None)
        finished: Done | Reuse | None = None
        if succeeded is not None:
            finished = Done(phase, inputs_hash, succeeded.report)
        elif inputs_hash in world.complete and not (
            phase == "evaluate" and not _has_gated_figures(spec, world.reports.get(inputs_hash))
        ):
            # With a quality gate to check, an evaluation whose figures we cannot see runs again here
            # rather than pass (or fail) the gate blindly.
            finished = Reuse(phase, inputs_hash, world.reports.get(inputs_hash))
        elif inputs_hash in world.finished and not jobs:
            finished = Done(phase, inputs_hash, world.finished[inputs_hash])
        elif inputs_hash in world.failed and not jobs and not world.retry:
            reason = world.failure_reasons.get(inputs_hash, "JobFailed")
            actions.append(Fail(phase, reason, world.failed[inputs_hash]))
            return actions
        if finished is not None:
            actions.append(finished)
            if phase == "evaluate" and (failed := evaluation_gate(spec, finished.report)):
                actions.append(failed)
                return actions
            continue
        failed_jobs = [j for j in jobs if j.state == "failed"]
        if world.retry and (failed_jobs or (inputs_hash in world.failed and not jobs)):
            # The failed Job carries this phase's name: it goes, so the new one can take it.
            actions.append(Retry(phase, inputs_hash))
            actions.extend(DeleteJob(j.name, "retry requested") for j in failed_jobs)
            jobs = [j for j in jobs if j.state != "failed"]
        if not jobs:
            name = workload_name(recipe, spec, phase, inputs_hash)
            if world.jobsets_missing and runs_as_jobset(spec, phase):
                actions.append(Wait(phase, name, jobset_missing_blocker(spec)))
            else:
                actions.append(CreateJob(phase, inputs_hash, name, held))
            return actions
        job = jobs[0]
        if job.state == "failed":
            actions.append(Fail(phase, "JobFailed", job.message or f"Job {job.name} failed"))
            return actions
        if not spec.suspend and world.now is not None and (stop := stopped(job, world.now, limits)):
            # Nothing will come of this Job (or it holds a node for nothing): it goes, the status keeps why.
            actions += [DeleteJob(job.name, f"{stop.reason}: {stop.message}"), stop]
            return actions
        if spec.suspend and job.state in ("pending", "running"):
            actions.append(SuspendJob(job.name))
        elif job.state == "suspended" and not spec.suspend and spec.queue_name is None:
            actions.append(ResumeJob(job.name))
        blocker = None if spec.suspend else job.blocker
        preemptions = job.evictions if job.kind == "JobSet" else None
        actions.append(Wait(phase, job.name, blocker, job.restarts, job.max_restarts, preemptions))
        return actions
    actions.append(Succeed())
    return actions


def duration_text(seconds: float) -> str:
    """45s, 5m00s, 2h05m."""
    whole = max(0, int(seconds))
    minutes, rest = divmod(whole, 60)
    if minutes == 0:
        return f"{rest}s"
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def waited_too_long(blocker: Blocker, now: datetime, limits: StuckLimits) -> float | None:
    """The seconds ``blocker`` has lasted when that is at least its limit; None while it may still wait
    (no limit for its reason, or no known start)."""
    limit = limits.limit(blocker.reason)
    if limit is None or blocker.since is None:
        return None
    waited = (now - blocker.since).total_seconds()
    return waited if waited >= limit else None


def stopped(job: ObservedJob, now: datetime, limits: StuckLimits) -> Fail | None:
    """The failure of ``job``'s phase when it must not go on: its pods were evicted ``max_evictions``
    times, or its pod has waited past the limit for its reason. None: let it run (or wait)."""
    human = PHASE_HUMAN[job.phase]
    if limits.max_evictions is not None and job.evictions >= limits.max_evictions:
        last = f"; last: {job.last_eviction}" if job.last_eviction else ""
        return Fail(
            job.phase,
            EVICTED,
            f"{human} stopped: its pod was evicted {job.evictions} times ({job.kind} {job.name} deleted){last}",
        )
    if job.blocker is None or (waited := waited_too_long(job.blocker, now, limits)) is None:
        return None
    return Fail(
        job.phase,
        job.blocker.reason,
        f"{human} stopped after {duration_text(waited)} waiting ({job.kind} {job.name} deleted): "
        f"{job.blocker.message}",
    )


def gated_figures(spec: FinetuneRecipeSpec) -> tuple[str, ...]:
    """The report figures the recipe's quality gates are checked on."""
    names: list[str] = []
    if spec.evaluation.min_command_accuracy > 0:  # 0 disables it
        names.append("command_accuracy")
    if spec.evaluation.min_e2e_pass_rate is not None:
        names.append("e2e_pass_rate")
    return tuple(names)


def _has_gated_figures(spec: FinetuneRecipeSpec, report: PhaseReport | None) -> bool:
    figures = report.figures if report is not None else {}
    return all(isinstance(figures.get(name), int | float) for name in gated_figures(spec))


def evaluation_gate(spec: FinetuneRecipeSpec, report: PhaseReport | None) -> Fail | None:
    """A `Fail` naming every quality gate of the recipe the evaluation's report does not meet (command
    accuracy, E2E pass rate), or None."""
    evaluation = spec.evaluation
    failed = [
        gate
        for gate in (
            quality_gate(evaluation.min_command_accuracy, report)
            if evaluation.min_command_accuracy > 0
            else None,
            e2e_quality_gate(evaluation.min_e2e_pass_rate, report)
            if evaluation.min_e2e_pass_rate is not None
            else None,
        )
        if gate is not None
    ]
    if not failed:
        return None
    return Fail("evaluate", "QualityGateNotMet", "; ".join(gate.message for gate in failed))


def e2e_quality_gate(minimum: float, report: PhaseReport | None) -> Fail | None:
    """A `Fail` when the E2E pass rate (held-out tests replayed with the adapter in the loop) is below
    ``minimum`` or was not reported."""
    figures = report.figures if report is not None else {}
    rate = figures.get("e2e_pass_rate")
    if not isinstance(rate, int | float) or isinstance(rate, bool):
        return Fail(
            "evaluate",
            "QualityGateNotMet",
            f"evaluation reported no E2E pass rate (it is measured with evaluation.e2e: true); "
            f"spec.evaluation.minE2EPassRate is {minimum:g}",
        )
    if rate >= minimum:
        return None
    passed, tests = figures.get("e2e_passed"), figures.get("e2e_tests")
    counted = (
        f" ({passed} of {tests} held-out tests passed)"
        if isinstance(passed, int) and isinstance(tests, int)
        else ""
    )
    return Fail(
        "evaluate",
        "QualityGateNotMet",
        f"E2E pass rate {rate:.3f}{counted} is below spec.evaluation.minE2EPassRate {minimum:g}",
    )


def quality_gate(minimum: float, report: PhaseReport | None) -> Fail | None:
    """A `Fail` when the evaluation's command accuracy is below ``minimum`` or was not reported."""
    figures = report.figures if report is not None else {}
    accuracy = figures.get("command_accuracy")
    if not isinstance(accuracy, int | float):
        return Fail(
            "evaluate",
            "QualityGateNotMet",
            f"evaluation reported no command accuracy; spec.evaluation.minCommandAccuracy is {minimum:g}",
        )
    if accuracy >= minimum:
        return None
    per_command = figures.get("per_command_f1")
    worst = ""
    if isinstance(per_command, Mapping) and per_command:
        lowest = sorted(per_command.items(), key=lambda item: (item[1], item[0]))[:3]
        worst = "; lowest F1: " + ", ".join(f"{name} {value:.2f}" for name, value in lowest)
    return Fail(
        "evaluate",
        "QualityGateNotMet",
        f"command accuracy {accuracy:.3f} is below spec.evaluation.minCommandAccuracy {minimum:g}{worst}",
    )


PhaseName = Literal["Pending", "PreparingData", "Training", "Evaluating", "Succeeded", "Failed", "Suspended"]
_RUNNING: dict[Phase, PhaseName] = {"data": "PreparingData", "train": "Training", "evaluate": "Evaluating"}


def recipe_phase(spec: FinetuneRecipeSpec, actions: Sequence[Action]) -> PhaseName:
    """The status phase the plan implies."""
    last = actions[-1] if actions else None
    if isinstance(last, Succeed):
        return "Succeeded"
    if isinstance(last, Fail):
        return "Failed"
    if spec.suspend:
        return "Suspended"
    if isinstance(last, CreateJob | Wait):
        return _RUNNING[last.phase]
    return "Pending"


def short_hash(inputs_hash: str) -> str:
    return inputs_hash[:HASH_LENGTH]
