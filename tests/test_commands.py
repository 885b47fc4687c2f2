"""Command parsing/serialising: the contract between training completions, model outputs and evaluation."""

from __future__ import annotations

import random
from dataclasses import FrozenInstanceError

import pytest

from ftrecipe.dataprep.commands import (
    COMMAND_TYPES,
    SYNTAXES,
    CancelFlow,
    CannotHandle,
    ChitChat,
    Clarify,
    Command,
    HumanHandoff,
    NoArgCommand,
    RepeatLastBotMessages,
    SearchAndReply,
    SetSlot,
    SkipQuestion,
    StartFlow,
    Syntax,
    command_type,
    commands_equal,
    fold_for_syntax,
    format_command,
    format_commands,
    normalize_commands,
    normalize_slot_value,
    parse_commands,
    values_match,
)

ALL_SYNTAXES: tuple[Syntax, ...] = ("v1", "v2", "v3")

# One of each command, canonical (as parsing produces it).
ONE_OF_EACH: list[Command] = [
    StartFlow("transfer_money"),
    SetSlot("recipient", "John Smith"),
    CancelFlow(),
    Clarify(("add_card", "replace_card")),
    SkipQuestion(),
    SearchAndReply(),
    ChitChat(),
    HumanHandoff(),
    RepeatLastBotMessages(),
    CannotHandle(),
]

# The exact text each syntax writes for ONE_OF_EACH.
EXPECTED_TEXT: dict[Syntax, list[str]] = {
    "v1": [
        "StartFlow(transfer_money)",
        "SetSlot(recipient, John Smith)",
        "CancelFlow()",
        "Clarify(add_card, replace_card)",
        "SkipQuestion()",
        "SearchAndReply()",
        "ChitChat()",
        "HumanHandoff()",
        "RepeatLastBotMessages()",
        "CannotHandle()",
    ],
    "v2": [
        "start flow transfer_money",
        "set slot recipient John Smith",
        "cancel flow",
        "disambiguate flows add_card replace_card",
        "skip question",
        "provide info",
        "offtopic reply",
        "hand over",
        "repeat message",
        "cannot handle",
    ],
    "v3": [
        "start flow transfer_money",
        "set slot recipient John Smith",
        "cancel flow",
        "disambiguate flows add_card replace_card",
        "skip question",
        "search and reply",
        "search and reply",  # chitchat is folded into search and reply in v3
        "hand over",
        "repeat message",
        "cannot handle",
    ],
}

ROUND_TRIP_CASES = [
    pytest.param(command, syntax, id=f"{syntax}-{command_type(command).replace(' ', '_')}")
    for syntax in ALL_SYNTAXES
    for command in ONE_OF_EACH
    if not (syntax == "v3" and isinstance(command, ChitChat))
]


# ------------------------------------------------------------------------------------------ basics


def test_command_types_are_stable_and_cover_every_command() -> None:
    assert COMMAND_TYPES == (
        "start flow",
        "set slot",
        "cancel flow",
        "clarify",
        "skip question",
        "search and reply",
        "chitchat",
        "human handoff",
        "repeat message",
        "cannot handle",
    )
    assert [command_type(c) for c in ONE_OF_EACH] == list(COMMAND_TYPES)
    assert SYNTAXES == ALL_SYNTAXES


def test_commands_are_frozen_and_hashable() -> None:
    command = SetSlot("a", "b")
    with pytest.raises(FrozenInstanceError):
        command.value = "c"  # type: ignore[misc]
    assert len({SetSlot("a", "b"), SetSlot("a", "b"), Clarify(("x", "y")), Clarify(("x", "y"))}) == 2


@pytest.mark.parametrize(
    ("syntax", "index"),
    [pytest.param(s, i, id=f"{s}-{i}") for s in ALL_SYNTAXES for i in range(len(ONE_OF_EACH))],
)
def test_format_command_exact_text(syntax: Syntax, index: int) -> None:
    assert format_command(ONE_OF_EACH[index], syntax) == EXPECTED_TEXT[syntax][index]


@pytest.mark.parametrize("syntax", ALL_SYNTAXES)
def test_format_commands_one_per_line_without_trailing_newline(syntax: Syntax) -> None:
    text = format_commands(ONE_OF_EACH, syntax)
    assert text.split("\n") == EXPECTED_TEXT[syntax]
    assert not text.endswith("\n")
    assert format_commands([], syntax) == ""


@pytest.mark.parametrize(("command", "syntax"), ROUND_TRIP_CASES)
def test_round_trip_every_command_every_syntax(command: Command, syntax: Syntax) -> None:
    assert parse_commands(format_command(command, syntax), syntax) == [command]


@pytest.mark.parametrize("syntax", ALL_SYNTAXES)
def test_round_trip_all_commands_together(syntax: Syntax) -> None:
    expected = fold_for_syntax(ONE_OF_EACH, syntax)
    assert parse_commands(format_commands(ONE_OF_EACH, syntax), syntax) == expected


def test_v3_folds_chitchat_into_search_and_reply() -> None:
    assert format_command(ChitChat(), "v3") == "search and reply"
    assert parse_commands("search and reply", "v3") == [SearchAndReply()]
    # tolerance: the v2 keyword still means chitchat in v3
    assert parse_commands("offtopic reply", "v3") == [ChitChat()]
    assert fold_for_syntax([ChitChat(), SearchAndReply(), CancelFlow()], "v3") == [
        SearchAndReply(),
        CancelFlow(),
    ]
    assert fold_for_syntax([ChitChat()], "v2") == [ChitChat()]


@pytest.mark.parametrize(
    ("text", "syntax", "expected"),
    [
        pytest.param("provide info", "v3", [SearchAndReply()], id="v3-accepts-provide-info"),
        pytest.param("search and reply", "v2", [SearchAndReply()], id="v2-accepts-search-and-reply"),
    ],
)
def test_knowledge_keywords_are_accepted_across_v2_v3(
    text: str, syntax: Syntax, expected: list[Command]
) -> None:
    assert parse_commands(text, syntax) == expected


@pytest.mark.parametrize("syntax", ALL_SYNTAXES)
def test_none_value_round_trips(syntax: Syntax) -> None:
    text = format_command(SetSlot("amount", None), syntax)
    assert text == ("SetSlot(amount, None)" if syntax == "v1" else "set slot amount None")
    assert parse_commands(text, syntax) == [SetSlot("amount", None)]


def test_unknown_syntax_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown command syntax"):
        parse_commands("cancel flow", "v4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown command syntax"):
        format_command(CancelFlow(), "v9")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ normalisation

FLOWS = {"transfer_money", "add_card", "replace_card", "check_balance"}
SLOTS = {"recipient", "amount", "note"}


@pytest.mark.parametrize("syntax", ALL_SYNTAXES)
@pytest.mark.parametrize(
    ("commands", "flows", "slots", "expected"),
    [
        pytest.param(
            [StartFlow("unknown_flow"), StartFlow("transfer_money")],
            FLOWS,
            None,
            [StartFlow("transfer_money")],
            id="unknown-flow-dropped",
        ),
        pytest.param(
            [StartFlow("unknown_flow")],
            None,
            None,
            [StartFlow("unknown_flow")],
            id="unknown-flow-kept-without-flows",
        ),
        pytest.param(
            [StartFlow("unknown_flow")], FLOWS, None, [CannotHandle()], id="only-unknown-flow-cannot-handle"
        ),
        pytest.param(
            [SetSlot("flow_name", "transfer_money")],
            None,
            None,
            [StartFlow("transfer_money")],
            id="flow-name-starts",
        ),
        pytest.param(
            [SetSlot("flow_name", "nope")], FLOWS, None, [CannotHandle()], id="flow-name-unknown-flow"
        ),
        pytest.param(
            [SetSlot("flow_name", None)], None, None, [CannotHandle()], id="flow-name-without-value"
        ),
        pytest.param(
            [SetSlot("flow_name", "transfer_money")],
            None,
            SLOTS,
            [StartFlow("transfer_money")],
            id="flow-name-not-a-slot",
        ),
        pytest.param(
            [SetSlot("colour", "red"), SetSlot("amount", "5")],
            None,
            SLOTS,
            [SetSlot("amount", "5")],
            id="unknown-slot-dropped",
        ),
        pytest.param(
            [SetSlot("colour", "red")], None, None, [SetSlot("colour", "red")], id="unknown-slot-kept"
        ),
        pytest.param(
            [Clarify(("replace_card", "add_card", "add_card"))],
            None,
            None,
            [Clarify(("add_card", "replace_card"))],
            id="clarify-sorted-deduped",
        ),
        pytest.param(
            [Clarify(("nope", "replace_card", "add_card"))],
            FLOWS,
            None,
            [Clarify(("add_card", "replace_card"))],
            id="clarify-filtered",
        ),
        pytest.param(
            [Clarify(("nope", "add_card"))],
            FLOWS,
            None,
            [StartFlow("add_card")],
            id="clarify-one-known-starts",
        ),
        pytest.param(
            [Clarify(("add_card", "add_card"))], None, None, [StartFlow("add_card")], id="clarify-one-dedup"
        ),
        pytest.param(
            [Clarify(("nope", "other"))], FLOWS, None, [CannotHandle()], id="clarify-none-known-dropped"
        ),
        pytest.param(
            [StartFlow("add_card"), CancelFlow(), StartFlow("add_card"), CancelFlow()],
            None,
            None,
            [StartFlow("add_card"), CancelFlow()],
            id="duplicates-removed-first-kept",
        ),
        pytest.param(
            [Clarify(("add_card", "nope")), StartFlow("add_card")],
            FLOWS,
            None,
            [StartFlow("add_card")],
            id="duplicate-after-clarify-collapse",
        ),
        pytest.param(
            [SetSlot("amount", "5"), SetSlot("amount", "6")],
            None,
            None,
            [SetSlot("amount", "5"), SetSlot("amount", "6")],
            id="different-values-kept",
        ),
        pytest.param([], None, None, [CannotHandle()], id="empty-cannot-handle"),
    ],
)
def test_normalisation_rules(
    syntax: Syntax,
    commands: list[Command],
    flows: set[str] | None,
    slots: set[str] | None,
    expected: list[Command],
) -> None:
    assert normalize_commands(commands, flows=flows, slots=slots) == expected
    # the same rules apply to parsed text, in every syntax
    text = format_commands(commands, syntax)
    assert parse_commands(text, syntax, flows=flows, slots=slots) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("John", "John", id="plain"),
        pytest.param("  John  ", "John", id="spaces"),
        pytest.param('"John"', "John", id="double-quotes"),
        pytest.param("'John'", "John", id="single-quotes"),
        pytest.param("`John`", "John", id="backticks"),
        pytest.param(' " John Smith " ', "John Smith", id="quotes-and-spaces"),
        pytest.param('"John', "John", id="lone-leading-quote"),
        pytest.param("John'", "John", id="lone-trailing-quote"),
        pytest.param("it's", "it's", id="inner-apostrophe"),
        pytest.param('he said "hi"', 'he said "hi"', id="inner-quotes-kept"),
        pytest.param("", None, id="empty"),
        pytest.param('""', None, id="empty-quoted"),
        pytest.param("None", None, id="None"),
        pytest.param("none", None, id="none-lower"),
        pytest.param("NULL", None, id="NULL"),
        pytest.param("null", None, id="null"),
        pytest.param("undefined", None, id="undefined"),
        pytest.param("Undefined", None, id="Undefined"),
        pytest.param("[missing]", None, id="missing"),
        pytest.param("[MISSING INFORMATION]", None, id="missing-information"),
        pytest.param('"None"', None, id="quoted-None"),
        pytest.param(None, None, id="python-None"),
        pytest.param("nonexistent", "nonexistent", id="not-a-null-word"),
        pytest.param("2,400", "2,400", id="commas-kept"),
        pytest.param("0", "0", id="zero"),
        pytest.param("false", "false", id="false-is-a-value"),
    ],
)
def test_normalize_slot_value(raw: str | None, expected: str | None) -> None:
    assert normalize_slot_value(raw) == expected


@pytest.mark.parametrize("syntax", ALL_SYNTAXES)
@pytest.mark.parametrize(
    "null", ['""', "None", "null", "undefined", "[missing]", "[missing information]", "NULL"]
)
def test_null_values_parse_to_none(syntax: Syntax, null: str) -> None:
    text = f"SetSlot(amount, {null})" if syntax == "v1" else f"set slot amount {null}"
    assert parse_commands(text, syntax) == [SetSlot("amount", None)]


# -------------------------------------------------------------------------------- tolerant parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("- start flow transfer_money", [StartFlow("transfer_money")], id="dash-bullet"),
        pytest.param("* start flow transfer_money", [StartFlow("transfer_money")], id="star-bullet"),
        pytest.param("• start flow transfer_money", [StartFlow("transfer_money")], id="dot-bullet"),
        pytest.param("1. start flow transfer_money", [StartFlow("transfer_money")], id="numbered-dot"),
        pytest.param("12) start flow transfer_money", [StartFlow("transfer_money")], id="numbered-paren"),
        pytest.param("`start flow transfer_money`", [StartFlow("transfer_money")], id="backticks"),
        pytest.param(
            "- `start flow transfer_money`.", [StartFlow("transfer_money")], id="bullet-backticks-period"
        ),
        pytest.param('"start flow transfer_money"', [StartFlow("transfer_money")], id="double-quoted-line"),
        pytest.param("'cancel flow'", [CancelFlow()], id="single-quoted-line"),
        pytest.param("start flow 'transfer_money'", [StartFlow("transfer_money")], id="quoted-flow"),
        pytest.param("start flow transfer_money.", [StartFlow("transfer_money")], id="period"),
        pytest.param("START FLOW transfer_money", [StartFlow("transfer_money")], id="upper-keywords"),
        pytest.param("Start  Flow   transfer_money  ", [StartFlow("transfer_money")], id="extra-spaces"),
        pytest.param("\tstart flow transfer_money\r", [StartFlow("transfer_money")], id="tabs-cr"),
        pytest.param("Cancel Flow.", [CancelFlow()], id="cancel-mixed-case-period"),
        pytest.param("  hand   over  ", [HumanHandoff()], id="hand-over-spaces"),
        pytest.param("3. Skip question", [SkipQuestion()], id="skip-numbered"),
        pytest.param("- repeat message", [RepeatLastBotMessages()], id="repeat"),
        pytest.param("CANNOT HANDLE", [CannotHandle()], id="cannot-handle-upper"),
        pytest.param("Offtopic Reply", [ChitChat()], id="offtopic"),
        pytest.param(
            "set slot recipient John Smith", [SetSlot("recipient", "John Smith")], id="value-spaces"
        ),
        pytest.param("SET SLOT recipient John", [SetSlot("recipient", "John")], id="set-slot-upper"),
        pytest.param(
            "set  slot  recipient   John  Smith ", [SetSlot("recipient", "John  Smith")], id="set-slot-spaces"
        ),
        pytest.param(
            'set slot recipient "John Smith"', [SetSlot("recipient", "John Smith")], id="value-quoted"
        ),
        pytest.param('set slot "recipient" "John"', [SetSlot("recipient", "John")], id="name-quoted"),
        pytest.param("- `set slot recipient John`", [SetSlot("recipient", "John")], id="value-backticks"),
        pytest.param("set slot amount 50.", [SetSlot("amount", "50")], id="value-final-period"),
        pytest.param("set slot amount 50.5", [SetSlot("amount", "50.5")], id="value-decimal-point"),
        pytest.param(
            "set slot city Washington D.C.", [SetSlot("city", "Washington D.C.")], id="value-abbrev"
        ),
        pytest.param(
            'set slot company "Acme Inc."', [SetSlot("company", "Acme Inc.")], id="value-quoted-period"
        ),
        pytest.param('set slot company "Acme".', [SetSlot("company", "Acme")], id="value-quoted-then-period"),
        pytest.param("set slot amount 2,400", [SetSlot("amount", "2,400")], id="value-comma"),
        pytest.param("set slot note it's fine", [SetSlot("note", "it's fine")], id="value-apostrophe"),
        pytest.param("set slot amount", [SetSlot("amount", None)], id="value-missing"),
        pytest.param(
            "disambiguate flows replace_card add_card",
            [Clarify(("add_card", "replace_card"))],
            id="clarify-sorted",
        ),
        pytest.param(
            "Disambiguate Flows add_card, 'replace_card'",
            [Clarify(("add_card", "replace_card"))],
            id="clarify-commas",
        ),
        pytest.param("disambiguate flows add_card", [StartFlow("add_card")], id="clarify-one"),
        pytest.param("disambiguate flows", [CannotHandle()], id="clarify-none"),
        pytest.param("start flow", [CannotHandle()], id="start-flow-no-id"),
        pytest.param("", [CannotHandle()], id="empty"),
        pytest.param("   \n\n  ", [CannotHandle()], id="blank-lines"),
        pytest.param("I am not sure what to do.", [CannotHandle()], id="prose-only"),
        pytest.param("I will start flow transfer_money now", [CannotHandle()], id="keyword-mid-sentence"),
        pytest.param("StartFlow(transfer_money)", [CannotHandle()], id="v1-text-is-not-v2"),
        pytest.param("cancel flow transfer_money", [CannotHandle()], id="cancel-takes-no-argument"),
        pytest.param("skip questions please", [CannotHandle()], id="keyword-prefix-only"),
        pytest.param(
            "Sure! Here are the actions:\n```\n- start flow transfer_money\n- set slot amount 50\n```\nHope it helps.",
            [StartFlow("transfer_money"), SetSlot("amount", "50")],
            id="prose-and-fences-around",
        ),
        pytest.param(
            "start flow transfer_money\nstart flow transfer_money\ncancel flow",
            [StartFlow("transfer_money"), CancelFlow()],
            id="duplicate-lines",
        ),
    ],
)
@pytest.mark.parametrize("syntax", ["v2", "v3"])
def test_compact_tolerant_parsing(syntax: Syntax, text: str, expected: list[Command]) -> None:
    assert parse_commands(text, syntax) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("StartFlow(transfer_money)", [StartFlow("transfer_money")], id="start"),
        pytest.param('StartFlow("transfer_money")', [StartFlow("transfer_money")], id="start-quoted"),
        pytest.param("startflow( transfer_money )", [StartFlow("transfer_money")], id="start-lower-spaces"),
        pytest.param("SetSlot(amount, 2,400)", [SetSlot("amount", "2,400")], id="value-comma-first-split"),
        pytest.param("SetSlot(amount,2400)", [SetSlot("amount", "2400")], id="no-space-after-comma"),
        pytest.param(
            "SetSlot(recipient, John Smith)", [SetSlot("recipient", "John Smith")], id="value-spaces"
        ),
        pytest.param("SetSlot('recipient', 'John')", [SetSlot("recipient", "John")], id="quoted-args"),
        pytest.param(
            "SetSlot(note, call me (maybe))", [SetSlot("note", "call me (maybe)")], id="value-parens"
        ),
        pytest.param("SetSlot(amount, None)", [SetSlot("amount", None)], id="value-none"),
        pytest.param("SetSlot(amount)", [SetSlot("amount", None)], id="value-missing"),
        pytest.param(
            "SetSlot(city, Washington D.C.)", [SetSlot("city", "Washington D.C.")], id="value-periods-kept"
        ),
        pytest.param("SetSlot(flow_name, add_card)", [StartFlow("add_card")], id="flow-name"),
        pytest.param(
            "Clarify(replace_card, add_card)", [Clarify(("add_card", "replace_card"))], id="clarify"
        ),
        pytest.param(
            "Clarify([\"replace_card\", 'add_card'])",
            [Clarify(("add_card", "replace_card"))],
            id="clarify-list",
        ),
        pytest.param("Clarify(add_card)", [StartFlow("add_card")], id="clarify-one"),
        pytest.param("Clarify()", [CannotHandle()], id="clarify-none"),
        pytest.param("CancelFlow()", [CancelFlow()], id="cancel"),
        pytest.param("- `CancelFlow()`.", [CancelFlow()], id="cancel-decorated"),
        pytest.param("cancelflow( )", [CancelFlow()], id="cancel-lower"),
        pytest.param("StartFlow(transfer_money", [CannotHandle()], id="truncated"),
        pytest.param("CancelFlow", [CannotHandle()], id="no-parens"),
        pytest.param("MyStartFlow(x)", [CannotHandle()], id="not-a-command-name"),
        pytest.param("start flow transfer_money", [CannotHandle()], id="v2-text-is-not-v1"),
        pytest.param("", [CannotHandle()], id="empty"),
        pytest.param(
            "StartFlow(transfer_money), SetSlot(amount, 2,400) CancelFlow()",
            [StartFlow("transfer_money"), SetSlot("amount", "2,400"), CancelFlow()],
            id="multi-on-one-line",
        ),
        pytest.param(
            "SetSlot(recipient, John Smith), SetSlot(amount, 2,400)",
            [SetSlot("recipient", "John Smith"), SetSlot("amount", "2,400")],
            id="multi-setslot-one-line",
        ),
        pytest.param(
            "Actions:\nStartFlow(transfer_money)\nThen we set SetSlot(amount, 50) and ChitChat() too.\nDone.",
            [StartFlow("transfer_money"), SetSlot("amount", "50"), ChitChat()],
            id="prose-around",
        ),
        pytest.param(
            "SearchAndReply() SkipQuestion() HumanHandoff() RepeatLastBotMessages() CannotHandle() ChitChat()",
            [
                SearchAndReply(),
                SkipQuestion(),
                HumanHandoff(),
                RepeatLastBotMessages(),
                CannotHandle(),
                ChitChat(),
            ],
            id="all-no-arg-on-one-line",
        ),
        pytest.param("CancelFlow() CancelFlow()", [CancelFlow()], id="duplicates"),
    ],
)
def test_v1_parsing(text: str, expected: list[Command]) -> None:
    assert parse_commands(text, "v1") == expected


def test_flows_and_slots_filters_apply_to_parsed_text() -> None:
    text = "start flow transfer_money\nstart flow hack_the_bank\nset slot amount 5\nset slot password x"
    assert parse_commands(text, "v2", flows=FLOWS, slots=SLOTS) == [
        StartFlow("transfer_money"),
        SetSlot("amount", "5"),
    ]
    # collections of any kind are accepted
    assert parse_commands(text, "v2", flows=["transfer_money"], slots=("amount",)) == [
        StartFlow("transfer_money"),
        SetSlot("amount", "5"),
    ]


# ---------------------------------------------------------------------------------- value quoting


@pytest.mark.parametrize("syntax", ALL_SYNTAXES)
@pytest.mark.parametrize(
    "value",
    [
        "Acme Inc.",
        "50.",
        "etc.",
        "Washington D.C.",
        'he said "hi"',
        "it's",
        "rock 'n' roll",
        "2,400",
        "1,000,000.50",
        "a, b, c",
        "(maybe)",
        "call me (maybe)",
        "x)",
        "-5",
        "#1",
        "é ü 中文",
        "a\tb",
        "50%",
        "$2,400.00",
        "user@example.com",
        "https://example.com/a.b?c=d",
    ],
)
def test_tricky_values_round_trip(syntax: Syntax, value: str) -> None:
    command = SetSlot("note", value)
    assert normalize_slot_value(value) == value  # canonical
    assert parse_commands(format_command(command, syntax), syntax) == [command]


@pytest.mark.parametrize("syntax", ALL_SYNTAXES)
def test_line_breaks_in_values_are_written_as_spaces(syntax: Syntax) -> None:
    text = format_command(SetSlot("note", "line one\nline two"), syntax)
    assert "\n" not in text
    assert parse_commands(text, syntax) == [SetSlot("note", "line one line two")]


def test_quoting_only_when_needed() -> None:
    assert format_command(SetSlot("company", "Acme Inc."), "v2") == 'set slot company "Acme Inc."'
    assert format_command(SetSlot("company", "Acme Inc."), "v1") == "SetSlot(company, Acme Inc.)"
    assert format_command(SetSlot("city", "Washington D.C."), "v2") == "set slot city Washington D.C."
    assert format_command(SetSlot("amount", "2,400"), "v1") == "SetSlot(amount, 2,400)"


# ------------------------------------------------------------------------------------- comparison


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        pytest.param("John", "John", True, id="same"),
        pytest.param("John", "john", True, id="case"),
        pytest.param("JOHN SMITH", "john smith", True, id="case-two-words"),
        pytest.param("John  Smith", "John Smith", True, id="inner-whitespace"),
        pytest.param(" John ", "John", True, id="outer-whitespace"),
        pytest.param("John\tSmith", "john smith", True, id="tab"),
        pytest.param("JohnSmith", "John Smith", False, id="whitespace-not-removed"),
        pytest.param('"John"', "John", True, id="quotes"),
        pytest.param("2,400", "2400", True, id="thousands"),
        pytest.param("2,400", "2400.0", True, id="thousands-decimal"),
        pytest.param("1,000,000", "1e6", True, id="millions-exponent"),
        pytest.param("1e3", "1000", True, id="exponent"),
        pytest.param("1E3", "1000.00", True, id="exponent-upper"),
        pytest.param("0.5", ".5", True, id="leading-dot"),
        pytest.param("+5", "5", True, id="plus-sign"),
        pytest.param("-5", "5", False, id="minus-sign"),
        pytest.param("05", "5", True, id="leading-zero"),
        pytest.param("2400", "2401", False, id="different-numbers"),
        pytest.param("1,5", "1.5", False, id="decimal-comma-is-not-a-number"),
        pytest.param("1,5", "15", False, id="bad-grouping-is-text"),
        pytest.param("24,00", "2400", False, id="bad-grouping-2"),
        pytest.param("1_000", "1000", False, id="underscore-not-a-number"),
        pytest.param("nan", "NaN", True, id="nan-as-text"),
        pytest.param("nan", "nan", True, id="nan-equal-as-text"),
        pytest.param("inf", "Infinity", False, id="infinity-as-text"),
        pytest.param("true", "True", True, id="bool-case"),
        pytest.param("true", "1", False, id="bool-vs-number"),
        pytest.param(None, None, True, id="none-none"),
        pytest.param(None, "None", True, id="none-vs-None-string"),
        pytest.param(None, "null", True, id="none-vs-null"),
        pytest.param(None, "", True, id="none-vs-empty"),
        pytest.param("None", "[missing]", True, id="placeholders"),
        pytest.param(None, "0", False, id="none-vs-zero"),
        pytest.param(None, "John", False, id="none-vs-text"),
        pytest.param("John", "Jon", False, id="different-text"),
        pytest.param("5", "five", False, id="number-vs-word"),
        pytest.param("$5", "5", False, id="currency-is-text"),
    ],
)
def test_values_match(a: str | None, b: str | None, expected: bool) -> None:
    assert values_match(a, b) is expected
    assert values_match(b, a) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        pytest.param([], [], True, id="empty"),
        pytest.param([CancelFlow()], [CancelFlow()], True, id="same"),
        pytest.param(
            [StartFlow("a"), SetSlot("x", "1")],
            [SetSlot("x", "1"), StartFlow("a")],
            True,
            id="order-insensitive",
        ),
        pytest.param(
            [SetSlot("recipient", "John  Smith")],
            [SetSlot("recipient", "john smith")],
            True,
            id="value-folded",
        ),
        pytest.param([SetSlot("amount", "2,400")], [SetSlot("amount", "2400.0")], True, id="value-numeric"),
        pytest.param([SetSlot("amount", None)], [SetSlot("amount", "None")], True, id="value-none"),
        pytest.param([SetSlot("amount", "1")], [SetSlot("amount", "2")], False, id="value-differs"),
        pytest.param([SetSlot("Amount", "1")], [SetSlot("amount", "1")], False, id="slot-name-exact"),
        pytest.param([StartFlow("a")], [StartFlow("A")], False, id="flow-exact"),
        pytest.param([CancelFlow(), CancelFlow()], [CancelFlow()], False, id="multiset-counts"),
        pytest.param(
            [SetSlot("x", "1"), SetSlot("x", "1.0")],
            [SetSlot("x", "1"), SetSlot("x", "1")],
            True,
            id="multiset-values",
        ),
        pytest.param([Clarify(("b", "a"))], [Clarify(("a", "b"))], True, id="clarify-order"),
        pytest.param([Clarify(("a", "b"))], [Clarify(("a", "c"))], False, id="clarify-differs"),
        pytest.param([ChitChat()], [SearchAndReply()], False, id="chitchat-is-not-search"),
        pytest.param([CannotHandle()], [], False, id="cannot-handle-vs-nothing"),
        pytest.param([StartFlow("a")], [SetSlot("flow_name", "a")], False, id="no-normalisation-inside"),
    ],
)
def test_commands_equal(a: list[Command], b: list[Command], expected: bool) -> None:
    assert commands_equal(a, b) is expected
    assert commands_equal(b, a) is expected


# --------------------------------------------------------------- property table (instead of hypothesis)

_VALUE_CHARS = "abcXYZ019 ,.'\"`()-_/:é$%&?!"
_NO_ARG: list[type[NoArgCommand]] = [
    CancelFlow,
    SkipQuestion,
    SearchAndReply,
    ChitChat,
    HumanHandoff,
    RepeatLastBotMessages,
    CannotHandle,
]


def _random_ident(rng: random.Random, first: str = "abcdefgxyz_") -> str:
    return rng.choice(first) + "".join(rng.choice("abcdefxyz0123456789_-") for _ in range(rng.randint(0, 10)))


def _random_value(rng: random.Random) -> str | None:
    """A canonical slot value (what parsing can produce): mostly awkward strings, sometimes None/numbers."""
    kind = rng.random()
    if kind < 0.1:
        return None
    if kind < 0.25:
        return rng.choice(["2,400", "1e3", "-0.5", "1,000,000.25", "42", "3."])
    while True:
        value = normalize_slot_value("".join(rng.choice(_VALUE_CHARS) for _ in range(rng.randint(1, 14))))
        if value is not None:
            return value


def _random_command(rng: random.Random) -> Command:
    kind = rng.randrange(4)
    if kind == 0:
        return StartFlow(_random_ident(rng))
    if kind == 1:
        name = _random_ident(rng)
        return SetSlot("slot_" + name if name == "flow_name" else name, _random_value(rng))
    if kind == 2:
        options = sorted({_random_ident(rng) for _ in range(rng.randint(2, 4))})
        return Clarify(tuple(options)) if len(options) > 1 else StartFlow(options[0])
    return rng.choice(_NO_ARG)()


def _random_commands(seed: int) -> list[Command]:
    rng = random.Random(seed)
    commands = [_random_command(rng) for _ in range(rng.randint(1, 6))]
    return normalize_commands(commands)  # canonical: deduplicated, never empty


PROPERTY_SEEDS = range(150)


@pytest.mark.parametrize("syntax", ALL_SYNTAXES)
@pytest.mark.parametrize("seed", PROPERTY_SEEDS)
def test_property_format_then_parse_round_trips(syntax: Syntax, seed: int) -> None:
    commands = _random_commands(seed)
    text = format_commands(commands, syntax)
    parsed = parse_commands(text, syntax)
    assert parsed == fold_for_syntax(commands, syntax), text
    assert commands_equal(parsed, fold_for_syntax(commands, syntax))
    # formatting what was parsed is a fixed point
    assert format_commands(parsed, syntax) == format_commands(fold_for_syntax(commands, syntax), syntax)
    # decorations an LLM adds do not change the result (v2/v3 are line-anchored; v1 searches)
    decorated = "\n".join(f"{i + 1}. `{line}`" for i, line in enumerate(text.split("\n")))
    assert parse_commands(f"Here you go:\n{decorated}\n", syntax) == parsed, decorated


@pytest.mark.parametrize("seed", PROPERTY_SEEDS)
def test_property_v1_commands_on_one_line(seed: int) -> None:
    # known limit: a value holding ')' cannot be followed by another command on the same v1 line
    commands = _random_commands(seed)
    risky: list[Command] = [c for c in commands if isinstance(c, SetSlot) and c.value and ")" in c.value]
    commands = [c for c in commands if c not in risky] + risky[:1]
    line = " ".join(format_command(c, "v1") for c in commands)
    assert parse_commands(line, "v1") == commands, line


@pytest.mark.parametrize("seed", PROPERTY_SEEDS)
def test_property_values_match_is_an_equivalence(seed: int) -> None:
    rng = random.Random(seed)
    a, b = _random_value(rng), _random_value(rng)
    assert values_match(a, a)
    assert values_match(a, b) is values_match(b, a)
    if a is not None:
        assert values_match(a, f"  {a.upper()}  ")
        assert normalize_slot_value(normalize_slot_value(a)) == normalize_slot_value(a)
        assert values_match(a, f'"{a}"')
