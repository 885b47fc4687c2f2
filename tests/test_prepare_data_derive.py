"""`--annotator assertions`: the derived commands pass the check the LLM's answers pass (`shown_problems`).
When the bot next asks a question of one user flow that is not active and that the asserted commands
neither start nor continue, Rasa only asks it because the message started that flow: `start flow F` joins
the label, provided the replay with it asks exactly the slot the test shows next (else the message filled
an earlier slot of F that the assertions do not show, and the turn stays undetermined).

The fixture assistant (a tea shop) is written here for these tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ftrecipe.dataprep.pipeline import PrepareDataOptions, prepare_data

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


async def prepare(tmp_path: Path) -> tuple[dict[str, Any], dict[str, list[str]], list[dict[str, Any]]]:
    """prepare-data offline on the tea shop: the summary, each test's labels, and the failed tests."""
    root = tmp_path / "teashop"
    write(root / "domain.yml", DOMAIN)
    write(root / "data" / "flows.yml", FLOWS)
    write(root / "e2e_tests" / "tea.yml", TESTS)
    out = tmp_path / "out"
    options = PrepareDataOptions(
        e2e_paths=(root / "e2e_tests",),
        assistant=root,
        annotator="assertions",
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
