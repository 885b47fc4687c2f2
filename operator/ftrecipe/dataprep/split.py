"""Stage 4 of data preparation: split fine-tuning examples into train and validation, and write them.

The split is by test case, never by example: the rephrasings of one conversation are near-duplicates, and
letting them straddle the split would make validation measure memorisation. Rasa's own tool shuffles
unseeded and only warns when validation lacks a command type; here the split is seeded and a greedy set
cover guarantees that every command type present lands in train (a type the model never sees in training
cannot be learnt; one missing from validation only goes unmeasured, and is reported).

Pure functions over typed data, plus thin writers whose output is byte-deterministic.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ftrecipe.dataprep.annotate import conversation_id, display_path
from ftrecipe.dataprep.commands import COMMAND_TYPES, Command, command_type
from ftrecipe.dataprep.e2e import TestCase, TestSuite, UserStep
from ftrecipe.dataprep.yamlfile import plain

OutputFormat = Literal["instruction", "conversational"]


@dataclass(frozen=True)
class DataPoint:
    """One fine-tuning example: the prompt at a user turn and the commands the generator should answer."""

    prompt: str
    output: str  # commands, one per line, in the syntax in use
    original_test_name: str  # "<file>::<test>"
    original_user_utterance: str
    rephrased_user_utterance: str | None  # None for original conversations
    command_types: tuple[str, ...]  # types (commands.command_type) present in `output`


def command_types_of(commands: Iterable[Command]) -> tuple[str, ...]:
    """The distinct types of these commands, in `COMMAND_TYPES` order, for `DataPoint.command_types`."""
    present = {command_type(c) for c in commands}
    return tuple(t for t in COMMAND_TYPES if t in present)


def command_types_by_test(points: Iterable[DataPoint]) -> dict[str, set[str]]:
    """The table `split_tests` takes: each test (in order of first appearance) and the types its examples hold."""
    table: dict[str, set[str]] = {}
    for point in points:
        table.setdefault(point.original_test_name, set()).update(point.command_types)
    return table


# ------------------------------------------------------------------------------------------ split


@dataclass(frozen=True)
class SplitResult:
    train: tuple[str, ...]  # test ids, in input order
    validation: tuple[str, ...]  # test ids, in input order
    cover: tuple[str, ...]  # the tests the set cover forced into train, in the order it picked them
    missing_in_validation: tuple[str, ...]  # command types in train but absent from validation, sorted


def _greedy_cover(table: Mapping[str, frozenset[str]]) -> list[str]:
    """Fewest tests (greedy approximation) that together hold every type; ties go to the earlier test."""
    uncovered = set().union(*table.values()) if table else set()
    cover: list[str] = []
    while uncovered:
        best, gain = "", 0
        for test_id, types in table.items():  # strict `>` keeps the first of equally good tests
            covered = len(types & uncovered)
            if covered > gain:
                best, gain = test_id, covered
        cover.append(best)
        uncovered -= table[best]
    return cover


def split_tests(
    test_command_types: Mapping[str, Collection[str]], train_frac: float, seed: int
) -> SplitResult:
    """Split test ids so that all variants of a test stay on one side and train holds every command type.

    Train gets the set cover, then randomly chosen other tests until it holds
    max(len(cover), floor(n * train_frac)) tests. The shuffle sorts the ids first, so the result depends
    only on the ids, the fraction and the seed, never on dict order. (A 1e-9 slack in the floor keeps
    float noise such as 0.29 * 100 = 28.999… from losing a test.)
    """
    if not 0 < train_frac <= 1:
        raise ValueError(f"train_frac must be in (0, 1], not {train_frac}")
    table = {test_id: frozenset(types) for test_id, types in test_command_types.items()}
    cover = _greedy_cover(table)
    target = max(len(cover), math.floor(len(table) * train_frac + 1e-9))
    rest = sorted(set(table) - set(cover))
    random.Random(seed).shuffle(rest)
    in_train = set(cover) | set(rest[: target - len(cover)])
    train = tuple(t for t in table if t in in_train)
    validation = tuple(t for t in table if t not in in_train)
    train_types = set().union(*(table[t] for t in train)) if train else set()
    validation_types = set().union(*(table[t] for t in validation)) if validation else set()
    return SplitResult(train, validation, tuple(cover), tuple(sorted(train_types - validation_types)))


def partition(points: Iterable[DataPoint], split: SplitResult) -> tuple[list[DataPoint], list[DataPoint]]:
    """The examples of the train and validation tests, in their input order (others are dropped)."""
    train_ids, validation_ids = set(split.train), set(split.validation)
    train: list[DataPoint] = []
    validation: list[DataPoint] = []
    for point in points:
        if point.original_test_name in train_ids:
            train.append(point)
        elif point.original_test_name in validation_ids:
            validation.append(point)
    return train, validation


# ------------------------------------------------------------------------------------------ records


def training_record(point: DataPoint, output_format: OutputFormat) -> dict[str, Any]:
    """The record a trainer reads, in Rasa's two formats (no system message, as Rasa writes them)."""
    if output_format == "instruction":
        return {"prompt": point.prompt, "completion": point.output}
    if output_format == "conversational":
        return {
            "messages": [
                {"role": "user", "content": point.prompt},
                {"role": "assistant", "content": point.output},
            ]
        }
    raise ValueError(f"unknown output format {output_format!r}; expected instruction or conversational")


def ft_data_record(point: DataPoint) -> dict[str, Any]:
    """One line of Rasa's `3_llm_finetune_data/llm_ft_data.jsonl`, keys in Rasa's order."""
    return {
        "prompt": point.prompt,
        "output": point.output,
        "original_test_name": point.original_test_name,
        "original_user_utterance": point.original_user_utterance,
        "rephrased_user_utterance": point.rephrased_user_utterance,
    }


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """One JSON object per line, UTF-8 with `\\n` endings on every platform, so re-runs give equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
            count += 1
    return count


# ------------------------------------------------------------------------------------------ E2E split


@dataclass(frozen=True)
class _Placed:
    """A test with the suite it came from; `index` tells suites apart without comparing them."""

    index: int
    suite: TestSuite
    test: TestCase


Section = Literal["fixtures", "metadata"]


def _named_entries(suite: TestSuite, section: Section) -> dict[str, Any]:
    """`fixtures:` / `metadata:` as written in the file ({name: raw content}), to write them back unchanged."""
    entries: dict[str, Any] = {}
    for item in suite.raw.get(section) or []:
        for name, content in item.items():
            entries[str(name)] = plain(content)
    return entries


def _references(test: TestCase, section: Section) -> list[str]:
    """Names a test uses: its fixtures; or its metadata and that of its user steps."""
    if section == "fixtures":
        return list(test.fixtures)
    names = [] if test.metadata is None else [test.metadata]
    return names + [s.metadata for s in test.steps if isinstance(s, UserStep) and s.metadata is not None]


def _resolve_names(placed: Sequence[_Placed], section: Section) -> dict[tuple[int, str], str]:
    """The name each (suite, entry) gets in the merged files: its own, unless two files define it differently.

    Every conflicting definition becomes `<name>_<file stem>` (then `_2`, `_3`… if that is taken too), so
    the outcome does not depend on which file came first. Only referenced, defined entries take part.
    """
    definitions: dict[str, dict[int, Any]] = {}
    for item in placed:
        entries = _named_entries(item.suite, section)
        for name in _references(item.test, section):
            if name in entries:
                definitions.setdefault(name, {})[item.index] = entries[name]
    stems = {item.index: item.suite.path.stem for item in placed}
    names: dict[tuple[int, str], str] = {}
    taken = set(definitions)
    for name, by_suite in definitions.items():
        contents = list(by_suite.values())
        conflict = any(content != contents[0] for content in contents)
        for index in by_suite:
            if not conflict:
                names[(index, name)] = name
                continue
            base = f"{name}_{stems[index]}"
            candidate, number = base, 1
            while candidate in taken:
                number += 1
                candidate = f"{base}_{number}"
            taken.add(candidate)
            names[(index, name)] = candidate
    return names


TestNames = Mapping[tuple[int, str], str]  # (suite index, TestCase.key) -> the name written


def _test_names(placed: Sequence[_Placed], base: Path | None) -> dict[tuple[int, str], str]:
    """The name each test gets in the merged files: `TestCase.key` (its name, plus `#k` where its file
    repeats the name), unless tests of two files share the name; then each of those becomes
    `<key> (<file>)`, so the original name stays visible and the outcome does not depend on the split."""
    files: dict[str, set[int]] = {}
    for item in placed:
        files.setdefault(item.test.name, set()).add(item.index)
    names: dict[tuple[int, str], str] = {}
    for item in placed:
        key = item.test.key
        shared = len(files[item.test.name]) > 1
        names[(item.index, key)] = f"{key} ({display_path(item.suite.path, base)})" if shared else key
    return names


def _rewritten_case(
    item: _Placed,
    fixtures: Mapping[tuple[int, str], str],
    metadata: Mapping[tuple[int, str], str],
    test_names: TestNames,
) -> dict[str, Any]:
    """The raw test case under its merged name, its fixture and metadata references at the merged names."""

    def renamed(names: Mapping[tuple[int, str], str], name: Any) -> Any:
        return names.get((item.index, str(name)), name)

    case: dict[str, Any] = plain(item.test.raw)
    written = test_names[(item.index, item.test.key)]
    if written != item.test.name:
        case["test_case"] = written
    if case.get("fixtures"):
        case["fixtures"] = [renamed(fixtures, name) for name in case["fixtures"]]
    if case.get("metadata") is not None:
        case["metadata"] = renamed(metadata, case["metadata"])
    for step in case["steps"]:
        if isinstance(step, dict) and "user" in step and step.get("metadata") is not None:
            step["metadata"] = renamed(metadata, step["metadata"])
    return case


def _merged_stubs(side: Sequence[_Placed], test_names: TestNames) -> dict[str, Any]:
    """The stubs the side's tests ran with, keeping each test's behaviour exactly.

    A file-wide stub stays file-wide when every file with tests on this side stubs that action the same
    way; otherwise it becomes `<test>::<action>` keys for that file's tests (a test's own key wins, as in
    Rasa), so a stub never leaks onto tests of another file. A test's own stub follows it when it is
    written under another name (a repeated name); in its file it applied to every test of that name.
    """
    files: dict[int, list[_Placed]] = {}
    for item in side:
        files.setdefault(item.index, []).append(item)

    def written(item: _Placed) -> str:
        return test_names[(item.index, item.test.key)]

    file_wide: dict[str, dict[int, Any]] = {}
    per_test: dict[str, Any] = {}
    for index, items in files.items():
        for key, stub in items[0].suite.stubs.items():
            if "::" in str(key):
                test_name, action = str(key).split("::", 1)
                for item in items:
                    if item.test.name == test_name:
                        per_test[f"{written(item)}::{action}"] = plain(stub)
            else:
                file_wide.setdefault(str(key), {})[index] = plain(stub)
    stubs: dict[str, Any] = {}
    for action, by_file in file_wide.items():
        definitions = list(by_file.values())
        if len(by_file) == len(files) and all(d == definitions[0] for d in definitions):
            stubs[action] = definitions[0]
            continue
        for index, stub in by_file.items():
            for item in files[index]:
                per_test.setdefault(f"{written(item)}::{action}", stub)
    stubs.update(per_test)
    return stubs


def _used_entries(
    side: Sequence[_Placed], section: Section, names: Mapping[tuple[int, str], str]
) -> dict[str, Any]:
    """The entries of `section` the side's tests refer to, under their merged names, in order of first use."""
    used: dict[str, Any] = {}
    for item in side:
        entries = _named_entries(item.suite, section)
        for name in _references(item.test, section):
            if name in entries:
                used.setdefault(names[(item.index, name)], entries[name])
    return used


def _e2e_document(
    side: Sequence[_Placed],
    fixture_names: Mapping[tuple[int, str], str],
    metadata_names: Mapping[tuple[int, str], str],
    test_names: TestNames,
) -> dict[str, Any]:
    fixtures = _used_entries(side, "fixtures", fixture_names)
    metadata = _used_entries(side, "metadata", metadata_names)
    document: dict[str, Any] = {}
    if fixtures:
        document["fixtures"] = [{name: content} for name, content in fixtures.items()]
    if metadata:
        document["metadata"] = [{name: content} for name, content in metadata.items()]
    stubs = _merged_stubs(side, test_names)
    if stubs:
        document["stub_custom_actions"] = stubs
    document["test_cases"] = [
        _rewritten_case(item, fixture_names, metadata_names, test_names) for item in side
    ]
    return document


def write_e2e_split(
    suites: Sequence[TestSuite],
    train_ids: Collection[str],
    train_path: Path,
    validation_path: Path,
    base: Path | None = None,
    *,
    validation_ids: Collection[str] | None = None,
) -> None:
    """Write the train and validation tests as two valid E2E files, so users can run `rasa test e2e` on each.

    Test ids are `annotate.conversation_id(test, base)`. Tests outside `train_ids` go to validation, or,
    when `validation_ids` is given, only those (so failing tests can be left out of both). Each file keeps
    the fixtures and metadata its tests refer to (renamed where two files define a name differently) and
    the stubs its tests ran with. Test names are unique in each file (see `_test_names`).
    """
    train_set = set(train_ids)
    validation_set = None if validation_ids is None else set(validation_ids)
    train: list[_Placed] = []
    validation: list[_Placed] = []
    for index, suite in enumerate(suites):
        for test in suite.test_cases:
            test_id = conversation_id(test, base)
            if test_id in train_set:
                train.append(_Placed(index, suite, test))
            elif validation_set is None or test_id in validation_set:
                validation.append(_Placed(index, suite, test))
    sides = ((train, train_path), (validation, validation_path))
    fixture_names = _resolve_names(train + validation, "fixtures")
    metadata_names = _resolve_names(train + validation, "metadata")
    test_names = _test_names(train + validation, base)
    for side, path in sides:
        document = _e2e_document(side, fixture_names, metadata_names, test_names)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
        path.write_text(text, encoding="utf-8", newline="\n")
