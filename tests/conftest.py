"""Shared fixtures live in tests/support/, one module per real component; tests/skips.py is the skip
policy: the few skips the suite may take, listed by name, and the hooks that fail any other skip."""

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
