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

import contextlib
import re
from collections.abc import Generator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Literal

import jinja2

from ftrecipe.dataprep.assistant import END, Assistant, Flow, FlowStep, Rejection
from ftrecipe.dataprep.commands import CancelFlow, Command, SetSlot, StartFlow
from ftrecipe.dataprep.e2e import (
    ActionExecuted,
    BotStep,
    BotUttered,
    ClarificationContains,
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
from ftrecipe.dataprep.patterns import ROUTER_SLOT
from ftrecipe.dataprep.predicates import (
    INTERNAL_ERROR_RESPONSE,
    InvalidCondition,
    branch_taken,
    guard_allows,
    identifiers,
    rejection_response,
    render,
)
from ftrecipe.dataprep.prompt import CURRENT_DATETIME, MOCKED_DATETIME_SLOT, mocked_datetime
from ftrecipe.dataprep.routing import RESET_ACTION, Route, nlu_only, routing_slot_shown

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
    agent_call: tuple[str, str] | None = None  # (flow, step id) of the `call:` whose sub-agent has the user
    agent_calls_done: set[tuple[str, str]] = field(default_factory=set)
    # Where each flow on the stack waits: the collect it asked, or the `call` whose flow runs above it.
    position: dict[str, str] = field(default_factory=dict)
    called: set[str] = field(default_factory=set)  # flows on the stack that a `call` step started
    evidenced: set[str] = field(
        default_factory=set
    )  # slots the test set (fixtures, commands, assertions, stubs)
    unstubbed_actions: set[str] = field(default_factory=set)  # custom actions that ran without a stub
    to_validate: list[str] = field(default_factory=list)  # slots the user's turn set, domain rejections due
    refused: list[tuple[str, str]] = field(default_factory=list)  # (slot, response) refused this turn

    @property
    def current_flow(self) -> str | None:
        """The topmost flow not started by a `call`: Rasa treats a called flow as part of its caller."""
        return next((f for f in reversed(self.stack) if f not in self.called), None)


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


class ReplayFailure(Exception):
    """The replay cannot follow the test as Rasa would (one line saying why): that test fails, not the run."""

    def __init__(self, message: str, step_index: int = 0, user_message: str = "") -> None:
        super().__init__(message)
        self.step_index = step_index
        self.user_message = user_message


StopKind = Literal["collect", "end", "link", "agent"]
_MAX_STEPS = 250  # Rasa's flow executor gives up after as many steps in one go
_ACTION_MAPPINGS = frozenset({"custom", "controlled"})


@dataclass(frozen=True)
class _Stop:
    """Where a walk through a flow stopped, and what it changed on the way."""

    kind: StopKind  # asks a slot, ends, links to another flow, hands over to a sub-agent
    frames: tuple[tuple[str, str], ...]  # (flow, step) from the walked flow down through `call`s
    target: str | None  # the slot asked, the flow linked, the sub-agent called
    slot_changes: tuple[tuple[str, Any], ...]
    ran: frozenset[str]  # custom actions that ran without a stub
    refused: tuple[str, str] | None = None  # (slot, response): the collect's rejection refused its value


@dataclass
class _Walk:
    slots: dict[str, Any]
    known: set[str]  # slots the walk set (set_slots, stubs)
    ran: set[str]
    budget: list[int]

    def copy(self) -> _Walk:
        return _Walk(dict(self.slots), set(self.known), set(self.ran), self.budget)


def _pairs(rejections: Sequence[Rejection]) -> tuple[tuple[str, str | None], ...]:
    return tuple((r.condition, r.utter) for r in rejections)


class Replay:
    """The state machine; `conversation()` drives it over one test case."""

    def __init__(
        self,
        assistant: Assistant,
        initial_slots: Mapping[str, Any],
        suite: TestSuite | None = None,
        test: TestCase | None = None,
    ) -> None:
        self.assistant = assistant
        self.suite = suite
        self.test = test
        slots = {name: slot.initial_value for name, slot in assistant.slots.items()}
        slots.update({k: coerce_slot_value(assistant, k, v) for k, v in initial_slots.items()})
        self.state = DialogueState(slots, evidenced=set(initial_slots))
        self.at: tuple[int, str] = (0, "")  # the test step being replayed, and its user message
        # The slots the test shows the bot asking for after this turn: they tell an undecidable branch.
        self.shown_asks: tuple[str, ...] = ()

    def _failure(self, message: str) -> ReplayFailure:
        return ReplayFailure(message, *self.at)

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
        """The flows Rasa puts in the prompt: those whose guard holds, and the active ones whatever theirs says."""
        flows = []
        active = self._active_flows()
        for flow in self.assistant.user_flows():
            if flow.id not in active and not self.startable(flow):
                continue
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
        variables: dict[str, Any] = {
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
        mocked = state.slots.get(MOCKED_DATETIME_SLOT)
        if mocked is not None:  # the test's fixture fixes its time, as in `rasa test e2e`
            # Fixtures are checked at load; a bad value from elsewhere leaves the run's instant.
            with contextlib.suppress(ValueError):
                variables[CURRENT_DATETIME] = mocked_datetime(mocked)
        return variables

    # ----------------------------------------------------------------------------- transitions

    def set_slot(self, name: str, value: Any) -> None:
        self.state.slots[name] = coerce_slot_value(self.assistant, name, value)
        self.state.evidenced.add(name)

    def start_flow(self, flow_id: str) -> None:
        flow = self.assistant.flows.get(flow_id)
        # Rasa skips starting a flow that is already on the stack (active, interrupted or called).
        if flow is not None and not flow.is_pattern and flow_id not in self.state.stack:
            self.state.stack.append(flow_id)
            self.state.position.pop(flow_id, None)

    def end_flow(self, flow_id: str) -> None:
        """A flow ends (completed or cancelled): drop it, and the flows it called, and reset what it collected,
        as Rasa does (a called flow's slots are reset when its caller ends)."""
        if flow_id not in self.state.stack:
            return
        for above in reversed(self.state.stack[self.state.stack.index(flow_id) + 1 :]):
            if above in self.state.called:
                self.end_flow(above)
        self.state.stack.remove(flow_id)
        self.state.position.pop(flow_id, None)
        if flow_id in self.state.called:
            self.state.called.discard(flow_id)
        else:
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
                self._rewind_for_correction(command.name)
                self.set_slot(command.name, command.value)
                self.user_set(command.name)
            elif isinstance(command, CancelFlow) and self.state.current_flow:
                self.end_flow(self.state.current_flow)  # and the flows it called

    def user_set(self, name: str) -> None:
        """The user's turn set `name`: its domain `validation: rejections` run before the flow moves on."""
        if name in self.state.to_validate:
            self.state.to_validate.remove(name)
        self.state.to_validate.append(name)

    def _rewind_for_correction(self, name: str) -> None:
        """A new value for a slot the current flow collected earlier: Rasa's correction pattern moves the flow
        back to that collect step, so the steps after it (and their branches) run again."""
        flow_id = self.state.current_flow
        flow = self.assistant.flows.get(flow_id) if flow_id else None
        if flow is None or self.state.slots.get(name) is None:
            return
        at = self.state.position.get(flow.id)
        ids = [s.id for s in flow.steps]
        collect = next((s for s in flow.steps if s.kind == "collect" and s.target == name), None)
        if collect is not None and at in ids and ids.index(collect.id) < ids.index(at):
            self.state.position[flow.id] = collect.id

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
                        before = self.state.slots.get(check.name)
                        self.set_slot(check.name, check.value)
                        if self.state.slots.get(check.name) != before:  # e.g. a confirmed correction
                            self.user_set(check.name)
        for assertion in step.assertions:
            if isinstance(assertion, FlowCompleted | FlowCancelled):
                self.end_flow(assertion.flow_id)

    def run_stub(self, suite: TestSuite, test: TestCase, action: str) -> None:
        """A stubbed custom action's slot events, as Rasa applies them in E2E tests (per-test stub wins)."""
        stub = suite.stubs.get(f"{test.name}::{action}", suite.stubs.get(action))
        if not isinstance(stub, Mapping):
            if self.is_custom_action(action):
                self.state.unstubbed_actions.add(action)
            return
        for event in stub.get("events") or []:
            if isinstance(event, Mapping) and event.get("event") == "slot" and "name" in event:
                self.set_slot(str(event["name"]), event.get("value"))

    def ask_from_response(self, response_name: str) -> None:
        """A bot message (or an `action_ask_<slot>`) that asks for a slot makes it the one being asked, and,
        when the current flow collects it, the step that flow waits at."""
        current = self.assistant.flows.get(self.state.current_flow) if self.state.current_flow else None
        flows = [current] if current is not None else []
        for flow in [*flows, *self.assistant.flows.values()]:
            for step in flow.collect_steps():
                if response_name in self.assistant.ask_names(step) and step.target is not None:
                    self.state.asked = step.target
                    self.state.asked_before.add(step.target)
                    if flow is current:
                        self.state.position[flow.id] = step.id
                    return
        for slot in self.assistant.slots.values():
            if slot.refill_utter == response_name:
                self.state.asked = slot.name
                self.state.asked_before.add(slot.name)
                return

    # ----------------------------------------------------------------------------- flow policy

    def _active_flows(self) -> set[str]:
        """The current flow and the flows that `call`ed it: Rasa offers them whatever their guards say."""
        active: set[str] = set()
        for flow_id in reversed(self.state.stack):
            active.add(flow_id)
            if flow_id not in self.state.called:
                break
        return active

    def _unknown_slot(self, name: str, known: Set[str], ran: Set[str]) -> str | None:
        """Why the replayed value of a slot a condition reads is not Rasa's (None: it is)."""
        if name not in self.state.slots:
            return f"slot {name!r} is not one the replay tracks"
        slot = self.assistant.slots.get(name)
        set_by_actions = slot is not None and bool(slot.mappings) and set(slot.mappings) <= _ACTION_MAPPINGS
        actions = self.state.unstubbed_actions | set(ran)
        if (
            set_by_actions
            and slot is not None
            and slot.initial_value is None
            and name not in known
            and actions
        ):
            return (
                f"slot {name!r} is set by custom actions, and {', '.join(sorted(actions))} ran without a stub"
            )
        return None

    def _condition_problem(
        self, condition: str, context: Mapping[str, Any] | None, known: Set[str], ran: Set[str]
    ) -> str | None:
        """Why the replay cannot decide `condition` as Rasa would (None: it can). `context` is what the
        replay knows of Rasa's stack context (None: nothing, as for flow guards, which are not rendered)."""
        text = condition
        if context is not None and "{" in condition:
            try:
                text = render(condition, {"context": dict(context)}, strict=True)
            except jinja2.UndefinedError:
                return "its template reads Rasa's dialogue-stack context, which the replay does not model"
            except jinja2.TemplateError:
                return None  # Rasa counts a broken condition as false
        try:
            names = identifiers(text)
        except InvalidCondition:
            return None  # Rasa counts an invalid condition as false
        for name in sorted(names):
            head, _, rest = name.partition(".")
            key = rest.split(".")[0]
            if head == "slots":
                problem = self._unknown_slot(key, known, ran)
                if problem:
                    return problem
            elif head == "context" and (context is None or key not in context):
                return f"`context.{key}` comes from Rasa's dialogue stack, which the replay does not model"
        return None

    def startable(self, flow: Flow) -> bool:
        """A flow's guard (`if:`) on the replayed slots; ReplayFailure when the replay cannot decide it."""
        if flow.condition is None:
            return True
        problem = self._condition_problem(flow.condition, None, self.state.evidenced, set())
        if problem:
            raise self._failure(
                f"flow {flow.id!r}: cannot decide its guard `if: {flow.condition}`: {problem}"
            )
        return guard_allows(flow.condition, self.state.slots, {})

    def _stub_events(self, action: str) -> list[tuple[str, Any]] | None:
        """The slot events of `action`'s stub in this test (per-test stub first); None when not stubbed."""
        if self.suite is None or self.test is None:
            return None
        stubs = self.suite.stubs
        stub = stubs.get(f"{self.test.name}::{action}", stubs.get(action))
        if not isinstance(stub, Mapping):
            return None
        return [
            (str(e["name"]), coerce_slot_value(self.assistant, str(e["name"]), e.get("value")))
            for e in stub.get("events") or []
            if isinstance(e, Mapping) and e.get("event") == "slot" and "name" in e
        ]

    def is_custom_action(self, name: str) -> bool:
        return name in self.assistant.actions and not name.startswith("utter_")

    def _walk(self, flow_id: str) -> _Stop:
        """Run `flow_id` from where it waits (or from its first step) until it needs the user, ends or links."""
        flow = self.assistant.flows[flow_id]
        walk = _Walk(dict(self.state.slots), set(), set(), [_MAX_STEPS])
        at = self.state.position.get(flow_id)
        if at is None:
            return self._run(((flow_id, flow.steps[0].id),), walk, entering=True)
        step = flow.step(at)
        if step is not None and step.kind == "collect":  # the user was asked: an answer moves the flow on
            stop = self._at_collect(step, ((flow_id, at),), walk, arriving=False)
            if stop is not None:
                return stop
        return self._run(((flow_id, at),), walk, entering=False)

    def _run(self, frames: tuple[tuple[str, str], ...], walk: _Walk, entering: bool) -> _Stop:
        """Execute steps like Rasa's flow executor; `frames` are (flow, step) from the walked flow down
        through `call`s. `entering`: the innermost step is reached now (else: it already ran)."""
        while True:
            flow_id, step_id = frames[-1]
            if step_id == END:
                if len(frames) == 1:
                    return self._stop("end", frames, walk)
                frames, entering = frames[:-1], False  # back in the caller, at its `call` step
                continue
            flow = self.assistant.flows[flow_id]
            step = flow.step(step_id)
            if step is None:
                raise self._failure(f"flow {flow_id!r} has no step {step_id!r}")
            if entering:
                walk.budget[0] -= 1
                if walk.budget[0] < 0:
                    raise self._failure(
                        f"flow {frames[0][0]!r} runs {_MAX_STEPS} steps without waiting for the user"
                    )
                if step.kind == "collect":
                    stop = self._at_collect(step, frames, walk, arriving=True)
                    if stop is not None:
                        return stop
                elif step.kind == "action" and step.target is not None:
                    events = self._stub_events(step.target)
                    if events is not None:
                        for name, value in events:
                            walk.slots[name] = value
                            walk.known.add(name)
                    elif self.is_custom_action(step.target):
                        walk.ran.add(step.target)
                elif step.kind == "set_slots":
                    for name, value in step.set_slots.items():
                        walk.slots[name] = coerce_slot_value(self.assistant, name, value)
                        walk.known.add(name)
                elif step.kind == "link":
                    return self._stop("link", frames, walk, target=step.target)
                elif step.kind == "call" and step.target is not None:
                    called = self.assistant.flows.get(step.target)
                    if called is not None and called.steps and all(f != called.id for f, _ in frames):
                        frames, entering = (*frames, (called.id, called.steps[0].id)), True
                        continue
                    if called is None and (flow_id, step.id) not in self.state.agent_calls_done:
                        return self._stop("agent", frames, walk, target=step.target)
            targets, undecided = self._next_targets(flow, step, walk)
            if len(targets) == 1:
                frames, entering = (*frames[:-1], (flow_id, targets[0])), True
                continue
            return self._fork(frames, targets, undecided, walk)

    def _fork(
        self, frames: tuple[tuple[str, str], ...], targets: list[str], undecided: list[str], walk: _Walk
    ) -> _Stop:
        """Conditions the replay cannot decide: fine if every branch they could take ends the same way, or
        if the question the test shows the bot asking next is where only one of them stops (Rasa, running
        the real action, took that one)."""
        stops = [
            self._run((*frames[:-1], (frames[-1][0], target)), walk.copy(), entering=True)
            for target in targets
        ]
        if all(stop == stops[0] for stop in stops[1:]):
            return stops[0]
        shown = [stop for stop in stops if stop.kind == "collect" and stop.target in self.shown_asks]
        if shown and all(stop == shown[0] for stop in shown[1:]):
            return shown[0]
        raise self._failure(f"{undecided[0]} (and its branches lead to different steps)")

    def _next_targets(self, flow: Flow, step: FlowStep, walk: _Walk) -> tuple[list[str], list[str]]:
        """Where Rasa goes after `step`: the first `if` that holds, else the `else`. When an `if` cannot be
        decided, every target it could lead to, with why."""
        if not step.next:
            index = flow.steps.index(step)
            return ([flow.steps[index + 1].id] if index + 1 < len(flow.steps) else [END]), []
        targets: list[str] = []
        undecided: list[str] = []
        context = {"flow_id": flow.id, "step_id": step.id}
        for branch in step.next:
            if branch.condition is None:
                targets.append(branch.target)
                break
            problem = self._condition_problem(
                branch.condition, context, self.state.evidenced | walk.known, walk.ran
            )
            if problem:
                targets.append(branch.target)
                undecided.append(
                    f"flow {flow.id!r}, step {step.id!r}: cannot decide `{branch.condition}`: {problem}"
                )
            elif branch_taken(branch.condition, walk.slots, context):
                targets.append(branch.target)
                break
        else:
            targets.append(END)  # no branch holds and no `else` (Rasa's validation requires one)
        return list(dict.fromkeys(targets)), undecided

    def _at_collect(
        self, step: FlowStep, frames: tuple[tuple[str, str], ...], walk: _Walk, arriving: bool
    ) -> _Stop | None:
        """A collect step: ask (stop), refuse the value (stop, asking again) or move on (None)."""
        name = str(step.target)
        if arriving and step.ask_before_filling:
            walk.slots[name] = None  # Rasa empties it and asks, whatever it held
            return self._stop("collect", frames, walk, target=name)
        value = walk.slots.get(name)
        if value is None:
            return self._stop("collect", frames, walk, target=name)
        if step.rejections:
            response = rejection_response(_pairs(step.rejections), name, value)
            if response is not None:
                walk.slots[name] = None
                return self._stop("collect", frames, walk, target=name, refused=(name, response))
        return None

    def _stop(
        self,
        kind: StopKind,
        frames: tuple[tuple[str, str], ...],
        walk: _Walk,
        target: str | None = None,
        refused: tuple[str, str] | None = None,
    ) -> _Stop:
        changes = tuple(
            (name, value) for name, value in sorted(walk.slots.items()) if self.state.slots.get(name) != value
        )
        return _Stop(kind, frames, target, changes, frozenset(walk.ran), refused)

    def _refuse(self, name: str, response: str) -> None:
        """A rejected value: the slot is emptied, the rejection's response said, the question asked again."""
        self.state.slots[name] = None
        self.state.refused.append((name, response))
        self.state.asked = name
        self.state.asked_before.add(name)

    def follow_flows(self) -> None:
        """Where the test is silent, do what Rasa does after the user's turn: check the values the turn set
        against their slots' `validation: rejections` (last set first), then run the current flow from
        where it waits, following `next` branches and `call`s, until it asks for a slot, ends (the flow
        below resumes; a called flow returns to its caller) or links to another flow."""
        state = self.state
        while state.to_validate:
            name = state.to_validate.pop()
            slot = self.assistant.slots.get(name)
            if slot is not None and slot.rejections:
                response = rejection_response(_pairs(slot.rejections), name, state.slots.get(name))
                if response is not None:
                    self._refuse(name, response)
                    return
        budget = 2 * len(self.assistant.flows) + 1  # flows that only link to each other must not spin
        while state.stack and budget > 0:
            budget -= 1
            flow_id = state.stack[-1]
            if flow_id not in self.assistant.flows:
                self.end_flow(flow_id)
                continue
            stop = self._walk(flow_id)
            for name, value in stop.slot_changes:
                state.slots[name] = value
                state.evidenced.add(name)
            state.unstubbed_actions |= stop.ran
            if stop.kind in ("collect", "agent"):
                for called_id, _ in stop.frames[1:]:
                    if called_id not in state.stack:
                        state.stack.append(called_id)
                        state.called.add(called_id)
                for frame_flow, frame_step in stop.frames:
                    state.position[frame_flow] = frame_step
                if stop.kind == "agent":
                    state.asked = None
                    state.agent_call = stop.frames[-1]
                    return
                state.asked = stop.target
                state.asked_before.add(str(stop.target))
                if stop.refused is not None:
                    state.refused.append(stop.refused)
                return
            self.end_flow(flow_id)
            if stop.kind == "link" and stop.target is not None:
                self.start_flow(stop.target)
        state.asked = None

    def check_refusals(self, shown: Sequence[str]) -> None:
        """A rejection response the test shows must be one the replay gave: else the labels set a value
        Rasa would have kept (or the replay misses why Rasa refused it)."""
        refused = {slot for slot, _ in self.state.refused}
        owners = _rejection_owners(self.assistant)
        for name in shown:
            for slot in sorted(owners.get(name, set()) - refused):
                raise self._failure(
                    f"the test shows {name} (a rejection of {slot}), but {slot} = "
                    f"{self.state.slots.get(slot)!r} passes its rejections here"
                )

    def route_to_nlu(self, route: Route) -> None:
        """A turn the NLU-based system handles: for the session (the slot False) or for this turn only."""
        if route == "nlu_sticky":
            self.set_slot(ROUTER_SLOT, False)

    def reset_routing(self, index: int, stack_before: Sequence[str], calm_turn: bool) -> None:
        """`action_reset_routing` empties the routing slot: the test shows it run (or the slot reset), a
        response the NLU system's stories / rules follow with it was said, or the turn ended the last flow
        and the assistant's `pattern_completed` runs it."""
        assert self.test is not None
        shown = _shown_responses(self.test, index)
        step = self.test.steps[index]
        actions = (
            [a.action for a in step.assertions if isinstance(a, ActionExecuted)]
            if isinstance(step, UserStep)
            else []
        )
        completed = self.assistant.flows.get("pattern_completed")
        resets_on_completion = completed is not None and any(
            s.kind == "action" and s.target == RESET_ACTION for s in completed.steps
        )
        if (
            RESET_ACTION in actions
            or (not calm_turn and any(name in self.assistant.nlu.reset_after for name in [*shown, *actions]))
            or (calm_turn and resets_on_completion and stack_before and not self.state.stack)
        ):
            self.state.slots[ROUTER_SLOT] = None

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
        names += [a.action for a in step.assertions if isinstance(a, ActionExecuted)]  # action_ask_<slot>
    for later in test.steps[index + 1 :]:
        if isinstance(later, UserStep):
            break
        if isinstance(later, UtterStep):
            names.append(later.name)
    for name in names:
        for flow in assistant.flows.values():
            for collect in flow.collect_steps():
                if name in assistant.ask_names(collect) and collect.target is not None:
                    asks.append(collect.target)
    refused = refused_slots(assistant, names)
    return tuple(dict.fromkeys(a for a in asks if a not in refused))


def refused_slots(assistant: Assistant, shown: Sequence[str]) -> set[str]:
    """Slots whose value these shown responses say was refused: asked again after a rejection, which is no
    sign the value was not set (an internal error, from a rejection that failed to evaluate, refuses any)."""
    owners = _rejection_owners(assistant)
    refused = {slot for name in shown for slot in owners.get(name, set())}
    if INTERNAL_ERROR_RESPONSE in shown:
        refused |= {slot for slots in owners.values() for slot in slots}
    return refused


def _shown_responses(test: TestCase, index: int) -> list[str]:
    """Responses the test shows the bot saying after the user step at `index`, before the next one."""
    step = test.steps[index]
    names: list[str] = []
    if isinstance(step, UserStep):
        names += [a.utter_name for a in step.assertions if isinstance(a, BotUttered) and a.utter_name]
    for later in test.steps[index + 1 :]:
        if isinstance(later, UserStep):
            break
        if isinstance(later, UtterStep):
            names.append(later.name)
    return names


def _rejection_owners(assistant: Assistant) -> dict[str, set[str]]:
    """Response -> the slots whose rejections (the domain's or a collect step's) say it, for responses that
    say nothing else in the flows (a response also used by an `action` step proves no rejection)."""
    owners: dict[str, set[str]] = {}
    said_by_steps: set[str] = set()
    for slot in assistant.slots.values():
        for rejection in slot.rejections:
            if rejection.utter:
                owners.setdefault(rejection.utter, set()).add(slot.name)
    for flow in assistant.flows.values():
        for step in flow.steps:
            if step.kind == "action" and step.target is not None:
                said_by_steps.add(step.target)
            for rejection in step.rejections if step.kind == "collect" else ():
                if rejection.utter and step.target is not None:
                    owners.setdefault(rejection.utter, set()).add(step.target)
    return {name: slots for name, slots in owners.items() if name not in said_by_steps}


def _command_generator_acted(step: UserStep, agent_flow: str) -> bool:
    """Whether a message sent while a sub-agent has the user went to the command generator instead: the
    test shows a flow or pattern started (other than the calling flow), a clarification, or a cancel."""
    for assertion in step.assertions:
        if isinstance(assertion, FlowStarted) and any(f != agent_flow for f in assertion.flow_ids):
            return True
        if isinstance(assertion, ClarificationContains | FlowCancelled):
            return True
    return False


def _sub_agent_finished(step: UserStep, agent_flow: str, asks_next: Sequence[str]) -> bool:
    """Control is back with the flow once the test shows the calling flow completed or a question asked."""
    completed = any(isinstance(a, FlowCompleted) and a.flow_id == agent_flow for a in step.assertions)
    return completed or bool(asks_next)


def _bot_steps_follow(test: TestCase, index: int) -> bool:
    for later in test.steps[index + 1 :]:
        if isinstance(later, UserStep):
            return False
        if isinstance(later, BotStep | UtterStep):
            return True
    return False


def _flow_said(assistant: Assistant) -> frozenset[str]:
    """Responses and actions the flows and patterns run: what CALM can say."""
    said: set[str] = set()
    for flow in assistant.flows.values():
        for step in flow.steps:
            if step.kind == "action" and step.target is not None:
                said.add(step.target)
            elif step.kind == "collect":
                said.update(assistant.ask_names(step))
            said.update(r.utter for r in step.rejections if r.utter)
    return frozenset(said)


def nlu_route(assistant: Assistant, test: TestCase, index: int, slots: Mapping[str, Any]) -> Route | None:
    """How the test shows the user step at `index` routed to the NLU-based system, or None (CALM, or
    cannot be told): the slot already False (a sticky NLU session), the turn setting it False, or every
    response the bot then says one only the NLU system's stories / rules say (stickiness unknown: the slot
    is left as it is)."""
    step = test.steps[index]
    if not isinstance(step, UserStep):
        return None
    checks = [
        (c.name, c.has_value, c.value) for a in step.assertions if isinstance(a, SlotWasSet) for c in a.slots
    ]
    for later in test.steps[index + 1 :]:
        if isinstance(later, UserStep):
            break
        if isinstance(later, SlotWasSetStep):
            checks += [(c.name, c.has_value, c.value) for c in later.slots]
    if slots.get(ROUTER_SLOT) is False or routing_slot_shown(checks) is False:
        return "nlu_sticky"
    shown = _shown_responses(test, index)
    shown += [a.action for a in step.assertions if isinstance(a, ActionExecuted)]
    for later in test.steps[index + 1 :]:
        if isinstance(later, UserStep):
            break
        if isinstance(later, BotStep):
            shown += _responses_said(assistant, later.text)
    if nlu_only(shown, assistant.nlu, _flow_said(assistant)):
        return "nlu_once"
    return None


def _responses_said(assistant: Assistant, text: str) -> list[str]:
    return [r.name for r in assistant.responses.values() if text.strip() in (t.strip() for t in r.texts)]


def conversation(
    assistant: Assistant,
    suite: TestSuite,
    test: TestCase,
    user_texts: Mapping[int, str] | None = None,
    routes: dict[int, Route] | None = None,
) -> Generator[Turn, Sequence[Command], list[str]]:
    """Replay `test`; yield each user turn for the command generator and receive its commands.

    `user_texts` replaces the text of user steps (by step index): rephrased and synthetic conversations
    replay with their own messages in the history. Returns the whole transcript (`USER:` / `AI:` lines).

    Coexistence (`assistant.coexistence`): `routes` (step index -> route) holds the turns routed to the
    NLU-based system. The replay fills in what the test shows (`nlu_route`); a caller that routes a
    yielded turn itself (the LLMBasedRouter's answer) records it there before sending `()`; a replay
    given an annotated conversation's routes skips the same turns. Such a turn is no command-generator turn.
    """
    replay = Replay(assistant, suite.fixture_slots(test), suite, test)
    state = replay.state
    turn_index = 0
    routes = {} if routes is None else routes
    for index, step in enumerate(test.steps):
        replay.at = (index, step.text if isinstance(step, UserStep) else "")
        if isinstance(step, UserStep):
            state.refused.clear()
            stack_before = list(state.stack)
            calm_turn = False
            text = (user_texts or {}).get(index, step.text)
            commanded: Sequence[Command] = ()
            # The sub-agent has the user while the flow that calls it is the innermost on the stack.
            agent = (
                state.agent_call if state.agent_call and state.stack[-1:] == [state.agent_call[0]] else None
            )
            if is_button_payload(step.text):
                for name, value in parse_set_slots_payload(step.text).items():
                    replay.set_slot(name, value)
                    replay.user_set(name)
                state.history.append(f"USER: {text}")
            elif agent is not None and not _command_generator_acted(step, agent[0]):
                # The sub-agent answers this message itself: no command-generator turn.
                state.history.append(f"USER: {text}")
            elif assistant.coexistence and (
                routes.get(index, "calm") != "calm" or nlu_route(assistant, test, index, state.slots)
            ):
                routes.setdefault(index, nlu_route(assistant, test, index, state.slots) or "nlu_once")
                replay.route_to_nlu(routes[index])
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
                state.history.append(f"USER: {text}")
                if routes.get(index, "calm") != "calm":  # the caller's router sent it to the NLU system
                    replay.route_to_nlu(routes[index])
                else:
                    turn_index += 1
                    replay.apply_commands(commands or ())
                    commanded = commands or ()
                    calm_turn = assistant.coexistence
                    if calm_turn:  # Rasa's command generator sets the routing slot with its commands
                        replay.set_slot(ROUTER_SLOT, True)
            for assertion in step.assertions:
                if isinstance(assertion, ActionExecuted):
                    replay.run_stub(suite, test, assertion.action)
            replay.apply_assertions(step, commanded)
            uttered = [a.utter_name for a in step.assertions if isinstance(a, BotUttered) and a.utter_name]
            if not _bot_steps_follow(test, index):  # explicit bot / utter steps tell the history themselves
                for name in uttered:
                    replay.bot_says(replay.render_response(name))
            if agent is not None and _sub_agent_finished(step, agent[0], _next_asks(assistant, test, index)):
                state.agent_calls_done.add(agent)
                state.agent_call = None
            # A call of a flow that left the stack runs its sub-agent again when the flow restarts.
            state.agent_calls_done = {done for done in state.agent_calls_done if done[0] in state.stack}
            if state.agent_call is not None and state.stack[-1:] == [state.agent_call[0]]:
                state.asked = None  # the sub-agent has the user until it hands back
            else:
                replay.shown_asks = _next_asks(assistant, test, index)
                replay.follow_flows()  # stops at a sub-agent's `call:` too (state.agent_call)
                replay.shown_asks = ()
            asked_by_actions = [a.action for a in step.assertions if isinstance(a, ActionExecuted)]
            for name in uttered + asked_by_actions:
                replay.ask_from_response(name)
            replay.check_refusals(_shown_responses(test, index))
            if assistant.coexistence:
                replay.reset_routing(index, stack_before, calm_turn)
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
