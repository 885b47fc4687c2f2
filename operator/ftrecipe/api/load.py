"""Read FinetuneRecipe manifests and turn every problem into one line that names the place and the fix."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from ftrecipe.api.v1alpha1 import API_VERSION, KIND, PATTERN_MEANINGS, FinetuneRecipe


class RecipeError(ValueError):
    """A recipe that cannot be used; `lines` holds one self-contained line per problem."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _shown(value: Any) -> str:
    """A short rendering of a bad value; only scalars, so nothing large or nested lands in a log."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, bool | int | float) or value is None:
        return repr(value)
    return f"a {type(value).__name__}"


def _pattern_meaning(pattern: str) -> str:
    return PATTERN_MEANINGS.get(pattern, f"text matching {pattern}")


def _rule(error: ErrorDetails) -> str:
    kind, ctx, got = error["type"], error.get("ctx", {}), error.get("input")
    simple = {
        "missing": "required field is missing",
        "greater_than_equal": f"must be >= {ctx.get('ge')} (got {_shown(got)})",
        "greater_than": f"must be > {ctx.get('gt')} (got {_shown(got)})",
        "less_than_equal": f"must be <= {ctx.get('le')} (got {_shown(got)})",
        "less_than": f"must be < {ctx.get('lt')} (got {_shown(got)})",
        "literal_error": f"must be one of {ctx.get('expected')} (got {_shown(got)})",
        "string_pattern_mismatch": f"must be {_pattern_meaning(str(ctx.get('pattern')))} (got {_shown(got)})",
        "string_too_short": f"must not be empty (got {_shown(got)})",
        "string_too_long": f"must be at most {ctx.get('max_length')} characters",
        "too_short": f"must have at least {ctx.get('min_length')} item(s)",
        "int_type": f"must be a whole number (got {_shown(got)})",
        "int_parsing": f"must be a whole number (got {_shown(got)})",
        "int_from_float": f"must be a whole number (got {_shown(got)})",
        "float_type": f"must be a number (got {_shown(got)})",
        "float_parsing": f"must be a number (got {_shown(got)})",
        "bool_type": f"must be true or false (got {_shown(got)})",
        "bool_parsing": f"must be true or false (got {_shown(got)})",
        "string_type": f"must be a string (got {_shown(got)})",
        "list_type": f"must be a list (got {_shown(got)})",
        "dict_type": f"must be a mapping (got {_shown(got)})",
        "model_type": f"must be a mapping of fields (got {_shown(got)})",
        "model_attributes_type": f"must be a mapping of fields (got {_shown(got)})",
    }
    return simple.get(kind, error["msg"])


def validation_error_lines(error: ValidationError, source: str) -> list[str]:
    """One line per problem: `<file>: <field path>: <rule>`."""
    lines: list[str] = []
    for detail in error.errors(include_url=False):
        line = f"{source}: {_field_path(detail['loc'])}: {_rule(detail)}"
        if line not in lines:
            lines.append(line)
    return lines


def parse_recipe(data: Any, source: str = "<recipe>") -> FinetuneRecipe:
    """Validate one already-parsed manifest."""
    if not isinstance(data, Mapping):
        raise RecipeError([f"{source}: expected a FinetuneRecipe mapping, got {_shown(data)}"])
    if data.get("kind") != KIND or data.get("apiVersion") != API_VERSION:
        raise RecipeError(
            [
                f"{source}: expected apiVersion {API_VERSION} and kind {KIND}, "
                f"got {_shown(data.get('apiVersion'))} and {_shown(data.get('kind'))}"
            ]
        )
    try:
        return FinetuneRecipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(validation_error_lines(error, source)) from None


def load_recipe(path: Path) -> FinetuneRecipe:
    """Read the single FinetuneRecipe in a YAML file (other documents, e.g. Secrets, are ignored)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise RecipeError([f"{path}: cannot read the recipe: {error.strerror or error}"]) from None
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise RecipeError([f"{path}: {where}invalid YAML: {problem}"]) from None
    recipes = [doc for doc in documents if isinstance(doc, Mapping) and doc.get("kind") == KIND]
    if len(recipes) != 1:
        found = "no" if not recipes else str(len(recipes))
        raise RecipeError([f"{path}: expected exactly one document of kind {KIND}, found {found}"])
    return parse_recipe(recipes[0], str(path))
