"""The causal-LM loss with the output layer computed only where the labels are.

A command generator's examples are a long prompt and a short answer: under 1 % of the tokens carry loss
(labels other than -100), yet the model's own forward projects every position through the LM head, so at
8B × 4096 tokens the `(batch, tokens, vocabulary)` logits (128k columns for Llama 3) and their float32
softmax are most of the step's memory. Here the backbone's last hidden states are gathered at the
positions that predict a label first, and the LM head runs on those rows alone; the mean cross-entropy is
the one `model(..., labels=...)` returns (same shift, same ignore index, same float32 upcast, same
`num_items_in_batch` divisor), and so are its gradients.

- `label_positions_loss(hidden_states, labels, lm_head)`: the pure function (any device).
- `liger_label_positions_loss(...)`: the same rows through Liger's fused linear cross-entropy (which never
  builds even those logits whole) when `liger_kernel` is importable and the tensors are on CUDA; None
  otherwise, so the caller falls back to `label_positions_loss`. `label_loss` makes that choice.
- `causal_lm_label_loss(model, inputs)`: a (peft-wrapped) causal LM's backbone, then `label_loss`.

Models whose logits are scaled or soft-capped after the LM head (Gemma 2/3, Granite, Cohere) are not
handled: `plain_lm_head_problem(config)` says so, and the caller keeps the full logits for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "IGNORE_INDEX",
    "causal_lm_label_loss",
    "label_loss",
    "label_positions_loss",
    "liger_available",
    "liger_label_positions_loss",
    "plain_lm_head_problem",
    "positions_with_labels",
]

IGNORE_INDEX = -100  # transformers' and PyTorch's: a position without loss
# Rows of logits built at once: 4096 rows × 128k vocabulary × 4 bytes = 2 GiB of float32 logits. Under the
# label-only loss that is far more completion tokens than a micro-batch holds; a batch that labels every
# token (the lever off, a plain LM objective) is cut into chunks recomputed in the backward pass.
DEFAULT_CHUNK_ROWS = 4096
# Config fields that change the logits after the LM head's matmul: the label-only loss does not apply them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")

LMHead = torch.nn.Module | Tensor | Callable[[Tensor], Tensor]


def positions_with_labels(
    hidden_states: Tensor, labels: Tensor, *, shifted: bool = False
) -> tuple[Tensor, Tensor]:
    """The hidden states that predict a label, and those labels: `(rows, hidden)` and `(rows,)`.

    Causal shift as `transformers`' ForCausalLMLoss: position t predicts the label at t + 1, so the last
    position predicts nothing and the first label is never a target. `shifted=True`: `labels[t]` is
    already the target of position t (`shift_labels`, as context parallelism passes them).
    """
    if hidden_states.dim() != 3 or labels.dim() != 2 or hidden_states.shape[:2] != labels.shape:
        raise ValueError(
            f"expected hidden_states (batch, tokens, hidden) and labels (batch, tokens), got "
            f"{tuple(hidden_states.shape)} and {tuple(labels.shape)}"
        )
    if not shifted:
        hidden_states = hidden_states[:, :-1]
        labels = labels[:, 1:]
    labels = labels.to(hidden_states.device)
    mask = labels != IGNORE_INDEX
    return hidden_states[mask], labels[mask]


def _project(lm_head: LMHead, rows: Tensor) -> Tensor:
    if isinstance(lm_head, Tensor):
        return F.linear(rows, lm_head)
    return lm_head(rows)


def _summed_cross_entropy(lm_head: LMHead, rows: Tensor, targets: Tensor) -> Tensor:
    # float32 before the softmax, as the model's own loss does (bf16 logits lose the small probabilities)
    logits = _project(lm_head, rows).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _divisor(num_items_in_batch: int | Tensor | None, rows: int, like: Tensor) -> Tensor:
    """What the summed loss is divided by: the Trainer's token count over the whole accumulated batch when it
    passes one, else this batch's labelled rows (at least 1: a batch without labels gives a zero loss that
    still reaches the graph)."""
    if num_items_in_batch is None:
        return torch.tensor(max(rows, 1), dtype=torch.float32, device=like.device)
    return torch.as_tensor(num_items_in_batch, device=like.device).float()


def label_positions_loss(
    hidden_states: Tensor,
    labels: Tensor,
    lm_head: LMHead,
    *,
    num_items_in_batch: int | Tensor | None = None,
    shifted: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Tensor:
    """Mean next-token cross-entropy with the LM head computed only at the positions that carry loss.

    `hidden_states`: the backbone's final hidden states (after the last norm, before the LM head),
    `(batch, tokens, hidden)`; `labels`: `(batch, tokens)` as given to the model, -100 where no loss;
    `lm_head`: the output layer as a module (a LoRA-wrapped one works too) or its weight `(vocab, hidden)`.
    Equals `model(..., labels=labels).loss` (with `num_items_in_batch` when the Trainer passes it).
    More than `chunk_rows` labelled rows are projected chunk by chunk, each recomputed in the backward
    pass, so the float32 logits alive at once stay at `chunk_rows × vocabulary`.
    """
    if chunk_rows <= 0:
        raise ValueError("chunk_rows must be positive")
    rows, targets = positions_with_labels(hidden_states, labels, shifted=shifted)
    count = rows.shape[0]
    if count <= chunk_rows:
        total = _summed_cross_entropy(lm_head, rows, targets)
    else:
        total = rows.new_zeros((), dtype=torch.float32)
        for start in range(0, count, chunk_rows):
            part = checkpoint(
                _summed_cross_entropy,
                lm_head,
                rows[start : start + chunk_rows],
                targets[start : start + chunk_rows],
                use_reentrant=False,
            )
            total = total + part
    return total / _divisor(num_items_in_batch, count, total)


def liger_available() -> bool:
    """Whether `liger_kernel` can be imported here (its Triton kernels need CUDA to run)."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # absent, or its import fails without Triton/CUDA: either way, not usable
        return False
    return True


def liger_label_positions_loss(
    hidden_states: Tensor,
    labels: Tensor,
    lm_head: LMHead,
    *,
    num_items_in_batch: int | Tensor | None = None,
    shifted: bool = False,
) -> Tensor | None:
    """`label_positions_loss` through Liger's fused linear cross-entropy, or None where it cannot run.

    None when `liger_kernel` is not importable, the tensors are not on CUDA, or the LM head is not a plain
    weight (a LoRA-wrapped head has no single weight matrix to fuse). Liger computes the projection and the
    cross-entropy chunk by chunk in one kernel pair and never keeps the logits; its gradients are the same.
    """
    if not hidden_states.is_cuda or not liger_available():
        return None
    if isinstance(lm_head, Tensor):
        weight, bias = lm_head, None
    elif isinstance(lm_head, torch.nn.Linear):
        weight, bias = lm_head.weight, lm_head.bias
    else:
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    rows, targets = positions_with_labels(hidden_states, labels, shifted=shifted)
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    result = fused(weight, rows.contiguous(), targets, bias)
    # versions that can also return the z-loss or the token accuracy put the loss first
    total: Tensor = result[0] if isinstance(result, tuple) else result
    return total.float() / _divisor(num_items_in_batch, rows.shape[0], total)


def label_loss(
    hidden_states: Tensor,
    labels: Tensor,
    lm_head: LMHead,
    *,
    num_items_in_batch: int | Tensor | None = None,
    shifted: bool = False,
) -> Tensor:
    """Liger's fused kernel on CUDA when installed (`liger_label_positions_loss`), else `label_positions_loss`."""
    fused = liger_label_positions_loss(
        hidden_states, labels, lm_head, num_items_in_batch=num_items_in_batch, shifted=shifted
    )
    if fused is not None:
        return fused
    return label_positions_loss(
        hidden_states, labels, lm_head, num_items_in_batch=num_items_in_batch, shifted=shifted
    )


def plain_lm_head_problem(config: Any) -> str | None:
    """Why the label-only loss would differ from the model's own for this config (logits transformed after
    the LM head's matmul), or None when the logits are the plain projection (Llama, Mistral, Qwen...)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text, name, None)
        if value is not None and value != 1.0:
            return f"{getattr(text, 'model_type', 'this model')} transforms its logits ({name}={value})"
    return None


def _unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper (its modules carry the LoRA layers)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def causal_lm_label_loss(
    model: Any,
    inputs: Mapping[str, Any],
    *,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """The loss of `model(**inputs)` (inputs with `labels`) without the full logits: the backbone's forward,
    then `label_loss` with the model's output layer. `model` may be peft-wrapped."""
    inner = _unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    forward = {key: value for key, value in inputs.items() if key not in ("labels", "shift_labels")}
    forward["use_cache"] = False
    hidden_states = backbone(**forward).last_hidden_state
    shift_labels = inputs.get("shift_labels")
    labels = inputs["labels"] if shift_labels is None else shift_labels
    return label_loss(
        hidden_states,
        labels,
        inner.get_output_embeddings(),
        num_items_in_batch=num_items_in_batch,
        shifted=shift_labels is not None,
    )
