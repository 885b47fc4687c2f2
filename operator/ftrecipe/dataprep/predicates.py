"""Rasa's flow conditions, evaluated the way Rasa evaluates them: with pypred, the library Rasa itself uses.

Rasa writes conditions in three places, each with its own document and its own answer to an error:

- a flow guard (`if:` of a flow): `{"slots": <every slot>, "context": <the stack's context>}`, no Jinja;
  an error means "not startable" (False);
- a `next:` branch (`if:` of a link): the condition is first rendered as a Jinja template with
  `{"context": ...}`, then evaluated on `{"slots": ..., "context": ...}`; an error means "not taken" (False);
- a slot rejection (`rejections: - if:`): rendered with, and evaluated on, `{"slots": {<that slot>: <value>}}`
  only (other slots read as undefined); an error counts as a rejection, answered with
  `utter_internal_error_rasa` instead of the rejection's own response.

pypred's semantics (checked in tests/test_predicates.py): `a.b` looks up nested keys; an identifier that is
not found is `undefined` (a bare word such as `Ann` is one); quoted text is a string; numbers are floats
(`20 = 20.0`); `=`/`==`/`is` are equality, `!=`/`is not` inequality; `<`, `>`... against undefined are
False, against None or across str/number raise; `contains` is Python's `in` on the left side (a list, a
set `{'a' 'b'}` of space-separated items, a string); `matches` is `re.search` on strings; `and`/`or`/`not`
short-circuit on Python truthiness; keywords (true, false, null, undefined, empty) are case-insensitive.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jinja2
import ply.yacc
import pypred.parser
import pypred.predicate
from pypred import Predicate
from pypred import ast as pypred_ast

INTERNAL_ERROR_RESPONSE = "utter_internal_error_rasa"


class InvalidCondition(ValueError):
    """The condition is not valid pypred; Rasa's `data validate` refuses such flows."""


def _quiet_parser(lexer: Any = None, debug: int = 0) -> Any:
    # pypred's shipped parse table is older than ply 3.11: by default yacc rebuilds it, prints a warning on
    # stderr and tries to write parsetab.py into site-packages. Rasa patches yacc the same way.
    parser = ply.yacc.yacc(
        module=pypred.parser, write_tables=False, errorlog=ply.yacc.NullLogger(), debug=False
    )
    parser.errors = []
    if lexer is not None:
        lexer.parser = parser
        parser.lexer = lexer
    return parser


pypred.predicate.get_parser = _quiet_parser


@functools.lru_cache(maxsize=4096)
def compile_condition(condition: str) -> Any:
    """The parsed predicate (cached: parsing builds a parser, evaluation is reentrant)."""
    predicate = Predicate(condition)
    if not predicate.is_valid():
        errors = "; ".join(str(e) for e in predicate.errors()["errors"]) or "cannot parse"
        raise InvalidCondition(f"invalid condition {condition!r}: {errors}")
    return predicate


def identifiers(condition: str) -> frozenset[str]:
    """The names a condition looks up (`slots.x`, `context.y`, bare words), quoted strings excluded."""
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, pypred_ast.Literal):
            value = str(node.value)
            if not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
                found.add(value)
        elif isinstance(node, pypred_ast.LiteralSet):
            for item in node.value:
                visit(item)
        for name in ("left", "right", "expr"):
            child = getattr(node, name, None)
            if isinstance(child, pypred_ast.Node):
                visit(child)

    visit(compile_condition(condition).ast)
    return frozenset(found)


def evaluate(condition: str, document: Mapping[str, Any]) -> bool:
    """pypred's verdict; raises InvalidCondition, or whatever evaluation raises (TypeError on `None > 3`)."""
    return bool(compile_condition(condition).evaluate(dict(document)))


def render(condition: str, variables: Mapping[str, Any], *, strict: bool = False) -> str:
    """Rasa renders `next` and rejection conditions as Jinja templates before parsing them."""
    if "{" not in condition:
        return condition
    undefined = jinja2.StrictUndefined if strict else jinja2.Undefined
    return jinja2.Environment(undefined=undefined).from_string(condition).render(dict(variables))


def guard_allows(condition: str, slots: Mapping[str, Any], context: Mapping[str, Any]) -> bool:
    """A flow guard: errors make the flow not startable."""
    try:
        return evaluate(condition, {"slots": dict(slots), "context": dict(context)})
    except Exception:
        return False


def branch_taken(condition: str, slots: Mapping[str, Any], context: Mapping[str, Any]) -> bool:
    """A `next` link's `if`: errors mean the link is not taken."""
    try:
        rendered = render(condition, {"context": dict(context)})
        return evaluate(rendered, {"slots": dict(slots), "context": dict(context)})
    except Exception:
        return False


def rejection_response(rejections: tuple[tuple[str, str | None], ...], slot: str, value: Any) -> str | None:
    """The response Rasa utters when `value` is refused for `slot` (None: accepted).

    `rejections` are `(condition, utter)` pairs, checked in order; the first that holds refuses the value.
    The condition sees only this slot. An error refuses too, with Rasa's internal-error response. A
    refusal without a response of its own returns "" (Rasa resets the slot and says nothing).
    """
    if value is None:
        return None  # Rasa skips rejections while the slot is empty
    document = {"slots": {slot: value}}
    for condition, utter in rejections:
        try:
            refused = evaluate(render(condition, document), document)
        except Exception:
            return INTERNAL_ERROR_RESPONSE
        if refused:
            return utter or ""
    return None
