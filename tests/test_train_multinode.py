"""`ftrecipe train` across nodes: one torchrun per node (pod), joined by a c10d rendezvous on node 0.

The launcher's decisions are pure functions (`launch.node_group`, `launch.launch_command`).
"""

from __future__ import annotations

import sys

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
