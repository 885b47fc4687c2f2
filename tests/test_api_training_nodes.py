"""spec.training.nodes and spec.training.parallelism (issue 22): the fields, their validation on both
sides (models and the API server's CRD), and their place in the phase hashes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.api import RecipeError, parse_recipe
from ftrecipe.api.crd import custom_resource_definition
from ftrecipe.phases.inputs import load_spec, spec_json, training_config
from ftrecipe.plan.cache_key import phase_hashes
from support.crd_schema import api_server_violations, apply_defaults

ROOT = Path(__file__).resolve().parents[1]
Manifest = dict[str, Any]

# The pinned hashes of examples/recipes/minimal.yaml (tests/test_phase_hashes_pinned.py), written again
# here: a recipe leaving nodes and parallelism at their defaults must keep exactly these.
MINIMAL_HASHES = {
    "data": "4c09037d54c72f3381d57da85f2987505921c6aca08154ffd7a49117954d9a7f",
    "train": "0c5185b42170e1594403af18506dd0ac8c30b53b9e24dd579da50d76e5741a09",
    "evaluate": "f2bb9672e46523e483492fe196300ffeab0504eeb6174f8d3570361f1a7c052c",
}
VERSION = "0.1.0"


@pytest.fixture(scope="module")
def crd() -> Manifest:
    return custom_resource_definition()


def minimal(**training: Any) -> Manifest:
    manifest: Manifest = yaml.safe_load((ROOT / "examples" / "recipes" / "minimal.yaml").read_text())
    manifest["spec"]["training"].update(training)
    return manifest


def hashes(**training: Any) -> dict[str, str]:
    return phase_hashes(parse_recipe(minimal(**training)).spec, version=VERSION)


# ------------------------------------------------------------------------------------------ the fields


def test_defaults_are_one_node_and_ddp(crd: Manifest) -> None:
    training = parse_recipe(minimal()).spec.training
    assert (training.nodes, training.parallelism) == (1, "ddp")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    defaulted = apply_defaults(schema, minimal())
    assert defaulted["spec"]["training"]["nodes"] == 1
    assert defaulted["spec"]["training"]["parallelism"] == "ddp"


def test_crd_describes_both_fields(crd: Manifest) -> None:
    training = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "training"
    ]["properties"]
    assert training["nodes"]["type"] == "integer"
    assert (training["nodes"]["minimum"], training["nodes"]["maximum"]) == (1, 64)
    assert training["parallelism"]["enum"] == ["ddp", "fsdp"]
    assert "JobSet" in training["nodes"]["description"]
    assert "shards" in training["parallelism"]["description"]


@pytest.mark.parametrize(
    ("training", "loaded"),
    [
        ({"nodes": 2}, (2, "ddp")),
        ({"nodes": 4, "gpus": 8}, (4, "ddp")),
        ({"nodes": 64}, (64, "ddp")),
        ({"parallelism": "fsdp", "gpus": 2}, (1, "fsdp")),
        ({"nodes": 2, "parallelism": "fsdp"}, (2, "fsdp")),
    ],
)
def test_valid_values_pass_both_sides(
    training: dict[str, Any], loaded: tuple[int, str], crd: Manifest
) -> None:
    manifest = minimal(**training)
    assert api_server_violations(crd, manifest) == []
    spec = parse_recipe(manifest).spec
    assert (spec.training.nodes, spec.training.parallelism) == loaded


# (id, training fields, field path the error names, words of the rule)
INVALID = [
    ("nodes-zero", {"nodes": 0}, "spec.training.nodes", ">= 1"),
    ("nodes-above-bound", {"nodes": 65}, "spec.training.nodes", "<= 64"),
    ("nodes-not-a-number", {"nodes": "two"}, "spec.training.nodes", "whole number"),
    ("unknown-parallelism", {"parallelism": "tp"}, "spec.training.parallelism", "'ddp' or 'fsdp'"),
    (
        "nodes-without-gpus",
        {"nodes": 2, "gpus": 0},
        "spec.training",
        "nodes >= 2 (multi-node training) needs gpus >= 1 on each node: set gpus, or nodes: 1",
    ),
]


@pytest.mark.parametrize(("case", "training", "where", "rule"), INVALID, ids=[c[0] for c in INVALID])
def test_models_reject_with_one_clear_line(
    case: str, training: dict[str, Any], where: str, rule: str
) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(minimal(**training), "recipe.yaml")
    lines = caught.value.lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("recipe.yaml: ") and where in lines[0] and rule in lines[0], lines


@pytest.mark.parametrize(("case", "training", "where", "rule"), INVALID, ids=[c[0] for c in INVALID])
def test_crd_rejects_the_same(
    case: str, training: dict[str, Any], where: str, rule: str, crd: Manifest
) -> None:
    violations = api_server_violations(crd, minimal(**training))
    assert violations != []
    if case == "nodes-without-gpus":  # the CEL rule states the same line as the model
        assert any(rule in violation for violation in violations), violations


# ------------------------------------------------------------------------------------------ phase hashes


def test_defaults_keep_the_pinned_hashes() -> None:
    assert hashes() == MINIMAL_HASHES
    # Written out (as `kubectl get -o yaml` shows them after defaulting): still the same.
    assert hashes(nodes=1, parallelism="ddp") == MINIMAL_HASHES


@pytest.mark.parametrize(
    "training",
    [{"nodes": 2}, {"nodes": 4}, {"parallelism": "fsdp"}, {"nodes": 2, "parallelism": "fsdp"}],
    ids=["nodes-2", "nodes-4", "fsdp", "nodes-2-fsdp"],
)
def test_non_default_values_change_train_and_evaluate_only(training: dict[str, Any]) -> None:
    after = hashes(**training)
    assert after["data"] == MINIMAL_HASHES["data"]
    assert after["train"] != MINIMAL_HASHES["train"]
    assert after["evaluate"] != MINIMAL_HASHES["evaluate"]  # it evaluates the adapter training made


def test_each_non_default_value_is_its_own_train_hash() -> None:
    trains = {
        hashes(**training)["train"]
        for training in (
            {},
            {"nodes": 2},
            {"nodes": 4},
            {"parallelism": "fsdp"},
            {"nodes": 2, "parallelism": "fsdp"},
        )
    }
    assert len(trains) == 5


# ------------------------------------------------------------------------------------------ what Jobs carry


def test_jobs_carry_the_fields_only_when_not_default() -> None:
    """FTRECIPE_SPEC and training.yml of an existing recipe stay byte for byte what they were (the golden
    files pin them); a multi-node or fsdp recipe carries its values to the pod."""
    default = parse_recipe(minimal()).spec
    assert '"nodes"' not in spec_json(default) and '"parallelism"' not in spec_json(default)
    assert "nodes" not in training_config(default) and "parallelism" not in training_config(default)
    multi = parse_recipe(minimal(nodes=2, parallelism="fsdp")).spec
    assert '"nodes":2' in spec_json(multi) and '"parallelism":"fsdp"' in spec_json(multi)
    assert training_config(multi)["nodes"] == 2
    assert training_config(multi)["parallelism"] == "fsdp"
    # The pod parses what it got back into the same spec.
    assert load_spec(spec_json(multi)) == multi
    assert load_spec(spec_json(default)) == default
