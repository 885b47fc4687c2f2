"""Stage 2: ask an LLM for paraphrases of each annotated user message, one call per conversation.

The whole conversation goes into one prompt so the paraphrases fit their context (a bare "yes" means
something else after every question). The answer format is Rasa's (``USER: original`` then numbered
rephrasings, blocks separated by blank lines), but LLMs drift from it, so the parser is tolerant and
matches blocks to messages by text rather than by position. A conversation whose answer cannot be
matched, or whose LLM call fails, just gets no rephrasings: its original data points stay.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

from ftrecipe.dataprep.config import llm_settings
from ftrecipe.dataprep.llm import LLMClient, LLMError, LLMSettings
from ftrecipe.dataprep.prompt import PromptTemplate, load_template
from ftrecipe.dataprep.yamlfile import InputError, load_yaml

USER_PREFIX: Final = "USER"
PURPOSE: Final = "rephrase"
DEFAULT_TEMPLATE_NAME: Final = "rephrase_prompt.jinja2"
_ALLOWED_KEYS: Final = ("llm", "prompt_template")

# `USER: text`, also `**USER:**`, `**USER**:`, `` `USER:` ``, `### User:`, `USER 1:`; group `text`.
_HEADER: Final = re.compile(
    rf"^\s*(?:#{{1,6}}\s*)?[*_`]*\s*{USER_PREFIX}(?:\s*#?\d+)?\s*[*_`]*\s*:\s*(?P<text>.*)$", re.IGNORECASE
)
# A list marker before a rephrasing: `1.`, `2)`, `(3)`, `-`, `*`, `•`; never the `10.` of `10.5 euros`.
_MARKER: Final = re.compile(r"^\s*(?:\(?\d{1,3}[.)](?!\d)|[-*•+–](?=\s))\s*")
# Lines that carry no text: horizontal rules, code fences.
_NOISE: Final = re.compile(r"^(?:[-=*_#~\s]+|`{3,}\w*)$")
_LEADING_USER: Final = re.compile(rf"^[*_`]*{USER_PREFIX}[*_`]*\s*:[*_`]*\s*", re.IGNORECASE)
_QUOTE_PAIRS: Final = {'"': '"', "'": "'", "“": "”", "„": "“", "‘": "’", "«": "»", "`": "`"}
_QUOTES: Final = "\"'“”„‘’«»`"
_MARKUP: Final = "*_`"


@dataclass(frozen=True)
class RephraserConfig:
    """The rephraser's prompt and LLM, as Rasa's ``--rephrase-config`` file gives them."""

    template: PromptTemplate
    # None: the caller falls back to the command generator's LLM.
    llm: LLMSettings | None = None
    source: str = "defaults"  # the config file's path, or "defaults"


@dataclass(frozen=True)
class RephraseOutcome:
    """What one conversation got: candidates per user message (None: none at all) and why not."""

    candidates: list[list[str]] | None
    warning: str | None
    prompt: str  # "" when no call was needed
    raw_answer: str | None


def default_rephrase_template() -> PromptTemplate:
    text = (
        resources.files("ftrecipe.dataprep")
        .joinpath("templates", DEFAULT_TEMPLATE_NAME)
        .read_text(encoding="utf-8")
    )
    return PromptTemplate(f"builtin:{DEFAULT_TEMPLATE_NAME}", text)


def read_rephrase_config(path: Path | None) -> RephraserConfig:
    """Our defaults, or the user's file with only Rasa's two keys (``prompt_template``, ``llm``).

    The template path is relative to the file. Values are never echoed in errors: a misplaced key may
    hold a secret.
    """
    if path is None:
        return RephraserConfig(template=default_rephrase_template())
    data = load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(f"{path}: expected a mapping with prompt_template and/or llm")
    for key in data:
        if key == "api_key":
            raise InputError(
                f"{path}: api_key must not be set in the config: put the key in $OPENAI_API_KEY "
                "(or $AZURE_API_KEY for azure) instead"
            )
        if key not in _ALLOWED_KEYS:
            raise InputError(f"{path}: unknown key {str(key)!r}; allowed: {', '.join(_ALLOWED_KEYS)}")
    return RephraserConfig(
        template=_template(path, data.get("prompt_template")),
        llm=_llm(path, data.get("llm")),
        source=str(path),
    )


def _template(config: Path, value: Any) -> PromptTemplate:
    if value is None:
        return default_rephrase_template()
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{config}: prompt_template must be a file path (relative to {config.name})")
    # With a path, load_template reads and syntax-checks the file; the command syntax plays no part.
    return load_template(config.parent / value, "v2")


def _llm(config: Path, value: Any) -> LLMSettings | None:
    return None if value is None else llm_settings(value, str(config))


def rephrase_prompt(
    config: RephraserConfig,
    *,
    test_case_name: str,
    transcript: str,
    user_messages: Sequence[str],
    number_of_rephrasings: int,
) -> str:
    """The prompt, with the variables Rasa's rephraser templates use (so users' templates work as is)."""
    return config.template.render(
        {
            "test_case_name": test_case_name,
            "transcript": transcript,
            "number_of_rephrasings": number_of_rephrasings,
            "number_of_user_messages": len(user_messages),
            "user_prefix": USER_PREFIX,
            "user_messages": list(user_messages),
        }
    )


# -- parsing the answer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    header: str
    candidates: list[str]
    numbered: bool  # its candidates carry list markers, as asked (an echoed transcript has none)


def _strict_key(text: str) -> str:
    """Case- and whitespace-insensitive; markdown emphasis around the text is not part of it."""
    return " ".join(text.strip().strip(_MARKUP).casefold().split())


def _loose_key(text: str) -> str:
    """Also blind to surrounding quotes and a trailing period ("Yes." is "yes")."""
    key = _strict_key(text)
    previous = None
    while key != previous:
        previous = key
        key = key.strip(_QUOTES + _MARKUP + " ").rstrip(".…").strip()
    return key


def _unquote(text: str) -> str:
    """Drop matching quotes and markdown emphasis wrapped around the whole text."""
    while True:
        stripped = text.strip()
        for wrap in ("**", "__"):
            if len(stripped) > 4 and stripped.startswith(wrap) and stripped.endswith(wrap):
                stripped = stripped[2:-2].strip()
        if len(stripped) >= 2 and _QUOTE_PAIRS.get(stripped[0]) == stripped[-1]:
            stripped = stripped[1:-1].strip()
        if stripped == text:
            return stripped
        text = stripped


def _blocks(answer: str) -> list[_Block]:
    """The ``USER:`` blocks of an answer, each with its raw candidate lines.

    A block whose lines carry list markers keeps only those (an unmarked line is a comment); a block
    without markers keeps its lines up to the first blank line (what follows is a closing remark).
    """
    blocks: list[_Block] = []
    header: str | None = None
    marked: list[str] = []
    plain: list[str] = []
    blank_seen = False

    def close() -> None:
        if header is not None:
            blocks.append(_Block(header, marked or plain, bool(marked)))

    for line in answer.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        match = _HEADER.match(line)
        if match:
            close()
            header, marked, plain, blank_seen = match["text"], [], [], False
            continue
        if header is None:
            continue  # a preamble
        stripped = line.strip()
        if not stripped:
            blank_seen = True
            continue
        if _NOISE.match(stripped):
            continue
        marker = _MARKER.match(stripped)
        if marker:
            marked.append(stripped[marker.end() :])
        elif not blank_seen:
            plain.append(stripped)
    close()
    return blocks


def _clean(candidates: Sequence[str], original: str, limit: int) -> list[str]:
    """Stripped, unquoted, without the original or duplicates, at most ``limit``."""
    seen = {_loose_key(original)}
    kept: list[str] = []
    for raw in candidates:
        if len(kept) >= limit:
            break
        text = _unquote(_LEADING_USER.sub("", _unquote(raw), count=1))
        key = _loose_key(text)
        if not key or key in seen:
            continue
        seen.add(key)
        kept.append(text)
    return kept


def _match(answer: str, user_messages: Sequence[str], number_of_rephrasings: int) -> list[list[str]] | str:
    """Candidates per message, or why the answer could not be matched.

    Exact (case/whitespace-insensitive) matches are taken first, then loose ones, so "yes" and "yes."
    in one conversation each find their own block; numbered blocks are preferred over others (an LLM
    may echo the conversation first); repeated messages take blocks in order, and one that runs out
    of blocks shares the block of its earlier twin.
    """
    blocks = _blocks(answer)
    if not blocks:
        return "no `USER:` block in the answer"
    chosen: dict[int, _Block] = {}
    used: set[int] = set()
    for key in (_strict_key, _loose_key):
        for numbered in (True, False):
            for position, message in enumerate(user_messages):
                if position in chosen:
                    continue
                wanted = key(message)
                for index, block in enumerate(blocks):
                    if index not in used and block.numbered == numbered and key(block.header) == wanted:
                        chosen[position] = block
                        used.add(index)
                        break
    result: list[list[str]] = []
    for position, message in enumerate(user_messages):
        found = chosen.get(position)
        if found is None:
            # A repeated message the LLM answered once: share its earlier twin's block.
            twins = [
                chosen[earlier]
                for earlier in range(position)
                if earlier in chosen and _loose_key(user_messages[earlier]) == _loose_key(message)
            ]
            if not twins:
                return f"no block for user message {position + 1} of {len(user_messages)} ({_short(message)})"
            found = chosen[position] = twins[0]
        result.append(_clean(found.candidates, message, number_of_rephrasings))
    return result


def _short(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1] + "…")


def parse_rephrasings(
    answer: str, user_messages: Sequence[str], number_of_rephrasings: int
) -> list[list[str]] | None:
    """Each user message's rephrasings from the LLM's answer, or None when a message has no block."""
    result = _match(answer, user_messages, number_of_rephrasings)
    return None if isinstance(result, str) else result


async def rephrase_conversation(
    client: LLMClient,
    config: RephraserConfig,
    *,
    test_case_name: str,
    transcript: str,
    user_messages: Sequence[str],
    number_of_rephrasings: int,
) -> RephraseOutcome:
    """One LLM call for the whole conversation; LLM trouble becomes a warning, never an exception.

    A template that fails to render still raises InputError: that is the user's file, not the LLM.
    """
    if number_of_rephrasings < 0:
        raise ValueError("number_of_rephrasings must not be negative")
    if number_of_rephrasings == 0 or not user_messages:
        return RephraseOutcome([[] for _ in user_messages], None, "", None)
    prompt = rephrase_prompt(
        config,
        test_case_name=test_case_name,
        transcript=transcript,
        user_messages=user_messages,
        number_of_rephrasings=number_of_rephrasings,
    )
    try:
        answer = await client.complete(prompt, purpose=PURPOSE)
    except LLMError as error:
        return RephraseOutcome(None, f"{test_case_name}: no rephrasings: {error}", prompt, None)
    result = _match(answer, user_messages, number_of_rephrasings)
    if isinstance(result, str):
        warning = f"{test_case_name}: no rephrasings: could not read the rephraser's answer: {result}"
        return RephraseOutcome(None, warning, prompt, answer)
    return RephraseOutcome(result, None, prompt, answer)
