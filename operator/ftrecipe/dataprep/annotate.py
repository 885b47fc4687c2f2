"""Stage 1: label every user turn of the E2E tests with commands, and keep only tests whose labels agree.

Two labellers: the production command generator's LLM (the oracle), checked against what the test
asserts, or the assertions alone (offline). The rules that turn assertions into expectations are pure
functions (`expectations`, `problems`, `derive_commands`); the async driver only calls the LLM.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ftrecipe.dataprep.assistant import Assistant
from ftrecipe.dataprep.commands import (
    CancelFlow,
    CannotHandle,
    ChitChat,
    Clarify,
    Command,
    HumanHandoff,
    RepeatLastBotMessages,
    SearchAndReply,
    SetSlot,
    SkipQuestion,
    StartFlow,
    Syntax,
    fold_for_syntax,
    format_command,
    parse_commands,
    values_match,
)
from ftrecipe.dataprep.e2e import (
    ClarificationContains,
    FlowCancelled,
    FlowStarted,
    SlotWasSet,
    TestCase,
    TestSuite,
    UserStep,
)
from ftrecipe.dataprep.llm import LLMClient, LLMError
from ftrecipe.dataprep.prompt import PromptTemplate
from ftrecipe.dataprep.state import Turn, conversation

# Built-in patterns whose start means the command generator issued this command.
PATTERN_COMMANDS: dict[str, Command] = {
    "pattern_chitchat": ChitChat(),
    "pattern_search": SearchAndReply(),
    "pattern_human_handoff": HumanHandoff(),
    "pattern_skip_question": SkipQuestion(),
    "pattern_repeat_bot_messages": RepeatLastBotMessages(),
    "pattern_cannot_handle": CannotHandle(),
    "pattern_cancel_flow": CancelFlow(),
}

Annotator = Literal["llm", "assertions"]


# ------------------------------------------------------------------------------------------ expectations


@dataclass(frozen=True)
class Expectations:
    """What a turn's assertions say the command generator must have output."""

    required: tuple[Command, ...] = ()  # each must be present (set slots: same slot, matching value)
    start_one_of: tuple[tuple[str, ...], ...] = ()  # flow_started {operator: any}: at least one per group
    slots_without_value: tuple[str, ...] = ()  # slot_was_set without a value: some set slot of it
    correction: bool = False  # pattern_correction: a set slot of a slot that already had a value
    undetermined: tuple[str, ...] = ()  # why the assertions alone cannot give the commands


def _format_value(value: Any) -> str:
    """How an asserted slot value reads as a command argument (2400.0 → 2400, True → True)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _linked_flows(assistant: Assistant, flow_ids: Sequence[str]) -> set[str]:
    """Flows started by a `link` or `call` step of these flows: they start without a command."""
    reachable: set[str] = set()
    for flow_id in flow_ids:
        flow = assistant.flows.get(flow_id)
        if flow is not None:
            reachable |= {s.target for s in flow.steps if s.kind in ("link", "call") and s.target}
    return reachable


def expectations(turn: Turn, assistant: Assistant) -> Expectations:
    step = turn.step
    required: list[Command] = []
    start_one_of: list[tuple[str, ...]] = []
    without_value: list[str] = []
    undetermined: list[str] = []
    correction = False
    started_here = [
        fid
        for a in step.assertions
        if isinstance(a, FlowStarted) and a.operator == "all"
        for fid in a.flow_ids
    ]
    active = [f for f in (turn.current_flow,) if f]
    by_link = _linked_flows(assistant, [*active, *started_here])
    for assertion in step.assertions:
        if isinstance(assertion, FlowStarted):
            user_flows = [
                f for f in assertion.flow_ids if f in assistant.flows and not f.startswith("pattern_")
            ]
            for pattern in (f for f in assertion.flow_ids if f.startswith("pattern_")):
                if pattern in PATTERN_COMMANDS:
                    required.append(PATTERN_COMMANDS[pattern])
                elif pattern == "pattern_correction":
                    correction = True
            if assertion.operator == "all":
                user_flows = [f for f in user_flows if f not in by_link]
            if assertion.operator == "any" and len(user_flows) > 1:
                start_one_of.append(tuple(user_flows))
                undetermined.append(f"flow_started lists {len(user_flows)} flows with operator any")
            else:
                required += [StartFlow(f) for f in user_flows]
        elif isinstance(assertion, ClarificationContains):
            required.append(Clarify(tuple(sorted(assertion.flow_ids))))
        elif isinstance(assertion, FlowCancelled) and assertion.flow_id in assistant.flows:
            if not assertion.flow_id.startswith("pattern_"):
                required.append(CancelFlow())
        elif isinstance(assertion, SlotWasSet):
            for check in assertion.slots:
                slot = assistant.slots.get(check.name)
                if slot is None or not slot.filled_by_llm:
                    continue
                if check.has_value and check.value is not None:
                    required.append(SetSlot(check.name, _format_value(check.value)))
                else:
                    without_value.append(check.name)
                    undetermined.append(f"slot_was_set {check.name} has no value")
    unique = tuple(dict.fromkeys(required))
    if not unique and not start_one_of and not without_value and not correction:
        undetermined.append("the assertions do not say what the user's message did")
    return Expectations(unique, tuple(start_one_of), tuple(without_value), correction, tuple(undetermined))


def _has(commands: Sequence[Command], wanted: Command) -> bool:
    if isinstance(wanted, SetSlot):
        return any(
            isinstance(c, SetSlot) and c.name == wanted.name and values_match(c.value, wanted.value)
            for c in commands
        )
    if isinstance(wanted, Clarify):
        return any(isinstance(c, Clarify) and set(wanted.options) <= set(c.options) for c in commands)
    return wanted in commands


def problems(turn: Turn, commands: Sequence[Command], assistant: Assistant, syntax: Syntax) -> list[str]:
    """Where the commands disagree with what the passing test shows; empty when they agree."""
    expected = expectations(turn, assistant)
    found: list[str] = []
    for wanted in fold_for_syntax(expected.required, syntax):
        if not _has(commands, wanted):
            found.append(f"missing `{format_command(wanted, syntax)}`")
    for group in expected.start_one_of:
        if not any(StartFlow(f) in commands for f in group):
            found.append(f"missing a start of one of {', '.join(group)}")
    for name in expected.slots_without_value:
        if not any(isinstance(c, SetSlot) and c.name == name for c in commands):
            found.append(f"missing a `set slot` of {name}")
    if expected.correction and not any(
        isinstance(c, SetSlot) and turn.slots_before.get(c.name) is not None for c in commands
    ):
        found.append("pattern_correction started, but no already filled slot is set again")
    for asked in turn.next_asks:
        fills = [c for c in commands if isinstance(c, SetSlot) and c.name == asked and c.value is not None]
        if fills and not _asks_before_filling(assistant, asked):
            found.append(f"sets {asked}, but the bot asks for {asked} right after")
    return found


def _asks_before_filling(assistant: Assistant, slot: str) -> bool:
    return any(
        s.target == slot and s.ask_before_filling for f in assistant.flows.values() for s in f.collect_steps()
    )


def derive_commands(turn: Turn, assistant: Assistant, syntax: Syntax) -> list[Command] | str:
    """Commands from the assertions alone, or why they do not determine them."""
    expected = expectations(turn, assistant)
    if expected.undetermined:
        return "; ".join(expected.undetermined)
    if expected.correction and not any(
        isinstance(c, SetSlot) and turn.slots_before.get(c.name) is not None for c in expected.required
    ):
        return "pattern_correction without the corrected slot's new value"
    order = {StartFlow: 0, CancelFlow: 0, SetSlot: 1}
    ordered = sorted(expected.required, key=lambda c: order.get(type(c), 2))
    return fold_for_syntax(ordered, syntax)


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class AnnotatedTurn:
    step_index: int
    text: str
    prompt: str
    commands: tuple[Command, ...]
    raw_output: str | None  # what the LLM answered (None for the assertions annotator)


@dataclass(frozen=True)
class Failure:
    test_case: str
    file: str
    turn_index: int
    step_index: int
    user_message: str
    expected: str
    actual: str


@dataclass(frozen=True)
class AnnotatedConversation:
    suite: TestSuite
    test: TestCase
    turns: tuple[AnnotatedTurn, ...]
    failure: Failure | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None


@dataclass
class AnnotationResult:
    conversations: list[AnnotatedConversation] = field(default_factory=list)

    @property
    def passing(self) -> list[AnnotatedConversation]:
        return [c for c in self.conversations if c.passed]

    @property
    def failures(self) -> list[Failure]:
        return [c.failure for c in self.conversations if c.failure is not None]


# ------------------------------------------------------------------------------------------ driver

Labeller = Callable[[Turn, str], Awaitable[tuple[list[Command], str | None] | str]]


def _expected_text(turn: Turn, assistant: Assistant, syntax: Syntax) -> str:
    expected = expectations(turn, assistant)
    parts = [format_command(c, syntax) for c in fold_for_syntax(expected.required, syntax)]
    parts += [f"start flow one of {', '.join(g)}" for g in expected.start_one_of]
    parts += [f"set slot {name} <any value>" for name in expected.slots_without_value]
    return "\n".join(parts) or "(nothing asserted)"


async def annotate_conversation(
    assistant: Assistant,
    suite: TestSuite,
    test: TestCase,
    template: PromptTemplate,
    syntax: Syntax,
    label: Labeller,
    prompt_variables: dict[str, Any] | None = None,
) -> AnnotatedConversation:
    """Replay one test, labelling its turns in order; stop at the first turn whose labels disagree."""
    replay = conversation(assistant, suite, test)
    turns: list[AnnotatedTurn] = []
    try:
        turn = next(replay)
    except StopIteration:
        return AnnotatedConversation(suite, test, ())

    def failed(actual: str) -> Failure:
        expected = _expected_text(turn, assistant, syntax)
        return Failure(
            test.name, str(suite.path), turn.turn_index, turn.step_index, turn.text, expected, actual
        )

    while True:
        prompt = template.render({**turn.variables, **(prompt_variables or {})})
        outcome = await label(turn, prompt)
        if isinstance(outcome, str):  # the labeller could not produce commands
            return AnnotatedConversation(suite, test, tuple(turns), failed(outcome))
        commands, raw = outcome
        disagreements = problems(turn, commands, assistant, syntax)
        if disagreements:
            actual = "\n".join(format_command(c, syntax) for c in commands) or "(no commands)"
            failure = failed(f"{actual}\n({'; '.join(disagreements)})")
            return AnnotatedConversation(suite, test, tuple(turns), failure)
        turns.append(AnnotatedTurn(turn.step_index, turn.text, prompt, tuple(commands), raw))
        try:
            turn = replay.send(commands)
        except StopIteration:
            return AnnotatedConversation(suite, test, tuple(turns))


def llm_labeller(client: LLMClient, assistant: Assistant, syntax: Syntax) -> Labeller:
    flows = [f.id for f in assistant.user_flows()]
    slots = list(assistant.slots)

    async def label(turn: Turn, prompt: str) -> tuple[list[Command], str | None] | str:
        try:
            answer = await client.complete(prompt, purpose="annotate")
        except LLMError as error:
            return f"LLM call failed: {error}"
        return parse_commands(answer, syntax, flows=flows, slots=slots), answer

    return label


def assertions_labeller(assistant: Assistant, syntax: Syntax) -> Labeller:
    async def label(turn: Turn, prompt: str) -> tuple[list[Command], str | None] | str:
        derived = derive_commands(turn, assistant, syntax)
        if isinstance(derived, str):
            return f"assertions do not determine the commands: {derived}"
        return derived, None

    return label


async def annotate_all(
    assistant: Assistant,
    suites: Sequence[TestSuite],
    template: PromptTemplate,
    syntax: Syntax,
    label: Labeller,
    prompt_variables: dict[str, Any] | None = None,
    on_done: Callable[[AnnotatedConversation], None] | None = None,
) -> AnnotationResult:
    """All conversations concurrently (the LLM client bounds requests); results in input order."""

    async def one(suite: TestSuite, test: TestCase) -> AnnotatedConversation:
        annotated = await annotate_conversation(
            assistant, suite, test, template, syntax, label, prompt_variables
        )
        if on_done is not None:
            on_done(annotated)
        return annotated

    jobs = [one(suite, test) for suite in suites for test in suite.test_cases]
    return AnnotationResult(list(await asyncio.gather(*jobs)))


# ------------------------------------------------------------------------------------------ output


def conversation_record(
    annotated: AnnotatedConversation, syntax: Syntax, base: Path | None = None
) -> dict[str, Any]:
    """Rasa's `1_command_annotations` shape: every step, user turns with their `llm_commands`."""
    labelled = {t.step_index: t for t in annotated.turns}
    steps: list[dict[str, Any]] = []
    for index, step in enumerate(annotated.test.steps):
        if isinstance(step, UserStep):
            entry: dict[str, Any] = {"user": step.text}
            if index in labelled:
                entry["llm_commands"] = [format_command(c, syntax) for c in labelled[index].commands]
            steps.append(entry)
        else:
            raw = annotated.test.raw["steps"][index]
            steps.append(
                {key: raw[key] for key in raw if key in ("bot", "utter", "slot_was_set", "slot_was_not_set")}
            )
    return {"original_test_case": conversation_id(annotated.test, base), "steps": steps}


def display_path(path: Path, base: Path | None) -> str:
    """The path relative to `base` when it lies below it, so outputs do not carry machine paths."""
    if base is not None:
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            pass
    return str(path)


def conversation_id(test: TestCase, base: Path | None = None) -> str:
    """Rasa's `<file>::<test name>`."""
    return f"{display_path(test.file, base)}::{test.name}"


def failure_record(failure: Failure, base: Path | None = None) -> dict[str, Any]:
    return {
        "test_case": failure.test_case,
        "file": display_path(Path(failure.file), base),
        "turn_index": failure.turn_index,
        "user_message": failure.user_message,
        "expected": failure.expected,
        "actual": failure.actual,
    }
