"""Render the command generator's prompt exactly as the production assistant would.

Users bring their production Jinja2 template unchanged, so the environment matches Rasa's: no
autoescaping for string templates, lenient undefined variables, and Rasa's `to_json_escaped_string`
filter. Our own defaults (one per command syntax) live in `templates/`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from ftrecipe.dataprep.commands import Syntax
from ftrecipe.dataprep.yamlfile import InputError


def to_json_escaped_string(text: str) -> str:
    """Rasa's filter of the same name: a JSON string literal, quotes included."""
    return json.dumps(text, ensure_ascii=False)


_ENVIRONMENT = jinja2.Environment(autoescape=False, keep_trailing_newline=True)
_ENVIRONMENT.filters["to_json_escaped_string"] = to_json_escaped_string


@dataclass(frozen=True)
class PromptTemplate:
    source: str  # a path, or `builtin:<name>`
    text: str

    def render(self, variables: Mapping[str, Any]) -> str:
        try:
            return _compiled(self.text).render({"current_datetime": _now(), **variables})
        except jinja2.TemplateError as error:
            line = getattr(error, "lineno", None)
            at = f":{line}" if line else ""
            raise InputError(f"{self.source}{at}: the prompt template failed: {error}") from None


@functools.lru_cache(maxsize=32)
def _compiled(text: str) -> jinja2.Template:
    """Compiling is most of a render's cost; a run renders the same template thousands of times."""
    return _ENVIRONMENT.from_string(text)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S %Z")


def default_template(syntax: Syntax) -> PromptTemplate:
    name = f"command_prompt_{syntax}.jinja2"
    text = resources.files("ftrecipe.dataprep").joinpath("templates", name).read_text(encoding="utf-8")
    return PromptTemplate(f"builtin:{name}", text)


def load_template(path: Path | None, syntax: Syntax) -> PromptTemplate:
    """The user's template when given (checked for syntax now, not at the first turn), else ours."""
    if path is None:
        return default_template(syntax)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"{path}: cannot read the prompt template: {error.strerror or error}") from None
    try:
        _ENVIRONMENT.parse(text)
    except jinja2.TemplateSyntaxError as error:
        raise InputError(f"{path}:{error.lineno}: invalid Jinja2 template: {error.message}") from None
    return PromptTemplate(str(path), text)
