"""Several GPUs in one pod: `ftrecipe train` re-runs itself under torchrun, one process per GPU.

Pure decisions only (no torch import): which command to run, and the `train` arguments to run it with.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

# Set by torchrun / accelerate launch / deepspeed / a Kubernetes PyTorchJob: already one process per GPU.
LAUNCHER_ENV = ("WORLD_SIZE", "LOCAL_RANK", "RANK")
# A file the launcher names to its ranks; one that stopped for a preemption creates it. torchrun exits 1
# whatever its ranks' codes, so this is how `ftrecipe train` still exits EXIT_PREEMPTED for them.
PREEMPTED_FILE_ENV = "FTRECIPE_PREEMPTED_FILE"


def launch_command(argv: Sequence[str], visible_gpus: int, env: Mapping[str, str]) -> list[str] | None:
    """The torchrun command that runs `ftrecipe <argv>` on every visible GPU, or None to run in-process.

    None with at most one GPU, or when a launcher already started this process (its env says so).
    torchrun is run as `python -m torch.distributed.run`, the same interpreter: no PATH lookup.
    """
    if visible_gpus <= 1 or any(env.get(name) for name in LAUNCHER_ENV):
        return None
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={visible_gpus}",
        "-m",
        "ftrecipe.cli.main",
        *argv,
    ]


def is_main_process(env: Mapping[str, str]) -> bool:
    """Rank 0 (or no launcher): the one process that publishes, logs metrics and writes the termination log."""
    return env.get("RANK", "0") in ("", "0")


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
