"""The instant a prompt template shows as `current_datetime`: fixed per run inputs, never the clock's.

Rasa renders the time of each turn; copying that would change every prompt on every run, so a re-run would
miss the LLM cache (new calls, new labels) and train on other prompts. Instead one instant serves a whole
run: `--prompt-datetime` (the recipe's `dataPreparation.promptDatetime`) when given, else the instant a
first run recorded beside the LLM answer cache, `<cache-dir>/prompt-datetime/<key>.json`, for the same
inputs (`record_key`). Only a template that refers to `current_datetime` needs one.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ftrecipe.dataprep.config import GeneratorConfig
from ftrecipe.dataprep.e2e import TestSuite
from ftrecipe.dataprep.prompt import (
    MOCKED_DATETIME_SLOT,
    PromptTemplate,
    format_prompt_datetime,
    mocked_datetime,
    parse_prompt_datetime,
    recorded_instant,
)
from ftrecipe.dataprep.yamlfile import InputError
from ftrecipe.hashing import stable_hash

RECORD_DIR = "prompt-datetime"
EXAMPLE = "2026-01-15T09:30:00+00:00"


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class PromptInstant:
    value: datetime
    source: Literal["--prompt-datetime", "recorded", "unrecorded"]
    record: Path | None = None  # the record read or written (None with --prompt-datetime)
    warning: str | None = None  # set when a first run could not record its instant

    def params(self) -> dict[str, Any]:
        """params.yaml's entry: the same on a first run and on the re-runs that reuse its record."""
        entry: dict[str, Any] = {"value": format_prompt_datetime(self.value), "source": self.source}
        if self.record is not None:
            entry["record"] = str(self.record)
        return entry


def check_prompt_datetime(text: str) -> datetime:
    """`--prompt-datetime`'s value, or one InputError line with the fix."""
    try:
        return parse_prompt_datetime(text)
    except ValueError:
        raise InputError(
            f"--prompt-datetime {text!r}: not an ISO 8601 date and time; write e.g. {EXAMPLE} "
            "(without an offset it is UTC)"
        ) from None


def generator_zone(generator: GeneratorConfig) -> tzinfo:
    """The zone Rasa shows `current_datetime` in: the command generator's `timezone` (default UTC)."""
    if generator.timezone == "UTC":
        return UTC
    try:
        return ZoneInfo(generator.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InputError(
            f"{generator.source}: timezone {generator.timezone!r} is not an IANA timezone name; write e.g. "
            "Europe/Berlin or UTC"
        ) from None


def check_mocked_datetimes(suites: Sequence[TestSuite]) -> None:
    """Fixtures that set `mocked_datetime` hold a time Rasa reads: it rejects the others when it loads the
    tests, so they are one line here too, before any LLM call."""
    for suite in suites:
        for name, slots in suite.fixtures.items():
            if MOCKED_DATETIME_SLOT in slots and slots[MOCKED_DATETIME_SLOT] is not None:
                try:
                    mocked_datetime(slots[MOCKED_DATETIME_SLOT])
                except ValueError:
                    raise InputError(
                        f"{suite.path}: fixture {name!r}: mocked_datetime {slots[MOCKED_DATETIME_SLOT]!r} is not "
                        "a date and time Rasa reads; write e.g. 2026-01-15T09:30:00+00:00 or 2026-01-15 09:30:00"
                    ) from None


def record_key(generator: GeneratorConfig, template: PromptTemplate) -> str:
    """Which run inputs a recorded instant belongs to: the prompt template, the command syntax and the LLM.

    Deliberately not the tests, flows or domain: after editing a test the instant stays, so only the prompts
    that really changed miss the LLM cache and the data of every other test stays byte-identical. Another
    template or LLM gets a new instant: every cached answer is void then anyway (the cache is keyed by the
    model and the prompt), so the new instant costs no extra call.
    """
    return stable_hash(
        {
            "template": template.text,
            "syntax": generator.syntax,
            # As in the inputs hash: neither the timeout nor where the key is read from changes an answer.
            "llm": generator.llm.model_dump(exclude={"timeout", "key_variable"}) if generator.llm else None,
        }
    )


def _read_record(path: Path) -> datetime | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise InputError(
            f"{path}: cannot read the recorded prompt datetime: {error.strerror or error}"
        ) from None
    try:
        data = json.loads(text)
        return parse_prompt_datetime(str(data["current_datetime"]))
    except (ValueError, KeyError, TypeError):
        raise InputError(
            f'{path}: not a prompt datetime record ({{"current_datetime": "{EXAMPLE}"}}); delete it to '
            "record a new instant, or pass --prompt-datetime"
        ) from None


def _write_record(path: Path, instant: datetime, about: dict[str, Any]) -> datetime:
    """Record ``instant`` unless a concurrent first run got there first: then its instant wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    text = json.dumps({"current_datetime": format_prompt_datetime(instant), **about}, indent=2) + "\n"
    temporary.write_text(text, encoding="utf-8")
    try:
        os.link(temporary, path)  # atomic, and fails rather than replace a record
    except FileExistsError:
        recorded = _read_record(path)
        return recorded if recorded is not None else instant
    finally:
        temporary.unlink(missing_ok=True)
    return instant


def resolve_prompt_datetime(
    option: str | None,
    generator: GeneratorConfig,
    template: PromptTemplate,
    cache_dir: Path,
    now: Callable[[], datetime] = utc_now,
) -> PromptInstant:
    """The instant this run renders: the option's, else the recorded one, else now (and recorded)."""
    if option is not None:
        return PromptInstant(check_prompt_datetime(option), "--prompt-datetime")
    path = cache_dir / RECORD_DIR / f"{record_key(generator, template)}.json"
    recorded = _read_record(path)
    if recorded is not None:
        return PromptInstant(recorded, "recorded", path)
    instant = recorded_instant(now())
    about = {
        "prompt_template": template.source,
        "syntax": generator.syntax,
        "llm": f"{generator.llm.provider}/{generator.llm.model}" if generator.llm else None,
    }
    try:
        return PromptInstant(_write_record(path, instant, about), "recorded", path)
    except OSError as error:  # the run can go on; only its re-runs lose reproducibility
        warning = (
            f"warning: cannot record the prompt datetime in {path} ({error.strerror or error}); a re-run will "
            "show another instant: pass --prompt-datetime to fix it"
        )
        return PromptInstant(instant, "unrecorded", None, warning)
