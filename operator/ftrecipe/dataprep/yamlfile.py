"""Read user YAML keeping line numbers, so every complaint about a file can say where."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class InputError(ValueError):
    """Bad user input: one line naming the file (and line), what is wrong, and the fix."""


class LineDict(dict[str, Any]):
    """A mapping that remembers the line (1-based) it started on."""

    line: int = 0


class LineList(list[Any]):
    line: int = 0


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    mapping = LineDict(loader.construct_mapping(node, deep=True))  # type: ignore[arg-type]
    mapping.line = node.start_mark.line + 1
    return mapping


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LineList:
    sequence = LineList(loader.construct_sequence(node, deep=True))
    sequence.line = node.start_mark.line + 1
    return sequence


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def plain(value: Any) -> Any:
    """Plain dicts and lists: yaml.safe_dump refuses the line-numbered subclasses `load_yaml` returns."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def line_of(value: Any) -> int:
    return getattr(value, "line", 0)


def where(path: Path, value: Any = None) -> str:
    """`file:line` when the line is known, else `file`."""
    line = line_of(value)
    return f"{path}:{line}" if line else str(path)


def load_yaml(path: Path) -> Any:
    """Parse one YAML file; syntax errors become one InputError line with the position."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        return yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as error:
        # An unclosed bracket is reported at the end of the file; where it was opened helps more.
        mark = getattr(error, "context_mark", None) or getattr(error, "problem_mark", None)
        position = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise InputError(f"{path}{position}: invalid YAML: {problem}") from None


def yaml_files(root: Path) -> list[Path]:
    """Every .yml/.yaml file below root (or root itself), in a stable order."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix in {".yml", ".yaml"} and p.is_file())
