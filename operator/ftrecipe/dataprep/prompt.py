"""Render the command generator's prompt exactly as the production assistant would.

Users bring their production Jinja2 template unchanged, so the environment matches Rasa's: no
autoescaping for string templates, lenient undefined variables, and Rasa's `to_json_escaped_string`
filter. Our own defaults (one per command syntax) live in `templates/`.

`current_datetime` is what Rasa (3.x, `include_date_time`) passes: a timezone-aware `datetime`, so a
template may print it (`{{ current_datetime }}` renders `2026-01-15 09:30:00+00:00`) or format it
(`current_datetime.strftime(...)`, `.tzname()`). Rasa takes it from the clock at every turn; here it is one
fixed instant per run inputs (see `prompt_datetime`), so prompts, and the LLM cache keyed by them, do not
change from one run to the next; a test whose fixtures set Rasa's `mocked_datetime` slot shows that instead,
as in `rasa test e2e`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

from ftrecipe.dataprep.commands import Syntax
from ftrecipe.dataprep.yamlfile import InputError


def to_json_escaped_string(text: str) -> str:
    """Rasa's filter of the same name: a JSON string literal, quotes included."""
    return json.dumps(text, ensure_ascii=False)


_ENVIRONMENT = jinja2.Environment(autoescape=False, keep_trailing_newline=True)
_ENVIRONMENT.filters["to_json_escaped_string"] = to_json_escaped_string


CURRENT_DATETIME = "current_datetime"
# Rasa's built-in slot an E2E test's fixtures set to fix the time its prompts show.
MOCKED_DATETIME_SLOT = "mocked_datetime"
# What Rasa accepts there; the forms without an offset are UTC.
_MOCKED_DATETIME_FORMATS = ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


@dataclass(frozen=True)
class PromptTemplate:
    source: str  # a path, or `builtin:<name>`
    text: str
    # Rendered as `current_datetime`; None leaves it undefined (even where a test mocks it), as Rasa does
    # with `include_date_time: false`.
    current_datetime: datetime | None = None

    @property
    def shows_datetime(self) -> bool:
        """Whether the template refers to `current_datetime` at all (only then does the instant matter)."""
        return CURRENT_DATETIME in _variables(self.text)

    def at(self, instant: datetime) -> PromptTemplate:
        return replace(self, current_datetime=instant)

    def render(self, variables: Mapping[str, Any]) -> str:
        if self.current_datetime is None:
            values = {k: v for k, v in variables.items() if k != CURRENT_DATETIME}
        else:  # a test's mocked_datetime (in `variables`) wins over the run's instant
            values = {CURRENT_DATETIME: self.current_datetime, **variables}
        try:
            return _compiled(self.text).render(values)
        except jinja2.TemplateError as error:
            line = getattr(error, "lineno", None)
            at = f":{line}" if line else ""
            raise InputError(f"{self.source}{at}: the prompt template failed: {error}") from None


@functools.lru_cache(maxsize=32)
def _compiled(text: str) -> jinja2.Template:
    """Compiling is most of a render's cost; a run renders the same template thousands of times."""
    return _ENVIRONMENT.from_string(text)


@functools.lru_cache(maxsize=32)
def _variables(text: str) -> frozenset[str]:
    return frozenset(jinja2.meta.find_undeclared_variables(_ENVIRONMENT.parse(text)))


def parse_prompt_datetime(text: str) -> datetime:
    """An ISO 8601 date and time (`2026-01-15T09:30:00+00:00`, `…Z`); without an offset it is UTC, Rasa's
    default timezone. ValueError when it is not one."""
    value = datetime.fromisoformat(text.strip())
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def mocked_datetime(value: Any) -> datetime:
    """A `mocked_datetime` fixture value as Rasa reads it; ValueError where Rasa rejects it."""
    if isinstance(value, datetime):  # YAML reads an unquoted timestamp as one
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        value = value.isoformat()
    if isinstance(value, str):
        for form in _MOCKED_DATETIME_FORMATS:
            try:
                parsed = datetime.strptime(value, form)
            except ValueError:
                continue
            return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    raise ValueError(f"{value!r} is not a date and time Rasa reads")


def format_prompt_datetime(instant: datetime) -> str:
    """The form recorded in params.yaml and the instant's record, read back by `parse_prompt_datetime`."""
    return instant.isoformat()


def recorded_instant(now: datetime) -> datetime:
    """The instant a first run records: UTC (Rasa's default timezone), whole seconds."""
    return now.astimezone(UTC).replace(microsecond=0)


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
