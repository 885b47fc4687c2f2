"""Job manifests: valid batch/v1 on the supported Kubernetes versions, secrets only by reference, and
deterministic, for the example recipes and every assistant source."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from ftrecipe.api import load_recipe
from ftrecipe.api.v1alpha1 import FinetuneRecipeSpec
from ftrecipe.controller.manifests import (
    ANNOTATION_INPUTS_HASH,
    LABEL_INPUTS_HASH,
    LABEL_QUEUE,
    MAX_LABEL,
    Images,
    build_job,
    label_value,
)
from ftrecipe.phases import inputs
from ftrecipe.plan.cache_key import PHASES, Phase, phase_hashes, phase_prefix
from ftrecipe.plan.planner import CreateJob, job_name

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "recipes"
K8S_VERSIONS = ("1.29", "1.31", "1.33")
# What the referenced Secrets would hold in a cluster, given to the builder the only way it could read
# them (the environment of the process that builds the Jobs): none of it may ever be in a manifest.
FAKE_SECRET_ENV = {
    "OPENAI_API_KEY": "sk-fake-openai-key-0123456789",
    "AZURE_API_KEY": "sk-fake-azure-key-0123456789",
    "HF_TOKEN": "hf_fake_token_0123456789",
    "GIT_PASSWORD": "fake-git-password-0123456789",
    "GIT_USERNAME": "fake-git-user-0123456789",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEACCESSKEY0123",
    "AWS_SECRET_ACCESS_KEY": "fake/secret+access/key0123456789",
}
SECRET_VARS = {
    "OPENAI_API_KEY",
    "AZURE_API_KEY",
    "HF_TOKEN",
    "GIT_USERNAME",
    "GIT_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}


def recipe(name: str) -> tuple[str, FinetuneRecipeSpec]:
    loaded = load_recipe(RECIPES / f"{name}.yaml")
    assert loaded.metadata.name is not None
    return loaded.metadata.name, loaded.spec


def with_changes(spec: FinetuneRecipeSpec, changes: dict[str, Any]) -> FinetuneRecipeSpec:
    """The spec with top-level sections merged (one level deep) from ``changes`` (camelCase)."""
    data = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return FinetuneRecipeSpec.model_validate(data)


def action(name: str, spec: FinetuneRecipeSpec, phase: Phase, *, suspended: bool = False) -> CreateJob:
    inputs_hash = phase_hashes(spec)[phase]
    return CreateJob(phase, inputs_hash, job_name(name, phase, inputs_hash), suspended)


def job_for(name: str, spec: FinetuneRecipeSpec, phase: Phase, *, suspended: bool = False) -> dict[str, Any]:
    act = action(name, spec, phase, suspended=suspended)
    assert spec.output.s3 is not None
    prefix = phase_prefix(spec.output.s3.uri, name, phase, act.inputs_hash)
    return build_job(name, "ml", spec, act, output_prefix=prefix)


def containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    pod = job["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def main_container(job: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]
    return found


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def refs(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``*SecretRef`` in a spec JSON tree, with its path."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("SecretRef"):
                yield f"{path}.{key}", value
            yield from refs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from refs(item, f"{path}[{index}]")


ALL_SOURCES: dict[str, dict[str, Any]] = {
    "git-https": {"git": {"url": "https://example.com/a.git", "credentialsSecretRef": {"name": "git"}}},
    "git-ssh": {"git": {"url": "ssh://git@example.com/a.git", "credentialsSecretRef": {"name": "git-ssh"}}},
    "s3": {
        "s3": {
            "uri": "s3://assistants/moneybank/",
            "endpoint": "http://minio.minio:9000",
            "forcePathStyle": True,
            "credentialsSecretRef": {"name": "assistant-s3"},
        }
    },
    "configMap": {"configMap": {"name": "moneybank"}},
    "pvc": {"pvc": {"claimName": "assistants", "path": "moneybank"}},
}


def every_job() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in ("full", "minimal"):
        recipe_name, spec = recipe(name)
        for phase in ("data", "train", "evaluate"):
            yield f"{name}-{phase}", job_for(recipe_name, spec, phase)
    recipe_name, spec = recipe("minimal")
    for label, source in ALL_SOURCES.items():
        changed = with_changes(
            spec, {"assistant": {**spec.assistant.model_dump(by_alias=True), "source": source}}
        )
        yield f"source-{label}", job_for(recipe_name, changed, "data")
    pvc_model = with_changes(
        spec, {"training": {"baseModel": {"pvc": {"claimName": "models", "path": "llama"}}}}
    )
    yield "base-model-pvc", job_for(recipe_name, pvc_model, "train")
    mig = with_changes(spec, MIG_AND_PARTIAL_RESOURCES)
    for phase in PHASES:
        yield f"mig-partial-resources-{phase}", job_for(recipe_name, mig, phase)


# A MIG slice, two of them, and resources given in part: the rest comes from the defaults.
MIG_AND_PARTIAL_RESOURCES: dict[str, Any] = {
    "training": {
        "gpus": 2,
        "gpuResourceName": "nvidia.com/mig-1g.10gb",
        "resources": {"requests": {"memory": "128Gi"}, "limits": {"cpu": "4", "hugepages-2Mi": "1Gi"}},
        "terminationGracePeriodSeconds": 1800,
    },
    "dataPreparation": {"resources": {"limits": {"memory": "1Gi"}}},
}


JOBS = dict(every_job())


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("which", sorted(JOBS))
def test_jobs_are_valid_kubernetes(which: str, version: str) -> None:
    kubernetes_validate.validate(JOBS[which], version, strict=True)


@pytest.mark.parametrize("which", sorted(JOBS))
def test_secrets_only_as_references(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, value in FAKE_SECRET_ENV.items():
        monkeypatch.setenv(variable, value)
    job = dict(every_job())[which]  # built with the values at hand
    text = json.dumps(job)
    for value in FAKE_SECRET_ENV.values():
        assert value not in text
    for container in containers(job):
        for variable, entry in env_of(container).items():
            if variable in SECRET_VARS:
                assert "value" not in entry, f"{variable} in clear text"
                assert set(entry["valueFrom"]) == {"secretKeyRef"}
            if "valueFrom" in entry:
                assert set(entry["valueFrom"]) == {"secretKeyRef"}
        assert not any(word in arg.lower() for arg in container["args"] for word in ("password", "token="))
    pod = job["spec"]["template"]["spec"]
    for volume in pod["volumes"]:
        assert "secret" not in volume or volume["name"] == "git-ssh"
    # The spec the init container gets carries references (name, key), nothing else.
    for init in pod.get("initContainers", []):
        spec_env = env_of(init)[inputs.SPEC_ENV]["value"]
        for path, ref in refs(json.loads(spec_env)):
            assert set(ref) <= {"name", "key"}, path


def test_secret_references_become_secret_key_refs() -> None:
    name, spec = recipe("full")
    data = job_for(name, spec, "data")
    init, main = data["spec"]["template"]["spec"]["initContainers"][0], main_container(data)
    assert env_of(main)["AZURE_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "azure-openai", "key": "api-key"}
    }
    assert "OPENAI_API_KEY" not in env_of(main)
    assert env_of(main)["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "minio-credentials",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert env_of(main)["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio.svc:9000"
    assert env_of(main)["FTRECIPE_S3_ADDRESSING_STYLE"]["value"] == "path"
    assert env_of(init)["GIT_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "git-readonly",
        "key": "password",
    }
    assert "AZURE_API_KEY" not in env_of(init)  # the init container needs no LLM
    train = main_container(job_for(name, spec, "train"))
    assert env_of(train)["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "huggingface", "key": "token"}
    # dataPreparation.secretEnv: in the data container only, always by reference
    assert env_of(main)["HTTPS_PROXY"] == {
        "name": "HTTPS_PROXY",
        "valueFrom": {"secretKeyRef": {"name": "egress-proxy", "key": "url"}},
    }
    assert "HTTPS_PROXY" not in env_of(init) and "HTTPS_PROXY" not in env_of(train)


def test_secret_env_never_shadows_what_the_job_sets() -> None:
    name, spec = recipe("full")
    for taken in ("AZURE_API_KEY", "AWS_ACCESS_KEY_ID", "HOME"):
        clash = with_changes(
            spec,
            {"dataPreparation": {"secretEnv": [{"name": taken, "secretKeyRef": {"name": "s", "key": "k"}}]}},
        )
        with pytest.raises(ValueError, match=f"secretEnv sets {taken}, which the data Job already sets"):
            job_for(name, clash, "data")
    twice = with_changes(
        spec,
        {
            "dataPreparation": {
                "secretEnv": [
                    {"name": "AZURE_OPENAI_KEY", "secretKeyRef": {"name": "a", "key": "k"}},
                    {"name": "AZURE_OPENAI_KEY", "secretKeyRef": {"name": "b", "key": "k"}},
                ]
            }
        },
    )
    with pytest.raises(ValueError, match="secretEnv sets AZURE_OPENAI_KEY"):
        job_for(name, twice, "data")


def test_gpu_job_scheduling() -> None:
    name, spec = recipe("full")
    job = job_for(name, spec, "train")
    pod = job["spec"]["template"]["spec"]
    main = main_container(job)
    # What full.yaml gives (requests cpu 8, memory 64Gi; limits memory 96Gi), the rest from the defaults.
    assert main["resources"]["limits"] == {
        "cpu": "16",
        "ephemeral-storage": "100Gi",
        "memory": "96Gi",
        "nvidia.com/gpu": "1",
    }
    assert main["resources"]["requests"] == {"cpu": "8", "ephemeral-storage": "40Gi", "memory": "64Gi"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["priorityClassName"] == "batch-gpu"
    assert pod["runtimeClassName"] == "nvidia"
    assert "nodeAffinity" in pod["affinity"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in main["volumeMounts"]
    assert main["image"] == "ghcr.io/example-org/ftrecipe-trainer:0.1.0"
    assert job["spec"]["activeDeadlineSeconds"] == 86400
    # The data pod is placed by spec.pods, not by training's GPU settings.
    data_pod = job_for(name, spec, "data")["spec"]["template"]["spec"]
    assert data_pod["nodeSelector"] == {"node-pool": "cpu-batch"}
    assert data_pod["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "batch", "effect": "NoSchedule"}
    ]
    assert data_pod["priorityClassName"] == "batch-cpu"
    assert data_pod["runtimeClassName"] == "gvisor"
    assert "preferredDuringSchedulingIgnoredDuringExecution" in data_pod["affinity"]["nodeAffinity"]
    assert (
        main_container(job_for(name, spec, "data"))["image"] == "ghcr.io/example-org/ftrecipe-operator:0.1.0"
    )


def test_default_images_and_cpu_training() -> None:
    name, spec = recipe("minimal")
    images = Images(operator="registry.local/op:1", trainer="registry.local/trainer:1")
    act = action(name, spec, "train")
    job = build_job(name, "ml", spec, act, output_prefix="s3://b/p/", images=images)
    assert main_container(job)["image"] == "registry.local/trainer:1"
    assert job["spec"]["template"]["spec"]["initContainers"][0]["image"] == "registry.local/op:1"
    assert Images.from_env({"FTRECIPE_TRAINER_IMAGE": "x/t:2"}).trainer == "x/t:2"
    cpu = with_changes(spec, {"training": {"gpus": 0}})
    resources = main_container(job_for(name, cpu, "train")).get("resources", {})
    assert "nvidia.com/gpu" not in resources.get("limits", {})


def test_pod_failure_policy_and_hardening() -> None:
    name, spec = recipe("minimal")
    cases: tuple[tuple[Phase, int], ...] = (("data", 2), ("train", 3))
    for phase, backoff in cases:
        job = job_for(name, spec, phase)
        assert job["spec"]["backoffLimit"] == backoff
        rules = job["spec"]["podFailurePolicy"]["rules"]
        assert {
            "action": "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        } in rules
        assert {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}} in rules
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in containers(job):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
            assert env_of(container)["HOME"]["value"] == "/tmp"
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", "/workspace"} <= mounts
        assert job["spec"]["ttlSecondsAfterFinished"] > 0
        assert job["spec"]["activeDeadlineSeconds"] > 0


def test_names_labels_suspend_and_kueue() -> None:
    name, spec = recipe("full")
    act = action(name, spec, "train", suspended=True)
    job = build_job(name, "ml", spec, act, output_prefix="s3://ml-artifacts/x/")
    meta = job["metadata"]
    assert meta["name"] == job_name(name, "train", act.inputs_hash) == act.name
    assert meta["namespace"] == "ml"
    assert "ownerReferences" not in meta
    assert meta["labels"][LABEL_QUEUE] == "gpu-queue"
    assert meta["labels"][LABEL_INPUTS_HASH] == act.inputs_hash[:12]
    assert meta["annotations"][ANNOTATION_INPUTS_HASH] == act.inputs_hash
    assert job["spec"]["suspend"] is True
    assert job["spec"]["template"]["metadata"]["labels"] == {
        "team": "conversational-ai",
        "cost-center": "ml-1234",
        **meta["labels"],
    }
    minimal_name, minimal = recipe("minimal")
    plain = job_for(minimal_name, minimal, "data")
    assert plain["spec"]["suspend"] is False
    assert LABEL_QUEUE not in plain["metadata"]["labels"]


def test_long_recipe_names_fit_in_labels() -> None:
    _, spec = recipe("minimal")
    long_name = "a" * 70 + ".b" * 40
    job = job_for(long_name, spec, "data")
    for value in job["metadata"]["labels"].values():
        assert len(value) <= MAX_LABEL
    assert len(job["metadata"]["name"]) <= MAX_LABEL
    assert label_value(long_name) != label_value(long_name + "c")
    assert job["metadata"]["annotations"]["ftrecipe.dev/recipe"] == long_name
    kubernetes_validate.validate(job, "1.33", strict=True)


def test_same_inputs_same_manifest() -> None:
    name, spec = recipe("full")
    for phase in ("data", "train"):
        first = json.dumps(job_for(name, spec, phase), sort_keys=False)
        reloaded = recipe("full")[1]
        assert json.dumps(job_for(name, reloaded, phase), sort_keys=False) == first


def test_command_lines() -> None:
    name, spec = recipe("full")
    data = job_for(name, spec, "data")
    args = main_container(data)["args"]
    assert args[:2] == ["prepare-data", "/workspace/inputs/assistant/e2e_coverage_results/passed.yml"]
    assert args[args.index("--rephrase-config") + 1] == "/workspace/inputs/rephrase.yml"
    assert args[args.index("--llm-config") + 1] == "/workspace/inputs/llm.yml"
    # The assistant's own Rasa files fill in what commandGenerator leaves out.
    assert args[args.index("--config") + 1] == "/workspace/inputs/assistant/config.yml"
    assert args[args.index("--endpoints") + 1] == "/workspace/inputs/assistant/endpoints.yml"
    assert args[args.index("--out") + 1].startswith("s3://ml-artifacts/ftrecipe/support-assistant/")
    init = data["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"] == ["fetch-inputs", "--phase", "data", "--into", "/workspace/inputs"]
    train = main_container(job_for(name, spec, "train"))["args"]
    data_hash = phase_hashes(spec)["data"]
    assert train[train.index("--data") + 1] == phase_prefix(
        "s3://ml-artifacts/ftrecipe/support-assistant/", name, "data", data_hash
    )
    assert train[train.index("--base-model") + 1] == (
        "hf:meta-llama/Llama-3.1-8B-Instruct@0e9e39f249a16976918f6564b8830bc894c89659"
    )
    assert train[train.index("--config") + 1] == "/workspace/inputs/training.yml"
    assert train[train.index("--adapter-name") + 1] == name  # the LoRA name vLLM serves, in the model card
    minimal_name, minimal = recipe("minimal")
    minimal_data = main_container(job_for(minimal_name, minimal, "data"))["args"]
    assert "--rephrase-config" not in minimal_data
    assert "--config" not in minimal_data and "--endpoints" not in minimal_data
    pvc_model = with_changes(
        minimal, {"training": {"baseModel": {"pvc": {"claimName": "models", "path": "llama/"}}}}
    )
    pvc_args = main_container(job_for(minimal_name, pvc_model, "train"))["args"]
    assert pvc_args[pvc_args.index("--base-model") + 1] == "/workspace/pvc/llama"


def test_evaluate_job_scores_the_adapter_on_a_gpu() -> None:
    name, spec = recipe("full")
    job = job_for(name, spec, "evaluate")
    hashes = phase_hashes(spec)
    assert spec.output.s3 is not None
    root = spec.output.s3.uri
    pod = job["spec"]["template"]["spec"]
    assert "initContainers" not in pod  # evaluate reads everything itself
    main = main_container(job)
    args = main["args"]
    assert args[0] == "evaluate"
    assert args[args.index("--data") + 1] == phase_prefix(root, name, "data", hashes["data"])
    assert args[args.index("--adapter") + 1] == phase_prefix(root, name, "train", hashes["train"])
    assert args[args.index("--out") + 1] == phase_prefix(root, name, "evaluate", hashes["evaluate"])
    train_args = main_container(job_for(name, spec, "train"))["args"]
    assert args[args.index("--base-model") + 1] == train_args[train_args.index("--base-model") + 1]
    assert args[args.index("--syntax") + 1] == spec.command_generator.syntax
    # No syntax in the recipe: evaluate reads the one prepare-data recorded with the data.
    dumped = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    del dumped["commandGenerator"]["syntax"]
    unset = FinetuneRecipeSpec.model_validate(dumped)
    assert unset.command_generator.syntax is None
    assert "--syntax" not in main_container(job_for(name, unset, "evaluate"))["args"]
    assert args[args.index("--max-new-tokens") + 1] == str(spec.evaluation.max_new_tokens)
    assert args[args.index("--work-dir") + 1] == "/workspace/work"  # the scratch volume, not /tmp
    assert main["image"] == "ghcr.io/example-org/ftrecipe-trainer:0.1.0"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["tolerations"] == job_for(name, spec, "train")["spec"]["template"]["spec"]["tolerations"]
    assert job["spec"]["backoffLimit"] == 2
    assert {"HF_TOKEN", "AWS_ACCESS_KEY_ID"} <= set(env_of(main))
    multi = with_changes(spec, {"training": {"gpus": 4}})
    assert main_container(job_for(name, multi, "evaluate"))["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_refused_recipes() -> None:
    name, spec = recipe("minimal")
    local = with_changes(spec, {"assistant": {"source": {"local": {"path": "."}}}})
    with pytest.raises(ValueError, match="local"):
        job_for(name, local, "data")
    other_store = with_changes(
        spec,
        {"training": {"baseModel": {"s3": {"uri": "s3://models/llama/", "endpoint": "http://other:9000"}}}},
    )
    with pytest.raises(ValueError, match="output store"):
        job_for(name, other_store, "train")
    same_store = with_changes(spec, {"training": {"baseModel": {"s3": {"uri": "s3://models/llama/"}}}})
    assert "s3://models/llama/" in main_container(job_for(name, same_store, "train"))["args"]
    two_keys = with_changes(
        spec,
        {
            "commandGenerator": {"llm": {"model": "gpt-4o", "apiKeySecretRef": {"name": "a", "key": "k"}}},
            "dataPreparation": {
                "rephraser": {"llm": {"model": "gpt-4o-mini", "apiKeySecretRef": {"name": "b", "key": "k"}}}
            },
        },
    )
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        job_for(name, two_keys, "data")


# ------------------------------------------------------------------------------------------ pod settings

DEFAULT_DATA = {
    "requests": {"cpu": "1", "ephemeral-storage": "1Gi", "memory": "2Gi"},
    "limits": {"cpu": "2", "ephemeral-storage": "10Gi", "memory": "4Gi"},
}
DEFAULT_INIT = {
    "requests": {"cpu": "100m", "ephemeral-storage": "256Mi", "memory": "256Mi"},
    "limits": {"cpu": "1", "ephemeral-storage": "4Gi", "memory": "1Gi"},
}
DEFAULT_GPU_REQUESTS = {"cpu": "8", "ephemeral-storage": "40Gi", "memory": "64Gi"}
DEFAULT_GPU_LIMITS = {"cpu": "16", "ephemeral-storage": "100Gi", "memory": "64Gi"}


@pytest.mark.parametrize("which", sorted(JOBS))
def test_every_container_has_requests_and_limits(which: str) -> None:
    for container in containers(JOBS[which]):
        for part in ("requests", "limits"):
            assert {"cpu", "memory", "ephemeral-storage"} <= set(container["resources"][part]), (
                container["name"],
                part,
            )


def test_default_resources_per_phase() -> None:
    name, spec = recipe("minimal")
    data = job_for(name, spec, "data")
    assert main_container(data)["resources"] == DEFAULT_DATA
    assert data["spec"]["template"]["spec"]["initContainers"][0]["resources"] == DEFAULT_INIT
    for phase in ("train", "evaluate"):
        job = job_for(name, spec, phase)
        assert main_container(job)["resources"] == {
            "requests": DEFAULT_GPU_REQUESTS,
            "limits": {**DEFAULT_GPU_LIMITS, "nvidia.com/gpu": "1"},
        }, phase
    train = job_for(name, spec, "train")
    assert train["spec"]["template"]["spec"]["initContainers"][0]["resources"] == DEFAULT_INIT


def test_resources_given_in_part_are_filled_consistently() -> None:
    name, spec = recipe("minimal")
    changed = with_changes(spec, MIG_AND_PARTIAL_RESOURCES)
    train = main_container(job_for(name, changed, "train"))["resources"]
    # requests.memory 128Gi alone: the default limit (64Gi) would be below it, so the limit is 128Gi.
    # limits.cpu 4 alone: the default request (8) would be above it, so the request is 4.
    assert train == {
        "requests": {"cpu": "4", "ephemeral-storage": "40Gi", "memory": "128Gi"},
        "limits": {
            "cpu": "4",
            "ephemeral-storage": "100Gi",
            "hugepages-2Mi": "1Gi",
            "memory": "128Gi",
            "nvidia.com/mig-1g.10gb": "2",
        },
    }
    evaluate = main_container(job_for(name, changed, "evaluate"))["resources"]
    assert evaluate["limits"]["nvidia.com/mig-1g.10gb"] == "1"  # one process generates
    assert "nvidia.com/gpu" not in evaluate["limits"]
    data = main_container(job_for(name, changed, "data"))["resources"]
    # limits.memory 1Gi alone: the default request (2Gi) would be above it, so the request is 1Gi.
    assert data == {
        "requests": {"cpu": "1", "ephemeral-storage": "1Gi", "memory": "1Gi"},
        "limits": {"cpu": "2", "ephemeral-storage": "10Gi", "memory": "1Gi"},
    }
    low_request = with_changes(spec, {"training": {"resources": {"requests": {"cpu": "500m"}}}})
    filled = main_container(job_for(name, low_request, "train"))["resources"]
    assert (filled["requests"]["cpu"], filled["limits"]["cpu"]) == ("500m", "16")


def test_evaluation_resources_of_their_own_or_training_s() -> None:
    name, spec = recipe("full")
    evaluate = main_container(job_for(name, spec, "evaluate"))["resources"]
    assert evaluate == {
        "requests": {"cpu": "4", "ephemeral-storage": "40Gi", "memory": "48Gi"},
        "limits": {"cpu": "16", "ephemeral-storage": "100Gi", "memory": "64Gi", "nvidia.com/gpu": "1"},
    }
    dumped = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    del dumped["evaluation"]["resources"]
    inherited = main_container(job_for(name, FinetuneRecipeSpec.model_validate(dumped), "evaluate"))
    assert inherited["resources"]["limits"]["memory"] == "96Gi"  # training.resources of full.yaml


def test_termination_grace_period_lets_the_trainer_checkpoint() -> None:
    name, spec = recipe("minimal")
    assert job_for(name, spec, "train")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 600
    longer = with_changes(spec, {"training": {"terminationGracePeriodSeconds": 1800}})
    assert job_for(name, longer, "train")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 1800
    for phase in ("data", "evaluate"):  # nothing to save: Kubernetes' 30 s
        assert "terminationGracePeriodSeconds" not in job_for(name, spec, phase)["spec"]["template"]["spec"]


def test_identity_and_pull_secrets_on_every_pod() -> None:
    name, spec = recipe("full")
    for phase in ("data", "train", "evaluate"):
        pod = job_for(name, spec, phase)["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "ftrecipe-jobs", phase
        assert pod["imagePullSecrets"] == [{"name": "ghcr-pull"}], phase
        assert pod["automountServiceAccountToken"] is False  # cloud identity webhooks mount their own token
    minimal_name, minimal = recipe("minimal")
    for phase in PHASES:
        pod = job_for(minimal_name, minimal, phase)["spec"]["template"]["spec"]
        for absent in ("serviceAccountName", "imagePullSecrets", "runtimeClassName", "nodeSelector"):
            assert absent not in pod, (phase, absent)


def test_gpu_pods_inherit_shared_placement_unless_training_sets_its_own() -> None:
    name, spec = recipe("minimal")
    shared = with_changes(
        spec,
        {
            "pods": {
                "nodeSelector": {"pool": "batch"},
                "tolerations": [{"key": "spot", "operator": "Exists"}],
                "runtimeClassName": "kata",
                "priorityClassName": "low",
            },
            "training": {"runtimeClassName": "nvidia"},
        },
    )
    for phase in ("data", "train", "evaluate"):
        pod = job_for(name, shared, phase)["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"pool": "batch"}, phase
        assert pod["tolerations"] == [{"key": "spot", "operator": "Exists"}], phase
        assert pod["priorityClassName"] == "low", phase
        assert pod["runtimeClassName"] == ("kata" if phase == "data" else "nvidia"), phase


def test_pod_labels_and_annotations_pass_through_but_never_replace_ours() -> None:
    name, spec = recipe("full")
    for phase in ("data", "train", "evaluate"):
        job = job_for(name, spec, phase)
        template = job["spec"]["template"]["metadata"]
        assert template["labels"]["team"] == "conversational-ai"
        assert template["labels"]["cost-center"] == "ml-1234"
        assert template["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
        assert "cost-center" not in job["metadata"]["labels"]  # the pods', not the Job's
        assert template["labels"]["ftrecipe.dev/phase"] == phase
    # The API refuses our keys (tests/test_api_pods.py); were one to get through, ours still win.
    smuggled = spec.model_copy(
        update={
            "pods": spec.pods.model_copy(
                update={"labels": {"ftrecipe.dev/phase": "evil", "app.kubernetes.io/name": "evil", "x": "y"}}
            )
        }
    )
    labels = job_for(name, smuggled, "train")["spec"]["template"]["metadata"]["labels"]
    assert (labels["ftrecipe.dev/phase"], labels["app.kubernetes.io/name"], labels["x"]) == (
        "train",
        "ftrecipe",
        "y",
    )


def test_model_cache_is_mounted_at_the_hugging_face_cache() -> None:
    name, spec = recipe("full")
    for phase in ("train", "evaluate"):
        job = job_for(name, spec, phase)
        pod = job["spec"]["template"]["spec"]
        assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-model-cache"}} in pod[
            "volumes"
        ]
        main = main_container(job)
        assert {"name": "model-cache", "mountPath": "/workspace/hf"} in main["volumeMounts"]
        assert env_of(main)["HF_HOME"]["value"] == "/workspace/hf"
    data_pod = job_for(name, spec, "data")["spec"]["template"]["spec"]
    assert all(volume["name"] != "model-cache" for volume in data_pod["volumes"])
    minimal_name, minimal = recipe("minimal")
    train_pod = job_for(minimal_name, minimal, "train")["spec"]["template"]["spec"]
    assert all(volume["name"] != "model-cache" for volume in train_pod["volumes"])
