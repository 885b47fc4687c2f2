"""Session fixture: a tiny random Llama + tokenizer on disk, built offline once per test run.

Building takes well under a second (importing torch/transformers dominates), but every test
that needs "a model directory" shares one copy so the suite stays fast. Treat it as read-only;
a test that wants to change it should build its own with ``build_tiny_model``.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a saved tiny Llama (model.safetensors, tokenizer.json, chat template)."""
    pytest.importorskip("torch", reason="tiny_model needs the 'train' extra")
    pytest.importorskip("transformers", reason="tiny_model needs the 'train' extra")
    from ftrecipe.training.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model")
