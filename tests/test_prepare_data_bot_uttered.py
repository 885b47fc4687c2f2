"""`--annotator llm` on assertion-style turns that only `bot_uttered` checks: the LLM's commands must lead the
bot to say what the test asserts, as Rasa's test runner would find the test failing otherwise. A response
of a user flow needs that flow started, on the stack, or reached by link / call; patterns' responses claim
nothing; a response several flows say is satisfied by any of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ftrecipe.dataprep.pipeline import PrepareDataOptions, prepare_data
from support.files import read, write
from support.llm_server import ChatRequest, LLMServer

FLOWS = """
flows:
  rent_bike:
    name: rent a bike
    description: Rent a bike for some days, picked up at a station.
    steps:
      - collect: bike_type
        description: city, mountain or electric bike
      - collect: rental_days
        description: for how many days
      - collect: station
        description: the station where the bike is picked up
      - action: utter_bike_rented
  return_bike:
    name: return a bike
    description: Return a rented bike at a station.
    steps:
      - collect: station
        description: the station where the bike is returned
      - action: utter_bike_returned
  check_weather:
    name: check the weather
    description: Tell the user the weather forecast for a ride.
    steps:
      - action: utter_weather
"""

DOMAIN = """
version: "3.1"
slots:
  bike_type:
    type: categorical
    values: [city, mountain, electric]
    mappings:
      - type: from_llm
  rental_days:
    type: float
    mappings:
      - type: from_llm
  station:
    type: text
    mappings:
      - type: from_llm
responses:
  utter_ask_bike_type:
    - text: Which bike would you like?
  utter_ask_rental_days:
    - text: For how many days?
  utter_ask_station:
    - text: Which station?
  utter_bike_rented:
    - text: Your {bike_type} bike is waiting at {station}.
  utter_bike_returned:
    - text: Thanks for bringing it back.
  utter_weather:
    - text: Sunny, no rain.
  utter_can_do_something_else:
    - text: Anything else for your ride?
"""

# Each user turn is checked by `bot_uttered` alone: the assertions do not say which commands the LLM gave.
TESTS = """
test_cases:
  - test_case: rents a bike
    steps:
      - user: I'd like to rent a bike
        assertions:
          - bot_uttered:
              utter_name: utter_ask_bike_type
      - user: an electric one
        assertions:
          - bot_uttered:
              utter_name: utter_ask_rental_days
      - user: what's the weather tomorrow?
        assertions:
          - bot_uttered:
              utter_name: utter_weather
          - bot_uttered:
              utter_name: utter_ask_continue_interrupted_flow_confirmation
      - user: two days
        assertions:
          - bot_uttered:
              utter_name: utter_ask_station
      - user: Central Station
        assertions:
          - bot_uttered:
              utter_name: utter_bike_rented
          - bot_uttered:
              utter_name: utter_can_do_something_else

  - test_case: returns a bike
    steps:
      - user: I'm bringing my bike back
        assertions:
          - bot_uttered:
              utter_name: utter_ask_station
      - user: will it rain today?
        assertions:
          - bot_uttered:
              utter_name: utter_ask_station

  - test_case: asks about the weather
    steps:
      - user: how's the weather for a ride?
        assertions:
          - bot_uttered:
              text_matches: Sunny, no rain.

  - test_case: the LLM starts another flow
    steps:
      - user: can I hire a bike for the weekend?
        assertions:
          - bot_uttered:
              utter_name: utter_ask_bike_type

  - test_case: the LLM cannot handle it
    steps:
      - user: a city bike for me please
        assertions:
          - bot_uttered:
              utter_name: utter_ask_rental_days
"""

# What the scripted command generator answers to each user message (the prompt ends with it, quoted).
ANSWERS = {
    "I'd like to rent a bike": "start flow rent_bike",
    "an electric one": "set slot bike_type electric",
    "what's the weather tomorrow?": "start flow check_weather",
    "two days": "set slot rental_days 2",
    "Central Station": "set slot station Central Station",
    # utter_ask_station is said by rent_bike and by return_bike: either one satisfies it.
    "I'm bringing my bike back": "start flow return_bike",
    # check_weather asks nothing, so it can end within the turn and the bot re-asks return_bike's question.
    "will it rain today?": "start flow check_weather",
    "how's the weather for a ride?": "start flow check_weather",  # text_matches renders utter_weather
    "can I hire a bike for the weekend?": "start flow return_bike",  # wrong: the bot asks for the bike type
    "a city bike for me please": "cannot handle",  # wrong: the bot asks for the days of the rental
}

TESTS_FILE = "bikes/e2e/bikes.yml"


@pytest.fixture
def bikes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The bike-rental assistant and its tests; the working directory is tmp_path, so outputs name `bikes/...`."""
    write(tmp_path / "bikes" / "data" / "flows.yml", FLOWS)
    write(tmp_path / "bikes" / "domain.yml", DOMAIN)
    write(tmp_path / TESTS_FILE, TESTS)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "bikes"


def user_message(request: ChatRequest) -> str:
    match = re.search(r'last message, "(.*)", one per line', request.prompt)
    assert match is not None, request.prompt[-300:]
    return match.group(1)


async def run(bikes: Path, llm_config: Path) -> Path:
    out = bikes.parent / "out"
    options = PrepareDataOptions(
        e2e_paths=(Path("bikes/e2e"),),
        assistant=Path("bikes"),
        out=out,
        cache_dir=bikes.parent / "cache",
        num_rephrases=0,
        concurrency=2,
        llm_config=llm_config,
    )
    await prepare_data(options)
    return out


async def test_bot_uttered_turns_accept_only_answers_that_lead_to_the_asserted_responses(
    bikes: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    llm_server.script(lambda request: ANSWERS[user_message(request)])
    out = await run(bikes, llm_config)
    summary = read(out / "result_summary.yaml")
    assert summary["num_input_e2e_tests"] == 5
    assert summary["num_annotated_conversations"] == 3
    assert summary["num_failed_conversations"] == 2

    # The right answers are kept, with the pattern's responses (continue interrupted, completed) unchecked.
    annotations = out / "1_command_annotations"
    rents, returns, weather = read(annotations / "bikes.yml")["conversations"]
    assert rents["original_test_case"] == f"{TESTS_FILE}::rents a bike"
    assert [s.get("llm_commands") for s in rents["steps"] if "user" in s] == [
        ["start flow rent_bike"],
        ["set slot bike_type electric"],
        ["start flow check_weather"],
        ["set slot rental_days 2"],
        ["set slot station Central Station"],
    ]
    assert returns["original_test_case"] == f"{TESTS_FILE}::returns a bike"
    assert [s.get("llm_commands") for s in returns["steps"] if "user" in s] == [
        ["start flow return_bike"],
        ["start flow check_weather"],
    ]
    assert weather["original_test_case"] == f"{TESTS_FILE}::asks about the weather"
    assert [s.get("llm_commands") for s in weather["steps"] if "user" in s] == [["start flow check_weather"]]

    # A flow the bot's next question does not belong to: rejected, with the reason on one line.
    failures = {f["test_case"]: f for f in read(annotations / "failed_test_cases.yml")["failed_test_cases"]}
    assert sorted(failures) == ["the LLM cannot handle it", "the LLM starts another flow"]
    other = failures["the LLM starts another flow"]
    assert (other["turn_index"], other["user_message"]) == (0, "can I hire a bike for the weekend?")
    assert other["expected"] == "start or continue rent_bike (the bot then says utter_ask_bike_type)"
    assert other["actual"] == (
        "start flow return_bike\n(the bot then says utter_ask_bike_type of rent_bike, which this turn neither "
        "starts nor continues; starts return_bike, but the bot then says utter_ask_bike_type of rent_bike)"
    )
    cannot = failures["the LLM cannot handle it"]
    assert (cannot["turn_index"], cannot["user_message"]) == (0, "a city bike for me please")
    assert cannot["expected"] == "start or continue rent_bike (the bot then says utter_ask_rental_days)"
    assert cannot["actual"] == (
        "cannot handle\n(the bot then says utter_ask_rental_days of rent_bike, which this turn neither starts "
        "nor continues)"
    )


async def test_an_llm_that_always_cannot_handle_labels_no_bot_uttered_turn(
    bikes: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    """What a stub LLM got through before: every test whose first turn the bot answers with a user flow's
    response fails at that turn."""
    llm_server.script(lambda request: "cannot handle")
    out = await run(bikes, llm_config)
    summary = read(out / "result_summary.yaml")
    assert (summary["num_input_e2e_tests"], summary["num_annotated_conversations"]) == (5, 0)
    failures = read(out / "1_command_annotations" / "failed_test_cases.yml")["failed_test_cases"]
    assert [(f["test_case"], f["turn_index"]) for f in failures] == [
        ("rents a bike", 0),
        ("returns a bike", 0),
        ("asks about the weather", 0),
        ("the LLM starts another flow", 0),
        ("the LLM cannot handle it", 0),
    ]
    assert failures[1]["actual"] == (
        "cannot handle\n(the bot then says utter_ask_station of rent_bike, return_bike, which this turn neither "
        "starts nor continues)"
    )
    assert failures[2]["actual"] == (
        "cannot handle\n(the bot then says utter_weather of check_weather, which this turn neither starts nor "
        "continues)"
    )


async def test_a_question_the_answer_leaves_unanswered_is_asked_again(
    bikes: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    """rent_bike asks for the bike type and the LLM cannot handle "an electric one": Rasa asks for the bike
    type again, so the test's next question (the days) rules the answer out, as for legacy-style steps."""
    answers = {**ANSWERS, "an electric one": "cannot handle"}
    llm_server.script(lambda request: answers[user_message(request)])
    out = await run(bikes, llm_config)
    summary = read(out / "result_summary.yaml")
    assert (summary["num_annotated_conversations"], summary["num_failed_conversations"]) == (2, 3)
    failures = {
        f["test_case"]: f
        for f in read(out / "1_command_annotations" / "failed_test_cases.yml")["failed_test_cases"]
    }
    assert sorted(failures) == ["rents a bike", "the LLM cannot handle it", "the LLM starts another flow"]
    rents = failures["rents a bike"]
    assert (rents["turn_index"], rents["user_message"]) == (1, "an electric one")
    assert rents["expected"] == "start or continue rent_bike (the bot then says utter_ask_rental_days)"
    assert rents["actual"] == (
        "cannot handle\n(leaves bike_type unanswered, so rent_bike asks for it again, but the bot then says "
        "utter_ask_rental_days)"
    )


CLARIFY_TESTS = """
test_cases:
  - test_case: the LLM asks which flow
    steps:
      - user: bike
        assertions:
          - flow_started: pattern_clarification
          - bot_uttered:
              utter_name: utter_clarification_options_rasa

  - test_case: the LLM asks nothing
    steps:
      - user: bikes?
        assertions:
          - flow_started: pattern_clarification
          - bot_uttered:
              utter_name: utter_clarification_options_rasa
"""


async def test_pattern_clarification_started_needs_a_clarify(
    bikes: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    """Only a clarify command starts pattern_clarification: without pattern_clarification_contains any
    clarify will do, but `cannot handle` (Rasa then runs pattern_cannot_handle) is refused."""
    write(bikes.parent / TESTS_FILE, CLARIFY_TESTS)
    answers = {"bike": "disambiguate flows rent_bike return_bike", "bikes?": "cannot handle"}
    llm_server.script(lambda request: answers[user_message(request)])
    out = await run(bikes, llm_config)
    annotations = out / "1_command_annotations"
    (asks,) = read(annotations / "bikes.yml")["conversations"]
    assert asks["original_test_case"] == f"{TESTS_FILE}::the LLM asks which flow"
    assert asks["steps"][0]["llm_commands"] == ["disambiguate flows rent_bike return_bike"]
    (failure,) = read(annotations / "failed_test_cases.yml")["failed_test_cases"]
    assert (failure["test_case"], failure["turn_index"]) == ("the LLM asks nothing", 0)
    assert failure["expected"] == "a clarification of some flows (pattern_clarification)"
    assert failure["actual"] == (
        "cannot handle\n(pattern_clarification started, but the commands ask for no clarification)"
    )


RENTALS_FLOW = """
  list_rentals:
    name: list rentals
    description: Show the user's past rentals.
    steps:
      - action: utter_rentals
"""

RENTALS_RESPONSE = """
  utter_rentals:
    - text: "Your rentals:\\n {rentals}"
"""

# `text_matches` is a regex (Rasa searches the bot's text with it): `\n` there is the response's newline.
RENTALS_TESTS = r"""
test_cases:
  - test_case: the LLM lists the rentals
    steps:
      - user: show my rentals
        assertions:
          - bot_uttered:
              text_matches: 'Your rentals:\n 2 city bikes'

  - test_case: the LLM cannot handle the rentals
    steps:
      - user: my rentals?
        assertions:
          - bot_uttered:
              text_matches: 'Your rentals:\n 2 city bikes'
"""


async def test_a_text_matches_regex_names_the_response_it_renders(
    bikes: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    write(bikes / "data" / "flows.yml", FLOWS + RENTALS_FLOW)
    write(bikes / "domain.yml", DOMAIN + RENTALS_RESPONSE)
    write(bikes.parent / TESTS_FILE, RENTALS_TESTS)
    answers = {"show my rentals": "start flow list_rentals", "my rentals?": "cannot handle"}
    llm_server.script(lambda request: answers[user_message(request)])
    out = await run(bikes, llm_config)
    annotations = out / "1_command_annotations"
    (lists,) = read(annotations / "bikes.yml")["conversations"]
    assert lists["original_test_case"] == f"{TESTS_FILE}::the LLM lists the rentals"
    (failure,) = read(annotations / "failed_test_cases.yml")["failed_test_cases"]
    assert (failure["test_case"], failure["turn_index"]) == ("the LLM cannot handle the rentals", 0)
    assert failure["actual"] == (
        "cannot handle\n(the bot then says utter_rentals of list_rentals, which this turn neither starts nor "
        "continues)"
    )
