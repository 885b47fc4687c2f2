"""`ftrecipe train` on CPU with the tiny model: labels, data handling, training, bundle, resume, errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="training needs the 'train' extra")
pytest.importorskip("peft", reason="training needs the 'train' extra")

from ftrecipe.api.v1alpha1 import TrainingSpec
from ftrecipe.cli.main import main
from ftrecipe.termination import decode
from ftrecipe.training.config import ConfigError, load_train_config
from ftrecipe.training.data import DEFAULT_CHAT_TEMPLATE, ensure_chat_template, find_splits
from ftrecipe.training.launch import launch_command
from ftrecipe.training.sft import FtrecipeSFTTrainer, SplitCounts, read_dataset
from ftrecipe.training.tiny_model import EOS_TOKEN
from ftrecipe.training.trainer import Precision, TrainError, choose_precision

IGNORE_INDEX = -100  # the label of a token without loss (transformers, TRL)

FLOWS = {
    "transfer_money": "I want to send some money to my friend.",
    "check_balance": "what is my balance?",
    "add_contact": "add Mary as a new contact",
}
METRIC_KEYS = {
    "step",
    "epoch",
    "train_loss",
    "eval_loss",
    "learning_rate",
    "tokens_per_second",
    "gpu_memory_gb",
}
BUNDLE_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "training_config.json",
    "metrics.jsonl",
    "loss_curve.png",
    "run.json",
    "README.md",
    "manifest.json",
    "_SUCCESS",
}
# Fast settings for the tiny model: no warm-up, big learning rate, no gradient checkpointing.
FAST = [
    "hyperparameters.learningRate=1e-2",
    "hyperparameters.maxSeqLength=256",
    "hyperparameters.batchSize=4",
    "hyperparameters.gradientAccumulationSteps=1",
    "hyperparameters.warmupSteps=0",
    "hyperparameters.gradientCheckpointing=false",
]


def _instruction(i: int) -> dict[str, str]:
    flow = list(FLOWS)[i % len(FLOWS)]
    return {
        "prompt": f"Here is what happened previously in the conversation:\nUSER: {FLOWS[flow]}\n"
        "Based on this information generate a list of actions you want to take.",
        "completion": f"start flow {flow}",
    }


def _conversational(i: int) -> dict[str, Any]:
    record = _instruction(i)
    return {
        "messages": [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    }


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _make_data(root: Path, n_train: int = 24, n_val: int = 6) -> Path:
    """prepare-data's layout; train in the instruction format, val in the conversational one."""
    splits = root / "4_train_test_split" / "ft_splits"
    _write_jsonl(splits / "train.jsonl", [_instruction(i) for i in range(n_train)])
    _write_jsonl(splits / "val.jsonl", [_conversational(i) for i in range(n_val)])
    return root


def _sets(*extra: str) -> list[str]:
    args: list[str] = []
    for item in (*FAST, *extra):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


# --------------------------------------------------------------------------------------------- config


def test_config_defaults_are_the_recipe_defaults() -> None:
    config = load_train_config()
    reference = TrainingSpec.model_validate({"baseModel": {"local": {"path": "m"}}})
    assert config.base_model is None
    assert config.model_dump(exclude={"base_model"}) == reference.model_dump(exclude={"base_model"})
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (16, 16, 0.05)
    hp = config.hyperparameters
    assert (hp.epochs, hp.learning_rate, hp.batch_size, hp.gradient_accumulation_steps) == (3, 1e-4, 2, 4)
    assert (hp.max_seq_length, hp.warmup_steps, hp.weight_decay, hp.seed) == (4096, 20, 0.01, 42)


def test_config_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "training.yaml"
    path.write_text(
        "training:\n  lora: {r: 8}\n  hyperparameters: {epochs: 5, scheduler: cosine}\n", encoding="utf-8"
    )
    config = load_train_config(
        path, ["hyperparameters.epochs=1", "hyperparameters.learningRate=1e-2", "lora.targetModules=[q_proj]"]
    )
    assert config.lora.r == 8
    assert config.lora.target_modules == ["q_proj"]
    assert config.hyperparameters.epochs == 1
    assert config.hyperparameters.learning_rate == 0.01
    assert config.hyperparameters.scheduler == "cosine"
    with pytest.raises(ConfigError, match="unknown field 'epoch'"):
        load_train_config(None, ["hyperparameters.epoch=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_train_config(None, ["hyperparameters.epochs"])


# --------------------------------------------------------------------------------------------- data


def _sft_trainer(
    model_dir: Path, tokenizer: Any, train: Path, val: Path | None = None, **kwargs: Any
) -> FtrecipeSFTTrainer:
    """ftrecipe's SFTTrainer over the split files, as `ftrecipe train` builds it (nothing trained here)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_config import SFTConfig

    args = SFTConfig(
        output_dir=str(train.parent / "sft-out"),
        max_length=None,
        completion_only_loss=True,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        disable_tqdm=True,
    )
    return FtrecipeSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=read_dataset(train),
        eval_dataset=read_dataset(val) if val is not None else None,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
        max_seq_length=kwargs.pop("max_seq_length", 256),
        **kwargs,
    )


def _labelled(example: dict[str, Any]) -> list[int]:
    return [label for label in example["labels"] if label != IGNORE_INDEX]


def test_loss_covers_exactly_the_completion(tokenizer: Any, tiny_model: Path, tmp_path: Path) -> None:
    """TRL tokenizes; the loss is on the answer and its end of turn, never on the prompt."""
    train = _write_jsonl(tmp_path / "train.jsonl", [_instruction(0), _conversational(1)])
    trainer = _sft_trainer(tiny_model, tokenizer, train)
    first, second = trainer.train_dataset[0], trainer.train_dataset[1]
    # Written down from the tiny model's tokenizer: 78 and 68 tokens, of which the answer is 6 each
    # ("start flow transfer_money" is 5 tokens, then <|eot_id|>).
    assert (len(first["input_ids"]), len(_labelled(first))) == (78, 6)
    assert (len(second["input_ids"]), len(_labelled(second))) == (68, 6)
    assert tokenizer.decode(_labelled(first)) == "start flow transfer_money" + EOS_TOKEN
    assert tokenizer.decode(_labelled(second)) == "start flow check_balance" + EOS_TOKEN
    # the labelled tokens are the last ones, labelled with themselves; the rest is the served prompt
    n_prompt = len(first["input_ids"]) - 6
    assert first["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert first["labels"][n_prompt:] == first["input_ids"][n_prompt:]
    messages = [{"role": "user", "content": _instruction(0)["prompt"]}]
    served = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(first["input_ids"][:n_prompt]) == served


def test_both_formats_tokenize_the_same(tokenizer: Any, tiny_model: Path, tmp_path: Path) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", [_instruction(1), _conversational(1)])
    trainer = _sft_trainer(tiny_model, tokenizer, train)
    a, b = trainer.train_dataset[0], trainer.train_dataset[1]
    assert (a["input_ids"], a["labels"]) == (b["input_ids"], b["labels"])


def test_too_long_examples_are_dropped_and_counted(tokenizer: Any, tiny_model: Path, tmp_path: Path) -> None:
    long = {"prompt": "what is my balance? " * 200, "completion": "start flow check_balance"}
    train = _write_jsonl(tmp_path / "train.jsonl", [_instruction(0), long, _conversational(2), long])
    val = _write_jsonl(tmp_path / "val.jsonl", [long, _instruction(1)])
    trainer = _sft_trainer(tiny_model, tokenizer, train, val, max_seq_length=128)
    assert trainer.counts == {
        "train": SplitCounts(total=4, dropped_too_long=2),
        "eval": SplitCounts(total=2, dropped_too_long=1),
    }
    assert len(trainer.train_dataset) == 2 and len(trainer.eval_dataset) == 1
    kept = [*trainer.train_dataset, *trainer.eval_dataset]
    assert all(len(ex["input_ids"]) <= 128 for ex in kept)
    # nothing is ever cut: every kept example still ends with its end of turn
    eot = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert all(ex["input_ids"][-1] == eot and ex["labels"][-1] == eot for ex in kept)


def test_default_chat_template_when_the_model_has_none(
    tokenizer: Any, tiny_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    bare = AutoTokenizer.from_pretrained(tmp_path / "tok")
    bare.chat_template = None
    assert ensure_chat_template(bare) is True
    train = _write_jsonl(tmp_path / "train.jsonl", [_instruction(0)])
    example = _sft_trainer(tiny_model, bare, train).train_dataset[0]
    # the answer and eos, nothing after it (the template puts no separator after the assistant's turn)
    assert bare.decode(_labelled(example)) == "start flow transfer_money" + bare.eos_token
    prompt = bare.decode(example["input_ids"][: len(example["input_ids"]) - len(_labelled(example))])
    assert prompt.endswith("### User:\n" + _instruction(0)["prompt"] + "\n\n### Assistant:\n")
    bare.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template == DEFAULT_CHAT_TEMPLATE


def test_a_broken_record_names_its_line(tmp_path: Path) -> None:
    from ftrecipe.training.data import DataError

    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(_instruction(0)) + "\n" + '{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{train}:2: instruction record without a string 'completion'$"):
        read_dataset(train)


@pytest.mark.parametrize("num_items_in_batch", [None, 40])
def test_label_only_loss_equals_the_full_logits_loss(
    tokenizer: Any, tiny_model: Path, tmp_path: Path, num_items_in_batch: int | None
) -> None:
    """lossLogits labels (the default) and all: the same loss and LoRA gradients on a padded batch;
    the label-only path returns no logits at all."""
    import torch

    train = _write_jsonl(tmp_path / "train.jsonl", [_instruction(0), _conversational(1), _instruction(2)])
    trainer = _sft_trainer(tiny_model, tokenizer, train)
    assert trainer.loss_logits == "labels" and trainer.label_head_problem is None
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # really padded
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 18  # 6 per example
    model = trainer.model
    model.eval()  # no dropout: both passes see the same network

    def loss_and_grads(setting: str) -> tuple[float, list[Any]]:
        trainer.loss_logits = setting
        model.zero_grad()
        loss, outputs = trainer.compute_loss(
            model, dict(batch), return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        loss.backward()
        if setting == "labels":
            assert getattr(outputs, "logits", None) is None
        else:
            assert outputs.logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return float(loss.detach()), grads

    labels_loss, labels_grads = loss_and_grads("labels")
    full_loss, full_grads = loss_and_grads("all")
    assert labels_loss == pytest.approx(full_loss, rel=1e-5)
    assert len(labels_grads) == len(full_grads) == 4  # q_proj LoRA A and B, 2 layers
    for a, b in zip(labels_grads, full_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert any(float(g.abs().sum()) > 0 for g in labels_grads)


def test_padding_free_batches_reach_the_label_only_loss(
    tokenizer: Any, tiny_model: Path, tmp_path: Path
) -> None:
    """TRL's padding-free batch (position ids, sequence boundaries for varlen kernels, no attention mask)
    goes through the label-only loss: for one example, the same loss as its padded batch. (Several examples
    in a row need flash attention to stay apart, which this CPU has not.)"""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    train = _write_jsonl(tmp_path / "train.jsonl", [_instruction(0)])
    trainer = _sft_trainer(tiny_model, tokenizer, train)
    trainer.model.eval()
    example = trainer.train_dataset[0]
    features = [{"input_ids": example["input_ids"], "labels": example["labels"]}]
    losses = {}
    for padding_free in (False, True):
        collate = DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=padding_free)
        batch = collate(features)
        assert ("position_ids" in batch) is padding_free and ("attention_mask" in batch) is not padding_free
        losses[padding_free] = float(trainer.compute_loss(trainer.model, dict(batch)).detach())
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_find_splits_layouts(tmp_path: Path) -> None:
    nested = _make_data(tmp_path / "nested")
    assert find_splits(nested).train == nested / "4_train_test_split" / "ft_splits" / "train.jsonl"
    flat = tmp_path / "flat"
    _write_jsonl(flat / "train.jsonl", [_instruction(0)])
    splits = find_splits(flat)
    assert (splits.train, splits.val) == (flat / "train.jsonl", None)


# --------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CLI run in-process: 4 epochs on 24 examples, eval each epoch and every 5 steps."""
    root = tmp_path_factory.mktemp("train")
    data = _make_data(root / "data")
    termination = root / "termination-log"
    termination.write_text("", encoding="utf-8")
    out = root / "out" / "moneybank-lora"
    stdout = io.StringIO()
    started = time.monotonic()
    previous = os.environ.get("FTRECIPE_TERMINATION_LOG")
    os.environ["FTRECIPE_TERMINATION_LOG"] = str(termination)
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(
                [
                    "train",
                    "--data",
                    str(data),
                    "--base-model",
                    str(tiny_model),
                    "--out",
                    str(out),
                    "--work-dir",
                    str(root / "work"),
                    *_sets(
                        "hyperparameters.epochs=4",
                        "hyperparameters.evalEverySteps=5",
                        "checkpointEverySteps=1000",
                    ),
                ]
            )
    finally:
        if previous is None:
            os.environ.pop("FTRECIPE_TERMINATION_LOG", None)
        else:
            os.environ["FTRECIPE_TERMINATION_LOG"] = previous
    return {
        "code": code,
        "out": out,
        "stdout": stdout.getvalue(),
        "termination": termination.read_text(encoding="utf-8"),
        "seconds": time.monotonic() - started,
    }


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_training_lowers_the_validation_loss(trained: dict[str, Any]) -> None:
    assert trained["code"] == 0
    evals = [row["eval_loss"] for row in _metrics(trained["out"]) if row["eval_loss"] is not None]
    assert len(evals) >= 4  # each epoch end at least
    assert evals[-1] < evals[0] - 0.1, evals


def test_metrics_and_progress_lines(trained: dict[str, Any]) -> None:
    rows = _metrics(trained["out"])
    assert rows
    assert all(set(row) == METRIC_KEYS for row in rows)
    assert all(row["gpu_memory_gb"] is None for row in rows)  # CPU
    train_rows = [row for row in rows if row["train_loss"] is not None]
    assert train_rows and all(row["learning_rate"] is not None for row in train_rows)
    assert all(row["tokens_per_second"] > 0 for row in train_rows)
    events = [json.loads(line) for line in trained["stdout"].splitlines()]  # every line is JSON
    precision = [e for e in events if e["event"] == "precision"]
    assert precision == [
        {"event": "precision", "dtype": "float32", "attention": "sdpa", "mixed_precision": None}
    ]
    speed = [e for e in events if e["event"] == "speed"]  # CPU: no checkpointing, padded, label-only loss
    assert speed == [
        {"event": "speed", "gradient_checkpointing": False, "padding_free": False, "loss_logits": "labels"}
    ]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress
    assert set(progress[-1]) == {
        "event",
        "step",
        "total_steps",
        "epoch",
        "train_loss",
        "eval_loss",
        "eta_seconds",
    }
    assert progress[-1]["step"] == progress[-1]["total_steps"] == 24
    steps = [row["step"] for row in rows if row["eval_loss"] is not None]
    assert len(steps) == len(set(steps)), "evaluated twice at one step"


def test_bundle_is_complete_and_published(trained: dict[str, Any]) -> None:
    from ftrecipe.storage import bundle_complete, read_manifest

    out: Path = trained["out"]
    names = {p.name for p in out.iterdir()}
    assert names >= BUNDLE_FILES, BUNDLE_FILES - names
    assert bundle_complete(out)
    manifest = read_manifest(out)
    assert manifest is not None and manifest.producer == "ftrecipe train"
    # The manifest says what the adapter was trained from, without opening any file.
    assert manifest.metadata["baseModel"]["id"]
    assert manifest.metadata["dataset_hash"] == json.loads((out / "run.json").read_text())["dataset_hash"]
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "chat_template" in tokenizer_config or "chat_template.jinja" in names
    config = json.loads((out / "training_config.json").read_text(encoding="utf-8"))
    assert config["training"]["hyperparameters"]["learningRate"] == 0.01
    assert config["training"]["lora"]["targetModules"][0] == "q_proj"
    assert {"torch", "transformers", "peft"} <= set(config["versions"])
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["baseModel"]["id"] and len(run["dataset_hash"]) == 64
    assert (run["train_examples"], run["val_examples"], run["dropped_too_long"]) == (24, 6, 0)
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "--lora-modules moneybank-lora=/adapters/moneybank-lora" in readme  # test_train_bundle.py
    assert "provider: self-hosted" in readme
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = decode(trained["termination"])
    assert report is not None and report.ok and report.message.startswith("trained 24 steps")
    final_eval = [row["eval_loss"] for row in _metrics(trained["out"]) if row["eval_loss"] is not None][-1]
    assert report.figures["step"] == 24 and report.figures["eval_loss"] == pytest.approx(final_eval)


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing. is deprecated:FutureWarning")
def test_adapter_reloads_and_generates(trained: dict[str, Any], tiny_model: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out: Path = trained["out"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, out)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": _instruction(0)["prompt"]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


# --------------------------------------------------------------------------------------------- resume


def _train_process(tiny_model: Path, data: Path, work: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "ftrecipe.cli.main",
        "train",
        "--data",
        str(data),
        "--base-model",
        str(tiny_model),
        "--out",
        str(out),
        "--work-dir",
        str(work),
        *_sets(
            "hyperparameters.epochs=2",
            "hyperparameters.evalEverySteps=1000",
            "checkpointEverySteps=3",
            *extra,
        ),
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(process: subprocess.Popen[str], checkpoints: Path, timeout: float = 60) -> None:
    """Until a complete (published) `step-<N>` bundle is under `checkpoints`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if checkpoints.is_dir() and any(
            p.name.startswith("step-") and (p / "_SUCCESS").exists() for p in checkpoints.iterdir()
        ):
            return
        if process.poll() is not None:
            pytest.fail(f"training ended before its first checkpoint: {process.communicate()[1][-2000:]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("no checkpoint appeared")


@pytest.mark.slow
def test_killed_run_resumes_from_the_latest_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    """Killed, and its machine gone with the work folder: a rerun resumes from `<out>/checkpoints/`."""
    import shutil

    data = _make_data(tmp_path / "data")
    work, out = tmp_path / "work", tmp_path / "out"
    first = _train_process(tiny_model, data, work, out)
    _wait_for_checkpoint(first, out / "checkpoints")
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert first.returncode == -signal.SIGKILL
    assert not (out / "_SUCCESS").exists()
    shutil.rmtree(work)  # a new pod: only the durable copies are left

    second = _train_process(tiny_model, data, work, out)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr[-2000:]
    resumed = [line for line in stdout.splitlines() if line.startswith("resuming from step ")]
    assert resumed, stdout
    step = int(resumed[0].rsplit(" ", 1)[1])
    assert step > 0 and step % 3 == 0
    progress = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert progress[-1]["event"] == "done" and progress[-1]["steps"] == 12
    assert (out / "_SUCCESS").exists()
    rows = _metrics(out)
    train_steps = [row["step"] for row in rows if row["train_loss"] is not None]
    assert train_steps == sorted(set(train_steps)), "metrics of the killed run after its checkpoint kept"
    assert train_steps[0] < step, "the rows before the checkpoint came back with it"
    # the adapter bundle and the checkpoint bundles beside it are separate
    from ftrecipe.storage import read_manifest

    manifest = read_manifest(out)
    assert manifest is not None and not any(f.path.startswith("checkpoints/") for f in manifest.files)
    # once the adapter is published its checkpoints are deleted: a copy of `out` carries none along
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_distinctly(tiny_model: Path, tmp_path: Path) -> None:
    from ftrecipe.training.trainer import EXIT_PREEMPTED

    data = _make_data(tmp_path / "data")
    work, out = tmp_path / "work", tmp_path / "out"
    process = _train_process(
        tiny_model, data, work, out, "checkpointEverySteps=1000", "hyperparameters.epochs=50"
    )
    # no periodic checkpoints here: wait for training to run, then preempt
    deadline = time.monotonic() + 60
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith('{"event": "progress"') or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert "preempted" in stderr
    assert any(p.name.startswith("step-") for p in (work / "checkpoints").iterdir())
    durable = [p for p in (out / "checkpoints").iterdir() if (p / "_SUCCESS").exists()]
    assert len(durable) == 1 and (durable[0] / "trainer_state.json").is_file()
    assert not (out / "_SUCCESS").exists()


# --------------------------------------------------------------------------------------------- errors


def _train_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_error_data_folder_without_train_jsonl(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    termination = tmp_path / "termination-log"
    termination.write_text("", encoding="utf-8")
    monkeypatch.setenv("FTRECIPE_TERMINATION_LOG", str(termination))
    (tmp_path / "empty").mkdir()
    err = _train_error(
        capsys,
        "--data",
        str(tmp_path / "empty"),
        "--base-model",
        str(tiny_model),
        "--out",
        str(tmp_path / "o"),
    )
    assert "no train.jsonl" in err
    assert "no train.jsonl" in termination.read_text(encoding="utf-8")


def test_error_base_model_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _make_data(tmp_path / "data")
    err = _train_error(
        capsys, "--data", str(data), "--base-model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")
    )
    assert "base model folder not found" in err


def test_error_target_modules_not_in_the_model(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _make_data(tmp_path / "data", n_train=4, n_val=0)
    err = _train_error(
        capsys,
        "--data",
        str(data),
        "--base-model",
        str(tiny_model),
        "--out",
        str(tmp_path / "o"),
        "--work-dir",
        str(tmp_path / "w"),
        *_sets("lora.targetModules=[q_proj, query_key_value]"),
    )
    assert "query_key_value not in the model" in err
    assert "q_proj" in err and "down_proj" in err  # the modules that exist are listed


def _no_kernel(*_: object, **__: object) -> None:
    raise RuntimeError("No kernel registered for this device\n(details on the next line)")


def _not_implemented(*_: object, **__: object) -> None:
    raise NotImplementedError("int8 quantization is not implemented on this backend")


# How bitsandbytes fails on a machine it cannot serve, made to happen in the library itself (not in our
# probe): the import fails, or the import works and a kernel is missing. Our bitsandbytes_problem() runs for
# real and must turn each into its one line.
BITSANDBYTES_FAILURES = {
    "not-importable": (
        {"bitsandbytes": None, "bitsandbytes.functional": None},
        {},
        "ModuleNotFoundError: import of bitsandbytes.functional halted; None in sys.modules",
    ),
    "no-4bit-kernel": (
        {},
        {"quantize_4bit": _no_kernel},
        "RuntimeError: No kernel registered for this device",
    ),
    "no-int8": (
        {},
        {"int8_vectorwise_quant": _not_implemented},
        "NotImplementedError: int8 quantization is not implemented on this backend",
    ),
}


def test_all_linear_lets_peft_find_the_targets(tiny_model: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ftrecipe.training.config import load_train_config
    from ftrecipe.training.trainer import lora_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = load_train_config(None, ["lora.targetModules=[all-linear]", "lora.dropout=0"])
    lora = lora_config(model, config)
    assert (lora.target_modules, lora.lora_dropout) == ("all-linear", 0.0)
    adapted = {
        name.split(".")[-2]
        for name, _ in get_peft_model(model, lora).named_modules()
        if name.endswith(".lora_A")
    }
    # every linear layer of the 2-layer Llama but the output head: the 7 projections
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("failure", sorted(BITSANDBYTES_FAILURES))
def test_error_quantization_when_bitsandbytes_cannot_run(
    failure: str,
    tiny_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bitsandbytes.functional
    import torch

    modules, functions, error = BITSANDBYTES_FAILURES[failure]
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name, function in functions.items():
        monkeypatch.setattr(bitsandbytes.functional, name, function)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = f"bitsandbytes cannot run on {device}: {error}"
    data = _make_data(tmp_path / "data", n_train=4, n_val=0)
    err = _train_error(
        capsys,
        "--data",
        str(data),
        "--base-model",
        str(tiny_model),
        "--out",
        str(tmp_path / "o"),
        *_sets("quantization=4bit", "method=qlora"),
    )
    assert f"quantization 4bit needs bitsandbytes, but {reason}" in err


# --------------------------------------------------------------------------------------------- s3


@pytest.mark.slow
def test_data_base_model_and_out_on_s3(
    tiny_model: Path, tmp_path: Path, s3_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ftrecipe.storage import bundle_complete, fetch_bundle, publish_bundle

    for key, value in {**s3_bucket.env(), "FTRECIPE_S3_ADDRESSING_STYLE": "path"}.items():
        monkeypatch.setenv(key, value)
    prefix = f"s3://{s3_bucket.bucket}/recipes/demo"
    publish_bundle(
        _make_data(tmp_path / "data", n_train=8, n_val=4), f"{prefix}/data/", producer="test", inputs_hash="d"
    )
    publish_bundle(tiny_model, f"{prefix}/base/", producer="test", inputs_hash="m")
    code = main(
        [
            "train",
            "--data",
            f"{prefix}/data/",
            "--base-model",
            f"{prefix}/base/",
            "--out",
            f"{prefix}/train/",
            "--work-dir",
            str(tmp_path / "work"),
            *_sets("hyperparameters.epochs=1"),
        ]
    )
    assert code == 0
    assert bundle_complete(f"{prefix}/train/")
    manifest = fetch_bundle(f"{prefix}/train/", tmp_path / "fetched")
    assert {"adapter_model.safetensors", "run.json"} <= {f.path for f in manifest.files}
    run = json.loads((tmp_path / "fetched" / "run.json").read_text(encoding="utf-8"))
    assert run["baseModel"]["id"] == f"{prefix}/base/"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing. is deprecated:FutureWarning")
def test_checkpoints_on_s3_outlive_the_work_folder(
    tiny_model: Path, tmp_path: Path, s3_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints go to `<out>/checkpoints/step-<N>/` on S3 (the last two kept); a run preempted there is
    resumed from them on a fresh machine, and they are deleted once the adapter is published."""
    import shutil
    import threading

    from ftrecipe.storage import bundle_complete, read_manifest
    from ftrecipe.storage.listing import list_bundles
    from ftrecipe.training.trainer import EXIT_PREEMPTED

    for key, value in {**s3_bucket.env(), "FTRECIPE_S3_ADDRESSING_STYLE": "path"}.items():
        monkeypatch.setenv(key, value)
    out = f"s3://{s3_bucket.bucket}/recipes/demo/train/"
    bucket, _, prefix = out.removeprefix("s3://").partition("/")
    data = _make_data(tmp_path / "data", n_train=8, n_val=0)
    argv = [
        "train",
        *("--data", str(data), "--base-model", str(tiny_model), "--out", out),
        *("--work-dir", str(tmp_path / "work")),
        *_sets("hyperparameters.epochs=6", "checkpointEverySteps=2"),  # 12 steps, checkpoints every 2
    ]

    def preempt_after_step_4() -> None:  # a real SIGTERM to this process, once step-4 is on S3
        deadline = time.monotonic() + 120
        while not bundle_complete(f"{out}checkpoints/step-4/") and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    preempter = threading.Thread(target=preempt_after_step_4)
    handler = signal.getsignal(signal.SIGTERM)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        preempter.start()
        assert main(argv) == EXIT_PREEMPTED
    preempter.join()
    assert signal.getsignal(signal.SIGTERM) is handler, "the caller's SIGTERM handler is back"
    assert read_manifest(out) is None  # no adapter yet
    steps = sorted(int(name.removeprefix("step-")) for name in list_bundles(f"{out}checkpoints/"))
    stopped = steps[-1]  # the one SIGTERM wrote, at the step end after it
    assert 4 < stopped < 12 and steps == sorted({*range(2, stopped + 1, 2), stopped})[-2:], steps
    assert all(read_manifest(f"{out}checkpoints/step-{step}/") is not None for step in steps)
    listed = s3_bucket.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}checkpoints/step-2/")
    assert listed.get("KeyCount") == 0, "nothing of the pruned checkpoint is left"

    shutil.rmtree(tmp_path / "work")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    assert f"resuming from step {stopped}" in stdout.getvalue().splitlines()
    assert bundle_complete(out)
    manifest = read_manifest(out)
    assert manifest is not None and not any(f.path.startswith("checkpoints/") for f in manifest.files)
    listed = s3_bucket.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}checkpoints/")
    assert listed.get("KeyCount") == 0, "the checkpoints are deleted once the adapter is published"


def test_error_hub_model_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # read at import time, so the variable alone is too late here; offline: fail fast, no retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _make_data(tmp_path / "data", n_train=4, n_val=0)
    err = _train_error(
        capsys,
        "--data",
        str(data),
        "--base-model",
        "hf:ftrecipe-no-such-org/no-such-model@main",
        "--out",
        str(tmp_path / "o"),
        "--work-dir",
        str(tmp_path / "w"),
    )
    assert "base model hf:ftrecipe-no-such-org/no-such-model@main: hub unreachable" in err


def _hub_error(kind: str, status: int) -> BaseException:
    import httpx2
    from huggingface_hub import errors

    request = httpx2.Request("GET", "https://huggingface.co/api/models/acme/llm/revision/main")
    response = httpx2.Response(status, request=request)
    error: BaseException = getattr(errors, kind)(f"{status} Client Error", response=response)
    return error


def test_hub_errors_are_told_apart() -> None:
    from huggingface_hub import errors

    from ftrecipe.training.trainer import hub_error_message

    def message(error: BaseException) -> str:
        wrapped = OSError("transformers' own words")  # from_pretrained raises OSError from the hub error
        wrapped.__cause__ = error
        return hub_error_message("hf:acme/llm@main", wrapped)

    gated = "base model hf:acme/llm@main: gated or private: set HF_TOKEN (tokenSecretRef in the recipe)"
    for error in (
        _hub_error("GatedRepoError", 403),
        _hub_error("GatedRepoError", 401),
        _hub_error("RepositoryNotFoundError", 401),
        _hub_error("HfHubHTTPError", 403),
    ):
        assert message(error) == f"{gated} with access to acme/llm", error
    assert "not found on the hub" in message(_hub_error("RepositoryNotFoundError", 404))
    assert "not found on the hub" in message(_hub_error("RemoteEntryNotFoundError", 404))
    assert "revision not found" in message(_hub_error("RevisionNotFoundError", 404))
    assert "hub unreachable" in message(errors.LocalEntryNotFoundError("no connection and not cached"))
    assert "hub unreachable" in message(errors.OfflineModeIsEnabled("offline"))
    assert "hub unreachable" in message(ConnectionError("connection refused"))
    assert "not found, gated or unreachable" in hub_error_message("hf:acme/llm", OSError("odd"))


# --------------------------------------------------------------------------------------------- launch


@pytest.mark.parametrize(
    ("cuda", "capability", "flash", "expected"),
    [
        (False, None, True, Precision("float32", "sdpa", None)),
        # H100 / A100 with flash-attn installed: bf16 weights and autocast, flash attention 2
        (True, (9, 0), True, Precision("bfloat16", "flash_attention_2", "bf16")),
        (True, (8, 0), False, Precision("bfloat16", "sdpa", "bf16")),
        (True, (8, 6), True, Precision("bfloat16", "flash_attention_2", "bf16")),  # A10, RTX 30xx
        # T4 / V100: torch.cuda.is_bf16_supported() says yes there (emulated), but bf16 is not native:
        # fp16 with a gradient scaler; flash attention 2 has no kernels for them even when installed
        (True, (7, 5), True, Precision("float16", "sdpa", "fp16")),
        (True, (7, 0), False, Precision("float16", "sdpa", "fp16")),
    ],
)
def test_precision_follows_the_gpu(
    cuda: bool, capability: tuple[int, int] | None, flash: bool, expected: Precision
) -> None:
    assert choose_precision(cuda, capability, flash) == expected


def test_training_arguments_and_weights_use_the_chosen_precision(tmp_path: Path, tiny_model: Path) -> None:
    """On this CPU: float32 weights, SDPA, no autocast; the model really loads that way."""
    import torch

    from ftrecipe.training.config import TrainConfig
    from ftrecipe.training.trainer import BaseModelRef, load_model, machine_precision

    precision = machine_precision()
    assert precision == Precision("float32", "sdpa", None)
    base = BaseModelRef(str(tiny_model), None, str(tiny_model), str(tiny_model))
    model = load_model(TrainConfig(), base, precision)
    assert next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"


def test_weights_go_straight_to_this_process_gpu() -> None:
    """Under torchrun each rank loads onto its own GPU, quantized or not: never the whole model in host memory."""
    from ftrecipe.training.trainer import device_map_for

    assert device_map_for(True, False, {"LOCAL_RANK": "3", "WORLD_SIZE": "4"}) == {"": 3}
    assert device_map_for(True, True, {"LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == {"": 1}
    assert device_map_for(True, False, {}) == {"": 0}  # one GPU, no launcher
    assert device_map_for(False, True, {}) == "cpu"  # bitsandbytes' CPU backend
    assert device_map_for(False, False, {"LOCAL_RANK": "1"}) is None  # CPU ranks (gloo)


LLAMA_8B = {  # Llama-3.1-8B's config.json, the fields the memory estimate reads
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def test_gradient_checkpointing_from_the_gpu_memory() -> None:
    from transformers import LlamaConfig

    from ftrecipe.training.trainer import (
        ModelShape,
        choose_gradient_checkpointing,
        training_memory_bytes,
    )

    shape = ModelShape.from_config(LlamaConfig(**LLAMA_8B))
    assert shape.parameters() == 8_030_261_248  # Llama-3.1-8B has 8.03 B parameters
    gib = 1024**3
    one_row = training_memory_bytes(shape, 4096, "none", 2, full_logits=False)
    two_rows = training_memory_bytes(shape, 2 * 4096, "none", 2, full_logits=False)
    qlora = training_memory_bytes(shape, 2 * 4096, "4bit", 2, full_logits=False)
    full = training_memory_bytes(shape, 2 * 4096, "none", 2, full_logits=True)
    # by hand: bf16 weights 8.03e9 x 2 B = 14.96 GiB; activations 32 layers x (12 x 4096 + 4 x 14336)
    # values x 2 B = 6.5 MiB per token, 26.0 GiB per 4096 tokens
    assert (round(one_row / gib, 1), round(two_rows / gib, 1)) == (41.0, 67.0)
    assert round(qlora / gib, 1) == 56.2  # 4-bit weights: 4.2 GiB instead of 15.0
    assert round((full - two_rows) / gib, 1) == 9.8  # the full logits of 8192 tokens, bf16 + float32
    h100 = 80 * gib
    assert choose_gradient_checkpointing(None, h100, one_row) is False  # 41 GiB of 80: fits
    assert choose_gradient_checkpointing(None, h100, two_rows) is True  # 67 GiB > 80% of 80
    assert choose_gradient_checkpointing(None, 141 * gib, two_rows) is False  # H200
    assert choose_gradient_checkpointing(None, None, two_rows) is False  # CPU: nothing to save
    assert choose_gradient_checkpointing(True, 141 * gib, one_row) is True  # the recipe's choice wins
    assert choose_gradient_checkpointing(False, 16 * gib, two_rows) is False


def test_padding_free_only_where_attention_keeps_examples_apart() -> None:
    from ftrecipe.training.trainer import choose_padding_free

    assert choose_padding_free(None, "flash_attention_2") is True
    assert choose_padding_free(None, "sdpa") is False  # padded, grouped by length
    assert choose_padding_free(False, "flash_attention_2") is False
    with pytest.raises(TrainError, match="paddingFree needs flash attention 2"):
        choose_padding_free(True, "sdpa")


def test_embeddings_back_to_the_compute_dtype_after_kbit_preparation(tiny_model: Path) -> None:
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from ftrecipe.training.trainer import embeddings_to_compute_dtype

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model.get_input_embeddings().weight.dtype == torch.float32  # what peft does
    embeddings_to_compute_dtype(model, torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32  # norms stay float32 (small, and stabler)


def test_adapters_stay_float32_unless_bf16_computes(tiny_model: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftrecipe.training.sft import adapters_to_float32

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    for param in model.parameters():  # as TRL leaves them under quantization
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    assert adapters_to_float32(model) == 8  # 2 layers x 2 modules x (A, B)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert adapters_to_float32(model) == 0


def test_launch_command_runs_one_process_per_gpu() -> None:
    from ftrecipe.training.launch import is_main_process, launch_command

    argv = ["train", "--data", "d", "--base-model", "m", "--out", "s3://b/o/", "--set", "lora.r=8"]
    command = launch_command(argv, 4, {"PATH": "/bin"})
    assert command == [
        sys.executable,
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"),
        *("-m", "ftrecipe.cli.main", *argv),
    ]
    assert launch_command(argv, 1, {}) is None  # one GPU: in-process
    assert launch_command(argv, 0, {}) is None  # CPU
    for launched in ({"WORLD_SIZE": "4"}, {"LOCAL_RANK": "1"}, {"RANK": "0"}):
        assert launch_command(argv, 4, launched) is None  # already one process per GPU
    assert is_main_process({}) and is_main_process({"RANK": "0"}) and not is_main_process({"RANK": "2"})


def test_train_argv_rebuilds_the_command_line() -> None:
    from ftrecipe.cli.main import make_parser
    from ftrecipe.training.launch import train_argv

    argv = [
        "train",
        *("--data", "d", "--base-model", "hf:a/b", "--out", "o", "--config", "c.yaml"),
        *("--set", "lora.r=8", "--set", "hyperparameters.epochs=1", "--work-dir", "w"),
        *("--adapter-name", "x", "--merge"),
    ]
    assert train_argv(make_parser().parse_args(argv)) == argv
    short = ["train", "--data", "d", "--base-model", "m", "--out", "o"]
    assert train_argv(make_parser().parse_args(short)) == short


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing. is deprecated:FutureWarning")
def test_merge_writes_a_full_model_equal_to_base_plus_adapter(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = _make_data(tmp_path / "data", n_train=8, n_val=4)
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(
            [
                "train",
                *("--data", str(data), "--base-model", str(tiny_model), "--out", str(out)),
                *("--work-dir", str(tmp_path / "work"), "--merge"),
                # no LoRA dropout: what fused LoRA kernels need
                *_sets("hyperparameters.epochs=1", "lora.dropout=0"),
            ]
        )
    assert code == 0
    assert json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))["lora_dropout"] == 0
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    merged.eval()
    adapted.eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_data_parallel_processes_under_torchrun(tiny_model: Path, tmp_path: Path) -> None:
    """The multi-GPU path on CPU: two ranks (gloo instead of NCCL) under torchrun, as `ftrecipe train`
    launches them on a pod with two GPUs; the batches are split, rank 0 alone publishes and reports."""
    data = _make_data(tmp_path / "data", n_train=16, n_val=4)
    out = tmp_path / "out"
    command = launch_command(
        ["train", "--data", str(data), "--base-model", str(tiny_model), "--out", str(out),
         "--work-dir", str(tmp_path / "work"), *_sets("hyperparameters.epochs=1")],
        visible_gpus=2,
        env={},
    )  # fmt: skip
    assert command is not None
    termination = tmp_path / "termination-log"
    termination.write_text("", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FTRECIPE_TERMINATION_LOG": str(termination)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events].count("done") == 1  # rank 0 only
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[-1]["total_steps"] == 2  # 16 examples / (batch 4 × 2 ranks)
    assert "find_unused_parameters=True" not in done.stderr
    from ftrecipe.storage import bundle_complete

    assert bundle_complete(out)
    report = decode(termination.read_text(encoding="utf-8"))
    assert report is not None and report.ok and report.figures["step"] == 2
