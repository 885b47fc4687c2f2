"""A phase container's result as one small JSON object in its Kubernetes termination message.

Every phase command (`prepare-data`, `train`, `evaluate`) writes one `PhaseReport` to
``/dev/termination-log`` when that file exists (Kubernetes creates it; elsewhere nothing is written). The
operator reads it from the pod's ``state.terminated.message``, so it learns a phase's figures and its
one-line failure reason without S3 credentials or log scraping.

The kubelet keeps at most 4096 bytes of a termination message, so `encode` makes the JSON fit: it drops
the largest figures first (listing them under ``truncated``), then shortens the message. `decode` is
lenient: a plain-text message (an older image, a crash) becomes a failed report carrying that text.

Under torchrun each pod's `ftrecipe train` reports for its ranks (`training.launch.pod_outcome`): a failed
report then names the rank and says whether the failure was the rank's own (`CAUSE_FIGURE`), so of a
multi-node training's failed pods the operator shows the one that failed first on its own
(`failure_order`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

TERMINATION_LOG_ENV: Final = "FTRECIPE_TERMINATION_LOG"  # tests point this at a temporary file
DEFAULT_TERMINATION_LOG: Final = "/dev/termination-log"
MAX_BYTES: Final = 4096
# Figures of a failed report under torchrun: "own" (the rank failed by itself), "peer" (it broke because
# another rank failed: stopped by torchrun, or a collective failed), "preempted"; and when (ISO 8601, UTC).
CAUSE_FIGURE: Final = "cause"
FAILED_AT_FIGURE: Final = "failed_at"


@dataclass(frozen=True)
class PhaseReport:
    """``ok``: the phase finished; ``message``: one line for people; ``figures``: flat JSON-able facts
    (e.g. prepare-data's result_summary numbers, train's steps and losses, evaluate's accuracy)."""

    ok: bool
    message: str
    figures: Mapping[str, Any] = field(default_factory=dict)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def encode(report: PhaseReport, *, max_bytes: int = MAX_BYTES) -> str:
    """The report as compact JSON of at most ``max_bytes`` UTF-8 bytes."""
    figures = dict(report.figures)
    dropped: list[str] = []
    message = _one_line(report.message)

    def render() -> str:
        data: dict[str, Any] = {"ok": report.ok, "message": message, "figures": figures}
        if dropped:
            data["truncated"] = sorted(dropped)
        return json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=False, default=str)

    text = render()
    while len(text.encode()) > max_bytes and figures:
        largest = max(figures, key=lambda key: len(json.dumps(figures[key], default=str)))
        del figures[largest]
        dropped.append(largest)
        text = render()
    while len(text.encode()) > max_bytes and message:
        excess = len(text.encode()) - max_bytes
        message = message[: max(0, len(message) - excess - 1)] + "…" if len(message) > 1 else ""
        text = render()
    return text


def decode(text: str | None) -> PhaseReport | None:
    """The report in a termination message; plain text becomes a failed report; None for nothing."""
    if text is None or not text.strip():
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("ok"), bool):
        figures = data.get("figures")
        return PhaseReport(
            ok=data["ok"],
            message=_one_line(str(data.get("message") or "")),
            figures=figures if isinstance(figures, dict) else {},
        )
    return PhaseReport(ok=False, message=_one_line(text)[:MAX_BYTES])


def failure_order(report: PhaseReport) -> int:
    """Which of several failed pods' reports tells the root cause, lowest first: 0 a rank's own failure,
    1 a report that does not say (a pod killed without a word, an init container, an older image),
    2 a rank that broke because another failed, or a preemption (the group torn down around it)."""
    cause = report.figures.get(CAUSE_FIGURE)
    return 0 if cause == "own" else 2 if cause in ("peer", "preempted") else 1


def report_from_metadata(metadata: Mapping[str, Any], where: str) -> PhaseReport:
    """A complete bundle's manifest metadata as the report of the phase that published it (the phase
    commands put their headline figures there)."""
    figures = dict(metadata)
    # A training bundle's manifest carries its run.json (training.bundle.BundleInfo), which names the
    # figures otherwise than train's report: the status reads step, total_steps and eval_loss.
    if isinstance(figures.get("steps"), int):
        figures.setdefault("step", figures["steps"])
        figures.setdefault("total_steps", figures["steps"])
    if "final_eval_loss" in figures:
        figures.setdefault("eval_loss", figures["final_eval_loss"])
    return PhaseReport(ok=True, message=f"complete bundle at {where}", figures=figures)


def termination_log_path() -> Path:
    return Path(os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG))


def write_report(report: PhaseReport) -> None:
    """Write the report where Kubernetes reads the termination message, only if that file exists."""
    path = termination_log_path()
    if not path.exists():
        return
    with contextlib.suppress(OSError):
        path.write_text(encode(report) + "\n", encoding="utf-8")
