"""The phase cache key: stable, sensitive to every input that changes a result, blind to the rest."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.api import parse_recipe
from ftrecipe.hashing import stable_hash
from ftrecipe.plan.cache_key import (
    PHASES,
    phase_hashes,
    phase_inputs,
    phase_prefix,
    version_series,
)

FULL = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "full.yaml"


def manifest() -> dict[str, Any]:
    return yaml.safe_load(FULL.read_text())


def hashes(changes: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, str]:
    data = manifest()
    for dotted, value in (changes or {}).items():
        *parents, last = dotted.split(".")
        node = data["spec"]
        for part in parents:
            node = node.setdefault(part, {})
        if value is _DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return phase_hashes(parse_recipe(data).spec, **kwargs)


_DELETE = object()
BASE = hashes()


def test_stable_across_calls_and_key_order() -> None:
    assert hashes() == BASE
    assert stable_hash({"b": 1, "a": [1, {"y": 2, "x": 3}]}) == stable_hash(
        {"a": [1, {"x": 3, "y": 2}], "b": 1}
    )
    assert len(set(BASE.values())) == 3
    # A golden value: the canonical form must not drift between releases or machines.
    assert (
        stable_hash({"c": [1.5, None, True], "b": "é", "a": 1})
        == "d4b8adeb7863cd3948d7e9216f34c58a71c27fdd9d624a86fb976cf029770585"
    )


# (field changed, phases whose hash must change); later phases include earlier ones' hashes.
RELEVANT = [
    ("assistant.source.git.revision", {"data", "train", "evaluate"}),
    ("assistant.source.git.url", {"data", "train", "evaluate"}),
    ("assistant.e2eTests", {"data", "train", "evaluate"}),
    ("commandGenerator.syntax", {"data", "train", "evaluate"}),
    ("commandGenerator.promptTemplate", {"data", "train", "evaluate"}),
    ("commandGenerator.llm.model", {"data", "train", "evaluate"}),
    ("commandGenerator.llm.temperature", {"data", "train", "evaluate"}),
    ("dataPreparation.numRephrases", {"data", "train", "evaluate"}),
    ("dataPreparation.seed", {"data", "train", "evaluate"}),
    ("dataPreparation.trainFraction", {"data", "train", "evaluate"}),
    ("dataPreparation.outputFormat", {"data", "train", "evaluate"}),
    ("dataPreparation.rephraser.llm.model", {"data", "train", "evaluate"}),
    ("training.baseModel.huggingFace.revision", {"train", "evaluate"}),
    ("training.hyperparameters.learningRate", {"train", "evaluate"}),
    ("training.hyperparameters.epochs", {"train", "evaluate"}),
    ("training.lora.r", {"train", "evaluate"}),
    ("training.quantization", {"train", "evaluate"}),
    ("training.gpus", {"train", "evaluate"}),  # the global batch is batch × accumulation × GPUs
    ("evaluation.maxNewTokens", {"evaluate"}),
]
NEW_VALUES: dict[str, Any] = {
    "assistant.source.git.revision": "0000000000000000000000000000000000000000",
    "assistant.source.git.url": "https://github.com/example-org/other.git",
    "assistant.e2eTests": ["e2e_tests"],
    "commandGenerator.syntax": "v1",
    "commandGenerator.promptTemplate": "prompts/other.jinja2",
    "commandGenerator.llm.model": "gpt-4o-2024-08-06",
    "commandGenerator.llm.temperature": 0.3,
    "dataPreparation.numRephrases": 5,
    "dataPreparation.seed": 1,
    "dataPreparation.trainFraction": 0.7,
    "dataPreparation.outputFormat": "instruction",
    "dataPreparation.rephraser.llm.model": "gpt-4.1-mini",
    "training.baseModel.huggingFace.revision": "main",
    "training.hyperparameters.learningRate": 2.0e-4,
    "training.hyperparameters.epochs": 2,
    "training.lora.r": 32,
    "training.quantization": "8bit",
    "training.gpus": 2,
    "evaluation.maxNewTokens": 128,
}


@pytest.mark.parametrize(("field", "changed"), RELEVANT, ids=[f for f, _ in RELEVANT])
def test_relevant_fields_change_their_phase_and_downstream(field: str, changed: set[str]) -> None:
    after = hashes({field: NEW_VALUES[field]})
    assert {phase for phase in PHASES if after[phase] != BASE[phase]} == changed


IRRELEVANT = [
    ("suspend", True),
    ("queueName", "other-queue"),
    ("images.trainer", "ghcr.io/example-org/ftrecipe-trainer:0.1.1"),
    ("output.s3.uri", "s3://elsewhere/prefix/"),
    ("dataPreparation.concurrency", 64),
    ("dataPreparation.resources", {"limits": {"memory": "32Gi"}}),
    ("commandGenerator.llm.timeoutSeconds", 300),
    ("commandGenerator.llm.apiKeySecretRef", {"name": "other", "key": "k"}),
    ("assistant.source.git.credentialsSecretRef", {"name": "other"}),
    ("training.resources", {"limits": {"memory": "200Gi"}}),
    ("training.nodeSelector", {"pool": "h100"}),
    ("training.tolerations", []),
    ("training.affinity", _DELETE),
    ("training.priorityClassName", "urgent"),
    ("training.activeDeadlineSeconds", 7200),
    ("training.checkpointEverySteps", 50),
    ("training.baseModel.huggingFace.tokenSecretRef", {"name": "hf2", "key": "t"}),
    ("evaluation.minCommandAccuracy", 0.99),
]


@pytest.mark.parametrize(("field", "value"), IRRELEVANT, ids=[f for f, _ in IRRELEVANT])
def test_irrelevant_fields_change_nothing(field: str, value: Any) -> None:
    assert hashes({field: value}) == BASE


def test_input_file_digests_count_for_their_phase() -> None:
    with_file = hashes(input_digests={"data": {"e2e_tests/a.yml": "1" * 64}})
    edited = hashes(input_digests={"data": {"e2e_tests/a.yml": "2" * 64}})
    assert with_file["data"] != BASE["data"]
    assert edited["data"] != with_file["data"]
    assert edited["train"] != with_file["train"]
    reordered = hashes(input_digests={"data": {"b": "x", "a": "y"}})
    assert reordered == hashes(input_digests={"data": {"a": "y", "b": "x"}})


def test_only_major_minor_of_the_version_counts() -> None:
    assert version_series("1.4.2") == "1.4"
    assert hashes(version="0.1.0") == hashes(version="0.1.7")
    assert hashes(version="0.2.0")["data"] != hashes(version="0.1.0")["data"]


def test_secrets_never_enter_the_hashed_inputs() -> None:
    inputs = str(phase_inputs(parse_recipe(manifest()).spec, "data")) + str(
        phase_inputs(parse_recipe(manifest()).spec, "train")
    )
    assert "SecretRef" not in inputs


def test_prefix_layout() -> None:
    assert (
        phase_prefix("s3://b/ftrecipe/", "support", "train", "ab" * 32)
        == "s3://b/ftrecipe/support/train-abababababab/"
    )
    assert phase_prefix("/data/out", "r", "data", BASE["data"]).startswith("/data/out/r/data-")


def test_defaults_written_out_or_left_to_defaulting_hash_the_same() -> None:
    """`kubectl get -o yaml` shows defaults the user never wrote; the hash must not care."""
    data = manifest()
    defaulted = parse_recipe(copy.deepcopy(data)).model_dump(by_alias=True, exclude_none=True, mode="json")
    assert phase_hashes(parse_recipe(defaulted).spec) == BASE
