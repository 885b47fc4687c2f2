"""A tiny, randomly initialised Llama plus a real BPE tokenizer, built entirely offline.

Tests and the laptop demo need a model directory that every Hugging Face loader accepts
(``AutoModelForCausalLM``, ``AutoTokenizer``, peft, trl) without downloading anything. The
weights are random, so its output is gibberish; what matters is that the files, the special
tokens and the chat template look like a real Llama-3-Instruct checkpoint, so code written
against the tiny model also works against the real one.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "BOS_TOKEN",
    "BUILTIN_CORPUS",
    "CHAT_TEMPLATE",
    "END_OF_TEXT_TOKEN",
    "EOS_TOKEN",
    "LLAMA3_VOCAB_SIZE",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "build_tiny_model",
]

# Llama-3 names, so prompts and stop tokens written for the real model fit the tiny one.
BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
EOS_TOKEN = "<|eot_id|>"  # end of a chat turn: what generation stops on, as in Llama-3-Instruct
PAD_TOKEN = "<|pad|>"  # distinct from eos, so masking padding never masks the real end of a turn
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    END_OF_TEXT_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    START_HEADER_TOKEN,
    END_HEADER_TOKEN,
)

# Llama-3-Instruct layout (bos, then header/content/eot per turn). The {% generation %} markers
# let `apply_chat_template(..., return_assistant_tokens_mask=True)` and trl's assistant-only loss
# find the assistant's tokens; they render to nothing otherwise.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}"
    "{%- generation -%}"
    "{{- message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endgeneration -%}"
    "{%- elif message['role'] in ['system', 'user'] -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' -}}"
    "{%- else -%}"
    "{{- raise_exception('Unsupported chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}"
    "{%- endif -%}"
)

# Small, but shaped like the prompts and answers of a Rasa CALM command generator, so the
# BPE merges cover the words the tests and the demo actually feed it.
BUILTIN_CORPUS: tuple[str, ...] = (
    "USER: I want to send some money to my friend.",
    "AI: How much money would you like to send?",
    "USER: 100 dollars please",
    "AI: Who would you like to send the money to?",
    "USER: To John, my brother.",
    "AI: Do you want to transfer 100 dollars to John? Please confirm.",
    "USER: yes, go ahead",
    "AI: Your transfer was successful.",
    "USER: hi there",
    "AI: Hello! How can I help you today?",
    "USER: What can you do?",
    "AI: I can help you transfer money, check your balance, and add a contact.",
    "USER: actually, forget it",
    "AI: Okay, I have cancelled the transfer.",
    "USER: what is my balance?",
    "AI: Your current balance is 2,400 dollars.",
    "USER: add Mary as a new contact",
    "AI: What is the handle of the contact?",
    "USER: no wait, make it 250 instead",
    "start flow transfer_money",
    "start flow check_balance",
    "start flow add_contact",
    "start flow remove_contact",
    "set slot amount 100",
    "set slot amount 2,400",
    "set slot recipient John",
    "set slot recipient_name Mary",
    "set slot confirm_transfer True",
    "set slot confirm_transfer False",
    "cancel flow",
    "disambiguate flows transfer_money check_balance",
    "clarify flows transfer_money add_contact",
    "provide info",
    "offtopic reply",
    "chitchat",
    "hand over",
    "repeat message",
    "search and reply",
    "correct slot amount 250",
    "Your task is to analyze the current conversation context and generate a list of actions"
    " to start new business processes that we call flows, to extract slots, or respond to"
    " small talk and knowledge requests.",
    "These are the flows that can be started, with their description and slots:",
    "Here is what happened previously in the conversation:",
    "The user just said: ",
    "Based on this information generate a list of actions you want to take.",
    "Your job is to assist the user. Only use information provided in the conversation.",
    "Conversation history, current state, available flows, slots, actions.",
    "0 1 2 3 4 5 6 7 8 9 10 20 50 100 250 500 1000 2,400 $ € % , . ! ? : ; - _ ( ) [ ] { }",
    "The quick brown fox jumps over the lazy dog. Thank you, that is all for now. Goodbye!",
)

# Rows of Llama 3's embedding and LM head (128,000 BPE tokens + 256 reserved special tokens). At this size
# the logits of a long prompt dominate a training step's memory, as they do at 8B.
LLAMA3_VOCAB_SIZE = 128256

_NUM_ATTENTION_HEADS = 4
_NUM_KEY_VALUE_HEADS = 2
_MAX_POSITION_EMBEDDINGS = 4096


def build_tiny_model(
    out_dir: Path,
    *,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    overwrite: bool = False,
    model_vocab_size: int | None = None,
) -> Path:
    """Build a tiny random Llama + tokenizer and save it to ``out_dir``; return ``out_dir``.

    ``vocab_size`` is the BPE tokenizer's; ``model_vocab_size`` (default: the tokenizer's size) the rows of
    the embedding and the LM head. A larger one, e.g. ``LLAMA3_VOCAB_SIZE``, gives the model Llama 3's
    output layer while the tokenizer stays small (a 128k BPE cannot be learnt from the built-in corpus,
    and building one would take minutes): the ids above the tokenizer's are never produced by it, as
    Llama 3's reserved tokens are not, but they cost what they cost at 8B: a logit per row.

    Deterministic: the same arguments give the same tokenizer and the same weights. The build
    happens in a hidden sibling directory that is renamed into place at the end, so ``out_dir``
    is either absent or complete. An existing non-empty ``out_dir`` raises FileExistsError
    unless ``overwrite`` is set.
    """
    if hidden_size <= 0 or hidden_size % (2 * _NUM_ATTENTION_HEADS):
        # RoPE needs an even head dimension.
        raise ValueError(f"hidden_size must be a positive multiple of {2 * _NUM_ATTENTION_HEADS}")
    if num_layers <= 0:
        raise ValueError("num_layers must be positive")
    min_vocab = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be at least {min_vocab} (all bytes plus special tokens)")
    if model_vocab_size is not None and model_vocab_size < vocab_size:
        raise ValueError(f"model_vocab_size must be at least vocab_size ({vocab_size})")

    out_dir = Path(out_dir).absolute()
    if _is_nonempty_dir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp_dir.mkdir()
    try:
        tokenizer = _build_tokenizer(itertools.chain(BUILTIN_CORPUS, corpus or ()), vocab_size)
        model = _build_model(
            tokenizer,
            hidden_size=hidden_size,
            num_layers=num_layers,
            seed=seed,
            model_vocab_size=max(model_vocab_size or 0, len(tokenizer)),
        )
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        _fsync_tree(tmp_dir)
        _move_into_place(tmp_dir, out_dir, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # a no-op once the rename has happened
    return out_dir


def _build_tokenizer(texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2/Llama-3 style: any text encodes, nothing is ever unknown)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[END_OF_TEXT_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN],
        # Like Llama-3: plain `tokenizer(text)` prepends bos; chat templates add their own bos and
        # apply_chat_template encodes with add_special_tokens=False, so there is no double bos.
        add_bos_token=True,
        add_eos_token=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=_MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False,
    )


def _build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    seed: int,
    model_vocab_size: int,
) -> LlamaForCausalLM:
    """Random Llama with GQA and untied embeddings, like the 8B models it stands in for."""
    bos_id = _token_id(tokenizer, BOS_TOKEN)
    eos_id = _token_id(tokenizer, EOS_TOKEN)
    end_of_text_id = _token_id(tokenizer, END_OF_TEXT_TOKEN)
    pad_id = _token_id(tokenizer, PAD_TOKEN)
    config = LlamaConfig(
        vocab_size=model_vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=_NUM_ATTENTION_HEADS,
        num_key_value_heads=_NUM_KEY_VALUE_HEADS,
        max_position_embeddings=_MAX_POSITION_EMBEDDINGS,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    # fork_rng: seed the build without changing the caller's global torch RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # Stop on end-of-turn and end-of-text, as Llama-3-Instruct's generation_config does.
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=bos_id,
        eos_token_id=[eos_id, end_of_text_id],
        pad_token_id=pad_id,
    )
    return model


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):
        raise RuntimeError(f"special token {token!r} is missing from the trained tokenizer")
    return token_id


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _move_into_place(tmp_dir: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Rename the finished build onto ``out_dir``; an old one is moved aside first, never mixed in."""
    old_dir: Path | None = None
    if overwrite and _is_nonempty_dir(out_dir):
        old_dir = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(out_dir, old_dir)
    try:
        os.replace(tmp_dir, out_dir)  # atomic; succeeds over a missing or empty directory only
    except OSError as exc:
        if old_dir is not None:
            os.replace(old_dir, out_dir)
        if _is_nonempty_dir(out_dir):
            raise FileExistsError(f"{out_dir} appeared while the tiny model was being built") from exc
        raise
    _fsync_dir(out_dir.parent)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush the files before the rename, so a power cut cannot leave a complete-looking torn copy."""
    for path in root.iterdir():
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
