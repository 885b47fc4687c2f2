"""Progress of answer generation as JSON lines on stdout, the way `ftrecipe train` reports its steps.

One line ``{"event": "progress", "stage": "generate", "done": N, "total": M, "eta_seconds": S}`` when
generation starts (done 0), whenever a quarter of the turns is crossed, at most every
`REPORT_EVERY_SECONDS` in between, and when the last turn is answered. ``ftrecipe run`` shows these lines
as a bar, the operator's logs keep them; `due` (which of them to print) is pure and tested on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from ftrecipe.training.trainer import Emit

STAGE: Final = "generate"
E2E_STAGE: Final = "e2e"  # `evaluate --e2e`: the held-out tests' turns replayed with the model in the loop
REPORT_EVERY_SECONDS: Final = 5.0


def _quarter(done: int, total: int) -> int:
    return 4 * done // total if total > 0 else 4


def due(done: int, total: int, last_done: int, seconds_since_last: float, every_seconds: float) -> bool:
    """Whether `done` of `total` turns is worth a line, the last one having said `last_done`
    `seconds_since_last` ago: the end, a new quarter, or `every_seconds` gone by."""
    if done >= total:
        return True
    if _quarter(done, total) > _quarter(last_done, total):
        return True
    return done > last_done and seconds_since_last >= every_seconds


def eta_seconds(done: int, total: int, elapsed_seconds: float) -> float | None:
    """Time left if the remaining turns take as long as those done so far; None before the first."""
    if done <= 0:
        return None
    return round(elapsed_seconds / done * max(0, total - done), 1)


class GenerationProgress:
    """Counts answered turns and emits the progress lines `due` allows."""

    def __init__(
        self,
        total: int,
        emit: Emit,
        *,
        every_seconds: float = REPORT_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        stage: str = STAGE,
    ) -> None:
        self.total = total
        self.stage = stage
        self.done = 0
        self._emit = emit
        self._every_seconds = every_seconds
        self._clock = clock
        self._started = self._last_time = clock()
        self._last_done = 0

    def start(self) -> None:
        """The first line (done 0): the total is known before the first answer, which may take a while."""
        self._started = self._last_time = self._clock()
        self._report()

    def answered(self, turns: int) -> None:
        """`turns` more turns have their answers."""
        self.done += turns
        now = self._clock()
        if due(self.done, self.total, self._last_done, now - self._last_time, self._every_seconds):
            self._last_time, self._last_done = now, self.done
            self._report()

    def _report(self) -> None:
        self._emit(
            {
                "event": "progress",
                "stage": self.stage,
                "done": self.done,
                "total": self.total,
                "eta_seconds": eta_seconds(self.done, self.total, self._clock() - self._started),
            }
        )
