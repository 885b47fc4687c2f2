"""The adapter bundle is servable as its model card says: `vllm serve …` checked against vLLM's LoRA loader.

vLLM is not installable here, so its requirements are written down below, each with where it was read in
vLLM's source, and checked over bundles from real `ftrecipe train` runs of the tiny Llama:

- the demo: prepare-data on the MoneyBank example (its config.yml names the generator) feeding training
  on `hf:ORG/NAME@REVISION` (the tiny model in an offline Hugging Face cache), LoRA rank 20;
- a base model without a chat template, where ftrecipe adds one and vLLM must be told to use it.

The Rasa snippet is parsed as an endpoints.yml model group with the keys Rasa's self-hosted client reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("torch", reason="training needs the 'train' extra")
pytest.importorskip("peft", reason="training needs the 'train' extra")

from ftrecipe.cli.main import main
from ftrecipe.training.bundle import vllm_max_lora_rank
from support.moneybank import EXAMPLE, TESTS

# ---------------------------------------------------------------------------------- facts about vLLM
# vllm/config/lora.py: `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`, default 16.
VLLM_MAX_LORA_RANKS = {1, 8, 16, 32, 64, 128, 256, 320, 512}
# vllm/config/model.py: `ModelDType = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]`.
VLLM_DTYPES = {"auto", "half", "float16", "bfloat16", "float", "float32"}
# vllm/lora/lora_model.py `LoRAModel.from_local_checkpoint`: adapter_model.safetensors (or .bin/.pt) in the
# folder; vllm/lora/peft_helper.py `PEFTHelper.from_dict`: adapter_config.json with r, lora_alpha and
# target_modules; `modules_to_save` must be None and `use_dora` false; `r <= max_lora_rank`.
VLLM_REQUIRED_FILES = {"adapter_config.json", "adapter_model.safetensors"}
VLLM_REQUIRED_CONFIG_KEYS = {"r", "lora_alpha", "target_modules"}
# vllm/lora/utils.py `get_supported_lora_modules`: every linear layer's last name (plus the model's
# `embedding_modules`); for a Llama that is its attention and MLP projections. Tensor names are parsed by
# `parse_fine_tuned_lora_name`: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`. vLLM removed
# adapter biases (PR #25807), so a `.bias` tensor fails the load.
LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LORA_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight$")
# Flags of `vllm serve` that take no value.
VLLM_SWITCHES = {"--enable-lora", "--enable-prefix-caching"}

# ---------------------------------------------------------------------------------- facts about Rasa
# rasa/shared/providers/_configs/self_hosted_llm_client_config.py: REQUIRED_KEYS api_base, model,
# provider; FORBIDDEN_KEYS stream, n; use_chat_completions_endpoint defaults to true; api_type must be
# openai; everything else (temperature, timeout) goes to the request.
RASA_REQUIRED_KEYS = {"provider", "api_base", "model"}
RASA_FORBIDDEN_KEYS = {"stream", "n"}

ADAPTER_NAME = "moneybank-cmdgen"
HUB_ID = "ftrecipe-test/tiny-llama"
HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"
RANK = 20  # not a value vLLM accepts: the card must round up to 32
FAST = [
    "hyperparameters.epochs=1",
    "hyperparameters.batchSize=4",
    "hyperparameters.gradientAccumulationSteps=1",
    "hyperparameters.warmupSteps=0",
    "hyperparameters.gradientCheckpointing=false",
    f"lora.r={RANK}",
]


def _sets(*extra: str) -> list[str]:
    return [arg for setting in (*FAST, *extra) for arg in ("--set", setting)]


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftrecipe.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=600,
    )


def _offline_hub(tiny_model: Path, cache: Path) -> Path:
    """The tiny model as the Hugging Face cache holds a downloaded `HUB_ID` at `HUB_REVISION`."""
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(tiny_model, repo / "snapshots" / HUB_REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_REVISION, encoding="utf-8")
    return cache


@pytest.fixture(scope="module")
def demo_bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    prepared = _cli(
        "prepare-data",
        str(TESTS / "accounts.yml"),
        str(TESTS / "payments" / "payees.yml"),
        "--assistant",
        str(EXAMPLE),
        "--config",
        str(EXAMPLE / "config.yml"),
        "--endpoints",
        str(EXAMPLE / "endpoints.yml"),
        "--annotator",
        "assertions",
        "--num-rephrases",
        "0",
        "--out",
        str(root / "data"),
        cwd=root,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    cache = _offline_hub(tiny_model, root / "hub")
    trained = _cli(
        "train",
        "--data",
        str(root / "data"),
        "--base-model",
        f"hf:{HUB_ID}@{HUB_REVISION}",
        "--out",
        str(root / "out" / "train-3f2c1e9a"),
        "--adapter-name",
        ADAPTER_NAME,
        "--work-dir",
        str(root / "work"),
        *_sets(),
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(root / "hf-home")},
        cwd=root,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    return root / "out" / "train-3f2c1e9a"


@pytest.fixture(scope="module")
def templateless_bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base model without a chat template, data without prepare-data's params.yaml."""
    root = tmp_path_factory.mktemp("templateless")
    base = root / "base"
    shutil.copytree(tiny_model, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    # An older, short-context base: 128 positions, under the maxSeqLength of 256 this run trains with.
    model_config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    (base / "config.json").write_text(
        json.dumps({**model_config, "max_position_embeddings": 128}), encoding="utf-8"
    )
    data = root / "data"
    data.mkdir()
    record = {"prompt": "USER: what is my balance?\nWhat next?", "completion": "start flow check_balance"}
    for name, count in (("train.jsonl", 8), ("val.jsonl", 2)):
        (data / name).write_text((json.dumps(record) + "\n") * count, encoding="utf-8")
    out = root / "out" / ADAPTER_NAME
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(
            [
                "train",
                "--data",
                str(data),
                "--base-model",
                str(base),
                "--out",
                str(out),
                "--work-dir",
                str(root / "work"),
                *_sets("hyperparameters.maxSeqLength=256"),
            ]
        )
    assert code == 0
    return {"out": out, "base": base}


# ---------------------------------------------------------------------------------- reading the card


def _section(readme: str, heading: str, fence: str) -> str:
    body = readme.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{fence}\n(.*?)\n```", body, flags=re.DOTALL)
    assert len(blocks) == 1, body
    return str(blocks[0])


def serve_command(readme: str) -> tuple[str, dict[str, str | None]]:
    """The card's `vllm serve` as the shell reads it: the model, then each option and its value."""
    text = _section(readme, "Serve with vLLM", "bash").replace("\\\n", " ")  # line continuations
    argv = shlex.split(text)
    assert argv[:2] == ["vllm", "serve"], argv
    model, rest = argv[2], argv[3:]
    options: dict[str, str | None] = {}
    while rest:
        flag = rest.pop(0)
        assert flag.startswith("--") and flag not in options, (flag, argv)
        options[flag] = None if flag in VLLM_SWITCHES else rest.pop(0)
    return model, options


def served_copy(bundle: Path, options: dict[str, str | None], target_root: Path) -> tuple[str, Path]:
    """Follow the card: copy the bundle's files (its manifest's, not checkpoints) to the path it names."""
    name, _, served_path = str(options["--lora-modules"]).partition("=")
    assert served_path.startswith("/"), served_path
    local = target_root / served_path.lstrip("/")
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    for item in manifest["files"]:
        (local / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle / item["path"], local / item["path"])
    return name, local


def vllm_would_load(
    model: str, options: dict[str, str | None], adapter_dir: Path, max_model_len_limit: int
) -> list[str]:
    """What vLLM's argument parsing and LoRA loader would refuse, per the facts above (empty: loads)."""
    problems = []
    if "--enable-lora" not in options:
        problems.append("--enable-lora is missing")
    rank_limit = int(options.get("--max-lora-rank") or 16)
    if rank_limit not in VLLM_MAX_LORA_RANKS:
        problems.append(f"--max-lora-rank {rank_limit} is not one of {sorted(VLLM_MAX_LORA_RANKS)}")
    if options.get("--dtype", "auto") not in VLLM_DTYPES:
        problems.append(f"--dtype {options['--dtype']} is not one of {sorted(VLLM_DTYPES)}")
    max_model_len = int(options.get("--max-model-len") or 0)
    if not 0 < max_model_len <= max_model_len_limit:
        problems.append(f"--max-model-len {max_model_len} is not within the model's {max_model_len_limit}")
    missing = {name for name in VLLM_REQUIRED_FILES if not (adapter_dir / name).is_file()}
    if missing:
        return [*problems, f"{adapter_dir} lacks {sorted(missing)}"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if not set(config) >= VLLM_REQUIRED_CONFIG_KEYS:
        problems.append(f"adapter_config.json lacks {sorted(VLLM_REQUIRED_CONFIG_KEYS - set(config))}")
    if config.get("modules_to_save"):
        problems.append("modules_to_save is set")
    if config.get("use_dora"):
        problems.append("DoRA")
    if config["r"] > rank_limit:
        problems.append(f"LoRA rank {config['r']} is greater than max_lora_rank {rank_limit}")
    if config.get("base_model_name_or_path") != model:
        problems.append(
            f"adapter_config.json's base {config.get('base_model_name_or_path')!r} is not {model!r}"
        )
    if config.get("revision") != options.get("--revision"):
        problems.append(
            f"adapter revision {config.get('revision')!r} != --revision {options.get('--revision')!r}"
        )
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 (safe_open has no __iter__)
            match = LORA_TENSOR.match(key)
            if match is None:
                problems.append(f"{key} is unsupported LoRA weight")
                continue
            if match["module"].rsplit(".", 1)[-1] not in LLAMA_LORA_MODULES:
                problems.append(f"{match['module']} is not a module vLLM adapts")
            shape = tensors.get_slice(key).get_shape()
            if (shape[0] if match["half"] == "A" else shape[1]) != config["r"]:
                problems.append(f"{key} has shape {shape}, not rank {config['r']}")
    template = options.get("--chat-template")
    if template is not None and not (adapter_dir / Path(template).name).is_file():
        problems.append(f"--chat-template {template} is not in the bundle")
    return problems


def rasa_model_group(readme: str) -> dict[str, Any]:
    """The card's endpoints.yml snippet, parsed as Rasa reads a model group."""
    loaded = yaml.safe_load(_section(readme, "Use from Rasa (endpoints.yml)", "yaml"))
    assert isinstance(loaded, dict) and set(loaded) == {"model_groups"}
    (group,) = loaded["model_groups"]
    assert set(group) == {"id", "models"} and isinstance(group["id"], str)
    (model,) = group["models"]
    assert set(model) >= RASA_REQUIRED_KEYS, model
    assert not RASA_FORBIDDEN_KEYS & set(model)
    assert model.get("api_type", "openai") == "openai"
    return {"id": group["id"], **model}


# ---------------------------------------------------------------------------------- the demo bundle


def _max_positions(base: Path) -> int:
    return int(json.loads((base / "config.json").read_text(encoding="utf-8"))["max_position_embeddings"])


def test_vllm_serve_in_the_card_would_accept_the_demo_bundle(
    demo_bundle: Path, tiny_model: Path, tmp_path: Path
) -> None:
    readme = (demo_bundle / "README.md").read_text(encoding="utf-8")
    model, options = serve_command(readme)
    assert model == HUB_ID  # the id the recipe named, not the pod's download folder
    assert options["--revision"] == HUB_REVISION
    assert options["--max-lora-rank"] == "32"  # rank 20 rounded up to the next value vLLM accepts
    assert options["--max-model-len"] == "4096"  # the training maxSeqLength (default)
    assert options["--dtype"] == "float32"  # what it was trained in on this CPU
    assert "--chat-template" not in options  # the base model's own template serves
    assert "not a hub id" not in readme
    name, adapter_dir = served_copy(demo_bundle, options, tmp_path)
    assert name == ADAPTER_NAME
    run = json.loads((demo_bundle / "run.json").read_text(encoding="utf-8"))
    assert run["baseModel"] == {
        "id": HUB_ID,
        "revision": HUB_REVISION,
        "source": f"hf:{HUB_ID}@{HUB_REVISION}",
    }
    assert vllm_would_load(model, options, adapter_dir, _max_positions(tiny_model)) == []
    assert not (adapter_dir / "checkpoints").exists()


def test_rasa_snippet_is_a_complete_self_hosted_model_group(demo_bundle: Path) -> None:
    readme = (demo_bundle / "README.md").read_text(encoding="utf-8")
    group = rasa_model_group(readme)
    _, options = serve_command(readme)
    assert group == {
        "id": "finetuned-command-generator",
        "provider": "self-hosted",
        "api_base": "http://vllm:8000/v1",
        "model": ADAPTER_NAME,
        "use_chat_completions_endpoint": True,
        "temperature": 0.0,
        "timeout": 10,
    }
    assert str(options["--lora-modules"]).split("=")[0] == group["model"]  # the served LoRA name
    assert "model_group: finetuned-command-generator" in readme


def test_training_config_records_the_datas_provenance(demo_bundle: Path) -> None:
    builtin = Path(EXAMPLE).parents[1] / "operator" / "ftrecipe" / "dataprep" / "templates"
    template_sha256 = hashlib.sha256((builtin / "command_prompt_v2.jinja2").read_bytes()).hexdigest()
    config = json.loads((demo_bundle / "training_config.json").read_text(encoding="utf-8"))
    run = json.loads((demo_bundle / "run.json").read_text(encoding="utf-8"))
    assert config["data"] == {
        "dataset_sha256": run["dataset_hash"],
        "params_file": "params.yaml",
        "command_generator": {
            "class": "CompactLLMCommandGenerator",  # examples/moneybank/config.yml's pipeline
            "syntax": "v2",
            "prompt_template": "builtin:command_prompt_v2.jinja2",
            "prompt_template_sha256": template_sha256,
        },
    }
    readme = (demo_bundle / "README.md").read_text(encoding="utf-8")
    assert "`CompactLLMCommandGenerator`, command syntax `v2`" in readme
    assert template_sha256 in readme


# ---------------------------------------------------------------------------------- added chat template


def test_a_template_ftrecipe_added_is_shipped_and_passed_to_vllm(
    templateless_bundle: dict[str, Path], tmp_path: Path
) -> None:
    from ftrecipe.training.data import DEFAULT_CHAT_TEMPLATE

    bundle = templateless_bundle["out"]
    readme = (bundle / "README.md").read_text(encoding="utf-8")
    model, options = serve_command(readme)
    assert model == str(templateless_bundle["base"].resolve())  # a local folder: the path given
    assert "--revision" not in options
    assert "not a hub id: copy that model to the vLLM host" in readme
    assert options["--max-model-len"] == "128"  # maxSeqLength 256 cut to the base model's 128 positions
    assert "(256) cut to the base model's context, 128 positions" in readme
    assert options["--chat-template"] == f"/adapters/{ADAPTER_NAME}/chat_template.jinja"
    _, adapter_dir = served_copy(bundle, options, tmp_path)
    assert (adapter_dir / "chat_template.jinja").read_text(encoding="utf-8") == DEFAULT_CHAT_TEMPLATE
    assert vllm_would_load(model, options, adapter_dir, _max_positions(templateless_bundle["base"])) == []
    config = json.loads((bundle / "training_config.json").read_text(encoding="utf-8"))
    assert config["data"]["command_generator"] is None and config["data"]["params_file"] is None
    assert "is not recorded" in readme


# ---------------------------------------------------------------------------------- the checks can fail


def test_the_loader_check_refuses_what_vllm_refuses(demo_bundle: Path, tmp_path: Path) -> None:
    """Each fact above, broken once on a copy of the demo bundle, is reported."""
    readme = (demo_bundle / "README.md").read_text(encoding="utf-8")
    model, options = serve_command(readme)
    _, adapter_dir = served_copy(demo_bundle, options, tmp_path)
    assert vllm_would_load(model, {**options, "--max-lora-rank": "16"}, adapter_dir, 4096) == [
        f"LoRA rank {RANK} is greater than max_lora_rank 16"
    ]
    assert vllm_would_load(model, {**options, "--max-lora-rank": "24"}, adapter_dir, 4096)[0].startswith(
        "--max-lora-rank 24 is not one of"
    )
    assert vllm_would_load("/tmp/base", options, adapter_dir, 4096) == [
        f"adapter_config.json's base {HUB_ID!r} is not '/tmp/base'"
    ]
    assert vllm_would_load(model, options, adapter_dir, 2048) == [
        "--max-model-len 4096 is not within the model's 2048"
    ]
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}), encoding="utf-8")
    assert vllm_would_load(model, options, adapter_dir, 4096) == ["modules_to_save is set"]
    (adapter_dir / "adapter_model.safetensors").unlink()
    assert vllm_would_load(model, options, adapter_dir, 4096) == [
        f"{adapter_dir} lacks ['adapter_model.safetensors']"
    ]


def test_max_lora_rank_is_the_next_rank_vllm_accepts() -> None:
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 64, 200, 300, 320, 321, 512)] == [
        1, 8, 8, 16, 16, 32, 64, 256, 320, 320, 512, 512,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="above 512"):
        vllm_max_lora_rank(513)


def test_adapter_config_names_the_base_the_recipe_named() -> None:
    """A base fetched from S3 (or a PVC) loads from the pod's folder, which peft writes down; the bundle
    names what the recipe named instead (the hub case is covered by the demo bundle above)."""
    from ftrecipe.training.bundle import BundleInfo, servable_adapter_config

    info = BundleInfo(
        adapter_name=ADAPTER_NAME,
        base_model_id="s3://models/llama-3.1-8b-instruct/",
        base_model_revision=None,
        base_model_source="s3://models/llama-3.1-8b-instruct/",
        dataset_hash="0" * 64,
        inputs_hash="1" * 64,
        chat_template_added=False,
        train_examples=1,
        val_examples=0,
        dropped_too_long=0,
        steps=1,
        final_eval_loss=None,
    )
    written_by_peft = {"base_model_name_or_path": "/work/inputs/base_model", "revision": None, "r": 16}
    assert servable_adapter_config(written_by_peft, info) == {
        "base_model_name_or_path": "s3://models/llama-3.1-8b-instruct/",
        "revision": None,
        "r": 16,
    }
