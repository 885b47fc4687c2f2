"""Flow guards, `next` branches and slot rejections in the replay, as Rasa's flow policy runs them.

The fixture is a small vet-clinic assistant written for these tests: a flow that branches on the pet's
species, a guard on a slot a stubbed action sets, a guard `if: False` on a flow only a link starts, a collect
step's own rejection, a domain slot's `validation: rejections`, and a branch on Rasa's stack context, which
the replay cannot decide.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.dataprep.annotate import derive_commands, problems
from ftrecipe.dataprep.assistant import Assistant, Rejection, load_assistant
from ftrecipe.dataprep.commands import Command, SetSlot, StartFlow
from ftrecipe.dataprep.e2e import TestSuite, read_test_suite
from ftrecipe.dataprep.pipeline import PrepareDataOptions, prepare_data
from ftrecipe.dataprep.prompt import default_template
from ftrecipe.dataprep.state import ReplayFailure, Turn, conversation
from ftrecipe.dataprep.yamlfile import InputError
from test_rasa_files import write

FLOWS = """
flows:
  book_visit:
    name: book a visit
    description: Book a visit to the vet for the user's dog or cat.
    steps:
      - id: ask_species
        collect: species
        description: the kind of animal, dog or cat
        next:
          - if: slots.species = 'dog'
            then: ask_walks
          - else: ask_indoor
      - id: ask_walks
        collect: walks_per_day
        description: how many walks the dog gets a day
        rejections:
          - if: slots.walks_per_day > 10
            utter: utter_too_many_walks
        next: ask_day
      - id: ask_indoor
        collect: indoor
        description: whether the cat lives indoors
        next: ask_day
      - id: ask_day
        collect: visit_day
        description: the weekday of the visit
      - action: action_check_membership
      - action: utter_visit_booked
  member_discount:
    description: Apply the members' discount to the next visit.
    if: slots.is_member
    steps:
      - collect: member_code
        description: the code on the membership card
  pet_records:
    description: Show a pet's vaccination records once the owner's PIN is given.
    if: False
    steps:
      - collect: owner_pin
        description: the owner's four-digit PIN
  records_request:
    description: The user wants to see their pet's vaccination records.
    steps:
      - link: pet_records
  emergency:
    description: Help with a pet emergency.
    steps:
      - id: ask_urgency
        collect: urgency
        description: how urgent it is
        next:
          - if: context.frame_type = 'interrupt'
            then: END
          - else: ask_symptom
      - id: ask_symptom
        collect: symptom
        description: what the pet shows
"""

DOMAIN = """
version: "3.1"
slots:
  species: {type: categorical, values: [dog, cat], mappings: [{type: from_llm}]}
  walks_per_day: {type: float, mappings: [{type: from_llm}]}
  indoor: {type: bool, mappings: [{type: from_llm}]}
  visit_day:
    type: text
    mappings: [{type: from_llm}]
    validation:
      rejections:
        - if: slots.visit_day = 'Sunday'
          utter: utter_closed_on_sunday
  is_member: {type: bool, initial_value: false, mappings: [{type: controlled}]}
  member_code: {type: text, mappings: [{type: from_llm}]}
  owner_pin: {type: text, mappings: [{type: from_llm}]}
  urgency: {type: text, mappings: [{type: from_llm}]}
  symptom: {type: text, mappings: [{type: from_llm}]}
actions:
  - action_check_membership
responses:
  utter_ask_species: [{text: "Is it a dog or a cat?"}]
  utter_ask_walks_per_day: [{text: "How many walks a day?"}]
  utter_too_many_walks: [{text: "That many walks? Please check the number."}]
  utter_ask_indoor: [{text: "Does she live indoors?"}]
  utter_ask_visit_day: [{text: "Which day suits you?"}]
  utter_closed_on_sunday: [{text: "We are closed on Sundays."}]
  utter_visit_booked: [{text: "Booked for {visit_day}."}]
  utter_ask_member_code: [{text: "Your membership code?"}]
  utter_ask_owner_pin: [{text: "Your PIN, please."}]
  utter_ask_urgency: [{text: "How urgent is it?"}]
  utter_ask_symptom: [{text: "What do you see?"}]
"""

TESTS = """
stub_custom_actions:
  action_check_membership:
    events:
      - {event: slot, name: is_member, value: true}
test_cases:
  - test_case: dog_visit_with_refused_values
    steps:
      - user: book a visit for my dog
        assertions:
          - flow_started: book_visit
          - slot_was_set:
              - {name: species, value: dog}
          - bot_uttered: {utter_name: utter_ask_walks_per_day}
      - user: "12"
        assertions:
          - slot_was_set:
              - {name: walks_per_day, value: 12}
          - bot_uttered: {utter_name: utter_too_many_walks}
          - bot_uttered: {utter_name: utter_ask_walks_per_day}
      - user: "2"
        assertions:
          - slot_was_set:
              - {name: walks_per_day, value: 2}
          - bot_uttered: {utter_name: utter_ask_visit_day}
      - user: Sunday
        assertions:
          - slot_was_set:
              - {name: visit_day, value: Sunday}
          - bot_uttered: {utter_name: utter_closed_on_sunday}
          - bot_uttered: {utter_name: utter_ask_visit_day}
      - user: Monday then
        assertions:
          - slot_was_set:
              - {name: visit_day, value: Monday}
          - bot_uttered: {utter_name: utter_visit_booked}
      - user: and my member discount please
        assertions:
          - flow_started: member_discount
  - test_case: cat_visit_follows_the_other_branch
    steps:
      - user: my cat needs a check-up
        assertions:
          - flow_started: book_visit
          - slot_was_set:
              - {name: species, value: cat}
      - user: yes, she never goes out
        assertions:
          - slot_was_set:
              - {name: indoor, value: true}
      - user: Tuesday
        assertions:
          - slot_was_set:
              - {name: visit_day, value: Tuesday}
          - bot_uttered: {utter_name: utter_visit_booked}
  - test_case: records_through_a_link
    steps:
      - user: show me Rex's vaccinations
        assertions:
          - flow_started: records_request
      - user: "4711"
        assertions:
          - slot_was_set:
              - {name: owner_pin, value: "4711"}
  - test_case: emergency_on_the_stack_context
    steps:
      - user: my dog ate chocolate
        assertions:
          - flow_started: emergency
          - bot_uttered: {utter_name: utter_ask_urgency}
      - user: very urgent
        assertions:
          - slot_was_set:
              - {name: urgency, value: very urgent}
      - user: he is shaking
        assertions:
          - slot_was_set:
              - {name: symptom, value: he is shaking}
"""

USER_FLOWS = ["book_visit", "member_discount", "pet_records", "records_request", "emergency"]


def make_clinic(root: Path, flows: str = FLOWS, domain: str = DOMAIN) -> Path:
    write(root / "data" / "flows.yml", flows)
    write(root / "domain.yml", domain)
    write(root / "config.yml", "recipe: default.v1\npipeline:\n  - name: CompactLLMCommandGenerator\n")
    write(root / "e2e_tests" / "clinic.yml", TESTS)
    return root


@pytest.fixture
def clinic(tmp_path: Path) -> tuple[Assistant, TestSuite]:
    root = make_clinic(tmp_path / "clinic")
    assistant = load_assistant(root, exclude=((root / "e2e_tests").resolve(),))
    return assistant, read_test_suite(root / "e2e_tests" / "clinic.yml")


def replay(assistant: Assistant, suite: TestSuite, name: str) -> list[tuple[Turn, list[Command]]]:
    """Each turn with the commands its assertions give; every turn must agree with its test."""
    test = next(t for t in suite.test_cases if t.name == name)
    turns: list[tuple[Turn, list[Command]]] = []
    run = conversation(assistant, suite, test)
    turn = next(run)
    while True:
        commands = derive_commands(turn, assistant, "v2")
        assert not isinstance(commands, str), commands
        assert problems(turn, commands, assistant, "v2") == []
        turns.append((turn, commands))
        try:
            turn = run.send(commands)
        except StopIteration:
            return turns


def offered(turn: Turn) -> list[str]:
    return [f["name"] for f in turn.variables["available_flows"] if f["name"] in USER_FLOWS]


def test_rejections_are_read_from_collect_steps_and_domain_slots(clinic: tuple[Assistant, TestSuite]) -> None:
    assistant, _ = clinic
    walks = assistant.flows["book_visit"].step("ask_walks")
    assert walks is not None
    assert walks.rejections == (Rejection("slots.walks_per_day > 10", "utter_too_many_walks"),)
    assert assistant.slots["visit_day"].rejections == (
        Rejection("slots.visit_day = 'Sunday'", "utter_closed_on_sunday"),
    )
    assert assistant.flows["pet_records"].condition == "False"


@pytest.mark.parametrize(
    ("rejections", "message"),
    [
        ("[{utter: utter_x}]", "rejections must be a list of {if: condition, utter: response}"),
        ("{if: slots.x}", "rejections must be a list of {if: condition, utter: response}"),
    ],
)
def test_bad_rejections_are_one_line(tmp_path: Path, rejections: str, message: str) -> None:
    flows = FLOWS.replace(
        "          - if: slots.walks_per_day > 10\n            utter: utter_too_many_walks\n",
        "",
    ).replace("        rejections:\n", f"        rejections: {rejections}\n", 1)
    root = make_clinic(tmp_path / "bad", flows=flows)
    with pytest.raises(InputError) as caught:
        load_assistant(root, exclude=((root / "e2e_tests").resolve(),))
    assert "flow 'book_visit', step 'ask_walks'" in str(caught.value)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_branch_guard_and_rejections_at_each_turn(clinic: tuple[Assistant, TestSuite]) -> None:
    assistant, suite = clinic
    turns = replay(assistant, suite, "dog_visit_with_refused_values")
    state = [
        (
            t.text,
            offered(t),
            t.current_flow,
            t.asked_slot,
            t.slots_before["walks_per_day"],
            t.slots_before["visit_day"],
        )
        for t, _ in turns
    ]
    # `if: False` hides pet_records; member_discount waits for is_member (false until the stubbed action).
    assert state == [
        ("book a visit for my dog", ["book_visit", "records_request", "emergency"], None, None, None, None),
        # species = dog: the dog branch asks for walks (the cat branch would ask `indoor`).
        ("12", ["book_visit", "records_request", "emergency"], "book_visit", "walks_per_day", None, None),
        # 12 > 10: the collect's rejection emptied the slot and asked again.
        ("2", ["book_visit", "records_request", "emergency"], "book_visit", "walks_per_day", None, None),
        ("Sunday", ["book_visit", "records_request", "emergency"], "book_visit", "visit_day", 2.0, None),
        # the domain's rejection of Sunday: emptied, asked again.
        ("Monday then", ["book_visit", "records_request", "emergency"], "book_visit", "visit_day", 2.0, None),
        # the flow ran action_check_membership (stubbed: is_member true), so member_discount is offered now.
        (
            "and my member discount please",
            ["book_visit", "member_discount", "records_request", "emergency"],
            None,
            None,
            None,
            None,
        ),
    ]
    assert [commands for _, commands in turns] == [
        [StartFlow("book_visit"), SetSlot("species", "dog")],
        [SetSlot("walks_per_day", "12")],
        [SetSlot("walks_per_day", "2")],
        [SetSlot("visit_day", "Sunday")],
        [SetSlot("visit_day", "Monday")],
        [StartFlow("member_discount")],
    ]
    # The rejected values asked again are not read as "the value was never set".
    assert turns[1][0].next_asks == ()
    assert turns[3][0].next_asks == ()
    rendered = default_template("v2").render(turns[2][0].variables)
    assert "pet_records" not in rendered
    assert "member_discount" not in rendered
    assert "Active flow: book_visit" in rendered
    last = default_template("v2").render(turns[5][0].variables)
    assert "member_discount: Apply the members' discount" in last


def test_the_else_branch_is_followed_where_the_test_is_silent(clinic: tuple[Assistant, TestSuite]) -> None:
    assistant, suite = clinic
    turns = replay(assistant, suite, "cat_visit_follows_the_other_branch")
    assert [(t.text, t.current_flow, t.asked_slot) for t, _ in turns] == [
        ("my cat needs a check-up", None, None),
        ("yes, she never goes out", "book_visit", "indoor"),
        ("Tuesday", "book_visit", "visit_day"),
    ]
    assert [s["name"] for s in turns[2][0].variables["flow_slots"]] == [
        "species",
        "walks_per_day",
        "indoor",
        "visit_day",
    ]


def test_a_flow_guarded_false_runs_when_linked(clinic: tuple[Assistant, TestSuite]) -> None:
    assistant, suite = clinic
    turns = replay(assistant, suite, "records_through_a_link")
    first, second = (t for t, _ in turns)
    assert offered(first) == ["book_visit", "records_request", "emergency"]
    # Linked: pet_records is active, so the prompt offers it whatever its guard says.
    assert (second.current_flow, second.asked_slot) == ("pet_records", "owner_pin")
    assert offered(second) == ["book_visit", "pet_records", "records_request", "emergency"]


def test_an_undecidable_branch_fails_its_test(clinic: tuple[Assistant, TestSuite]) -> None:
    assistant, suite = clinic
    test = next(t for t in suite.test_cases if t.name == "emergency_on_the_stack_context")
    run = conversation(assistant, suite, test)
    first = next(run)
    second = run.send(derive_commands(first, assistant, "v2"))  # type: ignore[arg-type]
    assert (second.current_flow, second.asked_slot) == ("emergency", "urgency")
    with pytest.raises(ReplayFailure) as caught:
        run.send([SetSlot("urgency", "very urgent")])
    assert str(caught.value) == (
        "flow 'emergency', step 'ask_urgency': cannot decide `context.frame_type = 'interrupt'`: "
        "`context.frame_type` comes from Rasa's dialogue stack, which the replay does not model "
        "(and its branches lead to different steps)"
    )
    assert (caught.value.step_index, caught.value.user_message) == (1, "very urgent")


def test_a_guard_on_the_stack_context_fails_its_test(tmp_path: Path) -> None:
    flows = FLOWS.replace("    if: slots.is_member\n", "    if: context.flow_id = 'book_visit'\n")
    root = make_clinic(tmp_path / "ctx", flows=flows)
    assistant = load_assistant(root, exclude=((root / "e2e_tests").resolve(),))
    suite = read_test_suite(root / "e2e_tests" / "clinic.yml")
    with pytest.raises(
        ReplayFailure, match=re.escape("flow 'member_discount': cannot decide its guard `if: context.flow_id")
    ):
        replay(assistant, suite, "cat_visit_follows_the_other_branch")


def test_the_test_showing_a_rejection_the_value_passes_fails_it(clinic: tuple[Assistant, TestSuite]) -> None:
    """An LLM label of 8 walks where the test shows the refusal of 12: the labels disagree with the test."""
    assistant, suite = clinic
    test = next(t for t in suite.test_cases if t.name == "dog_visit_with_refused_values")
    run = conversation(assistant, suite, test)
    first = next(run)
    run.send(derive_commands(first, assistant, "v2"))  # type: ignore[arg-type]
    with pytest.raises(ReplayFailure, match=r"shows utter_too_many_walks \(a rejection of walks_per_day\)"):
        run.send([SetSlot("walks_per_day", "8")])


def read(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


async def test_prepare_data_labels_and_reports_the_undecidable_test(tmp_path: Path) -> None:
    root = make_clinic(tmp_path / "clinic")
    out = tmp_path / "out"
    result = await prepare_data(
        PrepareDataOptions(
            e2e_paths=(root / "e2e_tests",),
            assistant=root,
            annotator="assertions",
            num_rephrases=0,
            out=out,
            cache_dir=tmp_path / "cache",
        )
    )
    assert result.summary["num_input_e2e_tests"] == 4
    assert result.summary["num_annotated_conversations"] == 3
    (failure,) = read(out / "1_command_annotations" / "failed_test_cases.yml")["failed_test_cases"]
    assert failure["test_case"] == "emergency_on_the_stack_context"
    assert failure["turn_index"] == 1
    assert failure["user_message"] == "very urgent"
    assert failure["actual"].startswith("flow 'emergency', step 'ask_urgency': cannot decide")
    assert "\n" not in failure["actual"]
    conversations = read(out / "1_command_annotations" / "clinic.yml")["conversations"]
    labels = {
        c["original_test_case"].split("::")[-1]: [
            s["llm_commands"] for s in c["steps"] if "llm_commands" in s
        ]
        for c in conversations
    }
    assert labels == {
        "dog_visit_with_refused_values": [
            ["start flow book_visit", "set slot species dog"],
            ["set slot walks_per_day 12"],
            ["set slot walks_per_day 2"],
            ["set slot visit_day Sunday"],
            ["set slot visit_day Monday"],
            ["start flow member_discount"],
        ],
        "cat_visit_follows_the_other_branch": [
            ["start flow book_visit", "set slot species cat"],
            ["set slot indoor True"],
            ["set slot visit_day Tuesday"],
        ],
        "records_through_a_link": [["start flow records_request"], ["set slot owner_pin 4711"]],
    }


def test_an_undecidable_branch_is_fine_when_both_ways_meet(tmp_path: Path) -> None:
    """Both arms reach the same next question: the replay needs no verdict, so the test is kept."""
    flows = FLOWS.replace(
        "            then: END\n",
        "            then:\n              - action: utter_ask_urgency\n                next: ask_symptom\n",
    )
    root = make_clinic(tmp_path / "meet", flows=flows)
    assistant = load_assistant(root, exclude=((root / "e2e_tests").resolve(),))
    suite = read_test_suite(root / "e2e_tests" / "clinic.yml")
    turns = replay(assistant, suite, "emergency_on_the_stack_context")
    assert [(t.current_flow, t.asked_slot) for t, _ in turns] == [
        (None, None),
        ("emergency", "urgency"),
        ("emergency", "symptom"),
    ]


LOOKUP_FLOWS = """
flows:
  check_in:
    description: Check a pet in at the front desk.
    steps:
      - action: action_look_up_pet
        next:
          - if: slots.pet_on_file
            then: ask_day
          - else: ask_species
      - id: ask_species
        collect: species
        description: the kind of animal, dog or cat
      - id: ask_day
        collect: visit_day
        description: the weekday of the visit
"""

LOOKUP_DOMAIN = """
version: "3.1"
slots:
  species: {type: categorical, values: [dog, cat], mappings: [{type: from_llm}]}
  visit_day: {type: text, mappings: [{type: from_llm}]}
  pet_on_file: {type: bool, mappings: [{type: controlled}]}
actions:
  - action_look_up_pet
responses:
  utter_ask_species: [{text: "Is it a dog or a cat?"}]
  utter_ask_visit_day: [{text: "Which day suits you?"}]
"""

LOOKUP_TESTS = """
{stubs}
test_cases:
  - test_case: check_in
    steps:
      - user: checking in Rex
        assertions:
          - flow_started: check_in
      - user: Monday
        assertions:
          - slot_was_set:
              - {{name: visit_day, value: Monday}}
"""


@pytest.mark.parametrize(
    ("stubs", "asked"),
    [
        # Stubbed: the action's slot event decides the branch.
        (
            "stub_custom_actions:\n  action_look_up_pet:\n    events:\n"
            "      - {event: slot, name: pet_on_file, value: true}",
            "visit_day",
        ),
        # Not stubbed: only the real action knows pet_on_file; the branches ask different things.
        ("", None),
    ],
)
def test_a_branch_on_what_an_unstubbed_action_sets_is_not_guessed(
    tmp_path: Path, stubs: str, asked: str | None
) -> None:
    root = tmp_path / "lookup"
    write(root / "data" / "flows.yml", LOOKUP_FLOWS)
    write(root / "domain.yml", LOOKUP_DOMAIN)
    suite = read_test_suite(write(root / "e2e_tests" / "t.yml", LOOKUP_TESTS.format(stubs=stubs)))
    assistant = load_assistant(root, exclude=((root / "e2e_tests").resolve(),))
    run = conversation(assistant, suite, suite.test_cases[0])
    first = next(run)
    if asked is not None:
        assert run.send([StartFlow("check_in")]).asked_slot == asked
        return
    with pytest.raises(ReplayFailure) as caught:
        run.send([StartFlow("check_in")])
    assert str(caught.value) == (
        "flow 'check_in', step '1_action': cannot decide `slots.pet_on_file`: slot 'pet_on_file' is set by "
        "custom actions, and action_look_up_pet ran without a stub (and its branches lead to different steps)"
    )
    assert first.asked_slot is None


def test_a_value_the_test_asserts_is_checked_too(clinic: tuple[Assistant, TestSuite]) -> None:
    """A value that reaches a slot by the test's `slot_was_set` (a confirmed correction, say), not by this
    turn's commands, still meets the domain's rejections, as Rasa checks every value set."""
    assistant, suite = clinic
    test = next(t for t in suite.test_cases if t.name == "dog_visit_with_refused_values")
    run = conversation(assistant, suite, test)
    turn = next(run)
    for _ in range(3):  # up to the "Sunday" turn, labelled as the assertions say
        turn = run.send(derive_commands(turn, assistant, "v2"))  # type: ignore[arg-type]
    assert turn.text == "Sunday"
    after = run.send([])  # no set slot: the assertion brings Sunday
    assert (after.asked_slot, after.slots_before["visit_day"]) == ("visit_day", None)
