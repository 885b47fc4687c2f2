"""batch/v1 Job manifests for the planner's `CreateJob` actions: pure functions, no Kubernetes client.

Same inputs, same manifest (byte for byte once serialised), so a restarted operator that rebuilds a Job
sees no difference. Secrets reach pods only as ``valueFrom.secretKeyRef`` (or a mounted Secret for a git
ssh key): the spec, which the init container gets as JSON, holds references only.

Decisions worth knowing:

* Exit code 2 is ftrecipe's "user error" (a bad recipe, a missing file): the Job fails at once instead of
  retrying; a pod disrupted by preemption or a drain (``DisruptionTarget``) does not use up a retry.
* API keys: ``commandGenerator.llm.apiKeySecretRef`` becomes ``OPENAI_API_KEY`` (``AZURE_API_KEY`` for
  azure), the variable `ftrecipe.dataprep.llm` reads. The rephraser's key is added under its own
  provider's variable; when both LLMs need the *same* variable from *different* Secret keys, one process
  cannot have both, so that recipe is refused with a ValueError.
* S3: the data Job's init container talks to the assistant's store (``assistant.source.s3``), its main
  container to ``output.s3``. The train container has one set of AWS variables, from ``output.s3``; a
  ``baseModel.s3`` on another endpoint or with other credentials is refused.
* Git: https credentials as ``GIT_USERNAME``/``GIT_PASSWORD`` (keys ``username``/``password``), ssh
  credentials as a Secret volume (``ssh-privatekey``, optional ``known_hosts``).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ftrecipe import __version__
from ftrecipe.api.v1alpha1 import (
    FinetuneRecipeSpec,
    ResourceRequirements,
    S3Location,
    SecretKeyRef,
    Toleration,
    parse_quantity,
)
from ftrecipe.phases import inputs
from ftrecipe.phases.commands import (
    CommandPaths,
    _output_s3,
    base_model_arg,
    data_args,
    evaluate_args,
    fetch_inputs_args,
    train_args,
)
from ftrecipe.plan.cache_key import HASH_LENGTH, Phase, phase_hashes, phase_prefix
from ftrecipe.plan.planner import (
    JOBSET_POD_INFIX,
    JOBSET_REPLICATED_JOB,
    MAX_JOBSET_NAME,
    CreateJob,
    runs_as_jobset,
)

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_RECIPE: Final = "ftrecipe.dev/recipe"
LABEL_PHASE: Final = "ftrecipe.dev/phase"
LABEL_INPUTS_HASH: Final = "ftrecipe.dev/inputs-hash"
LABEL_QUEUE: Final = "kueue.x-k8s.io/queue-name"
ANNOTATION_INPUTS_HASH: Final = "ftrecipe.dev/inputs-hash"
ANNOTATION_RECIPE: Final = "ftrecipe.dev/recipe"
APP: Final = "ftrecipe"
MANAGER: Final = "ftrecipe-operator"
MAX_LABEL: Final = 63

EXIT_USER_ERROR: Final = 2  # ftrecipe's one-line "fix your input" exit code: never worth a retry
BACKOFF_LIMIT: Final[dict[Phase, int]] = {"data": 2, "train": 3, "evaluate": 2}
DEFAULT_DEADLINE_SECONDS: Final = 6 * 3600
TTL_SECONDS_AFTER_FINISHED: Final = 7 * 24 * 3600
NON_ROOT_ID: Final = 65532  # the distroless "nonroot" user

MAIN_CONTAINER: Final[dict[Phase, str]] = {"data": "prepare-data", "train": "train", "evaluate": "evaluate"}
INIT_CONTAINER: Final = "fetch-inputs"
CACHE_DIR: Final = f"{inputs.WORKSPACE}/cache"
WORK_DIR: Final = f"{inputs.WORKSPACE}/work"
ASSISTANT_PATH: Final = f"{inputs.INPUTS_DIR}/{inputs.ASSISTANT_DIR}"

# Every container gets cpu, memory and ephemeral-storage requests and limits: a namespace ResourceQuota or
# LimitRange that demands them admits the pods, Kueue counts them, the scheduler places them by what they
# use, and the kubelet evicts a pod that outgrows its disk with a message instead of filling the node. A
# recipe's `resources` replaces these value by value (`filled_resources`).
Resources = dict[str, dict[str, str]]
# Data preparation is CPU and network bound (LLM requests); its cache and outputs are small.
DEFAULT_DATA_RESOURCES: Final[Resources] = {
    "requests": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "1Gi"},
    "limits": {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "10Gi"},
}
# Training and evaluation load the base model in host memory on the way to the GPU (16 GB in bf16 for an 8B
# model, per GPU process) and tokenize with several CPUs; without a model cache the HF cache (the same
# 16 GB) and the checkpoints are on the pod's ephemeral storage.
DEFAULT_GPU_RESOURCES: Final[Resources] = {
    "requests": {"cpu": "8", "memory": "64Gi", "ephemeral-storage": "40Gi"},
    "limits": {"cpu": "16", "memory": "64Gi", "ephemeral-storage": "100Gi"},
}
# fetch-inputs clones or copies the assistant and writes small input files.
INIT_RESOURCES: Final[Resources] = {
    "requests": {"cpu": "100m", "memory": "256Mi", "ephemeral-storage": "256Mi"},
    "limits": {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "4Gi"},
}
HF_HOME: Final = f"{inputs.WORKSPACE}/hf"  # the Hugging Face cache, where modelCache is mounted


@dataclass(frozen=True)
class Images:
    """Default images, overridden per recipe by ``spec.images``."""

    operator: str = f"ghcr.io/ftrecipe/ftrecipe:{__version__}"
    trainer: str = f"ghcr.io/ftrecipe/ftrecipe-trainer:{__version__}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Images:
        """The operator's settings: ``FTRECIPE_OPERATOR_IMAGE`` and ``FTRECIPE_TRAINER_IMAGE``."""
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            operator=env.get("FTRECIPE_OPERATOR_IMAGE") or defaults.operator,
            trainer=env.get("FTRECIPE_TRAINER_IMAGE") or defaults.trainer,
        )


DEFAULT_IMAGES: Final = Images()


# --------------------------------------------------------------------------------------------- labels


def label_value(text: str) -> str:
    """``text`` as a label value: at most 63 characters, shortened with a digest of the whole when longer."""
    if len(text) <= MAX_LABEL:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{text[: MAX_LABEL - len(digest) - 1].rstrip('-._')}-{digest}"


def job_labels(recipe_name: str, phase: Phase, inputs_hash: str) -> dict[str, str]:
    """The labels the operator selects its Jobs by."""
    return {
        LABEL_NAME: APP,
        LABEL_MANAGED_BY: MANAGER,
        LABEL_RECIPE: label_value(recipe_name),
        LABEL_PHASE: phase,
        LABEL_INPUTS_HASH: inputs_hash[:HASH_LENGTH],
    }


# --------------------------------------------------------------------------------------------- env


def _value(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _secret(name: str, secret: str, key: str, *, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


BASE_ENV: Final = (
    _value("HOME", "/tmp"),
    _value("XDG_CACHE_HOME", "/tmp/.cache"),
    _value("HF_HOME", HF_HOME),
    _value("PYTHONUNBUFFERED", "1"),
)


def _s3_env(location: S3Location) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if location.endpoint is not None:
        env.append(_value("AWS_ENDPOINT_URL", location.endpoint))
    if location.region is not None:
        env.append(_value("AWS_REGION", location.region))
    if location.force_path_style:
        env.append(_value("FTRECIPE_S3_ADDRESSING_STYLE", "path"))
    if location.credentials_secret_ref is not None:
        secret = location.credentials_secret_ref.name
        env.append(_secret("AWS_ACCESS_KEY_ID", secret, "AWS_ACCESS_KEY_ID"))
        env.append(_secret("AWS_SECRET_ACCESS_KEY", secret, "AWS_SECRET_ACCESS_KEY"))
    return env


def _llm_key_env(spec: FinetuneRecipeSpec) -> list[dict[str, Any]]:
    """API keys of the annotating LLM and the rephraser, each under the variable its provider reads."""
    chosen: dict[str, SecretKeyRef] = {}
    for llm in (spec.command_generator.llm, spec.data_preparation.rephraser.llm):
        if llm is None or llm.api_key_secret_ref is None:
            continue
        variable = "AZURE_API_KEY" if llm.provider == "azure" else "OPENAI_API_KEY"
        earlier = chosen.setdefault(variable, llm.api_key_secret_ref)
        if earlier != llm.api_key_secret_ref:
            raise ValueError(
                f"commandGenerator.llm and dataPreparation.rephraser.llm both need {variable} but from "
                f"different Secret keys ({earlier.name}/{earlier.key}, {llm.api_key_secret_ref.name}/"
                f"{llm.api_key_secret_ref.key}); one Job has one {variable}: use the same Secret key"
            )
    return [_secret(variable, ref.name, ref.key) for variable, ref in sorted(chosen.items())]


def _secret_env(spec: FinetuneRecipeSpec, taken: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """dataPreparation.secretEnv as env entries; a name the Job already sets is an error, not a shadow."""
    names = {entry["name"] for entry in taken}
    extra = []
    for variable in spec.data_preparation.secret_env:
        if variable.name in names:
            raise ValueError(
                f"dataPreparation.secretEnv sets {variable.name}, which the data Job already sets "
                "(from apiKeySecretRef, output.s3 or ftrecipe itself): remove one"
            )
        names.add(variable.name)
        extra.append(_secret(variable.name, variable.secret_key_ref.name, variable.secret_key_ref.key))
    return extra


# --------------------------------------------------------------------------------------------- pieces


def filled_resources(requirements: ResourceRequirements | None, defaults: Resources) -> Resources:
    """A recipe's ``resources`` with each defaulted resource (cpu, memory, ephemeral-storage) that it does
    not give filled in from ``defaults``, kept consistent with what it gives: a request alone keeps the
    default limit unless that is lower (then the limit is the request); a limit alone keeps the default
    request unless that is higher (then the request is the limit, as Kubernetes does). Other resources it
    names pass through as given."""
    given = {
        part: {name: str(value) for name, value in (getattr(requirements, part, None) or {}).items()}
        for part in ("requests", "limits")
    }
    requests, limits = dict(given["requests"]), dict(given["limits"])
    for name in sorted(set(defaults["requests"]) | set(defaults["limits"])):
        request, limit = given["requests"].get(name), given["limits"].get(name)
        default_request, default_limit = defaults["requests"].get(name), defaults["limits"].get(name)
        if request is None and limit is None:
            request, limit = default_request, default_limit
        elif limit is None:
            fits = default_limit is not None and parse_quantity(default_limit) >= parse_quantity(request or 0)
            limit = default_limit if fits else request
        elif request is None:
            fits = default_request is not None and parse_quantity(default_request) <= parse_quantity(limit)
            request = default_request if fits else limit
        if request is not None:
            requests[name] = request
        if limit is not None:
            limits[name] = limit
    return {
        part: dict(sorted(values.items()))
        for part, values in (("requests", requests), ("limits", limits))
        if values
    }


def _container(name: str, image: str, args: list[str], env: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["ftrecipe"],
        "args": args,
        "env": [*(dict(entry) for entry in BASE_ENV), *env],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "workspace", "mountPath": inputs.WORKSPACE},
        ],
    }


def _fetch_inputs_container(
    spec: FinetuneRecipeSpec,
    phase: Phase,
    image: str,
    volumes: list[dict[str, Any]],
    data_prefix: str | None = None,
) -> dict[str, Any]:
    """The init container: `ftrecipe fetch-inputs` with the spec (references only) and the source's access
    (and, for the E2E evaluation of a git source, the output store's, to read the data's commit)."""
    env = [_value(inputs.SPEC_ENV, inputs.spec_json(spec))]
    if inputs.pins_commit(spec, phase):
        env += _s3_env(_output_s3(spec))
    mounts: list[dict[str, Any]] = []
    source = spec.assistant.source
    if inputs.reads_assistant(spec, phase):  # data, and evaluate with evaluation.e2e
        if source.local is not None:
            raise ValueError(
                "spec.assistant.source.local is for `ftrecipe run` on one machine; in a cluster use s3, git, "
                "configMap or pvc"
            )
        if source.s3 is not None:
            env += _s3_env(source.s3)
        if source.git is not None and source.git.credentials_secret_ref is not None:
            secret = source.git.credentials_secret_ref.name
            if source.git.url.startswith(("https://", "http://")):
                env += [
                    _secret("GIT_USERNAME", secret, "username"),
                    _secret("GIT_PASSWORD", secret, "password"),
                ]
            else:
                volumes.append(
                    {
                        "name": "git-ssh",
                        "secret": {"secretName": secret, "defaultMode": 0o440, "optional": False},
                    }
                )
                mounts.append({"name": "git-ssh", "mountPath": inputs.GIT_SSH_DIR, "readOnly": True})
        if source.config_map is not None:
            volumes.append({"name": "assistant-configmap", "configMap": {"name": source.config_map.name}})
            mounts.append(
                {"name": "assistant-configmap", "mountPath": inputs.CONFIGMAP_ROOT, "readOnly": True}
            )
        if source.pvc is not None:
            volumes.append(
                {
                    "name": "assistant-pvc",
                    "persistentVolumeClaim": {"claimName": source.pvc.claim_name, "readOnly": True},
                }
            )
            mounts.append({"name": "assistant-pvc", "mountPath": inputs.PVC_ROOT, "readOnly": True})
    container = _container(
        INIT_CONTAINER, image, fetch_inputs_args(spec, phase, inputs.INPUTS_DIR, data_prefix), env
    )
    container["volumeMounts"] += mounts
    container["resources"] = filled_resources(spec.pods.fetch_inputs_resources, INIT_RESOURCES)
    return container


JOB_PATHS: Final = CommandPaths(
    assistant=ASSISTANT_PATH, inputs=inputs.INPUTS_DIR, cache=CACHE_DIR, work=WORK_DIR
)


# --------------------------------------------------------------------------------------------- pod settings


def _tolerations(tolerations: list[Toleration]) -> list[dict[str, Any]]:
    return [t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in tolerations]


def pod_placement(spec: FinetuneRecipeSpec, *, gpu_phase: bool) -> dict[str, Any]:
    """nodeSelector, tolerations, affinity, priorityClassName and runtimeClassName of a phase's pod:
    ``spec.pods`` for every pod, each replaced by ``spec.training``'s own where set for the GPU phases
    (training and evaluation), so the data pod can run on CPU nodes and the others on GPU nodes."""
    shared, training = spec.pods, spec.training

    def chosen(name: str) -> Any:
        own = getattr(training, name) if gpu_phase else None
        return own if own is not None else getattr(shared, name)

    placement: dict[str, Any] = {}
    if node_selector := chosen("node_selector"):
        placement["nodeSelector"] = dict(sorted(node_selector.items()))
    if tolerations := chosen("tolerations"):
        placement["tolerations"] = _tolerations(tolerations)
    if affinity := chosen("affinity"):
        placement["affinity"] = copy.deepcopy(affinity)
    if (priority_class := chosen("priority_class_name")) is not None:
        placement["priorityClassName"] = priority_class
    if (runtime_class := chosen("runtime_class_name")) is not None:
        placement["runtimeClassName"] = runtime_class
    return placement


def pod_identity(spec: FinetuneRecipeSpec) -> dict[str, Any]:
    """serviceAccountName and imagePullSecrets of every Job pod. The ServiceAccount's API token stays
    unmounted (``automountServiceAccountToken: false``): IRSA, EKS Pod Identity and Azure workload identity
    mount their own projected token, and GKE's metadata server needs none."""
    identity: dict[str, Any] = {}
    if spec.pods.service_account_name is not None:
        identity["serviceAccountName"] = spec.pods.service_account_name
    if spec.pods.image_pull_secrets:
        identity["imagePullSecrets"] = [{"name": ref.name} for ref in spec.pods.image_pull_secrets]
    return identity


def pod_metadata(spec: FinetuneRecipeSpec, labels: Mapping[str, str]) -> dict[str, Any]:
    """The pod template's metadata: the recipe's ``pods.labels`` and ``pods.annotations`` under ours, which
    always win (the API refuses our keys; a key ours gain later must not be taken over either)."""
    metadata: dict[str, Any] = {"labels": {**dict(sorted((spec.pods.labels or {}).items())), **labels}}
    if spec.pods.annotations:
        metadata["annotations"] = dict(sorted(spec.pods.annotations.items()))
    return metadata


# --------------------------------------------------------------------------------------------- the Job


def build_job(
    recipe_name: str,
    namespace: str,
    spec: FinetuneRecipeSpec,
    action: CreateJob,
    *,
    output_prefix: str,
    images: Images = DEFAULT_IMAGES,
    data_prefix: str | None = None,
    adapter_prefix: str | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job for ``action``. ``output_prefix`` is where this phase publishes its bundle;
    ``data_prefix`` (train only) where the data bundle is, by default the data phase's content-addressed
    prefix under ``output.s3.uri``; ``adapter_prefix`` (evaluate only) likewise where the adapter is (the
    operator passes both, for the hashes the recipe was planned with). Raises ValueError for recipes a
    cluster cannot run."""
    phase = action.phase
    output = _output_s3(spec)
    labels = job_labels(recipe_name, phase, action.inputs_hash)
    if spec.queue_name is not None:
        labels[LABEL_QUEUE] = spec.queue_name
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "workspace", "emptyDir": {}},
    ]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NON_ROOT_ID,
            "runAsGroup": NON_ROOT_ID,
            "fsGroup": NON_ROOT_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if phase == "data":
        image = spec.images.operator or images.operator
        init = _fetch_inputs_container(spec, phase, image, volumes)
        main = _container(
            MAIN_CONTAINER[phase],
            image,
            data_args(spec, output_prefix, JOB_PATHS),
            [*_s3_env(output), *_llm_key_env(spec)],
        )
        main["env"] += _secret_env(spec, main["env"])
        main["resources"] = filled_resources(spec.data_preparation.resources, DEFAULT_DATA_RESOURCES)
        deadline = DEFAULT_DEADLINE_SECONDS
    else:
        # Training, and evaluation (the adapter on the same base model, on the same kind of node).
        training = spec.training
        hashes = phase_hashes(spec)
        if data_prefix is None:
            data_prefix = phase_prefix(output.uri, recipe_name, "data", hashes["data"])
        image = spec.images.trainer or images.trainer
        env = _s3_env(output)
        base = training.base_model
        if base.hugging_face is not None and base.hugging_face.token_secret_ref is not None:
            ref = base.hugging_face.token_secret_ref
            env.append(_secret("HF_TOKEN", ref.name, ref.key))
        if phase == "train":
            init = _fetch_inputs_container(spec, phase, spec.images.operator or images.operator, volumes)
            args = train_args(spec, output_prefix, data_prefix, base_model_arg(spec), JOB_PATHS, recipe_name)
            gpus = training.gpus
            deadline = training.active_deadline_seconds
        else:
            # evaluate reads its data, base model and adapter itself; the E2E replay (evaluation.e2e) also
            # the assistant and llm.yml, fetched first as for data preparation.
            init = None
            if inputs.reads_assistant(spec, phase):
                init = _fetch_inputs_container(
                    spec, phase, spec.images.operator or images.operator, volumes, data_prefix
                )
            if adapter_prefix is None:
                adapter_prefix = phase_prefix(output.uri, recipe_name, "train", hashes["train"])
            args = evaluate_args(
                spec,
                output_prefix,
                data_prefix,
                adapter_prefix,
                base_model_arg(spec),
                JOB_PATHS.work,
                JOB_PATHS,
            )
            gpus = min(training.gpus, 1)  # one process generates; more GPUs would sit idle
            deadline = DEFAULT_DEADLINE_SECONDS
        main = _container(MAIN_CONTAINER[phase], image, args, env)
        own = spec.evaluation.resources if phase == "evaluate" else None
        resources = filled_resources(own or training.resources, DEFAULT_GPU_RESOURCES)
        if gpus > 0:  # extended resources are limits only; the request follows
            resources.setdefault("limits", {})[training.gpu_resource_name] = str(gpus)
        main["resources"] = resources
        if phase == "train":  # SIGTERM → checkpoint → upload (ftrecipe.training.trainer) needs minutes
            pod["terminationGracePeriodSeconds"] = training.termination_grace_period_seconds
        if training.model_cache is not None:
            volumes.append(
                {
                    "name": "model-cache",
                    "persistentVolumeClaim": {"claimName": training.model_cache.claim_name},
                }
            )
            main["volumeMounts"].append({"name": "model-cache", "mountPath": HF_HOME})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        main["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
        if base.pvc is not None:
            volumes.append(
                {
                    "name": "base-model",
                    "persistentVolumeClaim": {"claimName": base.pvc.claim_name, "readOnly": True},
                }
            )
            main["volumeMounts"].append(
                {"name": "base-model", "mountPath": inputs.PVC_ROOT, "readOnly": True}
            )
    pod.update(pod_placement(spec, gpu_phase=phase != "data"))
    pod.update(pod_identity(spec))
    if init is not None:
        pod["initContainers"] = [init]
    pod["containers"] = [main]
    pod["volumes"] = volumes
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": action.name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {ANNOTATION_INPUTS_HASH: action.inputs_hash, ANNOTATION_RECIPE: recipe_name},
        },
        "spec": {
            "suspend": action.suspended,
            "backoffLimit": BACKOFF_LIMIT[phase],
            "activeDeadlineSeconds": deadline,
            "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                    {
                        "action": "FailJob",
                        "onExitCodes": {"operator": "In", "values": [EXIT_USER_ERROR]},
                    },
                ]
            },
            "template": {"metadata": pod_metadata(spec, labels), "spec": pod},
        },
    }


# --------------------------------------------------------------------------------------------- the JobSet

JOBSET_API_VERSION: Final = "jobset.x-k8s.io/v1alpha2"
# A lost node (a pod that fails for any reason but bad input: preemption, a node going away, an NCCL
# error) fails its child Job at once (backoffLimit 0), and the JobSet recreates every pod, which resume
# from the last checkpoint. Three such restarts, as many retries as the single-node train Job has.
JOBSET_MAX_RESTARTS: Final = 3
RENDEZVOUS_PORT: Final = 29400  # torchrun's c10d rendezvous, served by node 0's launcher
ENV_NODES: Final = "FTRECIPE_NODES"
ENV_RENDEZVOUS: Final = "FTRECIPE_RENDEZVOUS"
# Job condition reasons of a child Job that no restart would help: its podFailurePolicy failed it (exit
# code 2, bad input), or it ran past activeDeadlineSeconds.
POD_FAILURE_POLICY_REASON: Final = "PodFailurePolicy"
DEADLINE_EXCEEDED_REASON: Final = "DeadlineExceeded"
EXIT_PREEMPTED: Final = 143  # 128 + SIGTERM: every pod of a preempted group checkpoints and exits so
# The child Job's podFailurePolicy FailJob messages (Kubernetes' pkg/controller/job/pod_failure_policy.go,
# stable since 1.25): "Container <c> for pod <ns>/<pod> failed with exit code <n> matching FailJob rule at
# index <i>" and "Pod <ns>/<pod> has condition <type> matching FailJob rule at index <i>". Every FailJob
# failure has the reason PodFailurePolicy, so the JobSet's rules tell bad input from a preemption by the
# message (onJobFailureMessagePatterns, JobSet v0.10.0; RE2, searched anywhere in the message).
BAD_INPUT_MESSAGE_PATTERN: Final = rf"failed with exit code {EXIT_USER_ERROR} matching FailJob rule"
PREEMPTION_MESSAGE_PATTERNS: Final = (
    rf"failed with exit code {EXIT_PREEMPTED} matching FailJob rule",
    r"has condition DisruptionTarget matching FailJob rule",
)


# What a JobSet release before v0.10.0 does with our rules: its CRD lacks the field, so the API server
# prunes it, and the bad-input rule (reason PodFailurePolicy alone) then fails the group on a preemption.
JOBSET_MESSAGE_PATTERNS_RELEASE: Final = "v0.10.0"


def jobset_too_old(sent: Mapping[str, Any], stored: Mapping[str, Any]) -> str | None:
    """One line for the recipe's Events when the cluster's JobSet dropped the rules' message patterns
    (the created object, `stored`, lacks what `sent` had: a release before v0.10.0); None when it kept them."""
    sent_rules = ((sent.get("spec") or {}).get("failurePolicy") or {}).get("rules") or []
    stored_rules = ((stored.get("spec") or {}).get("failurePolicy") or {}).get("rules") or []
    kept = {rule.get("name"): rule for rule in stored_rules if isinstance(rule, dict)}
    dropped = [
        rule["name"]
        for rule in sent_rules
        if rule.get("onJobFailureMessagePatterns")
        and not (kept.get(rule["name"]) or {}).get("onJobFailureMessagePatterns")
    ]
    if not dropped:
        return None
    return (
        f"the cluster's JobSet dropped failurePolicy.rules[].onJobFailureMessagePatterns (rules "
        f"{', '.join(dropped)}): it is older than {JOBSET_MESSAGE_PATTERNS_RELEASE}, so a preempted node "
        f"fails this training at once instead of restarting the group from its checkpoint; upgrade JobSet "
        f"to {JOBSET_MESSAGE_PATTERNS_RELEASE} or later"
    )


def uses_jobset(spec: FinetuneRecipeSpec, phase: Phase) -> bool:
    """Whether ``phase`` runs as a JobSet (`build_jobset`): training on 2 or more nodes. Everything else,
    and training on one node, is a plain Job (`build_job`): no JobSet needed on the cluster."""
    return runs_as_jobset(spec, phase)


def rendezvous_address(jobset_name: str) -> str:
    """Node 0's stable name and port: `<jobset>-node-0-0.<jobset>:29400` (the JobSet's headless Service,
    named like the JobSet, gives every pod of an Indexed Job the DNS name `<hostname>.<jobset>`)."""
    return f"{jobset_name}{JOBSET_POD_INFIX}0.{jobset_name}:{RENDEZVOUS_PORT}"


def build_jobset(
    recipe_name: str,
    namespace: str,
    spec: FinetuneRecipeSpec,
    action: CreateJob,
    *,
    output_prefix: str,
    images: Images = DEFAULT_IMAGES,
    data_prefix: str | None = None,
    adapter_prefix: str | None = None,
) -> dict[str, Any]:
    """The jobset.x-k8s.io/v1alpha2 JobSet for a multi-node ``action`` (`uses_jobset`), with the same
    parameters as `build_job`, whose pod it reuses unchanged but for the trainer's ``FTRECIPE_NODES``,
    ``FTRECIPE_RENDEZVOUS`` and rendezvous port: one replicated Job ``node`` (1 replica, Indexed,
    parallelism = completions = nodes, so ``JOB_COMPLETION_INDEX`` is the node rank), DNS hostnames on.

    * The JobSet carries the Job's name, labels (the queue label too: Kueue admits the JobSet as one
      workload) and annotations; it is created suspended when the Job would be.
    * The child Job's template has none of our labels: the JobSet, not its child Job, is the phase's
      workload, and the operator's Job selectors must not take the child for a second one.
    * Failures: exit code 2 (bad input) fails the child Job through its podFailurePolicy (reason
      ``PodFailurePolicy``), which a failurePolicy rule (matching the message's exit code) maps to
      FailJobSet: no restart; so does a child Job past ``activeDeadlineSeconds`` (``DeadlineExceeded``).
      A preemption (the trainer's checkpointed exit 143, or a pod with the DisruptionTarget condition)
      fails the child Job through the podFailurePolicy too, and restarts the whole group without counting
      toward maxRestarts (RestartJobSetAndIgnoreMaxRestarts; the operator caps these with
      --max-evictions). Any other pod failure (a crash) fails the child Job (backoffLimit 0,
      ``BackoffLimitExceeded``) and restarts the whole group, up to `JOBSET_MAX_RESTARTS`: one node
      cannot rejoin a running torchrun group on its own. The message patterns need JobSet v0.10.0; an
      older JobSet drops them, and then the bad-input rule, first, fails the JobSet on a preemption too
      (never a restart loop on bad input).
    * ``ttlSecondsAfterFinished`` moves to the JobSet, which owns (and deletes) its child Jobs.

    Raises ValueError for a phase that runs as a plain Job, and for recipes a cluster cannot run."""
    if not uses_jobset(spec, action.phase):
        raise ValueError(
            f"the {action.phase} phase of spec.training.nodes {spec.training.nodes} runs as a Job (build_job), "
            "not a JobSet"
        )
    if len(action.name) > MAX_JOBSET_NAME:
        raise ValueError(
            f"JobSet name {action.name!r} is longer than {MAX_JOBSET_NAME} characters: its pods' names would "
            "not fit 63 (use ftrecipe.plan.planner.jobset_name)"
        )
    job = build_job(
        recipe_name,
        namespace,
        spec,
        action,
        output_prefix=output_prefix,
        images=images,
        data_prefix=data_prefix,
        adapter_prefix=adapter_prefix,
    )
    nodes = spec.training.nodes
    pod_template = job["spec"]["template"]
    main = pod_template["spec"]["containers"][0]
    main["env"] += [
        _value(ENV_NODES, str(nodes)),
        _value(ENV_RENDEZVOUS, rendezvous_address(action.name)),
    ]
    main["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    return {
        "apiVersion": JOBSET_API_VERSION,
        "kind": "JobSet",
        "metadata": job["metadata"],
        "spec": {
            "suspend": action.suspended,
            "ttlSecondsAfterFinished": job["spec"]["ttlSecondsAfterFinished"],
            "network": {"enableDNSHostnames": True},
            "failurePolicy": {
                "maxRestarts": JOBSET_MAX_RESTARTS,
                "rules": [
                    {
                        "name": "badInput",
                        "action": "FailJobSet",
                        "onJobFailureReasons": [POD_FAILURE_POLICY_REASON],
                        "onJobFailureMessagePatterns": [BAD_INPUT_MESSAGE_PATTERN],
                    },
                    {
                        "name": "preempted",
                        "action": "RestartJobSetAndIgnoreMaxRestarts",
                        "onJobFailureReasons": [POD_FAILURE_POLICY_REASON],
                        "onJobFailureMessagePatterns": list(PREEMPTION_MESSAGE_PATTERNS),
                    },
                    {
                        "name": "deadlineExceeded",
                        "action": "FailJobSet",
                        "onJobFailureReasons": [DEADLINE_EXCEEDED_REASON],
                    },
                ],
            },
            "replicatedJobs": [
                {
                    "name": JOBSET_REPLICATED_JOB,
                    "replicas": 1,
                    "template": {
                        "spec": {
                            "completionMode": "Indexed",
                            "parallelism": nodes,
                            "completions": nodes,
                            "backoffLimit": 0,
                            "activeDeadlineSeconds": job["spec"]["activeDeadlineSeconds"],
                            "podFailurePolicy": {
                                "rules": [
                                    {
                                        "action": "FailJob",
                                        "onExitCodes": {"operator": "In", "values": [EXIT_USER_ERROR]},
                                    },
                                    {
                                        "action": "FailJob",
                                        "onExitCodes": {"operator": "In", "values": [EXIT_PREEMPTED]},
                                    },
                                    {
                                        "action": "FailJob",
                                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                                    },
                                ]
                            },
                            "template": pod_template,
                        }
                    },
                }
            ],
        },
    }
