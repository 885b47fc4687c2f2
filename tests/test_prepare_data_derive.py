"""`--annotator assertions`: the derived commands pass the check the LLM's answers pass (`shown_problems`).
When the bot next asks a question of one user flow that is not active and that the asserted commands
neither start nor continue, Rasa only asks it because the message started that flow: `start flow F` joins
the label, provided the replay with it asks exactly the slot the test shows next (else the message filled
an earlier slot of F that the assertions do not show, and the turn stays undetermined).

The fixture assistant (a tea shop) is written here for these tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from ftrecipe.dataprep.annotate import Annotator
from ftrecipe.dataprep.pipeline import PrepareDataOptions, prepare_data
from support.llm_server import ChatRequest, LLMServer

FLOWS = """\
flows:
  order_tea:
    name: order tea
    description: Order a pot of tea for delivery.
    steps:
      - collect: tea
        description: the kind of tea
      - collect: cups
        description: how many cups
      - collect: address
        description: where the tea is delivered
      - action: utter_tea_ordered
  book_table:
    name: book a table
    description: Book a table in the tea room.
    steps:
      - collect: guests
      - collect: time
  plan_afternoon:
    name: plan an afternoon
    description: Plan an afternoon tea with a table booking.
    steps:
      - call: book_table
      - action: utter_enjoy
  track_order:
    name: track an order
    description: Tell the user where their order is.
    steps:
      - collect: order_number
      - action: utter_order_on_its_way
"""

DOMAIN = """\
version: "3.1"
slots:
  tea:
    type: text
    mappings:
      - type: from_llm
  cups:
    type: float
    mappings:
      - type: from_llm
  address:
    type: text
    mappings:
      - type: from_llm
  guests:
    type: float
    mappings:
      - type: from_llm
  time:
    type: text
    mappings:
      - type: from_llm
  order_number:
    type: text
    mappings:
      - type: from_llm
responses:
  utter_ask_tea:
    - text: Which tea would you like?
  utter_ask_cups:
    - text: How many cups?
  utter_ask_address:
    - text: Where should we deliver it?
  utter_ask_guests:
    - text: For how many people?
  utter_ask_time:
    - text: At what time?
  utter_enjoy:
    - text: Enjoy your afternoon.
  utter_ask_order_number:
    - text: What is your order number?
  utter_tea_ordered:
    - text: Your {tea} is on its way to {address}.
  utter_order_on_its_way:
    - text: Your order is on its way.
"""

TESTS = """\
test_cases:
  - test_case: the tea is named when the flow starts
    steps:
      # slot_was_set tea + the next question of order_tea, which no flow_started asserts: Rasa asks
      # for the cups only because the message started order_tea.
      - user: a green tea please
        assertions:
          - slot_was_set:
              - tea: green
          - bot_uttered:
              utter_name: utter_ask_cups
      # order_tea is active: its next question needs no start.
      - user: three cups
        assertions:
          - slot_was_set:
              - cups: 3
          - bot_uttered:
              utter_name: utter_ask_address

  - test_case: only the question is asserted
    steps:
      # No slot asserted: the bot asks order_tea's first question, so the message only started it.
      - user: I'd like some tea
        assertions:
          - bot_uttered:
              utter_name: utter_ask_tea

  - test_case: nothing is asserted while the flow is active
    steps:
      - user: tea, please
        assertions:
          - bot_uttered:
              utter_name: utter_ask_tea
      # order_tea is active: nothing says what the message did, and nothing is started.
      - user: oolong
        assertions:
          - bot_uttered:
              utter_name: utter_ask_cups

  - test_case: an earlier slot was filled but not asserted
    steps:
      # The bot asks for the cups: the message also named the tea, which the assertions do not show.
      - user: two cups of jasmine to Elm Street 5
        assertions:
          - slot_was_set:
              - address: Elm Street 5
          - bot_uttered:
              utter_name: utter_ask_cups

  - test_case: two flows ask the question
    steps:
      # book_table asks for the time, and so does plan_afternoon, which calls it: which one started?
      - user: a table for four
        assertions:
          - slot_was_set:
              - guests: 4
          - bot_uttered:
              utter_name: utter_ask_time
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


async def prepare(
    tmp_path: Path,
    tests: str = TESTS,
    annotator: Annotator = "assertions",
    llm_config: Path | None = None,
    flows: str = FLOWS,
    domain: str = DOMAIN,
) -> tuple[dict[str, Any], dict[str, list[str]], list[dict[str, Any]]]:
    """prepare-data on the tea shop (offline unless told): the summary, each test's labels, the failed tests."""
    root = tmp_path / "teashop"
    write(root / "domain.yml", domain)
    write(root / "data" / "flows.yml", flows)
    write(root / "e2e_tests" / "tea.yml", tests)
    out = tmp_path / "out"
    options = PrepareDataOptions(
        e2e_paths=(root / "e2e_tests",),
        assistant=root,
        llm_config=llm_config,
        annotator=annotator,
        num_rephrases=0,
        out=out,
        cache_dir=tmp_path / "cache",
    )
    result = await prepare_data(options)
    labels: dict[str, list[str]] = {}
    for line in (out / "3_llm_finetune_data" / "llm_ft_data.jsonl").read_text().splitlines():
        record = json.loads(line)
        labels.setdefault(record["original_test_name"].rsplit("::", 1)[-1], []).append(record["output"])
    failures = yaml.safe_load((out / "1_command_annotations" / "failed_test_cases.yml").read_text())
    return result.summary, labels, list(failures["failed_test_cases"])


async def test_the_next_question_of_a_flow_that_is_not_active_starts_it(tmp_path: Path) -> None:
    summary, labels, failures = await prepare(tmp_path)

    assert labels["the tea is named when the flow starts"] == [
        "start flow order_tea\nset slot tea green",
        "set slot cups 3",
    ]
    assert labels["only the question is asserted"] == ["start flow order_tea"]
    assert set(labels) == {"the tea is named when the flow starts", "only the question is asserted"}

    # The second turn asks a question of the active flow: no start flow, and the turn stays undetermined.
    reasons = {f["test_case"]: (f["turn_index"], f["user_message"], f["actual"]) for f in failures}
    assert reasons == {
        "nothing is asserted while the flow is active": (
            1,
            "oolong",
            "assertions do not determine the commands: the assertions do not say what the user's message did",
        ),
        "an earlier slot was filled but not asserted": (
            0,
            "two cups of jasmine to Elm Street 5",
            "assertions do not determine the commands: the bot then asks utter_ask_cups of order_tea, "
            "which the asserted commands neither start nor continue (starting it, the bot would ask tea, "
            "not cups: the message may have filled slots the assertions do not show)",
        ),
        "two flows ask the question": (
            0,
            "a table for four",
            "assertions do not determine the commands: the bot then asks utter_ask_time of book_table, "
            "which the asserted commands neither start nor continue, and plan_afternoon reach it by "
            "link / call: the assertions do not say which flow started",
        ),
    }
    assert summary["num_input_e2e_tests"] == 5
    assert summary["num_annotated_conversations"] == 2


# A flow's end resets the slots it collected: Rasa logs SlotSet(slot, None), which `value: null` asserts
# (Rasa's SlotWasSetAssertion looks for a SlotSet event with that value; only an absent `value` means "any").
# For a slot filled before the turn no command says that, so it asks no `set slot`; an empty slot is only
# reset after the turn set it (a refused value), and a slot named without a value needs a `set slot` anyway.
RESET_TESTS = """\
test_cases:
  - test_case: the flow's end resets its slots
    steps:
      - user: I'd like some tea
        assertions:
          - flow_started: order_tea
      - user: green
        assertions:
          - slot_was_set:
              - name: tea
                value: green
      - user: three
        assertions:
          - slot_was_set:
              - name: cups
                value: 3
      - user: Elm Street 5
        assertions:
          - slot_was_set:
              - name: address
                value: Elm Street 5
          - flow_completed:
              flow_id: order_tea
          - slot_was_set:
              - name: tea
                value: null
              - name: cups
                value: null

  # tea is empty when the bot asks for it: Rasa resets it to None only after the message set it and the
  # value was refused (here by a validation the tea shop does not show), so some set slot of tea is needed.
  - test_case: an empty slot is asserted reset to null
    steps:
      - user: I'd like some tea
        assertions:
          - flow_started: order_tea
      - user: a tea from the moon
        assertions:
          - slot_was_set:
              - name: tea
                value: null
          - bot_uttered:
              utter_name: utter_ask_tea

  - test_case: a slot is named without a value
    steps:
      - user: I'd like some tea
        assertions:
          - flow_started: order_tea
      - user: green
        assertions:
          - slot_was_set:
              - name: tea
"""

TEACHER = {
    "I'd like some tea": "start flow order_tea",
    "green": "set slot tea green",
    "three": "set slot cups 3",
    "Elm Street 5": "set slot address Elm Street 5",
    "a tea from the moon": "cannot handle",
}


def teacher(request: ChatRequest) -> str:
    """The commands for the prompt's last user message (ftrecipe's v2 template quotes it)."""
    match = re.search(r'the user\'s last message, "(.*)", one per line', request.prompt)
    assert match is not None
    return TEACHER[match.group(1)]


async def test_a_slot_asserted_reset_to_null_needs_a_set_slot_only_if_it_was_empty(tmp_path: Path) -> None:
    summary, labels, failures = await prepare(tmp_path, RESET_TESTS)

    assert labels == {
        "the flow's end resets its slots": [
            "start flow order_tea",
            "set slot tea green",
            "set slot cups 3",
            "set slot address Elm Street 5",
        ]
    }
    assert [(f["test_case"], f["turn_index"], f["actual"]) for f in failures] == [
        (
            "an empty slot is asserted reset to null",
            1,
            "assertions do not determine the commands: slot_was_set tea is null, set and refused: the value "
            "the user gave is unsaid",
        ),
        (
            "a slot is named without a value",
            1,
            "assertions do not determine the commands: slot_was_set tea has no value",
        ),
    ]
    assert summary["num_annotated_conversations"] == 1


async def test_the_llm_need_not_set_a_filled_slot_asserted_reset_to_null(
    tmp_path: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    llm_server.script(teacher)
    summary, labels, failures = await prepare(tmp_path, RESET_TESTS, "llm", llm_config)

    assert llm_server.script_errors == []
    assert labels["the flow's end resets its slots"][-1] == "set slot address Elm Street 5"
    assert labels["a slot is named without a value"] == ["start flow order_tea", "set slot tea green"]
    assert [(f["test_case"], f["turn_index"], f["actual"]) for f in failures] == [
        ("an empty slot is asserted reset to null", 1, "cannot handle\n(missing a `set slot` of tea)")
    ]
    assert summary["num_annotated_conversations"] == 2


# A branch on what a custom action sets, with no stub: the replay cannot evaluate it, but the question the
# test shows next is where only one branch stops, so that is the branch Rasa (running the action) took.
CAKE_FLOWS = """\
flows:
  order_cake:
    description: Order a cake for pick-up.
    steps:
      - id: ask_cake
        collect: cake
        description: the kind of cake
      - action: action_check_stock
        next:
          - if: not slots.cake_in_stock
            then:
              - action: utter_sold_out
              - set_slots:
                  - cake: null
                next: ask_cake
          - else: ask_pickup
      - id: ask_pickup
        collect: pickup_time
        description: when the cake is picked up
"""

CAKE_DOMAIN = """\
version: "3.1"
slots:
  cake:
    type: text
    mappings:
      - type: from_llm
  cake_in_stock:
    type: bool
    mappings:
      - type: controlled
  pickup_time:
    type: text
    mappings:
      - type: from_llm
actions:
  - action_check_stock
responses:
  utter_ask_cake:
    - text: Which cake would you like?
  utter_ask_pickup_time:
    - text: When will you pick it up?
  utter_sold_out:
    - text: Sorry, that one is sold out.
"""

CAKE_TESTS = """\
test_cases:
  - test_case: the bot goes on to the pick-up time
    steps:
      - user: a lemon cake please
        assertions:
          - flow_started: order_cake
          - slot_was_set:
              - name: cake
                value: lemon
          - bot_uttered:
              utter_name: utter_ask_pickup_time
      - user: at five
        assertions:
          - slot_was_set:
              - name: pickup_time
                value: at five

  # The other branch: the cake is sold out, the flow empties `cake` itself and asks for it again, so the
  # asked slot having just been set is no sign the label is wrong.
  - test_case: the cake is sold out
    steps:
      - user: a lemon cake please
        assertions:
          - flow_started: order_cake
          - slot_was_set:
              - name: cake
                value: lemon
          - bot_uttered:
              utter_name: utter_sold_out
          - bot_uttered:
              utter_name: utter_ask_cake
      - user: a plum cake then
        assertions:
          - slot_was_set:
              - name: cake
                value: plum
          - bot_uttered:
              utter_name: utter_ask_pickup_time

  - test_case: the test does not show what comes next
    steps:
      - user: a lemon cake please
        assertions:
          - flow_started: order_cake
          - slot_was_set:
              - name: cake
                value: lemon
"""


async def test_the_question_the_test_shows_next_decides_a_branch_the_replay_cannot(tmp_path: Path) -> None:
    summary, labels, failures = await prepare(tmp_path, CAKE_TESTS, flows=CAKE_FLOWS, domain=CAKE_DOMAIN)

    assert labels == {
        "the bot goes on to the pick-up time": [
            "start flow order_cake\nset slot cake lemon",
            "set slot pickup_time at five",
        ],
        "the cake is sold out": ["start flow order_cake\nset slot cake lemon", "set slot cake plum"],
    }
    assert [(f["test_case"], f["turn_index"], f["actual"]) for f in failures] == [
        (
            "the test does not show what comes next",
            0,
            "flow 'order_cake', step '2_action': cannot decide `not slots.cake_in_stock`: slot 'cake_in_stock' "
            "is set by custom actions, and action_check_stock ran without a stub (and its branches lead to "
            "different steps)",
        )
    ]
    assert summary["num_annotated_conversations"] == 2
