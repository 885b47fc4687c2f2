"""The prompts prepare-data sends and trains on, pinned: one MoneyBank turn written out in full, by hand, for
each command syntax's default template and for an assistant's own template (tests/pinned_prompts/).

The turn: block_lost_debit_card_and_order_replacement (e2e_tests/cards.yml), the user's second message,
"yes, block it right away". It shows what a prompt must carry: the flows the user can start with their slots
(an ask-before-filling slot only once asked: confirm_block_card is listed, wants_replacement is not;
verify_identity, `if: False`, is not listed; transfer_money lists the date of birth of the flow it calls),
the active flow, the slot just asked with its allowed values, the slots' values, and the conversation with
the bot's response filled from the slots. Each run annotates the whole of cards.yml with the hand-written
table (support.moneybank), which checks the state every other prompt shows.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.dataprep.pipeline import prepare_data
from support.llm_server import LLMServer
from support.moneybank import (
    EXAMPLE,
    TESTS,
    V1_LAYOUT,
    V2_LAYOUT,
    V3_LAYOUT,
    PromptLayout,
    StateMismatch,
    TableGenerator,
    options,
    read_state,
    write_production_endpoints,
)

PINNED = Path(__file__).resolve().parent / "pinned_prompts"
MESSAGE = "yes, block it right away"
CARDS_TESTS = 7


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def llm_config(folder: Path, server: LLMServer, syntax: str) -> Path:
    path = folder / "llm.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "syntax": syntax,
                "llm": {"provider": "self-hosted", "model": "gpt-4o", "api_base": server.base_url},
            }
        ),
        encoding="utf-8",
    )
    return path


async def annotate_cards(tmp_path: Path, llm_server: LLMServer, layout: PromptLayout, **changes: Any) -> Path:
    """prepare-data over cards.yml against the table; every conversation passes. Returns the output folder."""
    llm_server.script(TableGenerator(layout))
    result = await prepare_data(options(tmp_path, e2e_paths=(TESTS / "cards.yml",), **changes))
    assert llm_server.script_errors == []
    assert result.summary["num_annotated_conversations"] == CARDS_TESTS
    return tmp_path / "out"


def check_pinned(
    out: Path, llm_server: LLMServer, layout: PromptLayout, expected: str, commands: str
) -> None:
    """The pinned turn's prompt, as sent to the LLM (once, alone) and as written to the data."""
    sent = [r for r in llm_server.chat_requests if read_state(r.prompt, layout).message == MESSAGE]
    assert len(sent) == 1
    assert sent[0].messages == [{"role": "user", "content": expected}]
    (record,) = [
        r
        for r in jsonl(out / "3_llm_finetune_data" / "llm_ft_data.jsonl")
        if r["original_user_utterance"] == MESSAGE
    ]
    assert record["prompt"] == expected
    assert record["output"] == commands
    split = out / "4_train_test_split" / "ft_splits"
    trained = [
        r for side in ("train", "val") for r in jsonl(split / f"{side}.jsonl") if r["prompt"] == expected
    ]
    assert trained == [{"prompt": expected, "completion": commands}]


@pytest.mark.parametrize(
    ("syntax", "layout", "commands"),
    [
        ("v1", V1_LAYOUT, "SetSlot(confirm_block_card, True)"),
        ("v2", V2_LAYOUT, "set slot confirm_block_card True"),
        ("v3", V3_LAYOUT, "set slot confirm_block_card True"),
    ],
)
async def test_default_template_of_each_syntax(
    tmp_path: Path,
    llm_server: LLMServer,
    monkeypatch: pytest.MonkeyPatch,
    syntax: str,
    layout: PromptLayout,
    commands: str,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", llm_server.api_key or "")
    config = llm_config(tmp_path, llm_server, syntax)
    out = await annotate_cards(tmp_path, llm_server, layout, llm_config=config)
    expected = (PINNED / f"moneybank_{syntax}.txt").read_text(encoding="utf-8")
    check_pinned(out, llm_server, layout, expected, commands)
    params = yaml.safe_load((out / "params.yaml").read_text(encoding="utf-8"))["command_generator"]
    assert (params["syntax"], params["prompt_template"]) == (
        syntax,
        f"builtin:command_prompt_{syntax}.jinja2",
    )


# Where the assistant's own template (pinned_prompts/own_template.jinja2) shows what the table checks.
OWN_LAYOUT = PromptLayout(
    syntax="v2",
    message=re.compile(r'^Message: "(.*)"$', re.MULTILINE),
    active_flow=re.compile(r"^State: (\w+) asks ", re.MULTILINE),
    no_flow=re.compile(r"^State: idle$", re.MULTILINE),
    asked=re.compile(r"^State: \w+ asks (?!nothing )(\w+) ", re.MULTILINE),
    flow_list=re.compile(r"Known flows:\n(.*?)\n\nState: ", re.DOTALL),
    flow_name=re.compile(r'^\d+\. (\w+) "', re.MULTILINE),
    conversation=re.compile(r"^Conversation:\n(.*?)\nMessage: ", re.MULTILINE | re.DOTALL),
    # It shows only the slots that hold a value, each as a JSON string.
    slot_section=re.compile(r"^State: .*?\n(.*?)^Conversation:$", re.MULTILINE | re.DOTALL),
    slot_line=re.compile(r'^(\w+) := "(.*)"$', re.MULTILINE),
    unset="",
)


async def test_the_assistants_own_template(
    tmp_path: Path, llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Named in the assistant's config.yml (`prompt_template` of its CompactLLMCommandGenerator), as users
    bring their production template; it uses Jinja features Rasa's templates use (loop variables, filters,
    Rasa's `to_json_escaped_string`, a filtered loop)."""
    monkeypatch.setenv("MONEYBANK_LLM_KEY", llm_server.api_key or "")
    shutil.copy(PINNED / "own_template.jinja2", tmp_path / "own_template.jinja2")
    config = yaml.safe_load((EXAMPLE / "config.yml").read_text(encoding="utf-8"))
    config["pipeline"][0]["prompt_template"] = "own_template.jinja2"
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    write_production_endpoints(tmp_path / "endpoints.yml", llm_server)
    out = await annotate_cards(
        tmp_path,
        llm_server,
        OWN_LAYOUT,
        llm_config=None,
        config=tmp_path / "config.yml",
        endpoints=tmp_path / "endpoints.yml",
    )
    expected = (PINNED / "moneybank_own_template.txt").read_text(encoding="utf-8")
    check_pinned(out, llm_server, OWN_LAYOUT, expected, "set slot confirm_block_card True")
    params = yaml.safe_load((out / "params.yaml").read_text(encoding="utf-8"))["command_generator"]
    assert params["prompt_template"] == str(tmp_path / "own_template.jinja2")


V2_PROMPT = (PINNED / "moneybank_v2.txt").read_text(encoding="utf-8")
FLOW_LIST = V2_PROMPT[V2_PROMPT.index("- check_balance:") : V2_PROMPT.index("\n## Commands you can use")]


def test_the_table_answers_the_pinned_prompt() -> None:
    assert TableGenerator().label(V2_PROMPT).commands == ("set slot confirm_block_card True",)


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        (FLOW_LIST, "", "lists the flows []"),
        ("- add_payee: Save", "- pay_bills: Save", "lists the flows"),
        ("Active flow: block_card\n", "", "shows no current state"),
        ("Active flow: block_card", "Active flow: replace_card", "shows active flow replace_card"),
        ("asked for: confirm_block_card", "asked for: reason_for_blocking", "asked slot reason_for_blocking"),
        ("- reason_for_blocking (text): lost", "- reason_for_blocking (text): not set", "shows the slots"),
        ("- card_type (categorical): debit", "- card_type (categorical): credit", "shows the slots"),
        ("USER: yes, block it right away\n\n", "\n", "the conversation ends with"),
        ('message, "yes, block it right away"', 'message, "yes, block it"', "no label for the message"),
    ],
)
def test_the_table_refuses_a_prompt_that_lost_its_state(old: str, new: str, complaint: str) -> None:
    assert old in V2_PROMPT
    with pytest.raises(StateMismatch, match=re.escape(complaint)):
        TableGenerator().label(V2_PROMPT.replace(old, new, 1))


async def test_the_offline_annotator_trains_on_the_same_prompt(tmp_path: Path) -> None:
    """`--annotator assertions` (no LLM) writes the pinned v2 prompt, labelled by the assertions."""
    result = await prepare_data(
        options(tmp_path, None, e2e_paths=(TESTS / "cards.yml",), annotator="assertions")
    )
    assert result.summary["num_annotated_conversations"] == CARDS_TESTS
    (record,) = [
        r
        for r in jsonl(tmp_path / "out" / "3_llm_finetune_data" / "llm_ft_data.jsonl")
        if r["original_user_utterance"] == MESSAGE
    ]
    assert record["prompt"] == V2_PROMPT
    assert record["output"] == "set slot confirm_block_card True"
