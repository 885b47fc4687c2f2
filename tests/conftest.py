"""Shared fixtures live in tests/support/, one module per real component."""

pytest_plugins = [
    "support.s3",
    "support.llm_server",
    "support.k8s",
    "support.tiny_model",
    "support.helm",
    "support.moneybank",
]
