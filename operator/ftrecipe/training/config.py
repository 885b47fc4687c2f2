"""TrainConfig: the recipe's `training` block, read from `--config FILE` and `--set key=value` overrides.

Names, bounds and defaults are those of `ftrecipe.api.v1alpha1.TrainingSpec` (camelCase on the wire),
so a block copied out of a FinetuneRecipe works unchanged. Only `baseModel` becomes optional: on the
command line `--base-model` says where the model is, and it wins over the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from ftrecipe.api.v1alpha1 import BaseModelSource, TrainingSpec


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message is one line for the user."""


class TrainConfig(TrainingSpec):
    """`TrainingSpec` with an optional `baseModel` (the CLI's `--base-model` gives it)."""

    base_model: BaseModelSource | None = Field(  # type: ignore[assignment]
        default=None, description="The model to adapt; `--base-model` wins over it."
    )


def parse_value(text: str) -> Any:
    """A `--set` value: JSON first (`1`, `1e-2`, `true`, `["q_proj"]`), then YAML (`[q_proj, v_proj]`), else text."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return loaded if isinstance(loaded, list | dict) else text


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Set `a.b.c=value` in `tree` (camelCase keys, as in the recipe), creating parents as needed."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. hyperparameters.epochs=1")
    parts = key.split(".")
    if parts[0] == "training":  # `training.lora.r=8` reads naturally too
        parts = parts[1:]
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a block")
        node = child
    node[parts[-1]] = parse_value(raw.strip())


def _read_file(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the config: {' '.join(str(exc).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected the recipe's `training` block (a mapping)")
    # A whole `spec` or `{training: ...}` is accepted too: take the training block out of it.
    for key in ("spec", "training"):
        inner = loaded.get(key)
        if isinstance(inner, dict) and len(loaded) == 1:
            loaded = inner
    if "training" in loaded and isinstance(loaded["training"], dict):
        loaded = loaded["training"]
    return dict(loaded)


def _one_line(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "training"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def load_train_config(
    config_file: Path | None = None,
    overrides: Sequence[str] = (),
    *,
    extra: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """The resolved config: defaults < file < `extra` < `--set` overrides."""
    tree: dict[str, Any] = _read_file(config_file) if config_file is not None else {}
    tree.update(extra or {})
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"invalid training config: {_one_line(error)}") from None
