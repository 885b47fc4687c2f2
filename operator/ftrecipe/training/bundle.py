"""The adapter bundle `ftrecipe train` publishes: everything vLLM, Rasa and a reviewer need, in one folder.

Files: adapter_config.json + adapter_model.safetensors (peft), the tokenizer with its chat template,
training_config.json (every resolved setting and library versions), metrics.jsonl, loss_curve.png,
run.json (base model id/revision, dataset hash, counts) and a README.md model card with serving snippets.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ftrecipe import __version__
from ftrecipe.training.config import TrainConfig

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
        "headers) was used for training and is saved with the tokenizer here. Serve with this tokenizer."
        if info.chat_template_added
        else "Prompts are rendered with the base model's own chat template (saved with the tokenizer here)."
    )
    return f"""# {info.adapter_name}

A LoRA adapter for the command generator of a Rasa CALM assistant, trained by `ftrecipe train`.

- Base model: `{info.base_model_id}`{f" (revision `{info.base_model_revision}`)" if info.base_model_revision else ""}
- Method: {config.method}, quantization {config.quantization}; LoRA r={config.lora.r}, alpha={config.lora.alpha}, dropout={config.lora.dropout}, targets {", ".join(config.lora.target_modules)}
- Training: {hp.epochs} epoch(s), learning rate {hp.learning_rate} ({hp.scheduler}), batch {hp.batch_size} x {hp.gradient_accumulation_steps}, maxSeqLength {hp.max_seq_length}, seed {hp.seed}
- Data: {info.train_examples} training / {info.val_examples} validation examples, {info.dropped_too_long} dropped as longer than maxSeqLength; dataset sha256 `{info.dataset_hash}`
- Result: {info.steps} optimizer steps, final validation loss {loss} (see `metrics.jsonl`, `loss_curve.png`)

The loss was computed on completion tokens only. {template_note}

Training checkpoints (the last {KEEP_CHECKPOINTS}, for resuming after a preemption) may sit beside these files under
`checkpoints/step-<N>/`, each a bundle of its own: they are not part of this adapter (not in `manifest.json`),
serving ignores them, and deleting the folder is safe once training has finished.

## Serve with vLLM

```bash
vllm serve {info.base_model_id} --enable-lora --lora-modules {info.adapter_name}=PATH_TO_THIS_FOLDER
```

## Use from Rasa (endpoints.yml)

```yaml
model_groups:
  - id: finetuned-command-generator
    models:
      - provider: self-hosted
        model: {info.adapter_name}
        api_base: http://vllm:8000/v1
```

and in config.yml point the command generator's `llm` at `model_group: finetuned-command-generator`.
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
    tokenizer.save_pretrained(str(bundle_dir))
    if metrics_path.is_file():
        shutil.copyfile(metrics_path, bundle_dir / "metrics.jsonl")
    else:
        (bundle_dir / "metrics.jsonl").write_text("", encoding="utf-8")
    training_config = {
        "training": config.model_dump(mode="json", by_alias=True),
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
