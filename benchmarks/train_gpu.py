"""`ftrecipe train` against the fair plain-Trainer baseline on a GPU: LoRA and QLoRA, 8B-shaped, side by side.

What the CPU cannot show: tokens/s and peak GPU memory of the real configurations on CUDA. For each
variant (`lora`, `qlora-4bit`, `qlora-8bit`) the two sides of `train_throughput.py` run on the same
prepared data and the same base model, each in its own process, interleaved: the **baseline** (a plain
`transformers.Trainer` with the same weights dtype, attention kernels and autocast that ftrecipe picks
here: bf16 on Ampere and newer; the same LoRA settings, gradient-checkpointing setting and data;
padded batches in random order; the model's own loss over the full logits; QLoRA the standard way,
`BitsAndBytesConfig` + `prepare_model_for_kbit_training`) and **ftrecipe** (`ftrecipe train` with its
defaults). Both are measured the same way (`train_throughput.StepMeter`): non-padding tokens/s over
`Trainer.train()`, and `torch.cuda.max_memory_allocated()` reset at every step. The goal on a GPU is
≥ 2× the baseline's non-padding tokens/s.

The base model has random weights in a real model's shape, built on the GPU (the device machines reach
no hub): `llama-8b` is Llama-3.1-8B's configuration (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP
14336, vocabulary 128256), `llama-1b` Llama-3.2-1B's, `tiny` the test fixture with Llama 3's 128k
vocabulary (it runs on the CPU). The tokenizer is the fixture's small BPE, so prompts are more tokens
than with Llama-3's tokenizer; tokens/s and memory are per token either way.

`--parallelism fsdp` measures `ftrecipe train` with `parallelism: fsdp` instead: no baseline side (the
plain-Trainer comparison is about one GPU), one run per variant of `ftrecipe train` under torchrun with one
rank per visible GPU (`--nproc`; 2 CPU ranks on a machine without a GPU, for `--shape tiny`), the base
model's weights sharded across them. Reported: steps, tokens/s (the trainer's metrics), rank 0's peak GPU
memory and the wall time, next to the per-GPU estimate (weights / ranks + one gathered decoder layer +
activations). qlora-8bit is refused under fsdp (the recipe's rule) and shows as such. On one GPU the
sharding is over one rank: the FSDP code path on CUDA (bf16 mixed precision policy, NCCL collectives,
sharded checkpoints, the gathered adapter), not the memory saving.

`--dry-run` builds nothing big and trains nothing: it prepares the data, prints the plan (variants,
sides, the `ftrecipe train` settings, the model shape and the memory ftrecipe's estimate expects per
side) and whether this machine could run each variant. A QLoRA variant that bitsandbytes cannot run
here is reported as skipped with the reason; a side that fails is reported with its last error line.

    .venv/bin/python benchmarks/train_gpu.py [--shape llama-8b] [--tests 10] [--batch-size 2]
        [--variants lora qlora-4bit qlora-8bit] [--gradient-checkpointing on|off] [--dry-run]
        [--parallelism ddp|fsdp] [--nproc N] [--json output/benchmarks/train_gpu.json]

On a lent GPU machine (no registry there): carry the wheels the image lacks (bitsandbytes, liger-kernel,
flash-attn; see .library/device/README.md) and run this with the machine's python3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUTPUT, machine, table, write_json
from train_throughput import (
    DEFAULT_SIDES,
    add_shared_arguments,
    compare,
    interleaved,
    prepare_dataset,
    run_worker,
    shared_settings,
)


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rope_theta: float = 500000.0


SHAPES: dict[str, Shape | None] = {
    "llama-8b": Shape(4096, 14336, 32, 32, 8, 128256),
    "llama-1b": Shape(2048, 8192, 16, 32, 8, 128256),
    "tiny": None,  # the fixture's own shape, with Llama 3's vocabulary
}
VARIANTS: dict[str, str] = {"lora": "none", "qlora-4bit": "4bit", "qlora-8bit": "8bit"}  # -> quantization


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_shared_arguments(parser)
    parser.set_defaults(tests=10)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-8b")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side per variant, interleaved")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one side may run")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; build and train nothing")
    parser.add_argument(
        "--parallelism",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="ddp: ftrecipe against the baseline on one GPU; fsdp: ftrecipe alone, weights sharded over --nproc ranks",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="fsdp ranks (default: the visible GPUs; 2 CPU ranks without one)",
    )
    parser.add_argument("--json", type=Path, default=OUTPUT / "train_gpu.json")
    return parser.parse_args(argv)


def shape_config(shape_name: str) -> dict[str, Any]:
    """The base model's config fields: the fixture's, with the shape's (and Llama 3's vocabulary)."""
    shape = SHAPES[shape_name]
    if shape is None:
        return {"vocab_size": 128256, "hidden_size": 64, "num_hidden_layers": 2}
    fields = dict(vars(shape))
    fields["head_dim"] = shape.hidden_size // shape.num_attention_heads
    return fields


def build_base_model(target: Path, shape_name: str) -> Path:
    """The fixture's tokenizer with random weights of `shape_name`, in bf16, built on the GPU if any."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ftrecipe.training.tiny_model import LLAMA3_VOCAB_SIZE, build_tiny_model

    tiny = build_tiny_model(target.with_name(target.name + "-tiny"), model_vocab_size=LLAMA3_VOCAB_SIZE)
    if SHAPES[shape_name] is None:
        return tiny
    config = AutoConfig.from_pretrained(tiny)
    for name, value in shape_config(shape_name).items():
        setattr(config, name, value)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    model.generation_config = AutoModelForCausalLM.from_pretrained(tiny).generation_config
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(target)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return target


def variant_problem(variant: str) -> str | None:
    """Why this machine cannot run `variant` (bitsandbytes for QLoRA), or None."""
    if VARIANTS[variant] == "none":
        return None
    from ftrecipe.training.trainer import bitsandbytes_problem

    return bitsandbytes_problem()


def memory_estimates(shape_name: str, args: argparse.Namespace, quantization: str) -> dict[str, float]:
    """ftrecipe's own estimate (weights + activations without checkpointing), full logits or not, in GiB."""
    from transformers import LlamaConfig

    from ftrecipe.training.trainer import ModelShape, training_memory_bytes

    shape = ModelShape.from_config(LlamaConfig(**shape_config(shape_name)))
    tokens = args.batch_size * args.max_seq_length
    return {
        side: round(training_memory_bytes(shape, tokens, quantization, 2, full_logits) / 2**30, 1)
        for side, full_logits in (("baseline", True), ("ftrecipe", False))
    }


def fsdp_ranks(requested: int | None) -> int:
    """One rank per visible GPU, or 2 CPU ranks (gloo) on a machine without one."""
    if requested is not None:
        return requested
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def fsdp_problem(variant: str) -> str | None:
    """Why `variant` cannot run under fsdp: the recipe's own rule (8-bit cannot be sharded), or bitsandbytes."""
    from ftrecipe.api.v1alpha1 import FSDP_8BIT

    if VARIANTS[variant] == "8bit":
        return FSDP_8BIT
    return variant_problem(variant)


def fsdp_memory_estimate(shape_name: str, args: argparse.Namespace, quantization: str, ranks: int) -> float:
    """GiB per GPU under fsdp: the weights / ranks, one decoder layer gathered in full while it computes,
    and the activations of a micro-batch (the label-only loss, no full logits); without checkpointing."""
    from transformers import LlamaConfig

    from ftrecipe.training.trainer import ModelShape, training_memory_bytes

    shape = ModelShape.from_config(LlamaConfig(**shape_config(shape_name)))
    tokens = args.batch_size * args.max_seq_length
    return round(training_memory_bytes(shape, tokens, quantization, 2, False, weight_shards=ranks) / 2**30, 1)


def run_fsdp(
    args: argparse.Namespace, data: Path, model: Path, work: Path, quantization: str, ranks: int
) -> dict[str, Any]:
    """`ftrecipe train --set parallelism=fsdp` under torchrun with `ranks` ranks; its figures or the failure."""
    args.quantization = quantization
    run_dir = work / f"fsdp-{quantization}"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    argv += ["-m", "ftrecipe.cli.main", "train", "--data", str(data), "--base-model", str(model)]
    argv += ["--out", str(run_dir / "out"), "--work-dir", str(run_dir / "work")]
    for setting in [*shared_settings(args), "parallelism=fsdp"]:
        argv += ["--set", setting]
    operator = str(Path(__file__).resolve().parents[1] / "operator")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [operator, os.environ.get("PYTHONPATH")])),
    }
    env.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"state": "failed", "reason": f"ran over {args.timeout:g} s"}
    wall = round(time.monotonic() - started, 1)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {"state": "failed", "reason": lines[-1][:300] if lines else f"exit {done.returncode}"}
    rows = [json.loads(line) for line in (run_dir / "out" / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in rows if row.get("train_loss") is not None]
    # the first step carries the start-up (allocations, the first all-gathers): left out when there are more
    speeds = [row["tokens_per_second"] for row in (trained[1:] or trained) if row.get("tokens_per_second")]
    peaks = [row["gpu_memory_gb"] for row in rows if row.get("gpu_memory_gb") is not None]
    return {
        "state": "ok",
        "ranks": ranks,
        "steps": trained[-1]["step"] if trained else 0,
        "wall_s": wall,
        "tokens_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "gpu_peak_gb_rank0": max(peaks) if peaks else None,
        "final_train_loss": trained[-1]["train_loss"] if trained else None,
    }


def main_fsdp(args: argparse.Namespace) -> int:
    """`--parallelism fsdp`: ftrecipe alone, one torchrun rank per GPU, for each variant."""
    info = machine() | gpu_facts()
    ranks = fsdp_ranks(args.nproc)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ftrecipe-bench-fsdp-") as tmp:
        work = Path(tmp)
        data = prepare_dataset(work, args.tests)
        examples = sum(1 for _ in (data / "train.jsonl").open(encoding="utf-8"))
        plan = [
            {
                "variant": variant,
                "sides": ["ftrecipe"],
                "ranks": ranks,
                "estimated_gib_per_gpu_without_checkpointing": fsdp_memory_estimate(
                    args.shape, args, VARIANTS[variant], ranks
                ),
                "problem": fsdp_problem(variant),
            }
            for variant in args.variants
        ]
        print(f"shape {args.shape}, fsdp over {ranks} ranks; data: {examples} examples")
        for item in plan:
            state = f"cannot run: {item['problem']}" if item["problem"] else "runs"
            estimate = item["estimated_gib_per_gpu_without_checkpointing"]
            print(f"  {item['variant']}: {state}; estimate {estimate} GiB per GPU")
        document: dict[str, Any] = {
            "benchmark": "train_gpu",
            "machine": info,
            "dry_run": args.dry_run,
            "params": _params(args, examples) | {"parallelism": "fsdp", "ranks": ranks},
            "plan": plan,
            "runs": results,
        }
        if args.dry_run:
            write_json(args.json, document)
            return 0
        model = build_base_model(work / "model", args.shape)
        for item in plan:
            if item["problem"]:
                results.append({"variant": item["variant"], "state": "skipped", "reason": item["problem"]})
                continue
            run = run_fsdp(args, data, model, work, VARIANTS[item["variant"]], ranks)
            results.append(run | {"variant": item["variant"], "side": "ftrecipe"})
            print(f"  {item['variant']}: {run['state']} {run.get('reason', '')}", flush=True)
    print()
    columns = ["variant", "ranks", "steps", "tokens/s", "rank 0 GPU peak (GB)", "wall (s)", "state"]
    print(
        table(
            columns,
            [
                [
                    r["variant"],
                    r.get("ranks"),
                    r.get("steps"),
                    r.get("tokens_per_s"),
                    r.get("gpu_peak_gb_rank0"),
                    r.get("wall_s"),
                    r["state"] if r["state"] == "ok" else f"{r['state']}: {r.get('reason', '')}",
                ]
                for r in results
            ],
        )
    )
    write_json(args.json, document)
    return 0 if any(r["state"] == "ok" for r in results) else 1


def gpu_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpus"] = torch.cuda.device_count()
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        facts["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    for package in ("transformers", "peft", "trl", "bitsandbytes", "flash_attn", "liger_kernel"):
        try:
            facts[package] = __import__(package).__version__
        except Exception:  # not installed, or its import fails on this machine: either way, absent
            facts[package] = None
    return facts


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parallelism == "fsdp":
        return main_fsdp(args)
    info = machine() | gpu_facts()
    results: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    plan: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ftrecipe-bench-gpu-") as tmp:
        work = Path(tmp)
        data = prepare_dataset(work, args.tests)
        examples = sum(1 for _ in (data / "train.jsonl").open(encoding="utf-8"))
        for variant in args.variants:
            quantization = VARIANTS[variant]
            args.quantization = quantization
            plan.append(
                {
                    "variant": variant,
                    "sides": list(DEFAULT_SIDES),
                    "ftrecipe_settings": shared_settings(args),
                    "estimated_gib_without_checkpointing": memory_estimates(args.shape, args, quantization),
                    "problem": variant_problem(variant),
                }
            )
        print(f"shape {args.shape}: {json.dumps(shape_config(args.shape))}; data: {examples} examples")
        for item in plan:
            state = f"cannot run here: {item['problem']}" if item["problem"] else "runs"
            print(f"  {item['variant']}: {state}; estimate {item['estimated_gib_without_checkpointing']} GiB")
        if args.dry_run:
            write_json(
                args.json,
                {
                    "benchmark": "train_gpu",
                    "machine": info,
                    "dry_run": True,
                    "params": _params(args, examples),
                    "plan": plan,
                    "runs": [],
                },
            )
            return 0
        started = time.monotonic()
        model = build_base_model(work / "model", args.shape)
        print(f"base model built in {time.monotonic() - started:.0f} s", flush=True)
        for item in plan:
            variant = item["variant"]
            if item["problem"]:
                results.append(
                    {"variant": variant, "side": "both", "state": "skipped", "reason": item["problem"]}
                )
                continue
            runs = []
            for repeat, side in interleaved(DEFAULT_SIDES, args.repeats):
                run = run_worker(
                    side, args, data, model, work, quantization=VARIANTS[variant], timeout=args.timeout
                )
                run |= {"variant": variant, "repeat": repeat}
                runs.append(run)
                print(
                    f"  {variant} {side} run {repeat + 1}: {run['state']} {run.get('reason', '')}", flush=True
                )
            results += runs
            comparison = compare(runs, "ftrecipe")
            if comparison is not None:
                comparisons.append(comparison | {"variant": variant})
    print()
    print(
        table(
            ["variant", "side", "steps", "non-padding tokens/s", "padding", "step peak (MiB)", "state"],
            [
                [
                    r["variant"],
                    r["side"],
                    r.get("steps"),
                    r.get("real_tokens_per_s"),
                    f"{100 * r['padding_share']:.1f} %" if "padding_share" in r else None,
                    r.get("step_peak_mib"),
                    r["state"] if r["state"] == "ok" else f"{r['state']}: {r.get('reason', '')}",
                ]
                for r in results
            ],
        )
    )
    for c in comparisons:
        print(
            f"{c['variant']}: ftrecipe / baseline non-padding tokens/s x{c['tokens_per_s_ratio']:.2f}, "
            f"step peak memory {c['step_peak_ratio']:.2f}x lower"
        )
    write_json(
        args.json,
        {
            "benchmark": "train_gpu",
            "machine": info,
            "dry_run": False,
            "params": _params(args, examples),
            "plan": plan,
            "runs": results,
            "comparisons": comparisons,
        },
    )
    return 0 if any(r["state"] == "ok" for r in results) else 1


def _params(args: argparse.Namespace, examples: int) -> dict[str, Any]:
    return {
        "shape": args.shape,
        "tests": args.tests,
        "examples": examples,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "gradient_checkpointing": args.gradient_checkpointing,
        "variants": args.variants,
        "repeats": args.repeats,
    }


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
