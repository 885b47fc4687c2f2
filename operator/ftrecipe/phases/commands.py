"""What each phase runs: its command line (`data_args`, `train_args`, `evaluate_args`) over the paths
it reads (`CommandPaths`). A Job wraps it (`ftrecipe.controller.manifests`), `ftrecipe run` runs it as a
local process (`ftrecipe.local.runner`): both build it here, so the two cannot drift apart."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from ftrecipe.api.v1alpha1 import FinetuneRecipeSpec, S3Location
from ftrecipe.phases import inputs
from ftrecipe.plan.cache_key import Phase


def _output_s3(spec: FinetuneRecipeSpec) -> S3Location:
    if spec.output.s3 is None:
        raise ValueError("spec.output.local is for `ftrecipe run` on one machine; in a cluster use output.s3")
    return spec.output.s3


@dataclass(frozen=True)
class CommandPaths:
    """Where a phase command reads its inputs and keeps its scratch: the Job's fixed layout (`JOB_PATHS`,
    what `fetch-inputs` writes), or the folders of a local `ftrecipe run`."""

    assistant: str  # the assistant's files (flows, domain, E2E tests)
    inputs: str  # llm.yml, rephrase.yml and training.yml, as `ftrecipe.phases.inputs` writes them
    cache: str  # prepare-data's LLM answer cache
    work: str  # train's local scratch (checkpoints before they are published)


def fetch_inputs_args(
    spec: FinetuneRecipeSpec, phase: Phase, into: str, data_prefix: str | None
) -> list[str]:
    """`fetch-inputs`' command line (a Job's init container). The E2E evaluation of a git source also
    reads the data bundle (``data_prefix``) for the commit the data was prepared from and checks that out."""
    args = ["fetch-inputs", "--phase", phase, "--into", into]
    if inputs.pins_commit(spec, phase):
        if data_prefix is None:
            raise ValueError(
                "the E2E evaluation of a git source checks out the data's commit: pass data_prefix"
            )
        args += ["--data", data_prefix]
    return args


def data_args(spec: FinetuneRecipeSpec, output_prefix: str, paths: CommandPaths) -> list[str]:
    """prepare-data's command line, reading what `fetch-inputs --phase data` wrote (or a local run's files)."""
    prep = spec.data_preparation
    args = ["prepare-data"]
    args += [f"{paths.assistant}/{path.strip('/')}" for path in spec.assistant.e2e_tests]
    args += ["--assistant", paths.assistant, "--llm-config", f"{paths.inputs}/{inputs.LLM_CONFIG}"]
    if spec.assistant.config is not None:  # the production config.yml: fills what commandGenerator leaves out
        args += ["--config", f"{paths.assistant}/{spec.assistant.config.strip('/')}"]
    if spec.assistant.endpoints is not None:
        args += ["--endpoints", f"{paths.assistant}/{spec.assistant.endpoints.strip('/')}"]
    if inputs.rephrase_config(spec) is not None:
        args += ["--rephrase-config", f"{paths.inputs}/{inputs.REPHRASE_CONFIG}"]
    args += [
        "--annotator",
        prep.annotator,
        "--num-rephrases",
        str(prep.num_rephrases),
        "--train-frac",
        repr(prep.train_fraction),
        "--output-format",
        prep.output_format,
        "--seed",
        str(prep.seed),
        "--concurrency",
        str(prep.concurrency),
        "--cache-dir",
        paths.cache,
        "--out",
        output_prefix,
    ]
    if prep.prompt_datetime is not None:  # else prepare-data records one beside its cache
        args += ["--prompt-datetime", prep.prompt_datetime]
    return args


def _same_store(base: S3Location, output: S3Location) -> bool:
    """True when the base model's bucket can be read with the output store's settings and credentials."""
    access = (base.endpoint, base.region, base.force_path_style, base.credentials_secret_ref)
    if access == (None, None, False, None):
        return True
    return access == (output.endpoint, output.region, output.force_path_style, output.credentials_secret_ref)


def base_model_arg(spec: FinetuneRecipeSpec) -> str:
    """`--base-model` of train: hf:ID[@REV], an s3:// URI, or the mounted PVC folder."""
    base = spec.training.base_model
    if base.hugging_face is not None:
        revision = f"@{base.hugging_face.revision}" if base.hugging_face.revision else ""
        return f"hf:{base.hugging_face.id}{revision}"
    if base.s3 is not None:
        if not _same_store(base.s3, _output_s3(spec)):
            raise ValueError(
                "training.baseModel.s3 must be on the output store (same endpoint, region, path style and "
                "credentials as output.s3, or leave those empty): the training pod has one set of AWS settings"
            )
        return base.s3.uri
    if base.pvc is not None:
        return posixpath.normpath(f"{inputs.PVC_ROOT}/{base.pvc.path}")
    raise ValueError(
        "spec.training.baseModel.local is for `ftrecipe run` on one machine; in a cluster use huggingFace, "
        "s3 or pvc"
    )


def train_args(
    spec: FinetuneRecipeSpec,
    output_prefix: str,
    data_prefix: str,
    base_model: str,
    paths: CommandPaths,
    adapter_name: str,
) -> list[str]:
    """train's command line: data and base model (`base_model_arg` in a Job) are read by train itself,
    settings from training.yml. ``adapter_name`` (the recipe's name) is the LoRA name the model card tells
    vLLM and Rasa to use, rather than the bundle folder's `train-<hash>`."""
    return [
        "train",
        "--data",
        data_prefix,
        "--base-model",
        base_model,
        "--out",
        output_prefix,
        "--config",
        f"{paths.inputs}/{inputs.TRAINING_CONFIG}",
        "--work-dir",
        paths.work,
        "--adapter-name",
        adapter_name,
    ]


def e2e_args(spec: FinetuneRecipeSpec, paths: CommandPaths) -> list[str]:
    """evaluate's `--e2e` flags: the assistant and the generator's config as prepare-data got them
    (`data_args`), so the replay renders the prompts data preparation rendered. The gate
    (`evaluation.minE2EPassRate`) is not among them: like minCommandAccuracy it is checked by the planner
    on the report's figures, so a tightened gate is checked on a reused report too."""
    if not spec.evaluation.e2e:
        return []
    args = ["--e2e", "--assistant", paths.assistant, "--llm-config", f"{paths.inputs}/{inputs.LLM_CONFIG}"]
    if spec.assistant.config is not None:
        args += ["--config", f"{paths.assistant}/{spec.assistant.config.strip('/')}"]
    if spec.assistant.endpoints is not None:
        args += ["--endpoints", f"{paths.assistant}/{spec.assistant.endpoints.strip('/')}"]
    return args


def evaluate_args(
    spec: FinetuneRecipeSpec,
    output_prefix: str,
    data_prefix: str,
    adapter_prefix: str,
    base_model: str,
    work_dir: str | None = None,
    paths: CommandPaths | None = None,
) -> list[str]:
    """evaluate's command line: the adapter on the base model it was trained on, scored on the data
    bundle's validation split. ``work_dir``: where fetched inputs go (a Job's scratch volume, not /tmp).
    ``paths``: where `fetch-inputs` (or a local run) put the assistant and llm.yml, read by the E2E
    replay (``evaluation.e2e``, which needs them)."""
    scratch = ["--work-dir", work_dir] if work_dir is not None else []
    if spec.evaluation.e2e and paths is None:
        raise ValueError("evaluation.e2e reads the assistant's files: pass the paths fetch-inputs wrote")
    e2e = e2e_args(spec, paths) if paths is not None else []
    # Without an explicit syntax, evaluate reads the one the data was prepared in (its params.yaml).
    syntax = ["--syntax", spec.command_generator.syntax] if spec.command_generator.syntax else []
    return [
        "evaluate",
        "--data",
        data_prefix,
        "--base-model",
        base_model,
        "--adapter",
        adapter_prefix,
        "--out",
        output_prefix,
        *syntax,
        "--max-new-tokens",
        str(spec.evaluation.max_new_tokens),
        *e2e,
        *scratch,
    ]
