"""`ftrecipe operator` with tracemalloc on: a developer's tool for `operator_scale.py --tracemalloc`.

Never used by the chart or the image. Usage (what the benchmark runs instead of ``-m ftrecipe.cli.main``):

    python benchmarks/traced_operator.py DUMP_DIR FRAMES operator --namespace ml ...

tracemalloc starts once the operator's modules are imported (FRAMES frames per allocation; 0: no
tracing, the heap figures only). On SIGUSR1 the process writes, into DUMP_DIR,
``snapshot-<k>.tracemalloc`` (the live allocations, when tracing) and ``snapshot-<k>.json`` (RSS,
tracemalloc's traced total, glibc's heap figures from mallinfo2, pymalloc's arena figures, and the live
gc-tracked objects by type), then ``snapshot-<k>.done``, so that the benchmark knows both files are
complete. The difference between RSS and the live objects is what the allocators hold beyond them
(freed but not returned pages, fragmentation, C libraries' own memory).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import gc
import itertools
import json
import os
import signal
import sys
import tempfile
import tracemalloc
from pathlib import Path
from types import FrameType
from typing import Any


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks")
    ] + [(name, ctypes.c_size_t) for name in ("fordblks", "keepcost")]


def glibc_heap() -> dict[str, int] | None:
    """glibc malloc's own figures (bytes): `arena` obtained with brk/sbrk and arenas, `hblkhd` in mmap'd
    blocks, `uordblks` in use, `fordblks` free but kept. None where mallinfo2 does not exist."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    function = getattr(libc, "mallinfo2", None)
    if function is None:
        return None
    function.restype = _MallInfo2
    info = function()
    return {field: int(getattr(info, field)) for field, _ in _MallInfo2._fields_}


def pymalloc_stats() -> dict[str, int]:
    """The ``# name = value`` lines of `sys._debugmallocstats` (pymalloc's arenas; it writes to fd 2)."""
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode(errors="replace")
    figures: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("# ") and "=" in line:
            name, value = line[2:].split("=", 1)
            with contextlib.suppress(ValueError):
                figures[name.strip()] = int(value.strip().replace(",", ""))
    return figures


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return -1


def main() -> int:
    # The operator's modules are imported before tracing starts: they are the same at any scale, and
    # tracemalloc makes imports of huge modules (the kubernetes client's API classes) take minutes.
    import ftrecipe.controller.handlers  # noqa: F401

    frames = int(sys.argv[2])
    if frames > 0:
        tracemalloc.start(frames)
    dump_dir = Path(sys.argv[1])
    dump_dir.mkdir(parents=True, exist_ok=True)
    counter = itertools.count()

    def dump(signum: int, frame: FrameType | None) -> None:
        index = next(counter)
        stem = dump_dir / f"snapshot-{index}"
        gc.collect()
        types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(str(stem.with_suffix(".tracemalloc")))
        traced, peak = tracemalloc.get_traced_memory()
        facts: dict[str, Any] = {
            "rss_kib": status_kib("VmRSS"),
            "hwm_kib": status_kib("VmHWM"),
            "traced_bytes": traced,
            "traced_peak_bytes": peak,
            "tracemalloc_overhead_bytes": tracemalloc.get_tracemalloc_memory(),
            "glibc_heap": glibc_heap(),
            "pymalloc": pymalloc_stats(),
            "gc_objects_by_type": dict(types.most_common(40)),
        }
        stem.with_suffix(".json").write_text(json.dumps(facts, indent=1))
        stem.with_suffix(".done").write_text("")

    signal.signal(signal.SIGUSR1, dump)
    from ftrecipe.cli.main import main as ftrecipe_main

    return ftrecipe_main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
