"""Commands a CALM command generator emits: parsed from LLM output, normalised as Rasa does, serialised back.

Three syntaxes exist (see /work/shared/rasa-formats.md, "Command syntaxes"):

* ``v1`` (SingleStep): ``StartFlow(x)``, ``SetSlot(a, b)``, ``CancelFlow()``, ``Clarify(a, b)`` …
* ``v2`` (Compact): ``start flow x``, ``set slot a b``, ``cancel flow``, ``disambiguate flows a b`` …
* ``v3`` (SearchReady): as v2, but knowledge is ``search and reply`` and there is no chitchat command:
  chitchat is folded into ``search and reply``.

The module is pure (no I/O) so the data preparation, the evaluation and the assertion checks all agree on
what a completion means.

Decisions where Rasa's rules leave room (kept here so every caller sees the same ones):

* A slot value of ``None`` is written as the literal ``None`` in every syntax (``SetSlot(a, None)``,
  ``set slot a None``); parsing maps ``None`` back to ``None``, so it round-trips. The price: a slot whose
  real value is the *string* "None" cannot be expressed - Rasa's parser has the same limitation.
* v3 writes ``ChitChat`` as ``search and reply`` (v3 has no chitchat command), so ChitChat does not
  round-trip in v3; parsing ``offtopic reply`` in v3 still gives ``ChitChat`` for tolerance, and v2/v3
  accept each other's knowledge keywords (``provide info`` / ``search and reply``).
* v2/v3 set slot values: a trailing period is taken as sentence punctuation and dropped only when it is
  the value's only period (``50.`` → ``50``, ``D.C.`` stays); the formatter quotes any value that would
  not survive the plain form (``set slot a "Inc."``), so every canonical value round-trips.
* Line breaks inside a slot value are written as spaces (the format is one command per line).
* v2/v3 parsing: ``set slot a`` (no value) is read as ``SetSlot(a, None)``; ``disambiguate flow`` is
  accepted for ``disambiguate flows``; argument-less commands take nothing after them but punctuation
  (``cancel flow transfer_money`` is not a command, as in Rasa). A line wrapped in quotes/backticks loses
  its closing one, not the value's.
* v1 parsing finds every ``Name(...)`` call on a line, each call's arguments ending at the last ``)``
  before the next call. Known limits: a value holding ``)`` cannot be followed by another command on the
  same line, and a value holding a command name followed by ``(`` splits the line there.
* ``values_match`` compares *normalised* values, so ``None``, ``"None"``, ``"null"`` and ``""`` all
  match each other; text is compared case-insensitively with runs of whitespace collapsed (not removed);
  finite numbers compare as ``Decimal`` after removing well-formed thousands separators (``2,400``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Final, Literal, TypeAlias, get_args

Syntax: TypeAlias = Literal["v1", "v2", "v3"]
SYNTAXES: Final[tuple[Syntax, ...]] = get_args(Syntax)


# --------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class StartFlow:
    """Start the flow with this id."""

    flow: str


@dataclass(frozen=True)
class SetSlot:
    """Set (or, with ``None``, reset) a slot."""

    name: str
    value: str | None


@dataclass(frozen=True)
class CancelFlow:
    """Cancel the active flow."""


@dataclass(frozen=True)
class Clarify:
    """Ask the user to choose between flows; parsing keeps the options sorted and unique."""

    options: tuple[str, ...]


@dataclass(frozen=True)
class SkipQuestion:
    """Skip the question the assistant is asking."""


@dataclass(frozen=True)
class SearchAndReply:
    """Answer from the knowledge base (v2 ``provide info``)."""


@dataclass(frozen=True)
class ChitChat:
    """Answer off-topic small talk (v2 ``offtopic reply``; folded into search and reply in v3)."""


@dataclass(frozen=True)
class HumanHandoff:
    """Hand the conversation over to a human."""


@dataclass(frozen=True)
class RepeatLastBotMessages:
    """Repeat the assistant's last messages."""


@dataclass(frozen=True)
class CannotHandle:
    """The generator could not make sense of the message (also: nothing parsed)."""


Command: TypeAlias = (
    StartFlow
    | SetSlot
    | CancelFlow
    | Clarify
    | SkipQuestion
    | SearchAndReply
    | ChitChat
    | HumanHandoff
    | RepeatLastBotMessages
    | CannotHandle
)

NoArgCommand: TypeAlias = (
    CancelFlow
    | SkipQuestion
    | SearchAndReply
    | ChitChat
    | HumanHandoff
    | RepeatLastBotMessages
    | CannotHandle
)

_TYPE_NAMES: Final[dict[type[Command], str]] = {
    StartFlow: "start flow",
    SetSlot: "set slot",
    CancelFlow: "cancel flow",
    Clarify: "clarify",
    SkipQuestion: "skip question",
    SearchAndReply: "search and reply",
    ChitChat: "chitchat",
    HumanHandoff: "human handoff",
    RepeatLastBotMessages: "repeat message",
    CannotHandle: "cannot handle",
}

COMMAND_TYPES: Final[tuple[str, ...]] = tuple(_TYPE_NAMES.values())
"""Stable type names for reports and coverage, independent of the syntax."""


def command_type(command: Command) -> str:
    """The stable type name (one of ``COMMAND_TYPES``) of a command."""
    return _TYPE_NAMES[type(command)]


# ---------------------------------------------------------------------------------------- slot values

_NULL_VALUES: Final[frozenset[str]] = frozenset(
    {"", "none", "null", "undefined", "[missing]", "[missing information]"}
)
_QUOTES: Final[str] = "\"'`"


def normalize_slot_value(raw: str | None) -> str | None:
    """Strip surrounding spaces and quotes; map Rasa's placeholders for "no value" to ``None``.

    One matching pair of quotes is unwrapped (``"a b"`` → ``a b``); a lone quote left at either end by a
    sloppy or truncated output is dropped too (``"abc`` → ``abc``).
    """
    if raw is None:
        return None
    value, previous = raw.strip(), None
    while value != previous:  # to a fixed point, so normalising twice changes nothing
        previous = value
        if len(value) >= 2 and value[0] in _QUOTES and value[-1] == value[0]:
            value = value[1:-1].strip()
            continue
        if value and value[0] in _QUOTES and value.count(value[0]) == 1:
            value = value[1:].lstrip()
        if value and value[-1] in _QUOTES and value.count(value[-1]) == 1:
            value = value[:-1].rstrip()
    if value.casefold() in _NULL_VALUES:
        return None
    return value


_THOUSANDS_RE: Final = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_WS_RE: Final = re.compile(r"\s+")


def _comparable_value(value: str | None) -> Hashable:
    """The key two values must share to match: None, a finite Decimal, or folded text."""
    norm = normalize_slot_value(value)
    if norm is None:
        return None
    number_text = norm.replace(",", "") if _THOUSANDS_RE.fullmatch(norm) else norm
    if "_" not in number_text:  # Decimal("1_000") parses; a slot value like that is not a number
        try:
            number = Decimal(number_text)
        except InvalidOperation:
            pass
        else:
            if number.is_finite():
                return number
    return _WS_RE.sub(" ", norm).casefold()


def values_match(a: str | None, b: str | None) -> bool:
    """Whether two slot values mean the same: the comparison ``commands_equal`` uses."""
    return _comparable_value(a) == _comparable_value(b)


def _comparable_command(command: Command) -> Hashable:
    if isinstance(command, SetSlot):
        return ("set slot", command.name, _comparable_value(command.value))
    if isinstance(command, Clarify):
        return ("clarify", tuple(sorted(set(command.options))))
    return command


def commands_equal(a: Sequence[Command], b: Sequence[Command]) -> bool:
    """Order-insensitive multiset equality, with slot values compared by ``values_match``."""
    return Counter(map(_comparable_command, a)) == Counter(map(_comparable_command, b))


# ------------------------------------------------------------------------------------------ formatting

_V1_NAMES: Final[dict[type[Command], str]] = {
    StartFlow: "StartFlow",
    SetSlot: "SetSlot",
    CancelFlow: "CancelFlow",
    Clarify: "Clarify",
    SkipQuestion: "SkipQuestion",
    SearchAndReply: "SearchAndReply",
    ChitChat: "ChitChat",
    HumanHandoff: "HumanHandoff",
    RepeatLastBotMessages: "RepeatLastBotMessages",
    CannotHandle: "CannotHandle",
}

_COMPACT_NO_ARG: Final[dict[type[Command], str]] = {
    CancelFlow: "cancel flow",
    SkipQuestion: "skip question",
    SearchAndReply: "provide info",
    ChitChat: "offtopic reply",
    HumanHandoff: "hand over",
    RepeatLastBotMessages: "repeat message",
    CannotHandle: "cannot handle",
}
_V3_OVERRIDES: Final[dict[type[Command], str]] = {
    SearchAndReply: "search and reply",
    ChitChat: "search and reply",  # v3 has no chitchat command: it is folded into search and reply
}


def _check_syntax(syntax: str) -> None:
    if syntax not in SYNTAXES:
        raise ValueError(f"unknown command syntax {syntax!r}; expected one of {', '.join(SYNTAXES)}")


def _format_value(value: str | None, syntax: Syntax) -> str:
    """The value as written, quoted only where the plain form would not parse back to it."""
    if value is None:
        return "None"
    plain = " ".join(value.splitlines())
    parse_back = normalize_slot_value if syntax == "v1" else _compact_value
    if parse_back(plain) == plain:
        return plain
    return f'"{plain}"'


def format_command(command: Command, syntax: Syntax) -> str:
    """One command in the given syntax, as the generator is trained to emit it."""
    _check_syntax(syntax)
    if syntax == "v1":
        name = _V1_NAMES[type(command)]
        if isinstance(command, StartFlow):
            return f"{name}({command.flow})"
        if isinstance(command, SetSlot):
            return f"{name}({command.name}, {_format_value(command.value, syntax)})"
        if isinstance(command, Clarify):
            return f"{name}({', '.join(command.options)})"
        return f"{name}()"
    if isinstance(command, StartFlow):
        return f"start flow {command.flow}"
    if isinstance(command, SetSlot):
        return f"set slot {command.name} {_format_value(command.value, syntax)}"
    if isinstance(command, Clarify):
        return " ".join(["disambiguate flows", *command.options])
    if syntax == "v3" and type(command) in _V3_OVERRIDES:
        return _V3_OVERRIDES[type(command)]
    return _COMPACT_NO_ARG[type(command)]


def format_commands(commands: Sequence[Command], syntax: Syntax) -> str:
    """Commands one per line, no trailing newline: the completion of a training record."""
    return "\n".join(format_command(command, syntax) for command in commands)


def fold_for_syntax(commands: Iterable[Command], syntax: Syntax) -> list[Command]:
    """The commands as a ``syntax`` completion can express them (v3: ChitChat → SearchAndReply), deduplicated.

    Use it on expected commands before comparing them with what a v3 model's output parses to.
    """
    _check_syntax(syntax)
    folded = (SearchAndReply() if syntax == "v3" and isinstance(c, ChitChat) else c for c in commands)
    return _dedupe(folded)


# ---------------------------------------------------------------------------------------------- parsing

# v1: Rasa's SingleStep generator searches regexes over the text; several commands may share a line.
_V1_CALL_RE: Final = re.compile(
    r"(?<![A-Za-z0-9_])(" + "|".join(_V1_NAMES.values()) + r")\s*\(",
    re.IGNORECASE,
)
_V1_BY_NAME: Final[dict[str, type[Command]]] = {name.casefold(): t for t, name in _V1_NAMES.items()}
_IDENT_RE: Final = re.compile(r"[\w-]+")
_NO_ARG_TYPES: Final[tuple[type[NoArgCommand], ...]] = (
    CancelFlow,
    SkipQuestion,
    SearchAndReply,
    ChitChat,
    HumanHandoff,
    RepeatLastBotMessages,
    CannotHandle,
)


def _first_ident(text: str) -> str | None:
    """The leading identifier of ``text`` after quotes/spaces (flow ids are ``[A-Za-z0-9_-]``)."""
    match = _IDENT_RE.match(text.strip().lstrip(_QUOTES))
    return match.group(0) if match else None


def _make_no_arg(command_cls: type[Command]) -> Command | None:
    for no_arg in _NO_ARG_TYPES:
        if command_cls is no_arg:
            return no_arg()
    return None


def _v1_command(command_cls: type[Command], args: str) -> Command | None:
    if command_cls is StartFlow:
        flow = _first_ident(args)
        return StartFlow(flow) if flow else None
    if command_cls is SetSlot:
        name_part, _, value_part = args.partition(",")  # values may hold commas: split at the first only
        name = name_part.strip().strip(_QUOTES).strip()
        if not name:
            return None
        return SetSlot(name, normalize_slot_value(value_part))
    if command_cls is Clarify:
        return Clarify(tuple(_IDENT_RE.findall(args)))
    return _make_no_arg(command_cls)


def _parse_v1(text: str) -> list[Command]:
    commands: list[Command] = []
    for line in text.splitlines():
        calls = list(_V1_CALL_RE.finditer(line))
        for index, call in enumerate(calls):
            end = calls[index + 1].start() if index + 1 < len(calls) else len(line)
            segment = line[call.end() : end]
            close = segment.rfind(")")
            if close < 0:  # truncated call: Rasa's regexes need the closing parenthesis too
                continue
            command = _v1_command(_V1_BY_NAME[call.group(1).casefold()], segment[:close])
            if command is not None:
                commands.append(command)
    return commands


# v2/v3: one command per line, anchored at the start after bullets, numbering, quotes and backticks.
_LINE_PREFIX_RE: Final = re.compile(r"^[\s\W\d]*")


def _kw(words: str) -> str:
    return r"\s+".join(words.split())


_START_FLOW_RE: Final = re.compile(_kw("start flow") + r"\s+(?P<rest>.+)", re.IGNORECASE)
_SET_SLOT_RE: Final = re.compile(
    _kw("set slot") + r"\s+['\"`]?(?P<name>[^\s'\"`]+)['\"`]?(?:\s+(?P<value>.*))?", re.IGNORECASE
)
_CLARIFY_RE: Final = re.compile(_kw("disambiguate flows") + r"?\b(?P<rest>.*)", re.IGNORECASE)
_COMPACT_NO_ARG_RES: Final[tuple[tuple[re.Pattern[str], type[Command]], ...]] = tuple(
    (re.compile(_kw(words) + r"[\W_]*", re.IGNORECASE), command_cls)
    for words, command_cls in (
        ("cancel flow", CancelFlow),
        ("skip question", SkipQuestion),
        ("provide info", SearchAndReply),
        ("search and reply", SearchAndReply),
        ("offtopic reply", ChitChat),
        ("hand over", HumanHandoff),
        ("repeat message", RepeatLastBotMessages),
        ("cannot handle", CannotHandle),
    )
)
_QUOTED_VALUE_RE: Final = re.compile(r"(?P<q>['\"`])(?P<inner>.*)(?P=q)[\s.]*", re.DOTALL)


def _compact_value(raw: str | None) -> str | None:
    """A v2/v3 value: as ``normalize_slot_value``, tolerating what may close a line after the value.

    A quoted value is taken as is (``"Inc."`` → ``Inc.``); otherwise a lone closing quote or backtick
    is dropped, then a sentence-final period when it is the value's only one (``50.`` → ``50``, ``D.C.``
    stays).
    """
    if raw is None:
        return None
    value = raw.strip()
    if quoted := _QUOTED_VALUE_RE.fullmatch(value):
        return normalize_slot_value(quoted.group("inner"))
    if value and value[-1] in _QUOTES and value.count(value[-1]) == 1:
        value = value[:-1].rstrip()
    if value.endswith(".") and value.count(".") == 1:
        value = value[:-1]
    return normalize_slot_value(value)


def _compact_line(line: str) -> Command | None:
    prefix = _LINE_PREFIX_RE.match(line)
    prefix_end = prefix.end() if prefix else 0
    opener = line[:prefix_end].rstrip()[-1:]
    body = line[prefix_end:].rstrip()
    if opener and opener in _QUOTES:  # the line is wrapped: drop its closing quote, not the value's
        unclosed = body.rstrip(" \t.")
        if unclosed.endswith(opener):
            body = unclosed[:-1].rstrip()
    if match := _START_FLOW_RE.fullmatch(body):
        flow = _first_ident(match.group("rest"))
        return StartFlow(flow) if flow else None
    if match := _SET_SLOT_RE.fullmatch(body):
        return SetSlot(match.group("name"), _compact_value(match.group("value")))
    if match := _CLARIFY_RE.fullmatch(body):
        return Clarify(tuple(_IDENT_RE.findall(match.group("rest"))))
    for pattern, command_cls in _COMPACT_NO_ARG_RES:
        if pattern.fullmatch(body):
            return _make_no_arg(command_cls)
    return None


def _parse_compact(text: str) -> list[Command]:
    return [command for line in text.splitlines() if (command := _compact_line(line)) is not None]


# -------------------------------------------------------------------------------------- normalisation


def _dedupe(commands: Iterable[Command]) -> list[Command]:
    seen: set[Command] = set()
    unique: list[Command] = []
    for command in commands:
        if command not in seen:
            seen.add(command)
            unique.append(command)
    return unique


def _normalize_one(
    command: Command, flows: Collection[str] | None, slots: Collection[str] | None
) -> Command | None:
    if isinstance(command, SetSlot):
        if command.name == "flow_name":  # Rasa: setting flow_name means starting that flow
            value = normalize_slot_value(command.value)
            return _normalize_one(StartFlow(value), flows, slots) if value else None
        if slots is not None and command.name not in slots:
            return None
        return SetSlot(command.name, normalize_slot_value(command.value))
    if isinstance(command, StartFlow):
        return None if flows is not None and command.flow not in flows else command
    if isinstance(command, Clarify):
        options = sorted(set(command.options))
        if flows is not None:
            options = [option for option in options if option in flows]
        if not options:
            return None
        return StartFlow(options[0]) if len(options) == 1 else Clarify(tuple(options))
    return command


def normalize_commands(
    commands: Iterable[Command],
    *,
    flows: Collection[str] | None = None,
    slots: Collection[str] | None = None,
    empty_as_cannot_handle: bool = True,
) -> list[Command]:
    """Apply Rasa's post-parse rules; ``parse_commands`` uses it, and so can annotated commands.

    Unknown flows/slots are dropped only when ``flows``/``slots`` are given; duplicates are removed
    (first kept); an empty result becomes ``[CannotHandle()]`` as in Rasa, unless
    ``empty_as_cannot_handle`` is False (scoring tells "nothing parsed" from an explicit cannot handle).
    """
    kept = (_normalize_one(command, flows, slots) for command in commands)
    unique = _dedupe(command for command in kept if command is not None)
    return unique or ([CannotHandle()] if empty_as_cannot_handle else [])


def parse_commands(
    text: str,
    syntax: Syntax,
    *,
    flows: Collection[str] | None = None,
    slots: Collection[str] | None = None,
    empty_as_cannot_handle: bool = True,
) -> list[Command]:
    """Parse an LLM completion the way Rasa does; prose lines are ignored, nothing parsed ⇒ CannotHandle
    (or ``[]`` with ``empty_as_cannot_handle=False``)."""
    _check_syntax(syntax)
    raw = _parse_v1(text) if syntax == "v1" else _parse_compact(text)
    return normalize_commands(raw, flows=flows, slots=slots, empty_as_cannot_handle=empty_as_cannot_handle)
