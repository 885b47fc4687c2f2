"""Stages 2 and 3: check rephrasings with the command generator, then recombine them into data points.

A rephrasing is kept only when the production command generator, shown the same state and history with
the rephrased message, answers with the same commands (set slot values may differ: the rephrasing may say
"2,400" where the original said "2400"), and its data point is labelled with what the generator answered
for it, so values match the text. Synthetic conversation k of a test uses the k-th passing rephrasing of
each turn (cycling through shorter lists), and every prompt is re-rendered by replaying the synthetic
conversation: its history holds its own messages and its state its own commands.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ftrecipe.dataprep.annotate import AnnotatedConversation, AnnotatedTurn, conversation_id
from ftrecipe.dataprep.assistant import Assistant
from ftrecipe.dataprep.commands import Command, SetSlot, Syntax, command_type, format_commands, parse_commands
from ftrecipe.dataprep.llm import LLMClient, LLMError
from ftrecipe.dataprep.prompt import PromptTemplate
from ftrecipe.dataprep.split import DataPoint
from ftrecipe.dataprep.state import Turn, conversation

# ------------------------------------------------------------------------------------------ validation


def same_commands(original: Sequence[Command], candidate: Sequence[Command]) -> bool:
    """The recipe's rule: same number, non-set-slot commands equal, set slots on the same slots."""
    if len(original) != len(candidate):
        return False
    others = Counter(c for c in original if not isinstance(c, SetSlot))
    if others != Counter(c for c in candidate if not isinstance(c, SetSlot)):
        return False
    slots = Counter(c.name for c in original if isinstance(c, SetSlot))
    return slots == Counter(c.name for c in candidate if isinstance(c, SetSlot))


@dataclass(frozen=True)
class CheckedRephrasing:
    text: str
    passed: bool
    commands: tuple[Command, ...]  # what the command generator answered for the rephrasing
    reason: str | None = None  # why it failed


def _turn_with_text(
    assistant: Assistant, annotated: AnnotatedConversation, step_index: int, text: str
) -> Turn:
    """The turn at `step_index` replayed with `text` in place of the user's message, history unchanged."""
    by_step = {t.step_index: t for t in annotated.turns}
    replay = conversation(assistant, annotated.suite, annotated.test, {step_index: text}, annotated.routes())
    turn = next(replay)
    while turn.step_index != step_index:
        turn = replay.send(list(by_step[turn.step_index].commands))
    replay.close()
    return turn


async def check_rephrasing(
    client: LLMClient,
    assistant: Assistant,
    template: PromptTemplate,
    syntax: Syntax,
    annotated: AnnotatedConversation,
    original: AnnotatedTurn,
    text: str,
    prompt_variables: dict[str, Any],
) -> CheckedRephrasing:
    turn = _turn_with_text(assistant, annotated, original.step_index, text)
    prompt = template.render({**turn.variables, **prompt_variables})
    try:
        answer = await client.complete(prompt, purpose="validate")
    except LLMError as error:
        return CheckedRephrasing(text, False, (), f"LLM call failed: {error}")
    commands = parse_commands(
        answer, syntax, flows=[f.id for f in assistant.user_flows()], slots=list(assistant.slots)
    )
    if same_commands(original.commands, commands):
        return CheckedRephrasing(text, True, tuple(commands))
    return CheckedRephrasing(text, False, tuple(commands), "different commands")


def transcript(assistant: Assistant, annotated: AnnotatedConversation) -> list[str]:
    """The whole test as `USER:` / `AI:` lines, for the rephraser."""
    by_step = {t.step_index: t for t in annotated.turns}
    replay = conversation(assistant, annotated.suite, annotated.test, routes=annotated.routes())
    try:
        turn = next(replay)
        while True:
            turn = replay.send(list(by_step[turn.step_index].commands))
    except StopIteration as end:
        return list(end.value)


# ------------------------------------------------------------------------------------------ recombination


@dataclass(frozen=True)
class Variant:
    """One version of a turn in a synthetic conversation: its text and its commands."""

    text: str
    commands: tuple[Command, ...]
    rephrased: bool


def synthetic_plans(
    annotated: AnnotatedConversation, passing: dict[int, list[CheckedRephrasing]]
) -> list[dict[int, Variant]]:
    """S = max |P_i| plans; plan k uses P_i[k mod |P_i|] for turn i, or the original when P_i is empty."""
    count = max((len(passing.get(t.step_index, [])) for t in annotated.turns), default=0)
    plans = []
    for k in range(count):
        plan = {}
        for turn in annotated.turns:
            candidates = passing.get(turn.step_index, [])
            if candidates:
                chosen = candidates[k % len(candidates)]
                plan[turn.step_index] = Variant(chosen.text, chosen.commands, True)
            else:
                plan[turn.step_index] = Variant(turn.text, turn.commands, False)
        plans.append(plan)
    return plans


def data_points(
    assistant: Assistant,
    annotated: AnnotatedConversation,
    plan: dict[int, Variant] | None,
    template: PromptTemplate,
    syntax: Syntax,
    prompt_variables: dict[str, Any],
    test_name: str,
) -> list[DataPoint]:
    """Data points of the original conversation (plan None) or of one synthetic one, by replaying it."""
    originals = {t.step_index: t for t in annotated.turns}
    variants = plan or {i: Variant(t.text, t.commands, False) for i, t in originals.items()}
    replay = conversation(
        assistant,
        annotated.suite,
        annotated.test,
        {i: v.text for i, v in variants.items() if v.rephrased},
        annotated.routes(),
    )
    points: list[DataPoint] = []
    turn = next(replay, None)
    while turn is not None:
        variant = variants[turn.step_index]
        if plan is None:
            prompt = originals[turn.step_index].prompt  # exactly what stage 1 sent
        else:
            prompt = template.render({**turn.variables, **prompt_variables})
        points.append(
            DataPoint(
                prompt=prompt,
                output=format_commands(variant.commands, syntax),
                original_test_name=test_name,
                original_user_utterance=originals[turn.step_index].text,
                rephrased_user_utterance=variant.text if variant.rephrased else None,
                command_types=tuple(dict.fromkeys(command_type(c) for c in variant.commands)),
            )
        )
        try:
            turn = replay.send(list(variant.commands))
        except StopIteration:
            turn = None
    return points


def conversation_data_points(
    assistant: Assistant,
    annotated: AnnotatedConversation,
    passing: dict[int, list[CheckedRephrasing]],
    template: PromptTemplate,
    syntax: Syntax,
    prompt_variables: dict[str, Any],
    base: Any = None,
) -> list[DataPoint]:
    """The original conversation's data points, then those of each synthetic conversation."""
    name = conversation_id(annotated.test, base)
    points = data_points(assistant, annotated, None, template, syntax, prompt_variables, name)
    for plan in synthetic_plans(annotated, passing):
        points += data_points(assistant, annotated, plan, template, syntax, prompt_variables, name)
    return points
