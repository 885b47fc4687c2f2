"""Assistants that Rasa accepts and the example does not exercise: default patterns the assistant never
defines, `action_ask_<slot>` questions, a collect without a question, flows listed by name in
`pattern_clarification_contains`, a custom command generator class and a sub-agent called from a flow.

The fixture assistant (a bakery) is written here for these tests. Each case runs prepare-data offline
(`--annotator assertions`) and checks the rendered prompts and the labels it writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.dataprep.assistant import load_assistant
from ftrecipe.dataprep.commands import StartFlow
from ftrecipe.dataprep.config import read_llm_config, read_rasa_config
from ftrecipe.dataprep.coverage import flow_coverage
from ftrecipe.dataprep.e2e import read_e2e_tests
from ftrecipe.dataprep.patterns import DEFAULT_PATTERN_IDS
from ftrecipe.dataprep.pipeline import PrepareDataOptions, prepare_data
from ftrecipe.dataprep.state import conversation
from ftrecipe.dataprep.yamlfile import InputError

DOMAIN = """\
slots:
  cake:
    type: categorical
    values: [lemon, chocolate]
    mappings: [{type: from_llm}]
  size:
    type: float
    mappings: [{type: from_llm}]
  candles:
    type: bool
    initial_value: false
    mappings: [{type: from_llm}]
  complaint:
    type: text
    mappings: [{type: from_llm}]
  pickup_day:
    type: text
    mappings: [{type: from_llm}]
  route_session_to_calm:  # the coexistence router's: never a command generator's `set slot`
    type: bool
    mappings: [{type: from_llm}]
responses:
  utter_ask_cake:
    - text: Lemon or chocolate?
  utter_cake_ordered:
    - text: Your {cake} cake is ordered.
  utter_cookies_ordered:
    - text: A box of cookies is on its way.
  utter_ask_complaint:
    - text: What went wrong?
  utter_ask_pickup_day:
    - text: Which day will you pick it up?
actions:
  - action_ask_size
"""

FLOWS = """\
flows:
  order_cake:
    name: order a cake
    description: Order a cake for pickup.
    steps:
      - collect: cake
        description: the cake's flavour
      - collect: size
        description: the cake's diameter in centimetres
      - collect: candles
      - action: utter_cake_ordered
  order_cookies:
    name: order cookies
    description: Order a box of cookies.
    steps:
      - action: utter_cookies_ordered
  complain:
    name: complain
    description: Complain about an order; a person takes over.
    steps:
      - collect: complaint
      - link: pattern_human_handoff
  design_cake:
    name: design a cake
    description: Design the decoration of a custom cake with the designer.
    steps:
      - call: cake_designer
      - collect: pickup_day
        description: the day the user picks the cake up
"""

SUB_AGENT = """\
agent:
  name: cake_designer
  protocol: a2a
  description: Designs a cake's decoration with the user.
configuration:
  agent_card: ./card.json
"""

TESTS = """\
test_cases:
  - test_case: cake asked by a custom action
    steps:
      - user: I'd like to order a cake
        assertions:
          - slot_was_set:
              - name: route_session_to_calm
                value: true
          - flow_started: order_cake
          - bot_uttered:
              utter_name: utter_ask_cake
      - user: lemon
        assertions:
          - slot_was_set:
              - name: cake
                value: lemon
          - action_executed: action_ask_size
      - user: 24 centimetres
        assertions:
          - slot_was_set:
              - name: size
                value: 24
          - bot_uttered:
              utter_name: utter_cake_ordered
  - test_case: complaint handed to a person
    steps:
      - user: my cake arrived squashed
        assertions:
          - flow_started: complain
          - bot_uttered:
              utter_name: utter_ask_complaint
      - user: the box was crushed
        assertions:
          - slot_was_set:
              - name: complaint
                value: the box was crushed
          - flow_started: pattern_human_handoff
          - bot_uttered:
              utter_name: utter_human_handoff_not_available
  - test_case: ambiguous order
    steps:
      - user: I want to order
        assertions:
          - pattern_clarification_contains:
              - order a cake
              - order cookies
  - test_case: cookies in the middle of a cake
    steps:
      - user: a cake please
        assertions:
          - flow_started: order_cake
          - bot_uttered:
              utter_name: utter_ask_cake
      - user: actually, first a box of cookies
        assertions:
          - flow_started: order_cookies
          - bot_uttered:
              utter_name: utter_ask_continue_interrupted_flow_confirmation
      - user: yes, chocolate
        assertions:
          - slot_was_set:
              - name: continue_interrupted_flow_confirmation
                value: true
              - name: cake
                value: chocolate
  - test_case: cake designed by the sub-agent
    steps:
      - user: help me design a birthday cake
        assertions:
          - flow_started: design_cake
      - user: blue roses and a unicorn on top
        assertions:
          - bot_uttered:
              text_matches: ".*unicorn.*"
      - user: perfect, that's it
        assertions:
          - bot_uttered:
              utter_name: utter_ask_pickup_day
      - user: Saturday
        assertions:
          - slot_was_set:
              - name: pickup_day
                value: Saturday
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def bakery(root: Path) -> Path:
    write(root / "domain.yml", DOMAIN)
    write(root / "data" / "flows.yml", FLOWS)
    write(root / "sub_agents" / "cake_designer" / "config.yml", SUB_AGENT)
    write(root / "e2e_tests" / "bakery.yml", TESTS)
    return root


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self, stage: str, detail: str) -> None:
        pass

    def log(self, line: str) -> None:
        self.lines.append(line)


async def run(root: Path, **changes: Any) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], Log]:
    """prepare-data offline; the summary, each test's data points (prompt, output) and the log."""
    values: dict[str, Any] = {
        "e2e_paths": (root / "e2e_tests",),
        "assistant": root,
        "annotator": "assertions",
        "num_rephrases": 0,
        "out": root.parent / "out",
        "cache_dir": root.parent / "cache",
    }
    values.update(changes)
    log = Log()
    result = await prepare_data(PrepareDataOptions(**values), log)
    points: dict[str, list[dict[str, Any]]] = {}
    for line in (root.parent / "out" / "3_llm_finetune_data" / "llm_ft_data.jsonl").read_text().splitlines():
        record = json.loads(line)
        points.setdefault(record["original_test_name"].rsplit("::", 1)[-1], []).append(record)
    return result.summary, points, log


def failed(root: Path) -> list[dict[str, Any]]:
    path = root.parent / "out" / "1_command_annotations" / "failed_test_cases.yml"
    return list(yaml.safe_load(path.read_text())["failed_test_cases"])


FLOW_LINES = (
    "- order_cake: Order a cake for pickup.",
    "- order_cookies: Order a box of cookies.",
    "- complain: Complain about an order; a person takes over.",
    "- design_cake: Design the decoration of a custom cake with the designer.",
)


def offers_user_flows_only(prompt: str) -> bool:
    section = prompt.split("## Flows the user can start", 1)[1].split("## Commands", 1)[0]
    return all(line in section for line in FLOW_LINES) and "pattern_" not in section


# ------------------------------------------------------------------------------------------ loading


def test_default_patterns_are_flows_unless_the_assistant_defines_its_own(tmp_path: Path) -> None:
    root = bakery(tmp_path / "bakery")
    write(
        root / "data" / "patterns.yml",
        "flows:\n  pattern_chitchat:\n    description: Our own small talk.\n    steps:\n"
        "      - action: utter_cookies_ordered\n",
    )
    assistant = load_assistant(root, exclude=(root / "e2e_tests",))
    required = {
        "pattern_human_handoff", "pattern_chitchat", "pattern_search", "pattern_cancel_flow",
        "pattern_correction", "pattern_clarification", "pattern_skip_question", "pattern_repeat_bot_messages",
        "pattern_cannot_handle", "pattern_internal_error", "pattern_completed", "pattern_continue_interrupted",
        "pattern_session_start", "pattern_code_change", "pattern_collect_information", "pattern_restart",
        "pattern_user_silence", "pattern_validate_slot",
    }  # fmt: skip
    assert required <= DEFAULT_PATTERN_IDS <= set(assistant.flows)
    assert assistant.flows["pattern_chitchat"].description == "Our own small talk."  # ours overrides
    assert assistant.flows["pattern_chitchat"].file == root / "data" / "patterns.yml"
    assert assistant.flows["pattern_human_handoff"].file is None  # Rasa's default
    assert [f.id for f in assistant.user_flows()] == [
        "order_cake",
        "order_cookies",
        "complain",
        "design_cake",
    ]
    assert assistant.knows_response("utter_ask_continue_interrupted_flow_confirmation")
    assert assistant.knows_response("utter_human_handoff_not_available")
    assert not assistant.knows_response("utter_no_such_thing")
    assert assistant.slots["continue_interrupted_flow_confirmation"].type == "bool"
    assert assistant.sub_agents == {"cake_designer": root / "sub_agents" / "cake_designer" / "config.yml"}
    assert assistant.flow_id("order a cake") == "order_cake"
    assert assistant.flow_id("order_cake") == "order_cake"
    assert assistant.flow_id("bake a cake") is None


def test_a_collect_without_a_question_is_a_warning(tmp_path: Path) -> None:
    assistant = load_assistant(bakery(tmp_path / "bakery"), exclude=(tmp_path / "bakery" / "e2e_tests",))
    # size is asked by action_ask_size; candles by nothing at all.
    assert assistant.warnings == (
        f"{tmp_path / 'bakery' / 'data' / 'flows.yml'}: flow 'order_cake', step '3_collect': collecting "
        "'candles' has neither the response 'utter_ask_candles' nor the action 'action_ask_candles' in the "
        "domain; the bot asks nothing there (Rasa warns too)",
    )


@pytest.mark.parametrize(
    ("flows", "message"),
    [
        (
            "flows:\n  f:\n    description: d\n    steps:\n      - collect: flavour\n",
            "flow 'f', step '1_collect': collects slot 'flavour', which no domain file defines",
        ),
        (
            "flows:\n  f:\n    description: d\n    steps:\n      - call: cake_painter\n",
            "flow 'f', step '1_call': calls 'cake_painter', which is neither a flow nor a sub-agent",
        ),
        (
            "flows:\n  f:\n    description: d\n    steps:\n      - link: pattern_teleport\n",
            "flow 'f', step '1_link': links unknown flow 'pattern_teleport'",
        ),
        (
            "flows:\n  f:\n    description: d\n    steps:\n      - action: a\n        next: nowhere\n",
            "next goes to unknown step 'nowhere'",
        ),
    ],
)
def test_what_rasa_rejects_stays_one_line(tmp_path: Path, flows: str, message: str) -> None:
    root = bakery(tmp_path / "bakery")
    write(root / "data" / "broken.yml", flows)
    with pytest.raises(InputError) as caught:
        load_assistant(root, exclude=(root / "e2e_tests",))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_sub_agent_config_without_a_name_is_one_line(tmp_path: Path) -> None:
    root = bakery(tmp_path / "bakery")
    write(root / "sub_agents" / "cake_designer" / "config.yml", "agent:\n  protocol: a2a\n")
    with pytest.raises(InputError, match=r"config.yml:1: a sub-agent config needs `agent: \{name: "):
        load_assistant(root, exclude=(root / "e2e_tests",))


# ------------------------------------------------------------------------------------------ prepare-data


async def test_prompts_and_labels_of_the_bakery(tmp_path: Path) -> None:
    root = bakery(tmp_path / "bakery")
    summary, points, log = await run(root)
    assert failed(root) == []
    assert summary["num_input_e2e_tests"] == 5
    assert summary["num_annotated_conversations"] == 5

    # action_ask_size asks for size: the third message answers it.
    cake = points["cake asked by a custom action"]
    assert [p["output"] for p in cake] == [
        "start flow order_cake",
        "set slot cake lemon",
        "set slot size 24",
    ]
    assert all(offers_user_flows_only(p["prompt"]) for p in cake)
    assert (
        "Active flow: order_cake\nThe assistant asked for: size (the cake's diameter in centimetres)"
        in (cake[2]["prompt"])
    )
    assert (
        "- cake (categorical): lemon\n- size (float): not set\n- candles (bool): False" in cake[2]["prompt"]
    )

    # The link to Rasa's own pattern_human_handoff starts it: no `hand over` from the user's message.
    complaint = points["complaint handed to a person"]
    assert [p["output"] for p in complaint] == [
        "start flow complain",
        "set slot complaint the box was crushed",
    ]
    assert "Active flow: complain\nThe assistant asked for: complaint\n" in complaint[1]["prompt"]
    assert "AI: What went wrong?" in complaint[1]["prompt"]

    # pattern_clarification_contains lists flow names; the command lists their ids.
    (ambiguous,) = points["ambiguous order"]
    assert ambiguous["output"] == "disambiguate flows order_cake order_cookies"
    assert "No flow is active." in ambiguous["prompt"] and offers_user_flows_only(ambiguous["prompt"])

    # The default pattern's question (not in the domain) makes its slot the one asked.
    interrupted = points["cookies in the middle of a cake"]
    assert [p["output"] for p in interrupted] == [
        "start flow order_cake",
        "start flow order_cookies",
        "set slot continue_interrupted_flow_confirmation True\nset slot cake chocolate",
    ]
    assert (
        "The assistant asked for: continue_interrupted_flow_confirmation, one of [True, False]"
        in (interrupted[2]["prompt"])
    )

    # The sub-agent answers the two messages in between: no data points for them.
    designed = points["cake designed by the sub-agent"]
    assert [p["original_user_utterance"] for p in designed] == ["help me design a birthday cake", "Saturday"]
    assert [p["output"] for p in designed] == ["start flow design_cake", "set slot pickup_day Saturday"]
    assert (
        "Active flow: design_cake\nThe assistant asked for: pickup_day (the day the user picks"
        in (designed[1]["prompt"])
    )
    assert "USER: blue roses and a unicorn on top\nUSER: perfect, that's it\n" in designed[1]["prompt"]
    assert summary["num_sub_agent_messages"] == 2
    assert summary["num_ft_data_points"] == 3 + 2 + 1 + 3 + 2

    warning = (
        f"{root / 'data' / 'flows.yml'}: flow 'order_cake', step '3_collect': collecting 'candles' has neither "
        "the response 'utter_ask_candles' nor the action 'action_ask_candles' in the domain; the bot asks "
        "nothing there (Rasa warns too)"
    )
    assert summary["warnings"] == [warning]
    assert f"warning: {warning}" in log.lines


async def test_a_sub_agent_interrupted_by_another_flow(tmp_path: Path) -> None:
    """While the sub-agent has the user, a message that starts another flow goes to the command generator."""
    root = bakery(tmp_path / "bakery")
    write(
        root / "e2e_tests" / "bakery.yml",
        """\
test_cases:
  - test_case: cookies while designing
    steps:
      - user: help me design a cake
        assertions:
          - flow_started: design_cake
      - user: and also a box of cookies
        assertions:
          - flow_started: order_cookies
          - bot_uttered:
              utter_name: utter_cookies_ordered
""",
    )
    summary, points, _ = await run(root)
    assert failed(root) == []
    turns = points["cookies while designing"]
    assert [p["output"] for p in turns] == ["start flow design_cake", "start flow order_cookies"]
    assert "Active flow: design_cake\nSlots of the active flow:" in turns[1]["prompt"]  # nothing asked
    assert summary["num_sub_agent_messages"] == 0


# ------------------------------------------------------------------------------------------ generator


CUSTOM_TEMPLATE = """\
flows: {% for flow in available_flows %}{{ flow.name }} {% endfor %}
flow: {{ current_flow }}
slot: {{ current_slot }}
message: {{ user_message }}
"""


def rasa_config(root: Path, generator: str) -> Path:
    write(root / "prompts" / "bakery.jinja2", CUSTOM_TEMPLATE)
    return write(
        root / "config.yml",
        f"""\
recipe: default.v1
pipeline:
  - name: LLMBasedRouter
    calm_entry:
      sticky: handles cakes
  - name: NLUCommandAdapter
  - name: {generator}
    llm:
      provider: openai
      model: gpt-4o
    prompt_template: prompts/bakery.jinja2
    flow_retrieval:
      active: false
""",
    )


async def test_a_custom_command_generator_class(tmp_path: Path) -> None:
    root = bakery(tmp_path / "bakery")
    config = rasa_config(root, "custom.bakery.MyCakeCommandGenerator")
    summary, points, log = await run(root, config=config)
    assert failed(root) == []
    cake = points["cake asked by a custom action"]
    assert cake[2]["prompt"] == (
        "flows: order_cake order_cookies complain design_cake \nflow: order_cake\nslot: size\n"
        "message: 24 centimetres\n"
    )
    assert [p["output"] for p in cake] == ["start flow order_cake", "set slot cake lemon", "set slot size 24"]
    params = yaml.safe_load((root.parent / "out" / "params.yaml").read_text())
    assert params["command_generator"]["syntax"] == "v2"
    assumption = (
        f"{config}: custom command generator 'MyCakeCommandGenerator': assuming command syntax v2 "
        "(CompactLLMCommandGenerator's); set commandGenerator.syntax (or syntax in --llm-config) if it speaks "
        "another"
    )
    assert summary["warnings"][0] == assumption
    assert f"warning: {assumption}" in log.lines


@pytest.mark.parametrize(
    ("generator", "syntax"),
    [
        ("custom.bakery.BakerySearchReadyLLMCommandGenerator", "v3"),
        ("custom.bakery.MyCompactLLMCommandGenerator", "v2"),
        ("custom.bakery.SingleStepBakeryCommandGenerator", "v1"),
        ("custom.my_module.MyLLMCommandGenerator", "v1"),
    ],
)
def test_a_custom_class_speaks_the_syntax_its_name_contains(
    tmp_path: Path, generator: str, syntax: str
) -> None:
    generator_config = read_rasa_config(rasa_config(tmp_path, generator), None)
    assert (generator_config.syntax, generator_config.warnings) == (syntax, ())
    assert generator_config.prompt_template == tmp_path / "prompts" / "bakery.jinja2"
    assert generator_config.llm is not None and generator_config.llm.model == "gpt-4o"


def test_an_explicit_syntax_settles_a_custom_class(tmp_path: Path) -> None:
    config = rasa_config(tmp_path, "custom.bakery.MyCakeCommandGenerator")
    ours = read_llm_config(write(tmp_path / "llm.yml", "syntax: v3\n"))
    resolved = ours.over(read_rasa_config(config, None))
    assert (resolved.syntax, resolved.warnings) == ("v3", ())
    # A known class's syntax is a fact: contradicting it stays an error.
    known = rasa_config(tmp_path / "known", "CompactLLMCommandGenerator")
    with pytest.raises(InputError, match="syntax v3 disagrees with"):
        ours.over(read_rasa_config(known, None))


def test_routers_and_adapters_are_no_command_generator(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.yml",
        "pipeline:\n  - name: LLMBasedRouter\n    calm_entry: {sticky: x}\n  - name: NLUCommandAdapter\n"
        "  - name: custom.MyCommandGenerator\n    threshold: 0.5\n",  # no generator keys
    )
    with pytest.raises(InputError, match="no LLM command generator in `pipeline:`"):
        read_rasa_config(config, None)


async def test_an_action_ask_shows_which_slot_the_bot_asks(tmp_path: Path) -> None:
    """The test shows `action_executed: action_ask_venue`: the next message answers venue, even where the
    flow's step order alone would have pointed at room."""
    root = tmp_path / "party"
    write(
        root / "domain.yml",
        """\
slots:
  guests: {type: float, mappings: [{type: from_llm}]}
  room: {type: text, mappings: [{type: from_llm}]}
  venue: {type: text, mappings: [{type: from_llm}]}
responses:
  utter_ask_guests: [{text: "How many guests?"}]
  utter_ask_room: [{text: "Which room?"}]
actions:
  - action_ask_venue
""",
    )
    write(
        root / "data" / "flows.yml",
        """\
flows:
  plan_party:
    description: Plan a party at the bakery or elsewhere.
    steps:
      - collect: guests
        next:
          - if: slots.guests > 10
            then: ask_venue
          - else: ask_room
      - id: ask_room
        collect: room
        next: END
      - id: ask_venue
        collect: venue
""",
    )
    write(
        root / "e2e_tests" / "party.yml",
        """\
test_cases:
  - test_case: a big party
    steps:
      - user: I want to throw a party
        assertions:
          - flow_started: plan_party
          - bot_uttered:
              utter_name: utter_ask_guests
      - user: about twenty people
        assertions:
          - slot_was_set:
              - name: guests
                value: 20
          - action_executed: action_ask_venue
      - user: the park next door
        assertions:
          - slot_was_set:
              - name: venue
                value: the park next door
""",
    )
    summary, points, _ = await run(root)
    assert failed(root) == []
    party = points["a big party"]
    assert [p["output"] for p in party] == [
        "start flow plan_party",
        "set slot guests 20",
        "set slot venue the park next door",
    ]
    assert "Active flow: plan_party\nThe assistant asked for: venue\n" in party[2]["prompt"]
    assert summary["warnings"] == []
    # A label that fills venue in the second message contradicts the test, which shows the bot asking it.
    assistant = load_assistant(root, exclude=(root / "e2e_tests",))
    (suite,) = read_e2e_tests([root / "e2e_tests"])
    replay = conversation(assistant, suite, suite.test_cases[0])
    first = next(replay)
    second = replay.send([StartFlow("plan_party")])
    assert (first.next_asks, second.next_asks) == (("guests",), ("venue",))


def test_coverage_counts_a_question_asked_by_an_action(tmp_path: Path) -> None:
    root = bakery(tmp_path / "bakery")
    write(
        root / "e2e_tests" / "bakery.yml",
        """\
test_cases:
  - test_case: cake left after the size question
    steps:
      - user: a lemon cake please
        assertions:
          - flow_started: order_cake
          - slot_was_set:
              - name: cake
                value: lemon
          - action_executed: action_ask_size
""",
    )
    assistant = load_assistant(root, exclude=(root / "e2e_tests",))
    (suite,) = read_e2e_tests([root / "e2e_tests"])
    rows = {row.flow_id: row for row in flow_coverage(assistant, suite.test_cases)}
    # cake (set), size (asked by action_ask_size); candles and the response are not shown.
    assert rows["order_cake"].missing_step_ids == ("3_collect", "4_action")
