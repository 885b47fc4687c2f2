"""Training throughput of `ftrecipe train` against a naive LoRA baseline, on this machine, tiny model.

The data is prepare-data's real output on the MoneyBank example (`--tests` E2E tests generated from it by
`moneybank_suite`; labels from the assertions, no LLM, no rephrasings), its train split only, so neither
side evaluates. The model is `ftrecipe.training.tiny_model` (a random 2-layer Llama, 512-token BPE
vocabulary: the command-generator prompts are about 2,000 of its tokens long).

* **ftrecipe**: `ftrecipe train` itself (`ftrecipe.cli.main.main(["train", ...])`): chat-template
  tokenization, completion-only labels, length-grouped batches, LoRA, its Trainer settings.
* **naive**: the plain recipe: the rendered chat tokenized whole, `DataCollatorForLanguageModeling`
  (padding to the longest in the batch, loss on every token), random batch order, the same peft LoRA
  (r 16, alpha 16, dropout 0.05 on q/k/v/o/gate/up/down) and the same Trainer settings otherwise.

Same examples, same micro-batch, same number of optimizer steps (whole epochs, so both see every example
equally often). Each side runs in its own process, `--repeats` times, alternating; the best run of each is
compared. Measured inside the process: the wall time of `Trainer.train()`, and the tokens of every batch
the collator builds (real and padding; the collator is wrapped, nothing else changes). Peak RSS is the
process's own (`wait4`), GPU memory `torch.cuda.max_memory_allocated()` when CUDA exists.

    .venv/bin/python benchmarks/train_throughput.py [--tests 210] [--epochs 1] [--batch-size 8]
        [--repeats 2] [--json output/benchmarks/train_throughput.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUTPUT, machine, table, write_json

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("ftrecipe", "naive")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=210, help="E2E tests the data is prepared from")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch (no gradient accumulation)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-seq-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--json", type=Path, default=OUTPUT / "train_throughput.json")
    # Internal: one side's run in a child process.
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ worker side


class CountingCollator:
    """Wraps a collator: counts the real (attention mask 1) and all tokens of every batch it builds."""

    def __init__(self, inner: Callable[[Any], dict[str, Any]]) -> None:
        self.inner = inner
        self.batches = 0
        self.real_tokens = 0
        self.total_tokens = 0
        self.loss_tokens = 0

    def __call__(self, features: Any) -> dict[str, Any]:
        batch = self.inner(features)
        self.batches += 1
        self.real_tokens += int(batch["attention_mask"].sum())
        self.total_tokens += int(batch["input_ids"].numel())
        self.loss_tokens += int((batch["labels"] != -100).sum())
        return batch


class TrainTimer:
    """Times `transformers.Trainer.train` (patched on the class; the callers do not change)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0

    def install(self) -> None:
        from transformers import Trainer

        original = Trainer.train
        timer = self

        def train(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return original(trainer, *args, **kwargs)
            finally:
                timer.seconds += time.monotonic() - started
                timer.steps = int(trainer.state.global_step)

        setattr(Trainer, "train", train)  # noqa: B010


def _settings(args: argparse.Namespace) -> list[str]:
    return [
        f"hyperparameters.epochs={args.epochs}",
        f"hyperparameters.batchSize={args.batch_size}",
        "hyperparameters.gradientAccumulationSteps=1",
        f"hyperparameters.learningRate={args.learning_rate}",
        f"hyperparameters.maxSeqLength={args.max_seq_length}",
        "hyperparameters.warmupSteps=0",
        "hyperparameters.gradientCheckpointing=false",
        "checkpointEverySteps=100000",
    ]


def run_ftrecipe(args: argparse.Namespace, counter: list[CountingCollator]) -> None:
    import contextlib
    import io

    import ftrecipe.training.trainer as trainer_module
    from ftrecipe.cli.main import main as ftrecipe_main
    from ftrecipe.training.data import Collator

    def collator(pad_token_id: int) -> CountingCollator:
        counter.append(CountingCollator(Collator(pad_token_id)))
        return counter[-1]

    # `ftrecipe train` builds its collator as `Collator(pad_token_id)`: the same one, counted.
    setattr(trainer_module, "Collator", collator)  # noqa: B010
    argv = ["train", "--data", str(args.data), "--base-model", str(args.model)]
    argv += ["--out", str(args.work / "out"), "--work-dir", str(args.work / "work")]
    for setting in _settings(args):
        argv += ["--set", setting]
    with contextlib.redirect_stdout(io.StringIO()):  # the JSON progress lines
        code = ftrecipe_main(argv)
    if code != 0:
        raise SystemExit(f"ftrecipe train exited with {code}")


def run_naive(args: argparse.Namespace, counter: list[CountingCollator]) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    features = []
    with (args.data / "train.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            chat = [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]},
            ]
            text = tokenizer.apply_chat_template(chat, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= args.max_seq_length:
                features.append({"input_ids": ids})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(
        r=16,
        lora_alpha=16,
        lora_dropout=0.05,
        bias="none",
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    counter.append(CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False)))
    training = TrainingArguments(
        output_dir=str(args.work / "naive"),
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=42,
        data_seed=42,
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=10,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    Trainer(model=peft_model, args=training, train_dataset=features, data_collator=counter[-1]).train()


def worker(args: argparse.Namespace) -> int:
    import torch

    counter: list[CountingCollator] = []
    timer = TrainTimer()
    timer.install()
    (run_ftrecipe if args.worker == "ftrecipe" else run_naive)(args, counter)
    (collator,) = counter
    result = {
        "train_seconds": timer.seconds,
        "steps": timer.steps,
        "batches": collator.batches,
        "real_tokens": collator.real_tokens,
        "total_tokens": collator.total_tokens,
        "loss_tokens": collator.loss_tokens,
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
    }
    args.result.write_text(json.dumps(result), encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------------------ parent side


def prepare_dataset(work: Path, tests: int) -> Path:
    """prepare-data's output on the generated suite (assertions annotator: no LLM); its train split."""
    from moneybank_suite import generate_assistant

    from ftrecipe.dataprep.pipeline import PrepareDataOptions, prepare_data

    suite = generate_assistant(work / "assistant", tests)
    options = PrepareDataOptions(
        e2e_paths=(suite.tests,),
        assistant=suite.assistant,
        annotator="assertions",
        num_rephrases=0,
        out=work / "prepared",
        cache_dir=work / "cache",
    )
    asyncio.run(prepare_data(options))
    data = work / "data"
    data.mkdir()
    shutil.copyfile(
        work / "prepared" / "4_train_test_split" / "ft_splits" / "train.jsonl", data / "train.jsonl"
    )
    return data


def lengths(model: Path, data: Path, max_seq_length: int) -> list[int]:
    from transformers import AutoTokenizer

    from ftrecipe.training.data import tokenize_file

    tokenizer = AutoTokenizer.from_pretrained(model)
    return [
        len(e["input_ids"]) for e in tokenize_file(tokenizer, data / "train.jsonl", max_seq_length).examples
    ]


def padding_share(sizes: list[int], batch_size: int, grouped: bool, seeds: int = 20) -> float:
    """Padding share of one epoch's batches in the order the Trainer's sampler gives (mean over seeds)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    shares = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        if grouped:
            order = list(LengthGroupedSampler(batch_size, lengths=sizes, generator=generator))
        else:
            order = torch.randperm(len(sizes), generator=generator).tolist()
        real = total = 0
        for start in range(0, len(order), batch_size):
            batch = [sizes[i] for i in order[start : start + batch_size]]
            real += sum(batch)
            total += max(batch) * len(batch)
        shares.append(1 - real / total)
    return statistics.mean(shares)


def run_worker(variant: str, args: argparse.Namespace, data: Path, model: Path, work: Path) -> dict[str, Any]:
    result_file = work / f"{variant}-result.json"
    run_dir = work / f"{variant}-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", variant]
    argv += ["--data", str(data), "--model", str(model), "--work", str(run_dir), "--result", str(result_file)]
    argv += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    argv += ["--learning-rate", str(args.learning_rate), "--max-seq-length", str(args.max_seq_length)]
    started = time.monotonic()
    with (work / f"{variant}.log").open("w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if process.returncode != 0:
        tail = (work / f"{variant}.log").read_text()[-3000:]
        raise SystemExit(f"{variant} worker failed ({process.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(result_file.read_text())
    seconds = result["train_seconds"]
    return {
        "variant": variant,
        "steps": result["steps"],
        "batches": result["batches"],
        "train_s": round(seconds, 3),
        "process_wall_s": round(wall, 3),
        "real_tokens": result["real_tokens"],
        "padding_tokens": result["total_tokens"] - result["real_tokens"],
        "padding_share": round(1 - result["real_tokens"] / result["total_tokens"], 4),
        "loss_tokens": result["loss_tokens"],
        "real_tokens_per_s": round(result["real_tokens"] / seconds, 1),
        "all_tokens_per_s": round(result["total_tokens"] / seconds, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "gpu_peak_gib": result["gpu_peak_gib"],
        "torch_threads": result["torch_threads"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    info = machine()
    from ftrecipe.training.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="ftrecipe-bench-train-") as tmp:
        work = Path(tmp)
        data = prepare_dataset(work, args.tests)
        model = build_tiny_model(work / "model")
        sizes = lengths(model, data, args.max_seq_length)
        print(
            f"data: {len(sizes)} train examples from {args.tests} tests, tokens per example "
            f"{min(sizes)}..{max(sizes)} (mean {statistics.mean(sizes):.0f}, sd {statistics.pstdev(sizes):.0f}); "
            f"micro-batch {args.batch_size}, {args.epochs} epoch(s), {args.repeats} run(s) of each side"
        )
        runs: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            for variant in VARIANTS:
                run = run_worker(variant, args, data, model, work) | {"repeat": repeat}
                runs.append(run)
                print(
                    f"  {variant} run {repeat + 1}: {run['train_s']:.1f} s, "
                    f"{run['real_tokens_per_s']:.0f} non-padding tokens/s"
                )
    best = {
        variant: max((r for r in runs if r["variant"] == variant), key=lambda r: r["real_tokens_per_s"])
        for variant in VARIANTS
    }
    speedup = best["ftrecipe"]["real_tokens_per_s"] / best["naive"]["real_tokens_per_s"]
    simulated = [
        {
            "batch_size": size,
            "random_order": round(padding_share(sizes, size, grouped=False), 4),
            "length_grouped": round(padding_share(sizes, size, grouped=True), 4),
        }
        for size in sorted({2, 4, 8, 16, args.batch_size})
    ]
    print()
    print(
        table(
            [
                "side",
                "steps",
                "train (s)",
                "non-padding tokens/s",
                "padding share",
                "loss tokens",
                "peak RSS (MiB)",
            ],
            [
                [
                    f"{r['variant']} (run {r['repeat'] + 1})",
                    r["steps"],
                    r["train_s"],
                    r["real_tokens_per_s"],
                    f"{100 * r['padding_share']:.1f} %",
                    r["loss_tokens"],
                    r["peak_rss_mib"],
                ]
                for r in runs
            ],
        )
    )
    print(f"\nbest of each: ftrecipe / naive non-padding tokens/s = {speedup:.2f}")
    print("\npadding share of one epoch by micro-batch size (sampler replayed, 20 seeds):")
    print(
        table(
            ["micro-batch", "random order", "length-grouped"],
            [
                [s["batch_size"], f"{100 * s['random_order']:.1f} %", f"{100 * s['length_grouped']:.1f} %"]
                for s in simulated
            ],
        )
    )
    write_json(
        args.json,
        {
            "benchmark": "train_throughput",
            "machine": info,
            "params": {
                "tests": args.tests,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "learning_rate": args.learning_rate,
                "max_seq_length": args.max_seq_length,
                "repeats": args.repeats,
            },
            "data": {
                "examples": len(sizes),
                "tokens_min": min(sizes),
                "tokens_mean": round(statistics.mean(sizes), 1),
                "tokens_max": max(sizes),
                "tokens_sd": round(statistics.pstdev(sizes), 1),
            },
            "runs": runs,
            "best": best,
            "speedup_non_padding_tokens_per_s": round(speedup, 3),
            "padding_share_by_batch_size": simulated,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
