"""`ftrecipe evaluate --e2e` on legacy-style tests (user steps followed by `utter:` / `bot:` /
`slot_was_set:` steps, no assertions), with the model in the loop.

The data bundle is prepare-data's real output: a small bike-rental assistant written for this test, its
tests labelled by the scripted teacher (`--annotator llm` on the `llm_server` fixture). The split keeps the
set cover in train: `changes their mind` alone holds every command type (start flow, set slot, cancel
flow), and `--train-frac 0.01` adds nothing to it, so the four other tests are the validation tests,
whatever the seed. Each is then checked as prepare-data checks the teacher: against the bot turns that
follow each user step. A legacy step lists every bot turn, so its next question pins what the message
filled: the last tests show that shared check keeping the teacher's labels where Rasa may fill the slot
without a command (an NLU mapping, a custom action).
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from ftrecipe.cli.main import main
from ftrecipe.dataprep.e2e import BotStep, UserStep, UtterStep, read_test_suite
from support.llm_server import ChatRequest, LLMServer

FLOWS: Final = """
flows:
  rent_bike:
    name: rent a bike
    description: Rent one of the shop's bikes, a city or a mountain bike, for some hours.
    steps:
      - collect: bike_type
        description: the kind of bike, city or mountain
      - collect: rental_hours
        description: for how many hours the user rents the bike
      - action: utter_bike_rented
  book_repair:
    name: book a repair
    description: Book a day on which the workshop repairs the user's own bike.
    steps:
      - collect: repair_day
        description: the day the user brings the bike in
      - action: utter_repair_booked
  shop_hours:
    name: shop opening hours
    description: Tell the user when the shop is open.
    steps:
      - action: utter_shop_hours
"""

DOMAIN: Final = """
version: "3.1"
slots:
  bike_type:
    type: categorical
    values: [city, mountain]
    mappings:
      - type: from_llm
  rental_hours:
    type: float
    mappings:
      - type: from_llm
  repair_day:
    type: text
    mappings:
      - type: from_llm
responses:
  utter_ask_bike_type:
    - text: Which bike would you like, a city or a mountain bike?
  utter_ask_rental_hours:
    - text: For how many hours do you need it?
  utter_bike_rented:
    - text: Your {bike_type} bike is ready, for {rental_hours} hours.
  utter_ask_repair_day:
    - text: On which day can you bring your bike in?
  utter_repair_booked:
    - text: The workshop expects your bike on {repair_day}.
  utter_shop_hours:
    - text: The shop is open from 9 to 18, Monday to Saturday.
"""

TESTS: Final = """
test_cases:
  - test_case: changes their mind
    steps:
      - user: I want to rent a mountain bike
      - slot_was_set:
          - bike_type: mountain
      - utter: utter_ask_rental_hours
      - user: hmm, no, forget it
      - slot_was_not_set:
          - rental_hours

  - test_case: rents a bike step by step
    steps:
      - user: I'd like to rent a bike
      - utter: utter_ask_bike_type
      - user: a city bike
      - slot_was_set:
          - bike_type: city
      - bot: For how many hours do you need it?
      - user: three hours
      - slot_was_set:
          - rental_hours: 3.0
      - bot: Your city bike is ready, for 3.0 hours.

  - test_case: rents a mountain bike in one message
    steps:
      - user: a mountain bike for 2 hours please
      - slot_was_set:
          - bike_type: mountain
          - rental_hours: 2.0
      - utter: utter_bike_rented

  - test_case: asks the opening hours while booking a repair
    steps:
      - user: my bike needs a repair
      - utter: utter_ask_repair_day
      - user: wait, when are you open?
      - utter: utter_shop_hours
      - utter: utter_ask_repair_day
      - user: Thursday then
      - slot_was_set:
          - repair_day: Thursday
      - bot: The workshop expects your bike on Thursday.

  - test_case: names the bike at the start
    steps:
      - user: rent me a city bike
      - bot: For how many hours do you need it?
      - user: just one
      - utter: utter_bike_rented
"""

# The teacher's answer to each user message (the prompt names the message; each is unique in the suite).
TEACHER: Final = {
    "I want to rent a mountain bike": "start flow rent_bike\nset slot bike_type mountain",
    "hmm, no, forget it": "cancel flow",
    "I'd like to rent a bike": "start flow rent_bike",
    "a city bike": "set slot bike_type city",
    "three hours": "set slot rental_hours 3",
    "a mountain bike for 2 hours please": "start flow rent_bike\nset slot bike_type mountain\nset slot rental_hours 2",
    "my bike needs a repair": "start flow book_repair",
    "wait, when are you open?": "start flow shop_hours",
    "Thursday then": "set slot repair_day Thursday",
    "rent me a city bike": "start flow rent_bike\nset slot bike_type city",
    "just one": "set slot rental_hours 1",
}

# The validation tests, with the command-generator turns each costs when every turn passes.
VALIDATION_TESTS: Final = {
    "rents a bike step by step": 3,
    "rents a mountain bike in one message": 1,
    "asks the opening hours while booking a repair": 3,
    "names the bike at the start": 2,
}
TURNS: Final = 9  # val.jsonl's records: the teacher-forced scoring asks these first, then the replay
VALIDATION_FILE: Final = "4_train_test_split/e2e_tests/validation.yaml"


def _message(request: ChatRequest) -> str:
    match = re.search(r'last message, "(.*)", one per line', request.prompt)
    assert match is not None, request.prompt[-300:]
    return match.group(1)


class Model:
    """Answers as the teacher did, except for the messages in `changed`, and only in the replay (the
    requests after the scoring's TURNS): the teacher-forced figures stay the teacher's."""

    def __init__(
        self, changed: Mapping[str, str] | None = None, teacher: Mapping[str, str] = TEACHER
    ) -> None:
        self.changed = dict(changed or {})
        self.teacher = teacher

    def __call__(self, request: ChatRequest) -> str:
        message = _message(request)
        if request.index >= TURNS and message in self.changed:
            return self.changed[message]
        return self.teacher[message]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")


@pytest.fixture
def bikes(tmp_path: Path) -> Path:
    assistant = tmp_path / "bikes"
    _write(assistant / "data" / "flows.yml", FLOWS)
    _write(assistant / "domain.yml", DOMAIN)
    _write(tmp_path / "bike_tests" / "legacy.yml", TESTS)
    return assistant


def _prepare(bikes: Path, server: LLMServer, llm_config: Path, out: Path, teacher: Model) -> Path:
    """prepare-data's output, labelled by the scripted teacher; the server is reset for the evaluation."""
    server.script(teacher)
    prepare = ["prepare-data", str(bikes.parent / "bike_tests"), "--assistant", str(bikes)]
    prepare += ["--llm-config", str(llm_config), "--num-rephrases", "0", "--train-frac", "0.01"]
    assert main([*prepare, "--out", str(out), "--cache-dir", str(out.parent / "cache")]) == 0
    assert server.script_errors == []
    server.reset()
    return out


@pytest.fixture
def data(bikes: Path, tmp_path: Path, llm_server: LLMServer, llm_config: Path) -> Path:
    return _prepare(bikes, llm_server, llm_config, tmp_path / "data", Model())


def _evaluate(data: Path, bikes: Path, server: LLMServer, out: Path) -> dict[str, Any]:
    args = ["evaluate", "--data", str(data), "--endpoint", server.base_url, "--model", "bikes"]
    assert main([*args, "--out", str(out), "--e2e", "--assistant", str(bikes)]) == 0
    assert server.script_errors == []
    e2e: dict[str, Any] = json.loads((out / "eval.json").read_text(encoding="utf-8"))["e2e"]
    return e2e


def _replayed(server: LLMServer) -> list[str]:
    return [_message(r) for r in server.chat_requests[TURNS:]]


def test_the_validation_split_holds_the_legacy_tests_as_written(data: Path) -> None:
    """The engine replays validation.yaml: the legacy tests, their bot turns kept step for step."""
    suite = read_test_suite(data / VALIDATION_FILE)
    assert [t.name for t in suite.test_cases] == list(VALIDATION_TESTS)
    assert all(not s.assertions for t in suite.test_cases for s in t.steps if isinstance(s, UserStep))
    step_by_step = suite.test_cases[0]
    assert [type(s) for s in step_by_step.steps if isinstance(s, UserStep | UtterStep | BotStep)] == [
        UserStep,
        UtterStep,
        UserStep,
        BotStep,
        UserStep,
        BotStep,
    ]
    val = (data / "4_train_test_split" / "ft_splits" / "val.jsonl").read_text(encoding="utf-8")
    assert len(val.splitlines()) == TURNS
    summary = yaml.safe_load((data / "result_summary.yaml").read_text(encoding="utf-8"))
    assert (summary["num_train_tests"], summary["num_validation_tests"]) == (1, 4)


def test_teacher_answers_pass_every_legacy_test(
    data: Path, bikes: Path, llm_server: LLMServer, tmp_path: Path
) -> None:
    """One call per turn of the four tests, each prompt the one the teacher's state rendered (val.jsonl's)."""
    llm_server.script(Model())
    e2e = _evaluate(data, bikes, llm_server, tmp_path / "eval")
    assert (e2e["tests"], e2e["passed"], e2e["pass_rate"], e2e["failed"]) == (4, 4, 1.0, [])
    assert e2e["model_calls"] == TURNS
    train = {"I want to rent a mountain bike", "hmm, no, forget it"}
    assert sorted(_replayed(llm_server)) == sorted(set(TEACHER) - train)
    scored, replayed = llm_server.chat_requests[:TURNS], llm_server.chat_requests[TURNS:]
    assert sorted(r.prompt for r in replayed) == sorted(r.prompt for r in scored)


def test_another_flow_fails_that_test_at_that_turn(
    data: Path, bikes: Path, llm_server: LLMServer, tmp_path: Path
) -> None:
    """Asked the opening hours mid-booking, the model starts a rental: the test shows the opening hours
    next. That test fails at turn 1 (its last turn costs no call); the others pass."""
    llm_server.script(Model({"wait, when are you open?": "start flow rent_bike"}))
    e2e = _evaluate(data, bikes, llm_server, tmp_path / "eval")
    assert (e2e["tests"], e2e["passed"], e2e["model_calls"]) == (4, 3, TURNS - 1)
    assert e2e["failed"] == [
        {
            "test": "asks the opening hours while booking a repair",
            "file": VALIDATION_FILE,
            "turn_index": 1,
            "user_message": "wait, when are you open?",
            "expected": "start or continue shop_hours (the bot then says utter_shop_hours)\n"
            "start or continue book_repair (the bot then says utter_ask_repair_day)",
            "actual": "start flow rent_bike\n(the bot then says utter_shop_hours of shop_hours, which this turn "
            "neither starts nor continues; starts rent_bike, but the bot then says utter_shop_hours of "
            "shop_hours)",
            "answer": "start flow rent_bike",
        }
    ]
    assert "Thursday then" not in _replayed(llm_server)


def test_a_slot_the_next_step_shows_set_fails_when_skipped(
    data: Path, bikes: Path, llm_server: LLMServer, tmp_path: Path
) -> None:
    """The model leaves out the rental hours the following slot_was_set step shows."""
    message = "a mountain bike for 2 hours please"
    llm_server.script(Model({message: "start flow rent_bike\nset slot bike_type mountain"}))
    e2e = _evaluate(data, bikes, llm_server, tmp_path / "eval")
    assert (e2e["passed"], e2e["model_calls"]) == (3, TURNS)
    assert [(f["test"], f["turn_index"], f["expected"], f["actual"]) for f in e2e["failed"]] == [
        (
            "rents a mountain bike in one message",
            0,
            "set slot bike_type mountain\nset slot rental_hours 2\n"
            "start or continue rent_bike (the bot then says utter_bike_rented)",
            "start flow rent_bike\nset slot bike_type mountain\n(missing `set slot rental_hours 2`)",
        )
    ]


def test_a_skipped_question_fails_when_the_test_shows_a_later_one(
    data: Path, bikes: Path, llm_server: LLMServer, tmp_path: Path
) -> None:
    """No slot_was_set step here: only the bot's next question says the bike type was given. A model that
    starts the rental without it makes Rasa ask the bike type, not the hours the test shows: that test
    fails at turn 0."""
    llm_server.script(Model({"rent me a city bike": "start flow rent_bike"}))
    e2e = _evaluate(data, bikes, llm_server, tmp_path / "eval")
    assert (e2e["passed"], e2e["model_calls"]) == (3, TURNS - 1)
    assert [
        (f["test"], f["turn_index"], f["user_message"], f["expected"], f["actual"]) for f in e2e["failed"]
    ] == [
        (
            "names the bike at the start",
            0,
            "rent me a city bike",
            "start or continue rent_bike (the bot then says utter_ask_rental_hours)",
            "start flow rent_bike\n(starts rent_bike, which asks bike_type first, but the bot then says "
            "utter_ask_rental_hours, asking rental_hours)",
        )
    ]
    assert "just one" not in _replayed(llm_server)


def test_a_question_left_unanswered_fails_when_the_test_shows_the_next(
    data: Path, bikes: Path, llm_server: LLMServer, tmp_path: Path
) -> None:
    """Asked the bike type, the model sets nothing of it: Rasa asks the bike type again, the test shows the
    hours asked next (and bike_type set)."""
    llm_server.script(Model({"a city bike": "set slot rental_hours 3"}))
    e2e = _evaluate(data, bikes, llm_server, tmp_path / "eval")
    assert (e2e["passed"], e2e["model_calls"]) == (3, TURNS - 1)
    assert [(f["test"], f["turn_index"], f["actual"]) for f in e2e["failed"]] == [
        (
            "rents a bike step by step",
            1,
            "set slot rental_hours 3\n(sets rental_hours, but the bot asks for rental_hours right after; "
            "missing `set slot bike_type city`)",
        )
    ]


def test_reordered_or_equivalent_answers_pass(
    data: Path, bikes: Path, llm_server: LLMServer, tmp_path: Path
) -> None:
    """The check takes the commands as a set and slot values as Rasa compares them: the same commands in
    another order, `2.0` for `2`, a quoted value, pass as the teacher's did."""
    llm_server.script(
        Model(
            {
                "a mountain bike for 2 hours please": "set slot rental_hours 2.0\nset slot bike_type mountain\n"
                "start flow rent_bike",
                "rent me a city bike": "set slot bike_type 'city'\nstart flow rent_bike",
                "three hours": "set slot rental_hours 3.0",
            }
        )
    )
    e2e = _evaluate(data, bikes, llm_server, tmp_path / "eval")
    assert (e2e["tests"], e2e["passed"], e2e["failed"], e2e["model_calls"]) == (4, 4, [], TURNS)
    # The state they leave is the teacher's: the next turn's prompt is the teacher-forced one.
    scored, replayed = llm_server.chat_requests[:TURNS], llm_server.chat_requests[TURNS:]
    (forced,) = [r.prompt for r in scored if _message(r) == "just one"]
    (own,) = [r.prompt for r in replayed if _message(r) == "just one"]
    assert own == forced and "- bike_type (categorical): city\n" in own


def test_a_question_left_unanswered_fails_when_the_flow_goes_on(
    data: Path, bikes: Path, llm_server: LLMServer, tmp_path: Path
) -> None:
    """Asked the hours, the model takes "just one" for a question about the opening hours: once they are
    told, Rasa asks the hours again, but the test shows the rental done. No slot_was_set step says so: the
    bot's next turn does."""
    llm_server.script(Model({"just one": "start flow shop_hours"}))
    e2e = _evaluate(data, bikes, llm_server, tmp_path / "eval")
    assert (e2e["passed"], e2e["model_calls"]) == (3, TURNS)
    assert [(f["test"], f["turn_index"], f["expected"], f["actual"]) for f in e2e["failed"]] == [
        (
            "names the bike at the start",
            1,
            "start or continue rent_bike (the bot then says utter_bike_rented)",
            "start flow shop_hours\n(leaves rental_hours unanswered, so rent_bike asks for it again, but the "
            "bot then says utter_bike_rented)",
        )
    ]


def test_a_slot_nlu_fills_needs_no_command(
    bikes: Path, tmp_path: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    """bike_type mapped from an entity: Rasa's NLU fills it from "rent me a city bike" with no command, so
    a teacher, and then a model, that only starts the rental agree with the bot asking the hours next."""
    llm_mapped = "    values: [city, mountain]\n    mappings:\n      - type: from_llm\n"
    assert llm_mapped in DOMAIN
    entity_mapped = (
        "    values: [city, mountain]\n    mappings:\n      - type: from_entity\n        entity: bike_type\n"
    )
    domain = DOMAIN.replace(llm_mapped, entity_mapped, 1) + "entities:\n  - bike_type\n"
    _write(bikes / "domain.yml", domain)
    teacher = {**TEACHER, "rent me a city bike": "start flow rent_bike"}
    data = _prepare(bikes, llm_server, llm_config, tmp_path / "data", Model(teacher=teacher))
    summary = yaml.safe_load((data / "result_summary.yaml").read_text(encoding="utf-8"))
    assert (summary["num_annotated_conversations"], summary["num_failed_conversations"]) == (5, 0)

    llm_server.script(Model(teacher=teacher))
    e2e = _evaluate(data, bikes, llm_server, tmp_path / "eval")
    assert (e2e["tests"], e2e["passed"], e2e["model_calls"]) == (4, 4, TURNS)


def test_a_custom_action_before_the_question_may_fill_it(
    bikes: Path, tmp_path: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    """rent_bike first runs a custom action (it may fill bike_type from the customer's last rental): a
    teacher that only starts the rental, the bot then asking the hours, is not contradicted."""
    first_collect = "    steps:\n      - collect: bike_type\n"
    assert first_collect in FLOWS
    flows = FLOWS.replace(
        first_collect, "    steps:\n      - action: action_recall_last_bike\n" + first_collect[11:], 1
    )
    _write(bikes / "data" / "flows.yml", flows)
    _write(bikes / "domain.yml", DOMAIN + "actions:\n  - action_recall_last_bike\n")
    teacher = {**TEACHER, "rent me a city bike": "start flow rent_bike"}
    data = _prepare(bikes, llm_server, llm_config, tmp_path / "data", Model(teacher=teacher))
    summary = yaml.safe_load((data / "result_summary.yaml").read_text(encoding="utf-8"))
    assert (summary["num_annotated_conversations"], summary["num_failed_conversations"]) == (5, 0)
