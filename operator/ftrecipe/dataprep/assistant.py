"""A Rasa CALM assistant's flows and domain, gathered from however many files and folders it uses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
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
from ftrecipe.dataprep.patterns import (
    DEFAULT_PATTERNS,
    DEFAULT_RESPONSES,
    DEFAULT_SLOTS,
    INTERNAL_SLOTS,
    ROUTER_SLOT,
    DefaultPattern,
    DefaultSlot,
)
from ftrecipe.dataprep.routing import NLUSide, read_nlu_side
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
class Rejection:
    """`{if: condition, utter: response}`: a value for which the condition holds is refused."""

    condition: str
    utter: str | None = None


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
    rejections: tuple[Rejection, ...] = ()  # a collect step's own value checks


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
    rejections: tuple[Rejection, ...] = ()  # the domain's `validation: rejections:`
    refill_utter: str | None = None  # the domain's `validation: refill_utter:` (asks again after a rejection)

    @property
    def filled_by_llm(self) -> bool:
        """Rasa CALM: slots without mappings default to from_llm; the router's slot is the router's own."""
        if self.name == ROUTER_SLOT:
            return False
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
    flows: Mapping[str, Flow]  # the assistant's own flows, then Rasa's default patterns it does not redefine
    slots: Mapping[str, Slot]  # the domain's slots over Rasa's default ones
    responses: Mapping[str, Response]  # the domain's responses (Rasa's defaults: `knows_response`)
    actions: frozenset[str] = frozenset()
    sub_agents: Mapping[str, Path] = field(default_factory=dict)  # agent name -> its sub_agents/*/config.yml
    warnings: tuple[str, ...] = ()  # what Rasa accepts with a warning; reported, never fatal
    # The YAML files flows, domain, sub-agents and NLU stories / rules were read from: what decides prompts
    # and the replay.
    files: tuple[Path, ...] = ()
    nlu: NLUSide = field(default_factory=NLUSide)  # the NLU-based system's stories and rules (coexistence)

    @property
    def coexistence(self) -> bool:
        """Whether the domain declares the coexistence routing slot (Rasa's routers need it)."""
        return ROUTER_SLOT in self.slots

    def user_flows(self) -> list[Flow]:
        """Flows a user can start: patterns (`pattern_*`) are never offered."""
        return [flow for flow in self.flows.values() if not flow.is_pattern]

    def ask_response(self, step: FlowStep) -> str:
        return step.utter or f"utter_ask_{step.target}"

    def ask_names(self, step: FlowStep) -> tuple[str, ...]:
        """What a test shows when the bot asks a collect's question: its response, and the custom action
        `action_ask_<slot>` where the domain lists one (Rasa runs it to ask instead of, or beside, a response)."""
        action = f"action_ask_{step.target}"
        return (self.ask_response(step), action) if action in self.actions else (self.ask_response(step),)

    def knows_response(self, name: str) -> bool:
        return name in self.responses or name in DEFAULT_RESPONSES

    def flow_id(self, name_or_id: str) -> str | None:
        """A flow by its id or its `name:` (how `pattern_clarification_contains` lists flows)."""
        if name_or_id in self.flows:
            return name_or_id
        return next((f.id for f in self.flows.values() if f.name == name_or_id), None)


# ------------------------------------------------------------------------------------------ flows


def _rejections(raw: Any, path: Path, owner: str) -> tuple[Rejection, ...]:
    """`rejections:` of a collect step or of a slot's `validation:`: a list of `{if, utter}`."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(r, Mapping) and r.get("if") is not None for r in raw):
        raise InputError(
            f"{where(path, raw)}: {owner}: rejections must be a list of {{if: condition, utter: response}}"
        )
    return tuple(Rejection(str(r["if"]), None if r.get("utter") is None else str(r["utter"])) for r in raw)


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
                rejections=_rejections(raw.get("rejections"), path, f"flow {flow_id!r}, step {step_id!r}"),
            )
        )
    if not steps[-1].next:  # the last step of a list (the flow's or a branch's) ends the flow, as in Rasa
        steps[-1] = replace(steps[-1], next=(Branch(None, END),))
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
        validation = spec.get("validation") or {}
        if not isinstance(validation, Mapping):
            raise InputError(f"{where(path, raw)}: slot {name!r}: validation must be a mapping")
        slots[str(name)] = Slot(
            name=str(name),
            type=str(spec.get("type", "any")),
            values=tuple(spec.get("values") or ()),
            mappings=mappings,
            initial_value=spec.get("initial_value"),
            rejections=_rejections(validation.get("rejections"), path, f"slot {name!r}"),
            refill_utter=None if validation.get("refill_utter") is None else str(validation["refill_utter"]),
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
    slots: dict[str, Slot] = {slot.name: _default_slot(slot) for slot in DEFAULT_SLOTS}
    responses: dict[str, Response] = {}
    actions: set[str] = set()
    sub_agents: dict[str, Path] = {}
    warnings: list[str] = []
    nlu_side: dict[str, set[str]] = {
        "said": set(),
        "reset_after": set(),
        "not_reset_after": set(),
        "calm_said": set(),
    }
    excluded = [p.resolve() for p in exclude]
    read: list[Path] = []
    for path in yaml_files(root):
        resolved = path.resolve()
        if any(resolved == e or e in resolved.parents for e in excluded):
            continue
        data = load_yaml(path)
        if _is_sub_agent_config(path):
            name = _sub_agent_name(data, path)
            if name in sub_agents:
                warnings.append(
                    f"{path}: sub-agent {name!r} is also declared in {sub_agents[name]}; using that one"
                )
            else:
                sub_agents[name] = path
            read.append(path)
            continue
        if isinstance(data, Mapping) and "test_cases" not in data and read_nlu_side(data, path, nlu_side):
            read.append(path)
        if not isinstance(data, Mapping) or set(data) & _IGNORED_KEYS:
            continue
        if "flows" in data or set(data) & _DOMAIN_KEYS:
            read.append(path)
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
    # Rasa's default patterns, where the assistant does not define its own (its definition overrides).
    for pattern in DEFAULT_PATTERNS:
        flows.setdefault(pattern.id, _default_pattern_flow(pattern))
    assistant = Assistant(flows, slots, responses, frozenset(actions), sub_agents)
    warnings += _check_references(assistant)
    nlu = NLUSide(
        frozenset(nlu_side["said"] - nlu_side["calm_said"]),
        frozenset(nlu_side["reset_after"] - nlu_side["not_reset_after"]),
    )
    return replace(assistant, warnings=tuple(warnings), files=tuple(read), nlu=nlu)


def _default_slot(slot: DefaultSlot) -> Slot:
    return Slot(
        slot.name,
        slot.type,
        mappings=("from_llm",) if slot.from_llm else ("controlled",),
        initial_value=slot.initial_value,
    )


def _default_pattern_flow(pattern: DefaultPattern) -> Flow:
    """A default pattern as a flow: its questions (collects) and the responses it may utter (actions)."""
    asks = [FlowStep(id=f"collect_{slot}", kind="collect", target=slot) for slot in pattern.collects]
    says = [FlowStep(id=f"say_{name}", kind="action", target=name) for name in pattern.responses]
    return Flow(pattern.id, pattern.purpose, tuple(asks + says), name=pattern.name)


def _is_sub_agent_config(path: Path) -> bool:
    """Rasa 3.14+ reads sub-agents from `sub_agents/<agent folder>/config.yml`."""
    return path.name in ("config.yml", "config.yaml") and path.parent.parent.name == "sub_agents"


def _sub_agent_name(data: Any, path: Path) -> str:
    agent = data.get("agent") if isinstance(data, Mapping) else None
    name = agent.get("name") if isinstance(agent, Mapping) else None
    if not isinstance(name, str) or not name:
        raise InputError(
            f"{where(path, data)}: a sub-agent config needs `agent: {{name: <name flows call>}}`"
        )
    return name


def _check_references(assistant: Assistant) -> list[str]:
    """Errors where Rasa rejects the assistant (one line each); the warnings where it only warns."""
    warnings: list[str] = []
    for flow in assistant.flows.values():
        ids = {s.id for s in flow.steps}
        for step in flow.steps:
            at = f"{flow.file or 'Rasa default'}: flow {flow.id!r}, step {step.id!r}"
            if step.kind == "collect" and step.target not in assistant.slots:
                raise InputError(f"{at}: collects slot {step.target!r}, which no domain file defines")
            if step.kind == "collect" and not _asks(assistant, step):
                warnings.append(
                    f"{at}: collecting {step.target!r} has neither the response {assistant.ask_response(step)!r} "
                    f"nor the action 'action_ask_{step.target}' in the domain; the bot asks nothing there "
                    "(Rasa warns too)"
                )
            if step.kind == "link" and step.target not in assistant.flows:
                raise InputError(f"{at}: links unknown flow {step.target!r}")
            if (
                step.kind == "call"
                and step.target not in assistant.flows
                and step.target not in assistant.sub_agents
            ):
                raise InputError(
                    f"{at}: calls {step.target!r}, which is neither a flow nor a sub-agent "
                    "(sub_agents/<folder>/config.yml with `agent: {name: …}`)"
                )
            for branch in step.next:
                if branch.target != END and branch.target not in ids:
                    raise InputError(f"{at}: next goes to unknown step {branch.target!r}")
    return warnings


def _asks(assistant: Assistant, step: FlowStep) -> bool:
    return any(assistant.knows_response(n) or n in assistant.actions for n in assistant.ask_names(step))


def check_test_references(assistant: Assistant, suites: Sequence[TestSuite]) -> None:
    """Tests must name flows, slots and responses the assistant has: a typo would silently mislabel data."""
    for suite in suites:
        for test in suite.test_cases:
            for step in test.steps:
                at = f"{suite.path}:{getattr(step, 'line', 0) or test.line}: test {test.name!r}"
                for name in _responses_named(step):
                    if not assistant.knows_response(name):
                        raise InputError(
                            f"{at}: response {name!r} is not in the domain; add it or fix the name"
                        )
                for flow_id, by_name in _flows_named(step):
                    known_flow = assistant.flow_id(flow_id) if by_name else flow_id in assistant.flows
                    if not known_flow and not flow_id.startswith("pattern_"):
                        known = ", ".join(f.id for f in assistant.user_flows())
                        raise InputError(f"{at}: unknown flow {flow_id!r} (flows: {known})")
                for slot in _slots_named(step):
                    if slot not in assistant.slots and slot not in INTERNAL_SLOTS:
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


def _flows_named(step: Step) -> list[tuple[str, bool]]:
    """Flows a step names, each with whether a flow's `name:` may stand for it (clarification lists names)."""
    if not isinstance(step, UserStep):
        return []
    names: list[tuple[str, bool]] = []
    for assertion in step.assertions:
        if isinstance(assertion, ClarificationContains):
            names += [(name, True) for name in assertion.flow_ids]
        elif isinstance(assertion, FlowStarted):
            names += [(flow_id, False) for flow_id in assertion.flow_ids]
        elif isinstance(assertion, FlowCompleted | FlowCancelled):
            names.append((assertion.flow_id, False))
    return names


def _slots_named(step: Step) -> list[str]:
    if isinstance(step, SlotWasSetStep | SlotWasNotSetStep):
        return [c.name for c in step.slots]
    if isinstance(step, UserStep):
        return [c.name for a in step.assertions if isinstance(a, SlotWasSet | SlotWasNotSet) for c in a.slots]
    return []
