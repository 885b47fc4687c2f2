"""The validation split as references: each record's prompt messages and the commands its completion holds.

`val.jsonl` is found in the layouts `train` accepts (`training.data.SPLIT_DIRS`), in either record format.
The syntax the completions are written in is `--syntax`, else prepare-data's `params.yaml` beside the
splits, else the recipe default (v2). A reference completion that parses to nothing is bad input, not a
figure: it almost always means the syntax is wrong, and scoring against it would be meaningless.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

from ftrecipe.dataprep.commands import SYNTAXES, Command, Syntax
from ftrecipe.evaluation.errors import EvalError
from ftrecipe.evaluation.scoring import parse_answer
from ftrecipe.training.data import SPLIT_DIRS, DataError, to_messages

VAL_NAME: Final = "val.jsonl"
PARAMS_NAME: Final = "params.yaml"
DEFAULT_SYNTAX: Final[Syntax] = "v2"  # FinetuneRecipe's spec.commandGenerator.syntax default
_SHOWN_CHARS: Final = 80


@dataclass(frozen=True)
class SyntaxChoice:
    syntax: Syntax
    # Where it came from: "--syntax", the params.yaml path, or "default".
    source: str


@dataclass(frozen=True)
class Reference:
    """One validation record: `messages` end with the expected answer (the prompt is everything before)."""

    where: str  # "path:line", for error messages
    line: int
    messages: list[dict[str, str]]
    expected_text: str
    expected: tuple[Command, ...]

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages[:-1]


def record_messages(prompt: str) -> list[dict[str, str]]:
    """A rendered prompt as an instruction record's messages, with an empty answer last (what the local
    generator takes: it shows the model every message but the answer)."""
    return to_messages({"prompt": prompt, "completion": ""})


def prompt_messages(prompt: str) -> list[dict[str, str]]:
    """A rendered prompt as the messages an instruction record holds before its answer (one user message,
    as Rasa's command generators send it): what `evaluate --e2e` shows the model, as training did."""
    return record_messages(prompt)[:-1]


def find_val(data_dir: Path, shown: str | None = None) -> Path:
    """`val.jsonl` in the first of train's split layouts that has one; `shown` names `data_dir` in errors."""
    name = shown or str(data_dir)
    if not data_dir.is_dir():
        raise EvalError(f"{name}: data folder not found")
    for relative in SPLIT_DIRS:
        candidate = data_dir / relative / VAL_NAME
        if candidate.is_file():
            return candidate
    looked = ", ".join(f"{name.rstrip('/')}/{(relative / VAL_NAME).as_posix()}" for relative in SPLIT_DIRS)
    hint = (
        "prepare-data writes it when --train-frac is below 1"
        if any((data_dir / relative / "train.jsonl").is_file() for relative in SPLIT_DIRS)
        else "point --data at prepare-data's output"
    )
    raise EvalError(f"{name}: no {VAL_NAME} (looked for {looked}); {hint}")


def _params_candidates(data_dir: Path, val: Path) -> list[Path]:
    candidates = [data_dir / PARAMS_NAME]
    if val.parent.name == SPLIT_DIRS[0].name and val.parent.parent.name == SPLIT_DIRS[0].parent.name:
        candidates.append(val.parent.parent.parent / PARAMS_NAME)  # --data named the ft_splits folder
    return candidates


def _syntax_in(params: Path) -> Syntax | None:
    try:
        loaded = yaml.safe_load(params.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    generator = loaded.get("command_generator") if isinstance(loaded, dict) else None
    syntax = generator.get("syntax") if isinstance(generator, dict) else None
    for known in SYNTAXES:
        if syntax == known:
            return known
    return None


def choose_syntax(given: Syntax | None, data_dir: Path, val: Path) -> SyntaxChoice:
    """`--syntax`, else the one prepare-data recorded in params.yaml, else the recipe default."""
    if given is not None:
        return SyntaxChoice(given, "--syntax")
    for params in _params_candidates(data_dir, val):
        if params.is_file() and (recorded := _syntax_in(params)) is not None:
            return SyntaxChoice(recorded, str(params))
    return SyntaxChoice(DEFAULT_SYNTAX, "default")


def _shown(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _SHOWN_CHARS else flat[: _SHOWN_CHARS - 1] + "…"


def read_references(val: Path, syntax: SyntaxChoice, shown: str | None = None) -> list[Reference]:
    """Every record of `val`; a broken record or a completion without commands names its file and line.

    `shown` names the file in messages (the s3:// URI it was fetched from, say); default: its path.
    """
    name = shown or str(val)
    references = []
    try:
        lines = val.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"{name}: cannot read: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            messages = to_messages(json.loads(line), where)
        except ValueError as exc:  # json's errors and DataError alike
            reason = str(exc) if isinstance(exc, DataError) else f"{where}: not JSON: {exc}"
            raise EvalError(reason) from None
        answer = messages[-1]["content"]
        parsed = parse_answer(answer, syntax.syntax)
        if parsed.parse_failure:
            raise EvalError(
                f"{where}: the completion {_shown(answer)!r} holds no command in syntax {syntax.syntax} "
                f"(from {syntax.source}); pass --syntax with the syntax the data was prepared in"
            )
        references.append(Reference(where, number, messages, answer, parsed.commands))
    if not references:
        raise EvalError(
            f"{name}: no records to evaluate; prepare-data writes them when --train-frac is below 1"
        )
    return references
