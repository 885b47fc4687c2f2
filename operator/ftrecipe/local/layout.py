"""A recipe on one machine: its `local` paths resolved against the recipe file, the work folder, the
environment each phase gets, and digests of the local inputs the spec cannot describe.

Sources that make sense on a laptop: the assistant from a local folder (or git, or S3, fetched like the
Job's init container does), the base model from a local folder, the Hugging Face hub or S3, the output to a
local folder or S3. Cluster-only sources (configMap, pvc) get one line saying what to use instead. Secrets
are never read from the recipe: API keys, AWS and hub credentials come from this process's environment.

The phase hashes here include the digests of the local files (the assistant's YAML and templates, the base
model's files), so editing an E2E test re-runs data preparation although the spec did not change. They
name the bundles (`<output>/<recipe>/<phase>-<hash>/`); the planner keeps planning on the spec alone.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ftrecipe.api.v1alpha1 import FinetuneRecipe, FinetuneRecipeSpec, S3Location
from ftrecipe.phases.commands import base_model_arg
from ftrecipe.plan.cache_key import HASH_LENGTH, Phase, phase_hashes, phase_prefix

WORKDIR_FOLDER: Final = ".ftrecipe"  # the default work folder, next to the recipe file: .ftrecipe/<name>/
STATUS_FILE: Final = "status.yaml"
# What prepare-data reads from an assistant (flows, domain, tests, configs) and prompt templates.
DATA_SUFFIXES: Final = frozenset({".yml", ".yaml", ".jinja2", ".jinja", ".j2"})
# Files above this size (model weights) are fingerprinted by size and modification time, not read.
READ_LIMIT: Final = 64 * 1024 * 1024


class LocalRunError(Exception):
    """A recipe that cannot run on this machine; the message is one line naming the field and the fix."""


@dataclass(frozen=True)
class LocalRecipe:
    """Everything a local run needs to know about the recipe, resolved once."""

    file: Path  # the recipe file
    name: str
    spec: FinetuneRecipeSpec
    generation: int
    workdir: Path
    assistant: Path | None  # the local assistant folder; None: fetched from git or S3 when read
    base_model: str  # `--base-model` of train and evaluate: a folder, hf:ID[@REV] or s3://
    output_root: str  # a folder or an s3:// prefix; bundles go to <output_root>/<name>/<phase>-<hash>/
    env: Mapping[Phase, Mapping[str, str]]  # S3 settings the spec names, as the variables boto3 reads
    hashes: Mapping[Phase, str]  # the planner's phase hashes (spec only)
    bundle_hashes: Mapping[Phase, str]  # the same with the local inputs' digests: they name the bundles
    prefixes: Mapping[Phase, str]

    @property
    def status_file(self) -> Path:
        return self.workdir / STATUS_FILE

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache"

    def run_dir(self, phase: Phase) -> Path:
        """The phase's own folder: its inputs, termination report, output log and scratch."""
        return self.workdir / "runs" / f"{phase}-{self.bundle_hashes[phase][:HASH_LENGTH]}"


def _shown(path: Path) -> str:
    """A path as people would type it: relative to the current folder when below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def s3_env(location: S3Location) -> dict[str, str]:
    """The store settings a recipe names, as the variables `S3Settings.from_env` and boto3 read (the Job
    sets the same ones); credentials stay whatever this process's environment holds."""
    env: dict[str, str] = {}
    if location.endpoint is not None:
        env["AWS_ENDPOINT_URL"] = location.endpoint
    if location.region is not None:
        env["AWS_REGION"] = location.region
    if location.force_path_style:
        env["FTRECIPE_S3_ADDRESSING_STYLE"] = "path"
    return env


def _assistant(spec: FinetuneRecipeSpec, file: Path) -> Path | None:
    source = spec.assistant.source
    where = f"{file}: spec.assistant"
    if source.config_map is not None or source.pvc is not None:
        kind = "configMap" if source.config_map is not None else "pvc"
        raise LocalRunError(
            f"{where}.source.{kind} exists only in a cluster; with `ftrecipe run` use local, git or s3"
        )
    if source.local is None:
        return None  # git or s3: fetched when a phase reads it (data; evaluate with evaluation.e2e)
    folder = (file.parent / source.local.path).resolve()
    if not folder.is_dir():
        raise LocalRunError(
            f"{where}.source.local.path: {_shown(folder)} is not a folder "
            "(paths are relative to the recipe file)"
        )
    for index, tests in enumerate(spec.assistant.e2e_tests):
        if not (folder / tests).exists():
            raise LocalRunError(
                f"{where}.e2eTests[{index}]: {tests!r} is not in the assistant folder {_shown(folder)}"
            )
    return folder


def _one_node(spec: FinetuneRecipeSpec, file: Path) -> None:
    nodes = spec.training.nodes
    if nodes >= 2:
        raise LocalRunError(
            f"{file}: spec.training.nodes: {nodes} nodes need a cluster; `ftrecipe run` trains on this one "
            "machine: set nodes: 1 here, or run the recipe with the operator (it trains on several nodes "
            "with a JobSet)"
        )


def _base_model(spec: FinetuneRecipeSpec, file: Path) -> str:
    base = spec.training.base_model
    where = f"{file}: spec.training.baseModel"
    if base.pvc is not None:
        raise LocalRunError(
            f"{where}.pvc exists only in a cluster; with `ftrecipe run` use local, huggingFace or s3"
        )
    if base.hugging_face is not None:
        return base_model_arg(spec)
    if base.s3 is not None:
        output = spec.output.s3
        if output is not None and s3_env(base.s3) and s3_env(base.s3) != s3_env(output):
            raise LocalRunError(
                f"{where}.s3 must be on the output store (same endpoint, region and path style as "
                "spec.output.s3, or leave those empty): train and evaluate get one set of S3 settings"
            )
        return base.s3.uri
    assert base.local is not None
    folder = (file.parent / base.local.path).resolve()
    if not (folder / "config.json").is_file():
        what = "is not a saved model folder (no config.json)" if folder.is_dir() else "does not exist"
        raise LocalRunError(
            f"{where}.local.path: {_shown(folder)} {what}; point it at a save_pretrained folder, or build "
            f"the offline tiny model there with `ftrecipe make-tiny-model {_shown(folder)}`"
        )
    return str(folder)


def _phase_env(spec: FinetuneRecipeSpec) -> dict[Phase, dict[str, str]]:
    output = s3_env(spec.output.s3) if spec.output.s3 is not None else {}
    base = spec.training.base_model.s3
    model = output if spec.output.s3 is not None or base is None else s3_env(base)
    return {"data": output, "train": model, "evaluate": model}


def _files(root: Path, skip: tuple[Path, ...]) -> Iterator[Path]:
    """Files below ``root`` in a stable order, without hidden folders or files (.git, .rasa, .ftrecipe)
    and without anything under ``skip``."""
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not any(_under(here / d, s) for s in skip)
        )
        for name in sorted(names):
            path = here / name
            if not name.startswith(".") and not any(_under(path, s) for s in skip):
                yield path


def file_digest(path: Path) -> str:
    """sha256 of the file, or its size and modification time when it is too big to read every run."""
    info = path.stat()
    if info.st_size > READ_LIMIT:
        return f"size={info.st_size},mtime_ns={info.st_mtime_ns}"
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_digests(
    assistant: Path | None, base_model: Path | None, skip: tuple[Path, ...]
) -> dict[Phase, dict[str, str]]:
    """What the spec cannot say about local inputs: the assistant's YAML and templates (data), the base
    model's files (train). ``skip`` holds the recipe file and the run's own folders."""
    digests: dict[Phase, dict[str, str]] = {}
    if assistant is not None:
        digests["data"] = {
            str(path.relative_to(assistant)): file_digest(path)
            for path in _files(assistant, skip)
            if path.suffix in DATA_SUFFIXES
        }
    if base_model is not None:
        digests["train"] = {
            f"baseModel/{path.relative_to(base_model)}": file_digest(path)
            for path in _files(base_model, skip)
        }
    return digests


def resolve(recipe: FinetuneRecipe, file: Path, workdir: Path | None = None) -> LocalRecipe:
    """The recipe's local paths, work folder, phase environments, hashes and bundle prefixes.
    Raises LocalRunError (one line) for what cannot run here."""
    file = file.resolve()
    name = recipe.metadata.name
    if not name:
        raise LocalRunError(
            f"{file}: metadata.name: required; it names the output folder, e.g. name: my-assistant"
        )
    spec = recipe.spec
    _one_node(spec, file)
    assistant = _assistant(spec, file)
    base_model = _base_model(spec, file)
    if spec.output.local is not None:
        output_root = str((file.parent / spec.output.local.path).resolve())
    else:
        assert spec.output.s3 is not None
        output_root = spec.output.s3.uri
    folder = (workdir if workdir is not None else file.parent / WORKDIR_FOLDER / name).resolve()
    skip = (file, folder, Path(output_root)) if spec.output.local is not None else (file, folder)
    model_folder = Path(base_model) if spec.training.base_model.local is not None else None
    bundle_hashes = phase_hashes(spec, input_digests=input_digests(assistant, model_folder, skip))
    generation = getattr(recipe.metadata, "generation", None)
    return LocalRecipe(
        file=file,
        name=name,
        spec=spec,
        generation=generation if isinstance(generation, int) and generation >= 0 else 1,
        workdir=folder,
        assistant=assistant,
        base_model=base_model,
        output_root=output_root,
        env=_phase_env(spec),
        hashes=phase_hashes(spec),
        bundle_hashes=bundle_hashes,
        prefixes={phase: phase_prefix(output_root, name, phase, h) for phase, h in bundle_hashes.items()},
    )
