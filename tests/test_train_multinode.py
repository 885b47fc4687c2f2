"""`ftrecipe train` across nodes: one torchrun per node (pod), joined by a c10d rendezvous on node 0.

The launcher's decisions are pure functions (`launch.node_group`, `launch.launch_command`). Then two
"nodes" on the CPU: two `ftrecipe train --nodes 2` launches (torchrun each, gloo, a c10d rendezvous on
127.0.0.1, one process per node), each with its own --work-dir as each pod has its own volume:

- they log the same loss at every step as one process with the same global batch (2 examples per
  process x 2 processes = 2 examples x 2 accumulation steps), to `LOSS_TOLERANCE`;
- with everything on S3 (data, base model, --out): one node's process SIGKILLed mid-run takes the other
  node down too (exit 1, not a preemption); launched again with the same arguments ("the JobSet restarts
  the group"), both fetch the last checkpoint global rank 0 published, on their own disks, resume from its
  step and end with the losses and adapter of an uninterrupted two-node run (LoRA dropout on: the random
  state of the rank on the other node comes back too, because rank 0 gathered it into the checkpoint);
- a SIGTERM to one node's `ftrecipe train` (one pod preempted) stops every rank at one step, with one
  checkpoint holding both ranks' random states, and both nodes exit as preempted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ftrecipe.training.launch import (
    RENDEZVOUS_CONNECT_TIMEOUT_SECONDS,
    RENDEZVOUS_JOIN_TIMEOUT_SECONDS,
    LaunchError,
    NodeGroup,
    launch_command,
    node_group,
    rendezvous_id,
)
from support.training_runs import (
    TWO_PROCESS_SETTINGS,
    ReferenceRun,
    adapter,
    assert_same_losses,
    descendants,
    largest_difference,
    logged_losses,
)

ARGV = ["train", "--data", "s3://b/data/", "--base-model", "hf:a/b", "--out", "s3://b/adapter/"]
JOBSET_ENV = {
    "FTRECIPE_NODES": "2",
    "FTRECIPE_RENDEZVOUS": "demo-train-node-0-0.demo-train:29400",
    "JOB_COMPLETION_INDEX": "1",
}

# --------------------------------------------------------------------------------------------- launcher


def test_the_jobset_environment_makes_a_node_group() -> None:
    assert node_group(JOBSET_ENV) == NodeGroup(2, 1, "demo-train-node-0-0.demo-train:29400")
    assert node_group({}) is None  # a plain Job: one node
    assert node_group({"FTRECIPE_NODES": "1", "JOB_COMPLETION_INDEX": "0"}) is None


def test_each_node_has_a_main_process_and_the_group_one() -> None:
    """Local rank 0 fetches onto its node's disk; global rank 0 alone publishes."""
    from ftrecipe.training.launch import is_main_process, is_node_main_process

    node_1 = {"RANK": "8", "LOCAL_RANK": "0", "WORLD_SIZE": "16"}
    assert is_node_main_process(node_1) and not is_main_process(node_1)
    assert not is_node_main_process({"RANK": "9", "LOCAL_RANK": "1"})
    assert is_node_main_process({}) and is_main_process({})  # no launcher: the one process


def test_the_ranks_must_resume_from_the_same_step() -> None:
    """Each node fetched its checkpoint on its own: one published in between would split the group."""
    pytest.importorskip("torch", reason="training needs the 'train' extra")
    from ftrecipe.training.trainer import resume_disagreement

    assert resume_disagreement([4, 4, 4, 4]) is None
    assert resume_disagreement([None, None]) is None
    assert resume_disagreement([6, 6, 4, 4]) == (
        "the ranks found different checkpoints to resume from (by rank: 6, 6, 4, 4); one was published "
        "while this run started: rerun"
    )
    assert resume_disagreement([4, None]) is not None


def test_the_flags_override_the_environment() -> None:
    group = node_group(JOBSET_ENV, nodes=4, rendezvous="127.0.0.1:29500", node_rank=3)
    assert group == NodeGroup(4, 3, "127.0.0.1:29500")
    assert node_group(JOBSET_ENV, nodes=1) is None
    assert node_group({}, nodes=2, rendezvous="[::1]:29500", node_rank=0) == NodeGroup(2, 0, "[::1]:29500")


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        ({"FTRECIPE_NODES": "two"}, {}, "FTRECIPE_NODES=two: expected a whole number (or pass --nodes)"),
        ({}, {"nodes": 0}, "--nodes 0: expected 1 or more nodes"),
        (
            {"FTRECIPE_NODES": "2", "JOB_COMPLETION_INDEX": "0"},
            {},
            "2 nodes need a rendezvous: pass --rendezvous HOST:PORT of node 0 "
            "(a JobSet pod has it in FTRECIPE_RENDEZVOUS)",
        ),
        (
            {},
            {"nodes": 2, "rendezvous": "node-0", "node_rank": 0},
            "--rendezvous node-0: expected HOST:PORT (port 1-65535), e.g. trainer-node-0-0.trainer:29400",
        ),
        (
            {"FTRECIPE_NODES": "2", "FTRECIPE_RENDEZVOUS": "h:0", "JOB_COMPLETION_INDEX": "0"},
            {},
            "FTRECIPE_RENDEZVOUS h:0: expected HOST:PORT (port 1-65535), e.g. trainer-node-0-0.trainer:29400",
        ),
        (
            {},
            {"nodes": 3, "rendezvous": "h:1"},
            "3 nodes: which one is this? pass --node-rank K (0 to 2; an Indexed Job's pod has it in "
            "JOB_COMPLETION_INDEX)",
        ),
        (
            {**JOBSET_ENV, "JOB_COMPLETION_INDEX": "2"},
            {},
            "JOB_COMPLETION_INDEX 2: expected 0 to 1 for 2 nodes",
        ),
        (JOBSET_ENV, {"node_rank": -1}, "--node-rank -1: expected 0 to 1 for 2 nodes"),
    ],
)
def test_bad_node_settings_are_one_line_naming_them(
    env: dict[str, str], flags: dict[str, object], message: str
) -> None:
    with pytest.raises(LaunchError) as raised:
        node_group(env, **flags)  # type: ignore[arg-type]
    assert str(raised.value) == message


def test_each_node_runs_torchrun_with_a_c10d_rendezvous_on_node_0() -> None:
    rdzv_id = rendezvous_id(ARGV)
    settings = (
        f"join_timeout={RENDEZVOUS_JOIN_TIMEOUT_SECONDS},read_timeout={RENDEZVOUS_CONNECT_TIMEOUT_SECONDS}"
    )
    node_0 = launch_command(ARGV, 8, {}, NodeGroup(2, 0, "demo-node-0-0.demo:29400"))
    assert node_0 == [
        *(sys.executable, "-m", "torch.distributed.run"),
        *(
            "--nnodes=2",
            "--nproc_per_node=8",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=demo-node-0-0.demo:29400",
        ),
        f"--rdzv-id={rdzv_id}",
        f"--rdzv-conf={settings},is_host=1",  # node 0 hosts the store, whatever DNS says yet
        "--max-restarts=0",  # the JobSet restarts the group
        *("-m", "ftrecipe.cli.main", *ARGV),
    ]
    # node 1 of a CPU-only group: one process, a client of node 0's store
    node_1 = launch_command(ARGV, 0, {}, NodeGroup(2, 1, "demo-node-0-0.demo:29400"))
    assert node_1 is not None
    assert "--nproc_per_node=1" in node_1 and f"--rdzv-conf={settings},is_host=0" in node_1
    assert [arg for arg in node_1 if arg.startswith("--node")] == []  # ignored by torchrun with c10d
    # one GPU per node is still a torchrun per node; a rank (launched already) runs in-process
    assert launch_command(ARGV, 1, {}, NodeGroup(2, 0, "h:1")) is not None
    assert launch_command(ARGV, 8, {"LOCAL_RANK": "0"}, NodeGroup(2, 0, "h:1")) is None
    assert launch_command(ARGV, 1, {}, None) is None  # one node, one GPU: as before


def test_the_rendezvous_id_is_the_runs_not_the_nodes() -> None:
    """Every node of a run has the same --out (their --work-dir may differ); another run another id."""
    work_0 = [*ARGV, "--work-dir", "/scratch/a"]
    work_1 = [*ARGV, "--work-dir", "/scratch/b"]
    assert rendezvous_id(work_0) == rendezvous_id(work_1) == rendezvous_id(ARGV)
    assert rendezvous_id(work_0).startswith("ftrecipe-") and len(rendezvous_id(work_0)) == 25
    assert rendezvous_id([*ARGV[:-1], "s3://b/other/"]) != rendezvous_id(ARGV)


def test_train_refuses_a_bad_node_setting_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from ftrecipe.cli.main import main

    code = main(
        ["train", "--data", "d", "--base-model", "m", "--out", "o", "--nodes", "2", "--node-rank", "0"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: 2 nodes need a rendezvous: pass --rendezvous HOST:PORT of node 0 "
        "(a JobSet pod has it in FTRECIPE_RENDEZVOUS)"
    ]


# --------------------------------------------------------------------------------------------- two nodes

STEPS_PER_EPOCH = 6  # 24 examples, 2 per process, 2 processes
EPOCHS = 2
# training_runs.TWO_PROCESS_SETTINGS: 2 examples per process, 2 epochs, validation at each epoch's end
SETTINGS = [*TWO_PROCESS_SETTINGS, "checkpointEverySteps=2"]
# Float32 on the CPU; the two layouts add the same gradients in another grouping (gloo's all-reduce of
# two halves vs accumulation): observed equal to the last bit, allowed to differ in the 7th digit.
LOSS_TOLERANCE = 1e-6
RESUME_TOLERANCE = 1e-5  # as tests/test_train_resume.py
WEIGHT_TOLERANCE = 1e-6
RUN_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _train_argv(data: str, model: str, out: str, work: Path, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "ftrecipe.cli.main", "train", "--data", data, "--base-model", model]
    argv += ["--out", out, "--work-dir", str(work)]
    for item in (*SETTINGS, *extra):
        argv += ["--set", item]
    return argv


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


@contextlib.contextmanager
def _nodes(
    argvs: list[list[str]], root: Path, env: dict[str, str]
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`ftrecipe train --nodes 2` once per node (node rank = position), stdout/stderr in root/node<K>.*;
    every process (launcher, torchrun, rank) killed at the end if still there."""
    port = _free_port()
    processes = []
    for rank, argv in enumerate(argvs):
        group = ["--nodes", str(len(argvs)), "--rendezvous", f"127.0.0.1:{port}", "--node-rank", str(rank)]
        with (root / f"node{rank}.out").open("wb") as out, (root / f"node{rank}.err").open("wb") as err:
            processes.append(
                subprocess.Popen([*argv, *group], stdout=out, stderr=err, env=env, start_new_session=True)
            )
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _wait(processes: list[subprocess.Popen[bytes]], root: Path, timeout: float = RUN_TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"a node did not finish in {timeout:.0f} s: {_tails(root)}")
    return [process.returncode for process in processes]


def _tails(root: Path) -> str:
    return "\n".join(
        f"--- {path.name}\n{path.read_text(encoding='utf-8', errors='replace')[-2500:]}"
        for path in sorted(root.glob("node*.*"))
    )


def _stdout(root: Path) -> list[str]:
    """Both nodes' stdout lines (global rank 0 reports, wherever the rendezvous put it)."""
    return [
        line
        for path in sorted(root.glob("node*.out"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]


def _other_node(logs: Path) -> int:
    """The node without global rank 0 (the one not reporting progress): the rendezvous decides which,
    and here both nodes have one host name."""
    reporting = [
        int(path.stem.removeprefix("node"))
        for path in sorted(logs.glob("node*.out"))
        if '"event": "progress"' in path.read_text(encoding="utf-8")
    ]
    assert len(reporting) == 1, reporting
    return 1 - reporting[0]


def _worker(launcher: int) -> int:
    """The pid of torchrun's worker under the launcher `launcher` (the process with LOCAL_RANK set)."""
    for pid in descendants(launcher):
        with contextlib.suppress(OSError):
            if b"LOCAL_RANK=0" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"no worker under {launcher}")


@pytest.fixture(scope="module")
def data(equal_length_data: Path) -> Path:
    """24 training and 4 validation examples of one token length (training_runs.write_equal_length_data)."""
    return equal_length_data


@pytest.mark.slow
def test_two_nodes_log_the_losses_of_one_process_with_the_same_global_batch(
    tiny_model: Path, one_process_reference: ReferenceRun, tmp_path: Path
) -> None:
    # one process with 2 x 2 accumulation on the same data and settings, no LoRA dropout (one process draws
    # other masks for its two micro-batches than two processes do): shared with test_train_fsdp
    data = one_process_reference.data
    two = tmp_path / "two"
    two.mkdir()
    argvs = [
        _train_argv(str(data), str(tiny_model), str(two / "out"), two / f"work{k}", "lora.dropout=0")
        for k in (0, 1)
    ]
    with _nodes(argvs, two, _env()) as processes:
        assert _wait(processes, two) == [0, 0], _tails(two)
    events = [json.loads(line) for line in _stdout(two) if line.startswith("{")]
    assert [event["event"] for event in events].count("done") == 1  # global rank 0 alone publishes
    assert max(e["total_steps"] for e in events if e["event"] == "progress") == STEPS_PER_EPOCH * EPOCHS

    want = logged_losses(one_process_reference.out)
    assert [step for step, train, _ in want if train is not None] == list(
        range(1, STEPS_PER_EPOCH * EPOCHS + 1)
    )
    assert [step for step, _, evaluation in want if evaluation is not None] == [STEPS_PER_EPOCH, 12]
    assert_same_losses(logged_losses(two / "out"), want, LOSS_TOLERANCE)
    # the node without global rank 0 kept no checkpoint and wrote no bundle or metrics on its disk
    other = two / f"work{_other_node(two)}"
    assert sorted(child.name for child in other.iterdir()) == ["checkpoints", "run_inputs.json"]
    assert list((other / "checkpoints").iterdir()) == []


def _wait_for_step(root: Path, step: int, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        steps = [
            json.loads(line)["step"] for line in _stdout(root) if line.startswith('{"event": "progress"')
        ]
        if steps and max(steps) >= step:
            return
        if any(process.poll() is not None for process in processes):
            pytest.fail(f"a node ended before step {step}: {_tails(root)}")
        time.sleep(0.1)
    pytest.fail(f"no step {step} in {RUN_TIMEOUT} s: {_tails(root)}")


def _checkpoint_steps(out: str) -> list[int]:
    from ftrecipe.storage.listing import list_bundles

    return sorted(int(name.removeprefix("step-")) for name in list_bundles(f"{out}checkpoints/"))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_node_killed_mid_run_fails_the_group_and_the_restarted_group_resumes_exactly(
    tiny_model: Path, data: Path, tmp_path: Path, s3_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ftrecipe.storage import fetch_bundle, publish_bundle, read_manifest

    s3_env = {**s3_bucket.env(), "FTRECIPE_S3_ADDRESSING_STYLE": "path"}
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    env = _env(**s3_env)
    prefix = f"s3://{s3_bucket.bucket}/recipes/multinode"
    publish_bundle(data, f"{prefix}/data/", producer="test", inputs_hash="d")
    publish_bundle(tiny_model, f"{prefix}/base/", producer="test", inputs_hash="m")

    def argvs(out: str, root: Path) -> list[list[str]]:
        # dropout draws from each rank's generator: the other node's rank must get its state back
        inputs = (f"{prefix}/data/", f"{prefix}/base/", out)
        return [_train_argv(*inputs, root / f"work{k}", "lora.dropout=0.1") for k in (0, 1)]

    # the uninterrupted run: the same group and settings, on the same files in local folders (no S3 fetch
    # or upload to wait for; where they come from changes no loss or weight)
    straight = tmp_path / "straight"
    (straight / "logs").mkdir(parents=True)
    uninterrupted = [
        _train_argv(
            str(data), str(tiny_model), str(straight / "out"), straight / f"work{k}", "lora.dropout=0.1"
        )
        for k in (0, 1)
    ]
    with _nodes(uninterrupted, straight / "logs", env) as processes:
        assert _wait(processes, straight / "logs") == [0, 0], _tails(straight / "logs")

    out = f"{prefix}/killed/"
    root = tmp_path / "killed"
    first, again = root / "first", root / "again"
    first.mkdir(parents=True)
    again.mkdir()
    with _nodes(argvs(out, root), first, env) as processes:
        _wait_for_step(first, 5, processes)  # step-4 is published by now
        os.kill(_worker(processes[1].pid), signal.SIGKILL)
        # the other node's rank fails in its next collective, its torchrun exits 1: no preemption
        assert _wait(processes, first, timeout=120) == [1, 1], _tails(first)
    published = _checkpoint_steps(out)
    assert published and 4 <= published[-1] < STEPS_PER_EPOCH * EPOCHS, published
    manifest = read_manifest(f"{out}checkpoints/step-{published[-1]}/")
    assert manifest is not None
    # rank 1's random state, written on its own node's disk, is in what rank 0 published
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= {f.path for f in manifest.files}
    # the node without global rank 0 has no checkpoint on its disk to resume from (a `checkpoint-N` that
    # a save cut short by the kill may be there: never resumed from, deleted at the next start)
    other = root / f"work{_other_node(first)}"
    assert [child.name for child in (other / "checkpoints").iterdir() if child.name.startswith("step-")] == []

    # "the JobSet restarts the group": both nodes again, the same arguments
    with _nodes(argvs(out, root), again, env) as processes:
        assert _wait(processes, again) == [0, 0], _tails(again)
    assert f"resuming from step {published[-1]}" in _stdout(again)
    for log in again.glob("node*.err"):
        assert "Didn't find an RNG file" not in log.read_text(encoding="utf-8"), _tails(again)
    assert _checkpoint_steps(out) == []  # deleted once the adapter is out
    # nor the copies on the disk of the node without rank 0 this time (rank 0 may have moved: TRL's
    # README.md from its first run can be there)
    left = (root / f"work{_other_node(again)}" / "checkpoints").iterdir()
    assert [child.name for child in left if child.is_dir()] == []

    resumed = fetch_bundle(out, tmp_path / "resumed")
    assert resumed is not None
    want = logged_losses(straight / "out")
    assert [step for step, train, _ in want if train is not None] == list(
        range(1, STEPS_PER_EPOCH * EPOCHS + 1)
    )
    assert_same_losses(logged_losses(tmp_path / "resumed"), want, RESUME_TOLERANCE)
    difference = largest_difference(adapter(tmp_path / "resumed"), adapter(straight / "out"))
    assert difference <= WEIGHT_TOLERANCE


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc")
def test_sigterm_to_one_node_stops_every_rank_at_one_step_with_one_checkpoint(
    tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    """As the kubelet does when one pod is preempted: SIGTERM to that node's `ftrecipe train` alone."""
    from ftrecipe.training.trainer import EXIT_PREEMPTED

    out = tmp_path / "out"
    argvs = [
        _train_argv(str(data), str(tiny_model), str(out), tmp_path / f"work{k}", "checkpointEverySteps=1000")
        for k in (0, 1)
    ]
    logs = tmp_path / "logs"
    logs.mkdir()
    with _nodes(argvs, logs, _env()) as processes:
        _wait_for_step(logs, 2, processes)
        processes[1].send_signal(signal.SIGTERM)
        # each node's launcher exits as preempted, though torchrun exits 1 (the ranks' marker file)
        assert _wait(processes, logs, timeout=120) == [EXIT_PREEMPTED, EXIT_PREEMPTED], _tails(logs)
    stderr = "".join(path.read_text(encoding="utf-8") for path in sorted(logs.glob("node*.err")))
    stopped = re.findall(r"preempted: stopped at step (\d+) after SIGTERM", stderr)
    assert len(stopped) == 2 and stopped[0] == stopped[1], _tails(logs)  # both ranks, the same step
    step = int(stopped[0])
    assert 2 <= step < STEPS_PER_EPOCH * EPOCHS
    assert sorted(child.name for child in (out / "checkpoints").iterdir()) == [f"step-{step}"]
    written = {path.name for path in (out / "checkpoints" / f"step-{step}").iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "_SUCCESS"} <= written
