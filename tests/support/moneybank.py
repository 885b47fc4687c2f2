"""The example MoneyBank assistant as test material: paths, run options, and the scripted command generator
(a hand-written table of labels keyed by the message and the state its prompt must show)."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from ftrecipe.dataprep.commands import Syntax
from ftrecipe.dataprep.e2e import UserStep, read_e2e_tests
from ftrecipe.dataprep.pipeline import PrepareDataOptions
from ftrecipe.dataprep.state import is_button_payload
from support.llm_server import ChatRequest, LLMServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "moneybank"
TESTS = EXAMPLE / "e2e_tests"


def annotated_messages() -> dict[str, list[str]]:
    """Each test's user messages that go to the command generator, in order."""
    messages: dict[str, list[str]] = {}
    for suite in read_e2e_tests([TESTS]):
        for test in suite.test_cases:
            messages[test.name] = [
                s.text for s in test.steps if isinstance(s, UserStep) and not is_button_payload(s.text)
            ]
    return messages


@pytest.fixture
def llm_config(tmp_path: Path, llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPENAI_API_KEY", llm_server.api_key or "")
    path = tmp_path / "llm.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "syntax": "v2",
                "llm": {"provider": "self-hosted", "model": "gpt-4o", "api_base": llm_server.base_url},
            }
        )
    )
    return path


def write_production_endpoints(path: Path, llm_server: LLMServer) -> Path:
    """An endpoints.yml as production has it: the config's model group `command_generator_llm` on
    `llm_server`, its key read from MONEYBANK_LLM_KEY (set that variable in the test)."""
    group = {
        "id": "command_generator_llm",
        "models": [
            {
                "provider": "self-hosted",
                "model": "gpt-4o",
                "api_base": llm_server.base_url,
                "api_key": "${MONEYBANK_LLM_KEY}",
            }
        ],
    }
    path.write_text(yaml.safe_dump({"model_groups": [group]}), encoding="utf-8")
    return path


def options(tmp_path: Path, llm_config: Path, **changes: Any) -> PrepareDataOptions:
    values: dict[str, Any] = {
        "e2e_paths": (TESTS,),
        "assistant": EXAMPLE,
        "llm_config": llm_config,
        "out": tmp_path / "out",
        "cache_dir": tmp_path / "cache",
        "concurrency": 4,
        "num_rephrases": 0,  # stage 1 only; tests/test_prepare_data_full.py covers rephrasing
    }
    values.update(changes)
    return PrepareDataOptions(**values)


# --------------------------------------------------------------------------------------------------------
# The scripted command generator: a hand-written table of labels, keyed by the message and the state the
# prompt must show (active flow, asked slot), which also says the flows listed and the slot values shown.
# Nothing here comes from the code under test: the labels and states are what the example suite and its
# assertions say, written out by hand; the prompt is read with regexes written for each template's layout.
# A prompt that lost its flow list, its current state, a slot value or the message is answered with an error
# (the server's non-retryable 500), so the conversation fails and the test with it.

# The flows the prompt offers: every user flow of the example but verify_identity (`if: False`: startable
# only from transfer_money's `call`), which the prompt lists only while it runs.
OFFERED: Final = frozenset(
    {"check_balance", "show_recent_transactions", "block_card", "replace_card", "transfer_money", "add_payee"}
)
WHILE_VERIFYING: Final = OFFERED | {"verify_identity"}


@dataclass(frozen=True)
class Label:
    """One annotated turn of the example suite: the message, the state its prompt shows, the commands (v2)."""

    test: str
    message: str
    flow: str | None  # the active flow the prompt shows; None: "no flow is active"
    asked: str | None  # the slot the assistant just asked for
    commands: tuple[str, ...]
    offered: frozenset[str] = OFFERED
    # The active flow's slots that hold a value, as the prompt shows them (the others show as unset).
    slots: tuple[tuple[str, str], ...] = ()

    @property
    def state(self) -> tuple[str, str | None, str | None]:
        return (self.message, self.flow, self.asked)


def _slots(text: str) -> tuple[tuple[str, str], ...]:
    """`"a=1, b=x y"` as ((a, 1), (b, x y))."""
    pairs = [item.split("=", 1) for item in text.split(", ") if item]
    return tuple((name, value) for name, value in pairs)


def _turns(test: str, *turns: tuple[str, ...]) -> list[Label]:
    """A test's turns as (message, active flow or "", asked slot or "", commands separated by ';', and in a
    flow the slots holding a value as `"name=value, ..."`)."""
    labels = []
    for message, flow, asked, commands, *filled in turns:
        assert bool(flow) == bool(filled), f"{message!r}: a turn in a flow, and only one, lists its slots"
        commands_ = tuple(c.strip() for c in commands.split(";"))
        labels.append(
            Label(test, message, flow or None, asked or None, commands_, slots=_slots(*filled or [""]))
        )
    return labels


T = "transfer_money"
LABELS: Final[tuple[Label, ...]] = (
    # accounts.yml
    *_turns(
        "check_checking_balance_in_one_message",
        (
            "what's my checking balance?",
            "",
            "",
            "start flow check_balance; set slot account_type checking",
        ),
    ),
    *_turns("check_balance_via_button", ("how much money do I have?", "", "", "start flow check_balance")),
    *_turns(
        "account_question_clarification",
        ("my account", "", "", "disambiguate flows check_balance show_recent_transactions"),
        # A clarification starts no flow: the choice is made with no flow active.
        ("the recent transactions", "", "", "start flow show_recent_transactions"),
        ("checking", "show_recent_transactions", "account_type", "set slot account_type checking", ""),
    ),
    *_turns(
        "recent_savings_transactions_in_one_message",
        (
            "show me the last payments on my savings account",
            "",
            "",
            "start flow show_recent_transactions; set slot account_type savings",
        ),
    ),
    *_turns(
        "balance_then_transactions_back_to_back",
        ("How much is in my savings?", "", "", "start flow check_balance; set slot account_type savings"),
        (
            "and what came in and out of my checking account lately?",
            "",
            "",
            "start flow show_recent_transactions; set slot account_type checking",
        ),
    ),
    # cards.yml
    *_turns(
        "block_lost_debit_card_and_order_replacement",
        (
            "I lost my debit card",
            "",
            "",
            "start flow block_card; set slot card_type debit; set slot reason_for_blocking lost",
        ),
        (
            "yes, block it right away",
            "block_card",
            "confirm_block_card",
            "set slot confirm_block_card True",
            "card_type=debit, reason_for_blocking=lost",
        ),
        (
            "yes please, send me a new one",
            "block_card",
            "wants_replacement",
            "set slot wants_replacement True",
            "card_type=debit, reason_for_blocking=lost, confirm_block_card=True",
        ),
        # block_card linked to replace_card, which skipped the card type (persisted) and asks the delivery.
        ("express", "replace_card", "delivery_speed", "set slot delivery_speed express", "card_type=debit"),
    ),
    *_turns(
        "block_stolen_credit_card_step_by_step",
        ("I need to freeze my card", "", "", "start flow block_card"),
        ("the credit one", "block_card", "card_type", "set slot card_type credit", ""),
        (
            "it was stolen",
            "block_card",
            "reason_for_blocking",
            "set slot reason_for_blocking stolen",
            "card_type=credit",
        ),
        (
            "yes do it",
            "block_card",
            "confirm_block_card",
            "set slot confirm_block_card True",
            "card_type=credit, reason_for_blocking=stolen",
        ),
        (
            "no thanks, I have another card",
            "block_card",
            "wants_replacement",
            "set slot wants_replacement False",
            "card_type=credit, reason_for_blocking=stolen, confirm_block_card=True",
        ),
    ),
    *_turns(
        "block_card_declined_at_confirmation",
        (
            "please block my credit card, I think it was used for fraud",
            "",
            "",
            "start flow block_card; set slot card_type credit; set slot reason_for_blocking fraud",
        ),
        (
            "hmm, no, keep it active for now",
            "block_card",
            "confirm_block_card",
            "set slot confirm_block_card False",
            "card_type=credit, reason_for_blocking=fraud",
        ),
    ),
    *_turns(
        "card_problem_clarification_then_replace",
        ("I have a problem with my card", "", "", "disambiguate flows block_card replace_card"),
        ("it's damaged, I just need a new one", "", "", "start flow replace_card"),
        ("my debit card", "replace_card", "card_type", "set slot card_type debit", ""),
        (
            "standard is fine",
            "replace_card",
            "delivery_speed",
            "set slot delivery_speed standard",
            "card_type=debit",
        ),
        (
            "yes, order it",
            "replace_card",
            "confirm_replace_card",
            "set slot confirm_replace_card True",
            "card_type=debit, delivery_speed=standard",
        ),
    ),
    *_turns(
        "replace_expiring_card_skip_delivery_question",
        (
            "My credit card expires next month, can I get a new one?",
            "",
            "",
            "start flow replace_card; set slot card_type credit",
        ),
        ("can I skip this one?", "replace_card", "delivery_speed", "skip question", "card_type=credit"),
        (
            "ok, express then",
            "replace_card",
            "delivery_speed",
            "set slot delivery_speed express",
            "card_type=credit",
        ),
        (
            "no, not for $5",
            "replace_card",
            "confirm_replace_card",
            "set slot confirm_replace_card False",
            "card_type=credit, delivery_speed=express",
        ),
    ),
    *_turns(
        "block_card_human_handoff_mid_flow",
        ("block my debit card", "", "", "start flow block_card; set slot card_type debit"),
        (
            "this is urgent, let me speak to a human agent",
            "block_card",
            "reason_for_blocking",
            "hand over",
            "card_type=debit",
        ),
    ),
    *_turns(
        "block_card_knowledge_question_mid_flow",
        ("I want to block my credit card", "", "", "start flow block_card; set slot card_type credit"),
        (
            "before that, is there a fee for blocking a card?",
            "block_card",
            "reason_for_blocking",
            "provide info",
            "card_type=credit",
        ),
        (
            "ok good. it's damaged, the chip stopped working",
            "block_card",
            "reason_for_blocking",
            "set slot reason_for_blocking damaged",
            "card_type=credit",
        ),
    ),
    # conversation_repair/repair.yml
    *_turns(
        "chitchat_greeting_then_balance",
        ("hey there, how's your day going?", "", "", "offtopic reply"),
        (
            "can you check my savings balance?",
            "",
            "",
            "start flow check_balance; set slot account_type savings",
        ),
    ),
    *_turns(
        "chitchat_in_the_middle_of_a_transfer",
        ("send money to Ana", "", "", f"start flow {T}; set slot recipient Ana"),
        ("are you a robot, by the way?", T, "amount", "offtopic reply", "recipient=Ana"),
        ("200", T, "amount", "set slot amount 200", "recipient=Ana"),
    ),
    *_turns(
        "knowledge_question_savings_interest_rate",
        ("what's the interest rate on your savings account?", "", "", "provide info"),
    ),
    *_turns(
        "knowledge_question_branch_hours",
        ("When are your branches open on Saturdays?", "", "", "provide info"),
        # No fixture: the customer is not verified, the transfer goes on to verify_identity.
        (
            "thanks! now I'd like to send money to Tom Becker",
            "",
            "",
            f"start flow {T}; set slot recipient Tom Becker",
        ),
    ),
    *_turns("human_handoff_direct_request", ("I want to talk to a real person", "", "", "hand over")),
    *_turns(
        "repeat_question_during_transfer",
        ("I want to transfer money to Kenji", "", "", f"start flow {T}; set slot recipient Kenji"),
        ("sorry, what did you say?", T, "amount", "repeat message", "recipient=Kenji"),
        ("eighty-five dollars", T, "amount", "set slot amount 85", "recipient=Kenji"),
    ),
    *_turns(
        "repeat_balance_answer",
        (
            "checking account balance please",
            "",
            "",
            "start flow check_balance; set slot account_type checking",
        ),
        ("can you say that again?", "", "", "repeat message"),
    ),
    *_turns(
        "cannot_handle_gibberish",
        ("asdf jkl qwerty", "", "", "cannot handle"),
        (
            "sorry, I meant: block my credit card",
            "",
            "",
            "start flow block_card; set slot card_type credit",
        ),
    ),
    *_turns(
        "cannot_handle_in_the_middle_of_a_flow",
        ("what's my balance", "", "", "start flow check_balance"),
        ("blorp zzz 42 ??", "check_balance", "account_type", "cannot handle", ""),
        ("savings", "check_balance", "account_type", "set slot account_type savings", ""),
    ),
    # payments/payees.yml
    *_turns(
        "add_payee_step_by_step",
        ("I want to add a new payee", "", "", "start flow add_payee"),
        ("Hannah Schmidt", "add_payee", "payee_name", "set slot payee_name Hannah Schmidt", ""),
        (
            "DE89 3704 0044 0532 0130 00",
            "add_payee",
            "iban",
            "set slot iban DE89370400440532013000",
            "payee_name=Hannah Schmidt",
        ),
        (
            "yes, save her",
            "add_payee",
            "confirm_add_payee",
            "set slot confirm_add_payee True",
            "payee_name=Hannah Schmidt, iban=DE89370400440532013000",
        ),
    ),
    *_turns(
        "add_payee_in_one_message_then_fix_iban",
        (
            "Save Luca Rossi as a payee, his IBAN is IT60X0542811101000000123456",
            "",
            "",
            "start flow add_payee; set slot payee_name Luca Rossi; set slot iban IT60X0542811101000000123456",
        ),
        (
            "sorry, the IBAN ends in 457, not 456",
            "add_payee",
            "confirm_add_payee",
            "set slot iban IT60X0542811101000000123457",
            "payee_name=Luca Rossi, iban=IT60X0542811101000000123456",
        ),
    ),
    *_turns(
        "add_payee_cancelled_without_iban",
        ("add a payee please", "", "", "start flow add_payee"),
        ("Oscar Nilsson", "add_payee", "payee_name", "set slot payee_name Oscar Nilsson", ""),
        (
            "forget it, I don't have his bank details yet",
            "add_payee",
            "iban",
            "cancel flow",
            "payee_name=Oscar Nilsson",
        ),
    ),
    # payments/transfers.yml
    *_turns(
        "transfer_happy_path_step_by_step",
        ("I want to send some money", "", "", f"start flow {T}"),
        ("Emma Clarke", T, "recipient", "set slot recipient Emma Clarke", ""),
        ("$50", T, "amount", "set slot amount 50", "recipient=Emma Clarke"),
        (
            "yes, go ahead",
            T,
            "confirm_transfer",
            "set slot confirm_transfer True",
            "recipient=Emma Clarke, amount=50.0",
        ),
    ),
    *_turns(
        "transfer_start_with_slots_and_button_confirm",
        (
            "send 50 dollars to John",
            "",
            "",
            f"start flow {T}; set slot recipient John; set slot amount 50",
        ),
    ),
    *_turns(
        "transfer_correct_amount_before_confirming",
        ("Transfer 40 to Priya", "", "", f"start flow {T}; set slot recipient Priya; set slot amount 40"),
        ("actually make it 60", T, "confirm_transfer", "set slot amount 60", "recipient=Priya, amount=40.0"),
        (
            "yep, that's right",
            T,
            "confirm_transfer",
            "set slot confirm_transfer True",
            "recipient=Priya, amount=60.0",
        ),
    ),
    *_turns(
        "transfer_correct_recipient",
        ("I need to pay Marco", "", "", f"start flow {T}; set slot recipient Marco"),
        ("1,250.75", T, "amount", "set slot amount 1250.75", "recipient=Marco"),
        (
            "oh wait, not Marco, it's for Marta",
            T,
            "confirm_transfer",
            "set slot recipient Marta",
            "recipient=Marco, amount=1250.75",
        ),
        (
            "correct, send it",
            T,
            "confirm_transfer",
            "set slot confirm_transfer True",
            "recipient=Marta, amount=1250.75",
        ),
    ),
    *_turns(
        "transfer_insufficient_funds",
        (
            "move 2,400 dollars to my landlord Oliver Grant",
            "",
            "",
            f"start flow {T}; set slot recipient Oliver Grant; set slot amount 2400",
        ),
        (
            "yes",
            T,
            "confirm_transfer",
            "set slot confirm_transfer True",
            "recipient=Oliver Grant, amount=2400.0",
        ),
    ),
    *_turns(
        "transfer_cancelled_while_asking_amount",
        ("I want to send money to Dimitri", "", "", f"start flow {T}; set slot recipient Dimitri"),
        ("hmm never mind, I already paid him yesterday", T, "amount", "cancel flow", "recipient=Dimitri"),
    ),
    *_turns(
        "transfer_declined_at_confirmation",
        (
            "pay fifty dollars to Sam Lee",
            "",
            "",
            f"start flow {T}; set slot recipient Sam Lee; set slot amount 50",
        ),
        (
            "no, don't send it",
            T,
            "confirm_transfer",
            "set slot confirm_transfer False",
            "recipient=Sam Lee, amount=50.0",
        ),
    ),
    # An unverified customer: transfer_money calls verify_identity, whose question shows among the
    # transfer's own (a `call` inlines the called flow), and which the prompt lists while it runs.
    *_turns(
        "transfer_with_identity_verification",
        ("send $75.50 to Noah", "", "", f"start flow {T}; set slot recipient Noah; set slot amount 75.5"),
    ),
    Label(
        "transfer_with_identity_verification",
        "my birthday is 14 March 1988",
        T,
        "date_of_birth",
        ("set slot date_of_birth 1988-03-14",),
        WHILE_VERIFYING,
        slots=_slots("recipient=Noah, amount=75.5"),
    ),
    *_turns(
        "transfer_with_identity_verification",
        (
            "yes please",
            T,
            "confirm_transfer",
            "set slot confirm_transfer True",
            "date_of_birth=1988-03-14, recipient=Noah, amount=75.5",
        ),
    ),
    *_turns(
        "transfer_identity_verification_fails", ("I'd like to make a transfer", "", "", f"start flow {T}")
    ),
    Label(
        "transfer_identity_verification_fails",
        "1990-01-01",
        T,
        "date_of_birth",
        ("set slot date_of_birth 1990-01-01",),
        WHILE_VERIFYING,
        slots=_slots(""),
    ),
    *_turns(
        "transfer_digression_to_check_balance",
        ("I want to send money to Sudarshana", "", "", f"start flow {T}; set slot recipient Sudarshana"),
        # A digression: the balance flow starts on top of the transfer, which resumes afterwards.
        (
            "wait, how much do I have in savings?",
            T,
            "amount",
            "start flow check_balance; set slot account_type savings",
            "recipient=Sudarshana",
        ),
        ("ok, send 300 then", T, "amount", "set slot amount 300", "recipient=Sudarshana"),
    ),
    *_turns(
        "transfer_skip_recipient_question",
        ("I want to send money", "", "", f"start flow {T}"),
        ("can we skip this question?", T, "recipient", "skip question", ""),
        ("fine, Lucy Park", T, "recipient", "set slot recipient Lucy Park", ""),
        ("100 bucks", T, "amount", "set slot amount 100", "recipient=Lucy Park"),
    ),
)


@dataclass(frozen=True)
class PromptLayout:
    """Where one prompt template shows what the table checks, as regexes written by hand for it."""

    syntax: Syntax  # the syntax the answers are written in
    message: re.Pattern[str]  # group 1: the user's last message
    active_flow: re.Pattern[str]  # group 1: the active flow
    no_flow: re.Pattern[str]  # what the prompt says when no flow is active
    asked: re.Pattern[str]  # group 1: the slot the assistant asked for
    flow_list: re.Pattern[str]  # group 1: the section listing the flows
    flow_name: re.Pattern[str]  # group 1 of each match in that section: a flow's id
    conversation: re.Pattern[str]  # group 1: the conversation, the latest user message last
    slot_section: re.Pattern[str]  # group 1: the active flow's slots (no match: none shown)
    slot_line: re.Pattern[str]  # in that section, groups 1 and 2: a slot's name and the value shown
    unset: str  # the value shown for a slot that holds none


_ML = re.MULTILINE
_SECTION = re.MULTILINE | re.DOTALL
# Our v2 and v3 templates (same layout; different command lists).
V2_LAYOUT: Final = PromptLayout(
    syntax="v2",
    message=re.compile(r'^Write the commands for the user\'s last message, "(.*)", one per line\.$', _ML),
    active_flow=re.compile(r"^## Current state\nActive flow: (\w+)$", _ML),
    no_flow=re.compile(r"^## Current state\nNo flow is active\.$", _ML),
    asked=re.compile(r"^The assistant asked for: (\w+)", _ML),
    flow_list=re.compile(r"^## Flows the user can start\n(.*?)^## Commands you can use$", _SECTION),
    flow_name=re.compile(r"^- (\w+): \S", _ML),
    conversation=re.compile(r"^## Conversation\n(.*?)\n\n## Your task$", _SECTION),
    slot_section=re.compile(r"^Slots of the active flow:\n(.*?)\n\n", _SECTION),
    slot_line=re.compile(r"^- (\w+) \(\w+\): (.*)$", _ML),
    unset="not set",
)
V3_LAYOUT: Final = replace(V2_LAYOUT, syntax="v3")
V1_LAYOUT: Final = PromptLayout(
    syntax="v1",
    message=re.compile(r'^The user just said: """(.*)"""$', _ML),
    active_flow=re.compile(r'^The active flow is "(\w+)"\.$', _ML),
    no_flow=re.compile(r"^No flow is active\.$", _ML),
    asked=re.compile(r'^The assistant is asking for "(\w+)"', _ML),
    flow_list=re.compile(
        r"^These are the flows the assistant can run:\n(.*?)^The conversation so far:$", _SECTION
    ),
    flow_name=re.compile(r"^(\w+): \S", _ML),
    conversation=re.compile(r'^The conversation so far:\n"""\n(.*?)\n"""$', _SECTION),
    slot_section=re.compile(r"^Its slots:\n(.*?)\n\n", _SECTION),
    slot_line=re.compile(r"^(\w+): (.*) \(\w+\)$", _ML),
    unset="undefined",
)

# Each v2 command as v1 and v3 write it (the table of docs in shared/rasa-formats.md), by its first words.
_V1: Final = {
    "start flow": "StartFlow({})",
    "set slot": "SetSlot({}, {})",
    "cancel flow": "CancelFlow()",
    "disambiguate flows": "Clarify({})",
    "provide info": "SearchAndReply()",
    "offtopic reply": "ChitChat()",
    "skip question": "SkipQuestion()",
    "hand over": "HumanHandoff()",
    "repeat message": "RepeatLastBotMessages()",
    "cannot handle": "CannotHandle()",
}


def in_syntax(command: str, syntax: Syntax) -> str:
    """One v2 command of the table as written in `syntax`."""
    if syntax == "v2":
        return command
    if syntax == "v3":
        return "search and reply" if command in ("provide info", "offtopic reply") else command
    for head, form in _V1.items():
        if command == head or command.startswith(head + " "):
            rest = command[len(head) :].split()
            if head == "set slot":
                return form.format(rest[0], " ".join(rest[1:]))
            return form.format(", ".join(rest))
    raise ValueError(f"not a v2 command: {command!r}")


class StateMismatch(AssertionError):
    """The prompt does not show what the table expects for its message (or the message has no label)."""


@dataclass(frozen=True)
class PromptState:
    message: str
    flow: str | None
    asked: str | None
    flows: frozenset[str]
    last_line: str
    slots: dict[str, str]  # the active flow's slots that hold a value, as shown


def _one(pattern: re.Pattern[str], prompt: str, what: str) -> str:
    found = pattern.findall(prompt)
    if len(found) != 1:
        raise StateMismatch(f"the prompt shows {what} {len(found)} times, not once: {prompt[-400:]!r}")
    return str(found[0])


def read_state(prompt: str, layout: PromptLayout) -> PromptState:
    """What the prompt shows, read with the layout's regexes; StateMismatch where a part is missing."""
    message = _one(layout.message, prompt, "the user's message")
    active = layout.active_flow.findall(prompt)
    if len(active) + len(layout.no_flow.findall(prompt)) != 1:
        raise StateMismatch(f"{message!r}: the prompt shows no current state (active flow or none)")
    asked = layout.asked.findall(prompt)
    if len(asked) > 1:
        raise StateMismatch(f"{message!r}: the prompt shows {len(asked)} asked slots")
    flow_list = _one(layout.flow_list, prompt, "the flow list")
    conversation = _one(layout.conversation, prompt, "the conversation")
    sections = layout.slot_section.findall(prompt)
    if len(sections) > 1:
        raise StateMismatch(f"{message!r}: the prompt shows the active flow's slots {len(sections)} times")
    shown = layout.slot_line.findall(sections[0]) if sections else []
    return PromptState(
        message,
        active[0] if active else None,
        asked[0] if asked else None,
        frozenset(layout.flow_name.findall(flow_list)),
        conversation.splitlines()[-1],
        {name: value for name, value in shown if value != layout.unset},
    )


_BY_STATE: Final = {label.state: label for label in LABELS}
_BY_MESSAGE: Final = {label.message: label for label in LABELS}
assert len(_BY_STATE) == len(LABELS), "two labels for one message and state"


class TableGenerator:
    """The scripted command generator: `llm_server.script(TableGenerator())`.

    Answers a prompt with the label of its (message, active flow, asked slot), once it has checked that the
    prompt lists the flows the label says, shows the slot values it says and ends its conversation with the
    message; anything else raises
    StateMismatch (the server answers a non-retryable 500 and keeps the error in `script_errors`).
    `rewrite` turns a prompt into the one the table knows (e.g. a rephrased message back into the original).
    """

    def __init__(self, layout: PromptLayout = V2_LAYOUT, rewrite: Callable[[str], str] | None = None) -> None:
        self.layout = layout
        self.rewrite = rewrite
        self._lock = threading.Lock()
        self.answered: list[Label] = []

    def label(self, prompt: str) -> Label:
        state = read_state(self.rewrite(prompt) if self.rewrite else prompt, self.layout)
        if state.message not in _BY_MESSAGE:
            raise StateMismatch(f"no label for the message {state.message!r}")
        label = _BY_STATE.get((state.message, state.flow, state.asked))
        if label is None:
            expected = [(x.flow, x.asked) for x in LABELS if x.message == state.message]
            raise StateMismatch(
                f"{state.message!r}: the prompt shows active flow {state.flow}, asked slot {state.asked}; "
                f"the table expects (flow, asked) in {expected}"
            )
        if state.flows != label.offered:
            raise StateMismatch(
                f"{state.message!r}: the prompt lists the flows {sorted(state.flows)}, "
                f"not {sorted(label.offered)}"
            )
        if state.last_line != self._user_line(state.message):
            raise StateMismatch(f"{state.message!r}: the conversation ends with {state.last_line!r}")
        if state.slots != dict(label.slots):
            raise StateMismatch(
                f"{state.message!r}: the prompt shows the slots {state.slots}, not {dict(label.slots)}"
            )
        return label

    @staticmethod
    def _user_line(message: str) -> str:
        return f"USER: {message}"

    def __call__(self, request: ChatRequest) -> str:
        label = self.label(request.prompt)
        with self._lock:
            self.answered.append(label)
        return "\n".join(in_syntax(c, self.layout.syntax) for c in label.commands)
