"""Reports on what the training data covers: command types per split, and flow steps the tests exercise.

Both answer the question a user has before spending GPU hours: will the model see every kind of command,
and which parts of the assistant have no test (and therefore no training example) at all?
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ftrecipe.dataprep.assistant import Assistant, Flow, FlowStep
from ftrecipe.dataprep.commands import COMMAND_TYPES
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
    UserStep,
    UtterStep,
)
from ftrecipe.dataprep.split import DataPoint
from ftrecipe.dataprep.state import parse_set_slots_payload

# ------------------------------------------------------------------------------------------ command types


def command_type_counts(points: Iterable[DataPoint]) -> Counter[str]:
    """How many examples hold each command type (an example with two `set slot`s counts once)."""
    counts: Counter[str] = Counter()
    for point in points:
        counts.update(set(point.command_types))
    return counts


def write_command_histogram(train: Sequence[DataPoint], validation: Sequence[DataPoint], path: Path) -> None:
    """A PNG of examples per command type, train beside validation, so gaps are visible at a glance.

    Every type in `COMMAND_TYPES` gets a row, zeros included: a missing type is the point of the chart.
    Drawn with the Agg canvas (no display needed) and without the Software / date metadata, so the same
    data gives the same bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train_counts, validation_counts = command_type_counts(train), command_type_counts(validation)
    extra = sorted((set(train_counts) | set(validation_counts)) - set(COMMAND_TYPES))
    types = [*COMMAND_TYPES, *extra]
    rows = range(len(types))
    height = 0.4

    figure = Figure(figsize=(8.0, 1.6 + 0.45 * len(types)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for offset, label, counts, color in (
        (-height / 2, f"train: {len(train)} examples", train_counts, "#1f77b4"),
        (height / 2, f"validation: {len(validation)} examples", validation_counts, "#ff7f0e"),
    ):
        bars = axes.barh(
            [row + offset for row in rows], [counts[t] for t in types], height, label=label, color=color
        )
        axes.bar_label(bars, padding=3, fontsize=8)
    axes.set_yticks(list(rows), types)
    axes.invert_yaxis()  # first type on top
    axes.set_xlabel("examples containing the command type")
    axes.set_title("Command types in the fine-tuning data")
    axes.margins(x=0.12)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, fontsize=8, frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Software": None})


# ------------------------------------------------------------------------------------------ flow coverage


@dataclass(frozen=True)
class FlowCoverage:
    flow_id: str
    steps_total: int
    steps_exercised: int
    percent: float  # rounded to one decimal
    missing_step_ids: tuple[str, ...]  # in the flow's step order
    tests: int  # tests that start the flow (asserted, or through an exercised call / link)


@dataclass(frozen=True)
class _Evidence:
    """What one test shows happened, the only ground truth there is without a Rasa runtime."""

    started: frozenset[str]  # flow_started (any operator), flow_completed, flow_cancelled
    ended_at: frozenset[tuple[str, str]]  # (flow, step) from flow_completed / flow_cancelled with a step
    uttered: frozenset[str]  # responses: bot_uttered utter_name, utter steps, bot text equal to a variant
    slots_set: frozenset[str]  # slot_was_set assertions and steps, /SetSlots button payloads
    actions: frozenset[str]  # action_executed


def _evidence(assistant: Assistant, test: TestCase) -> _Evidence:
    started: set[str] = set()
    ended_at: set[tuple[str, str]] = set()
    uttered: set[str] = set()
    slots_set: set[str] = set()
    actions: set[str] = set()
    by_text = {text.strip(): r.name for r in assistant.responses.values() for text in r.texts}
    for step in test.steps:
        if isinstance(step, UtterStep):
            uttered.add(step.name)
        elif isinstance(step, BotStep) and step.text.strip() in by_text:
            uttered.add(by_text[step.text.strip()])
        elif isinstance(step, SlotWasSetStep):
            slots_set.update(check.name for check in step.slots)
        elif isinstance(step, UserStep):
            slots_set.update(parse_set_slots_payload(step.text))
            for assertion in step.assertions:
                if isinstance(assertion, FlowStarted):
                    started.update(assertion.flow_ids)
                elif isinstance(assertion, FlowCompleted | FlowCancelled):
                    started.add(assertion.flow_id)
                    if assertion.flow_step_id is not None:
                        ended_at.add((assertion.flow_id, assertion.flow_step_id))
                elif isinstance(assertion, BotUttered) and assertion.utter_name is not None:
                    uttered.add(assertion.utter_name)
                elif isinstance(assertion, SlotWasSet):
                    slots_set.update(check.name for check in assertion.slots)
                elif isinstance(assertion, ActionExecuted):
                    actions.add(assertion.action)
    return _Evidence(
        frozenset(started), frozenset(ended_at), frozenset(uttered), frozenset(slots_set), frozenset(actions)
    )


def _collect_shown(assistant: Assistant, step: FlowStep, evidence: _Evidence) -> bool:
    """The test shows the question (a response, or an `action_ask_<slot>` run) or the slot being set."""
    asked = any(name in evidence.uttered or name in evidence.actions for name in assistant.ask_names(step))
    return asked or step.target in evidence.slots_set


def _exercised_steps(assistant: Assistant, flow: Flow, evidence: _Evidence, started: set[str]) -> set[str]:
    """Steps of a flow the test started that its evidence shows; set_slots / noop inherit from later steps."""
    exercised: set[str] = set()
    for step in flow.steps:
        shown = (flow.id, step.id) in evidence.ended_at
        if step.kind == "collect":
            shown = shown or _collect_shown(assistant, step, evidence)
        elif step.kind == "action":
            target = step.target or ""
            shown = shown or target in evidence.actions
            shown = shown or (target.startswith("utter_") and target in evidence.uttered)
        elif step.kind in ("link", "call") and step.target is not None:
            shown = shown or step.target in started
            linked = assistant.flows.get(step.target)
            if linked is not None:
                shown = shown or any(_collect_shown(assistant, s, evidence) for s in linked.collect_steps())
        if shown:
            exercised.add(step.id)
    later = False
    for step in reversed(flow.steps):  # "any later step": a reverse sweep also carries chains of them
        if step.kind in ("set_slots", "noop") and later:
            exercised.add(step.id)
        later = later or step.id in exercised
    return exercised


def _test_coverage(assistant: Assistant, test: TestCase) -> dict[str, set[str]]:
    """Flows the test starts (asserted, then through exercised call / link steps) and their exercised steps."""
    evidence = _evidence(assistant, test)
    started = {flow_id for flow_id in evidence.started if flow_id in assistant.flows}
    exercised: dict[str, set[str]] = {}
    while True:
        for flow_id in sorted(started):
            flow = assistant.flows[flow_id]
            exercised[flow_id] = _exercised_steps(assistant, flow, evidence, started)
        reached = {
            step.target
            for flow_id, step_ids in exercised.items()
            for step in assistant.flows[flow_id].steps
            if step.id in step_ids and step.kind in ("link", "call") and step.target in assistant.flows
        }
        if reached <= started:
            return exercised
        started |= {flow_id for flow_id in reached if flow_id is not None}


def flow_coverage(assistant: Assistant, tests: Sequence[TestCase]) -> list[FlowCoverage]:
    """For each user flow, the steps the given (passing) tests exercise: an approximation from what they show.

    A test counts for a flow only if it starts it. In such a test a collect is exercised when its question
    is uttered or its slot set; an action when `action_executed` names it or, for an `utter_*` action, the
    response is uttered; a call / link when its target flow is started or one of the target's collects is
    exercised; any step named by `flow_completed` / `flow_cancelled` `flow_step_id`; and a set_slots / noop
    step when a later step of the flow (in list order) is. `next` conditions are not evaluated.
    """
    per_flow: dict[str, set[str]] = {flow.id: set() for flow in assistant.user_flows()}
    tests_per_flow: Counter[str] = Counter()
    for test in tests:
        for flow_id, step_ids in _test_coverage(assistant, test).items():
            if flow_id in per_flow:
                per_flow[flow_id] |= step_ids
                tests_per_flow[flow_id] += 1
    report = []
    for flow in assistant.user_flows():
        exercised = per_flow[flow.id]
        total = len(flow.steps)
        done = sum(1 for step in flow.steps if step.id in exercised)
        report.append(
            FlowCoverage(
                flow_id=flow.id,
                steps_total=total,
                steps_exercised=done,
                percent=round(100.0 * done / total, 1) if total else 100.0,
                missing_step_ids=tuple(step.id for step in flow.steps if step.id not in exercised),
                tests=tests_per_flow[flow.id],
            )
        )
    return report


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def write_flow_coverage_markdown(coverage: Sequence[FlowCoverage], path: Path) -> None:
    """A Markdown table of flow coverage, with how it is computed, for users to read beside the data."""
    lines = [
        "# Flow coverage of the passing E2E tests",
        "",
        "| flow | tests | steps exercised | % | missing steps |",
        "|---|---:|---:|---:|---|",
    ]
    for row in coverage:
        missing = ", ".join(f"`{_cell(step_id)}`" for step_id in row.missing_step_ids) or "-"
        lines.append(
            f"| `{_cell(row.flow_id)}` | {row.tests} | {row.steps_exercised}/{row.steps_total} "
            f"| {row.percent:.1f} | {missing} |"
        )
    total = sum(row.steps_total for row in coverage)
    done = sum(row.steps_exercised for row in coverage)
    percent = 100.0 * done / total if total else 100.0
    untested = [row.flow_id for row in coverage if row.tests == 0]
    lines += [
        f"| **all flows** | | {done}/{total} | {percent:.1f} | |",
        "",
        "## How this is computed",
        "",
        "There is no Rasa runtime here, so coverage is read from what each test shows. A test counts for a",
        "flow only when it starts it: a `flow_started` (either operator), `flow_completed` or `flow_cancelled`",
        "assertion names the flow, or an exercised `call` / `link` step leads to it. In such a test a `collect`",
        "step is exercised when the bot asks for its slot (`bot_uttered`, an `utter` step or the exact `bot`",
        "text of the question) or the slot is set (`slot_was_set`, a button payload); an `action` step when",
        "`action_executed` names it or, for an `utter_*` action, the response is uttered; a `call` / `link`",
        "step when its target flow is started or one of the target's collects is exercised; the step named by",
        "a `flow_completed` / `flow_cancelled` `flow_step_id`; and a `set_slots` / `noop` step when a later",
        "step of the same flow is. `next` conditions are not evaluated, and old-style tests without",
        "assertions start no flow, so real coverage can be higher than shown; a missing step is a hint to",
        "add a test, not proof that none reaches it. Patterns (`pattern_*`) are not listed.",
    ]
    if untested:
        lines += ["", "Flows no test starts: " + ", ".join(f"`{_cell(f)}`" for f in untested) + "."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
