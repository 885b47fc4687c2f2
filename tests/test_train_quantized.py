"""`quantization: 8bit` and `method: qlora, quantization: 4bit` on CPU: bitsandbytes has a CPU backend."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="training needs the 'train' extra")
pytest.importorskip("peft", reason="training needs the 'train' extra")

from ftrecipe.cli.main import main


def _bitsandbytes_problem() -> str | None:
    from ftrecipe.training.trainer import bitsandbytes_problem

    return bitsandbytes_problem()


def _data(root: Path) -> Path:
    root.mkdir(parents=True)
    rows = [
        {"prompt": f"USER: what is my balance? ({i})", "completion": "start flow check_balance"}
        for i in range(4)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "settings", [["quantization=8bit"], ["method=qlora", "quantization=4bit"]], ids=["8bit", "qlora-4bit"]
)
def test_quantized_training_writes_a_reloadable_adapter(
    settings: list[str], tiny_model: Path, tmp_path: Path
) -> None:
    problem = _bitsandbytes_problem()
    # bitsandbytes is in the train extra and has a CPU backend: a machine it fails on fails the test.
    if problem is not None:
        pytest.fail(f"the quantized path cannot be tested here: {problem}", pytrace=False)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    overrides = [
        *settings,
        "hyperparameters.epochs=2",
        "hyperparameters.batchSize=2",
        "hyperparameters.gradientAccumulationSteps=1",
        "hyperparameters.learningRate=1e-2",
        "hyperparameters.warmupSteps=0",
        "hyperparameters.maxSeqLength=128",
        "hyperparameters.gradientCheckpointing=false",
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            [
                "train",
                *("--data", str(_data(tmp_path / "data")), "--base-model", str(tiny_model)),
                *("--out", str(out), "--work-dir", str(tmp_path / "work")),
                *[arg for item in overrides for arg in ("--set", item)],
            ]
        )
    assert code == 0
    events = [json.loads(line) for line in stdout.getvalue().splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "done" and events[-1]["steps"] == 4
    assert (out / "_SUCCESS").is_file() and (out / "adapter_model.safetensors").is_file()
    run = json.loads((out / "training_config.json").read_text(encoding="utf-8"))
    assert run["training"]["quantization"] == settings[-1].split("=")[1]
    # the adapter loads on the full-precision base, with trained (non-zero) LoRA B matrices
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)
