"""What `ftrecipe run` shows: one line per phase (state, counts, elapsed time, a bar with losses while
training) live at a terminal, plain lines elsewhere (logs, CI), and a summary of the key figures and where
the results are. Counted stages (prepare-data's annotate, evaluate's generate) get a bar too when no
training steps are there to show.

Both displays keep the same `PhaseView`s; they differ only in how a change is shown.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, TextIO

from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ftrecipe.api.v1alpha1 import FinetuneRecipeStatus
from ftrecipe.local.layout import LocalRecipe
from ftrecipe.local.progress import Counted, Event, Note, Steps
from ftrecipe.plan.cache_key import Phase
from ftrecipe.plan.status import evaluation_stage_words

LABELS: Final[dict[Phase, str]] = {"data": "prepare-data", "train": "train", "evaluate": "evaluate"}
State = Literal["pending", "running", "stopping", "done", "cached", "failed", "interrupted"]
_STYLE: Final[dict[str, str]] = {
    "pending": "dim",
    "running": "yellow",
    "stopping": "yellow",
    "done": "green",
    "cached": "cyan",
    "failed": "red",
    "interrupted": "red",
}
_ICON: Final[dict[str, str]] = {
    "pending": "·",
    "done": "✔",
    "cached": "✔",
    "failed": "✘",
    "interrupted": "✘",
}
BAR_WIDTH: Final = 24
PLAIN_EVERY_SECONDS: Final = 10.0  # plain output: a progress line at most this often, plus each quarter
_SPINNER: Final = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_LABEL_WIDTH: Final = max(len(label) for label in LABELS.values())
_STATE_WIDTH: Final = len("interrupted")


def duration(seconds: float) -> str:
    """3.2s, 4m05s, 2h10m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _int(figures: Mapping[str, Any], name: str) -> int | None:
    value = figures.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(figures: Mapping[str, Any], name: str) -> float | None:
    value = figures.get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def result_line(phase: Phase, figures: Mapping[str, Any]) -> str:
    """A finished phase's key figures in a few words (empty when it reported none)."""
    parts: list[str] = []
    if phase == "data":
        annotated, tests = _int(figures, "num_annotated_conversations"), _int(figures, "num_input_e2e_tests")
        if annotated is not None and tests is not None:
            parts.append(f"{annotated}/{tests} tests annotated")
        points = _int(figures, "num_ft_data_points")
        if points is not None:
            split = (_int(figures, "num_train_data_points"), _int(figures, "num_val_data_points"))
            within = f" ({split[0]} train, {split[1]} validation)" if None not in split else ""
            parts.append(f"{points} data points{within}")
        rephrased = _int(figures, "num_passing_rephrased_user_messages")
        if rephrased:
            parts.append(f"{rephrased} rephrasings")
    elif phase == "train":
        steps = _int(figures, "step")
        if steps is not None:
            parts.append(f"{steps} steps")
        for name, label in (("train_loss", "train loss"), ("eval_loss", "eval loss")):
            value = _float(figures, name)
            if value is not None:
                parts.append(f"{label} {value:.3f}")
    else:
        accuracy = _float(figures, "command_accuracy")
        if accuracy is not None:
            turns = _int(figures, "num_turns")
            parts.append(f"command accuracy {accuracy:.1%}" + (f" on {turns} turns" if turns else ""))
        pass_rate = _float(figures, "e2e_pass_rate")  # evaluation.e2e: the held-out tests, model in the loop
        if pass_rate is not None:
            tests, passed = _int(figures, "e2e_tests"), _int(figures, "e2e_passed")
            counted = f" ({passed} of {tests} tests)" if tests is not None and passed is not None else ""
            parts.append(f"E2E pass rate {pass_rate:.1%}{counted}")
    return ", ".join(parts)


def status_figures(status: FinetuneRecipeStatus) -> dict[Phase, dict[str, Any]]:
    """The figures a status keeps, under the names the phase reports use."""
    figures: dict[Phase, dict[str, Any]] = {"data": {}, "train": {}, "evaluate": {}}
    data = status.data_preparation
    if data is not None and data.summary is not None:
        figures["data"] = data.summary.model_dump(exclude_none=True)
    if status.training is not None:
        figures["train"] = status.training.model_dump(
            include={"step", "total_steps", "train_loss", "eval_loss"}, exclude_none=True
        )
    if status.evaluation is not None and status.evaluation.command_accuracy is not None:
        figures["evaluate"] = status.evaluation.model_dump(
            include={"command_accuracy", "e2e_tests", "e2e_passed", "e2e_pass_rate"}, exclude_none=True
        )
    return figures


def summary_rows(
    status: FinetuneRecipeStatus,
    figures: Mapping[Phase, Mapping[str, Any]],
    local: LocalRecipe,
    seconds: float,
) -> list[tuple[str, str]]:
    """(what, value) rows: the outcome, each phase's figures and where its results are."""
    on_disk = local.spec.output.local is not None

    def where(prefix: str | None, name: str = "") -> str | None:
        if prefix is None:
            return None
        path = prefix.rstrip("/") + "/" + name if name else prefix
        return None if on_disk and not Path(path).exists() else path

    outcome = f"{status.phase} in {duration(seconds)}"  # a failure's line comes last, on its own
    rows: list[tuple[str, str]] = [("recipe", f"{local.name} ({local.file})"), ("result", outcome)]
    data, training, evaluation = status.data_preparation, status.training, status.evaluation
    candidates: list[tuple[str, str | None]] = [
        ("data", result_line("data", figures.get("data", {})) or None),
        ("coverage report", where(data.dataset_uri if data else None, "coverage/flows.md")),
        ("training", result_line("train", figures.get("train", {})) or None),
        ("adapter", where(training.adapter_uri if training else None)),
        ("loss curve", where(training.adapter_uri if training else None, "loss_curve.png")),
        ("metrics", where(training.adapter_uri if training else None, "metrics.jsonl")),
        ("serving", where(training.adapter_uri if training else None, "README.md")),
        ("evaluation", result_line("evaluate", figures.get("evaluate", {})) or None),
        ("evaluation report", where(evaluation.report_uri if evaluation else None, "eval.md")),
        ("status", str(local.status_file)),
    ]
    rows += [(name, value) for name, value in candidates if value]
    return rows


def _count_words(stage: str, count: Counted) -> str:
    """`annotate 3/38`; an evaluation stage in the status's words: `scoring 120/480 turns`."""
    words = evaluation_stage_words(stage)
    if words is None:
        return f"{stage} {count.done}/{count.total}"
    return f"{words} {count.done}/{count.total} turns"


@dataclass
class PhaseView:
    """What is known about one phase of this run."""

    phase: Phase
    state: State = "pending"
    started: float | None = None
    ended: float | None = None
    counts: dict[str, Counted] = field(default_factory=dict)
    latest_count: Counted | None = None  # the stage that moved last: the one the bar shows
    steps: Steps | None = None
    note: str = ""
    result: str = ""
    log: Path | None = None

    def elapsed(self, now: float) -> float | None:
        if self.started is None:
            return None
        return (self.ended or now) - self.started

    def counts_text(self) -> str:
        return ", ".join(
            _count_words(stage, count)
            + (f" · ETA {duration(count.eta_seconds)}" if count.eta_seconds is not None else "")
            for stage, count in self.counts.items()
        )

    def steps_text(self) -> str:
        steps = self.steps
        if steps is None:
            return ""
        parts = [f"step {steps.step}/{steps.total_steps or '?'}"]
        if steps.epoch is not None:
            parts.append(f"epoch {steps.epoch:.2f}")
        if steps.train_loss is not None:
            parts.append(f"loss {steps.train_loss:.3f}")
        if steps.eval_loss is not None:
            parts.append(f"eval {steps.eval_loss:.3f}")
        if steps.eta_seconds is not None:
            parts.append(f"ETA {duration(steps.eta_seconds)}")
        return " · ".join(parts)


class Display:
    """The phases of one run and how they change; subclasses show the changes."""

    def __init__(self) -> None:
        self.views: dict[Phase, PhaseView] = {}
        self.local: LocalRecipe | None = None

    # -- what the runner calls

    def begin(self, local: LocalRecipe, phases: Sequence[Phase]) -> None:
        self.local = local
        self.views = {phase: PhaseView(phase) for phase in phases}
        self._begun()

    def cached(self, phase: Phase, prefix: str) -> None:
        view = self.views[phase]
        view.state, view.result = "cached", prefix
        self._changed(view)

    def started(self, phase: Phase, log: Path) -> None:
        view = self.views[phase]
        view.state, view.started, view.log = "running", time.monotonic(), log
        self._changed(view)

    def progress(self, phase: Phase, event: Event) -> None:
        view = self.views[phase]
        if isinstance(event, Counted):
            view.counts[event.stage] = view.latest_count = event
        elif isinstance(event, Steps):
            view.steps = event
        elif isinstance(event, Note):
            view.note = event.text
        self._progressed(view, event)

    def stopping(self, phase: Phase) -> None:
        view = self.views[phase]
        view.state, view.note = "stopping", "stopping: the phase saves what it can (Ctrl-C again to kill it)"
        self._changed(view)

    def finished(self, phase: Phase, state: State, result: str) -> None:
        view = self.views[phase]
        view.state, view.ended, view.result = state, time.monotonic(), result
        self._changed(view)

    def end(self, rows: Sequence[tuple[str, str]]) -> None:
        self._ended(rows)

    def error(self, line: str) -> None:
        """One line for the user, on standard error, after everything else."""
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop any live output (idempotent)."""

    def __enter__(self) -> Display:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    # -- hooks

    def _begun(self) -> None: ...

    def _changed(self, view: PhaseView) -> None: ...

    def _progressed(self, view: PhaseView, event: Event) -> None: ...

    def _ended(self, rows: Sequence[tuple[str, str]]) -> None: ...


class LineDisplay(Display):
    """Plain lines for logs and CI: phase changes, and progress every quarter or every few seconds."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream
        self._last_print: dict[Phase, tuple[float, float]] = {}  # phase: (time, fraction) last shown

    def _write(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def _prefix(self, view: PhaseView) -> str:
        return f"{LABELS[view.phase]:<13}"

    def _begun(self) -> None:
        assert self.local is not None
        self._write(f"ftrecipe run {self.local.name} ({self.local.file}), work folder {self.local.workdir}")

    def _changed(self, view: PhaseView) -> None:
        head = self._prefix(view)
        elapsed = duration(view.elapsed(time.monotonic()) or 0.0)
        if view.state == "cached":
            self._write(f"{head}cached: {view.result}")
        elif view.state == "running":
            self._write(f"{head}running (log: {view.log})")
        elif view.state == "stopping":
            self._write(f"{head}{view.note}")
        elif view.state == "done":
            self._write(f"{head}done in {elapsed}" + (f": {view.result}" if view.result else ""))
        elif view.state in ("failed", "interrupted"):
            self._write(f"{head}{view.state} after {elapsed}: {view.result} (log: {view.log})")

    def _progressed(self, view: PhaseView, event: Event) -> None:
        if isinstance(event, Note):
            self._write(f"{self._prefix(view)}{event.text}")
            return
        if isinstance(event, Counted):
            fraction = event.done / event.total if event.total else 1.0
            text = view.counts_text()
        else:
            fraction = (event.step or 0) / event.total_steps if event.total_steps else 0.0
            text = view.steps_text()
        now = time.monotonic()
        last_time, last_fraction = self._last_print.get(view.phase, (0.0, 0.0))
        quarter = int(fraction * 4) > int(last_fraction * 4)
        # A stage starting after another one of the phase (evaluate's `e2e` after `generate`) is news.
        starting = isinstance(event, Counted) and event.done == 0 and last_fraction > 0
        if quarter or starting or now - last_time >= PLAIN_EVERY_SECONDS:
            self._last_print[view.phase] = (now, fraction)
            self._write(f"{self._prefix(view)}{text}")

    def _ended(self, rows: Sequence[tuple[str, str]]) -> None:
        width = max((len(name) for name, _ in rows), default=0)
        self._write("")
        for name, value in rows:
            self._write(f"{name + ':':<{width + 2}}{value}")


class LiveDisplay(Display):
    """For people at a terminal: a live line per phase, then a summary table."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__()
        self.console = console or Console()
        self.live: Live | None = None

    def _begun(self) -> None:
        assert self.local is not None
        self.console.print(
            Text.assemble(
                ("ftrecipe run ", "bold"),
                (self.local.name, "bold cyan"),
                f"  {self.local.file}",
                (f"  (work folder {self.local.workdir})", "dim"),
            )
        )
        self.live = Live(self, console=self.console, refresh_per_second=8, transient=False)
        self.live.start()

    def _row(self, view: PhaseView, now: float) -> tuple[Text, RenderableType, Text]:
        style = _STYLE[view.state]
        moving = view.state in ("running", "stopping")
        icon = _SPINNER[int(now * 10) % len(_SPINNER)] if moving else _ICON[view.state]
        elapsed = view.elapsed(now)
        clock = duration(elapsed) if elapsed is not None else ""
        head = Text.assemble(
            (f"{icon} ", style),
            (f"{LABELS[view.phase]:<{_LABEL_WIDTH}} ", "bold"),
            (f"{view.state:<{_STATE_WIDTH}} ", style),
            (f"{clock:>7}", "dim"),
        )
        bar: RenderableType = Text("")
        if moving:
            steps, count = view.steps, view.latest_count
            if steps is not None and steps.total_steps:
                bar = ProgressBar(total=steps.total_steps, completed=steps.step or 0, width=BAR_WIDTH)
            elif count is not None and count.total:
                bar = ProgressBar(total=count.total, completed=count.done, width=BAR_WIDTH)
            detail = Text(" · ".join(t for t in (view.steps_text(), view.counts_text(), view.note) if t))
        elif view.state == "cached":
            detail = Text(f"reused {view.result}", style="dim")
        else:
            detail = Text(view.result, style="red" if view.state in ("failed", "interrupted") else "")
        return head, bar, detail

    def __rich__(self) -> RenderableType:
        now = time.monotonic()
        rows = [self._row(view, now) for view in self.views.values()]
        bars = any(not isinstance(bar, Text) for _, bar, _ in rows)
        table = Table.grid(padding=(0, 1))
        table.add_column(no_wrap=True, min_width=max((len(head) for head, _, _ in rows), default=0))
        table.add_column(no_wrap=True, min_width=BAR_WIDTH if bars else 0)
        table.add_column(no_wrap=True, overflow="ellipsis", ratio=1)  # what a narrow terminal cuts
        for row in rows:
            table.add_row(*row)
        return table

    def _changed(self, view: PhaseView) -> None:
        if self.live is not None:
            self.live.refresh()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def _ended(self, rows: Sequence[tuple[str, str]]) -> None:
        self.close()
        table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        for name, value in rows:
            style = ""
            if name == "result":
                style = "green" if value.startswith("Succeeded") else "red"
            table.add_row(name, Text(value, style=style))
        self.console.print()
        self.console.print(table)


def make_display(stream: TextIO | None = None) -> Display:
    """Live at a terminal, plain lines otherwise."""
    out = stream or sys.stdout
    return LiveDisplay() if out.isatty() else LineDisplay(out)
