"""What the training tests compare between two runs: the logged losses, the published adapter's tensors,
and the processes a launcher started (to kill one rank as a lost node would)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

Losses = list[tuple[int, float | None, float | None]]


def logged_losses(out: Path) -> Losses:
    """(step, train loss, eval loss) of each row of ``out``/metrics.jsonl, in order."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(row["step"], row["train_loss"], row["eval_loss"]) for row in rows]


def assert_same_losses(got: Losses, want: Losses, tolerance: float) -> None:
    """The same rows at the same steps (an evaluation row missing or extra fails), each loss within
    ``tolerance``."""
    assert [row[0] for row in got] == [row[0] for row in want]
    for (step, *values), (_, *expected) in zip(got, want, strict=True):
        for value, wanted in zip(values, expected, strict=True):
            assert (value is None) == (wanted is None), (step, got, want)
            if value is not None and wanted is not None:
                assert abs(value - wanted) <= tolerance, f"step {step}: {value} != {wanted}"


def adapter(out: Path) -> dict[str, Any]:
    """The published adapter's tensors by name."""
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def largest_difference(left: dict[str, Any], right: dict[str, Any]) -> float:
    """The largest element-wise difference of two adapters with the same tensor names and shapes."""
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].shape == right[name].shape, name
    return max(float((left[name] - right[name]).abs().max()) for name in left)


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (Linux /proc), children first."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found
