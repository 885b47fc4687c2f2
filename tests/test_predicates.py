"""Rasa's flow conditions as pypred evaluates them: every operator, with the verdicts written down.

These are the facts the replay relies on (flow guards, `next` branches, slot rejections). Rasa evaluates
conditions with pypred (its `rasa/utils/pypred.py` wraps `pypred.Predicate`); the expectations below are
what pypred 0.4.0 answers, including its surprises (a bare word is undefined, numbers are floats).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from ftrecipe.dataprep.predicates import (
    INTERNAL_ERROR_RESPONSE,
    InvalidCondition,
    branch_taken,
    evaluate,
    guard_allows,
    identifiers,
    rejection_response,
)

DOCUMENT: dict[str, Any] = {
    "slots": {
        "age": 20,
        "price": 2.5,
        "name": "Ann",
        "digits": "42",
        "member": True,
        "empty_slot": None,
        "tags": ["gold", "new"],
    },
    "context": {"flow_id": "transfer_money", "step_id": "ask_amount"},
}


@pytest.mark.parametrize(
    ("condition", "verdict"),
    [
        # constants (case-insensitive keywords)
        ("True", True),
        ("False", False),
        ("true", True),
        ("FALSE", False),
        # comparisons on numbers (pypred reads 20 as 20.0)
        ("slots.age > 18", True),
        ("slots.age >= 20", True),
        ("slots.age < 18", False),
        ("slots.age <= 19", False),
        ("slots.age = 20", True),
        ("slots.age == 20.0", True),
        ("slots.age != 20", False),
        ("slots.price > 2", True),
        ("slots.age > -1", True),
        # equality on strings: quoted either way; a bare word is an undefined identifier, not a string
        ("slots.name = 'Ann'", True),
        ('slots.name = "Ann"', True),
        ("slots.name = Ann", False),
        ("slots.name = 'ann'", False),
        ("slots.digits = 42", False),  # "42" is not 42.0
        ("slots.age = '20'", False),
        # is / is not: equality, not identity
        ("slots.name is 'Ann'", True),
        ("slots.name is not 'Ann'", False),
        ("slots.age is 20", True),
        ("slots.member is true", True),
        ("slots.member = true", True),
        ("slots.member = 'true'", False),
        # null: a slot holding None; a slot missing from the document is undefined, which is not null
        ("slots.empty_slot is null", True),
        ("slots.empty_slot = null", True),
        ("slots.empty_slot is not null", False),
        ("slots.age is not null", True),
        ("slots.missing is null", False),
        ("slots.missing is undefined", True),
        ("slots.empty_slot is undefined", False),
        # ordering against undefined is False (no error)
        ("slots.missing > 3", False),
        ("slots.missing < 3", False),
        # truthiness of a bare reference
        ("slots.member", True),
        ("slots.empty_slot", False),
        ("slots.missing", False),
        ("not slots.member", False),
        ("not slots.empty_slot", True),
        ("slots.age", True),
        # and / or / not / parentheses
        ("slots.member and slots.age > 5", True),
        ("slots.member and slots.age > 50", False),
        ("slots.empty_slot or slots.age > 5", True),
        ("slots.empty_slot or slots.missing", False),
        ("not (slots.age > 18)", False),
        ("slots.age > 18 and (slots.name = 'Bo' or slots.name = 'Ann')", True),
        ("not slots.age > 18 and slots.member", False),
        # contains: Python's `in` on the left side; sets are space-separated literals
        ("{'Ann' 'Bo'} contains slots.name", True),
        ("{'Cy' 'Bo'} contains slots.name", False),
        ("{1 2 20} contains slots.age", True),
        ("slots.tags contains 'gold'", True),
        ("slots.tags contains 'silver'", False),
        ("slots.name contains 'n'", True),
        ("slots.age contains 2", False),  # a number has no `in`: False, not an error
        # matches: re.search on strings, False on anything else
        ("slots.name matches '^A'", True),
        ('slots.name matches "^a"', False),
        ("slots.name matches 'n+$'", True),
        ("slots.age matches '2'", False),
        # context
        ("context.flow_id = 'transfer_money'", True),
        ("context.step_id is not 'ask_amount'", False),
        ("context.missing is undefined", True),
    ],
)
def test_operator_verdicts(condition: str, verdict: bool) -> None:
    assert evaluate(condition, DOCUMENT) is verdict


@pytest.mark.parametrize(
    "condition",
    [
        "slots.empty_slot > 3",  # None against a number
        "slots.name > 3",  # str against a number
        "slots.digits > 40",
    ],
)
def test_ordering_across_types_raises(condition: str) -> None:
    with pytest.raises(TypeError):
        evaluate(condition, DOCUMENT)


@pytest.mark.parametrize(
    "condition",
    [
        "slots.age >",
        "slots.age < 1e3",  # no exponents
        '{"Ann", "Bo"} contains slots.name',  # no commas in sets
        "slots.name matches '('",  # not a regular expression
    ],
)
def test_invalid_conditions(condition: str) -> None:
    with pytest.raises(InvalidCondition, match="invalid condition"):
        evaluate(condition, DOCUMENT)


def test_identifiers_are_the_names_a_condition_looks_up() -> None:
    assert identifiers(
        "slots.a > 3 and not (context.x = 'quoted' or {'q' bare} contains slots.c) and slots.n matches '^a'"
    ) == {"slots.a", "context.x", "bare", "slots.c", "slots.n"}
    assert identifiers("True") == frozenset()


def test_guards_treat_errors_as_not_startable() -> None:
    assert guard_allows("False", {}, {}) is False
    assert guard_allows("slots.vip", {"vip": True}, {}) is True
    assert guard_allows("slots.vip", {"vip": None}, {}) is False
    assert guard_allows("slots.balance > 10", {"balance": None}, {}) is False  # TypeError
    assert guard_allows("slots.balance >", {"balance": 5}, {}) is False  # invalid
    assert guard_allows("{{context.x}}", {}, {}) is False  # guards are not rendered: `{` does not parse


def test_branches_render_context_first_and_treat_errors_as_not_taken() -> None:
    assert branch_taken("slots.limit > {{context.floor}}", {"limit": 5}, {"floor": 3}) is True
    assert branch_taken("slots.limit > {{context.floor}}", {"limit": 2}, {"floor": 3}) is False
    assert branch_taken("slots.limit > 3", {"limit": None}, {}) is False


@pytest.mark.parametrize(
    ("rejections", "value", "response"),
    [
        ((("slots.price < 100", "utter_too_cheap"),), 50.0, "utter_too_cheap"),
        ((("slots.price < 100", "utter_too_cheap"),), 150.0, None),
        ((("slots.price < 100", "utter_too_cheap"),), None, None),  # empty: never checked
        # the first rejection that holds answers
        (
            (("slots.price < 10", "utter_way_too_cheap"), ("slots.price < 100", "utter_too_cheap")),
            5.0,
            "utter_way_too_cheap",
        ),
        ((("slots.price < 10", "a"), ("slots.price < 100", "b")), 50.0, "b"),
        # an evaluation error refuses the value, with Rasa's internal-error response
        ((("slots.price < 100", "utter_too_cheap"),), "cheap", INTERNAL_ERROR_RESPONSE),
        ((("slots.price <", "utter_too_cheap"),), 5.0, INTERNAL_ERROR_RESPONSE),
        # a refusal without a response of its own
        ((("slots.price < 100", None),), 5.0, ""),
        # the condition sees only this slot: another slot is undefined, so `<` against it is False
        ((("slots.price < slots.budget", "utter_over"),), 5.0, None),
        # rendered as a template with the slot first
        ((("slots.price < {{ slots.price + 1 }}", "utter_rendered"),), 5.0, "utter_rendered"),
        ((("slots.name = 'me' or slots.name = 'myself'", "utter_self"),), "myself", "utter_self"),
    ],
)
def test_rejections(rejections: tuple[tuple[str, str | None], ...], value: Any, response: str | None) -> None:
    name = "name" if "slots.name" in rejections[0][0] else "price"
    assert rejection_response(rejections, name, value) == response


def test_importing_writes_nothing_and_prints_nothing() -> None:
    """pypred's stale parse table would otherwise make ply warn on stderr and write into site-packages."""
    code = "from ftrecipe.dataprep.predicates import evaluate; print(evaluate('slots.a > 1', {'slots': {'a': 2}}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "True\n"
    assert done.stderr == ""
