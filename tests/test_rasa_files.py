"""Reading Rasa's E2E tests, flows and domain: every syntax Rasa accepts, and one clear line for bad input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ftrecipe.dataprep.assistant import END, load_assistant
from ftrecipe.dataprep.e2e import (
    ActionExecuted,
    BotDidNotUtter,
    BotStep,
    BotUttered,
    Button,
    ClarificationContains,
    FlowCancelled,
    FlowCompleted,
    FlowStarted,
    GenerativeResponseCheck,
    SlotCheck,
    SlotWasNotSet,
    SlotWasNotSetStep,
    SlotWasSet,
    SlotWasSetStep,
    UserStep,
    UtterStep,
    read_e2e_tests,
    read_test_suite,
    scan_e2e_tests,
)
from ftrecipe.dataprep.yamlfile import InputError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


EVERY_ASSERTION = """
fixtures:
  - premium_user:
      - membership: premium
      - balance: 1200.5
metadata:
  - web_channel:
      channel: web
stub_custom_actions:
  action_check_balance:
    events:
      - {event: slot, name: balance, value: 100}
    responses:
      - text: "Your balance is 100"
  transfer_with_everything::action_check_balance:
    events: []
    responses: []
test_cases:
  - test_case: transfer_with_everything
    fixtures: [premium_user]
    metadata: web_channel
    steps:
      - user: send 50 to John
        metadata: web_channel
        assertion_order_enabled: true
        assertions:
          - flow_started: transfer_money
          - flow_started:
              operator: any
              flow_ids: [transfer_money, add_payee]
          - slot_was_set:
              - name: amount
                value: 50
              - name: recipient
          - slot_was_not_set:
              - name: confirm
          - bot_uttered:
              utter_name: utter_ask_confirm
              buttons:
                - {title: "Yes", payload: "/SetSlots(confirm=true)"}
          - bot_did_not_utter:
              text_matches: "error.*"
          - action_executed: action_check_balance
          - pattern_clarification_contains: [a_flow, b_flow]
          - pattern_clarification_contains:
              operator: all
              flow_ids: [c_flow]
          - flow_completed: {flow_id: transfer_money, flow_step_id: done}
          - flow_cancelled: {flow_id: add_payee}
          - generative_response_is_relevant: {threshold: 0.9, utter_name: utter_free}
          - generative_response_is_grounded: {threshold: 0.5}
      - bot: "Do you confirm?"
      - utter: utter_ask_confirm
      - slot_was_set:
          - confirm: true
          - recipient
      - slot_was_not_set:
          - amount
      - user: /SetSlots(confirm=true)
"""


def test_every_step_and_assertion_kind(tmp_path: Path) -> None:
    suite = read_test_suite(write(tmp_path / "tests.yml", EVERY_ASSERTION))
    (test,) = suite.test_cases
    assert test.fixtures == ("premium_user",)
    assert test.metadata == "web_channel"
    assert suite.fixture_slots(test) == {"membership": "premium", "balance": 1200.5}
    assert suite.metadata == {"web_channel": {"channel": "web"}}
    assert set(suite.stubs) == {"action_check_balance", "transfer_with_everything::action_check_balance"}
    user = test.steps[0]
    assert isinstance(user, UserStep)
    assert user.metadata == "web_channel"
    assert user.line == 22
    assert user.assertions == (
        FlowStarted(("transfer_money",), "all"),
        FlowStarted(("transfer_money", "add_payee"), "any"),
        SlotWasSet((SlotCheck("amount", 50, True), SlotCheck("recipient"))),
        SlotWasNotSet((SlotCheck("confirm"),)),
        BotUttered("utter_ask_confirm", None, (Button("Yes", "/SetSlots(confirm=true)"),)),
        BotDidNotUtter(None, "error.*"),
        ActionExecuted("action_check_balance"),
        ClarificationContains(("a_flow", "b_flow"), "all"),
        ClarificationContains(("c_flow",), "all"),
        FlowCompleted("transfer_money", "done"),
        FlowCancelled("add_payee"),
        GenerativeResponseCheck("generative_response_is_relevant", 0.9, "utter_free"),
        GenerativeResponseCheck("generative_response_is_grounded", 0.5, None),
    )
    assert [type(s) for s in test.steps[1:]] == [
        BotStep,
        UtterStep,
        SlotWasSetStep,
        SlotWasNotSetStep,
        UserStep,
    ]
    slot_step = test.steps[3]
    assert isinstance(slot_step, SlotWasSetStep)
    assert slot_step.slots == (SlotCheck("confirm", True, True), SlotCheck("recipient"))
    assert test.id.endswith("tests.yml::transfer_with_everything")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("test_cases:\n  - test_case: a\n    steps:\n      - usr: hi\n", "tests.yml:4: unknown step (usr)"),
        (
            "test_cases:\n  - test_case: a\n    steps: []\n",
            "tests.yml:2: test 'a' needs a non-empty list of steps",
        ),
        (
            "test_cases:\n  - steps:\n      - user: hi\n",
            "tests.yml:2: each test case needs `test_case` and `steps`",
        ),
        (
            "test_cases:\n  - test_case: a\n    steps:\n      - user: hi\n        assertions:\n          - flow_begun: x\n",
            "tests.yml:6: unknown assertion 'flow_begun'",
        ),
        (
            "test_cases:\n  - test_case: a\n    fixtures: [nope]\n    steps:\n      - user: hi\n",
            "tests.yml:2: test 'a' uses unknown fixture 'nope'",
        ),
        ("test_cases:\n  - test_case: a\n    steps:\n      - user: [hi\n", "tests.yml:4: invalid YAML"),
        ("flows: {}\n", "not an E2E test file"),
        (
            "test_cases:\n  - test_case: a\n    steps:\n      - user: hi\n        assertions:\n"
            "          - flow_started: {operator: some, flow_ids: [x]}\n",
            "operator must be any or all",
        ),
    ],
)
def test_bad_e2e_files_get_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "tests.yml", text)
    with pytest.raises(InputError) as caught:
        read_test_suite(path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_repeated_test_names_are_told_apart_by_file_and_occurrence(tmp_path: Path) -> None:
    """Rasa runs tests that share a name, in one file and across files: ours reads them all."""
    write(
        tmp_path / "e2e" / "a.yml",
        "test_cases:\n"
        "  - test_case: same\n    steps:\n      - user: hi\n"
        "  - test_case: other\n    steps:\n      - user: ho\n"
        "  - test_case: same\n    steps:\n      - user: hey\n",
    )
    write(
        tmp_path / "e2e" / "sub" / "b.yml", "test_cases:\n  - test_case: same\n    steps:\n      - user: yo\n"
    )
    a, b = read_e2e_tests([tmp_path / "e2e"])
    assert [t.name for t in a.test_cases] == ["same", "other", "same"]
    assert [t.key for t in a.test_cases] == ["same#1", "other", "same#2"]
    assert [t.line for t in a.test_cases] == [2, 5, 8]
    assert [t.key for t in b.test_cases] == ["same"]  # unique in its own file: no suffix
    ids = [t.id for t in (*a.test_cases, *b.test_cases)]
    assert ids == [
        f"{tmp_path}/e2e/a.yml::same#1",
        f"{tmp_path}/e2e/a.yml::other",
        f"{tmp_path}/e2e/a.yml::same#2",
        f"{tmp_path}/e2e/sub/b.yml::same",
    ]


def test_files_without_test_cases_are_skipped_with_the_reason(tmp_path: Path) -> None:
    folder = tmp_path / "e2e"
    write(folder / "a_empty.yml", "")
    write(folder / "b_commented.yml", "# test_cases:\n#  - test_case: x\n#    steps:\n#      - user: hi\n")
    write(folder / "c_empty_list.yml", "test_cases: []\n")
    write(folder / "d_null.yml", "test_cases:\n#  - test_case: x\n")
    write(folder / "e_fixtures_only.yml", "fixtures:\n  - f:\n      - s: 1\n# test_cases:\n")
    write(folder / "f_real.yml", "test_cases:\n  - test_case: real\n    steps:\n      - user: hi\n")
    scanned = scan_e2e_tests([folder])
    assert [s.path.name for s in scanned.suites] == ["f_real.yml"]
    assert scanned.num_test_cases == 1
    assert [(s.path.name, s.reason) for s in scanned.skipped] == [
        ("a_empty.yml", "empty (or all commented out)"),
        ("b_commented.yml", "empty (or all commented out)"),
        ("c_empty_list.yml", "`test_cases:` is empty"),
        ("d_null.yml", "`test_cases:` is empty"),
        ("e_fixtures_only.yml", "no `test_cases:` (commented out?)"),
    ]
    assert (
        scanned.skipped[0].note(tmp_path)
        == "e2e/a_empty.yml: skipped, no test cases: empty (or all commented out)"
    )
    assert [s.path.name for s in read_e2e_tests([folder])] == ["f_real.yml"]
    # Other YAML in a test folder stays an error.
    write(folder / "g_flows.yml", "flows: {}\n")
    with pytest.raises(InputError, match=r"g_flows\.yml: not an E2E test file"):
        scan_e2e_tests([folder])


def test_folders_are_searched_recursively_in_stable_order(tmp_path: Path) -> None:
    write(tmp_path / "e2e" / "z.yml", "test_cases:\n  - test_case: z\n    steps:\n      - user: hi\n")
    write(tmp_path / "e2e" / "a" / "b.yaml", "test_cases:\n  - test_case: b\n    steps:\n      - user: hi\n")
    suites = read_e2e_tests([tmp_path / "e2e"])
    assert [s.path.name for s in suites] == ["b.yaml", "z.yml"]


def test_missing_e2e_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder of E2E tests"):
        read_e2e_tests([tmp_path / "nope"])


# ------------------------------------------------------------------------------------------ assistant

FLOWS_A = """
flows:
  transfer_money:
    name: send money
    description: Send money to someone.
    persisted_slots: [recipient]
    steps:
      - collect: recipient
        description: who gets the money
      - collect: amount
        description: how much
        reset_after_flow_ends: false
      - collect: confirm
        ask_before_filling: true
        next:
          - if: slots.confirm
            then:
              - action: action_transfer
                next: END
          - else: cancelled
      - id: cancelled
        action: utter_cancelled
  pattern_chitchat:
    description: small talk
    steps:
      - action: utter_free
"""

FLOWS_B = """
flows:
  check_balance:
    description: Tell the balance.
    if: slots.logged_in
    always_include_in_prompt: true
    steps:
      - call: verify
      - set_slots:
          - shown: true
      - noop: true
        next: done
      - id: done
        link: transfer_money
  verify:
    description: Verify the user.
    steps:
      - collect: birthday
        utter: utter_when_born
"""

DOMAIN = """
version: "3.1"
slots:
  recipient: {type: text, mappings: [{type: from_llm}]}
  amount: {type: float, mappings: [{type: from_llm}]}
  confirm: {type: bool, mappings: [{type: from_llm}]}
  birthday: {type: text}
  shown: {type: bool, mappings: [{type: controlled}]}
  logged_in: {type: bool, initial_value: true, mappings: [{type: controlled}]}
  account: {type: categorical, values: [checking, savings], mappings: [{type: from_llm}]}
"""

RESPONSES = """
responses:
  utter_ask_recipient:
    - text: Who should get the money?
  utter_ask_amount:
    - text: How much?
  utter_ask_confirm:
    - text: Send {amount} to {recipient}?
      buttons:
        - {title: "Yes", payload: "/SetSlots(confirm=true)"}
        - {title: "No", payload: "/SetSlots(confirm=false)"}
  utter_when_born:
    - text: When were you born?
  utter_cancelled:
    - text: Cancelled.
  utter_free:
    - text: ok
actions:
  - action_transfer
"""


def make_assistant(root: Path) -> Path:
    write(root / "data" / "flows" / "money.yml", FLOWS_A)
    write(root / "data" / "more" / "balance.yaml", FLOWS_B)
    write(root / "domain" / "slots.yml", DOMAIN)
    write(root / "domain" / "responses.yml", RESPONSES)
    write(root / "config.yml", "recipe: default.v1\npipeline:\n  - name: CompactLLMCommandGenerator\n")
    write(root / "endpoints.yml", "model_groups: []\n")
    write(root / "e2e_tests" / "t.yml", "test_cases:\n  - test_case: a\n    steps:\n      - user: hi\n")
    return root


def test_multi_file_assistant(tmp_path: Path) -> None:
    assistant = load_assistant(make_assistant(tmp_path))
    own = {flow.id for flow in assistant.flows.values() if flow.file is not None}  # the rest: Rasa's defaults
    assert own == {"transfer_money", "pattern_chitchat", "check_balance", "verify"}
    assert [f.id for f in assistant.user_flows()] == ["transfer_money", "check_balance", "verify"]
    transfer = assistant.flows["transfer_money"]
    assert transfer.name == "send money"
    assert transfer.persisted_slots == ("recipient",)
    assert [s.target for s in transfer.collect_steps()] == ["recipient", "amount", "confirm"]
    confirm = transfer.step("3_collect")
    assert confirm is not None
    assert confirm.ask_before_filling
    # The inline `then` list became a step of the flow, reachable from the branch.
    (then_branch, else_branch) = confirm.next
    assert then_branch.condition == "slots.confirm"
    inline = transfer.step(then_branch.target)
    assert inline is not None
    assert inline.kind == "action"
    assert inline.next[0].target == END
    assert else_branch.condition is None
    assert else_branch.target == "cancelled"
    assert not transfer.step("2_collect").reset_after_flow_ends  # type: ignore[union-attr]
    balance = assistant.flows["check_balance"]
    assert balance.condition == "slots.logged_in"
    assert balance.always_include_in_prompt
    assert [s.kind for s in balance.steps] == ["call", "set_slots", "noop", "link"]
    assert balance.steps[1].set_slots == {"shown": True}
    assert assistant.slots["amount"].type == "float"
    assert assistant.slots["confirm"].allowed_values() == [True, False]
    assert assistant.slots["account"].allowed_values() == ["checking", "savings"]
    assert assistant.slots["shown"].filled_by_llm is False
    assert assistant.slots["birthday"].filled_by_llm  # no mappings: from_llm in CALM
    assert assistant.slots["logged_in"].initial_value is True
    assert assistant.responses["utter_ask_confirm"].buttons[0] == ("Yes", "/SetSlots(confirm=true)")
    assert assistant.ask_response(assistant.flows["verify"].collect_steps()[0]) == "utter_when_born"
    assert "action_transfer" in assistant.actions


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (
            lambda root: write(root / "data" / "x.yml", "flows:\n  f:\n    steps:\n      - action: a\n"),
            "flow 'f' needs a description",
        ),
        (
            lambda root: write(
                root / "data" / "x.yml",
                "flows:\n  f:\n    description: d\n    steps:\n      - collect: nope\n",
            ),
            "collects slot 'nope', which no domain file defines",
        ),
        # A collect without a question is a warning now (Rasa runs it): tests/test_rasa_assistants.py.
        (
            lambda root: write(
                root / "data" / "x.yml",
                "flows:\n  f:\n    description: d\n    steps:\n      - link: nowhere\n",
            ),
            "links unknown flow 'nowhere'",
        ),
        (
            lambda root: write(
                root / "data" / "x.yml",
                "flows:\n  f:\n    description: d\n    steps:\n      - action: a\n        next: missing\n",
            ),
            "next goes to unknown step 'missing'",
        ),
        (
            lambda root: write(
                root / "data" / "x.yml", "flows:\n  f:\n    description: d\n    steps:\n      - noop: true\n"
            ),
            "a noop step needs `next`",
        ),
        (
            lambda root: write(
                root / "data" / "x.yml",
                "flows:\n  transfer_money:\n    description: d\n    steps:\n      - action: a\n",
            ),
            "flow 'transfer_money' is also defined in",
        ),
        (
            lambda root: write(
                root / "data" / "x.yml",
                "flows:\n  f:\n    description: d\n    steps:\n      - {action: a, link: b}\n",
            ),
            "a step needs exactly one of",
        ),
    ],
)
def test_bad_assistant_files_get_one_line(tmp_path: Path, break_it: object, message: str) -> None:
    make_assistant(tmp_path)
    break_it(tmp_path)  # type: ignore[operator]
    with pytest.raises(InputError) as caught:
        load_assistant(tmp_path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_assistant_without_flows(tmp_path: Path) -> None:
    write(tmp_path / "domain.yml", DOMAIN)
    with pytest.raises(InputError, match="no flows found"):
        load_assistant(tmp_path)
