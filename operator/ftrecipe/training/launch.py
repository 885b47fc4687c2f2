"""Several GPUs, or several nodes: `ftrecipe train` re-runs itself under torchrun, one process per GPU.

One pod: `torchrun --standalone`. Several pods (a JobSet, `training.nodes` >= 2): one torchrun per pod,
joined by a c10d rendezvous whose store pod 0 hosts (`NodeGroup`, from the JobSet's environment or the
`--nodes/--rendezvous/--node-rank` flags).

Pure decisions only (no torch import): which command to run, and the `train` arguments to run it with.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ftrecipe.hashing import stable_hash

# Set by torchrun / accelerate launch / deepspeed / a Kubernetes PyTorchJob: already one process per GPU.
LAUNCHER_ENV = ("WORLD_SIZE", "LOCAL_RANK", "RANK")
# A file the launcher names to its ranks; one that stopped for a preemption creates it. torchrun exits 1
# whatever its ranks' codes, so this is how `ftrecipe train` still exits EXIT_PREEMPTED for them.
PREEMPTED_FILE_ENV = "FTRECIPE_PREEMPTED_FILE"
# Set on the pods of a JobSet by the operator (controller.manifests.build_jobset); the flags override them.
NODES_ENV = "FTRECIPE_NODES"
RENDEZVOUS_ENV = "FTRECIPE_RENDEZVOUS"  # HOST:PORT of pod 0: <jobset>-node-0-0.<jobset>:29400
NODE_RANK_ENV = "JOB_COMPLETION_INDEX"  # Kubernetes sets it in the pods of an Indexed Job
# How long a node waits for the others to join (pods of one group can start minutes apart: scheduling,
# image pulls on fresh nodes, a cluster autoscaler) and for pod 0's store to answer (its DNS name
# resolves only once pod 0 runs; the connection is retried until then). torchrun's defaults are 600 s
# and 60 s: a pod 0 pulling a large image a minute longer than the others would fail the whole group.
RENDEZVOUS_JOIN_TIMEOUT_SECONDS = 1800
RENDEZVOUS_CONNECT_TIMEOUT_SECONDS = 1800


class LaunchError(ValueError):
    """A bad node setting (flag or environment): reported as one line naming it, exit 2."""


@dataclass(frozen=True)
class NodeGroup:
    """The pods training together: `nodes` of them, this one's index, and where pod 0 hosts the rendezvous."""

    nodes: int
    node_rank: int
    rendezvous: str  # HOST:PORT


def node_group(
    env: Mapping[str, str],
    nodes: int | None = None,
    rendezvous: str | None = None,
    node_rank: int | None = None,
) -> NodeGroup | None:
    """The node group from the flags, else the environment (`NODES_ENV`, `RENDEZVOUS_ENV`, `NODE_RANK_ENV`);
    None for one node. LaunchError, naming the flag or variable and the fix, for a bad or missing value."""
    count = _whole(nodes, env, NODES_ENV, "--nodes")
    if count is None or count == 1:
        return None
    if count < 1:
        raise LaunchError(f"{_source(nodes, NODES_ENV, '--nodes')} {count}: expected 1 or more nodes")
    endpoint = rendezvous if rendezvous is not None else env.get(RENDEZVOUS_ENV) or None
    if endpoint is None:
        raise LaunchError(
            f"{count} nodes need a rendezvous: pass --rendezvous HOST:PORT of node 0 "
            f"(a JobSet pod has it in {RENDEZVOUS_ENV})"
        )
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(
            f"{_source(rendezvous, RENDEZVOUS_ENV, '--rendezvous')} {endpoint}: expected HOST:PORT "
            "(port 1-65535), e.g. trainer-node-0-0.trainer:29400"
        )
    rank = _whole(node_rank, env, NODE_RANK_ENV, "--node-rank")
    if rank is None:
        raise LaunchError(
            f"{count} nodes: which one is this? pass --node-rank K (0 to {count - 1}; "
            f"an Indexed Job's pod has it in {NODE_RANK_ENV})"
        )
    if not 0 <= rank < count:
        raise LaunchError(
            f"{_source(node_rank, NODE_RANK_ENV, '--node-rank')} {rank}: expected 0 to {count - 1} "
            f"for {count} nodes"
        )
    return NodeGroup(count, rank, endpoint)


def _source(flag_value: object, variable: str, flag: str) -> str:
    return flag if flag_value is not None else variable


def _whole(flag_value: int | None, env: Mapping[str, str], variable: str, flag: str) -> int | None:
    if flag_value is not None:
        return flag_value
    text = env.get(variable, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"{variable}={text}: expected a whole number (or pass {flag})") from None


def rendezvous_id(argv: Sequence[str]) -> str:
    """The same on every node of a run (they all get the same `--out`), different for other runs."""
    out = argv[argv.index("--out") + 1] if "--out" in argv[:-1] else ""
    return "ftrecipe-" + stable_hash({"out": out})[:16]


def launch_command(
    argv: Sequence[str], visible_gpus: int, env: Mapping[str, str], group: NodeGroup | None = None
) -> list[str] | None:
    """The torchrun command that runs `ftrecipe <argv>` on every visible GPU, or None to run in-process.

    One node: None with at most one GPU, else `--standalone`. A node group: always torchrun (one process
    on a CPU), `--nnodes` fixed, a c10d rendezvous at `group.rendezvous` whose store node 0 hosts
    (`is_host`, decided here: torch's guess from the hostname fails while pod 0's DNS name does not
    resolve yet), no restarts by torchrun (a lost node fails the group and the JobSet restarts it; the
    new group resumes from the last checkpoint). torchrun ignores `--node-rank` with c10d (global ranks
    follow its sort of the nodes' host names, pod 0 first), so it is not passed. None when a launcher
    already started this process (its env says so). torchrun is run as `python -m torch.distributed.run`,
    the same interpreter: no PATH lookup.
    """
    if any(env.get(name) for name in LAUNCHER_ENV):
        return None
    run = [sys.executable, "-m", "torch.distributed.run"]
    program = ["-m", "ftrecipe.cli.main", *argv]
    if group is None:
        if visible_gpus <= 1:
            return None
        return [*run, "--standalone", f"--nproc_per_node={visible_gpus}", *program]
    settings = {
        "join_timeout": RENDEZVOUS_JOIN_TIMEOUT_SECONDS,
        "read_timeout": RENDEZVOUS_CONNECT_TIMEOUT_SECONDS,
        "is_host": 1 if group.node_rank == 0 else 0,
    }
    return [
        *run,
        f"--nnodes={group.nodes}",
        f"--nproc_per_node={max(1, visible_gpus)}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={group.rendezvous}",
        f"--rdzv-id={rendezvous_id(argv)}",
        "--rdzv-conf=" + ",".join(f"{key}={value}" for key, value in settings.items()),
        "--max-restarts=0",
        *program,
    ]


def is_main_process(env: Mapping[str, str]) -> bool:
    """Rank 0 (or no launcher): the one process that publishes, logs metrics and writes the termination log."""
    return env.get("RANK", "0") in ("", "0")


def is_node_main_process(env: Mapping[str, str]) -> bool:
    """Local rank 0 (or no launcher): the process that fetches this node's inputs onto its own volume."""
    return env.get("LOCAL_RANK", "0") in ("", "0")


def train_argv(args: Any) -> list[str]:
    """`train` and its options, rebuilt from the parsed `ftrecipe train` arguments (for the re-run)."""
    argv = ["train", "--data", args.data, "--base-model", args.base_model, "--out", args.out]
    if args.config:
        argv += ["--config", str(args.config)]
    for assignment in args.set or []:
        argv += ["--set", assignment]
    if args.work_dir:
        argv += ["--work-dir", str(args.work_dir)]
    if args.adapter_name:
        argv += ["--adapter-name", args.adapter_name]
    if args.merge:
        argv.append("--merge")
    return argv
