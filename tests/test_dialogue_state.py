"""Replaying E2E tests: the state the prompt sees at each user turn, and how assertions become labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ftrecipe.dataprep.annotate import derive_commands, expectations, problems
from ftrecipe.dataprep.assistant import Assistant, load_assistant
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
)
from ftrecipe.dataprep.e2e import TestSuite, read_test_suite
from ftrecipe.dataprep.prompt import default_template
from ftrecipe.dataprep.state import Turn, conversation, parse_set_slots_payload
from test_rasa_files import make_assistant, write

CORRECTION_AND_CANCEL = """
fixtures:
  - logged_in_user:
      - account: savings
test_cases:
  - test_case: correction_then_cancel
    fixtures: [logged_in_user]
    steps:
      - user: send money to Ann
        assertions:
          - flow_started: transfer_money
          - slot_was_set:
              - {name: recipient, value: Ann}
          - bot_uttered: {utter_name: utter_ask_amount}
      - user: "40"
        assertions:
          - slot_was_set:
              - {name: amount, value: 40.0}
          - bot_uttered: {utter_name: utter_ask_confirm}
      - user: no wait, make it 50
        assertions:
          - flow_started: pattern_correction
          - slot_was_set:
              - {name: amount, value: 50}
          - bot_uttered: {utter_name: utter_ask_confirm}
      - user: stop, I don't want this anymore
        assertions:
          - flow_cancelled: {flow_id: transfer_money}
      - user: how's the weather?
        assertions:
          - flow_started: pattern_chitchat
"""


@pytest.fixture
def assistant(tmp_path: Path) -> Assistant:
    return load_assistant(
        make_assistant(tmp_path / "bot"), exclude=((tmp_path / "bot" / "e2e_tests").resolve(),)
    )


def replay_with_derived(
    assistant: Assistant, suite: TestSuite, name: str
) -> list[tuple[Turn, list[Command]]]:
    test = next(t for t in suite.test_cases if t.name == name)
    replay = conversation(assistant, suite, test)
    seen: list[tuple[Turn, list[Command]]] = []
    turn = next(replay)
    while True:
        derived = derive_commands(turn, assistant, "v2")
        assert not isinstance(derived, str), derived
        seen.append((turn, derived))
        try:
            turn = replay.send(derived)
        except StopIteration:
            return seen


def test_state_at_each_turn_of_a_correction_and_a_cancellation(tmp_path: Path, assistant: Assistant) -> None:
    suite = read_test_suite(write(tmp_path / "t.yml", CORRECTION_AND_CANCEL))
    turns = replay_with_derived(assistant, suite, "correction_then_cancel")
    state = [
        (t.text, t.current_flow, t.asked_slot, {k: t.slots_before[k] for k in ("recipient", "amount")})
        for t, _ in turns
    ]
    assert state == [
        ("send money to Ann", None, None, {"recipient": None, "amount": None}),
        ("40", "transfer_money", "amount", {"recipient": "Ann", "amount": None}),
        ("no wait, make it 50", "transfer_money", "confirm", {"recipient": "Ann", "amount": 40.0}),
        (
            "stop, I don't want this anymore",
            "transfer_money",
            "confirm",
            {"recipient": "Ann", "amount": 50.0},
        ),
        # Cancelled: recipient is persisted and amount keeps its value (reset_after_flow_ends: false).
        ("how's the weather?", None, None, {"recipient": "Ann", "amount": 50.0}),
    ]
    assert [commands for _, commands in turns] == [
        [StartFlow("transfer_money"), SetSlot("recipient", "Ann")],
        [SetSlot("amount", "40")],
        [SetSlot("amount", "50")],
        [CancelFlow()],
        [ChitChat()],
    ]
    assert turns[0][0].slots_before["account"] == "savings"  # from the fixture
    assert turns[0][0].slots_before["logged_in"] is True  # initial_value from the domain
    variables = turns[3][0].variables
    assert variables["current_conversation"].splitlines() == [
        "USER: send money to Ann",
        "AI: How much?",
        "USER: 40",
        "AI: Send 40.0 to Ann?",
        "USER: no wait, make it 50",
        "AI: Send 50.0 to Ann?",
        "USER: stop, I don't want this anymore",
    ]
    assert variables["current_slot"] == "confirm"
    assert variables["current_slot_type"] == "bool"
    assert variables["current_slot_allowed_values"] == [True, False]
    assert [(s["name"], s["value"]) for s in variables["flow_slots"]] == [
        ("recipient", "Ann"),
        ("amount", 50.0),
        ("confirm", None),
    ]
    assert variables["flow_slots"][0]["description"] == "who gets the money"
    assert variables["user_message"] == "stop, I don't want this anymore"
    # Patterns are never offered; ask-before-filling slots only once asked.
    first_flows = {
        f["name"]: [s["name"] for s in f["slots"]] for f in turns[0][0].variables["available_flows"]
    }
    assert first_flows == {
        "transfer_money": ["recipient", "amount"],
        "check_balance": ["birthday"],
        "verify": ["birthday"],
    }
    later_flows = {f["name"]: [s["name"] for s in f["slots"]] for f in variables["available_flows"]}
    assert later_flows["transfer_money"] == ["recipient", "amount", "confirm"]
    rendered = default_template("v2").render(variables)
    assert "Active flow: transfer_money" in rendered
    assert '"stop, I don\'t want this anymore"' in rendered


BUTTONS_AND_OLD_STEPS = """
test_cases:
  - test_case: old_style_with_button
    steps:
      - user: I'd like to send 20 to Bo
      - utter: utter_ask_confirm
      - user: /SetSlots(confirm=true)
      - bot: Cancelled.
      - user: what's my balance
      - slot_was_set:
          - shown: true
      - utter: utter_when_born
      - user: 1990-01-02
"""


def test_old_style_steps_and_button_payloads(tmp_path: Path, assistant: Assistant) -> None:
    suite = read_test_suite(write(tmp_path / "t.yml", BUTTONS_AND_OLD_STEPS))
    (test,) = suite.test_cases
    replay = conversation(assistant, suite, test)
    first = next(replay)
    assert first.text == "I'd like to send 20 to Bo"
    assert first.next_asks == ("confirm",)
    second = replay.send([StartFlow("transfer_money"), SetSlot("recipient", "Bo"), SetSlot("amount", "20")])
    # The button click made no turn: it set `confirm`, which finished and reset the transfer.
    assert second.text == "what's my balance"
    assert second.current_flow is None
    assert second.slots_before["confirm"] is None
    assert second.variables["current_conversation"].splitlines() == [
        "USER: I'd like to send 20 to Bo",
        "AI: Send 20.0 to Bo?",
        "USER: /SetSlots(confirm=true)",
        "AI: Cancelled.",
        "USER: what's my balance",
    ]
    third = replay.send([StartFlow("check_balance")])
    assert third.current_flow == "check_balance"
    assert third.asked_slot == "birthday"  # from `utter: utter_when_born`, the collect step's own utter
    assert third.slots_before["shown"] is True
    with pytest.raises(StopIteration):
        replay.send([SetSlot("birthday", "1990-01-02")])


def test_user_texts_replace_messages_for_rephrased_conversations(
    tmp_path: Path, assistant: Assistant
) -> None:
    suite = read_test_suite(write(tmp_path / "t.yml", CORRECTION_AND_CANCEL))
    (test,) = suite.test_cases
    replay = conversation(assistant, suite, test, user_texts={0: "pls wire cash to Ann"})
    first = next(replay)
    second = replay.send([StartFlow("transfer_money"), SetSlot("recipient", "Ann")])
    assert first.text == "pls wire cash to Ann"
    assert second.variables["current_conversation"].startswith("USER: pls wire cash to Ann\n")


@pytest.mark.parametrize(
    ("payload", "slots"),
    [
        ("/SetSlots(confirm=true)", {"confirm": "true"}),
        ("/SetSlots(a=1, b='x y')", {"a": "1", "b": "x y"}),
        ("/greet", {}),
    ],
)
def test_button_payloads(payload: str, slots: dict[str, str]) -> None:
    assert parse_set_slots_payload(payload) == slots


# ------------------------------------------------------------------------------------------ assertion rules

ONE_TURN = """
test_cases:
  - test_case: t
    steps:
      - user: the message
        assertions:
{assertions}
"""


def first_turn(
    tmp_path: Path, assistant: Assistant, assertions: str, slots: dict[str, Any] | None = None
) -> Turn:
    indented = "\n".join("          " + line for line in assertions.strip().splitlines())
    suite = read_test_suite(write(tmp_path / "one.yml", ONE_TURN.format(assertions=indented)))
    turn = next(conversation(assistant, suite, suite.test_cases[0]))
    if slots:
        turn = Turn(**{**turn.__dict__, "slots_before": {**turn.slots_before, **slots}})
    return turn


@pytest.mark.parametrize(
    ("assertions", "derived"),
    [
        ("- flow_started: transfer_money", [StartFlow("transfer_money")]),
        ("- flow_started:\n    operator: all\n    flow_ids: [transfer_money]", [StartFlow("transfer_money")]),
        ("- flow_started: pattern_chitchat", [ChitChat()]),
        ("- flow_started: pattern_search", [SearchAndReply()]),
        ("- flow_started: pattern_human_handoff", [HumanHandoff()]),
        ("- flow_started: pattern_skip_question", [SkipQuestion()]),
        ("- flow_started: pattern_repeat_bot_messages", [RepeatLastBotMessages()]),
        ("- flow_started: pattern_cannot_handle", [CannotHandle()]),
        (
            "- pattern_clarification_contains: [transfer_money, check_balance]",
            [Clarify(("check_balance", "transfer_money"))],
        ),
        (
            "- pattern_clarification_contains:\n    operator: all\n    flow_ids: [check_balance, transfer_money]",
            [Clarify(("check_balance", "transfer_money"))],
        ),
        ("- flow_cancelled: {flow_id: transfer_money}", [CancelFlow()]),
        (
            "- flow_started: transfer_money\n- slot_was_set:\n  - {name: amount, value: 2400.0}\n"
            "  - {name: recipient, value: Jo}",
            [StartFlow("transfer_money"), SetSlot("amount", "2400"), SetSlot("recipient", "Jo")],
        ),
        # Controlled slots are set by actions, not by the command generator.
        (
            "- flow_started: check_balance\n- slot_was_set:\n  - {name: shown, value: true}",
            [StartFlow("check_balance")],
        ),
        # verify is `call`ed by check_balance: it starts without a command of its own.
        ("- flow_started: check_balance\n- flow_started: verify", [StartFlow("check_balance")]),
    ],
)
def test_assertions_determine_commands(
    tmp_path: Path, assistant: Assistant, assertions: str, derived: list[Command]
) -> None:
    turn = first_turn(tmp_path, assistant, assertions)
    assert derive_commands(turn, assistant, "v2") == derived
    assert problems(turn, derived, assistant, "v2") == []


def test_v3_folds_chitchat_into_search(tmp_path: Path, assistant: Assistant) -> None:
    turn = first_turn(tmp_path, assistant, "- flow_started: pattern_chitchat")
    assert derive_commands(turn, assistant, "v3") == [SearchAndReply()]


@pytest.mark.parametrize(
    ("assertions", "reason"),
    [
        ("- action_executed: action_transfer", "do not say what the user's message did"),
        ("- flow_started:\n    operator: any\n    flow_ids: [transfer_money, check_balance]", "operator any"),
        ("- slot_was_set:\n  - name: amount", "slot_was_set amount has no value"),
        ("- flow_started: pattern_correction", "correction"),
    ],
)
def test_undetermined_assertions_say_why(
    tmp_path: Path, assistant: Assistant, assertions: str, reason: str
) -> None:
    turn = first_turn(tmp_path, assistant, assertions)
    derived = derive_commands(turn, assistant, "v2")
    assert isinstance(derived, str)
    assert reason in derived


@pytest.mark.parametrize(
    ("assertions", "commands", "problem"),
    [
        (
            "- flow_started: transfer_money",
            [StartFlow("check_balance")],
            "missing `start flow transfer_money`",
        ),
        ("- slot_was_set:\n  - {name: amount, value: 2400}", [SetSlot("amount", "2,400.00")], None),
        (
            "- slot_was_set:\n  - {name: recipient, value: John Smith}",
            [SetSlot("recipient", "john  smith")],
            None,
        ),
        (
            "- slot_was_set:\n  - {name: amount, value: 2400}",
            [SetSlot("amount", "240")],
            "missing `set slot amount 2400`",
        ),
        ("- slot_was_set:\n  - name: amount", [SetSlot("amount", "3")], None),
        ("- slot_was_set:\n  - name: amount", [], "missing a `set slot` of amount"),
        (
            "- flow_started:\n    operator: any\n    flow_ids: [transfer_money, check_balance]",
            [StartFlow("check_balance")],
            None,
        ),
        (
            "- flow_started:\n    operator: any\n    flow_ids: [transfer_money, check_balance]",
            [ChitChat()],
            "missing a start of one of transfer_money, check_balance",
        ),
        (
            "- pattern_clarification_contains: [transfer_money, check_balance]",
            [Clarify(("check_balance", "transfer_money", "verify"))],
            None,
        ),
        (
            "- pattern_clarification_contains: [transfer_money, check_balance]",
            [StartFlow("transfer_money")],
            "missing `disambiguate flows check_balance transfer_money`",
        ),
        ("- flow_cancelled: {flow_id: transfer_money}", [CannotHandle()], "missing `cancel flow`"),
        ("- flow_started: pattern_human_handoff", [ChitChat()], "missing `hand over`"),
        ("- flow_started: pattern_correction", [SetSlot("recipient", "Bo")], None),
        ("- flow_started: pattern_correction", [SetSlot("amount", "5")], "no already filled slot"),
        # The bot asks for amount right after: a command that filled it disagrees with the test.
        (
            "- bot_uttered: {utter_name: utter_ask_amount}\n- flow_started: transfer_money",
            [StartFlow("transfer_money"), SetSlot("amount", "10")],
            "sets amount, but the bot asks for amount",
        ),
    ],
)
def test_llm_commands_checked_against_assertions(
    tmp_path: Path, assistant: Assistant, assertions: str, commands: list[Command], problem: str | None
) -> None:
    turn = first_turn(tmp_path, assistant, assertions, slots={"recipient": "Al"})
    found = problems(turn, commands, assistant, "v2")
    if problem is None:
        assert found == []
    else:
        assert any(problem in p for p in found), found


def test_generative_assertions_are_ignored(tmp_path: Path, assistant: Assistant) -> None:
    turn = first_turn(
        tmp_path,
        assistant,
        "- flow_started: pattern_search\n- generative_response_is_relevant: {threshold: 0.8}",
    )
    assert expectations(turn, assistant).required == (SearchAndReply(),)


STUBBED = """
stub_custom_actions:
  action_transfer:
    events:
      - {event: slot, name: account, value: checking}
  stubbed::action_transfer:
    events:
      - {event: slot, name: account, value: savings}
test_cases:
  - test_case: stubbed
    steps:
      - user: send 5 to Al
        assertions:
          - flow_started: transfer_money
          - action_executed: action_transfer
      - user: thanks
        assertions:
          - flow_started: pattern_chitchat
  - test_case: other
    steps:
      - user: send 5 to Al
        assertions:
          - flow_started: transfer_money
          - action_executed: action_transfer
      - user: thanks
        assertions:
          - flow_started: pattern_chitchat
"""


@pytest.mark.parametrize(("name", "account"), [("stubbed", "savings"), ("other", "checking")])
def test_stubbed_actions_set_slots_per_test_stub_first(
    tmp_path: Path, assistant: Assistant, name: str, account: str
) -> None:
    suite = read_test_suite(write(tmp_path / "t.yml", STUBBED))
    turns = replay_with_derived(assistant, suite, name)
    assert turns[1][0].slots_before["account"] == account


def test_flows_that_only_link_to_each_other_do_not_spin(tmp_path: Path) -> None:
    root = tmp_path / "loop"
    write(
        root / "flows.yml",
        """
flows:
  ping:
    description: ping
    steps:
      - link: pong
  pong:
    description: pong
    steps:
      - link: ping
""",
    )
    write(root / "domain.yml", "responses:\n  utter_x:\n    - text: x\n")
    assistant = load_assistant(root)
    suite = read_test_suite(
        write(
            tmp_path / "t.yml",
            """
test_cases:
  - test_case: loop
    steps:
      - user: ping
        assertions:
          - flow_started: ping
      - user: again
        assertions:
          - flow_started: pattern_chitchat
""",
        )
    )
    turns = replay_with_derived(assistant, suite, "loop")
    assert [t.text for t, _ in turns] == ["ping", "again"]
