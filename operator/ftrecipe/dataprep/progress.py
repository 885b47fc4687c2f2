"""Progress of a data-preparation run: bars on a terminal, quiet one-line logs anywhere else."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class Reporter(Protocol):
    def start(self, stage: str, total: int) -> None: ...
    def advance(self, stage: str, detail: str) -> None: ...
    def log(self, line: str) -> None: ...


class LineReporter:
    """For logs and CI: one line per finished item, `stage [i/n] detail`."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.counts: dict[str, list[int]] = {}

    def _write(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)

    def start(self, stage: str, total: int) -> None:
        self.counts[stage] = [0, total]

    def advance(self, stage: str, detail: str) -> None:
        count = self.counts.setdefault(stage, [0, 0])
        count[0] += 1
        self._write(f"{stage} [{count[0]}/{count[1]}] {detail}")

    def log(self, line: str) -> None:
        self._write(line)


class RichReporter:
    """For people at a terminal: a bar per stage with counts and elapsed time; log lines above the bars."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}"),
            console=self.console,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.progress.stop()

    def start(self, stage: str, total: int) -> None:
        self.tasks[stage] = self.progress.add_task(stage, total=total, detail="")

    def advance(self, stage: str, detail: str) -> None:
        if stage not in self.tasks:
            self.start(stage, 0)
        self.progress.update(self.tasks[stage], advance=1, detail=detail)

    def log(self, line: str) -> None:
        self.progress.console.print(line, highlight=False, markup=False)
