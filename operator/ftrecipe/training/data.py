"""Training data: find the splits, read both record formats as chats, give a bare tokenizer a template.

Every record becomes one chat: the instruction format `{"prompt", "completion"}` is a one-turn chat
(user = prompt, assistant = completion); the conversational format `{"messages": [...]}` is used as is,
its last assistant message being the completion. TRL renders and tokenizes them for training
(`training.sft`: the prompt with the generation prompt, exactly what the model is served, the loss on
the completion only); `prompt_token_ids` renders a prompt the same way for local evaluation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLIT_DIRS = (Path("4_train_test_split") / "ft_splits", Path("ft_splits"), Path())

# Used only when the base model has no chat template of its own (a pretrained, not instruction-tuned,
# model). Plain-text role headers that any tokenizer can encode, turns separated by a blank line; the
# assistant turn ends with the tokenizer's eos token so generation stops there, and nothing follows it
# (the loss covers the answer and eos, no separator). It is saved with the tokenizer in the bundle, so
# vLLM and Rasa render prompts exactly as in training.
DEFAULT_CHAT_TEMPLATE = (
    "{{- bos_token if bos_token else '' -}}"
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}"
    "{{- '\n\n' -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '### System:\n' + message['content'] | trim -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '### User:\n' + message['content'] | trim -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '### Assistant:\n' -}}"
    "{%- generation -%}"
    "{{- message['content'] | trim + eos_token -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('Unsupported chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- ('\n\n' if messages else '') + '### Assistant:\n' -}}"
    "{%- endif -%}"
)


class DataError(ValueError):
    """Training data that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class Splits:
    train: Path
    val: Path | None


def find_splits(data_dir: Path) -> Splits:
    """`<data>/4_train_test_split/ft_splits/`, `<data>/ft_splits/` or `<data>/` itself, first that has train.jsonl."""
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found")
    for relative in SPLIT_DIRS:
        folder = data_dir / relative
        if (folder / "train.jsonl").is_file():
            val = folder / "val.jsonl"
            return Splits(train=folder / "train.jsonl", val=val if val.is_file() else None)
    looked = ", ".join(str(data_dir / r / "train.jsonl") for r in SPLIT_DIRS)
    raise DataError(
        f"{data_dir}: no train.jsonl (looked for {looked}); point --data at prepare-data's output"
    )


def dataset_hash(splits: Splits) -> str:
    """sha256 over the split files' bytes (train, then val): names the data a bundle was trained on."""
    digest = hashlib.sha256()
    for path in (splits.train, splits.val):
        digest.update(b"\0" if path is None else path.read_bytes())
        digest.update(b"\x01")
    return digest.hexdigest()


def read_records(path: Path) -> Iterator[list[dict[str, str]]]:
    """Each line as chat messages; both formats; a broken line names its file and line number."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{number}: not JSON: {exc}") from None
            yield to_messages(record, f"{path}:{number}")


def to_messages(record: Any, where: str = "record") -> list[dict[str, str]]:
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        messages = record["messages"]
        ok = all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok or not messages or messages[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: messages must be {{role, content}} objects ending with the assistant's"
            )
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        completion = record.get("completion")
        if not isinstance(completion, str):
            raise DataError(f"{where}: instruction record without a string 'completion'")
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": completion}]
    raise DataError(f"{where}: expected {{prompt, completion}} or {{messages: [...]}}")


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give a tokenizer without a chat template the default one (and a pad token); True if it was added."""
    added = False
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        added = True
    if tokenizer.pad_token is None:
        # Padding is masked by position (labels and attention mask), never by token id, so eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return added


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], *, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )
    if not isinstance(text, str):
        raise DataError("the chat template did not render to text")
    return text


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The template writes bos itself, so no special tokens are added here (no double bos).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_token_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """The prompt of a record (every message but the answer) as the model sees it in training and serving."""
    return _ids(tokenizer, _render(tokenizer, messages[:-1], generation_prompt=True))
