"""`ftrecipe evaluate` with a local model: the tiny Llama plus a LoRA adapter made with peft, locally and on S3.

The tiny model's answers are gibberish, so the figures are not what is checked here (test_evaluate.py
proves the scoring); what is: the answers are exactly the adapter's greedy answers to prompts rendered as
in training (batching and left padding change nothing), and the report is published as a valid bundle.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="the local-model path needs the 'train' extra")
pytest.importorskip("peft", reason="the local-model path needs the 'train' extra")

from ftrecipe.cli.main import main
from ftrecipe.termination import decode
from test_evaluate import FIGURE_KEYS

# peft asks transformers 5 for a deprecated name when it builds or loads an adapter
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing. is deprecated:FutureWarning")

MAX_NEW_TOKENS = 12
COMPLETIONS = [
    "start flow transfer_money",
    "set slot amount 50",
    "start flow check_balance",
    "cancel flow",
    "set slot recipient John",
]


def _records() -> list[dict[str, Any]]:
    """Prompts of different lengths (so batches need padding), both record formats."""
    records: list[dict[str, Any]] = []
    for i, completion in enumerate(COMPLETIONS):
        prompt = "USER: I want to send some money to my friend.\n" * (i + 1) + "What should the assistant do?"
        if i % 2:
            records.append({"prompt": prompt, "completion": completion})
        else:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            records.append({"messages": messages})
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    splits = root / "4_train_test_split" / "ft_splits"
    splits.mkdir(parents=True)
    (splits / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    (root / "params.yaml").write_text("command_generator:\n  syntax: v2\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved with the tokenizer as `ftrecipe train` does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def evaluated(
    tiny_model: Path, adapter: Path, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One CLI run in-process, batches of 2; its stdout kept."""
    root = tmp_path_factory.mktemp("evaluated")
    termination = root / "termination-log"
    termination.write_text("", encoding="utf-8")
    out = root / "report"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setenv("FTRECIPE_TERMINATION_LOG", str(termination))
        code = main(
            [
                "evaluate",
                "--data",
                str(data),
                "--base-model",
                str(tiny_model),
                "--adapter",
                str(adapter),
                "--out",
                str(out),
                "--batch-size",
                "2",
                "--max-new-tokens",
                str(MAX_NEW_TOKENS),
            ]
        )
    return {
        "code": code,
        "out": out,
        "termination": termination.read_text(encoding="utf-8"),
        "stdout": stdout.getvalue(),
    }


def _predictions(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def test_report_and_bundle(evaluated: dict[str, Any], data: Path) -> None:
    from ftrecipe.storage import bundle_complete, read_manifest

    assert evaluated["code"] == 0
    out: Path = evaluated["out"]
    assert bundle_complete(out)
    manifest = read_manifest(out)
    assert manifest is not None and manifest.producer == "ftrecipe evaluate"
    assert {f.path for f in manifest.files} == {"eval.json", "eval.md", "predictions.jsonl"}
    document = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert document["num_turns"] == len(COMPLETIONS)
    assert 0 <= document["command_accuracy"] <= 1
    assert document["model"]["kind"] == "local" and document["model"]["device"] == "cpu"
    assert document["model"]["adapter_sha256"] and document["settings"]["batch_size"] == 2
    assert (document["syntax"], document["syntax_source"]) == ("v2", str(data / "params.yaml"))
    assert document["generated_tokens"] > 0 and document["tokens_per_second"] > 0
    assert document["latency_p50_seconds"] > 0
    assert (out / "eval.md").read_text(encoding="utf-8").startswith("# Evaluation of ")
    report = decode(evaluated["termination"])
    assert report is not None and report.ok and set(report.figures) == FIGURE_KEYS
    assert report.figures["num_turns"] == len(COMPLETIONS) and report.figures["report_uri"] == str(out)


def test_answers_are_the_adapters_greedy_answers(
    evaluated: dict[str, Any], tiny_model: Path, adapter: Path
) -> None:
    """Each answer, generated alone with the chat template's own tokenization, equals the batched one."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    answers = []
    for record in _records():
        messages = (
            record["messages"][:-1]
            if "messages" in record
            else [{"role": "user", "content": record["prompt"]}]
        )
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new = output[0, inputs["input_ids"].shape[1] :]
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    predictions = _predictions(evaluated["out"])
    assert [p["answer"] for p in predictions] == answers
    assert all(0 < p["generated_tokens"] <= MAX_NEW_TOKENS for p in predictions)


def test_progress_lines_per_batch_on_stdout(evaluated: dict[str, Any]) -> None:
    """5 turns in batches of 2: each batch crosses a quarter, so each one is reported, then the summary."""
    events = [json.loads(line) for line in evaluated["stdout"].splitlines()]  # stdout: JSON lines only
    progress = [(e["event"], e["stage"], e["done"], e["total"]) for e in events[:-1]]
    assert progress == [("progress", "generate", done, len(COMPLETIONS)) for done in (0, 2, 4, 5)]
    # No estimate before the first answer; one after (rounded to 0.1 s: a fast batch may show 0.0); 0 at the end
    assert (
        events[0]["eta_seconds"] is None and events[1]["eta_seconds"] >= 0 and events[3]["eta_seconds"] == 0
    )
    assert events[-1]["event"] == "done" and events[-1]["num_turns"] == len(COMPLETIONS)
    assert events[-1]["out"] == str(evaluated["out"])


@pytest.mark.slow
def test_inputs_and_report_on_s3(
    evaluated: dict[str, Any],
    tiny_model: Path,
    adapter: Path,
    data: Path,
    tmp_path: Path,
    s3_bucket: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ftrecipe.storage import bundle_complete, fetch_bundle, publish_bundle

    for key, value in {**s3_bucket.env(), "FTRECIPE_S3_ADDRESSING_STYLE": "path"}.items():
        monkeypatch.setenv(key, value)
    prefix = f"s3://{s3_bucket.bucket}/recipes/demo"
    publish_bundle(data, f"{prefix}/data/", producer="test", inputs_hash="d")
    publish_bundle(adapter, f"{prefix}/train/", producer="test", inputs_hash="a")
    code = main(
        [
            "evaluate",
            "--data",
            f"{prefix}/data/",
            "--base-model",
            str(tiny_model),
            "--adapter",
            f"{prefix}/train/",
            "--out",
            f"{prefix}/eval/",
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    assert code == 0
    assert bundle_complete(f"{prefix}/eval/")
    manifest = fetch_bundle(f"{prefix}/eval/", tmp_path / "fetched")
    assert {f.path for f in manifest.files} == {"eval.json", "eval.md", "predictions.jsonl"}
    remote = json.loads((tmp_path / "fetched" / "eval.json").read_text(encoding="utf-8"))
    local = json.loads((evaluated["out"] / "eval.json").read_text(encoding="utf-8"))
    assert remote["data"]["uri"] == f"{prefix}/data/" and remote["model"]["adapter"] == f"{prefix}/train/"
    assert remote["model"]["adapter_sha256"] == local["model"]["adapter_sha256"]
    assert remote["per_command"] == local["per_command"]  # same answers, other batch size
    remote_answers = [p["answer"] for p in _predictions(tmp_path / "fetched")]
    assert remote_answers == [p["answer"] for p in _predictions(evaluated["out"])]


def test_error_adapter_of_another_model(
    tiny_model: Path, adapter: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    other = tmp_path / "other-adapter"
    shutil.copytree(adapter, other)
    config = json.loads((other / "adapter_config.json").read_text(encoding="utf-8"))
    config["target_modules"] = ["query_key_value"]  # a module the tiny Llama does not have
    (other / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    args = ["evaluate", "--data", str(data), "--base-model", str(tiny_model), "--adapter", str(other)]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: adapter {other}: cannot be applied to base model {tiny_model}")
    assert "pass the --base-model it was trained on" in err


def test_error_record_the_chat_template_cannot_render(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    messages = [
        {"role": "tool", "content": "balance: 100"},
        {"role": "user", "content": "what is my balance?"},
        {"role": "assistant", "content": "start flow check_balance"},
    ]
    (tmp_path / "val.jsonl").write_text(json.dumps({"messages": messages}) + "\n", encoding="utf-8")
    args = [
        "evaluate",
        "--data",
        str(tmp_path),
        "--base-model",
        str(tiny_model),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {tmp_path}/val.jsonl:1: the chat template cannot render this record: Unsupported chat role: tool"
    )
