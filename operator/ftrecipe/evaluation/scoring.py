"""Scoring a command generator's answers against the expected commands: pure functions over typed data.

The rules (docs/evaluation.md states them for users):

* Answers and references are read with prepare-data's parser (`parse_commands`), so a completion means
  the same thing everywhere. v3 folds chitchat into search and reply on both sides (`fold_for_syntax`).
* A turn is right when its whole command set is: `commands_equal`, order-insensitive, slot values compared
  as prepare-data compares them (`2,400` = `2400`, case and spacing ignored). `command_accuracy` is the
  share of right turns.
* Per command type, commands are matched one to one within a turn and counted as true positives, false
  positives (predicted, not expected) and false negatives (expected, not predicted), summed over turns.
  `set slot` matches on the slot name alone, `set slot value` on name and value; `start flow` on the
  flow; `clarify` on the whole option set; the other types on the type alone.
* An answer that parses to no command at all is a parse failure: it predicts nothing, so every expected
  command is missed and the turn is wrong. An explicit `cannot handle` is a command like any other.
* The confusion table counts command types only: per turn, types present on both sides pair with
  themselves (whatever their arguments); the remaining expected and predicted types pair in the order of
  `COMMAND_TYPES`, and what is left over pairs with `(none)`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Final

from ftrecipe.dataprep.commands import (
    COMMAND_TYPES,
    Command,
    SetSlot,
    Syntax,
    command_type,
    commands_equal,
    fold_for_syntax,
    parse_commands,
)

SET_SLOT: Final = "set slot"
SET_SLOT_VALUE: Final = "set slot value"
SCORED_TYPES: Final[tuple[str, ...]] = tuple(
    name for base in COMMAND_TYPES for name in ((base, SET_SLOT_VALUE) if base == SET_SLOT else (base,))
)
"""The per-command rows: every command type, and `set slot value` (name and value) after `set slot` (name)."""

NOTHING: Final = "(none)"
"""The confusion table's row and column for a command with no counterpart in the turn."""


@dataclass(frozen=True)
class ParsedAnswer:
    """A completion as commands; `parse_failure` when it held no command at all (prose, garbage, empty)."""

    commands: tuple[Command, ...]
    parse_failure: bool


def parse_answer(text: str, syntax: Syntax) -> ParsedAnswer:
    """Parse a completion with the recipe syntax, telling "nothing parsed" apart from `cannot handle`."""
    parsed = parse_commands(text, syntax, empty_as_cannot_handle=False)
    return ParsedAnswer(tuple(fold_for_syntax(parsed, syntax)), parse_failure=not parsed)


@dataclass(frozen=True)
class Generation:
    """One answer of the model under test, with what it cost."""

    text: str
    latency_seconds: float
    # None when the server did not report usage.
    generated_tokens: int | None
    # Stopped by the token limit rather than by the end of the turn.
    truncated: bool = False


@dataclass(frozen=True)
class GenerationRun:
    """Answers in the order of the prompts, and the wall time spent generating them."""

    generations: list[Generation]
    seconds: float


@dataclass(frozen=True)
class Tally:
    """True positives, false positives and false negatives of one command type."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def expected(self) -> int:
        return self.tp + self.fn

    @property
    def predicted(self) -> int:
        return self.tp + self.fp

    @property
    def precision(self) -> float | None:
        """None when the type was never predicted."""
        return self.tp / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        """None when the type was never expected."""
        return self.tp / self.expected if self.expected else None

    @property
    def f1(self) -> float | None:
        """2·tp / (2·tp + fp + fn): the harmonic mean of precision and recall, 0 when either is 0 or missing."""
        total = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / total if total else None


def _matches(scored_type: str, expected: Command, predicted: Command) -> bool:
    if scored_type == SET_SLOT:
        return (
            isinstance(expected, SetSlot)
            and isinstance(predicted, SetSlot)
            and expected.name == predicted.name
        )
    return commands_equal([expected], [predicted])


def _count_matched(
    expected: Sequence[Command], predicted: Sequence[Command], same: Callable[[Command, Command], bool]
) -> int:
    """Commands paired one to one; greedy pairing is optimal because `same` is an equivalence relation."""
    unpaired = list(expected)
    matched = 0
    for command in predicted:
        for position, candidate in enumerate(unpaired):
            if same(candidate, command):
                del unpaired[position]
                matched += 1
                break
    return matched


def _base_type(scored_type: str) -> str:
    return SET_SLOT if scored_type == SET_SLOT_VALUE else scored_type


def type_tallies(expected: Sequence[Command], predicted: Sequence[Command]) -> dict[str, Tally]:
    """Per scored type present on either side: its tally for this turn."""
    tallies: dict[str, Tally] = {}
    for scored_type in SCORED_TYPES:
        wanted = [c for c in expected if command_type(c) == _base_type(scored_type)]
        got = [c for c in predicted if command_type(c) == _base_type(scored_type)]
        if not wanted and not got:
            continue
        tp = _count_matched(wanted, got, partial(_matches, scored_type))
        tallies[scored_type] = Tally(tp=tp, fp=len(got) - tp, fn=len(wanted) - tp)
    return tallies


def type_pairs(expected: Sequence[Command], predicted: Sequence[Command]) -> list[tuple[str, str]]:
    """(expected type, predicted type) cells of the confusion table for one turn; see the module notes."""
    wanted = Counter(command_type(c) for c in expected)
    got = Counter(command_type(c) for c in predicted)
    both = wanted & got

    def in_order(counts: Counter[str]) -> list[str]:
        return [name for name in COMMAND_TYPES for _ in range(counts[name])]

    pairs = [(name, name) for name in in_order(both)]
    missed, spurious = in_order(wanted - both), in_order(got - both)
    for position in range(max(len(missed), len(spurious))):
        pairs.append(
            (
                missed[position] if position < len(missed) else NOTHING,
                spurious[position] if position < len(spurious) else NOTHING,
            )
        )
    return pairs


@dataclass(frozen=True)
class ScoredTurn:
    expected: tuple[Command, ...]
    # What the answer parsed to; empty for a parse failure.
    predicted: tuple[Command, ...]
    parse_failure: bool
    right: bool
    tallies: Mapping[str, Tally]

    @property
    def errors(self) -> int:
        """Missed plus spurious commands, slot values included (ranks the worst examples)."""
        return sum(t.fp + t.fn for name, t in self.tallies.items() if name != SET_SLOT)


def score_turn(expected: Sequence[Command], answer: ParsedAnswer) -> ScoredTurn:
    """One turn: right or not, and its per-type tallies. `expected` is already parsed (and folded)."""
    predicted = () if answer.parse_failure else answer.commands
    return ScoredTurn(
        expected=tuple(expected),
        predicted=predicted,
        parse_failure=answer.parse_failure,
        right=not answer.parse_failure and commands_equal(expected, predicted),
        tallies=type_tallies(expected, predicted),
    )


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Scores:
    """Every figure of one evaluation."""

    num_turns: int
    right_turns: int
    parse_failures: int
    truncated_turns: int
    # In SCORED_TYPES order; only the types expected or predicted at least once.
    per_command: Mapping[str, Tally]
    # expected type → predicted type → turns' commands; NOTHING for no counterpart.
    confusion: Mapping[str, Mapping[str, int]]
    latency_p50_seconds: float | None
    latency_p95_seconds: float | None
    latency_mean_seconds: float | None
    # None when some answer came without a token count (a server without usage).
    generated_tokens: int | None
    generation_seconds: float
    tokens_per_second: float | None
    turns: tuple[ScoredTurn, ...] = field(default=(), repr=False)

    @property
    def command_accuracy(self) -> float:
        return self.right_turns / self.num_turns

    @property
    def parse_failure_rate(self) -> float:
        return self.parse_failures / self.num_turns

    @property
    def per_command_f1(self) -> dict[str, float]:
        return {name: tally.f1 for name, tally in self.per_command.items() if tally.f1 is not None}


def summarize(turns: Sequence[ScoredTurn], run: GenerationRun) -> Scores:
    """All figures from the scored turns and the run that generated their answers (same order)."""
    generations, generation_seconds = run.generations, run.seconds
    if not turns:
        raise ValueError("no turns to summarize")
    if len(turns) != len(generations):
        raise ValueError(f"{len(turns)} scored turns but {len(generations)} generations")
    totals: dict[str, Tally] = {}
    confusion: dict[str, Counter[str]] = {}
    for turn in turns:
        for name, tally in turn.tallies.items():
            totals[name] = totals.get(name, Tally()) + tally
        for wanted, got in type_pairs(turn.expected, turn.predicted):
            confusion.setdefault(wanted, Counter())[got] += 1
    latencies = [g.latency_seconds for g in generations]
    counts = [g.generated_tokens for g in generations]
    generated = None if any(c is None for c in counts) else sum(c for c in counts if c is not None)
    row_order = {name: position for position, name in enumerate((*COMMAND_TYPES, NOTHING))}
    return Scores(
        num_turns=len(turns),
        right_turns=sum(t.right for t in turns),
        parse_failures=sum(t.parse_failure for t in turns),
        truncated_turns=sum(g.truncated for g in generations),
        per_command={name: totals[name] for name in SCORED_TYPES if name in totals},
        confusion={
            wanted: {got: row[got] for got in sorted(row, key=row_order.__getitem__)}
            for wanted, row in sorted(confusion.items(), key=lambda item: row_order[item[0]])
        },
        latency_p50_seconds=percentile(latencies, 0.50),
        latency_p95_seconds=percentile(latencies, 0.95),
        latency_mean_seconds=sum(latencies) / len(latencies),
        generated_tokens=generated,
        generation_seconds=generation_seconds,
        tokens_per_second=generated / generation_seconds
        if generated is not None and generation_seconds > 0
        else None,
        turns=tuple(turns),
    )
