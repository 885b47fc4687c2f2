"""Content-addressed phase outputs: a phase whose inputs are unchanged is reused, not re-run.

Each phase writes to `<output>/<recipe>/<phase>-<hash>/`. The hash covers everything that changes the
phase's result — the spec fields it reads, the digests of its input files when known, the hash of the phase
it consumes, and ftrecipe's major.minor version — and nothing else: suspending a recipe, moving it to
another queue or giving a Job more memory must never cost an hour of GPU time again.

Because the version and every defaulted field are in the hash, an upgraded operator computes other hashes
for an unchanged recipe. The operator therefore plans with the hashes the recipe's status recorded
(`status.plannedWith`, see `ftrecipe.plan.status.planned_hashes`) until its spec's generation changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from ftrecipe import __version__
from ftrecipe.api.v1alpha1 import FinetuneRecipeSpec, added_later_at_default
from ftrecipe.hashing import stable_hash

Phase = Literal["data", "train", "evaluate"]
PHASES: tuple[Phase, ...] = ("data", "train", "evaluate")
HASH_LENGTH = 12  # hex digits in a prefix: enough to never collide within one recipe's history

# Spec fields (camelCase paths) that never change a phase's result. Everything else under a phase's
# sections counts, so a field added to the API is safe by default: it invalidates until listed here.
IRRELEVANT: dict[Phase, tuple[str, ...]] = {
    "data": (
        "commandGenerator.llm.timeoutSeconds",
        "commandGenerator.llm.apiKeySecretRef",
        "dataPreparation.rephraser.llm.timeoutSeconds",
        "dataPreparation.rephraser.llm.apiKeySecretRef",
        "dataPreparation.concurrency",
        "dataPreparation.resources",
        "dataPreparation.secretEnv",
        "assistant.source.git.credentialsSecretRef",
        "assistant.source.s3.credentialsSecretRef",
        "assistant.source.s3.endpoint",
        "assistant.source.s3.region",
        "assistant.source.s3.forcePathStyle",
    ),
    "train": (
        "training.resources",
        "training.nodeSelector",
        "training.tolerations",
        "training.affinity",
        "training.priorityClassName",
        "training.runtimeClassName",
        "training.gpuResourceName",
        "training.terminationGracePeriodSeconds",
        "training.modelCache",
        "training.activeDeadlineSeconds",
        "training.checkpointEverySteps",
        "training.baseModel.huggingFace.tokenSecretRef",
        "training.baseModel.s3.credentialsSecretRef",
        "training.baseModel.s3.endpoint",
        "training.baseModel.s3.region",
        "training.baseModel.s3.forcePathStyle",
    ),
    "evaluate": (
        "evaluation.minCommandAccuracy",
        "evaluation.minE2EPassRate",
        "evaluation.enabled",
        "evaluation.resources",
    ),
}
# The spec sections each phase reads.
SECTIONS: dict[Phase, tuple[str, ...]] = {
    "data": ("assistant", "commandGenerator", "dataPreparation"),
    "train": ("training",),
    "evaluate": ("evaluation",),
}
UPSTREAM: dict[Phase, Phase | None] = {"data": None, "train": "data", "evaluate": "train"}


def _without(tree: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(last, None)


def phase_inputs(spec: FinetuneRecipeSpec, phase: Phase) -> dict[str, Any]:
    """The part of the spec that determines `phase`'s result, as plain JSON data. A field added to the API
    later (`ADDED_LATER`) counts only when it differs from what recipes had before it (e.g. training.nodes
    and training.parallelism change the global batch and the numerics of training; at 1 and ddp they are
    left out, so existing recipes keep their hashes)."""
    dumped = spec.model_dump(
        by_alias=True, exclude_none=True, mode="json", exclude=added_later_at_default(spec)
    )
    chosen = {section: dumped[section] for section in SECTIONS[phase] if section in dumped}
    for dotted in IRRELEVANT[phase]:
        _without(chosen, dotted)
    return chosen


def version_series(version: str = __version__) -> str:
    """major.minor: a patch release must not invalidate hours of finished work."""
    parts = version.split(".")
    return ".".join(parts[:2])


def phase_hashes(
    spec: FinetuneRecipeSpec,
    *,
    input_digests: Mapping[Phase, Mapping[str, str]] | None = None,
    version: str = __version__,
) -> dict[Phase, str]:
    """The hash of every phase, each including the hash of the phase it consumes.

    `input_digests` adds what the spec cannot say by itself, e.g. `{"data": {"e2e_tests/a.yml": sha256}}`
    when the assistant's files can be read (a local run), so an edited test re-runs data preparation.
    """
    hashes: dict[Phase, str] = {}
    for phase in PHASES:
        upstream = UPSTREAM[phase]
        hashes[phase] = stable_hash(
            {
                "phase": phase,
                "spec": phase_inputs(spec, phase),
                "files": dict(sorted((input_digests or {}).get(phase, {}).items())),
                "upstream": hashes[upstream] if upstream else None,
                "version": version_series(version),
            }
        )
    return hashes


def phase_prefix(output_root: str, recipe: str, phase: Phase, full_hash: str) -> str:
    """`<output>/<recipe>/<phase>-<hash>/`, the folder or S3 prefix a phase's bundle is published to."""
    return f"{output_root.rstrip('/')}/{recipe}/{phase}-{full_hash[:HASH_LENGTH]}/"
