"""`ftrecipe train` on a GPU: precision, attention kernels, gradient checkpointing and QLoRA, side by side.

What the CPU tests cannot show: how fast and how big the real configurations are on CUDA. Each variant
runs `ftrecipe train` as its own process, as the training Job does, on the same data (prepare-data's
output on the generated MoneyBank suite, labels from the assertions, no LLM) and the same base model;
its figures come from what `ftrecipe train` itself reports: the `precision` event (weights dtype,
attention kernels, autocast), `metrics.jsonl` (tokens_per_second, gpu_memory_gb = peak allocated) and
the process's wall time.

The base model has random weights in a real model's shape, built on the GPU (the device machines reach
no hub): `llama-8b` is Llama-3.1-8B's configuration (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP
14336, vocabulary 128256), `llama-1b` Llama-3.2-1B's, `tiny` the test fixture (it runs on the CPU). The
tokenizer is the fixture's small BPE, so prompts are more tokens than with Llama-3's tokenizer; tokens/s
and memory are per token either way.

Variants (`--variants`): `lora` (the recipe's defaults on this GPU: bf16 autocast where the GPU has it,
flash attention 2 when flash-attn is installed, SDPA otherwise), `lora-gc` (plus gradient
checkpointing), `qlora-4bit` and `qlora-8bit` (bitsandbytes; skipped, with the reason, where it cannot
run). A variant that fails is reported as failed with its last error line; the others still run.

    .venv/bin/python benchmarks/train_gpu.py [--shape llama-8b] [--tests 40] [--batch-size 4]
        [--variants lora lora-gc qlora-4bit qlora-8bit] [--json output/benchmarks/train_gpu.json]

On a lent GPU machine (no registry there): carry the wheels the image lacks (bitsandbytes, and
flash-attn to compare kernels; see .library/device/README.md) and run this with the machine's python3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from train_throughput import prepare_dataset


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
    "tiny": None,  # the fixture's own shape
}
VARIANTS: dict[str, list[str]] = {
    "lora": [],
    "lora-gc": ["hyperparameters.gradientCheckpointing=true"],
    "qlora-4bit": ["method=qlora", "quantization=4bit"],
    "qlora-8bit": ["method=qlora", "quantization=8bit"],
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-8b")
    parser.add_argument("--tests", type=int, default=40, help="E2E tests the data is prepared from")
    parser.add_argument("--batch-size", type=int, default=4, help="micro-batch (no gradient accumulation)")
    parser.add_argument("--max-seq-length", type=int, default=4096)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one variant may run")
    parser.add_argument("--json", type=Path, default=OUTPUT / "train_gpu.json")
    return parser.parse_args(argv)


def build_base_model(target: Path, shape_name: str) -> Path:
    """The fixture's tokenizer with random weights of `shape_name`, in bf16, built on the GPU if any."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ftrecipe.training.tiny_model import build_tiny_model

    tiny = build_tiny_model(target.with_name(target.name + "-tiny"))
    shape = SHAPES[shape_name]
    if shape is None:
        return tiny
    config = AutoConfig.from_pretrained(tiny)
    for name, value in vars(shape).items():
        setattr(config, name, value)
    config.head_dim = shape.hidden_size // shape.num_attention_heads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = AutoModelForCausalLM.from_pretrained(tiny).generation_config
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(target)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return target


def run_variant(name: str, args: argparse.Namespace, data: Path, model: Path, work: Path) -> dict[str, Any]:
    """One `ftrecipe train` process; its figures from its own reports."""
    out, scratch = work / f"{name}-out", work / f"{name}-work"
    argv = [sys.executable, "-m", "ftrecipe.cli.main", "train", "--data", str(data)]
    argv += ["--base-model", str(model), "--out", str(out), "--work-dir", str(scratch)]
    settings = [
        "hyperparameters.epochs=1",
        f"hyperparameters.batchSize={args.batch_size}",
        "hyperparameters.gradientAccumulationSteps=1",
        f"hyperparameters.maxSeqLength={args.max_seq_length}",
        "hyperparameters.warmupSteps=0",
        "checkpointEverySteps=100000",
        *VARIANTS[name],
    ]
    for setting in settings:
        argv += ["--set", setting]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": name, "state": "failed", "reason": f"ran over {args.timeout:g} s"}
    wall = time.monotonic() - started
    (work / f"{name}.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {done.returncode}"
        state = "skipped" if "needs bitsandbytes" in reason else "failed"
        return {"variant": name, "state": state, "reason": reason[:300]}
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    precision = next((e for e in events if e["event"] == "precision"), {})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [row["tokens_per_second"] for row in rows if row.get("tokens_per_second")]
    memory = [row["gpu_memory_gb"] for row in rows if row.get("gpu_memory_gb") is not None]
    steps = max((row["step"] for row in rows), default=0)
    return {
        "variant": name,
        "state": "ok",
        "dtype": precision.get("dtype"),
        "attention": precision.get("attention"),
        "mixed_precision": precision.get("mixed_precision"),
        "steps": steps,
        # The first logging window includes warm-up (kernel selection, allocator growth): left out when
        # there are later ones.
        "tokens_per_s": round(statistics.median(speeds[1:] or speeds), 1) if speeds else None,
        "gpu_peak_gb": max(memory) if memory else None,
        "process_wall_s": round(wall, 1),
    }


def gpu_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpus"] = torch.cuda.device_count()
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        facts["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    for package in ("transformers", "peft", "bitsandbytes", "flash_attn"):
        try:
            facts[package] = __import__(package).__version__
        except Exception:  # not installed, or its import fails on this machine: either way, absent
            facts[package] = None
    return facts


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine() | gpu_facts()
    with tempfile.TemporaryDirectory(prefix="ftrecipe-bench-gpu-") as tmp:
        work = Path(tmp)
        data = prepare_dataset(work, args.tests)
        examples = sum(1 for _ in (data / "train.jsonl").open(encoding="utf-8"))
        started = time.monotonic()
        model = build_base_model(work / "model", args.shape)
        print(
            f"base model: {args.shape}, built in {time.monotonic() - started:.0f} s; data: {examples} examples"
        )
        runs = []
        for name in args.variants:
            run = run_variant(name, args, data, model, work)
            runs.append(run)
            print(
                f"  {name}: {run['state']}" + (f" ({run['reason']})" if "reason" in run else ""), flush=True
            )
    print()
    print(
        table(
            ["variant", "weights", "attention", "autocast", "steps", "tokens/s", "GPU peak (GB)", "wall (s)"],
            [
                [
                    r["variant"],
                    r.get("dtype", r["state"]),
                    r.get("attention", "-"),
                    r.get("mixed_precision") or "-",
                    r.get("steps", "-"),
                    r.get("tokens_per_s", "-"),
                    r.get("gpu_peak_gb", "-"),
                    r.get("process_wall_s", "-"),
                ]
                for r in runs
            ],
        )
    )
    write_json(
        args.json,
        {
            "benchmark": "train_gpu",
            "machine": info,
            "params": {
                "shape": args.shape,
                "tests": args.tests,
                "examples": examples,
                "batch_size": args.batch_size,
                "max_seq_length": args.max_seq_length,
                "variants": args.variants,
            },
            "runs": runs,
        },
    )
    return 0 if any(r["state"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
