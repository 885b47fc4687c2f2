"""What the training tests compare between two runs: the logged losses, the published adapter's tensors,
and the processes a launcher started (to kill one rank as a lost node would).

Also the runs several files compare against (session fixtures, registered in tests/conftest.py): the
equal-length data of the two-process tests (`equal_length_data`) and one process's run on it with the
global batch of two processes (`one_process_reference`), trained in the test process.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

Losses = list[tuple[int, float | None, float | None]]

# The settings of the two-process runs on `equal_length_data` (test_train_fsdp, test_train_multinode): 2
# examples per process, 24 examples, 2 epochs (12 steps of 4 examples with two processes), validation at
# each epoch's end. Each file adds what its runs vary (dropout, checkpoints, parallelism).
TWO_PROCESS_SETTINGS = [
    "hyperparameters.learningRate=1e-2",
    "hyperparameters.maxSeqLength=256",
    "hyperparameters.batchSize=2",
    "hyperparameters.gradientAccumulationSteps=1",  # one process takes 2: the same global batch
    "hyperparameters.warmupSteps=0",
    "hyperparameters.gradientCheckpointing=false",
    "hyperparameters.epochs=2",
    "hyperparameters.evalEverySteps=1000",  # validation at each epoch end
]
# What the one-process reference adds. No LoRA dropout: each rank draws its masks from its own generator,
# one process from one, so with dropout the two layouts train on other masks (observed: the loss 0.009
# apart from step 2 on).
ONE_PROCESS_SETTINGS = ["lora.dropout=0", "hyperparameters.gradientAccumulationSteps=2"]

_WORDS = ("send", "money", "balance", "contact")
_COMPLETIONS = ("start flow transfer_money", "start flow check_balance")  # 5 tokens each


def write_equal_length_data(root: Path) -> Path:
    """24 training and 4 validation examples of one token length (36 with the tiny model's template).

    Equal lengths make the length-grouped order the same for any batch size and grouping (transformers
    sorts each group by length and moves the longest group first): one process with 2 x 2 accumulation
    and two processes with 2 each then see the same 4 examples at every step.
    """
    orders = list(itertools.permutations(_WORDS))

    def record(i: int) -> dict[str, str]:
        prompt = "USER: " + " ".join(orders[i % len(orders)]) + "\nWhat do you do next?"
        return {"prompt": prompt, "completion": _COMPLETIONS[(i * 5 // 3) % 2]}

    root.mkdir(parents=True)
    for name, indices in (("train.jsonl", range(24)), ("val.jsonl", range(2, 22, 5))):
        lines = [json.dumps(record(i)) for i in indices]
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def train_argv(data: Path | str, model: Path | str, out: Path | str, work: Path, *settings: str) -> list[str]:
    """`ftrecipe train` arguments (without the program) with each setting as a --set."""
    argv = [
        "train",
        "--data",
        str(data),
        "--base-model",
        str(model),
        "--out",
        str(out),
        "--work-dir",
        str(work),
    ]
    for item in settings:
        argv += ["--set", item]
    return argv


@dataclass(frozen=True)
class Finished:
    """What `train_in_process` returned and printed."""

    code: int
    stdout: str
    stderr: str


def train_in_process(argv: list[str]) -> Finished:
    """`ftrecipe <argv>` (the CLI's main) in the test process, with one intra-op thread as each rank has
    (OMP_NUM_THREADS=1; another thread count may sum in another order).

    For runs no process boundary matters to (no signal, no launcher): torch, transformers and peft are
    imported already, where a new process spends ~7 s of CPU importing them and ~2 s exiting.
    """
    import torch

    from ftrecipe.cli.main import main

    threads = torch.get_num_threads()
    stdout, stderr = io.StringIO(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
    finally:
        torch.set_num_threads(threads)
    return Finished(code, stdout.getvalue(), stderr.getvalue())


@dataclass(frozen=True)
class ReferenceRun:
    """One process's finished run: the data it trained on and its bundle folder."""

    data: Path
    out: Path


@pytest.fixture(scope="session")
def equal_length_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`write_equal_length_data`'s folder (train.jsonl, val.jsonl), shared by every test: read only."""
    return write_equal_length_data(tmp_path_factory.mktemp("equal-length-data") / "splits")


@pytest.fixture(scope="session")
def one_process_reference(
    tiny_model: Path, equal_length_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> ReferenceRun:
    """One process, no sharding, 2 examples x 2 accumulation steps on `equal_length_data`
    (TWO_PROCESS_SETTINGS + ONE_PROCESS_SETTINGS): what two processes with 2 examples each must log and
    publish. One run for every file that compares against it; read only."""
    root = tmp_path_factory.mktemp("one-process-reference")
    settings = (*TWO_PROCESS_SETTINGS, *ONE_PROCESS_SETTINGS)
    done = train_in_process(train_argv(equal_length_data, tiny_model, root / "out", root / "work", *settings))
    assert done.code == 0, done.stderr[-3000:]
    return ReferenceRun(equal_length_data, root / "out")


def logged_losses(out: Path) -> Losses:
    """(step, train loss, eval loss) of each row of ``out``/metrics.jsonl, in order."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(row["step"], row["train_loss"], row["eval_loss"]) for row in rows]


def assert_same_losses(got: Losses, want: Losses, tolerance: float) -> None:
    """The same rows at the same steps (an evaluation row missing or extra fails), each loss within
    ``tolerance``."""
    assert [row[0] for row in got] == [row[0] for row in want]
    for (step, *values), (_, *expected) in zip(got, want, strict=True):
        for value, wanted in zip(values, expected, strict=True):
            assert (value is None) == (wanted is None), (step, got, want)
            if value is not None and wanted is not None:
                assert abs(value - wanted) <= tolerance, f"step {step}: {value} != {wanted}"


def adapter(out: Path) -> dict[str, Any]:
    """The published adapter's tensors by name."""
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def largest_difference(left: dict[str, Any], right: dict[str, Any]) -> float:
    """The largest element-wise difference of two adapters with the same tensor names and shapes."""
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].shape == right[name].shape, name
    return max(float((left[name] - right[name]).abs().max()) for name in left)


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (Linux /proc), children first."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found
