"""`ftrecipe train` is reproducible, resumes exactly and stops cleanly (tiny model, CPU).

Two runs with the same inputs and seed end with the same adapter; a run stopped by SIGTERM in the middle
of epoch 2 and rerun logs the same losses at every step as the uninterrupted one and ends with the same
adapter (the data order of an epoch depends on the seed and the epoch only, the rest of the random state
comes back from the checkpoint). So does a run stopped exactly on an epoch's last step (a SIGTERM raised
in-process from the progress event of the step before), or lost after a checkpoint written there: the
epoch's evaluation runs before that checkpoint. Checkpoints are pruned to the last two, locally and durably, and deleted
once the adapter is published. Under torchrun, a SIGTERM that reaches one rank stops both at the same step.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="training needs the 'train' extra")
pytest.importorskip("peft", reason="training needs the 'train' extra")

from ftrecipe.cli.main import main
from support.training_runs import adapter, assert_same_losses, descendants, largest_difference, logged_losses

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
    "checkpointEverySteps=4",
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


def _argv(data: Path, model: Path, root: Path, *extra: str) -> list[str]:
    argv = ["train", "--data", str(data), "--base-model", str(model)]
    argv += ["--out", str(root / "out"), "--work-dir", str(root / "work")]
    for item in (*SETTINGS, *extra):
        argv += ["--set", item]
    return argv


def _steps(folder: Path) -> list[int]:
    """The step-<N> checkpoints in a folder (work or durable), ascending."""
    if not folder.is_dir():
        return []
    return sorted(
        int(child.name.removeprefix("step-")) for child in folder.iterdir() if child.name.startswith("step-")
    )


def _train_in_process(argv: list[str]) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return stdout.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_data(tmp_path_factory.mktemp("resume-data") / "splits")


@pytest.fixture(scope="module")
def straight(tiny_model: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run: its bundle folder."""
    root = tmp_path_factory.mktemp("straight")
    _train_in_process(_argv(data, tiny_model, root))
    return root / "out"


@pytest.mark.slow
def test_straight_run_logs_every_step_and_deletes_its_checkpoints(straight: Path) -> None:
    from ftrecipe.storage import read_manifest

    losses = logged_losses(straight)
    train_steps = [step for step, train, _ in losses if train is not None]
    assert train_steps == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    eval_steps = [step for step, _, evaluation in losses if evaluation is not None]
    assert eval_steps == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH]
    # checkpoints every 4 steps while it ran; none once the adapter is out, beside it or in the work folder
    assert not (straight / "checkpoints").exists()
    assert _steps(straight.parent / "work" / "checkpoints") == []
    manifest = read_manifest(straight)
    assert manifest is not None and "adapter_model.safetensors" in {f.path for f in manifest.files}


@pytest.mark.slow
def test_two_runs_with_the_same_inputs_end_with_the_same_adapter(
    straight: Path, tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    """A second run in the same process (its random generators are wherever the first left them)."""
    _train_in_process(_argv(data, tiny_model, tmp_path))
    assert_same_losses(logged_losses(tmp_path / "out"), logged_losses(straight), LOSS_TOLERANCE)
    assert largest_difference(adapter(tmp_path / "out"), adapter(straight)) <= WEIGHT_TOLERANCE


@pytest.mark.slow
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
    stopped_at = int(re.findall(r"stopped at step (\d+) after SIGTERM", stderr)[0])
    assert STEPS_PER_EPOCH < stopped_at < 2 * STEPS_PER_EPOCH, f"not stopped inside epoch 2: {stopped_at}"
    # every 4 steps, and the one SIGTERM wrote: the last two kept, durably and in the work folder
    last_two = sorted({*range(4, stopped_at + 1, 4), stopped_at})[-2:]
    assert _steps(tmp_path / "out" / "checkpoints") == last_two
    assert _steps(tmp_path / "work" / "checkpoints") == last_two

    stdout = _train_in_process(argv)
    assert f"resuming from step {stopped_at}" in stdout.splitlines()
    assert_same_losses(logged_losses(tmp_path / "out"), logged_losses(straight), LOSS_TOLERANCE)
    assert largest_difference(adapter(tmp_path / "out"), adapter(straight)) <= WEIGHT_TOLERANCE
    assert _steps(tmp_path / "out" / "checkpoints") == []


def _train_acting_at(argv: list[str], step: int, act: Callable[[], None]) -> None:
    """`ftrecipe train` (argv) in this process; `act()` runs when `step` is reported: its progress event
    comes after that step's end, before the next step begins, so what `act` does lands in step + 1."""
    from ftrecipe.training.config import load_train_config
    from ftrecipe.training.trainer import TrainOptions, print_event, run_train

    flags = dict(zip(argv[1::2], argv[2::2], strict=True))  # "train", then flag-value pairs
    settings = [value for flag, value in zip(argv[1::2], argv[2::2], strict=True) if flag == "--set"]

    def emit(event: dict[str, Any]) -> None:
        print_event(event)
        if event["event"] == "progress" and event["step"] == step:
            act()

    options = TrainOptions(
        data=flags["--data"],
        base_model=flags["--base-model"],
        out=flags["--out"],
        config=load_train_config(None, settings),
        work_dir=Path(flags["--work-dir"]),
    )
    with contextlib.redirect_stdout(io.StringIO()):
        run_train(options, emit)


def _sigterm() -> None:
    signal.raise_signal(signal.SIGTERM)  # to this process, handled at once: recorded for the next step end


class _NodeLost(Exception):
    pass


def _lose_the_node() -> None:
    raise _NodeLost("the pod is gone: no SIGTERM, no checkpoint of its own")


@pytest.mark.slow
def test_a_run_stopped_on_the_last_step_of_an_epoch_resumes_with_that_epochs_evaluation(
    straight: Path, tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    """SIGTERM during step 12, the last of epoch 1 (validation at each epoch end): the epoch's evaluation
    runs before the checkpoint is written, so the resumed run has it as the uninterrupted one does."""
    from ftrecipe.training.trainer import Preempted

    argv = _argv(data, tiny_model, tmp_path, "checkpointEverySteps=1000")  # the SIGTERM's checkpoint only
    with pytest.raises(Preempted) as stopped:
        _train_acting_at(argv, STEPS_PER_EPOCH - 1, _sigterm)
    assert str(stopped.value) == (
        f"stopped at step {STEPS_PER_EPOCH} after SIGTERM; checkpoint saved, rerun to resume"
    )
    assert _steps(tmp_path / "out" / "checkpoints") == [STEPS_PER_EPOCH]
    carried = tmp_path / "out" / "checkpoints" / f"step-{STEPS_PER_EPOCH}" / "ftrecipe-metrics.jsonl"
    rows = [json.loads(line) for line in carried.read_text(encoding="utf-8").splitlines()]  # so far
    assert [(row["step"], row["train_loss"] is None, row["eval_loss"] is None) for row in rows[-2:]] == [
        (STEPS_PER_EPOCH, False, True),  # the step's train loss
        (STEPS_PER_EPOCH, True, False),  # then the epoch's evaluation
    ]

    stdout = _train_in_process(argv)
    assert f"resuming from step {STEPS_PER_EPOCH}" in stdout.splitlines()
    assert_same_losses(logged_losses(tmp_path / "out"), logged_losses(straight), LOSS_TOLERANCE)
    assert largest_difference(adapter(tmp_path / "out"), adapter(straight)) <= WEIGHT_TOLERANCE


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_does_not_evaluate_before_it_exits(
    straight: Path, tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    """SIGTERM during step 16 (mid-epoch 2): the checkpoint, then exit; no evaluation in the grace period
    (the epoch has not ended), and the resumed run ends as the uninterrupted one."""
    from ftrecipe.training.trainer import Preempted

    argv = _argv(data, tiny_model, tmp_path, "checkpointEverySteps=1000")
    with pytest.raises(Preempted, match="stopped at step 16 after SIGTERM"):
        _train_acting_at(argv, 15, _sigterm)
    logged = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if row["eval_loss"] is not None] == [STEPS_PER_EPOCH]  # epoch 1
    assert (logged[-1]["step"], logged[-1]["train_loss"] is None) == (16, False)  # no evaluation after it
    assert _steps(tmp_path / "out" / "checkpoints") == [16]
    _train_in_process(argv)
    assert_same_losses(logged_losses(tmp_path / "out"), logged_losses(straight), LOSS_TOLERANCE)
    assert largest_difference(adapter(tmp_path / "out"), adapter(straight)) <= WEIGHT_TOLERANCE


@pytest.mark.slow
def test_a_run_lost_after_an_epoch_end_checkpoint_resumes_with_that_epochs_evaluation(
    straight: Path, tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    """The periodic checkpoint at step 12 (every 4 steps) is also epoch 1's end: it is written after the
    epoch's evaluation, so a run lost in step 13 (a killed pod) resumes from it with that evaluation."""
    argv = _argv(data, tiny_model, tmp_path)
    with pytest.raises(_NodeLost):
        _train_acting_at(argv, STEPS_PER_EPOCH + 1, _lose_the_node)
    assert _steps(tmp_path / "out" / "checkpoints") == [8, STEPS_PER_EPOCH]

    stdout = _train_in_process(argv)
    assert f"resuming from step {STEPS_PER_EPOCH}" in stdout.splitlines()
    assert_same_losses(logged_losses(tmp_path / "out"), logged_losses(straight), LOSS_TOLERANCE)
    assert largest_difference(adapter(tmp_path / "out"), adapter(straight)) <= WEIGHT_TOLERANCE


@pytest.mark.slow
def test_sigterm_while_loading_is_not_ignored(tiny_model: Path, data: Path, tmp_path: Path) -> None:
    """The handler is there before the model loads (as PID 1 in a pod, a signal without one is ignored)."""
    from ftrecipe.training.trainer import EXIT_PREEMPTED

    process = subprocess.Popen(
        [sys.executable, "-m", "ftrecipe.cli.main", *_argv(data, tiny_model, tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:  # printed just before the model is loaded
        if line.startswith('{"event": "precision"'):
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert "preempted: SIGTERM before training began" in stderr or "after SIGTERM" in stderr, stderr[-2000:]
    assert not (tmp_path / "out" / "_SUCCESS").exists()


# --------------------------------------------------------------------------------------------- torchrun


def _rank_process(root: int, rank: int) -> int:
    """The pid of torchrun's worker `rank` under the process `root` (from the environments in /proc)."""
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"no rank {rank} under {root}")


def _launcher(argv: list[str]) -> list[str]:
    """`ftrecipe train` on a pod with two GPUs: its torchrun command, run by `run_launched` (CPU ranks, gloo)."""
    from ftrecipe.training.launch import launch_command

    command = launch_command(argv, visible_gpus=2, env={})
    assert command is not None
    code = (
        "import sys; from ftrecipe.training.trainer import run_launched; sys.exit(run_launched(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *command]


def _sigterm_at_step_2(
    command: list[str],
    env: dict[str, str],
    send_sigterm: Callable[[subprocess.Popen[str]], None],
    if_stuck: str,
) -> tuple[int, str]:
    """Start the launcher, call `send_sigterm` once step 2 is reported, wait: (exit code, stderr)."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if line.startswith('{"event": "progress"') and json.loads(line)["step"] >= 2:
                send_sigterm(process)
                break
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher, torchrun and both ranks
        stderr = process.communicate()[1]
        pytest.fail(f"{if_stuck}: {stderr[-3000:]}")
    return process.returncode, stderr


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_sigterm_on_one_rank_stops_both_at_the_same_step(
    tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    from ftrecipe.storage import bundle_complete
    from ftrecipe.training.trainer import EXIT_PREEMPTED

    # two ranks of batch 2: 6 steps per epoch, 18 in all; no periodic checkpoint
    argv = _argv(data, tiny_model, tmp_path, "checkpointEverySteps=1000")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # rank 0 reports progress; the SIGTERM goes to rank 1 alone
    returncode, stderr = _sigterm_at_step_2(
        _launcher(argv),
        env,
        lambda launcher: os.kill(_rank_process(launcher.pid, 1), signal.SIGTERM),
        "the ranks did not stop together (one waits in a collective)",
    )
    assert returncode == EXIT_PREEMPTED, stderr[-3000:]
    stopped = re.findall(r"preempted: stopped at step (\d+) after SIGTERM", stderr)
    assert len(stopped) == 2 and stopped[0] == stopped[1], stderr[-3000:]  # both ranks, the same step
    step = int(stopped[0])
    assert 2 <= step < 18
    assert _steps(tmp_path / "out" / "checkpoints") == [step]
    written = {path.name for path in (tmp_path / "out" / "checkpoints" / f"step-{step}").iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= written  # each rank's part

    rerun = subprocess.run(_launcher(argv), capture_output=True, text=True, env=env, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from step {step}" in rerun.stdout.splitlines()
    events = [json.loads(line) for line in rerun.stdout.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "done" and events[-1]["steps"] == 18
    assert bundle_complete(tmp_path / "out")
    assert _steps(tmp_path / "out" / "checkpoints") == []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc")
def test_sigterm_to_the_launcher_goes_to_the_ranks_not_torchrun(
    tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    """As the kubelet does: SIGTERM to `ftrecipe train` alone. torchrun would SIGKILL its ranks 30 s later."""
    from ftrecipe.training.trainer import EXIT_PREEMPTED

    argv = _argv(data, tiny_model, tmp_path, "checkpointEverySteps=1000")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    returncode, stderr = _sigterm_at_step_2(
        _launcher(argv),
        env,
        lambda launcher: launcher.send_signal(signal.SIGTERM),
        "the run did not stop",
    )
    assert returncode == EXIT_PREEMPTED, stderr[-3000:]
    # torchrun's agent logs this ("Received 15 death signal, ...") when it is the one signalled (then its
    # workers have 30 s before a SIGKILL). Its "closing signal SIGTERM" to the rank left once one has
    # exited 143 is expected: that rank has saved (the upload is inside a barrier) and is leaving anyway.
    assert not re.search(r"Received \S+ death signal, shutting down workers", stderr), stderr[-3000:]
    stopped = re.findall(r"preempted: stopped at step (\d+) after SIGTERM", stderr)
    assert len(stopped) == 2 and stopped[0] == stopped[1], stderr[-3000:]
    assert _steps(tmp_path / "out" / "checkpoints") == [int(stopped[0])]


# --------------------------------------------------------------------------------------------- pure parts


def test_inputs_hash_holds_the_process_count_and_the_per_device_batch(tiny_model: Path) -> None:
    """Resuming with another GPU count or batch per GPU would change the global batch and the schedule."""
    from ftrecipe.training.config import load_train_config
    from ftrecipe.training.trainer import BaseModelRef, inputs_hash

    base = BaseModelRef(str(tiny_model), None, str(tiny_model), str(tiny_model))
    config = load_train_config(None, [])
    one = inputs_hash(config, base, "data", world_size=1)
    assert one == inputs_hash(load_train_config(None, ["checkpointEverySteps=7"]), base, "data", world_size=1)
    assert one != inputs_hash(config, base, "data", world_size=2)
    assert one != inputs_hash(
        load_train_config(None, ["hyperparameters.batchSize=4"]), base, "data", world_size=1
    )


def test_an_epoch_ends_where_trainers_epoch_is_a_whole_number() -> None:
    from ftrecipe.training.trainer import ends_epoch

    steps_in_epoch = 7
    ends = [ends_epoch(epoch + (batch + 1) / steps_in_epoch) for epoch in (0, 1, 2) for batch in range(7)]
    assert [i + 1 for i, end in enumerate(ends) if end] == [7, 14, 21]
    assert not ends_epoch(None) and not ends_epoch(0.0)  # before the first step


def test_local_checkpoints_are_pruned_to_the_last_ones(tmp_path: Path) -> None:
    from ftrecipe.training.trainer import prune_local_checkpoints

    for name in ("step-2", "step-10", "step-4", "checkpoint-12", "notes"):
        (tmp_path / name).mkdir()
    assert prune_local_checkpoints(tmp_path, 2) == [4, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "notes", "step-10", "step-4"]
    assert prune_local_checkpoints(tmp_path, 0) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "notes"]


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


def test_child_pids_reads_every_thread_of_a_proc_tree(tmp_path: Path) -> None:
    from ftrecipe.training.trainer import child_pids

    for task, children in (("100", "101 102 "), ("107", "103\n"), ("108", "")):
        (tmp_path / "100" / "task" / task).mkdir(parents=True)
        (tmp_path / "100" / "task" / task / "children").write_text(children)
    (tmp_path / "101" / "task" / "101").mkdir(parents=True)
    (tmp_path / "101" / "task" / "101" / "children").write_text("200")  # a grandchild: not listed
    assert child_pids(100, tmp_path) == [101, 102, 103]
    assert child_pids(101, tmp_path) == [200]
    assert child_pids(999, tmp_path) == []  # gone


def test_signal_ranks_signals_the_children_or_else_the_parent(tmp_path: Path) -> None:
    from ftrecipe.training.trainer import signal_ranks

    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    parent, ranks = sleepers[0], sleepers[1:]
    try:
        (tmp_path / str(parent.pid) / "task" / str(parent.pid)).mkdir(parents=True)
        children = tmp_path / str(parent.pid) / "task" / str(parent.pid) / "children"
        children.write_text(" ".join(str(rank.pid) for rank in ranks))
        assert signal_ranks(parent.pid, signal.SIGTERM, tmp_path) == sorted(rank.pid for rank in ranks)
        assert [rank.wait(timeout=10) for rank in ranks] == [-signal.SIGTERM, -signal.SIGTERM]
        assert parent.poll() is None  # the parent was left alone
        children.write_text("")  # no workers yet: the parent itself
        assert signal_ranks(parent.pid, signal.SIGTERM, tmp_path) == [parent.pid]
        assert parent.wait(timeout=10) == -signal.SIGTERM
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
