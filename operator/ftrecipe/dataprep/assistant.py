"""A Rasa CALM assistant's flows and domain, gathered from however many files and folders it uses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ftrecipe.dataprep.e2e import (
    BotDidNotUtter,
    BotUttered,
    ClarificationContains,
    FlowCancelled,
    FlowCompleted,
    FlowStarted,
    SlotWasNotSet,
    SlotWasNotSetStep,
    SlotWasSet,
    SlotWasSetStep,
    Step,
    TestSuite,
    UserStep,
    UtterStep,
)
from ftrecipe.dataprep.yamlfile import InputError, load_yaml, where, yaml_files

StepKind = Literal["collect", "action", "link", "call", "set_slots", "noop"]
_STEP_KINDS: tuple[StepKind, ...] = ("collect", "action", "link", "call", "set_slots", "noop")
END = "END"


@dataclass(frozen=True)
class Branch:
    """One arm of a `next` list: `condition` is None for `else`; `target` a step id or END."""

    condition: str | None
    target: str


@dataclass(frozen=True)
class FlowStep:
    id: str
    kind: StepKind
    target: str | None = None  # the slot (collect), action (action) or flow (link / call)
    description: str | None = None
    ask_before_filling: bool = False
    reset_after_flow_ends: bool = True
    utter: str | None = None
    set_slots: Mapping[str, Any] = field(default_factory=dict)
    next: tuple[Branch, ...] = ()  # empty: the next step in the list


@dataclass(frozen=True)
class Flow:
    id: str
    description: str
    steps: tuple[FlowStep, ...]
    name: str | None = None
    condition: str | None = None
    always_include_in_prompt: bool = False
    persisted_slots: tuple[str, ...] = ()
    file: Path | None = None

    @property
    def is_pattern(self) -> bool:
        return self.id.startswith("pattern_")

    def collect_steps(self) -> list[FlowStep]:
        return [s for s in self.steps if s.kind == "collect"]

    def step(self, step_id: str) -> FlowStep | None:
        return next((s for s in self.steps if s.id == step_id), None)


@dataclass(frozen=True)
class Slot:
    name: str
    type: str
    values: tuple[Any, ...] = ()
    mappings: tuple[str, ...] = ()
    initial_value: Any = None

    @property
    def filled_by_llm(self) -> bool:
        """Rasa CALM: slots without mappings default to from_llm."""
        return not self.mappings or "from_llm" in self.mappings

    def allowed_values(self) -> list[Any] | None:
        if self.type == "bool":
            return [True, False]
        if self.type == "categorical":
            return list(self.values)
        return None


@dataclass(frozen=True)
class Response:
    name: str
    texts: tuple[str, ...]
    buttons: tuple[tuple[str, str], ...] = ()  # (title, payload) of the first variant

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""


@dataclass(frozen=True)
class Assistant:
    flows: Mapping[str, Flow]
    slots: Mapping[str, Slot]
    responses: Mapping[str, Response]
    actions: frozenset[str] = frozenset()

    def user_flows(self) -> list[Flow]:
        """Flows a user can start: patterns (`pattern_*`) are never offered."""
        return [flow for flow in self.flows.values() if not flow.is_pattern]

    def ask_response(self, step: FlowStep) -> str:
        return step.utter or f"utter_ask_{step.target}"


# ------------------------------------------------------------------------------------------ flows


def _next(
    value: Any, path: Path, flow_id: str, extra_steps: list[FlowStep], counter: list[int]
) -> tuple[Branch, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (Branch(None, value),)
    if not isinstance(value, list):
        raise InputError(
            f"{where(path, value)}: flow {flow_id!r}: next must be a step id, END or a list of if/else"
        )
    branches = []
    for arm in value:
        if not isinstance(arm, Mapping) or not ({"if", "then"} <= set(arm) or "else" in arm):
            raise InputError(
                f"{where(path, arm)}: flow {flow_id!r}: each next item needs `if` + `then`, or `else`"
            )
        condition = None if "else" in arm else str(arm["if"])
        target = arm["else"] if "else" in arm else arm["then"]
        if isinstance(target, list):  # an inline step list: flatten it into the flow with generated ids
            inline = _steps(target, path, flow_id, extra_steps, counter)
            extra_steps.extend(inline)
            target = inline[0].id
        branches.append(Branch(condition, str(target)))
    return tuple(branches)


def _steps(
    raw_steps: Any, path: Path, flow_id: str, extra: list[FlowStep], counter: list[int]
) -> list[FlowStep]:
    if not isinstance(raw_steps, list) or not raw_steps:
        raise InputError(f"{where(path, raw_steps)}: flow {flow_id!r} needs a non-empty list of steps")
    steps = []
    for raw in raw_steps:
        if not isinstance(raw, Mapping):
            raise InputError(f"{where(path, raw)}: flow {flow_id!r}: a step must be a mapping")
        kinds = [k for k in _STEP_KINDS if k in raw]
        if len(kinds) != 1:
            raise InputError(
                f"{where(path, raw)}: flow {flow_id!r}: a step needs exactly one of {', '.join(_STEP_KINDS)}"
            )
        kind = kinds[0]
        counter[0] += 1
        step_id = str(raw.get("id") or f"{counter[0]}_{kind}")
        set_slots: dict[str, Any] = {}
        if kind == "set_slots":
            for item in raw["set_slots"] or []:
                set_slots.update(item)
        if kind == "noop" and "next" not in raw:
            raise InputError(f"{where(path, raw)}: flow {flow_id!r}: a noop step needs `next`")
        target = None if kind in ("set_slots", "noop") else str(raw[kind])
        steps.append(
            FlowStep(
                id=step_id,
                kind=kind,
                target=target,
                description=raw.get("description"),
                ask_before_filling=bool(raw.get("ask_before_filling", False)),
                reset_after_flow_ends=bool(raw.get("reset_after_flow_ends", True)),
                utter=raw.get("utter"),
                set_slots=set_slots,
                next=_next(raw.get("next"), path, flow_id, extra, counter),
            )
        )
    return steps


def _read_flows(data: Mapping[str, Any], path: Path) -> dict[str, Flow]:
    flows = {}
    raw_flows = data["flows"] or {}
    if not isinstance(raw_flows, Mapping):
        raise InputError(f"{where(path, raw_flows)}: `flows:` must map flow ids to flows")
    for flow_id, raw in raw_flows.items():
        if not isinstance(raw, Mapping):
            raise InputError(f"{where(path, raw_flows)}: flow {flow_id!r} must be a mapping")
        if not raw.get("description"):
            raise InputError(
                f"{where(path, raw)}: flow {flow_id!r} needs a description (the prompt shows it)"
            )
        extra: list[FlowStep] = []
        steps = _steps(raw.get("steps"), path, str(flow_id), extra, [0])
        persisted = raw.get("persisted_slots") or []
        flows[str(flow_id)] = Flow(
            id=str(flow_id),
            description=str(raw["description"]).strip(),
            steps=tuple(steps + extra),
            name=raw.get("name"),
            condition=None if raw.get("if") is None else str(raw["if"]),
            always_include_in_prompt=bool(raw.get("always_include_in_prompt", False)),
            persisted_slots=tuple(str(s) for s in persisted),
            file=path,
        )
    return flows


# ------------------------------------------------------------------------------------------ domain


def _read_slots(raw: Any, path: Path) -> dict[str, Slot]:
    if not isinstance(raw, Mapping):
        raise InputError(f"{where(path, raw)}: `slots:` must map slot names to definitions")
    slots = {}
    for name, spec in raw.items():
        spec = spec or {}
        mappings = tuple(str(m.get("type")) for m in spec.get("mappings") or [] if isinstance(m, Mapping))
        slots[str(name)] = Slot(
            name=str(name),
            type=str(spec.get("type", "any")),
            values=tuple(spec.get("values") or ()),
            mappings=mappings,
            initial_value=spec.get("initial_value"),
        )
    return slots


def _read_responses(raw: Any, path: Path) -> dict[str, Response]:
    if not isinstance(raw, Mapping):
        raise InputError(f"{where(path, raw)}: `responses:` must map response names to variants")
    responses = {}
    for name, variants in raw.items():
        if not isinstance(variants, list):
            raise InputError(f"{where(path, raw)}: response {name!r} must be a list of variants")
        texts = tuple(str(v.get("text", "")) for v in variants if isinstance(v, Mapping))
        first = variants[0] if variants and isinstance(variants[0], Mapping) else {}
        buttons = tuple(
            (str(b.get("title", "")), str(b.get("payload", ""))) for b in first.get("buttons") or []
        )
        responses[str(name)] = Response(str(name), texts, buttons)
    return responses


_DOMAIN_KEYS = {"slots", "responses", "actions", "intents", "entities", "forms", "session_config"}
_IGNORED_KEYS = {"test_cases", "recipe", "pipeline", "policies", "model_groups", "nlu", "stories", "rules"}


def load_assistant(root: Path, *, exclude: tuple[Path, ...] = ()) -> Assistant:
    """Collect flows and domain from every YAML file below root (E2E tests and configs are skipped)."""
    if not root.is_dir():
        raise InputError(f"{root}: the assistant folder does not exist")
    flows: dict[str, Flow] = {}
    slots: dict[str, Slot] = {}
    responses: dict[str, Response] = {}
    actions: set[str] = set()
    excluded = [p.resolve() for p in exclude]
    for path in yaml_files(root):
        resolved = path.resolve()
        if any(resolved == e or e in resolved.parents for e in excluded):
            continue
        data = load_yaml(path)
        if not isinstance(data, Mapping) or set(data) & _IGNORED_KEYS:
            continue
        if "flows" in data:
            for flow_id, flow in _read_flows(data, path).items():
                if flow_id in flows:
                    raise InputError(f"{path}: flow {flow_id!r} is also defined in {flows[flow_id].file}")
                flows[flow_id] = flow
        if set(data) & _DOMAIN_KEYS:
            slots.update(_read_slots(data.get("slots") or {}, path))
            responses.update(_read_responses(data.get("responses") or {}, path))
            actions.update(
                str(a) if not isinstance(a, Mapping) else str(next(iter(a)))
                for a in data.get("actions") or []
            )
    if not any(not f.is_pattern for f in flows.values()):
        raise InputError(f"{root}: no flows found (looked for YAML files with a top-level `flows:`)")
    assistant = Assistant(flows, slots, responses, frozenset(actions))
    _check_references(assistant)
    return assistant


def _check_references(assistant: Assistant) -> None:
    for flow in assistant.flows.values():
        ids = {s.id for s in flow.steps}
        for step in flow.steps:
            at = f"{flow.file}: flow {flow.id!r}, step {step.id!r}"
            if step.kind == "collect" and step.target not in assistant.slots:
                raise InputError(f"{at}: collects slot {step.target!r}, which no domain file defines")
            if step.kind == "collect" and assistant.ask_response(step) not in assistant.responses:
                raise InputError(
                    f"{at}: collecting {step.target!r} needs the response {assistant.ask_response(step)!r} in the domain"
                )
            if step.kind in ("link", "call") and step.target not in assistant.flows:
                raise InputError(f"{at}: {step.kind}s unknown flow {step.target!r}")
            for branch in step.next:
                if branch.target != END and branch.target not in ids:
                    raise InputError(f"{at}: next goes to unknown step {branch.target!r}")


# Names Rasa's built-in patterns use; tests may refer to them without the domain defining them.
BUILTIN_RESPONSES = frozenset(
    {
        "utter_ask_rephrase",
        "utter_boolean_slot_rejection",
        "utter_can_do_something_else",
        "utter_cannot_handle",
        "utter_categorical_slot_rejection",
        "utter_clarification_options_rasa",
        "utter_corrected_previous_input",
        "utter_flow_cancelled_rasa",
        "utter_flow_continue_interrupted",
        "utter_free_chitchat_response",
        "utter_human_handoff_not_available",
        "utter_inform_code_change",
        "utter_internal_error_rasa",
        "utter_no_knowledge_base",
        "utter_skip_question_answer",
    }
)
BUILTIN_SLOTS = frozenset(
    {"dialogue_stack", "requested_slot", "flow_hashes", "return_value", "session_started_metadata"}
)


def check_test_references(assistant: Assistant, suites: Sequence[TestSuite]) -> None:
    """Tests must name flows, slots and responses the assistant has: a typo would silently mislabel data."""
    for suite in suites:
        for test in suite.test_cases:
            for step in test.steps:
                at = f"{suite.path}:{getattr(step, 'line', 0) or test.line}: test {test.name!r}"
                for name in _responses_named(step):
                    if name not in assistant.responses and name not in BUILTIN_RESPONSES:
                        raise InputError(
                            f"{at}: response {name!r} is not in the domain; add it or fix the name"
                        )
                for flow_id in _flows_named(step):
                    if flow_id not in assistant.flows and not flow_id.startswith("pattern_"):
                        known = ", ".join(f.id for f in assistant.user_flows())
                        raise InputError(f"{at}: unknown flow {flow_id!r} (flows: {known})")
                for slot in _slots_named(step):
                    if slot not in assistant.slots and slot not in BUILTIN_SLOTS:
                        raise InputError(
                            f"{at}: unknown slot {slot!r}; define it in the domain or fix the name"
                        )


def _responses_named(step: Step) -> list[str]:
    if isinstance(step, UtterStep):
        return [step.name]
    if isinstance(step, UserStep):
        return [
            a.utter_name
            for a in step.assertions
            if isinstance(a, BotUttered | BotDidNotUtter) and a.utter_name
        ]
    return []


def _flows_named(step: Step) -> list[str]:
    if not isinstance(step, UserStep):
        return []
    names: list[str] = []
    for assertion in step.assertions:
        if isinstance(assertion, FlowStarted | ClarificationContains):
            names += assertion.flow_ids
        elif isinstance(assertion, FlowCompleted | FlowCancelled):
            names.append(assertion.flow_id)
    return names


def _slots_named(step: Step) -> list[str]:
    if isinstance(step, SlotWasSetStep | SlotWasNotSetStep):
        return [c.name for c in step.slots]
    if isinstance(step, UserStep):
        return [c.name for a in step.assertions if isinstance(a, SlotWasSet | SlotWasNotSet) for c in a.slots]
    return []
