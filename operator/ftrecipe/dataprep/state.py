"""Dialogue state at each user turn of an E2E test, by replaying the test (no Rasa runtime).

The command generator's prompt depends on the state: the active flow, the slot being asked, the
slots filled so far and the conversation. A passing E2E test tells us most of it (its assertions are
what Rasa did); where it is silent we follow the flow like Rasa's FlowPolicy would: the next collect
step whose slot is still empty.

`conversation()` is a generator: it yields a `Turn` for every user message that goes to the command
generator and receives that turn's commands with `send()`, so the same replay serves labelling by an
LLM, by assertions, rephrased variants and synthetic conversations (pass `user_texts`).
"""

from __future__ import annotations

import re
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ftrecipe.dataprep.assistant import Assistant, Flow, FlowStep
from ftrecipe.dataprep.commands import CancelFlow, Command, SetSlot, StartFlow
from ftrecipe.dataprep.e2e import (
    ActionExecuted,
    BotStep,
    BotUttered,
    FlowCancelled,
    FlowCompleted,
    FlowStarted,
    SlotWasSet,
    SlotWasSetStep,
    TestCase,
    TestSuite,
    UserStep,
    UtterStep,
)

_SET_SLOTS_PAYLOAD = re.compile(r"^/SetSlots\((?P<pairs>.*)\)\s*$", re.DOTALL)


def is_button_payload(text: str) -> bool:
    """Button clicks arrive as `/SetSlots(a=b)` or `/intent`; they bypass the command generator."""
    return text.strip().startswith("/")


def parse_set_slots_payload(text: str) -> dict[str, str]:
    match = _SET_SLOTS_PAYLOAD.match(text.strip())
    if match is None:
        return {}
    pairs: dict[str, str] = {}
    for pair in match.group("pairs").split(","):
        if "=" in pair:
            name, value = pair.split("=", 1)
            pairs[name.strip()] = value.strip().strip("'\"")
    return pairs


def coerce_slot_value(assistant: Assistant, name: str, value: Any) -> Any:
    """Store values with the slot's type, as Rasa would (so `2,400` on a float slot is 2400.0)."""
    slot = assistant.slots.get(name)
    if value is None or slot is None:
        return value
    if slot.type == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        return value
    if slot.type == "float":
        try:
            return float(value.replace(",", "").replace("$", "").strip())
        except ValueError:
            return value
    if slot.type == "bool":
        lowered = value.strip().lower()
        if lowered in ("true", "yes", "1"):
            return True
        if lowered in ("false", "no", "0"):
            return False
    return value


@dataclass
class DialogueState:
    slots: dict[str, Any]
    stack: list[str] = field(default_factory=list)  # active flows, innermost last
    asked: str | None = None  # the slot the bot is asking for
    asked_before: set[str] = field(default_factory=set)
    history: list[str] = field(default_factory=list)

    @property
    def current_flow(self) -> str | None:
        return self.stack[-1] if self.stack else None


@dataclass(frozen=True)
class Turn:
    """A user message that goes to the command generator, with everything its prompt needs."""

    step_index: int  # index of the step in the test case
    turn_index: int  # index among the test's annotated user turns (0-based)
    step: UserStep
    text: str  # the message as sent (a rephrasing in synthetic conversations)
    variables: Mapping[str, Any]  # the prompt template's variables
    slots_before: Mapping[str, Any]
    current_flow: str | None
    asked_slot: str | None
    next_asks: tuple[str, ...]  # slots the bot asks for right after this turn, as the test shows
    active_flows: tuple[str, ...] = ()  # the flow stack before this turn, innermost last


class Replay:
    """The state machine; `conversation()` drives it over one test case."""

    def __init__(self, assistant: Assistant, initial_slots: Mapping[str, Any]) -> None:
        self.assistant = assistant
        slots = {name: slot.initial_value for name, slot in assistant.slots.items()}
        slots.update({k: coerce_slot_value(assistant, k, v) for k, v in initial_slots.items()})
        self.state = DialogueState(slots)

    # ----------------------------------------------------------------------------- prompt variables

    def _collect_steps(self, flow: Flow, seen: frozenset[str] = frozenset()) -> list[FlowStep]:
        """Collect steps in order, with `call`ed flows' collects inlined where they are called."""
        steps: list[FlowStep] = []
        for step in flow.steps:
            if step.kind == "collect":
                steps.append(step)
            elif step.kind == "call" and step.target is not None and step.target not in seen:
                called = self.assistant.flows.get(step.target)
                if called is not None:
                    steps += self._collect_steps(called, seen | {flow.id})
        return steps

    def _slot_entry(self, step: FlowStep) -> dict[str, Any]:
        assert step.target is not None
        slot = self.assistant.slots[step.target]
        return {
            "name": slot.name,
            "description": step.description,
            "allowed_values": slot.allowed_values(),
        }

    def available_flows(self) -> list[dict[str, Any]]:
        flows = []
        for flow in self.assistant.user_flows():
            slots = []
            for step in self._collect_steps(flow):
                assert step.target is not None
                filled = self.state.slots.get(step.target) is not None
                # Rasa offers an ask-before-filling slot only once it was asked or already holds a value.
                if step.ask_before_filling and not (filled or step.target in self.state.asked_before):
                    continue
                slots.append(self._slot_entry(step))
            flows.append({"name": flow.id, "description": flow.description, "slots": slots})
        return flows

    def variables(self, user_message: str) -> dict[str, Any]:
        state = self.state
        flow = self.assistant.flows.get(state.current_flow) if state.current_flow else None
        flow_slots = []
        asked_step: FlowStep | None = None
        if flow is not None:
            for step in self._collect_steps(flow):
                assert step.target is not None
                slot = self.assistant.slots[step.target]
                flow_slots.append(
                    {
                        "name": slot.name,
                        "value": state.slots.get(slot.name),
                        "type": slot.type,
                        "description": step.description,
                        "allowed_values": slot.allowed_values(),
                    }
                )
                if step.target == state.asked:
                    asked_step = step
        asked_slot = self.assistant.slots.get(state.asked) if state.asked else None
        return {
            "available_flows": self.available_flows(),
            "current_conversation": "\n".join([*state.history, f"USER: {user_message}"]),
            "current_flow": state.current_flow,
            "current_slot": state.asked,
            "current_slot_description": asked_step.description if asked_step else None,
            "current_slot_type": asked_slot.type if asked_slot else None,
            "current_slot_allowed_values": asked_slot.allowed_values() if asked_slot else None,
            "flow_slots": flow_slots,
            "user_message": user_message,
        }

    # ----------------------------------------------------------------------------- transitions

    def set_slot(self, name: str, value: Any) -> None:
        self.state.slots[name] = coerce_slot_value(self.assistant, name, value)

    def start_flow(self, flow_id: str) -> None:
        flow = self.assistant.flows.get(flow_id)
        if flow is not None and not flow.is_pattern and self.state.current_flow != flow_id:
            self.state.stack.append(flow_id)

    def end_flow(self, flow_id: str) -> None:
        """A flow ends (completed or cancelled): drop it and reset what it collected, as Rasa does."""
        if flow_id not in self.state.stack:
            return
        self.state.stack.remove(flow_id)
        flow = self.assistant.flows[flow_id]
        for step in self._collect_steps(flow):
            if step.reset_after_flow_ends and step.target not in flow.persisted_slots:
                self.state.slots[str(step.target)] = None
        if self.state.asked and self.state.asked not in self.state.slots:
            self.state.asked = None

    def apply_commands(self, commands: Sequence[Command]) -> None:
        for command in commands:
            if isinstance(command, StartFlow):
                self.start_flow(command.flow)
            elif isinstance(command, SetSlot):
                self.set_slot(command.name, command.value)
            elif isinstance(command, CancelFlow) and self.state.current_flow:
                self.end_flow(self.state.current_flow)

    def apply_assertions(self, step: UserStep, commanded: Sequence[Command] = ()) -> None:
        """What the passing test says happened is the truth, except for slots this turn's own commands set:
        a rephrased message that says "Annie" keeps "Annie" in its synthetic conversation."""
        own = {c.name for c in commanded if isinstance(c, SetSlot)}
        for assertion in step.assertions:
            if isinstance(assertion, FlowStarted) and len(assertion.flow_ids) == 1:
                self.start_flow(assertion.flow_ids[0])
            elif isinstance(assertion, SlotWasSet):
                for check in assertion.slots:
                    if check.has_value and check.name not in own:
                        self.set_slot(check.name, check.value)
        for assertion in step.assertions:
            if isinstance(assertion, FlowCompleted | FlowCancelled):
                self.end_flow(assertion.flow_id)

    def run_stub(self, suite: TestSuite, test: TestCase, action: str) -> None:
        """A stubbed custom action's slot events, as Rasa applies them in E2E tests (per-test stub wins)."""
        stub = suite.stubs.get(f"{test.name}::{action}", suite.stubs.get(action))
        if not isinstance(stub, Mapping):
            return
        for event in stub.get("events") or []:
            if isinstance(event, Mapping) and event.get("event") == "slot" and "name" in event:
                self.set_slot(str(event["name"]), event.get("value"))

    def ask_from_response(self, response_name: str) -> None:
        """A bot message that asks for a slot makes that slot the one being asked."""
        for flow in self.assistant.flows.values():
            for step in flow.collect_steps():
                if self.assistant.ask_response(step) == response_name and step.target is not None:
                    self.state.asked = step.target
                    self.state.asked_before.add(step.target)
                    return

    def follow_flows(self) -> None:
        """Where the test is silent: ask the next empty collect slot, finishing flows with none left."""
        budget = 2 * len(self.assistant.flows) + 1  # flows that only link to each other must not spin
        while self.state.stack and budget > 0:
            budget -= 1
            flow = self.assistant.flows[self.state.stack[-1]]
            for step in self._collect_steps(flow):
                assert step.target is not None
                pending = self.state.slots.get(step.target) is None or (
                    step.ask_before_filling and step.target not in self.state.asked_before
                )
                if pending:
                    self.state.asked = step.target
                    self.state.asked_before.add(step.target)
                    return
            # Nothing left to collect: the flow runs to its end; a `link` hands over to the next flow.
            self.end_flow(flow.id)
            for step in flow.steps:
                if step.kind == "link" and step.target is not None:
                    self.start_flow(step.target)
        self.state.asked = None

    def bot_says(self, text: str) -> None:
        self.state.history.append(f"AI: {text}")

    def render_response(self, name: str) -> str:
        response = self.assistant.responses.get(name)
        text = response.text if response else name
        # Rasa fills {slot} placeholders from the tracker.
        return re.sub(
            r"\{(\w+)\}",
            lambda m: str(
                self.state.slots.get(m.group(1))
                if self.state.slots.get(m.group(1)) is not None
                else m.group(0)
            ),
            text,
        )


def _next_asks(assistant: Assistant, test: TestCase, index: int) -> tuple[str, ...]:
    """Slots the bot asks for between this user step and the next one, as the test shows them."""
    asks: list[str] = []
    names: list[str] = []
    step = test.steps[index]
    if isinstance(step, UserStep):
        names += [a.utter_name for a in step.assertions if isinstance(a, BotUttered) and a.utter_name]
    for later in test.steps[index + 1 :]:
        if isinstance(later, UserStep):
            break
        if isinstance(later, UtterStep):
            names.append(later.name)
    for name in names:
        for flow in assistant.flows.values():
            for collect in flow.collect_steps():
                if assistant.ask_response(collect) == name and collect.target is not None:
                    asks.append(collect.target)
    return tuple(dict.fromkeys(asks))


def _bot_steps_follow(test: TestCase, index: int) -> bool:
    for later in test.steps[index + 1 :]:
        if isinstance(later, UserStep):
            return False
        if isinstance(later, BotStep | UtterStep):
            return True
    return False


def conversation(
    assistant: Assistant,
    suite: TestSuite,
    test: TestCase,
    user_texts: Mapping[int, str] | None = None,
) -> Generator[Turn, Sequence[Command], list[str]]:
    """Replay `test`; yield each user turn for the command generator and receive its commands.

    `user_texts` replaces the text of user steps (by step index): rephrased and synthetic conversations
    replay with their own messages in the history. Returns the whole transcript (`USER:` / `AI:` lines).
    """
    replay = Replay(assistant, suite.fixture_slots(test))
    state = replay.state
    turn_index = 0
    for index, step in enumerate(test.steps):
        if isinstance(step, UserStep):
            text = (user_texts or {}).get(index, step.text)
            commanded: Sequence[Command] = ()
            if is_button_payload(step.text):
                for name, value in parse_set_slots_payload(step.text).items():
                    replay.set_slot(name, value)
                state.history.append(f"USER: {text}")
            else:
                turn = Turn(
                    step_index=index,
                    turn_index=turn_index,
                    step=step,
                    text=text,
                    variables=replay.variables(text),
                    slots_before=dict(state.slots),
                    current_flow=state.current_flow,
                    asked_slot=state.asked,
                    next_asks=_next_asks(assistant, test, index),
                    active_flows=tuple(state.stack),
                )
                commands = yield turn
                turn_index += 1
                state.history.append(f"USER: {text}")
                replay.apply_commands(commands or ())
                commanded = commands or ()
            for assertion in step.assertions:
                if isinstance(assertion, ActionExecuted):
                    replay.run_stub(suite, test, assertion.action)
            replay.apply_assertions(step, commanded)
            uttered = [a.utter_name for a in step.assertions if isinstance(a, BotUttered) and a.utter_name]
            if not _bot_steps_follow(test, index):  # explicit bot / utter steps tell the history themselves
                for name in uttered:
                    replay.bot_says(replay.render_response(name))
            replay.follow_flows()
            for name in uttered:
                replay.ask_from_response(name)
        elif isinstance(step, BotStep):
            replay.bot_says(step.text)
            for response in assistant.responses.values():
                if step.text in response.texts:
                    replay.ask_from_response(response.name)
        elif isinstance(step, UtterStep):
            replay.bot_says(replay.render_response(step.name))
            replay.ask_from_response(step.name)
        elif isinstance(step, SlotWasSetStep):
            for check in step.slots:
                if check.has_value:
                    replay.set_slot(check.name, check.value)
    return state.history
