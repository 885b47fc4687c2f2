"""Training throughput and memory of `ftrecipe train` against a fair plain-Trainer baseline, side by side.

The data is prepare-data's real output on the MoneyBank example (`--tests` E2E tests generated from it by
`moneybank_suite`; labels from the assertions, no LLM, no rephrasings), its train split only, so neither
side evaluates. The model is `ftrecipe.training.tiny_model`, a random 2-layer Llama (hidden size 64)
with its small BPE tokenizer (the command-generator prompts are about 2,000 of its tokens long); with
`--vocab llama3` (the default) its embedding and LM head have Llama 3's 128,256 rows, so the logits
dominate a step's memory as they do at 8B; `--vocab tiny` keeps the tokenizer's 512.

* **baseline**: a plain `transformers.Trainer`: the same records rendered with the chat template, loss on
  the completion tokens (the prompt's labels -100, as ftrecipe's), `DataCollatorForSeq2Seq` padding each
  micro-batch to its longest example, random batch order, the model's own forward and loss (full
  logits), and peft LoRA with the recipe's default settings. Same weights dtype, attention kernels and
  autocast as ftrecipe picks on this machine, same gradient-checkpointing setting, same optimizer,
  learning rate, schedule, seed and micro-batch.
* **ftrecipe**: `ftrecipe train` itself (`ftrecipe.cli.main.main(["train", ...])`), with its defaults
  (length grouping or padding-free batches, the LM head only where labels are) and `--set` for the
  settings both sides share.
* **ftrecipe-full-logits** (`--sides`): the same with `hyperparameters.lossLogits=all`, to separate the
  loss lever from the batching.

Each side runs in its own process, `--repeats` times, interleaved (baseline, ftrecipe; then ftrecipe,
baseline; ...), so a change in the machine's load hits both. Measured in each process, the same way on
both sides (`transformers.Trainer.train` and `.training_step` are wrapped on the class; nothing else
changes): the wall time of `train()`, the real (attention mask 1, or every token of a padding-free
row), padded and loss tokens of every micro-batch, and the peak memory of every optimizer step. On the
CPU that is the process's peak resident set: the kernel's high-water mark (VmHWM) is reset at the start
of each step (`/proc/self/clear_refs`, value 5) and read at the next one, so each step's peak counts
only that step (model, data and Python are in it, equal on both sides; the resident set when the first
step starts is reported too). On CUDA, `torch.cuda.max_memory_allocated()` with the peak reset per step.

    .venv/bin/python benchmarks/train_throughput.py [--vocab llama3|tiny] [--tests 10] [--epochs 1]
        [--batch-size 2] [--gradient-checkpointing on|off] [--repeats 2]
        [--sides baseline ftrecipe ftrecipe-full-logits] [--json output/benchmarks/train_throughput.json]
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUTPUT, machine, table, write_json

SIDES = ("baseline", "ftrecipe", "ftrecipe-full-logits")
DEFAULT_SIDES = ("baseline", "ftrecipe")
QUANTIZATION = ("none", "4bit", "8bit")
CLEAR_REFS = Path("/proc/self/clear_refs")


def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings both sides share (and that train_gpu.py passes on to the same workers)."""
    parser.add_argument("--tests", type=int, default=10, help="E2E tests the data is prepared from")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2, help="micro-batch (no gradient accumulation)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-seq-length", type=int, default=4096)
    parser.add_argument(
        "--gradient-checkpointing", choices=("on", "off"), default="on", help="on both sides (default on)"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_shared_arguments(parser)
    parser.add_argument("--vocab", choices=("llama3", "tiny"), default="llama3")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, interleaved")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(DEFAULT_SIDES))
    parser.add_argument("--json", type=Path, default=OUTPUT / "train_throughput.json")
    # Internal: one side's run in a child process.
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--quantization", choices=QUANTIZATION, default="none", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ worker side


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class StepMeter:
    """Wraps `Trainer.train` and `Trainer.training_step` (on the class): tokens, time and peak memory per step.

    The peak of step N is the high-water mark between the start of step N and the start of step N + 1 (or
    the end of `train()`): its forward, backward, optimizer step and the next batch's collation.
    """

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.train_seconds = 0.0
        self.steps = 0
        self.micro_batches = 0
        self.real_tokens = 0
        self.total_tokens = 0
        self.loss_tokens = 0
        self.step_seconds: list[float] = []
        self.step_peak_mib: list[float] = []
        self.rss_at_first_step_mib: float | None = None
        self.peak_before_training_mib: float | None = None  # loading, tokenizing (the HWM resets lose it)
        self.memory_method = "cuda max_memory_allocated, reset per step" if self.cuda else "VmHWM per step"
        self._open = False

    def _reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            return
        try:
            CLEAR_REFS.write_text("5")  # VmHWM := VmRSS (Linux 4.0+)
        except OSError:
            self.memory_method = "VmHWM of the whole run (/proc/self/clear_refs not writable)"

    def _close_step(self) -> None:
        if not self._open:
            return
        if self.cuda:
            import torch

            self.step_peak_mib.append(torch.cuda.max_memory_allocated() / 2**20)
        else:
            self.step_peak_mib.append(_vm_kib("VmHWM") / 1024)
        self._open = False

    def _count(self, inputs: Any) -> None:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        # Padding-free batches are one row with no attention mask: every token is real.
        self.real_tokens += int(mask.sum()) if mask is not None else int(ids.numel())
        self.total_tokens += int(ids.numel())
        labels = inputs.get("labels")
        if labels is not None:
            self.loss_tokens += int((labels != -100).sum())

    def install(self) -> None:
        from transformers import Trainer

        original_train, original_step = Trainer.train, Trainer.training_step
        meter = self

        def train(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return original_train(trainer, *args, **kwargs)
            finally:
                meter._close_step()
                meter.train_seconds += time.monotonic() - started
                meter.steps = int(trainer.state.global_step)

        def training_step(trainer: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            meter._close_step()
            if meter.rss_at_first_step_mib is None:
                meter.rss_at_first_step_mib = _vm_kib("VmRSS") / 1024
                meter.peak_before_training_mib = _vm_kib("VmHWM") / 1024
            meter._count(inputs)
            meter._reset()
            meter._open = True
            started = time.monotonic()
            try:
                return original_step(trainer, model, inputs, *args, **kwargs)
            finally:
                meter.step_seconds.append(time.monotonic() - started)
                meter.micro_batches += 1

        setattr(Trainer, "train", train)  # noqa: B010
        setattr(Trainer, "training_step", training_step)  # noqa: B010


def shared_settings(args: argparse.Namespace) -> list[str]:
    """`--set` values for `ftrecipe train`; the baseline's TrainingArguments mirror them."""
    settings = [
        f"hyperparameters.epochs={args.epochs}",
        f"hyperparameters.batchSize={args.batch_size}",
        "hyperparameters.gradientAccumulationSteps=1",
        f"hyperparameters.learningRate={args.learning_rate}",
        f"hyperparameters.maxSeqLength={args.max_seq_length}",
        "hyperparameters.warmupSteps=0",
        f"hyperparameters.gradientCheckpointing={'true' if args.gradient_checkpointing == 'on' else 'false'}",
        "checkpointEverySteps=100000",
    ]
    if args.quantization != "none":
        settings += ["method=qlora", f"quantization={args.quantization}"]
    return settings


def run_ftrecipe(args: argparse.Namespace, full_logits: bool) -> None:
    import contextlib
    import io

    from ftrecipe.cli.main import main as ftrecipe_main

    argv = ["train", "--data", str(args.data), "--base-model", str(args.model)]
    argv += ["--out", str(args.work / "out"), "--work-dir", str(args.work / "work")]
    settings = shared_settings(args) + (["hyperparameters.lossLogits=all"] if full_logits else [])
    for setting in settings:
        argv += ["--set", setting]
    with contextlib.redirect_stdout(io.StringIO()):  # the JSON progress lines
        code = ftrecipe_main(argv)
    if code != 0:
        raise SystemExit(f"ftrecipe train exited with {code}")


def baseline_features(tokenizer: Any, data: Path, max_seq_length: int) -> list[dict[str, list[int]]]:
    """Each record rendered with the chat template; labels -100 on the prompt (the rendered messages up to
    the assistant's header), the completion's tokens after it; longer than `max_seq_length`: left out."""
    features = []
    with (data / "train.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            if "messages" in record:
                messages = record["messages"]
            else:
                messages = [
                    {"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]},
                ]
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if len(ids) <= max_seq_length:
                labels = [-100] * prompt_length + ids[prompt_length:]
                features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return features


def run_baseline(args: argparse.Namespace) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from ftrecipe.training.config import TrainConfig
    from ftrecipe.training.trainer import machine_precision

    recipe = TrainConfig()  # the recipe's defaults: LoRA settings, weight decay, schedule, seed
    precision = machine_precision()  # the dtype, kernels and autocast ftrecipe picks on this machine
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    features = baseline_features(tokenizer, args.data, args.max_seq_length)
    gradient_checkpointing = args.gradient_checkpointing == "on"
    kwargs: dict[str, Any] = {"dtype": precision.torch_dtype(), "attn_implementation": precision.attention}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    if args.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=precision.torch_dtype(),
        )
    elif args.quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    set_seed(recipe.hyperparameters.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if args.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        bias=recipe.lora.bias,
        target_modules=list(recipe.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    hp = recipe.hyperparameters
    training = TrainingArguments(
        output_dir=str(args.work / "baseline"),
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        weight_decay=hp.weight_decay,
        lr_scheduler_type=hp.scheduler,
        seed=hp.seed,
        data_seed=hp.seed,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        bf16=precision.mixed_precision == "bf16",
        fp16=precision.mixed_precision == "fp16",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=10,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    Trainer(model=peft_model, args=training, train_dataset=features, data_collator=collator).train()


def worker(args: argparse.Namespace) -> int:
    import torch

    meter = StepMeter()
    meter.install()
    if args.worker == "baseline":
        run_baseline(args)
    else:
        run_ftrecipe(args, full_logits=args.worker == "ftrecipe-full-logits")
    result = {
        "train_seconds": meter.train_seconds,
        "steps": meter.steps,
        "micro_batches": meter.micro_batches,
        "real_tokens": meter.real_tokens,
        "total_tokens": meter.total_tokens,
        "loss_tokens": meter.loss_tokens,
        "step_seconds": meter.step_seconds,
        "step_peak_mib": meter.step_peak_mib,
        "rss_at_first_step_mib": meter.rss_at_first_step_mib,
        "peak_before_training_mib": meter.peak_before_training_mib,
        "memory_method": meter.memory_method,
        "cuda": meter.cuda,
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


def build_model(target: Path, vocab: str) -> Path:
    from ftrecipe.training.tiny_model import LLAMA3_VOCAB_SIZE, build_tiny_model

    return build_tiny_model(target, model_vocab_size=LLAMA3_VOCAB_SIZE if vocab == "llama3" else None)


def example_lengths(model: Path, data: Path, max_seq_length: int) -> list[int]:
    from transformers import AutoTokenizer

    features = baseline_features(AutoTokenizer.from_pretrained(model), data, max_seq_length)
    return [len(f["input_ids"]) for f in features]


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


def run_worker(
    side: str,
    args: argparse.Namespace,
    data: Path,
    model: Path,
    work: Path,
    *,
    quantization: str = "none",
    python: str = sys.executable,
    timeout: float | None = None,
) -> dict[str, Any]:
    """One side in its own process; its figures, or {"state": "failed", "reason": ...}."""
    tag = side if quantization == "none" else f"{side}-{quantization}"
    result_file = work / f"{tag}-result.json"
    run_dir = work / f"{tag}-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    result_file.unlink(missing_ok=True)
    argv = [python, str(Path(__file__).resolve()), "--worker", side, "--quantization", quantization]
    argv += ["--data", str(data), "--model", str(model), "--work", str(run_dir), "--result", str(result_file)]
    argv += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    argv += ["--learning-rate", str(args.learning_rate), "--max-seq-length", str(args.max_seq_length)]
    argv += ["--gradient-checkpointing", args.gradient_checkpointing]
    started = time.monotonic()
    log_path = work / f"{tag}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = None if timeout is None else started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                process.kill()
                _, status, usage = os.wait4(process.pid, 0)
                return {"side": side, "quantization": quantization, "state": "failed", "reason": "timeout"}
            time.sleep(0.2)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if process.returncode != 0 or not result_file.is_file():
        lines = [line for line in log_path.read_text().splitlines() if line.strip()]
        reason = lines[-1][:300] if lines else f"exit code {process.returncode}"
        return {"side": side, "quantization": quantization, "state": "failed", "reason": reason}
    result: dict[str, Any] = json.loads(result_file.read_text())
    seconds = result["train_seconds"]
    peaks = result["step_peak_mib"]
    rest = result["rss_at_first_step_mib"]
    return {
        "side": side,
        "quantization": quantization,
        "state": "ok",
        "steps": result["steps"],
        "micro_batches": result["micro_batches"],
        "train_s": round(seconds, 3),
        "process_wall_s": round(wall, 3),
        "real_tokens": result["real_tokens"],
        "padding_tokens": result["total_tokens"] - result["real_tokens"],
        "padding_share": round(1 - result["real_tokens"] / result["total_tokens"], 4),
        "loss_tokens": result["loss_tokens"],
        "real_tokens_per_s": round(result["real_tokens"] / seconds, 1),
        "all_tokens_per_s": round(result["total_tokens"] / seconds, 1),
        "median_step_s": round(statistics.median(result["step_seconds"]), 3),
        "step_peak_mib": round(max(peaks), 1),
        "step_peak_median_mib": round(statistics.median(peaks), 1),
        # On the CPU: what a step adds to the resident set the process had when training started.
        "rss_at_first_step_mib": None if rest is None or result["cuda"] else round(rest, 1),
        "step_growth_mib": None if rest is None or result["cuda"] else round(max(peaks) - rest, 1),
        # wait4's maxrss alone is not the process's peak: resetting VmHWM per step lowers it too
        "process_peak_rss_mib": round(
            max(usage.ru_maxrss / 1024, result["peak_before_training_mib"] or 0, *peaks), 1
        ),
        "memory_method": result["memory_method"],
        "torch_threads": result["torch_threads"],
    }


def compare(runs: list[dict[str, Any]], side: str, against: str = "baseline") -> dict[str, Any] | None:
    """Best tokens/s of each side (the least disturbed run), and the largest step peak of each side."""
    ours = [r for r in runs if r["side"] == side and r["state"] == "ok"]
    theirs = [r for r in runs if r["side"] == against and r["state"] == "ok"]
    if not ours or not theirs:
        return None
    speed = max(r["real_tokens_per_s"] for r in ours) / max(r["real_tokens_per_s"] for r in theirs)
    peak_ours = max(r["step_peak_mib"] for r in ours)
    peak_theirs = max(r["step_peak_mib"] for r in theirs)
    comparison: dict[str, Any] = {
        "side": side,
        "against": against,
        "tokens_per_s_ratio": round(speed, 3),
        "step_peak_ratio": round(peak_theirs / peak_ours, 3),
    }
    growth_ours = [r["step_growth_mib"] for r in ours if r["step_growth_mib"] is not None]
    growth_theirs = [r["step_growth_mib"] for r in theirs if r["step_growth_mib"] is not None]
    if growth_ours and growth_theirs and max(growth_ours) > 0:
        comparison["step_growth_ratio"] = round(max(growth_theirs) / max(growth_ours), 3)
    comparison["memory_halved"] = comparison["step_peak_ratio"] >= 2
    comparison["tokens_per_s_not_lower"] = speed >= 1
    return comparison


def interleaved(sides: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """Run order: the sides in turn, reversed every other repeat (A B, B A, A B...)."""
    order = []
    for repeat in range(repeats):
        for side in sides if repeat % 2 == 0 else list(reversed(sides)):
            order.append((repeat, side))
    return order


def run_table(runs: list[dict[str, Any]]) -> str:
    return table(
        [
            "side",
            "steps",
            "train (s)",
            "non-padding tokens/s",
            "padding",
            "loss tokens",
            "step peak (MiB)",
            "of which the step (MiB)",
        ],
        [
            [
                f"{r['side']}"
                + (f" {r['quantization']}" if r["quantization"] != "none" else "")
                + (f" (run {r['repeat'] + 1})" if "repeat" in r else ""),
                r.get("steps", r["state"]),
                r.get("train_s", r.get("reason", "")),
                r.get("real_tokens_per_s"),
                f"{100 * r['padding_share']:.1f} %" if "padding_share" in r else None,
                r.get("loss_tokens"),
                r.get("step_peak_mib"),
                r.get("step_growth_mib"),
            ]
            for r in runs
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="ftrecipe-bench-train-") as tmp:
        work = Path(tmp)
        data = prepare_dataset(work, args.tests)
        model = build_model(work / "model", args.vocab)
        sizes = example_lengths(model, data, args.max_seq_length)
        config = json.loads((model / "config.json").read_text())
        print(
            f"model: tiny Llama, vocabulary {config['vocab_size']}, hidden {config['hidden_size']}; "
            f"data: {len(sizes)} train examples from {args.tests} tests, tokens per example "
            f"{min(sizes)}..{max(sizes)} (mean {statistics.mean(sizes):.0f}); micro-batch {args.batch_size}, "
            f"{args.epochs} epoch(s), gradient checkpointing {args.gradient_checkpointing}, "
            f"{args.repeats} run(s) of each side, interleaved",
            flush=True,
        )
        runs: list[dict[str, Any]] = []
        for repeat, side in interleaved(args.sides, args.repeats):
            run = run_worker(side, args, data, model, work) | {"repeat": repeat}
            runs.append(run)
            if run["state"] != "ok":
                raise SystemExit(f"{side} run {repeat + 1} failed: {run['reason']}")
            print(
                f"  {side} run {repeat + 1}: {run['train_s']:.1f} s, {run['real_tokens_per_s']:.0f} "
                f"non-padding tokens/s, step peak {run['step_peak_mib']:.0f} MiB",
                flush=True,
            )
    comparisons = [c for side in args.sides if side != "baseline" if (c := compare(runs, side))]
    simulated = [
        {
            "batch_size": size,
            "random_order": round(padding_share(sizes, size, grouped=False), 4),
            "length_grouped": round(padding_share(sizes, size, grouped=True), 4),
        }
        for size in sorted({2, 4, 8, 16, args.batch_size})
    ]
    print()
    print(run_table(runs))
    print()
    for c in comparisons:
        growth = f", the step's own growth {c['step_growth_ratio']:.2f}x" if "step_growth_ratio" in c else ""
        print(
            f"{c['side']} against {c['against']}: non-padding tokens/s x{c['tokens_per_s_ratio']:.2f} "
            f"(best runs), step peak memory {c['step_peak_ratio']:.2f}x lower (largest of each{growth})"
        )
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
                "vocab": args.vocab,
                "model_vocab_size": config["vocab_size"],
                "tests": args.tests,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "learning_rate": args.learning_rate,
                "max_seq_length": args.max_seq_length,
                "gradient_checkpointing": args.gradient_checkpointing,
                "repeats": args.repeats,
                "sides": args.sides,
            },
            "data": {
                "examples": len(sizes),
                "tokens_min": min(sizes),
                "tokens_mean": round(statistics.mean(sizes), 1),
                "tokens_max": max(sizes),
                "tokens_sd": round(statistics.pstdev(sizes), 1),
            },
            "runs": runs,
            "comparisons": comparisons,
            "padding_share_by_batch_size": simulated,
        },
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
