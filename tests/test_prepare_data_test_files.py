"""prepare-data on test folders as real assistants have them: repeated test names (in one file and across
files), files whose tests are all commented out, and legacy-style tests (bot / utter / slot_was_set steps,
no assertions) checked against what the LLM answers."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from ftrecipe.dataprep.e2e import read_test_suite
from ftrecipe.dataprep.pipeline import PrepareDataOptions, prepare_data
from ftrecipe.dataprep.progress import LineReporter
from support.files import read, write
from support.llm_server import ChatRequest, LLMServer

FLOWS = """
flows:
  order_coffee:
    name: order a coffee
    description: Order a coffee to take away, in a size and with a kind of milk.
    steps:
      - id: ask_size
        collect: coffee_size
        description: the size of the coffee, small, medium or large
      - id: ask_milk
        collect: milk
        description: the kind of milk in the coffee
      - id: ordered
        action: utter_coffee_ordered
  check_opening_hours:
    name: check opening hours
    description: Tell the user when the café is open.
    steps:
      - action: utter_opening_hours
"""

DOMAIN = """
version: "3.1"
slots:
  coffee_size:
    type: categorical
    values: [small, medium, large]
    mappings:
      - type: from_llm
  milk:
    type: text
    mappings:
      - type: from_llm
responses:
  utter_ask_coffee_size:
    - text: Which size would you like?
  utter_ask_milk:
    - text: Which milk would you like?
  utter_coffee_ordered:
    - text: Your {coffee_size} coffee is on its way.
  utter_opening_hours:
    - text: We are open from 7 to 19.
"""

# Three tests named "orders a coffee" in one file (the second one the LLM gets wrong), and a fourth in
# another folder, in a file of the same name.
ORDERS = """
test_cases:
  - test_case: orders a coffee
    steps:
      - user: a large coffee please
        assertions:
          - flow_started: order_coffee
          - slot_was_set:
              - name: coffee_size
                value: large
          - bot_uttered:
              utter_name: utter_ask_milk
      - user: oat milk
        assertions:
          - slot_was_set:
              - name: milk
                value: oat milk
  - test_case: asks when the café opens
    steps:
      - user: when are you open?
        assertions:
          - flow_started: check_opening_hours
  - test_case: orders a coffee
    steps:
      - user: a small coffee please
        assertions:
          - flow_started: order_coffee
          - slot_was_set:
              - name: coffee_size
                value: small
  - test_case: orders a coffee
    steps:
      - user: one small coffee
        assertions:
          - flow_started: order_coffee
          - slot_was_set:
              - name: coffee_size
                value: small
      - user: soy milk
        assertions:
          - slot_was_set:
              - name: milk
                value: soy milk
"""

MORE_ORDERS = """
test_cases:
  - test_case: orders a coffee
    steps:
      - user: a medium coffee please
        assertions:
          - flow_started: order_coffee
          - slot_was_set:
              - name: coffee_size
                value: medium
"""

DISABLED = """
# Waiting for a fix in the bot.
#test_cases:
#  - test_case: orders tea
#    steps:
#      - user: a tea please
"""

EMPTY_LIST = """
test_cases:
#  - test_case: orders tea
#    steps:
#      - user: a tea please
"""

LEGACY = """
test_cases:
  - test_case: legacy coffee
    steps:
      - user: I'd like a coffee
      - utter: utter_ask_coffee_size
      - user: medium
      - slot_was_set:
          - coffee_size: medium
      - bot: Which milk would you like?
      - user: almond milk
      - slot_was_set:
          - milk: almond milk
      - bot: Your medium coffee is on its way.

  - test_case: legacy wrong flow
    steps:
      - user: what are your opening hours
      - utter: utter_opening_hours

  - test_case: legacy missing slot
    steps:
      - user: I'd like a large coffee
      - slot_was_set:
          - coffee_size: large
      - utter: utter_ask_milk

  - test_case: legacy fills the asked slot
    steps:
      - user: a large oat milk coffee
      - bot: Which milk would you like?

  - test_case: legacy not set
    steps:
      - user: I want a coffee
      - utter: utter_ask_coffee_size
      - user: whatever, surprise me
      - slot_was_not_set:
          - coffee_size

  - test_case: legacy cancel
    steps:
      - user: I'd like a coffee
      - utter: utter_ask_coffee_size
      - user: forget it
      - slot_was_not_set:
          - coffee_size

  - test_case: legacy cancelled too early
    steps:
      - user: I'd like a coffee
      - utter: utter_ask_coffee_size
      - user: stop, no wait, small
      - slot_was_set:
          - coffee_size: small
      - utter: utter_ask_milk
"""

# What the scripted command generator answers to each user message (the prompt ends with it, quoted).
ANSWERS = {
    "a large coffee please": "start flow order_coffee\nset slot coffee_size large",
    "oat milk": "set slot milk oat milk",
    "when are you open?": "start flow check_opening_hours",
    "a small coffee please": "start flow check_opening_hours",  # wrong: fails orders a coffee#2
    "one small coffee": "start flow order_coffee\nset slot coffee_size small",
    "soy milk": "set slot milk soy milk",
    "a medium coffee please": "start flow order_coffee\nset slot coffee_size medium",
    "I'd like a coffee": "start flow order_coffee",
    "medium": "set slot coffee_size medium",
    "almond milk": "set slot milk almond milk",
    "what are your opening hours": "start flow order_coffee",  # wrong flow
    "I'd like a large coffee": "start flow order_coffee",  # the size is missing
    "a large oat milk coffee": "start flow order_coffee\nset slot coffee_size large\nset slot milk oat milk",
    "I want a coffee": "start flow order_coffee",
    "whatever, surprise me": "set slot coffee_size large",  # the test shows it stays unset
    "forget it": "cancel flow",
    "stop, no wait, small": "cancel flow",  # the test shows the order goes on
}

ORDERS_FILE = "cafe/e2e/orders/coffee.yml"
MORE_FILE = "cafe/e2e/more/coffee.yml"
LEGACY_FILE = "cafe/e2e/legacy.yml"


@pytest.fixture
def cafe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The café assistant and its tests; the working directory is tmp_path, so outputs name `cafe/...`."""
    write(tmp_path / "cafe" / "data" / "flows.yml", FLOWS)
    write(tmp_path / "cafe" / "domain.yml", DOMAIN)
    write(tmp_path / ORDERS_FILE, ORDERS)
    write(tmp_path / MORE_FILE, MORE_ORDERS)
    write(tmp_path / LEGACY_FILE, LEGACY)
    write(tmp_path / "cafe" / "e2e" / "disabled.yml", DISABLED)
    write(tmp_path / "cafe" / "e2e" / "empty_list.yml", EMPTY_LIST)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "cafe"


def answer(request: ChatRequest) -> str:
    match = re.search(r'last message, "(.*)", one per line', request.prompt)
    assert match is not None, request.prompt[-300:]
    return ANSWERS[match.group(1)]


def options(cafe: Path, **changes: Any) -> PrepareDataOptions:
    values: dict[str, Any] = {
        "e2e_paths": (Path("cafe/e2e"),),
        "assistant": Path("cafe"),
        "out": cafe.parent / "out",
        "cache_dir": cafe.parent / "cache",
        "num_rephrases": 0,
        "concurrency": 2,
    }
    values.update(changes)
    return PrepareDataOptions(**values)


SKIPPED = [
    "cafe/e2e/disabled.yml: skipped, no test cases: empty (or all commented out)",
    "cafe/e2e/empty_list.yml: skipped, no test cases: `test_cases:` is empty",
]


async def test_llm_path_names_repeated_tests_apart_and_checks_legacy_tests(
    cafe: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    llm_server.script(answer)
    logs = io.StringIO()
    result = await prepare_data(options(cafe, llm_config=llm_config), LineReporter(logs))
    out = cafe.parent / "out"
    summary = read(out / "result_summary.yaml")

    # Counts: 4 + 1 + 7 test cases in three files; two files skipped, each with a note.
    assert summary["num_input_e2e_tests"] == 12
    assert summary["num_annotated_conversations"] == 6
    assert summary["num_failed_conversations"] == 6
    assert summary["skipped_test_files"] == SKIPPED
    for note in SKIPPED:
        assert note in logs.getvalue()
    assert "orders a coffee#2: FAILED" in logs.getvalue()

    # Stage 1: each repeated name keeps its name, with #k where its file repeats it.
    annotations = out / "1_command_annotations"
    assert sorted(p.name for p in annotations.glob("*.yml")) == [
        "coffee.yml",
        "failed_test_cases.yml",
        "legacy.yml",
        "orders_coffee.yml",
    ]
    assert [c["original_test_case"] for c in read(annotations / "orders_coffee.yml")["conversations"]] == [
        f"{ORDERS_FILE}::orders a coffee#1",
        f"{ORDERS_FILE}::asks when the café opens",
        f"{ORDERS_FILE}::orders a coffee#3",
    ]
    assert [c["original_test_case"] for c in read(annotations / "coffee.yml")["conversations"]] == [
        f"{MORE_FILE}::orders a coffee"
    ]
    legacy, cancel = read(annotations / "legacy.yml")["conversations"]
    assert legacy["original_test_case"] == f"{LEGACY_FILE}::legacy coffee"
    assert [s.get("llm_commands") for s in legacy["steps"] if "user" in s] == [
        ["start flow order_coffee"],
        ["set slot coffee_size medium"],
        ["set slot milk almond milk"],
    ]
    assert cancel["original_test_case"] == f"{LEGACY_FILE}::legacy cancel"
    assert [s.get("llm_commands") for s in cancel["steps"] if "user" in s] == [
        ["start flow order_coffee"],
        ["cancel flow"],
    ]

    failures = {f["test_case"]: f for f in read(annotations / "failed_test_cases.yml")["failed_test_cases"]}
    assert sorted(failures) == [
        "legacy cancelled too early",
        "legacy fills the asked slot",
        "legacy missing slot",
        "legacy not set",
        "legacy wrong flow",
        "orders a coffee#2",
    ]
    repeated = failures["orders a coffee#2"]
    assert repeated["file"] == ORDERS_FILE and repeated["user_message"] == "a small coffee please"
    assert repeated["actual"].startswith("start flow check_opening_hours\n(missing `start flow order_coffee`")
    assert failures["legacy wrong flow"]["expected"] == (
        "start or continue check_opening_hours (the bot then says utter_opening_hours)"
    )
    assert failures["legacy wrong flow"]["actual"] == (
        "start flow order_coffee\n(the bot then says utter_opening_hours of check_opening_hours, which this "
        "turn neither starts nor continues; starts order_coffee, but the bot then says utter_opening_hours "
        "of check_opening_hours)"
    )
    assert failures["legacy missing slot"]["expected"] == (
        "set slot coffee_size large\nstart or continue order_coffee (the bot then says utter_ask_milk)"
    )
    assert failures["legacy missing slot"]["actual"] == (
        "start flow order_coffee\n(missing `set slot coffee_size large`)"
    )
    assert failures["legacy fills the asked slot"]["actual"] == (
        "start flow order_coffee\nset slot coffee_size large\nset slot milk oat milk\n"
        "(sets milk, but the bot asks for milk right after)"
    )
    not_set = failures["legacy not set"]
    assert (not_set["turn_index"], not_set["user_message"]) == (1, "whatever, surprise me")
    assert not_set["expected"] == "no set slot of coffee_size"
    assert not_set["actual"] == (
        "set slot coffee_size large\n(sets coffee_size, but the test shows coffee_size was not set)"
    )
    early = failures["legacy cancelled too early"]
    assert (early["turn_index"], early["actual"]) == (
        1,
        "cancel flow\n(the bot then says utter_ask_milk of order_coffee, which this turn neither starts nor "
        "continues; missing `set slot coffee_size small`)",
    )
    assert all(f["actual"].count("\n(") == 1 for f in failures.values())  # one reason line each

    # Stage 3: every data point names its test unambiguously.
    records = [
        json.loads(line)
        for line in (out / "3_llm_finetune_data" / "llm_ft_data.jsonl").read_text().splitlines()
    ]
    by_test: dict[str, int] = {}
    for record in records:
        by_test[record["original_test_name"]] = by_test.get(record["original_test_name"], 0) + 1
    assert by_test == {
        f"{LEGACY_FILE}::legacy coffee": 3,
        f"{LEGACY_FILE}::legacy cancel": 2,
        f"{MORE_FILE}::orders a coffee": 1,
        f"{ORDERS_FILE}::orders a coffee#1": 2,
        f"{ORDERS_FILE}::asks when the café opens": 1,
        f"{ORDERS_FILE}::orders a coffee#3": 2,
    }

    # Stage 4: the split is written; in its E2E files every test has its own name, the original visible.
    splits = out / "4_train_test_split" / "e2e_tests"
    written = [
        (t.name, t.steps[0].text)  # type: ignore[union-attr]
        for side in ("train.yaml", "validation.yaml")
        for t in read_test_suite(splits / side).test_cases
    ]
    assert sorted(written) == [
        ("asks when the café opens", "when are you open?"),
        ("legacy cancel", "I'd like a coffee"),
        ("legacy coffee", "I'd like a coffee"),
        (f"orders a coffee ({MORE_FILE})", "a medium coffee please"),
        (f"orders a coffee#1 ({ORDERS_FILE})", "a large coffee please"),
        (f"orders a coffee#3 ({ORDERS_FILE})", "one small coffee"),
    ]
    assert summary["num_train_tests"] + summary["num_validation_tests"] == 6
    assert result.summary["num_ft_data_points"] == len(records) == 11


async def test_assertions_annotator_says_legacy_tests_need_the_llm(cafe: Path) -> None:
    await prepare_data(options(cafe, annotator="assertions"))
    out = cafe.parent / "out"
    summary = read(out / "result_summary.yaml")
    assert summary["num_input_e2e_tests"] == 12
    assert summary["num_annotated_conversations"] == 5  # every assertion-style test, orders a coffee#2 too
    assert summary["skipped_test_files"] == SKIPPED
    failures = read(out / "1_command_annotations" / "failed_test_cases.yml")["failed_test_cases"]
    assert [(f["test_case"], f["file"], f["turn_index"]) for f in failures] == [
        ("legacy coffee", LEGACY_FILE, 0),
        ("legacy wrong flow", LEGACY_FILE, 0),
        ("legacy missing slot", LEGACY_FILE, 0),
        ("legacy fills the asked slot", LEGACY_FILE, 0),
        ("legacy not set", LEGACY_FILE, 0),
        ("legacy cancel", LEGACY_FILE, 0),
        ("legacy cancelled too early", LEGACY_FILE, 0),
    ]
    assert {f["actual"] for f in failures} == {
        "assertions do not determine the commands: the user step has no assertions (a legacy-style test "
        "shows only the bot's turns): label it with --annotator llm"
    }
    conversations = read(out / "1_command_annotations" / "orders_coffee.yml")["conversations"]
    assert [c["original_test_case"].split("::")[1] for c in conversations] == [
        "orders a coffee#1",
        "asks when the café opens",
        "orders a coffee#2",
        "orders a coffee#3",
    ]
