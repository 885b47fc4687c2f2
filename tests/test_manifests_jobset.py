"""Multi-node training as a JobSet (issue 22): its structure against the JobSet API (tests/support/
jobset_api.py, written from JobSet's published API reference), its child Job as valid batch/v1, the same
hardened pod as the Job, the trainer's env, and names that fit."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ftrecipe.api import parse_recipe
from ftrecipe.api.v1alpha1 import FinetuneRecipeSpec
from ftrecipe.controller.manifests import LABEL_QUEUE, build_job, build_jobset, uses_jobset
from ftrecipe.plan.cache_key import Phase, phase_hashes
from ftrecipe.plan.planner import CreateJob, World, job_name, jobset_name, plan, workload_name
from support.jobset_api import job_template_as_job, jobset_violations

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSIONS = ("1.29", "1.31", "1.33")
Manifest = dict[str, Any]

# The train phase's JobSet names of examples/recipes/full.yaml with nodes 2 and 4 (its train hash differs
# with nodes; a short recipe name keeps the Job's naming: `<recipe>-train-<hash8>`).
FULL_JOBSET_NAMES = {
    2: "support-assistant-llama31-train-3d6fa3bb",
    4: "support-assistant-llama31-train-f00caaaf",
}


def recipe(example: str, **training: Any) -> tuple[str, FinetuneRecipeSpec]:
    manifest = yaml.safe_load((ROOT / "examples" / "recipes" / f"{example}.yaml").read_text())
    manifest["spec"]["training"].update(training)
    loaded = parse_recipe(manifest)
    assert loaded.metadata.name is not None
    return loaded.metadata.name, loaded.spec


def train_action(name: str, spec: FinetuneRecipeSpec, *, suspended: bool = False) -> CreateJob:
    inputs_hash = phase_hashes(spec)["train"]
    return CreateJob("train", inputs_hash, workload_name(name, spec, "train", inputs_hash), suspended)


def jobset_and_job(
    nodes: int, *, suspended: bool = False, example: str = "full"
) -> tuple[Manifest, Manifest]:
    """The JobSet of `example` with `nodes`, and the Job build_job makes for the same action."""
    name, spec = recipe(example, nodes=nodes)
    act = train_action(name, spec, suspended=suspended)
    prefix = "s3://ml-artifacts/ftrecipe/x/train/"
    return (
        build_jobset(name, "ml", spec, act, output_prefix=prefix),
        build_job(name, "ml", spec, act, output_prefix=prefix),
    )


def pod_template(jobset: Manifest) -> Manifest:
    template: Manifest = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    return template


# ------------------------------------------------------------------------------------------ the JobSet API


@pytest.mark.parametrize("example", ["full", "minimal"])
@pytest.mark.parametrize("nodes", [2, 4])
def test_jobset_has_the_structure_of_the_jobset_api(nodes: int, example: str) -> None:
    jobset, _ = jobset_and_job(nodes, example=example)
    assert jobset_violations(jobset) == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("example", ["full", "minimal"])
@pytest.mark.parametrize("nodes", [2, 4])
def test_child_job_is_valid_batch_v1(nodes: int, example: str, version: str) -> None:
    jobset, _ = jobset_and_job(nodes, example=example)
    kubernetes_validate.validate(job_template_as_job(jobset, "node"), version, strict=True)


@pytest.mark.parametrize("nodes", [2, 4])
def test_one_indexed_replicated_job_with_dns_hostnames(nodes: int) -> None:
    jobset, job = jobset_and_job(nodes)
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    spec = jobset["spec"]
    assert spec["network"] == {"enableDNSHostnames": True}
    assert [r["name"] for r in spec["replicatedJobs"]] == ["node"]
    replicated = spec["replicatedJobs"][0]
    assert replicated["replicas"] == 1
    assert "metadata" not in replicated["template"]  # no ftrecipe labels: the child is not our Job
    child = replicated["template"]["spec"]
    assert child["completionMode"] == "Indexed"
    assert child["parallelism"] == child["completions"] == nodes
    assert child["backoffLimit"] == 0
    assert child["activeDeadlineSeconds"] == job["spec"]["activeDeadlineSeconds"] == 86400
    assert "suspend" not in child and "ttlSecondsAfterFinished" not in child
    assert spec["ttlSecondsAfterFinished"] == job["spec"]["ttlSecondsAfterFinished"] == 604800


def test_failures_bad_input_fails_the_set_a_preemption_restarts_it_uncounted() -> None:
    jobset, _ = jobset_and_job(2)
    child = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    # Exit code 2 (bad input), the trainer's exit 143 after a checkpoint (preempted) and a disrupted pod
    # fail the child Job through its podFailurePolicy (reason PodFailurePolicy); a crash fails it through
    # backoffLimit 0 (BackoffLimitExceeded).
    assert child["backoffLimit"] == 0
    assert child["podFailurePolicy"] == {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}},
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [143]}},
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }
    assert jobset["spec"]["failurePolicy"] == {
        "maxRestarts": 3,
        "rules": [
            {
                "name": "badInput",
                "action": "FailJobSet",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": ["failed with exit code 2 matching FailJob rule"],
            },
            {
                "name": "preempted",
                "action": "RestartJobSetAndIgnoreMaxRestarts",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": [
                    "failed with exit code 143 matching FailJob rule",
                    "has condition DisruptionTarget matching FailJob rule",
                ],
            },
            {"name": "deadlineExceeded", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]},
        ],
    }


# The child Job's failure condition as Kubernetes' Job controller writes it (reason, message;
# pkg/controller/job/pod_failure_policy.go and job_controller.go), and the rule JobSet then applies.
JOB_FAILURES: list[tuple[str, str, str | None]] = [
    (
        "PodFailurePolicy",
        "Container train for pod ml/bot-train-0123abcd-node-0-0-x7k2q failed with exit code 2 matching FailJob "
        "rule at index 0",
        "badInput",
    ),
    (
        "PodFailurePolicy",
        "Container train for pod ml/bot-train-0123abcd-node-0-1-x7k2q failed with exit code 143 matching "
        "FailJob rule at index 1",
        "preempted",
    ),
    (
        "PodFailurePolicy",
        "Pod ml/bot-train-0123abcd-node-0-1-x7k2q has condition DisruptionTarget matching FailJob rule at index 2",
        "preempted",
    ),
    (
        "BackoffLimitExceeded",
        "Job has reached the specified backoff limit",
        None,
    ),  # a crash: default, counted
    ("DeadlineExceeded", "Job was active longer than specified deadline", "deadlineExceeded"),
]


@pytest.mark.parametrize(("reason", "message", "rule"), JOB_FAILURES)
def test_each_child_job_failure_meets_its_rule(reason: str, message: str, rule: str | None) -> None:
    jobset, _ = jobset_and_job(2)
    matched = None
    for candidate in jobset["spec"]["failurePolicy"]["rules"]:  # JobSet: the first rule that matches
        reasons = candidate.get("onJobFailureReasons") or []
        patterns = candidate.get("onJobFailureMessagePatterns") or []
        if (not reasons or reason in reasons) and (
            not patterns or any(re.search(p, message) for p in patterns)
        ):
            matched = candidate["name"]
            break
    assert matched == rule


def test_suspend_labels_annotations_and_kueue() -> None:
    for suspended in (True, False):
        jobset, job = jobset_and_job(2, suspended=suspended)
        assert jobset["spec"]["suspend"] is suspended
        assert job["spec"]["suspend"] is suspended
    meta = jobset["metadata"]
    assert meta == job["metadata"]  # name, namespace, labels, annotations: what the Job would have had
    assert meta["name"] == FULL_JOBSET_NAMES[2]
    assert meta["namespace"] == "ml"
    assert meta["labels"][LABEL_QUEUE] == "gpu-queue"  # Kueue admits the JobSet as one workload
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "ftrecipe-operator"
    assert meta["labels"]["ftrecipe.dev/phase"] == "train"
    assert meta["labels"]["ftrecipe.dev/recipe"] == "support-assistant-llama31"
    assert pod_template(jobset)["metadata"] == job["spec"]["template"]["metadata"]
    assert pod_template(jobset)["metadata"]["labels"]["ftrecipe.dev/phase"] == "train"
    minimal, _ = jobset_and_job(2, example="minimal")
    assert LABEL_QUEUE not in minimal["metadata"]["labels"]
    assert minimal["spec"]["suspend"] is False


# ------------------------------------------------------------------------------------------ the pod


@pytest.mark.parametrize("nodes", [2, 4])
def test_pod_is_the_jobs_pod_plus_the_rendezvous(nodes: int) -> None:
    jobset, job = jobset_and_job(nodes)
    name = FULL_JOBSET_NAMES[nodes]
    pod = copy.deepcopy(pod_template(jobset))
    main = pod["spec"]["containers"][0]
    assert main["name"] == "train"
    assert main.pop("ports") == [{"name": "rendezvous", "containerPort": 29400, "protocol": "TCP"}]
    assert main["env"][-2:] == [
        {"name": "FTRECIPE_NODES", "value": str(nodes)},
        {"name": "FTRECIPE_RENDEZVOUS", "value": f"{name}-node-0-0.{name}:29400"},
    ]
    del main["env"][-2:]
    # Everything else is the Job's pod: hardening, GPUs, shm, placement, grace period, init container.
    assert pod == job["spec"]["template"]


def test_pod_is_hardened_and_keeps_the_gpus_and_shm() -> None:
    jobset, _ = jobset_and_job(4)
    pod = pod_template(jobset)["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in [*pod["initContainers"], *pod["containers"]]:
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }
    main = pod["containers"][0]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"  # full.yaml: gpus 1 on each node
    assert {"name": "dshm", "mountPath": "/dev/shm"} in main["volumeMounts"]
    assert pod["terminationGracePeriodSeconds"] == 600
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_same_inputs_same_jobset() -> None:
    first, _ = jobset_and_job(2)
    again, _ = jobset_and_job(2)
    assert json.dumps(first) == json.dumps(again)


# ------------------------------------------------------------------------------------------ which phases


@pytest.mark.parametrize(
    ("nodes", "phase", "expected"),
    [
        (1, "train", False),
        (2, "train", True),
        (64, "train", True),
        (2, "data", False),
        (2, "evaluate", False),
    ],
)
def test_uses_jobset_for_multi_node_training_only(nodes: int, phase: Phase, expected: bool) -> None:
    _, spec = recipe("minimal", nodes=nodes)
    assert uses_jobset(spec, phase) is expected


def test_build_jobset_refuses_what_runs_as_a_job() -> None:
    name, spec = recipe("minimal")
    act = train_action(name, spec)
    with pytest.raises(ValueError, match="runs as a Job"):
        build_jobset(name, "ml", spec, act, output_prefix="s3://b/p/")
    _, multi = recipe("minimal", nodes=2)
    too_long = CreateJob("train", act.inputs_hash, job_name("r" * 60, "train", act.inputs_hash), False)
    with pytest.raises(ValueError, match="longer than 47 characters"):
        build_jobset("r" * 60, "ml", multi, too_long, output_prefix="s3://b/p/")


def test_the_planner_creates_the_jobset_under_its_name() -> None:
    _, spec = recipe("minimal", nodes=2)
    hashes = phase_hashes(spec)
    done = World(complete=frozenset({hashes["data"]}))
    creates = [a for a in plan("minimal", spec, done) if isinstance(a, CreateJob)]
    assert [(c.phase, c.name) for c in creates] == [("train", f"minimal-train-{hashes['train'][:8]}")]
    long_name = "a-very-long-recipe-name-for-the-support-assistant"
    creates = [a for a in plan(long_name, spec, done) if isinstance(a, CreateJob)]
    assert [c.name for c in creates] == [jobset_name(long_name, "train", hashes["train"])]
    assert job_name(long_name, "train", hashes["train"]) != creates[0].name  # the Job's name is longer


# ------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("recipe_name", "expected"),
    [
        # Short names: the Job's name unchanged.
        ("minimal", "minimal-train-0123abcd"),
        ("support-assistant-llama31", "support-assistant-llama31-train-0123abcd"),
        # 32 characters of recipe + 15 of suffix = 47: still unchanged.
        ("a" * 32, "a" * 32 + "-train-0123abcd"),
        # Longer: cut, with a digest of the whole name.
        ("a" * 33, "a" * 25 + "-852785-train-0123abcd"),
        # DNS-1035: no dots, a letter first (a digest tells such names apart from their look-alikes).
        ("bot.v2", "bot-v2-6b73f9-train-0123abcd"),
        ("7eleven", "r-7eleven-7414c7-train-0123abcd"),
    ],
)
def test_jobset_names(recipe_name: str, expected: str) -> None:
    inputs_hash = "0123abcd" + "0" * 56
    assert jobset_name(recipe_name, "train", inputs_hash) == expected


@pytest.mark.parametrize(
    "recipe_name", ["minimal", "a" * 253, "a." * 100 + "b", "0" * 80, "x" * 32, "x" * 33, "a-" * 40 + "b"]
)
def test_pod_names_and_hostnames_fit_for_64_nodes(recipe_name: str) -> None:
    name = jobset_name(recipe_name, "train", "f" * 64)
    assert len(name) <= 47
    assert len(f"{name}-node-0-63-abcde") <= 63  # the longest pod name the JobSet webhook checks
    _, spec = recipe("minimal", nodes=64)
    act = CreateJob("train", "f" * 64, name, False)
    assert jobset_violations(build_jobset(recipe_name, "ml", spec, act, output_prefix="s3://b/p/")) == []
    assert jobset_name(recipe_name, "train", "f" * 64) != jobset_name(recipe_name + "c", "train", "f" * 64)


def test_job_names_are_unchanged() -> None:
    """Plain Jobs keep today's names (tests/test_phase_hashes_pinned.py pins the short ones)."""
    inputs_hash = "0123abcd" + "0" * 56
    assert job_name("a" * 48, "train", inputs_hash) == "a" * 48 + "-train-0123abcd"
    assert job_name("bot.v2", "train", inputs_hash) == "bot.v2-train-0123abcd"


# ------------------------------------------------------------------------------------------ the check


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    def mutate(manifest: Manifest) -> None:
        node: Any = manifest
        *parents, last = path.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _delete(path: str) -> Callable[[Manifest], None]:
    def mutate(manifest: Manifest) -> None:
        node: Any = manifest
        *parents, last = path.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return mutate


def _duplicate_replicated_job(manifest: Manifest) -> None:
    manifest["spec"]["replicatedJobs"].append(copy.deepcopy(manifest["spec"]["replicatedJobs"][0]))


# Each breaks one property of a valid JobSet; the check must refuse every one (it guards the tests above).
BROKEN: list[tuple[str, Callable[[Manifest], None]]] = [
    ("old-api-version", _set("apiVersion", "jobset.x-k8s.io/v1alpha1")),
    ("wrong-kind", _set("kind", "Job")),
    ("no-replicated-jobs", _delete("spec.replicatedJobs")),
    ("empty-replicated-jobs", _set("spec.replicatedJobs", [])),
    ("replicated-job-without-template", _delete("spec.replicatedJobs.0.template")),
    ("replicated-job-without-name", _delete("spec.replicatedJobs.0.name")),
    ("replicas-as-text", _set("spec.replicatedJobs.0.replicas", "1")),
    ("dns-hostnames-as-text", _set("spec.network.enableDNSHostnames", "true")),
    ("unknown-network-field", _set("spec.network.hostnames", True)),
    ("unknown-spec-field", _set("spec.replicas", 2)),
    ("max-restarts-as-text", _set("spec.failurePolicy.maxRestarts", "3")),
    ("max-restarts-above-int32", _set("spec.failurePolicy.maxRestarts", 2**31)),
    ("unknown-failure-action", _set("spec.failurePolicy.rules.0.action", "Fail")),
    ("rule-name-with-space", _set("spec.failurePolicy.rules.0.name", "bad input")),
    ("rule-without-name", _delete("spec.failurePolicy.rules.0.name")),
    ("rule-reasons-not-a-list", _set("spec.failurePolicy.rules.0.onJobFailureReasons", "PodFailurePolicy")),
    ("rule-target-unknown", _set("spec.failurePolicy.rules.0.targetReplicatedJobs", ["workers"])),
    (
        "rule-patterns-not-a-list",
        _set("spec.failurePolicy.rules.0.onJobFailureMessagePatterns", "exit code 2"),
    ),
    ("rule-pattern-not-a-regex", _set("spec.failurePolicy.rules.0.onJobFailureMessagePatterns", ["exit (2"])),
    ("rule-patterns-repeated", _set("spec.failurePolicy.rules.1.onJobFailureMessagePatterns", ["a", "a"])),
    ("unknown-restart-strategy", _set("spec.failurePolicy.restartStrategy", "Always")),
    ("unknown-success-operator", _set("spec.successPolicy", {"operator": "Every"})),
    ("suspend-as-text", _set("spec.suspend", "yes")),
    ("negative-ttl", _set("spec.ttlSecondsAfterFinished", -1)),
    ("name-with-dot", _set("metadata.name", "bot.v2-train-0123abcd")),
    ("name-starting-with-digit", _set("metadata.name", "7eleven-train-0123abcd")),
    ("pod-names-too-long", _set("metadata.name", "a" * 49)),
    ("duplicate-replicated-jobs", _duplicate_replicated_job),
]


@pytest.mark.parametrize("mutate", [m for _, m in BROKEN], ids=[case for case, _ in BROKEN])
def test_the_check_refuses_what_the_jobset_api_refuses(mutate: Callable[[Manifest], None]) -> None:
    jobset, _ = jobset_and_job(4)
    assert jobset_violations(jobset) == []
    mutate(jobset)
    assert jobset_violations(jobset) != []


def test_kubernetes_validate_refuses_a_broken_child_job() -> None:
    jobset, _ = jobset_and_job(2)
    jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] = "2"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job_template_as_job(jobset, "node"), "1.33", strict=True)
