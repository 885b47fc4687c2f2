"""The train / validation split by test case, the training records and the E2E files of each side."""

from __future__ import annotations

import dataclasses
import json
import random
import textwrap
from pathlib import Path

import pytest

from ftrecipe.dataprep import e2e
from ftrecipe.dataprep.commands import COMMAND_TYPES, CancelFlow, SetSlot, StartFlow
from ftrecipe.dataprep.split import (
    DataPoint,
    SplitResult,
    command_types_by_test,
    command_types_of,
    ft_data_record,
    partition,
    split_tests,
    training_record,
    write_e2e_split,
    write_jsonl,
)

# ------------------------------------------------------------------------------------------ split_tests


def random_table(n: int, seed: int) -> dict[str, set[str]]:
    """A table where most tests hold common types and a few hold rare ones."""
    rng = random.Random(seed)
    table = {f"f.yml::t{i:03d}": {"set slot", rng.choice(["start flow", "cancel flow"])} for i in range(n)}
    for rare in ("clarify", "human handoff", "skip question"):
        table[f"f.yml::t{rng.randrange(n):03d}"].add(rare)
    return table


def types_of(table: dict[str, set[str]], ids: tuple[str, ...]) -> set[str]:
    return set().union(*(table[i] for i in ids)) if ids else set()


def test_cover_is_minimal_and_ties_go_to_input_order() -> None:
    table = {
        "a::1": {"start flow", "set slot"},
        "a::2": {"set slot"},
        "a::3": {"start flow"},
        "a::4": {"cancel flow"},
        "a::rare": {"clarify"},
        "a::5": {"cancel flow"},
    }
    result = split_tests(table, train_frac=0.2, seed=0)
    # a::1 covers two types; a::4 and a::5 tie on cancel flow, the earlier wins.
    assert result.cover == ("a::1", "a::4", "a::rare")
    # The cover (3 tests) exceeds int(6 * 0.2) = 1, so train is exactly the cover, in input order.
    assert result.train == ("a::1", "a::4", "a::rare")
    assert result.validation == ("a::2", "a::3", "a::5")
    assert result.missing_in_validation == ("clarify",)


def test_a_test_holding_a_rare_type_always_lands_in_train() -> None:
    table = {f"f::t{i}": {"set slot"} for i in range(20)}
    table["f::t7"] = {"set slot", "human handoff"}
    for seed in range(25):
        result = split_tests(table, train_frac=0.5, seed=seed)
        assert "f::t7" in result.train
        assert "f::t7" in result.cover


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_type_present_is_in_train(frac: float, seed: int) -> None:
    table = random_table(40, seed)
    result = split_tests(table, train_frac=frac, seed=seed)
    assert types_of(table, result.train) == types_of(table, tuple(table))
    assert set(result.train) | set(result.validation) == set(table)
    assert not set(result.train) & set(result.validation)
    assert result.missing_in_validation == tuple(
        sorted(types_of(table, result.train) - types_of(table, result.validation))
    )


def test_train_size_is_exactly_the_fraction() -> None:
    table = random_table(20, 3)
    result = split_tests(table, train_frac=0.75, seed=1)
    assert len(result.train) == int(20 * 0.75) == 15
    assert len(result.validation) == 5
    # Input order is kept on both sides.
    order = list(table)
    assert list(result.train) == sorted(result.train, key=order.index)
    assert list(result.validation) == sorted(result.validation, key=order.index)


def test_float_noise_does_not_lose_a_test() -> None:
    table = {f"f::t{i:03d}": {"set slot"} for i in range(100)}
    assert 100 * 0.29 < 29  # 28.999999999999996
    assert len(split_tests(table, train_frac=0.29, seed=0).train) == 29


def test_frac_one_puts_everything_in_train() -> None:
    table = random_table(10, 0)
    result = split_tests(table, train_frac=1.0, seed=5)
    assert result.train == tuple(table)
    assert result.validation == ()
    assert result.missing_in_validation == tuple(sorted(types_of(table, tuple(table))))


@pytest.mark.parametrize("frac", [0.0, -0.1, 1.01])
def test_bad_fraction_is_refused(frac: float) -> None:
    with pytest.raises(ValueError, match="train_frac"):
        split_tests({"a::b": {"set slot"}}, train_frac=frac, seed=0)


def test_empty_table() -> None:
    assert split_tests({}, train_frac=0.8, seed=0) == SplitResult((), (), (), ())


def test_split_is_deterministic_and_depends_on_the_seed() -> None:
    table = random_table(60, 9)
    first = split_tests(table, train_frac=0.5, seed=42)
    assert split_tests(dict(table), train_frac=0.5, seed=42) == first
    others = {split_tests(table, train_frac=0.5, seed=seed).validation for seed in (1, 2, 3)}
    assert all(validation != first.validation for validation in others)


def test_split_does_not_depend_on_dict_order() -> None:
    # One test holds every type, so the cover is unambiguous; the rest is the shuffled part.
    table = {f"f::t{i:02d}": {"set slot"} for i in range(30)}
    table["f::t13"] = {"set slot", "start flow", "clarify"}
    forward = split_tests(table, train_frac=0.6, seed=7)
    backward = split_tests(dict(reversed(list(table.items()))), train_frac=0.6, seed=7)
    assert forward.cover == backward.cover == ("f::t13",)
    assert set(forward.train) == set(backward.train)
    assert backward.train == tuple(reversed(forward.train))  # each in its own input order


# ------------------------------------------------------------------------------------------ data points


def point(test: str, output: str, types: tuple[str, ...], rephrased: str | None = None) -> DataPoint:
    return DataPoint(
        prompt=f"prompt for {test}: Grüße",
        output=output,
        original_test_name=test,
        original_user_utterance="send 50 to Zoë",
        rephrased_user_utterance=rephrased,
        command_types=types,
    )


def test_command_types_of_and_by_test() -> None:
    types = command_types_of([SetSlot("a", "1"), StartFlow("x"), SetSlot("b", None)])
    assert types == ("start flow", "set slot")  # distinct, in COMMAND_TYPES order
    assert set(types) <= set(COMMAND_TYPES)
    points = [
        point("f::b", "start flow x", ("start flow",)),
        point("f::a", "cancel flow", command_types_of([CancelFlow()])),
        point("f::b", "set slot a 1", ("set slot",), rephrased="50 for Zoë"),
    ]
    table = command_types_by_test(points)
    assert list(table) == ["f::b", "f::a"]
    assert table == {"f::b": {"start flow", "set slot"}, "f::a": {"cancel flow"}}
    split = SplitResult(train=("f::b",), validation=("f::a",), cover=("f::b",), missing_in_validation=())
    train, validation = partition([*points, point("f::gone", "x", ())], split)
    assert train == [points[0], points[2]]
    assert validation == [points[1]]


def test_training_records_in_both_formats() -> None:
    p = point("f.yml::t", "start flow transfer_money\nset slot amount 50", ("start flow", "set slot"))
    assert training_record(p, "instruction") == {"prompt": p.prompt, "completion": p.output}
    assert training_record(p, "conversational") == {
        "messages": [
            {"role": "user", "content": p.prompt},
            {"role": "assistant", "content": p.output},
        ]
    }
    with pytest.raises(ValueError, match="output format"):
        training_record(p, "chat")  # type: ignore[arg-type]


def test_ft_data_record_has_rasas_keys_in_order() -> None:
    p = point("f.yml::t", "cancel flow", ("cancel flow",), rephrased="stop it")
    record = ft_data_record(p)
    assert list(record) == [
        "prompt",
        "output",
        "original_test_name",
        "original_user_utterance",
        "rephrased_user_utterance",
    ]
    assert record["rephrased_user_utterance"] == "stop it"
    assert ft_data_record(point("f.yml::t", "x", ()))["rephrased_user_utterance"] is None


def test_write_jsonl_is_byte_deterministic_and_round_trips(tmp_path: Path) -> None:
    points = [point("f::a", "start flow x", ("start flow",)), point("f::b", 'set slot a "1"\n', ())]
    records = [ft_data_record(p) for p in points]
    first, second = tmp_path / "a" / "one.jsonl", tmp_path / "two.jsonl"
    assert write_jsonl(first, records) == 2
    assert write_jsonl(second, iter(records)) == 2
    data = first.read_bytes()
    assert data == second.read_bytes()
    assert "Grüße".encode() in data  # ensure_ascii=False: readable, not \u escapes
    assert data.endswith(b"\n") and b"\r" not in data
    lines = data.decode("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    assert list(json.loads(lines[0])) == list(records[0])  # key order kept
    assert write_jsonl(tmp_path / "empty.jsonl", []) == 0
    assert (tmp_path / "empty.jsonl").read_bytes() == b""


# ------------------------------------------------------------------------------------------ E2E split

SUITE_A = """
fixtures:
  - premium:
      - tier: gold
  - unused:
      - tier: none
metadata:
  - web:
      channel: web
  - app:
      channel: app
stub_custom_actions:
  action_pay:
    events:
      - {event: slot, name: paid, value: true}
    responses: []
  action_hello:
    events: []
    responses:
      - text: hi
  a1::action_pay:
    events:
      - {event: slot, name: paid, value: false}
    responses: []
  a2::action_pay:
    events: []
    responses: []
test_cases:
  - test_case: a1
    fixtures: [premium]
    metadata: web
    steps:
      - user: pay Zoë
        assertions:
          - action_executed: action_pay
  - test_case: a2
    steps:
      - user: hi
        metadata: app
      - utter: utter_greet
  - test_case: a3
    steps:
      - user: pay again
"""

SUITE_B = """
fixtures:
  - premium:
      - tier: silver
metadata:
  - web:
      channel: web
stub_custom_actions:
  action_hello:
    events: []
    responses:
      - text: hi
test_cases:
  - test_case: b1
    fixtures: [premium]
    metadata: web
    steps:
      - user: hello
  - test_case: b2
    steps:
      - user: bye
"""


def without_lines(steps: tuple[e2e.Step, ...]) -> tuple[e2e.Step, ...]:
    """Steps compared by content: line numbers differ between the original and the written file."""
    return tuple(dataclasses.replace(step, line=0) for step in steps)


def write_suites(root: Path) -> list[e2e.TestSuite]:
    (root / "e2e").mkdir(parents=True)
    (root / "e2e" / "a.yml").write_text(textwrap.dedent(SUITE_A), encoding="utf-8")
    (root / "e2e" / "b.yml").write_text(textwrap.dedent(SUITE_B), encoding="utf-8")
    return e2e.read_e2e_tests([root / "e2e"])


def test_e2e_split_round_trip(tmp_path: Path) -> None:
    suites = write_suites(tmp_path)
    train_path, validation_path = tmp_path / "out" / "train.yaml", tmp_path / "out" / "validation.yaml"
    write_e2e_split(suites, {"e2e/a.yml::a1", "e2e/b.yml::b1"}, train_path, validation_path, base=tmp_path)

    train = e2e.read_test_suite(train_path)
    assert [t.name for t in train.test_cases] == ["a1", "b1"]
    # `premium` means gold in a.yml and silver in b.yml: both renamed by file stem, references rewritten.
    assert dict(train.fixtures) == {"premium_a": {"tier": "gold"}, "premium_b": {"tier": "silver"}}
    a1, b1 = train.test_cases
    assert a1.fixtures == ("premium_a",)
    assert b1.fixtures == ("premium_b",)
    assert train.fixture_slots(a1) == {"tier": "gold"}
    assert train.fixture_slots(b1) == {"tier": "silver"}
    # `web` is the same in both files: one entry, no rename.
    assert dict(train.metadata) == {"web": {"channel": "web"}}
    assert a1.metadata == b1.metadata == "web"
    # action_hello: the same in both files, stays file-wide. action_pay is a.yml's only: it must not
    # reach b1, and a1's own stub wins; a2's stub belongs to the other side.
    assert dict(train.stubs) == {
        "action_hello": {"events": [], "responses": [{"text": "hi"}]},
        "a1::action_pay": {"events": [{"event": "slot", "name": "paid", "value": False}], "responses": []},
    }
    original = e2e.read_test_suite(tmp_path / "e2e" / "a.yml").test_cases[0]
    assert without_lines(a1.steps) == without_lines(original.steps)

    validation = e2e.read_test_suite(validation_path)
    assert [t.name for t in validation.test_cases] == ["a2", "a3", "b2"]
    assert dict(validation.fixtures) == {}  # no test there uses one; `unused` is never written
    assert dict(validation.metadata) == {"app": {"channel": "app"}}  # referenced by a user step only
    assert without_lines(validation.test_cases[0].steps) == (
        e2e.UserStep("hi", metadata="app"),
        e2e.UtterStep("utter_greet"),
    )
    assert dict(validation.stubs) == {
        "action_hello": {"events": [], "responses": [{"text": "hi"}]},
        "a2::action_pay": {"events": [], "responses": []},
        "a3::action_pay": {"events": [{"event": "slot", "name": "paid", "value": True}], "responses": []},
    }
    text = validation_path.read_text(encoding="utf-8")
    assert "fixtures:" not in text and "Zoë" not in text

    # Byte-deterministic.
    before = train_path.read_bytes(), validation_path.read_bytes()
    write_e2e_split(suites, {"e2e/b.yml::b1", "e2e/a.yml::a1"}, train_path, validation_path, base=tmp_path)
    assert (train_path.read_bytes(), validation_path.read_bytes()) == before
    assert "pay Zoë" in train_path.read_text(encoding="utf-8")  # allow_unicode


def test_e2e_split_can_leave_tests_out(tmp_path: Path) -> None:
    suites = write_suites(tmp_path)
    train_path, validation_path = tmp_path / "train.yaml", tmp_path / "validation.yaml"
    write_e2e_split(
        suites,
        ["e2e/a.yml::a1"],
        train_path,
        validation_path,
        base=tmp_path,
        validation_ids=["e2e/b.yml::b2"],
    )
    train = e2e.read_test_suite(train_path)
    validation = e2e.read_test_suite(validation_path)
    assert [t.name for t in train.test_cases] == ["a1"]
    assert dict(train.fixtures) == {"premium": {"tier": "gold"}}  # b1 is in neither: no conflict left
    assert [t.name for t in validation.test_cases] == ["b2"]
    assert dict(validation.stubs) == {"action_hello": {"events": [], "responses": [{"text": "hi"}]}}


def test_e2e_split_renaming_avoids_taken_names(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.yml").write_text(
        "fixtures:\n  - f: [{s: 1}]\n  - f_b: [{s: 3}]\n"
        "test_cases:\n  - test_case: t1\n    fixtures: [f, f_b]\n    steps:\n      - user: hi\n",
        encoding="utf-8",
    )
    (tmp_path / "x" / "b.yml").write_text(
        "fixtures:\n  - f: [{s: 2}]\ntest_cases:\n  - test_case: t2\n    fixtures: [f]\n    steps:\n      - user: yo\n",
        encoding="utf-8",
    )
    suites = e2e.read_e2e_tests([tmp_path / "x"])
    ids = ["x/a.yml::t1", "x/b.yml::t2"]
    write_e2e_split(suites, ids, tmp_path / "train.yaml", tmp_path / "validation.yaml", base=tmp_path)
    train = e2e.read_test_suite(tmp_path / "train.yaml")
    assert dict(train.fixtures) == {"f_a": {"s": 1}, "f_b": {"s": 3}, "f_b_2": {"s": 2}}
    assert [t.fixtures for t in train.test_cases] == [("f_a", "f_b"), ("f_b_2",)]
    assert e2e.read_test_suite(tmp_path / "validation.yaml").test_cases == ()


def test_e2e_split_writes_repeated_test_names_apart(tmp_path: Path) -> None:
    """Rasa runs tests that share a name; in the merged files each gets its own name, the original visible."""
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "a.yml").write_text(
        "stub_custom_actions:\n"
        "  same::action_pay:\n    events: []\n    responses: []\n"
        "test_cases:\n"
        "  - test_case: same\n    steps:\n      - user: one\n"
        "  - test_case: other\n    steps:\n      - user: two\n"
        "  - test_case: same\n    steps:\n      - user: three\n",
        encoding="utf-8",
    )
    (tmp_path / "e2e" / "b.yml").write_text(
        "stub_custom_actions:\n"
        "  action_hello:\n    events: []\n    responses: [{text: hi}]\n"
        "test_cases:\n  - test_case: same\n    steps:\n      - user: four\n",
        encoding="utf-8",
    )
    suites = e2e.read_e2e_tests([tmp_path / "e2e"])
    train_path, validation_path = tmp_path / "train.yaml", tmp_path / "validation.yaml"
    write_e2e_split(suites, ["e2e/a.yml::same#1", "e2e/b.yml::same"], train_path, validation_path, tmp_path)

    train = e2e.read_test_suite(train_path)
    assert [(t.name, t.steps[0].text) for t in train.test_cases] == [  # type: ignore[union-attr]
        ("same#1 (e2e/a.yml)", "one"),
        ("same (e2e/b.yml)", "four"),
    ]
    # a.yml's stub for its tests named `same` follows each of them; b.yml's file-wide stub stays on b's test.
    assert dict(train.stubs) == {
        "same (e2e/b.yml)::action_hello": {"events": [], "responses": [{"text": "hi"}]},
        "same#1 (e2e/a.yml)::action_pay": {"events": [], "responses": []},
    }
    validation = e2e.read_test_suite(validation_path)
    assert [(t.name, t.steps[0].text) for t in validation.test_cases] == [  # type: ignore[union-attr]
        ("other", "two"),
        ("same#2 (e2e/a.yml)", "three"),
    ]
    assert dict(validation.stubs) == {"same#2 (e2e/a.yml)::action_pay": {"events": [], "responses": []}}
    assert all(t.occurrence == 0 for t in (*train.test_cases, *validation.test_cases))
