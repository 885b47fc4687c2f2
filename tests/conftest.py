"""Shared fixtures live in tests/support/, one module per real component; tests/skips.py is the skip
policy: the few skips the suite may take, listed by name, and the hooks that fail any other skip."""

import os

# One intra-op thread in the tests and in every process they start (`ftrecipe train`, torchrun's ranks,
# benchmarks) unless the caller chose: tiny models gain nothing from a second thread, and threads of
# several processes on two cores spin-wait on each other (one in-process training run, on a loaded
# machine: 5 s of CPU with torch's default of 2 threads, 1 s with one). Torch reads it on import.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = [
    "skips",
    "support.s3",
    "support.llm_server",
    "support.k8s",
    "support.tiny_model",
    "support.helm",
    "support.moneybank",
    "support.training_runs",
]
