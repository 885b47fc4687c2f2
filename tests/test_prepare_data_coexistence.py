"""Coexistence: turns Rasa hands to the NLU-based system are no data points and fail no test.

A bank whose money transfers and balance are CALM flows and whose hotel bookings and greetings live in NLU
stories and rules; its config has an LLMBasedRouter. With `--annotator llm` the router's LLM is asked first
(the router prompt), sticky CALM skips it until `pattern_completed` resets the routing, B routes one turn
to the NLU system, C the session until a story resets it. With either annotator, a test showing
`route_session_to_calm: false` or only responses of the NLU stories routes the turn there.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.dataprep.pipeline import PrepareDataOptions, prepare_data
from ftrecipe.dataprep.progress import LineReporter
from ftrecipe.dataprep.routing import (
    DEFAULT_ROUTER_PROMPT,
    RouterConfig,
    parse_router_answer,
    router_prompt,
)
from support.files import read, write
from support.llm_server import ChatRequest, LLMServer

FLOWS = """
flows:
  transfer_money:
    name: transfer money
    description: Send money to someone.
    steps:
      - collect: recipient
        description: who gets the money
      - collect: amount
        description: how much
      - action: utter_transfer_done
  check_balance:
    name: check balance
    description: Tell the user the balance of their account.
    steps:
      - action: utter_balance
  pattern_completed:
    description: all flows are done
    name: pattern completed
    steps:
      - action: utter_can_do_something_else
      - action: action_reset_routing
"""

DOMAIN = """
version: "3.1"
intents:
  - greet
  - book_hotel
  - inform
actions:
  - action_hotel_form
slots:
  recipient:
    type: text
    mappings:
      - type: from_llm
  amount:
    type: float
    mappings:
      - type: from_llm
  route_session_to_calm:
    type: bool
    mappings:
      - type: from_llm
responses:
  utter_ask_recipient:
    - text: Who should get the money?
  utter_ask_amount:
    - text: How much?
  utter_transfer_done:
    - text: Sent.
  utter_balance:
    - text: You have 100 dollars.
  utter_can_do_something_else:
    - text: Anything else?
  utter_greet:
    - text: Hello from the bank!
  utter_ask_hotel_city:
    - text: In which city?
  utter_hotel_booked:
    - text: Your hotel is booked.
  utter_lounge:
    - text: Yes, with coffee.
"""

# The NLU-based system: greetings, hotel bookings (reset after the booking: after utter_hotel_booked, not
# after the form action, which also runs without a reset), and an old balance story whose response the
# check_balance flow says too (so it tells nothing about the routing).
NLU_DATA = """
version: "3.1"
rules:
  - rule: greet
    steps:
      - intent: greet
      - action: utter_greet
stories:
  - story: book a hotel
    steps:
      - intent: book_hotel
      - action: action_hotel_form
      - action: utter_ask_hotel_city
      - intent: inform
      - action: action_hotel_form
      - action: utter_hotel_booked
      - action: action_reset_routing
  - story: old balance
    steps:
      - intent: ask_balance
      - action: utter_balance
  # An end-to-end story: an example CALM's IntentlessPolicy answers from, so its response tells nothing.
  - story: lounge
    steps:
      - user: is there a lounge at the branch?
      - action: utter_lounge
"""

CONFIG = """
recipe: default.v1
language: en
pipeline:
  - name: LLMBasedRouter
    calm_entry:
      sticky: handles money transfers and balances
    nlu_entry:
      sticky: handles hotel bookings
      non_sticky: handles greetings
  - name: CompactLLMCommandGenerator
policies:
  - name: FlowPolicy
"""

# The router decides these tests' turns (nothing in them shows the routing).
ROUTER_TESTS = """
test_cases:
  - test_case: a greeting goes to the NLU system for one turn
    steps:
      - user: hello there
        assertions:
          - slot_was_not_set:
              - name: recipient
      - user: send money to Ann
        assertions:
          - flow_started: transfer_money
          - slot_was_set:
              - name: recipient
                value: Ann
          - bot_uttered:
              utter_name: utter_ask_amount
      - user: 50 dollars
        assertions:
          - slot_was_set:
              - name: amount
                value: 50
          - bot_uttered:
              utter_name: utter_transfer_done
      - user: what's my balance
        assertions:
          - flow_started: check_balance

  - test_case: a hotel booking holds the NLU system until its story resets the routing
    steps:
      - user: I need a hotel room
        assertions:
          - slot_was_not_set:
              - name: recipient
      - user: in Paris
        assertions:
          - bot_uttered:
              utter_name: utter_hotel_booked
      - user: and send 20 to Bob
        assertions:
          - flow_started: transfer_money
          - slot_was_set:
              - name: recipient
                value: Bob
          - bot_uttered:
              utter_name: utter_ask_amount

  - test_case: the router sends a transfer to the NLU system
    steps:
      - user: transfer 10 to Cy
        assertions:
          - flow_started: transfer_money
"""

ROUTES = {
    "hello there": "B",
    "send money to Ann": "A",
    "what's my balance": "A",
    "I need a hotel room": "C",
    "and send 20 to Bob": "A",
    "transfer 10 to Cy": "C",
}
COMMANDS = {
    "send money to Ann": "start flow transfer_money\nset slot recipient Ann",
    "50 dollars": "set slot amount 50",
    "what's my balance": "start flow check_balance",
    "and send 20 to Bob": "start flow transfer_money\nset slot recipient Bob",
}

# What the tests show decides these turns, with either annotator.
EVIDENCE_TESTS = """
test_cases:
  # Nothing but the routing slot tells: set False, the session stays with the NLU system until the
  # test shows action_reset_routing.
  - test_case: the test shows the session handed to the NLU system
    steps:
      - user: I want a hotel in Rome
        assertions:
          - slot_was_set:
              - name: route_session_to_calm
                value: false
          - action_executed: action_hotel_form
      - user: for three nights
        assertions:
          - action_executed: action_reset_routing
      - user: show my balance
        assertions:
          - flow_started: check_balance

  - test_case: a greeting only the NLU rules answer
    steps:
      - user: hi
      - utter: utter_greet
      - user: transfer 5 to Dan
        assertions:
          - flow_started: transfer_money
          - slot_was_set:
              - name: recipient
                value: Dan
          - bot_uttered:
              utter_name: utter_ask_amount
      - user: "5"
        assertions:
          - slot_was_set:
              - name: amount
                value: 5
          - bot_uttered:
              utter_name: utter_transfer_done

  - test_case: the routing slot alone tells
    steps:
      - user: a room in Oslo please
        assertions:
          - slot_was_set:
              - name: route_session_to_calm
                value: false
      - user: two nights
        assertions:
          - slot_was_not_set:
              - name: recipient

  - test_case: a response both systems say tells nothing
    steps:
      - user: balance please
        assertions:
          - bot_uttered:
              utter_name: utter_balance

  - test_case: an end-to-end story's response tells nothing
    steps:
      - user: any lounge there?
        assertions:
          - bot_uttered:
              utter_name: utter_lounge
"""


@pytest.fixture
def bank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write(tmp_path / "bank" / "data" / "flows.yml", FLOWS)
    write(tmp_path / "bank" / "domain.yml", DOMAIN)
    write(tmp_path / "bank" / "data" / "nlu-based" / "stories.yml", NLU_DATA)
    write(tmp_path / "bank" / "config.yml", CONFIG)
    write(tmp_path / "bank" / "e2e" / "router.yml", ROUTER_TESTS)
    write(tmp_path / "bank" / "e2e" / "evidence.yml", EVIDENCE_TESTS)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "bank"


def user_message(request: ChatRequest | None) -> str:
    assert request is not None
    match = re.search(r'last message, "(.*)", one per line', request.prompt)
    assert match is not None, request.prompt[-300:]
    return match.group(1)


def routed_message(request: ChatRequest | None) -> str | None:
    assert request is not None
    match = re.search(r'User message: """(.*)"""', request.prompt)
    return match.group(1) if match else None


async def run(
    bank: Path, tests: str, llm_config: Path | None, annotator: str = "llm", stream: io.StringIO | None = None
) -> Path:
    out = bank.parent / f"out-{annotator}-{Path(tests).stem}"
    options = PrepareDataOptions(
        e2e_paths=(Path("bank/e2e") / tests,),
        assistant=Path("bank"),
        config=Path("bank/config.yml"),
        out=out,
        cache_dir=bank.parent / "cache",
        num_rephrases=0,
        concurrency=1,
        llm_config=llm_config,
        annotator=annotator,  # type: ignore[arg-type]
    )
    await prepare_data(options, LineReporter(stream or io.StringIO()))
    return out


def labels(out: Path, stem: str) -> dict[str, list[Any]]:
    conversations = read(out / "1_command_annotations" / f"{stem}.yml")["conversations"]
    return {
        c["original_test_case"].split("::")[1]: [s.get("llm_commands") for s in c["steps"] if "user" in s]
        for c in conversations
    }


def test_router_prompt_and_answers_as_rasa_has_them() -> None:
    """The default question is ftrecipe's own words (Rasa's text is not copied) with Rasa's variables: A is
    calm_entry.sticky, B nlu_entry.non_sticky, C nlu_entry.sticky; the answers parse as Rasa parses them."""
    router = RouterConfig("LLMBasedRouter", "handles money", "handles hotels", "handles greetings")
    assert router_prompt(router, "hi there") == (
        "Which assistant should handle the user's message?\n\n"
        "A: handles money\nB: handles greetings\nC: handles hotels\n\n"
        'User message: """hi there"""\n\n'
        "Answer with one letter: A, B or C."
    )
    assert router.prompt == DEFAULT_ROUTER_PROMPT
    assert [parse_router_answer(a) for a in (" A ", "B", "C", "a", "A.", "", None)] == [
        "calm",
        "nlu_once",
        "nlu_sticky",
        "nlu_sticky",
        "nlu_sticky",
        "nlu_sticky",
        "nlu_sticky",
    ]


async def test_llm_router_decides_turns_sticky_and_not(
    bank: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    def answer(request: ChatRequest) -> str:
        message = routed_message(request)
        if message is not None:
            return ROUTES[message]
        return COMMANDS[user_message(request)]

    llm_server.script(answer)
    # The router's own LLM (Rasa's defaults where its block is silent: temperature 0, one token).
    config = CONFIG.replace(
        "      non_sticky: handles greetings\n",
        "      non_sticky: handles greetings\n"
        f"    llm: {{provider: self-hosted, model: router-model, api_base: '{llm_server.base_url}'}}\n",
    )
    write(bank / "config.yml", config)
    out = await run(bank, "router.yml", llm_config)
    router_requests = [r.chat for r in llm_server.requests if routed_message(r.chat) is not None]
    assert {(c.model, c.temperature, c.max_tokens) for c in router_requests if c is not None} == {
        ("router-model", 0.0, 1)
    }
    generator_requests = [r.chat for r in llm_server.requests if routed_message(r.chat) is None]
    assert {c.model for c in generator_requests if c is not None} == {"gpt-4o"}
    routed = [m for r in llm_server.requests if (m := routed_message(r.chat)) is not None]
    # Sticky CALM after 'send money to Ann' skips the router for '50 dollars'; the flow's end runs the
    # bank's pattern_completed, whose action_reset_routing brings it back for 'what's my balance'. After C,
    # 'in Paris' is the NLU system's (no call); its story resets the routing before 'and send 20 to Bob'.
    assert sorted(routed) == sorted(
        [
            "hello there",
            "send money to Ann",
            "what's my balance",
            "I need a hotel room",
            "and send 20 to Bob",
            "transfer 10 to Cy",
        ]
    )  # tests run concurrently: the order across tests varies
    asked = [user_message(r.chat) for r in llm_server.requests if routed_message(r.chat) is None]
    assert sorted(asked) == sorted(
        ["send money to Ann", "50 dollars", "what's my balance", "and send 20 to Bob"]
    )

    summary = read(out / "result_summary.yaml")
    assert (summary["num_annotated_conversations"], summary["num_failed_conversations"]) == (2, 1)
    assert summary["num_ft_data_points"] == 4
    assert summary["num_nlu_routed_turns"] == 3  # hello there; I need a hotel room, in Paris
    assert summary["num_sub_agent_messages"] == 0
    assert labels(out, "router") == {
        "a greeting goes to the NLU system for one turn": [
            None,
            ["start flow transfer_money", "set slot recipient Ann"],
            ["set slot amount 50"],
            ["start flow check_balance"],
        ],
        "a hotel booking holds the NLU system until its story resets the routing": [
            None,
            None,
            ["start flow transfer_money", "set slot recipient Bob"],
        ],
    }
    points = [
        yaml.safe_load(line)
        for line in (out / "3_llm_finetune_data" / "llm_ft_data.jsonl").read_text().splitlines()
    ]
    assert [p["original_user_utterance"] for p in points] == [
        "send money to Ann",
        "50 dollars",
        "what's my balance",
        "and send 20 to Bob",
    ]
    # The NLU turns stay in the conversation the command generator sees next, as in Rasa's tracker.
    assert "USER: hello there" in points[0]["prompt"]
    failures = read(out / "1_command_annotations" / "failed_test_cases.yml")["failed_test_cases"]
    assert [(f["test_case"], f["turn_index"], f["actual"]) for f in failures] == [
        (
            "the router sends a transfer to the NLU system",
            0,
            "(the router sends this message to the NLU-based system (nlu_sticky), but the test asserts what "
            "the command generator did)",
        )
    ]


async def test_evidence_offline(bank: Path) -> None:
    stream = io.StringIO()
    out = await run(bank, "evidence.yml", None, annotator="assertions", stream=stream)
    # The run's last line says how many turns went to the NLU system, never silently.
    assert "3 data points: " in stream.getvalue()
    assert "; 5 turns routed to the NLU-based system, skipped; " in stream.getvalue()
    summary = read(out / "result_summary.yaml")
    assert (summary["num_annotated_conversations"], summary["num_failed_conversations"]) == (3, 2)
    assert summary["num_ft_data_points"] == 3
    # Rome (the slot set False), three nights (still False, then reset), hi, Oslo, two nights (still False)
    assert summary["num_nlu_routed_turns"] == 5
    assert labels(out, "evidence") == {
        "the test shows the session handed to the NLU system": [None, None, ["start flow check_balance"]],
        "a greeting only the NLU rules answer": [
            None,
            ["start flow transfer_money", "set slot recipient Dan"],
            ["set slot amount 5"],
        ],
        "the routing slot alone tells": [None, None],
    }
    failures = read(out / "1_command_annotations" / "failed_test_cases.yml")["failed_test_cases"]
    assert [(f["test_case"], f["turn_index"]) for f in failures] == [
        ("a response both systems say tells nothing", 0),
        ("an end-to-end story's response tells nothing", 0),
    ]
    assert all("the assertions do not say what the user's message did" in f["actual"] for f in failures)


async def test_evidence_with_the_llm_makes_no_call_for_nlu_turns(
    bank: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    answers = {
        "show my balance": "start flow check_balance",
        "transfer 5 to Dan": "start flow transfer_money\nset slot recipient Dan",
        "5": "set slot amount 5",
        "balance please": "start flow check_balance",
        "any lounge there?": "offtopic reply",
    }

    def answer(request: ChatRequest) -> str:
        message = routed_message(request)
        return "A" if message is not None else answers[user_message(request)]

    llm_server.script(answer)
    out = await run(bank, "evidence.yml", llm_config)
    routed = [m for r in llm_server.requests if (m := routed_message(r.chat)) is not None]
    # Turns the test shows routed to NLU never reach the router; 'show my balance' follows the story's reset.
    assert sorted(routed) == sorted(
        ["show my balance", "transfer 5 to Dan", "balance please", "any lounge there?"]
    )
    # Without an llm of its own, the router asks the command generator's, with Rasa's router defaults.
    router_requests = [r.chat for r in llm_server.requests if routed_message(r.chat) is not None]
    assert {(c.model, c.temperature, c.max_tokens) for c in router_requests if c is not None} == {
        ("gpt-4o", 0.0, 1)
    }
    summary = read(out / "result_summary.yaml")
    assert (summary["num_annotated_conversations"], summary["num_ft_data_points"]) == (5, 5)
    assert summary["num_nlu_routed_turns"] == 5


async def test_the_router_is_part_of_the_inputs_hash(bank: Path) -> None:
    """A config outside the assistant folder: only the router's own part of the hash tells two runs apart."""
    hashes: list[str] = []
    for sticky in ("handles hotel bookings", "handles hotel bookings and flights"):
        outside = bank.parent / "config.yml"
        write(outside, CONFIG.replace("sticky: handles hotel bookings", f"sticky: {sticky}"))
        (bank / "config.yml").unlink(missing_ok=True)
        out = bank.parent / f"out-{len(hashes)}"
        options = PrepareDataOptions(
            e2e_paths=(Path("bank/e2e/evidence.yml"),),
            assistant=Path("bank"),
            config=outside,
            out=out,
            cache_dir=bank.parent / "cache",
            num_rephrases=0,
            annotator="assertions",
        )
        await prepare_data(options)
        hashes.append(read(out / "manifest.json")["inputs_hash"])
    assert hashes[0] != hashes[1]
