"""The adapter bundle `ftrecipe train` publishes: everything vLLM, Rasa and a reviewer need, in one folder.

Files: adapter_config.json + adapter_model.safetensors (peft), the tokenizer with its chat template,
training_config.json (every resolved setting and library versions), metrics.jsonl, loss_curve.png,
run.json (base model id/revision, dataset hash, counts) and a README.md model card with serving snippets.

The model card's `vllm serve` command is built from what vLLM's LoRA loader requires (facts and where they
were read: docs/training.md): `--max-lora-rank` is the next rank vLLM accepts at or above the adapter's,
`adapter_config.json` names the base model the recipe named (not the pod's download folder), the chat
template ftrecipe added ships as `chat_template.jinja` and is passed with `--chat-template`.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import yaml

from ftrecipe import __version__
from ftrecipe.api.v1alpha1 import VLLM_LORA_RANKS
from ftrecipe.training.config import TrainConfig
from ftrecipe.training.data import SPLIT_DIRS

BUNDLE_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer_config.json",
    "training_config.json",
    "metrics.jsonl",
    "loss_curve.png",
    "run.json",
    "README.md",
)


@dataclass(frozen=True)
class BundleInfo:
    adapter_name: str
    base_model_id: str
    base_model_revision: str | None
    base_model_source: str
    dataset_hash: str
    inputs_hash: str
    chat_template_added: bool
    train_examples: int
    val_examples: int
    dropped_too_long: int
    steps: int
    final_eval_loss: float | None
    # What vLLM should compute in (`--dtype`): the dtype the adapter was trained in; None: vLLM's auto.
    serving_dtype: str | None = None
    # prepare-data's record of how the training data was made (`data_provenance`); None: not known.
    data_provenance: dict[str, Any] | None = None
    # The base model's context (config.json's max_position_embeddings); None: not known. vLLM refuses a
    # `--max-model-len` above it (unless told to allow it), whatever maxSeqLength training used.
    base_max_positions: int | None = None


CHAT_TEMPLATE_FILE: Final = "chat_template.jinja"
DATA_PARAMS_FILE: Final = "params.yaml"  # prepare-data's record, at the data bundle's root
# Where the model card's command expects this folder on the vLLM host (the reader may change it).
SERVED_ADAPTERS_DIR: Final = "/adapters"
VLLM_API_BASE: Final = "http://vllm:8000/v1"
RASA_MODEL_GROUP: Final = "finetuned-command-generator"
RASA_TIMEOUT_SECONDS: Final = 10  # one command-generator call on a GPU takes well under a second


def vllm_max_lora_rank(rank: int) -> int:
    """`--max-lora-rank` for an adapter of this rank: vLLM accepts only VLLM_LORA_RANKS (default 16)."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above {VLLM_LORA_RANKS[-1]}, the largest rank vLLM serves")


def serving_max_model_len(info: BundleInfo, config: TrainConfig) -> int:
    """`--max-model-len`: the training maxSeqLength, or the base model's context where that is shorter."""
    length = config.hyperparameters.max_seq_length
    if info.base_max_positions is not None and info.base_max_positions < length:
        return info.base_max_positions
    return length


def vllm_serve_argv(info: BundleInfo, config: TrainConfig, adapter_dir: str) -> list[str]:
    """The `vllm serve` command line for this adapter copied to `adapter_dir` on the vLLM host."""
    argv = ["vllm", "serve", info.base_model_id]
    if info.base_model_revision:
        argv += ["--revision", info.base_model_revision]  # the tokenizer follows the model's revision
    argv += [
        "--dtype",
        info.serving_dtype or "auto",
        "--max-model-len",
        str(serving_max_model_len(info, config)),
        "--enable-lora",
        "--lora-modules",
        f"{info.adapter_name}={adapter_dir}",
        "--max-lora-rank",
        str(vllm_max_lora_rank(config.lora.r)),
    ]
    if info.chat_template_added:  # the base model has none: serve the one it was trained with
        argv += ["--chat-template", f"{adapter_dir}/{CHAT_TEMPLATE_FILE}"]
    return [*argv, "--enable-prefix-caching"]


def shell_lines(argv: list[str]) -> str:
    """`argv` as a shell command, one option per line (backslash continuations), quoted where needed."""
    import shlex

    lines: list[str] = [shlex.join(argv[:3])]
    for part in argv[3:]:
        if part.startswith("--"):
            lines.append(shlex.quote(part))
        else:
            lines[-1] += " " + shlex.quote(part)
    return " \\\n  ".join(lines)


def rasa_model_group(adapter_name: str) -> dict[str, Any]:
    """The endpoints.yml model group that sends Rasa's command generator to the served adapter.

    Keys of Rasa's self-hosted client (SelfHostedLLMClientConfig: provider, api_base and model required;
    use_chat_completions_endpoint defaults to true; the rest goes to the request): the model is the LoRA
    name vLLM serves, greedy decoding as in evaluation, and a timeout so a stuck server fails the turn."""
    return {
        "model_groups": [
            {
                "id": RASA_MODEL_GROUP,
                "models": [
                    {
                        "provider": "self-hosted",
                        "api_base": VLLM_API_BASE,
                        "model": adapter_name,
                        "use_chat_completions_endpoint": True,
                        "temperature": 0.0,
                        "timeout": RASA_TIMEOUT_SECONDS,
                    }
                ],
            }
        ]
    }


def _data_roots(train_file: Path) -> list[Path]:
    """The folders `train_file` may sit in as prepare-data's output (train's split layouts)."""
    folder = train_file.parent
    roots = []
    for relative in SPLIT_DIRS:
        depth = len(relative.parts)
        if folder.parts[len(folder.parts) - depth :] == relative.parts:
            roots.append(folder.parents[depth - 1] if depth else folder)
    return roots


def data_provenance(train_file: Path, dataset_hash: str) -> dict[str, Any]:
    """How the training data was made, from prepare-data's params.yaml at the data bundle's root: the
    command generator class, command syntax and prompt template (with its sha256) the prompts imitate, so
    a user can check that production's config.yml uses the same. Unknown fields are None."""
    provenance: dict[str, Any] = {
        "dataset_sha256": dataset_hash,
        "params_file": None,
        "command_generator": None,
    }
    for root in _data_roots(train_file):
        params_path = root / DATA_PARAMS_FILE
        if not params_path.is_file():
            continue
        try:
            params = yaml.safe_load(params_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        generator = params.get("command_generator") if isinstance(params, dict) else None
        if not isinstance(generator, dict):
            continue
        provenance["params_file"] = DATA_PARAMS_FILE
        provenance["command_generator"] = {
            key: generator.get(key)
            for key in ("class", "syntax", "prompt_template", "prompt_template_sha256")
        }
        break
    return provenance


def servable_adapter_config(adapter_config: dict[str, Any], info: BundleInfo) -> dict[str, Any]:
    """peft's adapter_config.json naming the base model as the recipe did (hub id and revision), not the
    folder it was loaded from on the training pod."""
    fixed = dict(adapter_config)
    fixed["base_model_name_or_path"] = info.base_model_id
    fixed["revision"] = info.base_model_revision
    return fixed


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "ftrecipe": __version__}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_loss_curve(metrics: list[dict[str, Any]], target: Path) -> None:
    """Train and validation loss against the optimizer step (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(row["step"], row["train_loss"]) for row in metrics if row.get("train_loss") is not None]
    evals = [(row["step"], row["eval_loss"]) for row in metrics if row.get("eval_loss") is not None]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        axes.plot(*zip(*evals, strict=True), marker="o", label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("ftrecipe train")
    axes.grid(alpha=0.3)
    if train or evals:
        axes.legend()
    figure.tight_layout()
    figure.savefig(target)
    plt.close(figure)


KEEP_CHECKPOINTS = 2  # durable checkpoints kept under <out>/checkpoints/


def model_card(info: BundleInfo, config: TrainConfig) -> str:
    hp = config.hyperparameters
    loss = "n/a" if info.final_eval_loss is None else f"{info.final_eval_loss:.4f}"
    template_note = (
        "The base model had no chat template; ftrecipe's default one (plain `### User:` / `### Assistant:` "
        f"headers) was used for training and is saved here as `{CHAT_TEMPLATE_FILE}`: the command below "
        "passes it to vLLM with `--chat-template`."
        if info.chat_template_added
        else "Prompts are rendered with the base model's own chat template (saved with the tokenizer here)."
    )
    adapter_dir = f"{SERVED_ADAPTERS_DIR}/{info.adapter_name}"
    serve = shell_lines(vllm_serve_argv(info, config, adapter_dir))
    rasa = yaml.safe_dump(rasa_model_group(info.adapter_name), sort_keys=False).rstrip("\n")
    return f"""# {info.adapter_name}

A LoRA adapter for the command generator of a Rasa CALM assistant, trained by `ftrecipe train`.

- Base model: `{info.base_model_id}`{f" (revision `{info.base_model_revision}`)" if info.base_model_revision else ""}
- Method: {config.method}, quantization {config.quantization}; LoRA r={config.lora.r}, alpha={config.lora.alpha}, dropout={config.lora.dropout}, targets {", ".join(config.lora.target_modules)}
- Training: {hp.epochs} epoch(s), learning rate {hp.learning_rate} ({hp.scheduler}), batch {hp.batch_size} x {hp.gradient_accumulation_steps}, maxSeqLength {hp.max_seq_length}, seed {hp.seed}
- Data: {info.train_examples} training / {info.val_examples} validation examples, {info.dropped_too_long} dropped as longer than maxSeqLength; dataset sha256 `{info.dataset_hash}`
- Result: {info.steps} optimizer steps, final validation loss {loss} (see `metrics.jsonl`, `loss_curve.png`)

The loss was computed on completion tokens only. {template_note}

Training checkpoints (the last {KEEP_CHECKPOINTS}, for resuming after a preemption) sit beside these files under
`checkpoints/step-<N>/` while training runs, each a bundle of its own, not part of this adapter (not in
`manifest.json`); they are deleted once this adapter is published. Should a `checkpoints/` folder be left
(training killed right after publishing), serving ignores it and deleting it is safe.

{_provenance_section(info)}
## Serve with vLLM

Copy this folder's files to `{adapter_dir}` on the vLLM host (or change that path below), then:

```bash
{serve}
```

{_local_base_note(info)}`--max-lora-rank {vllm_max_lora_rank(config.lora.r)}` is the smallest value vLLM accepts that holds rank {config.lora.r} (its default, 16,
refuses larger adapters); `--max-model-len` is the training maxSeqLength{_context_note(info, config)}; `--dtype` the dtype it was trained
in. Requests name the model `{info.adapter_name}` to get the adapter (the base model's name gets the base
model alone).

## Use from Rasa (endpoints.yml)

```yaml
{rasa}
```

and in config.yml point the command generator's `llm` at `model_group: {RASA_MODEL_GROUP}`; set
`api_base` to where vLLM listens.
"""


def _context_note(info: BundleInfo, config: TrainConfig) -> str:
    length = config.hyperparameters.max_seq_length
    if serving_max_model_len(info, config) == length:
        return ""
    return f" ({length}) cut to the base model's context, {info.base_max_positions} positions, which vLLM enforces"


def _local_base_note(info: BundleInfo) -> str:
    if info.base_model_source.startswith("hf:"):
        return ""
    return (
        f"The base model is `{info.base_model_id}` as the recipe named it, not a hub id: copy that model to "
        "the vLLM host and give its folder to `vllm serve` instead.\n\n"
    )


def _provenance_section(info: BundleInfo) -> str:
    generator = (info.data_provenance or {}).get("command_generator")
    if not isinstance(generator, dict):
        return (
            "## Data\n\nThe training data had no prepare-data `params.yaml`: which command generator, syntax "
            "and prompt template it imitates is not recorded.\n"
        )
    return f"""## Data

The prompts imitate command generator `{generator.get("class") or "not named (no Rasa config.yml given)"}`, command syntax `{generator.get("syntax")}`, prompt template `{generator.get("prompt_template")}` (sha256 `{generator.get("prompt_template_sha256")}`; see `training_config.json`).
Production's config.yml must render the same prompt: the same generator, and a `prompt_template` file whose
`sha256sum` is the hash above (a `builtin:` template is ftrecipe's own, in the package's
`ftrecipe/dataprep/templates/`: copy it next to config.yml and name it there).
"""


def write_bundle(
    bundle_dir: Path,
    model: Any,
    tokenizer: Any,
    config: TrainConfig,
    metrics_path: Path,
    info: BundleInfo,
) -> dict[str, Any]:
    """Write every bundle file into `bundle_dir` (the loss curve may already be there); returns run.json's
    content, which also goes into the bundle manifest's `metadata` (base model, dataset hash)."""
    model.save_pretrained(str(bundle_dir), safe_serialization=True)
    adapter_config_path = bundle_dir / "adapter_config.json"
    adapter_config = json.loads(adapter_config_path.read_text(encoding="utf-8"))
    adapter_config_path.write_text(
        json.dumps(servable_adapter_config(adapter_config, info), indent=2, sort_keys=True) + "\n",
        encoding="utf-8",
    )
    tokenizer.save_pretrained(str(bundle_dir))
    template_path = bundle_dir / CHAT_TEMPLATE_FILE
    if info.chat_template_added and not template_path.is_file():  # older transformers keep it inline only
        template_path.write_text(str(tokenizer.chat_template), encoding="utf-8")
    if metrics_path.is_file():
        shutil.copyfile(metrics_path, bundle_dir / "metrics.jsonl")
    else:
        (bundle_dir / "metrics.jsonl").write_text("", encoding="utf-8")
    training_config = {
        "training": config.model_dump(mode="json", by_alias=True),
        "data": info.data_provenance,
        "versions": library_versions(),
    }
    (bundle_dir / "training_config.json").write_text(
        json.dumps(training_config, indent=2) + "\n", encoding="utf-8"
    )
    run = {
        "producer": "ftrecipe train",
        "ftrecipeVersion": __version__,
        "baseModel": {
            "id": info.base_model_id,
            "revision": info.base_model_revision,
            "source": info.base_model_source,
        },
        **{k: v for k, v in asdict(info).items() if not k.startswith("base_model")},
    }
    (bundle_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    (bundle_dir / "README.md").write_text(model_card(info, config), encoding="utf-8")
    return run
