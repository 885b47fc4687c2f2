"""The report files: eval.json (every figure), eval.md (for people), predictions.jsonl (every turn). Pure.

eval.json's top-level names are the PhaseReport figures' names (`command_accuracy`, `num_turns`,
`parse_failure_rate`, `latency_p50_seconds`, `latency_p95_seconds`, `tokens_per_second`,
`per_command_f1`), so a figure means the same in status, in the bundle and in a notebook.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ftrecipe import __version__
from ftrecipe.dataprep.commands import COMMAND_TYPES, Command, Syntax, format_commands
from ftrecipe.evaluation.references import Reference, SyntaxChoice
from ftrecipe.evaluation.scoring import NOTHING, SET_SLOT, SET_SLOT_VALUE, Generation, ScoredTurn, Scores

WORST_EXAMPLES: Final = 10
PROMPT_TAIL_CHARS: Final = 600
ANSWER_CHARS: Final = 200  # a raw answer in eval.md's table of failing E2E tests (eval.json has it whole)
_BACKTICKS: Final = re.compile(r"`+")
_LABEL_ORDER: Final = {name: position for position, name in enumerate((*COMMAND_TYPES, NOTHING))}


@dataclass(frozen=True)
class EvalContext:
    """What was evaluated, on what, and how: the report's header."""

    # {"kind": "local", "base_model", "adapter"} or {"kind": "endpoint", "endpoint", "model"}
    model: Mapping[str, str | None]
    data: str  # --data as given
    val_file: str  # val.jsonl relative to the data folder
    val_sha256: str
    syntax: SyntaxChoice
    settings: Mapping[str, Any]  # max_new_tokens, and batch_size or concurrency

    @property
    def model_label(self) -> str:
        if self.model.get("kind") == "endpoint":
            return f"{self.model.get('model')} at {self.model.get('endpoint')}"
        adapter = self.model.get("adapter")
        base = self.model.get("base_model")
        return f"{base} + adapter {adapter}" if adapter else f"{base} (no adapter)"


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def per_command_table(scores: Scores) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "precision": _round(tally.precision),
            "recall": _round(tally.recall),
            "f1": _round(tally.f1),
            "expected": tally.expected,
            "predicted": tally.predicted,
            "tp": tally.tp,
            "fp": tally.fp,
            "fn": tally.fn,
        }
        for name, tally in scores.per_command.items()
    }


def confusion_labels(scores: Scores) -> tuple[list[str], list[str]]:
    """Row (expected) and column (predicted) labels that occur, in command-type order, `(none)` last."""
    rows = sorted(scores.confusion, key=_LABEL_ORDER.__getitem__)
    columns = sorted(
        {name for row in scores.confusion.values() for name in row}, key=_LABEL_ORDER.__getitem__
    )
    return rows, columns


def eval_json(scores: Scores, context: EvalContext) -> dict[str, Any]:
    """Every figure, plus what was evaluated and how."""
    rows, columns = confusion_labels(scores)
    return {
        "command_accuracy": _round(scores.command_accuracy),
        "num_turns": scores.num_turns,
        "right_turns": scores.right_turns,
        "parse_failures": scores.parse_failures,
        "parse_failure_rate": _round(scores.parse_failure_rate),
        "truncated_turns": scores.truncated_turns,
        "per_command": per_command_table(scores),
        "per_command_f1": {name: _round(f1) for name, f1 in scores.per_command_f1.items()},
        "confusion": {
            "rows": rows,
            "columns": columns,
            "counts": {row: dict(scores.confusion[row]) for row in rows},
        },
        "latency_p50_seconds": _round(scores.latency_p50_seconds),
        "latency_p95_seconds": _round(scores.latency_p95_seconds),
        "latency_mean_seconds": _round(scores.latency_mean_seconds),
        "generated_tokens": scores.generated_tokens,
        "generation_seconds": _round(scores.generation_seconds),
        "tokens_per_second": _round(scores.tokens_per_second, 3),
        "syntax": context.syntax.syntax,
        "syntax_source": context.syntax.source,
        "model": dict(context.model),
        "data": {"uri": context.data, "val": context.val_file, "sha256": context.val_sha256},
        "settings": dict(context.settings),
        "ftrecipe_version": __version__,
    }


def _commands(commands: Sequence[Command], syntax: Syntax) -> str:
    return format_commands(commands, syntax)


def predictions_jsonl(
    references: Sequence[Reference],
    generations: Sequence[Generation],
    turns: Sequence[ScoredTurn],
    context: EvalContext,
) -> str:
    """One JSON line per turn: where, the expected and predicted commands, the raw answer, the verdict."""
    syntax = context.syntax.syntax
    lines = []
    for reference, generation, turn in zip(references, generations, turns, strict=True):
        record = {
            "where": f"{context.val_file}:{reference.line}",
            "right": turn.right,
            "parse_failure": turn.parse_failure,
            "expected": _commands(turn.expected, syntax),
            "predicted": _commands(turn.predicted, syntax),
            "answer": generation.text,
            "latency_seconds": _round(generation.latency_seconds),
            "generated_tokens": generation.generated_tokens,
            "truncated": generation.truncated,
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)


def worst_turns(turns: Sequence[ScoredTurn], limit: int = WORST_EXAMPLES) -> list[int]:
    """Positions of the wrong turns: parse failures first (the answer is unusable), then most errors, then
    file order."""
    wrong = [position for position, turn in enumerate(turns) if not turn.right]
    wrong.sort(key=lambda position: (not turns[position].parse_failure, -turns[position].errors, position))
    return wrong[:limit]


def _fenced(text: str) -> str:
    """`text` in a code fence longer than any backtick run inside it."""
    longest = max((len(run) for run in _BACKTICKS.findall(text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _prompt_tail(reference: Reference) -> str:
    prompt = "\n".join(message["content"] for message in reference.prompt_messages)
    if len(prompt) <= PROMPT_TAIL_CHARS:
        return prompt
    return "…" + prompt[-PROMPT_TAIL_CHARS:]


def _cell(text: str | None) -> str:
    """Text in a Markdown table cell: pipes escaped, lines joined with <br>."""
    if not text:
        return ""
    return "<br>".join(line.replace("|", "\\|") for line in text.splitlines())


def _e2e_section(e2e: Mapping[str, Any]) -> list[str]:
    out = [
        "## E2E tests with the model in the loop",
        "",
        f"The held-out tests of `{e2e['file']}`, replayed turn by turn: each prompt is rendered from the state "
        "the model's own earlier commands produced, and each turn is checked as prepare-data checks the "
        "teacher's. A test stops at its first failing turn "
        f"({e2e['model_calls']} model calls).",
        "",
    ]
    failed = e2e["failed"]
    if not failed:
        return [*out, "Every test passes.", ""]
    out += [
        "| test | turn | user message | expected | got (parsed, and why the turn fails) | the model's answer |",
        "| --- | ---: | --- | --- | --- | --- |",
    ]
    for failure in failed:
        answer = failure["answer"]
        if answer is not None and len(answer) > ANSWER_CHARS:
            answer = answer[: ANSWER_CHARS - 1] + "…"
        out.append(
            f"| {_cell(failure['test'])} | {failure['turn_index']} | {_cell(failure['user_message'])} | "
            f"{_cell(failure['expected'])} | {_cell(failure['actual'])} | {_cell(answer)} |"
        )
    return [*out, ""]


def eval_md(
    scores: Scores,
    references: Sequence[Reference],
    generations: Sequence[Generation],
    context: EvalContext,
    e2e: Mapping[str, Any] | None = None,
) -> str:
    """The readable report: headline figures, the per-command table, the confusion table, the worst turns;
    with `e2e` (eval.json's `e2e` block) the E2E pass rate beside command accuracy and the failing tests."""
    syntax = context.syntax.syntax
    latency = f"p50 {_number(scores.latency_p50_seconds)} s, p95 {_number(scores.latency_p95_seconds)} s"
    e2e_row = (
        []
        if e2e is None
        else [
            f"| E2E pass rate | **{_percent(e2e['pass_rate'])}** ({e2e['passed']} of {e2e['tests']} held-out "
            "tests pass with the model's own commands driving the dialogue) |"
        ]
    )
    out = [
        f"# Evaluation of {context.model_label}",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| command accuracy | **{_percent(scores.command_accuracy)}** ({scores.right_turns} of "
        f"{scores.num_turns} turns with the whole command set right) |",
        *e2e_row,
        f"| parse failures | {_percent(scores.parse_failure_rate)} ({scores.parse_failures} turns) |",
        f"| answers cut by max new tokens ({context.settings.get('max_new_tokens')}) | "
        f"{scores.truncated_turns} |",
        f"| latency per turn | {latency} |",
        f"| generated tokens per second | {_number(scores.tokens_per_second, 1)} |",
        f"| data | `{context.data}` → `{context.val_file}`, syntax {syntax} ({context.syntax.source}) |",
        "",
        *(_e2e_section(e2e) if e2e is not None else []),
        "## Per command type",
        "",
        "| command | precision | recall | F1 | expected | predicted |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, tally in scores.per_command.items():
        out.append(
            f"| {name} | {_number(tally.precision)} | {_number(tally.recall)} | {_number(tally.f1)} | "
            f"{tally.expected} | {tally.predicted} |"
        )
    out += [
        "",
        f"`{SET_SLOT}` counts a slot right by its name, `{SET_SLOT_VALUE}` by its name and value. "
        "Precision is n/a for a type never predicted, recall for one never expected.",
        "",
        "## Command types: expected (rows) × predicted (columns)",
        "",
    ]
    rows, columns = confusion_labels(scores)
    out.append("| expected \\ predicted | " + " | ".join(columns) + " |")
    out.append("| --- | " + " | ".join("---:" for _ in columns) + " |")
    for row in rows:
        cells = [str(scores.confusion[row].get(column, 0) or "") for column in columns]
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    out += [
        "",
        "A command whose type appears on both sides of a turn counts on the diagonal, whatever its arguments. "
        f"A missed command with no spurious one to pair with is in the `{NOTHING}` column; a spurious one "
        f"with no missed one, in the `{NOTHING}` row.",
        "",
        "## Worst examples",
        "",
    ]
    worst = worst_turns(scores.turns)
    if not worst:
        out.append("Every turn is right.")
    for rank, position in enumerate(worst, start=1):
        turn, reference, generation = scores.turns[position], references[position], generations[position]
        verdict = "parse failure" if turn.parse_failure else f"{turn.errors} wrong or missing command(s)"
        if generation.truncated:
            verdict += ", cut by max new tokens"
        out += [
            f"### {rank}. `{context.val_file}:{reference.line}`: {verdict}",
            "",
            "Prompt tail:",
            "",
            _fenced(_prompt_tail(reference)),
            "",
            "Expected:",
            "",
            _fenced(_commands(turn.expected, syntax)),
            "",
            "Got:",
            "",
            _fenced(generation.text or "(empty answer)"),
            "",
        ]
    return "\n".join(out).rstrip("\n") + "\n"
