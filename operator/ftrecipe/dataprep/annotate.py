"""Stage 1: label every user turn of the E2E tests with commands, and keep only tests whose labels agree.

Two labellers: the production command generator's LLM (the oracle), checked against what the test
asserts, or the assertions alone (offline). The rules that turn assertions into expectations are pure
functions (`expectations`, `problems`, `derive_commands`); the async driver only calls the LLM.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

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
    ActionExecuted,
    BotStep,
    BotUttered,
    ClarificationContains,
    FlowCancelled,
    FlowStarted,
    SlotCheck,
    SlotWasNotSetStep,
    SlotWasSet,
    SlotWasSetStep,
    TestCase,
    TestSuite,
    UserStep,
    UtterStep,
)
from ftrecipe.dataprep.llm import LLMClient, LLMError
from ftrecipe.dataprep.patterns import ROUTER_SLOT
from ftrecipe.dataprep.prompt import PromptTemplate
from ftrecipe.dataprep.routing import Route, RouterConfig, parse_router_answer, router_prompt
from ftrecipe.dataprep.state import Replay, ReplayFailure, Turn, conversation, refused_slots
from ftrecipe.dataprep.yamlfile import plain

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

NOTHING_SAID = "the assertions do not say what the user's message did"


# ------------------------------------------------------------------------------------------ expectations


@dataclass(frozen=True)
class Expectations:
    """What a turn's assertions say the command generator must have output."""

    required: tuple[Command, ...] = ()  # each must be present (set slots: same slot, matching value)
    start_one_of: tuple[tuple[str, ...], ...] = ()  # flow_started {operator: any}: at least one per group
    slots_without_value: tuple[str, ...] = ()  # slot_was_set without a value: some set slot of it
    correction: bool = False  # pattern_correction: a set slot of a slot that already had a value
    clarification: bool = False  # pattern_clarification: a clarify, its flows unsaid
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
    clarification = False
    started_here = [
        fid
        for a in step.assertions
        if isinstance(a, FlowStarted) and a.operator == "all"
        for fid in a.flow_ids
    ]
    active = [f for f in (turn.current_flow,) if f]
    # Slots this turn sets to a value it shows: a `value: null` of one of them is its reset afterwards.
    valued = {
        check.name
        for a in step.assertions
        if isinstance(a, SlotWasSet)
        for check in a.slots
        if check.has_value and check.value is not None
    }
    by_link = _linked_flows(assistant, [*active, *started_here])
    for assertion in step.assertions:
        if isinstance(assertion, FlowStarted):
            user_flows = [
                f for f in assertion.flow_ids if f in assistant.flows and not f.startswith("pattern_")
            ]
            for pattern in (f for f in assertion.flow_ids if f.startswith("pattern_")):
                if pattern in PATTERN_COMMANDS and pattern not in by_link:  # a link starts it, no command
                    required.append(PATTERN_COMMANDS[pattern])
                elif pattern == "pattern_correction":
                    correction = True
                elif pattern == "pattern_clarification" and pattern not in by_link:
                    # Only a clarify starts it; pattern_clarification_contains names its flows.
                    clarification = True
            if assertion.operator == "all":
                user_flows = [f for f in user_flows if f not in by_link]
            if assertion.operator == "any" and len(user_flows) > 1:
                start_one_of.append(tuple(user_flows))
                undetermined.append(f"flow_started lists {len(user_flows)} flows with operator any")
            else:
                required += [StartFlow(f) for f in user_flows]
        elif isinstance(assertion, ClarificationContains):
            # Tests list flows by their `name:`; the command names their ids.
            required.append(Clarify(tuple(sorted(assistant.flow_id(f) or f for f in assertion.flow_ids))))
        elif isinstance(assertion, FlowCancelled) and assertion.flow_id in assistant.flows:
            if not assertion.flow_id.startswith("pattern_"):
                required.append(CancelFlow())
        elif isinstance(assertion, SlotWasSet):
            for check in assertion.slots:
                slot = assistant.slots.get(check.name)
                if slot is None or not slot.filled_by_llm:
                    continue
                if check.has_value and check.value is None:
                    # `value: null`: Rasa looks for the slot reset to None in the turn. A filled slot is reset
                    # by the flow's end, a cancel or a set_slots step, with no command; an empty one only
                    # after the turn set it and the value was refused: some set slot of it, value unsaid.
                    if turn.slots_before.get(check.name) is None and check.name not in valued:
                        without_value.append(check.name)
                        undetermined.append(
                            f"slot_was_set {check.name} is null, set and refused: the value the user gave is unsaid"
                        )
                elif check.has_value:
                    required.append(SetSlot(check.name, _format_value(check.value)))
                else:
                    without_value.append(check.name)
                    undetermined.append(f"slot_was_set {check.name} has no value")
    unique = tuple(dict.fromkeys(required))
    if not step.assertions:
        undetermined.append(
            "the user step has no assertions (a legacy-style test shows only the bot's turns): "
            "label it with --annotator llm"
        )
    elif clarification and not any(isinstance(c, Clarify) for c in required):
        undetermined.append("pattern_clarification without the flows it offers")
    elif not unique and not start_one_of and not without_value and not correction:
        undetermined.append(NOTHING_SAID)
    return Expectations(
        required=unique,
        start_one_of=tuple(start_one_of),
        slots_without_value=tuple(dict.fromkeys(without_value)),
        correction=correction,
        clarification=clarification,
        undetermined=tuple(undetermined),
    )


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
    if expected.clarification and not any(isinstance(c, Clarify) for c in commands):
        found.append("pattern_clarification started, but the commands ask for no clarification")
    emptied = _emptied_by_flows(assistant, turn, commands)
    for asked in turn.next_asks:
        fills = [c for c in commands if isinstance(c, SetSlot) and c.name == asked and c.value is not None]
        if fills and not _asks_before_filling(assistant, asked) and asked not in emptied:
            found.append(f"sets {asked}, but the bot asks for {asked} right after")
    return found


# ------------------------------------------------------------------------------------------ shown responses


@dataclass(frozen=True)
class ShownAfter:
    """What a test shows the bot doing after a user turn: a legacy-style test's steps up to the next user
    step, or an assertion-style step's `bot_uttered` / `action_executed` names."""

    responses: tuple[str, ...] = ()  # `utter` names, and `bot` texts of a known response, in order
    slots_set: tuple[SlotCheck, ...] = ()
    slots_not_set: tuple[SlotCheck, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.responses or self.slots_set or self.slots_not_set)


def _response_pattern(text: str) -> re.Pattern[str]:
    """A response text as a pattern a rendered `bot:` line matches: `{slot}` placeholders match anything."""
    parts = re.split(r"\{\w+\}", text.strip())
    return re.compile(".+?".join(re.escape(part) for part in parts), re.DOTALL)


def _responses_of_text(assistant: Assistant, text: str) -> list[str]:
    """The responses a bot text is a rendering of; a variant that is only placeholders matches nothing."""
    names: list[str] = []
    for response in assistant.responses.values():
        for variant in response.texts:
            literal = re.sub(r"\{\w+\}", "", variant).strip()
            if literal and _response_pattern(variant).fullmatch(text.strip()):
                names.append(response.name)
                break
    return names


def _responses_of_pattern(assistant: Assistant, pattern: str) -> list[str]:
    """The responses a `text_matches` renders. Rasa searches the bot's text with it as a regex; most are
    plain text and are read as such, else with their escapes undone (`\\n` a newline, `\\.` a dot)."""
    rendered = _responses_of_text(assistant, pattern)
    if rendered:
        return rendered
    escapes = {"n": "\n", "t": "\t"}
    literal = re.sub(r"\\([nt]|[^A-Za-z0-9])", lambda m: escapes.get(m.group(1), m.group(1)), pattern)
    return _responses_of_text(assistant, literal) if literal != pattern else []


def _response_of_text(assistant: Assistant, text: str) -> str | None:
    """The response a `bot:` line is a rendering of (the first the domain lists)."""
    return next(iter(_responses_of_text(assistant, text)), None)


def shown_after(assistant: Assistant, test: TestCase, index: int) -> ShownAfter:
    """The bot / utter / slot_was_set / slot_was_not_set steps after user step `index`, up to the next."""
    responses: list[str] = []
    slots_set: list[SlotCheck] = []
    slots_not_set: list[SlotCheck] = []
    for later in test.steps[index + 1 :]:
        if isinstance(later, UserStep):
            break
        if isinstance(later, UtterStep):
            responses.append(later.name)
        elif isinstance(later, BotStep):
            name = _response_of_text(assistant, later.text)
            if name is not None:
                responses.append(name)
        elif isinstance(later, SlotWasSetStep):
            slots_set += later.slots
        elif isinstance(later, SlotWasNotSetStep):
            slots_not_set += later.slots
    return ShownAfter(tuple(dict.fromkeys(responses)), tuple(slots_set), tuple(slots_not_set))


def shown_by_assertions(assistant: Assistant, step: UserStep) -> ShownAfter:
    """The responses (and `action_ask_<slot>` actions) an assertion-style step asserts the bot uttered: by
    `utter_name`, or by a `text_matches` that renders exactly one response (a pattern, or a text several
    responses share, claims nothing). Assertions are not exhaustive: only what they name claims anything."""
    names: list[str] = []
    for assertion in step.assertions:
        if isinstance(assertion, BotUttered) and assertion.utter_name:
            names.append(assertion.utter_name)
        elif isinstance(assertion, BotUttered) and assertion.text_matches:
            rendered = _responses_of_pattern(assistant, assertion.text_matches)
            names += rendered if len(rendered) == 1 else []
    names += [a.action for a in step.assertions if isinstance(a, ActionExecuted)]
    return ShownAfter(tuple(dict.fromkeys(names)))


def _response_owners(assistant: Assistant) -> dict[str, set[str]]:
    """Each response a flow utters (a collect's question, an `action: utter_…` step) and the flows that do."""
    owners: dict[str, set[str]] = {}
    for flow in assistant.flows.values():
        for step in flow.steps:
            if step.kind == "collect":
                for name in assistant.ask_names(step):  # its response, or action_ask_<slot>
                    owners.setdefault(name, set()).add(flow.id)
            elif step.kind == "action" and step.target is not None and step.target in assistant.responses:
                owners.setdefault(step.target, set()).add(flow.id)
    return owners


def _reachable(assistant: Assistant, flow_ids: Sequence[str] | set[str]) -> set[str]:
    """These flows and every flow they `link` to or `call`, transitively."""
    seen: set[str] = set()
    pending = list(flow_ids)
    while pending:
        flow_id = pending.pop()
        if flow_id in seen or flow_id not in assistant.flows:
            continue
        seen.add(flow_id)
        pending += [
            s.target for s in assistant.flows[flow_id].steps if s.kind in ("link", "call") and s.target
        ]
    return seen


def _set_by_flows(assistant: Assistant) -> set[str]:
    return {name for flow in assistant.flows.values() for s in flow.steps for name in s.set_slots}


def _emptied_by_flows(assistant: Assistant, turn: Turn, commands: Sequence[Command]) -> set[str]:
    """Slots a `set_slots: - x: null` step empties in the flows this turn runs (active or started, and what
    they link to / call): such a flow asks again for a value the user just gave, e.g. when a custom action
    found it unusable (`if: not slots.has_funds` … `set_slots: amount: null` … `next: ask_amount`)."""
    started = {c.flow for c in commands if isinstance(c, StartFlow)}
    return {
        name
        for flow_id in _reachable(assistant, {*turn.active_flows, *started})
        for step in assistant.flows[flow_id].steps
        for name, value in step.set_slots.items()
        if value is None
    }


def _ends_without_asking(assistant: Assistant, flow_id: str) -> bool:
    """A flow with no question (itself or in what it links to / calls) can end within the turn that starts
    it; the bot then goes on with the flow it interrupted, whose responses may be all a test shows."""
    return not any(assistant.flows[f].collect_steps() for f in _reachable(assistant, {flow_id}))


def _shown_slot_requirements(
    turn: Turn, shown: ShownAfter, assistant: Assistant
) -> tuple[list[SetSlot], list[str]]:
    """The `set slot`s the following slot_was_set steps need (LLM-filled slots no flow sets itself), and the
    slots that need some set slot (slot_was_set without a value). A slot that already held the shown value
    needs nothing: setting it again changes nothing."""
    set_by_flows = _set_by_flows(assistant)
    with_value: list[SetSlot] = []
    any_value: list[str] = []
    for check in shown.slots_set:
        slot = assistant.slots.get(check.name)
        if slot is None or not slot.filled_by_llm or check.name in set_by_flows:
            continue
        if not check.has_value:
            any_value.append(check.name)
        elif check.value is not None:
            value = _format_value(check.value)
            before = turn.slots_before.get(check.name)
            if before is None or not values_match(_format_value(before), value):
                with_value.append(SetSlot(check.name, value))
    return list(dict.fromkeys(with_value)), list(dict.fromkeys(any_value))


def shown_problems(
    turn: Turn, commands: Sequence[Command], assistant: Assistant, syntax: Syntax, shown: ShownAfter
) -> list[str]:
    """Where the commands make the bot do other than the test shows next (a legacy-style test's steps, or
    `bot_uttered` assertions), as Rasa's test runner would find the test failing: a response of a user flow
    needs that flow started (or already active, or reached by a link / call; a response of several flows, any
    of them), a newly started flow that stops at a question must be the one the bot goes on with, a slot
    asked next must stay empty, and the slot_was_set / slot_was_not_set steps must match the `set slot`s."""
    found: list[str] = []
    owners = _response_owners(assistant)
    before = list(turn.active_flows)
    if turn.current_flow in before and any(isinstance(c, CancelFlow) for c in commands):
        before.remove(turn.current_flow)
    started = {
        c.flow
        for c in commands
        if isinstance(c, StartFlow) and c.flow in assistant.flows and not c.flow.startswith("pattern_")
    }
    # A pattern the commands start (an assistant may redefine it to link to a flow of its own) counts too.
    by_command = {pattern for pattern, command in PATTERN_COMMANDS.items() if command in commands}
    live = _reachable(assistant, set(before) | started | by_command)
    new = started - set(turn.active_flows)
    by_new = _reachable(assistant, new)
    stops_at_question = all(not _ends_without_asking(assistant, f) for f in new)
    flow_responses: dict[str, set[str]] = {}
    for response in shown.responses:
        flows = owners.get(response, set())
        # A pattern's response can come without any flow of the user's: no claim on the commands.
        if flows and not any(f.startswith("pattern_") for f in flows):
            flow_responses[response] = flows
    for response, flows in flow_responses.items():
        if not flows & live:
            found.append(
                f"the bot then says {response} of {', '.join(sorted(flows))}, which this turn neither starts nor continues"
            )
    if (
        new
        and stops_at_question
        and flow_responses
        and not any(flows & by_new for flows in flow_responses.values())
    ):
        response, flows = next(iter(flow_responses.items()))
        found.append(
            f"starts {', '.join(sorted(new))}, but the bot then says {response} of {', '.join(sorted(flows))}"
        )
    refused = refused_slots(assistant, shown.responses)
    emptied = _emptied_by_flows(assistant, turn, commands)
    for response in shown.responses:
        for flow in assistant.flows.values():
            for collect in flow.collect_steps():
                slot = collect.target
                if response not in assistant.ask_names(collect) or slot is None:
                    continue
                if slot in turn.next_asks or slot in refused:  # `problems` covers it / a rejection re-asks
                    continue
                fills = [
                    c for c in commands if isinstance(c, SetSlot) and c.name == slot and c.value is not None
                ]
                message = f"sets {slot}, but the bot asks for {slot} right after"
                if (
                    fills
                    and not _asks_before_filling(assistant, slot)
                    and slot not in emptied
                    and message not in found
                ):
                    found.append(message)
    with_value, any_value = _shown_slot_requirements(turn, shown, assistant)
    for wanted in with_value:
        if not _has(commands, wanted):
            found.append(f"missing `{format_command(wanted, syntax)}`")
    for name in any_value:
        if not any(isinstance(c, SetSlot) and c.name == name for c in commands):
            found.append(f"missing a `set slot` of {name}")
    for check in shown.slots_not_set:
        for command in commands:
            if not isinstance(command, SetSlot) or command.name != check.name:
                continue
            if not check.has_value or values_match(command.value, _format_value(check.value)):
                found.append(f"sets {check.name}, but the test shows {check.name} was not set")
                break
    if not found and not turn.step.assertions:  # a legacy-style step lists every bot turn, in order
        found += _legacy_question_problems(turn, commands, assistant, shown, new, owners)
    elif not found:  # an asserted response of the active flow past its question: that question was answered
        found += _unanswered_question_problems(turn, commands, assistant, shown, owners)
    return found


def _only_llm_fills(assistant: Assistant, name: str) -> bool:
    """Only the command generator fills this slot: an NLU mapping (from_entity, from_text, ...) may fill it
    with no command at all, so an empty slot after the commands proves nothing then."""
    slot = assistant.slots.get(name)
    return slot is not None and slot.filled_by_llm and all(m == "from_llm" for m in slot.mappings)


def _started_flow_asks(turn: Turn, commands: Sequence[Command], assistant: Assistant) -> str | None:
    """The slot a flow these commands start asks first (`_replay_asks` without assertions); None when the
    replay cannot tell: a custom action ran on the way (it may fill the slot it then seems to ask) or a
    condition is undecidable."""
    replay = Replay(assistant, {})
    replay.state.slots = dict(turn.slots_before)
    replay.apply_commands(commands)
    try:
        replay.follow_flows()
    except ReplayFailure:
        return None
    return None if replay.state.unstubbed_actions else replay.state.asked


def _legacy_question_problems(
    turn: Turn,
    commands: Sequence[Command],
    assistant: Assistant,
    shown: ShownAfter,
    new: set[str],
    owners: dict[str, set[str]],
) -> list[str]:
    """A flow's next words that the commands rule out: a started flow asks its first empty collect (a
    slot the message did not fill), and a flow whose question the message left unanswered asks it again.
    Slots an NLU mapping may fill without a command are left out."""
    found: list[str] = []
    if len(new) == 1:
        started = next(iter(new))
        question = _question_of(assistant, started, shown)
        asked = _started_flow_asks(turn, commands, assistant) if question is not None else None
        if (
            question is not None
            and asked is not None
            and asked != question[1]
            and _only_llm_fills(assistant, asked)
        ):
            found.append(
                f"starts {started}, which asks {asked} first, but the bot then says {question[0]}, "
                f"asking {question[1]}"
            )
    return found + _unanswered_question_problems(turn, commands, assistant, shown, owners)


def _unanswered_question_problems(
    turn: Turn,
    commands: Sequence[Command],
    assistant: Assistant,
    shown: ShownAfter,
    owners: dict[str, set[str]],
) -> list[str]:
    """A flow whose question the message left unanswered asks it again: a response of that flow other than
    the question, shown next, rules the commands out (a `cannot handle` to "It's mag@pie.com" when the test
    shows the flow's next question). Slots an NLU mapping may fill without a command are left out."""
    found: list[str] = []
    waiting = turn.asked_slot
    flow = assistant.flows.get(turn.current_flow) if turn.current_flow else None
    if flow is None or waiting is None or turn.slots_before.get(waiting) is not None:
        return found
    if not _only_llm_fills(assistant, waiting):
        return found
    collected = {s.target for s in flow.collect_steps()}
    if waiting not in collected or waiting in {check.name for check in shown.slots_set}:
        return found
    if any(isinstance(c, CancelFlow) for c in commands) or any(
        isinstance(c, SetSlot) and c.name in collected and c.value is not None for c in commands
    ):
        return found
    asks_again = {
        name for s in flow.collect_steps() if s.target == waiting for name in assistant.ask_names(s)
    }
    for response in shown.responses:
        if owners.get(response) == {flow.id} and response not in asks_again:
            found.append(
                f"leaves {waiting} unanswered, so {flow.id} asks for it again, but the bot then says {response}"
            )
            break
    return found


def _shown_expected(turn: Turn, assistant: Assistant, syntax: Syntax, shown: ShownAfter) -> list[str]:
    with_value, any_value = _shown_slot_requirements(turn, shown, assistant)
    owners = _response_owners(assistant)
    lines = [format_command(c, syntax) for c in with_value]
    lines += [f"set slot {name} <any value>" for name in any_value]
    for response in shown.responses:
        flows = owners.get(response, set())
        if flows and not any(f.startswith("pattern_") for f in flows):
            lines.append(f"start or continue {' or '.join(sorted(flows))} (the bot then says {response})")
    lines += [f"no set slot of {check.name}" for check in shown.slots_not_set]
    return lines


def _asks_before_filling(assistant: Assistant, slot: str) -> bool:
    return any(
        s.target == slot and s.ask_before_filling for f in assistant.flows.values() for s in f.collect_steps()
    )


def _replay_asks(turn: Turn, commands: Sequence[Command], assistant: Assistant) -> str | None:
    """The slot the bot asks next when these commands start a flow that was not active: the turn's slots,
    its commands and asserted slots, then the flows run as the replay runs them (a started flow from its
    first step: a collect whose slot is already filled is passed by). None when nothing is asked."""
    replay = Replay(assistant, {})
    replay.state.slots = dict(turn.slots_before)
    replay.apply_commands(commands)
    replay.apply_assertions(turn.step, commands)
    try:
        replay.follow_flows()
    except ReplayFailure:
        return None
    return replay.state.asked


def _unexplained_flows(
    turn: Turn, commands: Sequence[Command], assistant: Assistant, shown: ShownAfter
) -> set[str]:
    """User flows whose responses the bot says next although the commands neither start nor continue them
    (the same `live` flows `shown_problems` counts), with the responses that name them."""
    owners = _response_owners(assistant)
    started = {c.flow for c in commands if isinstance(c, StartFlow)}
    by_command = {pattern for pattern, command in PATTERN_COMMANDS.items() if command in commands}
    live = _reachable(assistant, set(turn.active_flows) | started | by_command)
    unexplained: set[str] = set()
    for response in shown.responses:
        flows = owners.get(response, set())
        if flows and not any(f.startswith("pattern_") for f in flows) and not flows & live:
            unexplained |= flows
    return unexplained


def _question_of(assistant: Assistant, flow_id: str, shown: ShownAfter) -> tuple[str, str] | None:
    """The (response, slot) of the first shown response that asks a collect of `flow_id`."""
    for response in shown.responses:
        for collect in assistant.flows[flow_id].collect_steps():
            if collect.target is not None and response in assistant.ask_names(collect):
                return response, collect.target
    return None


def derive_commands(turn: Turn, assistant: Assistant, syntax: Syntax) -> list[Command] | str:
    """Commands from the assertions alone, or why they do not determine them. They must pass the check the
    LLM's answers pass (`shown_problems`, against the asserted `bot_uttered` names). The one inference:
    the bot next asks a question of ONE user flow F that is not active and that the asserted commands
    neither start nor reach by link / call: Rasa only asks it because the message started F, so
    `start flow F` joins the commands when no other flow reaches F by link / call (which one started would
    be unknown), the check then passes and the replay, with them, asks exactly
    the slot the test shows next (else an unasserted earlier collect of F was filled by the message, and
    the label would miss that `set slot`).

    A turn whose assertions say nothing but `bot_uttered` gets the same inference, from no commands: the
    same evidence (F's question, F not active, exactly one flow) and the same replay check (the asked slot
    is F's first empty collect, so the message filled none of F's earlier slots) determine `start flow F`
    as well as they do beside a slot_was_set. Assertions are not exhaustive in either case: a slot of a
    LATER collect the message filled stays unknown, which the asserted turns accept too."""
    expected = expectations(turn, assistant)
    nothing_said = expected.undetermined == (NOTHING_SAID,)
    if expected.undetermined and not nothing_said:
        return "; ".join(expected.undetermined)
    if expected.correction and not any(
        isinstance(c, SetSlot) and turn.slots_before.get(c.name) is not None for c in expected.required
    ):
        return "pattern_correction without the corrected slot's new value"
    order = {StartFlow: 0, CancelFlow: 0, SetSlot: 1}

    def ordered(commands: Sequence[Command]) -> list[Command]:
        return fold_for_syntax(sorted(commands, key=lambda c: order.get(type(c), 2)), syntax)

    derived = ordered(expected.required)
    shown = shown_by_assertions(assistant, turn.step)
    found = shown_problems(turn, derived, assistant, syntax, shown) if shown else []
    if not found:
        return NOTHING_SAID if nothing_said else derived
    unexplained = _unexplained_flows(turn, derived, assistant, shown)
    question = _question_of(assistant, next(iter(unexplained)), shown) if len(unexplained) == 1 else None
    # A clarification waits for the user's choice: a flow's question next contradicts it, it starts nothing.
    if question is None or any(isinstance(c, Clarify) for c in derived):
        if nothing_said:  # no question to infer from: what the message did stays unknown
            return NOTHING_SAID
        return f"the derived commands disagree with what the bot then says: {'; '.join(found)}"
    response, slot = question
    flow_id = next(iter(unexplained))
    reason = (
        f"the bot then asks {response} of {flow_id}, which the asserted commands neither start nor continue"
    )
    # Another flow that links to / calls F would ask the same question: which one started is unknown.
    callers = sorted(
        f.id
        for f in assistant.user_flows()
        if f.id != flow_id and flow_id in _reachable(assistant, {f.id}) and f.id not in turn.active_flows
    )
    if callers:
        return f"{reason}, and {', '.join(callers)} reach it by link / call: the assertions do not say which flow started"
    started = ordered([*expected.required, StartFlow(flow_id)])
    if shown_problems(turn, started, assistant, syntax, shown) or problems(turn, started, assistant, syntax):
        return reason
    asked = _replay_asks(turn, started, assistant)
    if asked != slot:
        return f"{reason} (starting it, the bot would ask {asked or 'nothing'}, not {slot}: the message may have filled slots the assertions do not show)"
    return started


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
    # Coexistence: (step index, route) of the user turns Rasa hands to the NLU-based system (no data point).
    nlu_routes: tuple[tuple[int, Route], ...] = ()

    def routes(self) -> dict[int, Route]:
        """For replaying this conversation again: the same turns skipped."""
        return dict(self.nlu_routes)

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
# The LLMBasedRouter imitated: a turn's route, or why it could not be asked.
RouterCall = Callable[[Turn], Awaitable[Route | str]]


def _generator_at_work(turn: Turn, assistant: Assistant) -> str | None:
    """What the turn's assertions say the command generator output, if anything (then the turn was CALM's)."""
    expected = expectations(turn, assistant)
    if expected.required or expected.start_one_of or expected.slots_without_value:
        return "the test asserts what the command generator did"
    if expected.correction or expected.clarification:
        return "the test asserts a pattern only the command generator starts"
    return None


def _expected_text(turn: Turn, assistant: Assistant, syntax: Syntax, shown: ShownAfter | None = None) -> str:
    expected = expectations(turn, assistant)
    parts = [format_command(c, syntax) for c in fold_for_syntax(expected.required, syntax)]
    parts += [f"start flow one of {', '.join(g)}" for g in expected.start_one_of]
    parts += [f"set slot {name} <any value>" for name in expected.slots_without_value]
    if expected.correction:
        parts.append("a set slot of an already filled slot (pattern_correction)")
    if expected.clarification and not any(isinstance(c, Clarify) for c in expected.required):
        parts.append("a clarification of some flows (pattern_clarification)")
    if shown:
        parts += _shown_expected(turn, assistant, syntax, shown)
    return "\n".join(parts) or "(nothing asserted)"


def _shown_to_check(assistant: Assistant, test: TestCase, turn: Turn) -> ShownAfter | None:
    """What the test shows after this turn that the commands must lead to, or None: a legacy-style step's
    following steps; an assertion-style step's `bot_uttered` names when its assertions do not determine the
    commands (assertions that do, `flow_started` etc., keep only their own checks)."""
    if not turn.step.assertions:
        return shown_after(assistant, test, turn.step_index) or None
    if not expectations(turn, assistant).undetermined:
        return None
    return shown_by_assertions(assistant, turn.step) or None


async def annotate_conversation(
    assistant: Assistant,
    suite: TestSuite,
    test: TestCase,
    template: PromptTemplate,
    syntax: Syntax,
    label: Labeller,
    prompt_variables: dict[str, Any] | None = None,
    route: RouterCall | None = None,
) -> AnnotatedConversation:
    """Replay one test, labelling its turns in order; stop at the first turn whose labels disagree.

    Coexistence: turns the test shows routed to the NLU-based system never reach `label` (the replay
    skips them); with `route` (an LLMBasedRouter), a turn that reaches it while the routing slot is empty
    is first routed as Rasa would, and one routed to the NLU system is skipped too."""
    routes: dict[int, Route] = {}
    replay = conversation(assistant, suite, test, routes=routes)
    turns: list[AnnotatedTurn] = []

    def done(failure: Failure | None = None) -> AnnotatedConversation:
        nlu = tuple(sorted((i, r) for i, r in routes.items() if r != "calm"))
        return AnnotatedConversation(suite, test, tuple(turns), failure, nlu)

    def unfollowable(error: ReplayFailure, turn_index: int) -> Failure:
        """The replay cannot follow the test as Rasa would (an undecidable condition, a rejection): one line."""
        return Failure(
            test.key,
            str(suite.path),
            turn_index,
            error.step_index,
            error.user_message,
            "(the replay stopped here)",
            str(error),
        )

    try:
        turn = next(replay)
    except StopIteration:
        return done()
    except ReplayFailure as error:
        return done(unfollowable(error, 0))

    def failed(actual: str) -> Failure:
        shown = _shown_to_check(assistant, test, turn)
        expected = _expected_text(turn, assistant, syntax, shown)
        return Failure(
            test.key, str(suite.path), turn.turn_index, turn.step_index, turn.text, expected, actual
        )

    while True:
        if route is not None and turn.slots_before.get(ROUTER_SLOT) is None:
            routed = await route(turn)
            if routed not in ("calm", "nlu_once", "nlu_sticky"):  # the router could not be asked
                return done(failed(routed))
            if routed != "calm":
                at_work = _generator_at_work(turn, assistant)
                if at_work is not None:  # Rasa's router sent this one to CALM, or the test would fail
                    return done(
                        failed(
                            f"(the router sends this message to the NLU-based system ({routed}), but {at_work})"
                        )
                    )
                routes[turn.step_index] = cast(Route, routed)
                try:
                    turn = replay.send(())
                except StopIteration:
                    return done()
                except ReplayFailure as error:
                    return done(unfollowable(error, turn.turn_index))
                continue
        prompt = template.render({**turn.variables, **(prompt_variables or {})})
        outcome = await label(turn, prompt)
        if isinstance(outcome, str):  # the labeller could not produce commands
            return done(failed(outcome))
        commands, raw = outcome
        disagreements = problems(turn, commands, assistant, syntax)
        shown = _shown_to_check(assistant, test, turn)
        if shown is not None:
            disagreements += shown_problems(turn, commands, assistant, syntax, shown)
        if disagreements:
            actual = "\n".join(format_command(c, syntax) for c in commands) or "(no commands)"
            failure = failed(f"{actual}\n({'; '.join(disagreements)})")
            return done(failure)
        turns.append(AnnotatedTurn(turn.step_index, turn.text, prompt, tuple(commands), raw))
        try:
            turn = replay.send(commands)
        except StopIteration:
            return done()
        except ReplayFailure as error:
            return done(unfollowable(error, turn.turn_index))


def answer_parser(assistant: Assistant, syntax: Syntax) -> Callable[[str], list[Command]]:
    """A command generator's answer as Rasa reads it for this assistant: starts of unknown flows and sets of
    unknown slots dropped, nothing parsed ⇒ cannot handle. The teacher's answers and, in `ftrecipe evaluate
    --e2e`, the model's under test are read alike."""
    flows = [f.id for f in assistant.user_flows()]
    slots = list(assistant.slots)

    def parse(answer: str) -> list[Command]:
        return parse_commands(answer, syntax, flows=flows, slots=slots)

    return parse


def llm_labeller(client: LLMClient, assistant: Assistant, syntax: Syntax) -> Labeller:
    parse = answer_parser(assistant, syntax)

    async def label(turn: Turn, prompt: str) -> tuple[list[Command], str | None] | str:
        try:
            answer = await client.complete(prompt, purpose="annotate")
        except LLMError as error:
            return f"LLM call failed: {error}"
        return parse(answer), answer

    return label


def llm_router(client: LLMClient, router: RouterConfig) -> RouterCall:
    """The LLMBasedRouter: its prompt for the message, its answer parsed as Rasa parses it."""

    async def route(turn: Turn) -> Route | str:
        try:
            answer = await client.complete(router_prompt(router, turn.text), purpose="route")
        except LLMError as error:
            return f"router LLM call failed: {error}"
        return parse_router_answer(answer)

    return route


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
    route: RouterCall | None = None,
) -> AnnotationResult:
    """All conversations concurrently (the LLM client bounds requests); results in input order."""

    async def one(suite: TestSuite, test: TestCase) -> AnnotatedConversation:
        annotated = await annotate_conversation(
            assistant, suite, test, template, syntax, label, prompt_variables, route
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
                {
                    key: plain(raw[key])
                    for key in raw
                    if key in ("bot", "utter", "slot_was_set", "slot_was_not_set")
                }
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
    """Rasa's `<file>::<test name>`, with `#k` after a name the file repeats (`TestCase.key`)."""
    return f"{display_path(test.file, base)}::{test.key}"


def failure_record(failure: Failure, base: Path | None = None) -> dict[str, Any]:
    return {
        "test_case": failure.test_case,
        "file": display_path(Path(failure.file), base),
        "turn_index": failure.turn_index,
        "user_message": failure.user_message,
        "expected": failure.expected,
        "actual": failure.actual,
    }
