"""Rasa end-to-end test files, read into typed values.

Accepts both styles Rasa accepts: user steps with `assertions`, and the older `bot` / `utter` /
`slot_was_set` steps. The raw mapping of every test case and suite is kept so that later stages can
write valid E2E files (train / validation suites) with fixtures, metadata and stubs intact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ftrecipe.dataprep.yamlfile import InputError, load_yaml, where, yaml_files

# ------------------------------------------------------------------------------------------ assertions


@dataclass(frozen=True)
class SlotCheck:
    """One slot in slot_was_set / slot_was_not_set; `has_value` distinguishes `value: null` from absent."""

    name: str
    value: Any = None
    has_value: bool = False


@dataclass(frozen=True)
class FlowStarted:
    flow_ids: tuple[str, ...]
    operator: Literal["any", "all"] = "all"


@dataclass(frozen=True)
class FlowCompleted:
    flow_id: str
    flow_step_id: str | None = None


@dataclass(frozen=True)
class FlowCancelled:
    flow_id: str
    flow_step_id: str | None = None


@dataclass(frozen=True)
class ClarificationContains:
    flow_ids: tuple[str, ...]
    operator: Literal["any", "all"] = "all"


@dataclass(frozen=True)
class ActionExecuted:
    action: str


@dataclass(frozen=True)
class SlotWasSet:
    slots: tuple[SlotCheck, ...]


@dataclass(frozen=True)
class SlotWasNotSet:
    slots: tuple[SlotCheck, ...]


@dataclass(frozen=True)
class Button:
    title: str
    payload: str


@dataclass(frozen=True)
class BotUttered:
    utter_name: str | None = None
    text_matches: str | None = None
    buttons: tuple[Button, ...] = ()


@dataclass(frozen=True)
class BotDidNotUtter:
    utter_name: str | None = None
    text_matches: str | None = None
    buttons: tuple[Button, ...] = ()


@dataclass(frozen=True)
class GenerativeResponseCheck:
    """generative_response_is_relevant / _is_grounded: kept in files, irrelevant to commands."""

    kind: str
    threshold: float | None = None
    utter_name: str | None = None


Assertion = (
    FlowStarted
    | FlowCompleted
    | FlowCancelled
    | ClarificationContains
    | ActionExecuted
    | SlotWasSet
    | SlotWasNotSet
    | BotUttered
    | BotDidNotUtter
    | GenerativeResponseCheck
)

# ------------------------------------------------------------------------------------------ steps


@dataclass(frozen=True)
class UserStep:
    text: str
    assertions: tuple[Assertion, ...] = ()
    metadata: str | None = None
    line: int = 0


@dataclass(frozen=True)
class BotStep:
    text: str
    line: int = 0


@dataclass(frozen=True)
class UtterStep:
    name: str
    line: int = 0


@dataclass(frozen=True)
class SlotWasSetStep:
    slots: tuple[SlotCheck, ...]
    line: int = 0


@dataclass(frozen=True)
class SlotWasNotSetStep:
    slots: tuple[SlotCheck, ...]
    line: int = 0


Step = UserStep | BotStep | UtterStep | SlotWasSetStep | SlotWasNotSetStep


@dataclass(frozen=True)
class TestCase:
    name: str
    steps: tuple[Step, ...]
    file: Path
    fixtures: tuple[str, ...] = ()
    metadata: str | None = None
    line: int = 0
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # Rasa runs tests that share a name in one file: the k-th of them (1-based) has occurrence k;
    # 0 when the name is unique in its file.
    occurrence: int = 0

    __test__ = False  # not a pytest class

    @property
    def key(self) -> str:
        """The name, with `#k` only where the file repeats it: unique within the file, original name visible."""
        return f"{self.name}#{self.occurrence}" if self.occurrence else self.name

    @property
    def id(self) -> str:
        """`<file>::<key>`, Rasa's way of naming a test across files (plus `#k` for a repeated name)."""
        return f"{self.file}::{self.key}"


@dataclass(frozen=True)
class TestSuite:
    """One E2E file: its test cases and the shared sections they may refer to."""

    path: Path
    test_cases: tuple[TestCase, ...]
    fixtures: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    stubs: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    __test__ = False

    def fixture_slots(self, test: TestCase) -> dict[str, Any]:
        """Slot values the test starts with, from its fixtures in order."""
        slots: dict[str, Any] = {}
        for name in test.fixtures:
            slots.update(self.fixtures[name])
        return slots


# ------------------------------------------------------------------------------------------ parsing


def _slot_checks(value: Any, path: Path, context: str) -> tuple[SlotCheck, ...]:
    """Both spellings Rasa accepts: `[name]`, `[{name: value}]` (steps) and `[{name, value?}]` (assertions)."""
    if not isinstance(value, list):
        raise InputError(f"{where(path, value)}: {context} must be a list of slots")
    checks = []
    for item in value:
        if isinstance(item, str):
            checks.append(SlotCheck(item))
        elif isinstance(item, Mapping) and "name" in item:
            checks.append(SlotCheck(str(item["name"]), item.get("value"), "value" in item))
        elif isinstance(item, Mapping) and len(item) == 1:
            ((name, slot_value),) = item.items()
            checks.append(SlotCheck(str(name), slot_value, True))
        else:
            raise InputError(
                f"{where(path, item)}: {context}: each slot must be a name, {{name: value}} or {{name, value}}"
            )
    return tuple(checks)


def _buttons(value: Any, path: Path) -> tuple[Button, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InputError(f"{where(path, value)}: buttons must be a list of {{title, payload}}")
    return tuple(Button(str(b.get("title", "")), str(b.get("payload", ""))) for b in value)


def _flow_ids(value: Any, path: Path, kind: str) -> tuple[tuple[str, ...], Literal["any", "all"]]:
    if isinstance(value, str):
        return (value,), "all"
    if isinstance(value, list):  # the older bare-list form: the exact set
        return tuple(str(v) for v in value), "all"
    if isinstance(value, Mapping) and "flow_ids" in value:
        operator = value.get("operator", "all")
        if operator not in ("any", "all"):
            raise InputError(f"{where(path, value)}: {kind}.operator must be any or all, not {operator!r}")
        ids = value["flow_ids"]
        ids = [ids] if isinstance(ids, str) else ids
        return tuple(str(v) for v in ids), operator
    raise InputError(f"{where(path, value)}: {kind} must be a flow id or {{operator, flow_ids}}")


def _assertion(item: Any, path: Path) -> Assertion:
    if not isinstance(item, Mapping) or len(item) != 1:
        raise InputError(f"{where(path, item)}: each assertion must be a mapping with one key")
    ((kind, value),) = item.items()
    if kind == "flow_started":
        ids, operator = _flow_ids(value, path, kind)
        return FlowStarted(ids, operator)
    if kind == "pattern_clarification_contains":
        ids, operator = _flow_ids(value, path, kind)
        return ClarificationContains(ids, operator)
    if kind in ("flow_completed", "flow_cancelled"):
        if not isinstance(value, Mapping) or "flow_id" not in value:
            raise InputError(f"{where(path, item)}: {kind} needs flow_id")
        step_id = value.get("flow_step_id")
        cls = FlowCompleted if kind == "flow_completed" else FlowCancelled
        return cls(str(value["flow_id"]), None if step_id is None else str(step_id))
    if kind == "action_executed":
        return ActionExecuted(str(value))
    if kind in ("slot_was_set", "slot_was_not_set"):
        checks = _slot_checks(value, path, kind)
        return SlotWasSet(checks) if kind == "slot_was_set" else SlotWasNotSet(checks)
    if kind in ("bot_uttered", "bot_did_not_utter"):
        if not isinstance(value, Mapping):
            raise InputError(f"{where(path, item)}: {kind} needs utter_name, text_matches or buttons")
        bot_cls = BotUttered if kind == "bot_uttered" else BotDidNotUtter
        return bot_cls(
            value.get("utter_name"), value.get("text_matches"), _buttons(value.get("buttons"), path)
        )
    if kind in ("generative_response_is_relevant", "generative_response_is_grounded"):
        value = value if isinstance(value, Mapping) else {}
        threshold = value.get("threshold")
        return GenerativeResponseCheck(
            kind, None if threshold is None else float(threshold), value.get("utter_name")
        )
    raise InputError(
        f"{where(path, item)}: unknown assertion {kind!r}; known: flow_started, flow_completed, "
        "flow_cancelled, pattern_clarification_contains, action_executed, slot_was_set, slot_was_not_set, "
        "bot_uttered, bot_did_not_utter, generative_response_is_relevant, generative_response_is_grounded"
    )


def _step(item: Any, path: Path) -> Step:
    if not isinstance(item, Mapping):
        raise InputError(f"{where(path, item)}: a step must be a mapping such as {{user: ...}}")
    line = getattr(item, "line", 0)
    if "user" in item:
        assertions = item.get("assertions") or []
        if not isinstance(assertions, list):
            raise InputError(f"{where(path, item)}: assertions must be a list")
        return UserStep(
            str(item["user"]),
            tuple(_assertion(a, path) for a in assertions),
            None if item.get("metadata") is None else str(item["metadata"]),
            line,
        )
    if "bot" in item:
        return BotStep(str(item["bot"]), line)
    if "utter" in item:
        return UtterStep(str(item["utter"]), line)
    if "slot_was_set" in item:
        return SlotWasSetStep(_slot_checks(item["slot_was_set"], path, "slot_was_set"), line)
    if "slot_was_not_set" in item:
        return SlotWasNotSetStep(_slot_checks(item["slot_was_not_set"], path, "slot_was_not_set"), line)
    keys = ", ".join(map(str, item))
    raise InputError(
        f"{where(path, item)}: unknown step ({keys}); a step is one of user, bot, utter, slot_was_set, "
        "slot_was_not_set"
    )


def _named_sections(value: Any, path: Path, section: str) -> dict[str, Mapping[str, Any]]:
    """`fixtures:` / `metadata:` are lists of one-key mappings: [{name: content}]."""
    if value is None:
        return {}
    if not isinstance(value, list):
        raise InputError(f"{where(path, value)}: {section} must be a list of {{name: ...}}")
    named: dict[str, Mapping[str, Any]] = {}
    for item in value:
        if not isinstance(item, Mapping) or len(item) != 1:
            raise InputError(f"{where(path, item)}: each {section} entry must be {{name: ...}}")
        ((name, content),) = item.items()
        if section == "fixtures":
            slots: dict[str, Any] = {}
            for slot in content or []:
                if not isinstance(slot, Mapping):
                    raise InputError(
                        f"{where(path, item)}: fixture {name!r} must list {{slot: value}} mappings"
                    )
                slots.update(slot)
            named[str(name)] = slots
        else:
            named[str(name)] = dict(content or {})
    return named


# A file with only these sections is a test file whose test cases are all commented out.
_SHARED_SECTIONS = frozenset({"fixtures", "metadata", "stub_custom_actions"})


def _without_test_cases(data: Any) -> str | None:
    """Why a file holds no test cases (Rasa skips such a file), or None when it may hold some."""
    if data is None or (isinstance(data, Mapping) and not data):
        return "empty (or all commented out)"
    if not isinstance(data, Mapping):
        return None
    if "test_cases" in data:
        return "`test_cases:` is empty" if data["test_cases"] in (None, []) else None
    if set(map(str, data)) <= _SHARED_SECTIONS:
        return "no `test_cases:` (commented out?)"
    return None


def _numbered(cases: list[TestCase]) -> tuple[TestCase, ...]:
    """Number the tests whose name the file repeats (1, 2, … in file order); unique names stay as they are."""
    counts = Counter(case.name for case in cases)
    seen: Counter[str] = Counter()
    numbered = []
    for case in cases:
        if counts[case.name] > 1:
            seen[case.name] += 1
            case = replace(case, occurrence=seen[case.name])
        numbered.append(case)
    return tuple(numbered)


def read_test_suite(path: Path) -> TestSuite:
    """One E2E file; a file without test cases (empty, all commented out) gives a suite with none."""
    data = load_yaml(path)
    if _without_test_cases(data) is not None:
        raw = data if isinstance(data, Mapping) else {}
        return TestSuite(path, (), raw=raw)
    if not isinstance(data, Mapping) or "test_cases" not in data:
        raise InputError(f"{path}: not an E2E test file: the top level needs `test_cases:`")
    fixtures = _named_sections(data.get("fixtures"), path, "fixtures")
    metadata = _named_sections(data.get("metadata"), path, "metadata")
    stubs = data.get("stub_custom_actions") or {}
    cases = []
    for raw in data["test_cases"] or []:
        if not isinstance(raw, Mapping) or "test_case" not in raw or "steps" not in raw:
            raise InputError(f"{where(path, raw)}: each test case needs `test_case` and `steps`")
        name = str(raw["test_case"])
        used = raw.get("fixtures") or []
        for fixture in used:
            if fixture not in fixtures:
                known = ", ".join(sorted(fixtures)) or "none defined"
                raise InputError(
                    f"{where(path, raw)}: test {name!r} uses unknown fixture {fixture!r} ({known})"
                )
        case_metadata = raw.get("metadata")
        if case_metadata is not None and case_metadata not in metadata:
            raise InputError(f"{where(path, raw)}: test {name!r} uses unknown metadata {case_metadata!r}")
        steps = raw["steps"]
        if not isinstance(steps, list) or not steps:
            raise InputError(f"{where(path, raw)}: test {name!r} needs a non-empty list of steps")
        cases.append(
            TestCase(
                name=name,
                steps=tuple(_step(step, path) for step in steps),
                file=path,
                fixtures=tuple(str(f) for f in used),
                metadata=None if case_metadata is None else str(case_metadata),
                line=getattr(raw, "line", 0),
                raw=raw,
            )
        )
    return TestSuite(path, _numbered(cases), fixtures, metadata, stubs, data)


@dataclass(frozen=True)
class SkippedFile:
    """A test file without test cases: skipped, as Rasa does, and reported."""

    path: Path
    reason: str

    def note(self, base: Path | None = None) -> str:
        shown = self.path
        if base is not None and self.path.resolve().is_relative_to(base.resolve()):
            shown = self.path.resolve().relative_to(base.resolve())
        return f"{shown}: skipped, no test cases: {self.reason}"


@dataclass(frozen=True)
class E2ETests:
    suites: tuple[TestSuite, ...]  # files with at least one test case, in stable order
    skipped: tuple[SkippedFile, ...] = ()

    @property
    def num_test_cases(self) -> int:
        return sum(len(suite.test_cases) for suite in self.suites)


def scan_e2e_tests(paths: Sequence[Path]) -> E2ETests:
    """Every E2E file below the given files or folders. Test names may repeat, within a file and across
    files, as Rasa allows: a test is known by file, name and occurrence (`TestCase.id`)."""
    suites: list[TestSuite] = []
    skipped: list[SkippedFile] = []
    for root in paths:
        if not root.exists():
            raise InputError(f"{root}: no such file or folder of E2E tests")
        files = yaml_files(root)
        if not files:
            raise InputError(f"{root}: no .yml or .yaml files found")
        for file in files:
            suite = read_test_suite(file)
            if suite.test_cases:
                suites.append(suite)
            else:
                skipped.append(SkippedFile(file, _without_test_cases(suite.raw) or "no test cases"))
    return E2ETests(tuple(suites), tuple(skipped))


def read_e2e_tests(paths: Sequence[Path]) -> list[TestSuite]:
    """The E2E files below the given files or folders that hold test cases (see `scan_e2e_tests`)."""
    return list(scan_e2e_tests(paths).suites)
