"""The fixture assistants' files as the tests write and read them."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import yaml


def write(path: Path, text: str) -> None:
    """``text`` dedented, without its leading blank lines, at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")


def read(path: Path) -> Any:
    """A YAML file's content."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))
