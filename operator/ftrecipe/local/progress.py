"""What a phase command's output lines say about its progress: pure parsing, no I/O.

The phase commands print for logs, not for us, and we keep it that way: prepare-data's `LineReporter`
writes ``stage [i/n] detail`` per finished item; train writes one JSON object per line on stdout
(``{"event": "progress", "step", "total_steps", …}``, ``{"event": "data", …}``) and ``resuming from step
N``; evaluate writes ``{"event": "progress", "stage": "generate", "done", "total", "eta_seconds"}``.
Everything else (warnings, library chatter) only goes to the phase's log file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

_COUNTED: Final = re.compile(r"^(?P<stage>[a-z][\w-]*) \[(?P<done>\d+)/(?P<total>\d+)\](?: (?P<detail>.*))?$")
STEP_FIELDS: Final = ("step", "total_steps", "epoch", "train_loss", "eval_loss", "eta_seconds")


@dataclass(frozen=True)
class Counted:
    """Items of a stage done so far, e.g. annotate 12/38."""

    stage: str
    done: int
    total: int
    detail: str = ""
    eta_seconds: float | None = None


@dataclass(frozen=True)
class Steps:
    """A trainer progress line, reduced to the status fields (missing or non-finite ones are None)."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    eta_seconds: float | None = None

    def as_progress(self) -> dict[str, Any]:
        """The fields as `ftrecipe.plan.status.progress_update` takes them."""
        return {name: getattr(self, name) for name in STEP_FIELDS}


@dataclass(frozen=True)
class Note:
    """A line worth showing next to the phase, e.g. "resuming from step 40"."""

    text: str


Event = Counted | Steps | Note


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number >= 0 else None


def _json_event(data: Mapping[str, Any]) -> Event | None:
    kind = data.get("event")
    if kind == "progress":
        if "step" in data:
            return Steps(
                step=_integer(data.get("step")),
                total_steps=_integer(data.get("total_steps")),
                epoch=_number(data.get("epoch")),
                train_loss=_number(data.get("train_loss")),
                eval_loss=_number(data.get("eval_loss")),
                eta_seconds=_number(data.get("eta_seconds")),
            )
        done, total = _integer(data.get("done")), _integer(data.get("total"))
        if done is not None and total is not None:
            eta = _number(data.get("eta_seconds"))
            return Counted(str(data.get("stage") or "items"), done, total, eta_seconds=eta)
        return None
    if kind == "data":
        train, val = _integer(data.get("train_examples")), _integer(data.get("val_examples"))
        if train is None:
            return None
        dropped = _integer(data.get("dropped_too_long")) or 0
        text = f"{train} train / {val or 0} validation examples"
        return Note(text + (f", {dropped} dropped as too long" if dropped else ""))
    return None


def parse_line(line: str) -> Event | None:
    """The progress a line reports, or None for lines that only belong in the log."""
    text = line.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            return None
        return _json_event(data) if isinstance(data, dict) else None
    if (match := _COUNTED.match(text)) is not None:
        return Counted(match["stage"], int(match["done"]), int(match["total"]), match["detail"] or "")
    if text.startswith("resuming from step"):
        return Note(text)
    return None
