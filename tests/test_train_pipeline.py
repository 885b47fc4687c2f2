"""prepare-data's output feeds training directly: the recipe's hand-off between phases, on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftrecipe.storage import read_manifest
from support.moneybank import EXAMPLE, TESTS

FAST_TRAINING = [
    "hyperparameters.epochs=4",
    "hyperparameters.learningRate=0.01",
    "hyperparameters.batchSize=4",
    "hyperparameters.gradientAccumulationSteps=1",
    "hyperparameters.warmupSteps=0",
    "hyperparameters.gradientCheckpointing=false",
    "gpus=0",
]


def ftrecipe(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftrecipe.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("output_format", ["instruction", "conversational"])
def test_training_on_prepare_data_output_lowers_validation_loss(
    tmp_path: Path, tiny_model: Path, output_format: str
) -> None:
    prepared = ftrecipe(
        "prepare-data",
        str(TESTS / "accounts.yml"),
        str(TESTS / "payments" / "payees.yml"),
        "--assistant",
        str(EXAMPLE),
        "--annotator",
        "assertions",
        "--num-rephrases",
        "0",
        "--output-format",
        output_format,
        "--out",
        str(tmp_path / "data"),
        cwd=tmp_path,
    )
    assert prepared.returncode == 0, prepared.stderr
    splits = tmp_path / "data" / "4_train_test_split" / "ft_splits"
    n_train = len((splits / "train.jsonl").read_text().splitlines())
    n_val = len((splits / "val.jsonl").read_text().splitlines())
    assert n_train > 0
    assert n_val > 0

    overrides = [arg for setting in FAST_TRAINING for arg in ("--set", setting)]
    trained = ftrecipe(
        "train",
        "--data",
        str(tmp_path / "data"),
        "--base-model",
        str(tiny_model),
        "--out",
        str(tmp_path / "adapter"),
        "--work-dir",
        str(tmp_path / "work"),
        *overrides,
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    events = [json.loads(line) for line in trained.stdout.splitlines() if line.startswith("{")]
    data_event = next(e for e in events if e.get("event") == "data")
    assert data_event["train_examples"] == n_train
    assert data_event["val_examples"] == n_val
    assert data_event["dropped_too_long"] == 0
    metrics = [json.loads(line) for line in (tmp_path / "adapter" / "metrics.jsonl").read_text().splitlines()]
    eval_losses = [m["eval_loss"] for m in metrics if m["eval_loss"] is not None]
    assert len(eval_losses) >= 2
    assert eval_losses[-1] < eval_losses[0]
    manifest = read_manifest(tmp_path / "adapter")
    assert manifest is not None
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {
        f.path for f in manifest.files
    }
