"""Answers of a base model (plus a LoRA adapter) loaded with transformers/peft: batched greedy generation.

Prompts are tokenized exactly as in training (`training.data.prompt_token_ids`: the chat template with
`add_generation_prompt`, no extra special tokens), which is also what an OpenAI-compatible server does
with the same messages. The tokenizer is the adapter bundle's (the one training used and saved, chat
template included) when it has one, else the base model's.

Batches are left-padded (the attention mask hides the padding, so each row generates as if alone) and
built from prompts of similar length. Generation stops at the end-of-turn token: the tokenizer's eos and
the model's generation-config eos ids. A turn's latency is the wall time of its batch; `--batch-size 1`
gives per-request latencies. `on_answered` hears of each batch's turns when they are done (the progress
lines).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrecipe.evaluation.errors import EvalError
from ftrecipe.evaluation.scoring import Generation, GenerationRun
from ftrecipe.training.config import TrainConfig
from ftrecipe.training.data import DataError, ensure_chat_template, prompt_token_ids
from ftrecipe.training.trainer import BaseModelRef, load_model, load_tokenizer


@dataclass(frozen=True)
class LocalModel:
    model: Any
    tokenizer: Any
    device: str
    stop_token_ids: tuple[int, ...]


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _adapter_tokenizer(adapter_dir: Path) -> Any | None:
    from transformers import AutoTokenizer

    if not (adapter_dir / "tokenizer_config.json").is_file():
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    except (OSError, ValueError) as exc:
        raise EvalError(f"adapter {adapter_dir}: its tokenizer cannot be loaded: {_line(exc)}") from None
    ensure_chat_template(tokenizer)
    return tokenizer


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def load_local_model(base: BaseModelRef, adapter_dir: Path | None) -> LocalModel:
    """Base model as training loads it (bf16 on a GPU, float32 on the CPU, never quantized), plus the adapter."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # stderr carries one-line messages
    try:
        return _load_local_model(base, adapter_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _load_local_model(base: BaseModelRef, adapter_dir: Path | None) -> LocalModel:
    import torch

    tokenizer = _adapter_tokenizer(adapter_dir) if adapter_dir is not None else None
    if tokenizer is None:
        tokenizer, _ = load_tokenizer(base)
    model = load_model(TrainConfig(), base)
    if adapter_dir is not None:
        from peft import PeftModel

        try:
            with warnings.catch_warnings():
                # peft asks transformers 5 for the old name of gradient checkpointing: noise, not news
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing` is deprecated")
                model = PeftModel.from_pretrained(model, str(adapter_dir))
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise EvalError(
                f"adapter {adapter_dir}: cannot be applied to base model {base.source}: {type(exc).__name__}: "
                f"{_line(exc).rstrip('.')}; pass the --base-model it was trained on"
            ) from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    stops = dict.fromkeys([*_ids(tokenizer.eos_token_id), *_ids(model.generation_config.eos_token_id)])
    return LocalModel(model=model, tokenizer=tokenizer, device=device, stop_token_ids=tuple(stops))


def _answer_length(new_tokens: Sequence[int], stops: Sequence[int]) -> tuple[int, bool]:
    """(tokens before the first stop token, whether none came: cut by the token limit)."""
    for position, token in enumerate(new_tokens):
        if token in stops:
            return position, False
    return len(new_tokens), True


def _prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]], where: str) -> list[int]:
    from jinja2 import TemplateError

    try:
        return prompt_token_ids(tokenizer, messages)
    except (TemplateError, DataError) as exc:  # e.g. a role the template does not know
        raise EvalError(f"{where}: the chat template cannot render this record: {_line(exc)}") from None


def generate_local(
    local: LocalModel,
    prompts: Sequence[Sequence[dict[str, str]]],
    wheres: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    on_answered: Callable[[int], None] | None = None,
) -> GenerationRun:
    """Greedy answers to `prompts` (each a full record's messages; the last, the answer, is not shown);
    `wheres` name them in error messages; `on_answered(n)` after each batch of n turns."""
    import torch
    from transformers import GenerationConfig

    tokenizer = local.tokenizer
    pad = int(tokenizer.pad_token_id)
    token_ids = [
        _prompt_ids(tokenizer, messages, where) for messages, where in zip(prompts, wheres, strict=True)
    ]
    # A fresh config: plain greedy decoding, whatever sampling defaults the model ships with.
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=list(local.stop_token_ids),
    )
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)  # OOM shows first
    answers: dict[int, Generation] = {}
    total = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(token_ids[i]) for i in batch)
        input_ids = [[pad] * (width - len(token_ids[i])) + token_ids[i] for i in batch]
        attention = [[0] * (width - len(token_ids[i])) + [1] * len(token_ids[i]) for i in batch]
        started = time.perf_counter()
        with torch.inference_mode():
            output = local.model.generate(
                input_ids=torch.tensor(input_ids, dtype=torch.long, device=local.device),
                attention_mask=torch.tensor(attention, dtype=torch.long, device=local.device),
                generation_config=config,
            )
        rows = output[:, width:].tolist()
        seconds = time.perf_counter() - started
        total += seconds
        for index, row in zip(batch, rows, strict=True):
            length, truncated = _answer_length(row, local.stop_token_ids)
            answers[index] = Generation(
                text=tokenizer.decode(row[:length], skip_special_tokens=True).strip(),
                latency_seconds=seconds,
                # the stop token is generated too; the padding after it is not
                generated_tokens=length + (0 if truncated else 1),
                truncated=truncated,
            )
        if on_answered is not None:
            on_answered(len(batch))
    return GenerationRun([answers[i] for i in range(len(token_ids))], total)
