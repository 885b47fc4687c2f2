"""The tiny model must load and behave like a real Llama-3-Instruct checkpoint, fully offline.

Other tests (training, serving, the demo) take it for granted that the `tiny_model` fixture is
a drop-in stand-in for the real base model; these checks pin down what they rely on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ftrecipe.training.tiny_model import (  # noqa: E402 - after the importorskip guards
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    build_tiny_model,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MESSAGES = [
    {"role": "system", "content": "You are a command generator."},
    {"role": "user", "content": "send 2,400 to John"},
    {"role": "assistant", "content": "start flow transfer_money\nset slot amount 2,400"},
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the Hub fails loudly instead of hanging or downloading."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def test_directory_holds_a_complete_safetensors_checkpoint(tiny_model: Path) -> None:
    names = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(p.name.startswith(".") for p in tiny_model.parent.iterdir()), "temp dir left behind"
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is False


def test_special_tokens_line_up_between_tokenizer_and_model(tokenizer: Any, model: Any) -> None:
    assert tokenizer.bos_token == BOS_TOKEN
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize(
    "text",
    ["set slot amount 2,400", "start flow transfer_money", "USER: hi\nAI: hello", "Zürich 50 € 😀  spaces"],
)
def test_tokenizer_round_trips_text(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # like Llama-3, plain encoding prepends bos
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id not in ids


def test_chat_template_renders_turns_and_generation_prompt(tokenizer: Any) -> None:
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered.startswith(BOS_TOKEN)
    assert rendered.count(BOS_TOKEN) == 1
    assert "<|start_header_id|>user<|end_header_id|>\n\nsend 2,400 to John<|eot_id|>" in rendered
    assert rendered.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "start flow transfer_money\nset slot amount 2,400<|eot_id|>"
    )

    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert rendered.startswith(prompt)  # the prompt is a prefix of the full conversation

    # Tokenizing the template must not add a second bos.
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1


def test_chat_template_marks_assistant_tokens(tokenizer: Any) -> None:
    """trl's assistant-only loss relies on the template's {% generation %} markers."""
    enc = tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assistant_ids = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(assistant_ids) == f"{MESSAGES[2]['content']}{EOS_TOKEN}"


def test_chat_template_rejects_unknown_roles(tokenizer: Any) -> None:
    with pytest.raises(Exception, match="Unsupported chat role"):
        tokenizer.apply_chat_template([{"role": "wizard", "content": "hi"}], tokenize=False)


def test_forward_pass_gives_logits_and_finite_loss(tokenizer: Any, model: Any) -> None:
    enc = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, labels=enc["input_ids"])
    seq = enc["input_ids"].shape[1]
    assert out.logits.shape == (1, seq, len(tokenizer))
    assert torch.isfinite(out.loss)


def test_generate_a_few_tokens(tokenizer: Any, model: Any) -> None:
    enc = tokenizer.apply_chat_template(
        MESSAGES[:2], tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    prompt_len = enc["input_ids"].shape[1]
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert prompt_len < out.shape[1] <= prompt_len + 5
    assert torch.equal(out[0, :prompt_len], enc["input_ids"][0])


def test_lora_attaches_to_every_llama_projection(tiny_model: Path) -> None:
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    lora = peft.get_peft_model(base, config)

    wrapped = {name.rsplit(".", 1)[-1] for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(LORA_TARGETS)
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in name for name in trainable)

    ids = torch.tensor([[1, 2, 3, 4]])
    lora(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)


def _weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_same_seed_gives_same_model_and_other_seed_does_not(tmp_path: Path) -> None:
    rng_before = torch.random.get_rng_state()
    a = build_tiny_model(tmp_path / "a", seed=7)
    b = build_tiny_model(tmp_path / "b", seed=7)
    c = build_tiny_model(tmp_path / "c", seed=8)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "build must not disturb the global RNG"

    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_extra_corpus_and_sizes_are_honoured(tmp_path: Path) -> None:
    path = build_tiny_model(
        tmp_path / "m", corpus=["supercalifragilistic"] * 50, vocab_size=400, hidden_size=32, num_layers=1
    )
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (32, 1)
    assert config["vocab_size"] <= 400
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok("supercalifragilistic", add_special_tokens=False)["input_ids"]) == 1


def test_existing_directory_is_kept_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_model(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    build_tiny_model(out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "temp or old dirs left behind"


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ftrecipe.training import tiny_model as module

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(module.LlamaForCausalLM, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_model(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
