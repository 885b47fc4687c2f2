"""The FinetuneRecipe API: models, generated CRD, samples, and the same rejections on both sides."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ftrecipe.api import RecipeError, load_recipe, parse_recipe
from ftrecipe.api.crd import CRD_FILE, custom_resource_definition, open_api_schema, render_crd_yaml
from support.crd_schema import api_server_violations, apply_defaults, cel_violations

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "recipes").glob("*.yaml"))
Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def crd() -> Manifest:
    return custom_resource_definition()


def minimal() -> Manifest:
    return yaml.safe_load((ROOT / "examples" / "recipes" / "minimal.yaml").read_text())


def full() -> Manifest:
    return yaml.safe_load((ROOT / "examples" / "recipes" / "full.yaml").read_text())


# ------------------------------------------------------------------------------------------ the CRD file


def test_committed_crd_equals_generated() -> None:
    committed = (ROOT / CRD_FILE).read_text()
    assert committed == render_crd_yaml(), "crds/ is stale: run `make crds` and commit the result"


def test_cli_prints_the_crd() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ftrecipe.cli.main", "crd"], capture_output=True, text=True, check=True
    )
    assert result.stdout == render_crd_yaml()


def test_crd_identity(crd: Manifest) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "finetunerecipes.ftrecipe.dev"
    assert spec["group"] == "ftrecipe.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "FinetuneRecipe",
        "listKind": "FinetuneRecipeList",
        "plural": "finetunerecipes",
        "singular": "finetunerecipe",
        "shortNames": ["ftr"],
        "categories": ["ftrecipe"],
    }
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase",
        "Reason": '.status.conditions[?(@.type=="Ready")].reason',
        "Data points": ".status.dataPreparation.summary.numTrainDataPoints",
        "Eval loss": ".status.training.evalLoss",
        "Accuracy": ".status.evaluation.commandAccuracy",
        "E2E pass": ".status.evaluation.e2ePassRate",
        "Age": ".metadata.creationTimestamp",
        "Step": ".status.training.step",
        "Message": ".status.message",
    }


def _printer_columns_resolve(schema: Manifest, json_path: str) -> bool:
    node = schema
    for part in re.sub(r"\[\?\(.*?\)\]", "[]", json_path).strip(".").split("."):
        if part == "metadata":
            return True
        name, is_list = part.removesuffix("[]"), part.endswith("[]")  # conditions[?(@.type=="Ready")]
        node = node.get("properties", {}).get(name)
        if node is None:
            return False
        if is_list:
            node = node.get("items", {})
    return True


def test_printer_columns_point_at_real_fields(crd: Manifest) -> None:
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for column in version["additionalPrinterColumns"]:
        assert _printer_columns_resolve(schema, column["jsonPath"]), column


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        found += _walk(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            found += _walk(node[key], f"{path}[{key}]")
    return found


def test_schema_is_structural() -> None:
    """The rules of a structural schema (k8s.io/apiextensions-apiserver, `structural.go`)."""
    for path, node in _walk(open_api_schema()):
        assert "$ref" not in node and "$defs" not in node, path
        assert "title" not in node and "const" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            assert "type" not in node, path
            continue
        assert "anyOf" not in node and "oneOf" not in node and "allOf" not in node, path
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        if node["type"] == "object" and path != ".metadata":  # the API server owns metadata's schema
            assert not ("properties" in node and "additionalProperties" in node), path
            has_shape = "properties" in node or isinstance(node.get("additionalProperties"), dict)
            assert has_shape or node.get("x-kubernetes-preserve-unknown-fields"), f"{path}: untyped object"
        if node["type"] == "array":
            assert isinstance(node.get("items"), dict), path
        if isinstance(node.get("exclusiveMinimum"), bool):
            assert "minimum" in node, path


def test_every_field_is_described() -> None:
    schema = open_api_schema()
    undocumented = [
        path
        for path, node in _walk(schema)
        if path and not path.endswith("]") and path != ".metadata" and not node.get("description")
    ]
    assert undocumented == []


def test_cel_rules_compile() -> None:
    import celpy

    env = celpy.Environment()
    rules = [r for _, node in _walk(open_api_schema()) for r in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 7
    for rule in rules:
        env.compile(rule["rule"])
        assert rule["message"] and not rule["message"].endswith(".")


# ------------------------------------------------------------------------------------------ samples


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_recipes_are_valid(path: Path, crd: Manifest) -> None:
    manifest = yaml.safe_load(path.read_text())
    assert api_server_violations(crd, manifest) == []
    recipe = load_recipe(path)
    assert recipe.metadata.name == manifest["metadata"]["name"]


def test_full_example_sets_every_spec_field(crd: Manifest) -> None:
    """full.yaml documents the API by example: it must mention every spec field there is."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    manifest = full()["spec"]
    # Fields of the mutually exclusive unions that full.yaml cannot set at once are covered elsewhere.
    exclusive = {"s3", "configMap", "pvc", "local"}
    # minE2EPassRate needs e2e: true, which full.yaml leaves off (its Jobs stay pinned); examples/recipes/e2e.yaml
    # sets both.
    exclusive.add("minE2EPassRate")

    def missing(node: dict[str, Any], value: Any, path: str) -> list[str]:
        if not isinstance(value, dict) or node.get("x-kubernetes-preserve-unknown-fields"):
            return []
        gaps = []
        for name, sub in node.get("properties", {}).items():
            if name in value:
                gaps += missing(sub, value[name], f"{path}.{name}")
            elif name not in exclusive and name not in {"requests", "limits"}:
                gaps.append(f"{path}.{name}")
        return gaps

    assert missing(schema, manifest, "spec") == []


def test_crd_defaults_equal_model_defaults(crd: Manifest) -> None:
    """`kubectl get -o yaml` after the API server defaults must show what the models would use."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    manifest = minimal()
    by_api_server = apply_defaults(schema, manifest)
    by_models = parse_recipe(manifest).model_dump(by_alias=True, exclude_none=True, mode="json")
    assert by_api_server["spec"] == by_models["spec"]
    assert by_models["spec"]["training"]["hyperparameters"]["learningRate"] == 1.0e-4
    assert by_models["spec"]["training"]["lora"]["targetModules"][-1] == "down_proj"


def test_status_round_trips_through_models(crd: Manifest) -> None:
    manifest = minimal()
    manifest["status"] = {
        "phase": "Training",
        "observedGeneration": 2,
        "startedAt": "2026-11-21T10:00:00Z",
        "conditions": [
            {
                "type": "DataPrepared",
                "status": "True",
                "reason": "JobSucceeded",
                "message": "412 data points",
                "lastTransitionTime": "2026-11-21T10:05:00Z",
                "observedGeneration": 2,
            }
        ],
        "dataPreparation": {
            "jobName": "minimal-data-3f2c1e9a",
            "cached": False,
            "datasetURI": "s3://ml-artifacts/ftrecipe/minimal/data-3f2c1e9a/",
            "summary": {"numTrainDataPoints": 330, "numValDataPoints": 82},
        },
        "training": {"step": 40, "totalSteps": 120, "epoch": 1.0, "trainLoss": 0.41, "etaSeconds": 600},
        "evaluation": {"commandAccuracy": 0.93, "perCommand": {"start flow": 0.97}},
    }
    assert api_server_violations(crd, manifest) == []
    dumped = parse_recipe(manifest).model_dump(by_alias=True, exclude_none=True, mode="json")
    assert (
        dumped["status"]["dataPreparation"]["datasetURI"]
        == manifest["status"]["dataPreparation"]["datasetURI"]
    )
    assert dumped["status"]["conditions"][0]["lastTransitionTime"] == "2026-11-21T10:05:00Z"


# ------------------------------------------------------------------------------------------ rejections


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    def mutate(manifest: Manifest) -> None:
        *parents, last = path.split(".")
        node = manifest
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return mutate


def _delete(path: str) -> Callable[[Manifest], None]:
    def mutate(manifest: Manifest) -> None:
        *parents, last = path.split(".")
        node = manifest
        for part in parents:
            node = node[part]
        del node[last]

    return mutate


def _both(*mutations: Callable[[Manifest], None]) -> Callable[[Manifest], None]:
    def mutate(manifest: Manifest) -> None:
        for mutation in mutations:
            mutation(manifest)

    return mutate


# (id, mutation of the minimal recipe, field path the error must name, words of the rule it must state)
INVALID: list[tuple[str, Callable[[Manifest], None], str, str]] = [
    (
        "epochs-not-a-number",
        _set("spec.training.hyperparameters.epochs", "three"),
        "hyperparameters.epochs",
        "whole number",
    ),
    ("epochs-zero", _set("spec.training.hyperparameters.epochs", 0), "hyperparameters.epochs", ">= 1"),
    ("lora-rank-zero", _set("spec.training.lora.r", 0), "spec.training.lora.r", ">= 1"),
    ("lora-dropout-one", _set("spec.training.lora.dropout", 1.0), "lora.dropout", "< 1"),
    ("learning-rate-zero", _set("spec.training.hyperparameters.learningRate", 0), "learningRate", "> 0"),
    ("train-fraction-zero", _set("spec.dataPreparation.trainFraction", 0.0), "trainFraction", "> 0"),
    ("train-fraction-above-one", _set("spec.dataPreparation.trainFraction", 1.5), "trainFraction", "<= 1"),
    ("too-many-rephrases", _set("spec.dataPreparation.numRephrases", 50), "numRephrases", "<= 49"),
    ("negative-gpus", _set("spec.training.gpus", -1), "spec.training.gpus", ">= 0"),
    (
        "unknown-syntax",
        _set("spec.commandGenerator.syntax", "v4"),
        "commandGenerator.syntax",
        "'v1', 'v2' or 'v3'",
    ),
    ("unknown-output-format", _set("spec.dataPreparation.outputFormat", "chatml"), "outputFormat", "one of"),
    ("unknown-method", _set("spec.training.method", "full"), "training.method", "one of"),
    ("unknown-provider", _set("spec.commandGenerator.llm.provider", "anthropic"), "llm.provider", "one of"),
    (
        "two-assistant-sources",
        _set("spec.assistant.source.configMap", {"name": "assistant-files"}),
        "spec.assistant.source",
        "exactly one of s3, configMap, git, pvc, local",
    ),
    ("no-assistant-source", _set("spec.assistant.source", {}), "spec.assistant.source", "exactly one"),
    (
        "two-base-models",
        _set("spec.training.baseModel.local", {"path": "models/llama"}),
        "spec.training.baseModel",
        "exactly one of huggingFace, s3, pvc, local",
    ),
    ("missing-output", _delete("spec.output"), "spec.output", "required"),
    ("missing-training", _delete("spec.training"), "spec.training", "required"),
    ("missing-llm-model", _delete("spec.commandGenerator.llm.model"), "llm.model", "required"),
    ("two-outputs", _set("spec.output.local", {"path": "out"}), "spec.output", "exactly one of s3, local"),
    (
        "literal-api-key",
        _set("spec.commandGenerator.llm.apiKey", "sk-live-123"),
        "commandGenerator.llm",
        "apiKeySecretRef",
    ),
    (
        "literal-hf-token",
        _set("spec.training.baseModel.huggingFace.token", "hf_abc"),
        "huggingFace",
        "tokenSecretRef",
    ),
    (
        "misspelled-field",
        _set("spec.training.hyperparameter", {"epochs": 1}),
        "spec.training",
        "unknown field 'hyperparameter'",
    ),
    (
        "bad-s3-uri",
        _set("spec.output.s3.uri", "https://bucket/prefix"),
        "output.s3.uri",
        "must be an s3://bucket/prefix/ URI (got 'https://bucket/prefix')",
    ),
    (
        "qlora-without-quantization",
        _set("spec.training.method", "qlora"),
        "spec.training",
        "qlora needs quantization",
    ),
    (
        "quantization-without-gpu",
        _both(_set("spec.training.quantization", "4bit"), _set("spec.training.gpus", 0)),
        "spec.training",
        "needs gpus >= 1",
    ),
    (
        "llm-annotator-without-llm",
        _delete("spec.commandGenerator.llm"),
        "spec",
        "annotator llm needs commandGenerator.llm",
    ),
    (
        "rephrasing-without-llm",
        _both(_delete("spec.commandGenerator.llm"), _set("spec.dataPreparation.annotator", "assertions")),
        "spec",
        "numRephrases > 0 needs commandGenerator.llm",
    ),
    (
        "self-hosted-without-api-base",
        _set("spec.commandGenerator.llm.provider", "self-hosted"),
        "commandGenerator.llm",
        "needs apiBase",
    ),
    (
        "azure-without-api-version",
        _both(
            _set("spec.commandGenerator.llm.provider", "azure"),
            _set("spec.commandGenerator.llm.apiBase", "https://x.openai.azure.com"),
        ),
        "commandGenerator.llm",
        "apiVersion",
    ),
    (
        "bad-quantity",
        _set("spec.training.resources", {"limits": {"memory": "lots"}}),
        "limits.memory",
        "resource quantity",
    ),
    ("empty-target-modules", _set("spec.training.lora.targetModules", []), "targetModules", "at least 1"),
    # What vLLM would refuse to serve (facts from vLLM's source, docs/training.md).
    ("lora-rank-above-vllm", _set("spec.training.lora.r", 640), "spec.training.lora.r", "must be <= 512"),
    (
        "lm-head-target",
        _set("spec.training.lora.targetModules", ["q_proj", "lm_head"]),
        "spec.training.lora.targetModules[1]",
        "lm_head cannot carry a LoRA that vLLM serves",
    ),
    (
        "embed-tokens-target",
        _set("spec.training.lora.targetModules", ["model.embed_tokens"]),
        "targetModules[0]",
        "remove it from targetModules",
    ),
    ("lora-bias", _set("spec.training.lora.bias", "all"), "spec.training.lora", "use bias: none"),
    ("temperature-too-high", _set("spec.commandGenerator.llm.temperature", 3), "temperature", "<= 2"),
    ("bad-queue-name", _set("spec.queueName", "GPU Queue"), "queueName", "lowercase name"),
    (
        "endpoints-without-config",
        _set("spec.assistant.endpoints", "endpoints.yml"),
        "assistant",
        "endpoints is only read together with config",
    ),
    (
        "e2e-gate-without-e2e",
        _set("spec.evaluation.minE2EPassRate", 0.8),
        "spec.evaluation",
        "evaluation.minE2EPassRate needs evaluation.e2e: true",
    ),
    (
        "e2e-gate-above-one",
        _both(_set("spec.evaluation.e2e", True), _set("spec.evaluation.minE2EPassRate", 1.5)),
        "evaluation.minE2EPassRate",
        "<= 1",
    ),
]


@pytest.mark.parametrize(("case", "mutate", "where", "rule"), INVALID, ids=[c[0] for c in INVALID])
def test_models_reject_with_one_clear_line(
    case: str, mutate: Callable[[Manifest], None], where: str, rule: str
) -> None:
    manifest = minimal()
    mutate(manifest)
    with pytest.raises(RecipeError) as caught:
        parse_recipe(manifest, "recipe.yaml")
    lines = caught.value.lines
    assert all("\n" not in line and line.startswith("recipe.yaml: ") for line in lines)
    assert any(where in line and rule in line for line in lines), lines
    assert "Traceback" not in str(caught.value)
    assert "sk-live-123" not in str(caught.value) and "hf_abc" not in str(caught.value)


@pytest.mark.parametrize(("case", "mutate", "where", "rule"), INVALID, ids=[c[0] for c in INVALID])
def test_crd_rejects_the_same(
    case: str, mutate: Callable[[Manifest], None], where: str, rule: str, crd: Manifest
) -> None:
    manifest = minimal()
    mutate(manifest)
    assert api_server_violations(crd, manifest) != []


def test_invalid_cases_are_many_and_distinct() -> None:
    assert len(INVALID) >= 20
    assert len({case for case, *_ in INVALID}) == len(INVALID)


def test_the_valid_base_of_every_invalid_case_passes(crd: Manifest) -> None:
    """Guards the rejection tests: they fail because of their mutation, not because the base is broken."""
    assert api_server_violations(crd, minimal()) == []
    parse_recipe(minimal())


def test_cel_rules_agree_with_model_rules_on_valid_variants(crd: Manifest) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    manifest = minimal()
    manifest["spec"]["dataPreparation"] = {"annotator": "assertions", "numRephrases": 0}
    del manifest["spec"]["commandGenerator"]["llm"]
    manifest["spec"]["training"].update({"method": "qlora", "quantization": "8bit", "gpus": 2})
    assert cel_violations(schema, apply_defaults(schema, manifest)) == []
    parse_recipe(manifest)
    # The labelling LLM may come from the assistant's own config.yml / endpoints.yml instead.
    from_config = minimal()
    del from_config["spec"]["commandGenerator"]["llm"]
    from_config["spec"]["assistant"].update({"config": "config.yml", "endpoints": "endpoints.yml"})
    from_config["spec"]["dataPreparation"] = {"annotator": "llm", "numRephrases": 3}
    assert cel_violations(schema, apply_defaults(schema, from_config)) == []
    parse_recipe(from_config)
    # The E2E gate with the E2E evaluation it gates on.
    gated = minimal()
    gated["spec"]["evaluation"] = {"e2e": True, "minE2EPassRate": 0.9}
    assert cel_violations(schema, apply_defaults(schema, gated)) == []
    assert parse_recipe(gated).spec.evaluation.min_e2e_pass_rate == 0.9


# ------------------------------------------------------------------------------------------ files and CLI


def test_load_recipe_reports_yaml_errors_with_a_line(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("apiVersion: ftrecipe.dev/v1alpha1\nkind: FinetuneRecipe\nspec:\n  training: [a\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    (line,) = caught.value.lines
    assert line.startswith(f"{path}: line ") and "invalid YAML" in line


def test_load_recipe_picks_the_recipe_among_other_documents(tmp_path: Path) -> None:
    path = tmp_path / "bundle.yaml"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "openai"}}
    path.write_text(yaml.safe_dump_all([secret, minimal()]))
    assert load_recipe(path).metadata.name == "minimal"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "found no"),
        ("apiVersion: v1\nkind: ConfigMap\n", "found no"),
    ],
)
def test_load_recipe_without_a_recipe(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_wrong_api_version_is_named() -> None:
    manifest = minimal()
    manifest["apiVersion"] = "ftrecipe.dev/v1"
    with pytest.raises(RecipeError, match=re.escape("expected apiVersion ftrecipe.dev/v1alpha1")):
        parse_recipe(manifest, "r.yaml")


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(tmp_path / "nope.yaml")
    assert caught.value.lines == [
        f"{tmp_path / 'nope.yaml'}: cannot read the recipe: No such file or directory"
    ]


def test_validate_command_exit_codes(tmp_path: Path) -> None:
    bad = copy.deepcopy(minimal())
    bad["spec"]["training"]["lora"] = {"r": 0}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    ok = subprocess.run(
        [sys.executable, "-m", "ftrecipe.cli.main", "validate", str(EXAMPLES[0])],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "valid FinetuneRecipe" in ok.stdout
    failed = subprocess.run(
        [sys.executable, "-m", "ftrecipe.cli.main", "validate", str(path)], capture_output=True, text=True
    )
    assert failed.returncode == 2
    assert failed.stderr.strip() == f"{path}: spec.training.lora.r: must be >= 1 (got 0)"


def test_json_schema_of_spec_is_usable_by_editors() -> None:
    """Editors (yaml-language-server) can use the CRD schema as JSON Schema; it must be a valid one."""
    jsonschema.Draft4Validator.check_schema(open_api_schema())


@pytest.mark.parametrize("kubernetes_version", ["1.29", "1.31", "1.33"])
def test_crd_is_a_valid_kubernetes_object(kubernetes_version: str, crd: Manifest) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(crd, kubernetes_version, strict=True)
