"""Coverage reports: command types per split (a PNG) and flow steps the passing tests exercise."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ftrecipe.dataprep import e2e
from ftrecipe.dataprep.assistant import Assistant, load_assistant
from ftrecipe.dataprep.coverage import (
    FlowCoverage,
    command_type_counts,
    flow_coverage,
    write_command_histogram,
    write_flow_coverage_markdown,
)
from ftrecipe.dataprep.split import DataPoint

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "moneybank"

# ------------------------------------------------------------------------------------------ command types


def point(*types: str) -> DataPoint:
    return DataPoint("prompt", "output", "f.yml::t", "hi", None, types)


def test_command_type_counts_count_examples() -> None:
    counts = command_type_counts([point("start flow", "set slot"), point("set slot", "set slot"), point()])
    assert counts == {"start flow": 1, "set slot": 2}


def test_histogram_is_a_deterministic_png(tmp_path: Path) -> None:
    train = [point("start flow", "set slot")] * 12 + [point("cancel flow")] * 3
    validation = [point("set slot")] * 4
    first, second = tmp_path / "plots" / "a.png", tmp_path / "b.png"
    write_command_histogram(train, validation, first)
    write_command_histogram(train, validation, second)
    data = first.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert data == second.read_bytes()
    write_command_histogram(train, [], second)  # an empty side still draws, with zeros
    assert second.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert second.read_bytes() != data


# ------------------------------------------------------------------------------------------ flow coverage

FLOWS = """
flows:
  transfer:
    description: Send money.
    steps:
      - id: start
        noop: true
        next: ask_recipient
      - id: ask_recipient
        collect: recipient
      - id: ask_amount
        collect: amount
        utter: utter_how_much
      - id: mark
        set_slots:
          - paid: false
      - id: pay
        action: action_pay
      - id: done
        action: utter_done
      - id: to_verify
        call: verify
  verify:
    description: Verify who the user is.
    steps:
      - id: ask_pin
        collect: pin
      - id: check
        action: action_check_pin
  tour:
    description: Show the tour.
    steps:
      - id: hop
        link: verify
  close_account:
    description: Close the account.
    steps:
      - id: ask_confirm
        collect: confirm
  pattern_chitchat:
    description: small talk
    steps:
      - action: utter_free
"""

DOMAIN = """
slots:
  recipient: {type: text}
  amount: {type: float}
  pin: {type: text}
  confirm: {type: bool}
  paid: {type: bool, mappings: [{type: controlled}]}
responses:
  utter_ask_recipient: [{text: "Who gets it?"}]
  utter_how_much: [{text: "How much?"}]
  utter_done: [{text: Done.}]
  utter_ask_pin: [{text: "What is your PIN?"}]
  utter_ask_confirm: [{text: "Sure?"}]
  utter_free: [{text: ok}]
actions:
  - action_pay
  - action_check_pin
"""

TESTS = """
test_cases:
  # transfer: recipient set, amount asked, pay executed; start (noop) and mark (set_slots) precede them.
  - test_case: t1
    steps:
      - user: send money to Ann
        assertions:
          - flow_started: transfer
          - slot_was_set:
              - {name: recipient, value: Ann}
          - bot_uttered: {utter_name: utter_how_much}
      - user: "50"
        assertions:
          - slot_was_set:
              - {name: amount, value: 50}
          - action_executed: action_pay
  # `any` starts both flows; the bot text asks for verify's PIN: the call, the link and verify itself.
  - test_case: t2
    steps:
      - user: I want to pay
        assertions:
          - flow_started: {operator: any, flow_ids: [transfer, tour]}
      - bot: What is your PIN?
      - user: "1234"
  # Never starts verify: setting its slot and running its action count for nothing.
  - test_case: t3
    steps:
      - user: hello
        assertions:
          - slot_was_set:
              - {name: pin, value: "1"}
          - action_executed: action_check_pin
  # A button sets the PIN; the flow_step_id of flow_completed marks `check`.
  - test_case: t4
    steps:
      - user: verify me
        assertions:
          - flow_started: verify
      - user: /SetSlots(pin=42)
        assertions:
          - flow_completed: {flow_id: verify, flow_step_id: check}
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")


@pytest.fixture
def assistant_and_tests(tmp_path: Path) -> tuple[Assistant, dict[str, e2e.TestCase]]:
    write(tmp_path / "data" / "flows.yml", FLOWS)
    write(tmp_path / "domain.yml", DOMAIN)
    write(tmp_path / "e2e_tests" / "t.yml", TESTS)
    assistant = load_assistant(tmp_path, exclude=(tmp_path / "e2e_tests",))
    suite = e2e.read_test_suite(tmp_path / "e2e_tests" / "t.yml")
    return assistant, {test.name: test for test in suite.test_cases}


def by_flow(rows: list[FlowCoverage]) -> dict[str, FlowCoverage]:
    return {row.flow_id: row for row in rows}


def test_flow_coverage_by_hand(assistant_and_tests: tuple[Assistant, dict[str, e2e.TestCase]]) -> None:
    assistant, tests = assistant_and_tests
    rows = flow_coverage(assistant, list(tests.values()))
    assert [row.flow_id for row in rows] == ["transfer", "verify", "tour", "close_account"]  # no patterns
    assert by_flow(rows) == {
        # t1: start, ask_recipient, ask_amount, mark, pay; t2: start, mark, to_verify. Never: done.
        "transfer": FlowCoverage("transfer", 7, 6, 85.7, ("done",), 2),
        # t2 (through the call and the link) asks for the PIN; t4 sets it and completes at `check`.
        "verify": FlowCoverage("verify", 2, 2, 100.0, (), 2),
        "tour": FlowCoverage("tour", 1, 1, 100.0, (), 1),
        "close_account": FlowCoverage("close_account", 1, 0, 0.0, ("ask_confirm",), 0),
    }


def test_a_test_that_never_starts_a_flow_does_not_count(
    assistant_and_tests: tuple[Assistant, dict[str, e2e.TestCase]],
) -> None:
    assistant, tests = assistant_and_tests
    verify = by_flow(flow_coverage(assistant, [tests["t3"]]))["verify"]
    assert verify == FlowCoverage("verify", 2, 0, 0.0, ("ask_pin", "check"), 0)
    # t1 alone: nothing of verify shown, so the call step stays missing and verify is not started.
    rows = by_flow(flow_coverage(assistant, [tests["t1"]]))
    assert rows["transfer"].missing_step_ids == ("done", "to_verify")
    assert rows["verify"].tests == 0


def test_flow_coverage_markdown(
    assistant_and_tests: tuple[Assistant, dict[str, e2e.TestCase]], tmp_path: Path
) -> None:
    assistant, tests = assistant_and_tests
    path = tmp_path / "report" / "flow_coverage.md"
    write_flow_coverage_markdown(flow_coverage(assistant, list(tests.values())), path)
    text = path.read_text(encoding="utf-8")
    assert "| flow | tests | steps exercised | % | missing steps |" in text
    assert "| `transfer` | 2 | 6/7 | 85.7 | `done` |" in text
    assert "| `verify` | 2 | 2/2 | 100.0 | - |" in text
    assert "| `tour` | 1 | 1/1 | 100.0 | - |" in text
    assert "| `close_account` | 0 | 0/1 | 0.0 | `ask_confirm` |" in text
    assert "| **all flows** | | 9/11 | 81.8 | |" in text
    assert "## How this is computed" in text
    assert "Flows no test starts: `close_account`." in text


def test_flow_coverage_of_the_example() -> None:
    assistant = load_assistant(EXAMPLE, exclude=(EXAMPLE / "e2e_tests", EXAMPLE / "e2e_tests_legacy"))
    suites = e2e.read_e2e_tests([EXAMPLE / "e2e_tests"])
    rows = flow_coverage(assistant, [test for suite in suites for test in suite.test_cases])
    assert [row.flow_id for row in rows] == [flow.id for flow in assistant.user_flows()]
    for row in rows:
        assert row.tests >= 1, row
        assert 0.0 <= row.percent <= 100.0
        assert row.steps_exercised + len(row.missing_step_ids) == row.steps_total
