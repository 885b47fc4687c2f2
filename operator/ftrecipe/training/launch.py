"""Several GPUs, or several nodes: `ftrecipe train` re-runs itself under torchrun, one process per GPU.

One pod: `torchrun --standalone`. Several pods (a JobSet, `training.nodes` >= 2): one torchrun per pod,
joined by a c10d rendezvous whose store pod 0 hosts (`NodeGroup`, from the JobSet's environment or the
`--nodes/--rendezvous/--node-rank` flags).

When a rank fails, torchrun stops the others (SIGTERM, then SIGKILL) and exits 1, and ranks on other nodes
fail at their next collective: each rank that fails leaves a `RankFailure` in the folder `RANK_REPORTS_ENV`
names, and the launcher reports the pod's outcome from them (`pod_outcome`): the rank whose failure was its
own, not the ones that broke because a peer vanished.

Pure decisions only (no torch import): which command to run, the `train` arguments to run it with, and
what a pod reports once torchrun returns.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from ftrecipe.hashing import stable_hash
from ftrecipe.termination import CAUSE_FIGURE, FAILED_AT_FIGURE, PhaseReport

# Set by torchrun / accelerate launch / deepspeed / a Kubernetes PyTorchJob: already one process per GPU.
LAUNCHER_ENV = ("WORLD_SIZE", "LOCAL_RANK", "RANK")
# A folder the launcher names to its ranks; a rank that fails (or stops for a preemption) leaves its
# `RankFailure` there. torchrun exits 1 whatever its ranks' codes and whichever failed first, so this is
# how `ftrecipe train` exits and reports as the rank that failed on its own (`pod_outcome`).
RANK_REPORTS_ENV = "FTRECIPE_RANK_REPORTS"
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2  # as the CLI's EXIT_USER_ERROR: the Job's podFailurePolicy fails at once, no retry
EXIT_PREEMPTED = 143  # 128 + SIGTERM: a checkpoint was written, rerun to resume
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


# ------------------------------------------------------------------------------------- a rank that failed

RankOutcome = Literal["error", "bad-input", "preempted"]
_OUTCOME_CODES: dict[RankOutcome, int] = {
    "error": EXIT_ERROR,
    "bad-input": EXIT_BAD_INPUT,
    "preempted": EXIT_PREEMPTED,
}
# What a collective says when a peer vanished (gloo, NCCL and torch's store): ranks that fail this way
# broke because another one failed first. A torch.distributed.DistError (DistBackendError: NCCL's
# watchdog, DistNetworkError, DistStoreError) says so by its type.
_COLLECTIVE_ERRORS = re.compile(
    r"\b(?:Dist(?:Backend|Network|Store)?Error|gloo|nccl|ProcessGroup\w*)\b"
    r"|connection (?:closed|reset) by peer|broken pipe|socket timeout",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class RankFailure:
    """What one rank leaves in the launcher's folder when it fails or stops (`RANK_REPORTS_ENV`)."""

    rank: int  # global rank
    world_size: int
    failed_at: float  # seconds since the epoch
    outcome: RankOutcome
    message: str  # one line: "error: OutOfMemoryError: …", "preempted: stopped at step 3 after SIGTERM"
    signalled: bool  # this rank got a SIGTERM before it failed: torchrun stopping it (a peer failed)

    @property
    def collateral(self) -> bool:
        """Broke because another rank failed: stopped by a signal, or a collective failed under it."""
        return self.signalled or bool(_COLLECTIVE_ERRORS.search(self.message))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RankFailure | None:
        """None for anything else (a file cut short when the rank was killed while writing it)."""
        try:
            data = json.loads(text)
            failure = cls(
                rank=int(data["rank"]),
                world_size=int(data["world_size"]),
                failed_at=float(data["failed_at"]),
                outcome=data["outcome"],
                message=str(data["message"]),
                signalled=bool(data["signalled"]),
            )
        except (ValueError, TypeError, KeyError):
            return None
        return failure if failure.outcome in _OUTCOME_CODES else None


def rank_failure(
    env: Mapping[str, str], outcome: RankOutcome, message: str, failed_at: float, signalled: bool
) -> RankFailure:
    """This rank's failure, its rank and world size from torchrun's environment."""
    return RankFailure(
        rank=int(env.get("RANK") or 0),
        world_size=int(env.get("WORLD_SIZE") or 1),
        failed_at=failed_at,
        outcome=outcome,
        message=" ".join(message.split()),
        signalled=signalled,
    )


@dataclass(frozen=True)
class PodOutcome:
    """How `ftrecipe train` ends once torchrun returned: its exit code, and the termination message to
    write (None: torchrun succeeded and rank 0 wrote its own report, with the run's figures)."""

    code: int
    report: PhaseReport | None


def pod_outcome(failures: Sequence[RankFailure], torchrun_code: int, sigterm: bool) -> PodOutcome:
    """The pod's outcome from its ranks' failures, torchrun's exit code and whether the pod got SIGTERM.

    A rank's own failure wins (the earliest, if several): exit 1, or 2 for bad input (every rank sees a
    bad config or missing data: the Job must not retry). Failures of ranks stopped by torchrun or broken
    in a collective are collateral and never win over one; without one, a preemption (a rank stopped by
    it, or a SIGTERM to this pod) exits 143, else the earliest collateral failure exits 1 (the rank that
    failed first is on another node, or was killed without a word).
    """
    if torchrun_code == 0:
        return PodOutcome(0, None)

    def earliest(candidates: Sequence[RankFailure]) -> RankFailure | None:
        return min(candidates, key=lambda f: (f.failed_at, f.rank), default=None)

    own = earliest([f for f in failures if f.outcome != "preempted" and not f.collateral])
    if own is not None:
        return PodOutcome(
            _OUTCOME_CODES[own.outcome], _report(own, f"rank {own.rank} of {own.world_size}: ", "own")
        )
    preempted = earliest([f for f in failures if f.outcome == "preempted"])
    if preempted is not None:
        return PodOutcome(EXIT_PREEMPTED, _report(preempted, "", "preempted"))
    if sigterm:
        return PodOutcome(
            EXIT_PREEMPTED,
            PhaseReport(False, "preempted: SIGTERM; rerun to resume", {CAUSE_FIGURE: "preempted"}),
        )
    collateral = earliest(failures)
    if collateral is not None:
        return PodOutcome(
            EXIT_ERROR,
            _report(
                collateral,
                f"rank {collateral.rank} of {collateral.world_size}, after another rank failed "
                "(its own pod's message or log says why): ",
                "peer",
            ),
        )
    return PodOutcome(
        torchrun_code,
        PhaseReport(
            False,
            f"error: torchrun exited {torchrun_code} and no rank reported why: one was killed (the kernel's "
            "OOM killer, a signal) or failed before training began; see the pod's log",
        ),
    )


def _report(failure: RankFailure, prefix: str, cause: str) -> PhaseReport:
    failed_at = datetime.fromtimestamp(failure.failed_at, UTC).isoformat(timespec="milliseconds")
    figures = {
        "rank": failure.rank,
        "world_size": failure.world_size,
        FAILED_AT_FIGURE: failed_at.replace("+00:00", "Z"),
        CAUSE_FIGURE: cause,
    }
    return PhaseReport(False, prefix + failure.message, figures)
