"""`ftrecipe train` is reproducible and resumes exactly (tiny model, CPU).

Two runs with the same inputs and seed end with the same adapter; a run stopped by SIGTERM in the middle
of epoch 2 and rerun logs the same losses at every step as the uninterrupted one and ends with the same
adapter (the data order of an epoch depends on the seed and the epoch only, the rest of the random state
comes back from the checkpoint).
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="training needs the 'train' extra")
pytest.importorskip("peft", reason="training needs the 'train' extra")

from ftrecipe.cli.main import main

STEPS_PER_EPOCH = 12  # 24 examples, batch 2
EPOCHS = 3
SETTINGS = [
    "hyperparameters.learningRate=1e-2",
    "hyperparameters.maxSeqLength=256",
    "hyperparameters.batchSize=2",
    "hyperparameters.gradientAccumulationSteps=1",
    "hyperparameters.warmupSteps=0",
    "hyperparameters.gradientCheckpointing=false",
    f"hyperparameters.epochs={EPOCHS}",
    "hyperparameters.evalEverySteps=1000",  # validation at each epoch end
    "checkpointEverySteps=1000",  # the only checkpoint: the one SIGTERM writes
    "lora.dropout=0.1",  # dropout draws from the global generator: its state must come back too
]
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-6

REQUESTS = [
    "I want to send some money to my friend.",
    "what is my balance?",
    "add Mary as a new contact",
    "please move fifty dollars from my savings account over to the checking account today",
]
COMMANDS = ["start flow transfer_money", "start flow check_balance", "start flow add_contact"]


def _write_data(root: Path, n_train: int = 24, n_val: int = 4) -> Path:
    """Requests of different lengths (so length grouping has something to group), two formats."""

    def record(i: int) -> dict[str, str]:
        return {
            "prompt": f"USER: {REQUESTS[i % len(REQUESTS)]}{' thanks' * (i % 5)}\nWhat do you do next?",
            "completion": COMMANDS[i % len(COMMANDS)],
        }

    root.mkdir(parents=True)
    for name, count in (("train.jsonl", n_train), ("val.jsonl", n_val)):
        lines = [json.dumps(record(i + (100 if name == "val.jsonl" else 0))) for i in range(count)]
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _argv(data: Path, model: Path, root: Path) -> list[str]:
    argv = ["train", "--data", str(data), "--base-model", str(model)]
    argv += ["--out", str(root / "out"), "--work-dir", str(root / "work")]
    for item in SETTINGS:
        argv += ["--set", item]
    return argv


def _train_in_process(argv: list[str]) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return stdout.getvalue()


def _losses(out: Path) -> list[tuple[int, float | None, float | None]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(row["step"], row["train_loss"], row["eval_loss"]) for row in rows]


def _adapter(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def _largest_difference(left: dict[str, Any], right: dict[str, Any]) -> float:
    assert sorted(left) == sorted(right)
    return max(float((left[name] - right[name]).abs().max()) for name in left)


def _assert_same_losses(
    got: list[tuple[int, float | None, float | None]], want: list[tuple[int, float | None, float | None]]
) -> None:
    assert [row[0] for row in got] == [row[0] for row in want]
    for (step, train, evaluation), (_, train_want, eval_want) in zip(got, want, strict=True):
        for value, expected in ((train, train_want), (evaluation, eval_want)):
            assert (value is None) == (expected is None), (step, got, want)
            if value is not None and expected is not None:
                assert abs(value - expected) <= LOSS_TOLERANCE, f"step {step}: {value} != {expected}"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_data(tmp_path_factory.mktemp("resume-data") / "splits")


@pytest.fixture(scope="module")
def straight(tiny_model: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run: its bundle folder."""
    root = tmp_path_factory.mktemp("straight")
    _train_in_process(_argv(data, tiny_model, root))
    return root / "out"


def test_straight_run_logs_every_step(straight: Path) -> None:
    losses = _losses(straight)
    train_steps = [step for step, train, _ in losses if train is not None]
    assert train_steps == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    eval_steps = [step for step, _, evaluation in losses if evaluation is not None]
    assert eval_steps == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH]


def test_two_runs_with_the_same_inputs_end_with_the_same_adapter(
    straight: Path, tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    """A second run in the same process (its random generators are wherever the first left them)."""
    _train_in_process(_argv(data, tiny_model, tmp_path))
    _assert_same_losses(_losses(tmp_path / "out"), _losses(straight))
    assert _largest_difference(_adapter(tmp_path / "out"), _adapter(straight)) <= WEIGHT_TOLERANCE


def test_a_run_stopped_in_epoch_2_resumes_exactly(
    straight: Path, tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    from ftrecipe.training.trainer import EXIT_PREEMPTED

    argv = _argv(data, tiny_model, tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "ftrecipe.cli.main", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    for line in process.stdout:  # SIGTERM once epoch 2 has begun
        if line.startswith('{"event": "progress"') and json.loads(line)["step"] > STEPS_PER_EPOCH:
            process.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "no progress in epoch 2"
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, stderr[-2000:]
    checkpoints = sorted((tmp_path / "out" / "checkpoints").iterdir())
    assert len(checkpoints) == 1, checkpoints
    stopped_at = int(checkpoints[0].name.removeprefix("step-"))
    assert STEPS_PER_EPOCH < stopped_at < 2 * STEPS_PER_EPOCH, f"not stopped inside epoch 2: {stopped_at}"

    stdout = _train_in_process(argv)
    assert f"resuming from step {stopped_at}" in stdout.splitlines()
    _assert_same_losses(_losses(tmp_path / "out"), _losses(straight))
    assert _largest_difference(_adapter(tmp_path / "out"), _adapter(straight)) <= WEIGHT_TOLERANCE


def test_epoch_order_depends_on_the_seed_and_the_epoch_only() -> None:
    import torch

    from ftrecipe.training.sampling import epoch_order

    lengths = [5, 40, 7, 33, 12, 18, 25, 9, 41, 3, 16, 22]
    torch.manual_seed(1)
    first = epoch_order(lengths, 4, seed=42, epoch=1, by_length=True)
    torch.manual_seed(2)
    assert epoch_order(lengths, 4, seed=42, epoch=1, by_length=True) == first
    assert sorted(first) == list(range(len(lengths)))
    assert first[0] == 8, "the longest example comes first (an out-of-memory shows at once)"
    assert epoch_order(lengths, 4, seed=42, epoch=2, by_length=True) != first
    assert epoch_order(lengths, 4, seed=43, epoch=1, by_length=True) != first
    shuffled = epoch_order(lengths, 4, seed=42, epoch=1, by_length=False)
    assert sorted(shuffled) == list(range(len(lengths))) and shuffled != list(range(len(lengths)))
