"""The label-only loss (`ftrecipe.training.loss`) is the model's own causal-LM loss, value and gradients.

Reference: `model(..., labels=...)` of the tiny Llama (transformers' ForCausalLMLoss over the full
logits), on a batch with padding on either side and several completion spans per row.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ftrecipe.training.loss import (  # noqa: E402 - after the importorskip guards
    causal_lm_label_loss,
    label_loss,
    label_positions_loss,
    liger_label_positions_loss,
    plain_lm_head_problem,
    positions_with_labels,
)

PAD = -100


def test_positions_with_labels_shift_by_one() -> None:
    """Position t predicts the label at t + 1: the first label is never a target, the last position none."""
    hidden = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)  # row r, position t: 5r + t
    labels = torch.tensor([[11, 12, PAD, 14, 15], [PAD, PAD, 23, PAD, PAD]])
    rows, targets = positions_with_labels(hidden, labels)
    # row 0: labels at 1, 3, 4 -> positions 0, 2, 3 (the label at 0 has no predictor); row 1: label at 2 -> 1
    assert rows.flatten().tolist() == [0.0, 2.0, 3.0, 6.0]
    assert targets.tolist() == [12, 14, 15, 23]
    rows, targets = positions_with_labels(hidden, labels, shifted=True)
    assert rows.flatten().tolist() == [0.0, 1.0, 3.0, 4.0, 7.0]
    assert targets.tolist() == [11, 12, 14, 15, 23]


def test_uniform_logits_give_log_vocabulary() -> None:
    """Zero hidden states make every logit 0: the cross-entropy of each label is log(vocabulary)."""
    weight = torch.randn(128256, 8)
    labels = torch.tensor([[PAD, 5, PAD, 128255]])
    loss = label_positions_loss(torch.zeros(1, 4, 8), labels, weight)
    assert loss.item() == pytest.approx(math.log(128256), rel=1e-6)  # 11.7617...
    # num_items_in_batch (the Trainer's count over accumulated micro-batches) is the divisor when given
    summed = label_positions_loss(torch.zeros(1, 4, 8), labels, weight, num_items_in_batch=8)
    assert summed.item() == pytest.approx(2 * math.log(128256) / 8, rel=1e-6)


def test_no_labels_is_a_zero_that_backpropagates() -> None:
    hidden = torch.randn(1, 3, 4, requires_grad=True)
    loss = label_positions_loss(hidden, torch.full((1, 3), PAD), torch.randn(10, 4))
    assert loss.item() == 0.0
    loss.backward()  # type: ignore[no-untyped-call]
    assert hidden.grad is not None and hidden.grad.abs().sum().item() == 0.0


def _batch(pad_id: int) -> dict[str, Any]:
    """Three rows of 12 tokens: right padding, left padding, none; completion spans of 1 to 3 tokens."""
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(10, 400, (3, 12), generator=generator)
    attention = torch.ones(3, 12, dtype=torch.long)
    attention[0, 9:] = 0  # right-padded
    attention[1, :4] = 0  # left-padded
    input_ids[attention == 0] = pad_id
    labels = torch.full((3, 12), PAD)
    for row, spans in enumerate([[(3, 5), (7, 9)], [(6, 7), (9, 12)], [(2, 3), (5, 6), (10, 12)]]):
        for start, end in spans:
            labels[row, start:end] = input_ids[row, start:end]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _lora_model(tiny_model: Path, lm_head: bool) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    targets = ["q_proj", "v_proj", "down_proj"] + (["lm_head"] if lm_head else [])
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    # LoRA's B starts at zero; give it values so the adapters change the output and their A gets gradients
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    peft_model.train()
    return peft_model


def _loss_and_grads(model: Any, loss: Any) -> tuple[float, dict[str, Any]]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("lm_head", [False, True], ids=["lora", "lora+lm_head"])
def test_matches_the_models_own_loss_and_gradients(tiny_model: Path, lm_head: bool) -> None:
    model = _lora_model(tiny_model, lm_head)
    batch = _batch(model.config.pad_token_id)
    reference, reference_grads = _loss_and_grads(model, model(**batch).loss)
    ours, grads = _loss_and_grads(model, causal_lm_label_loss(model, batch))
    assert ours == pytest.approx(reference, rel=1e-5)
    assert set(grads) == set(reference_grads) and any("lora_A" in name for name in grads)
    assert any("lm_head" in name for name in grads) == lm_head
    for name, grad in reference_grads.items():
        assert grad.abs().sum().item() > 0, name  # every adapter is reached by the loss
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The Trainer's num_items_in_batch (gradient accumulation): the same divisor on both sides
    reference = model(**batch, num_items_in_batch=20).loss.item()
    assert causal_lm_label_loss(model, batch, num_items_in_batch=20).item() == pytest.approx(
        reference, rel=1e-5
    )


def test_full_model_gradients_and_chunks(tiny_model: Path) -> None:
    """Every weight trainable (lm_head and embeddings included), and the chunked path gives the same."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    batch = _batch(model.config.pad_token_id)
    reference, reference_grads = _loss_and_grads(model, model(**batch).loss)
    hidden_call = {k: v for k, v in batch.items() if k != "labels"}
    for chunk_rows in (4096, 3):  # 11 labelled rows: one piece, or four recomputed chunks
        hidden = model.model(**hidden_call).last_hidden_state
        loss = label_positions_loss(hidden, batch["labels"], model.lm_head, chunk_rows=chunk_rows)
        ours, grads = _loss_and_grads(model, loss)
        assert ours == pytest.approx(reference, rel=1e-5)
        for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
            torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_liger_falls_back_off_cuda() -> None:
    """No CUDA here: the Liger path declines (whether or not liger_kernel is installed) and label_loss
    computes the plain label-only loss. The fused kernel itself is only exercised on a GPU."""
    hidden = torch.randn(2, 6, 8)
    labels = torch.tensor([[PAD, PAD, 3, 4, PAD, 5], [PAD, 7, PAD, PAD, PAD, PAD]])
    weight = torch.randn(32, 8)
    assert liger_label_positions_loss(hidden, labels, weight) is None
    expected = torch.nn.functional.cross_entropy(
        hidden[[0, 0, 0, 1], [1, 2, 4, 0]] @ weight.T, torch.tensor([3, 4, 5, 7])
    )
    assert label_loss(hidden, labels, weight).item() == pytest.approx(expected.item(), rel=1e-6)


def test_models_that_transform_their_logits_are_named() -> None:
    from transformers import LlamaConfig

    assert plain_lm_head_problem(LlamaConfig()) is None
    capped = LlamaConfig()
    capped.final_logit_softcapping = 30.0
    assert plain_lm_head_problem(capped) == "llama transforms its logits (final_logit_softcapping=30.0)"


def test_bad_shapes_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"expected hidden_states \(batch, tokens, hidden\)"):
        label_positions_loss(torch.zeros(4, 8), torch.zeros(1, 4, dtype=torch.long), torch.zeros(3, 8))


def test_tiny_model_with_llama3_vocabulary(tmp_path: Path) -> None:
    """`model_vocab_size`: Llama 3's 128,256 output rows behind the small tokenizer; the loss still agrees."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftrecipe.training.tiny_model import LLAMA3_VOCAB_SIZE, build_tiny_model

    assert LLAMA3_VOCAB_SIZE == 128256
    path = build_tiny_model(tmp_path / "m", model_vocab_size=LLAMA3_VOCAB_SIZE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.vocab_size == 128256 and len(tokenizer) == 512
    assert tuple(model.lm_head.weight.shape) == (128256, 64)
    assert tuple(model.model.embed_tokens.weight.shape) == (128256, 64)
    batch = _batch(model.config.pad_token_id)
    with torch.no_grad():
        reference = model(**batch).loss.item()
        ours = causal_lm_label_loss(model, batch).item()
    assert ours == pytest.approx(reference, rel=1e-5)
    with pytest.raises(ValueError, match="model_vocab_size must be at least vocab_size"):
        build_tiny_model(tmp_path / "n", model_vocab_size=300)
