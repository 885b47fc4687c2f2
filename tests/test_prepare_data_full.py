"""All four stages of prepare-data on the example assistant, with exact counts computed from the recipe's rules.

The scripted server plays three roles, told apart by the prompt: the command generator (annotation and
validation: it answers from the hand-written table of support.moneybank, which checks the state each prompt
shows), and the rephraser (it offers two candidates
per message: "(reworded A)", which the command generator answers like the original, and "(reworded B)",
which it answers with other commands, so A passes and B fails). One conversation's rephraser answer is
garbage: that conversation gets no rephrasings and keeps its original data points.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.dataprep.commands import COMMAND_TYPES
from ftrecipe.dataprep.e2e import read_test_suite
from ftrecipe.dataprep.pipeline import prepare_data
from support.llm_server import ChatRequest, LLMServer
from support.moneybank import LABELS, TableGenerator, annotated_messages, options

GARBLED_TEST = "check_balance_via_button"
REPHRASE_MARK = "You help build training data"
SUFFIX = re.compile(r" \(reworded ([AB])\)")


def make_script(messages: dict[str, list[str]]) -> Any:
    # A rephrased message is checked in its original conversation: without the suffix, the table's prompt.
    table = TableGenerator(rewrite=lambda prompt: SUFFIX.sub("", prompt))

    def script(request: ChatRequest) -> str:
        prompt = request.prompt
        if prompt.startswith(REPHRASE_MARK):
            name = re.search(r'conversations, "([^"]+)"', prompt)
            assert name is not None
            if name.group(1) == GARBLED_TEST:
                return "Sorry, I can't help with that."
            return "\n\n".join(
                f"USER: {m}\n1. {m} (reworded A)\n2. {m} (reworded B)" for m in messages[name.group(1)]
            )
        variant = SUFFIX.search(prompt)
        original = table(request)
        if variant is None:
            return original
        if variant.group(1) == "B":  # always different from the original's commands
            return "hand over" if original == "cannot handle" else "cannot handle"
        return original

    return script


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("output_format", ["instruction", "conversational"])
async def test_full_pipeline_counts(
    tmp_path: Path,
    llm_server: LLMServer,
    llm_config: Path,
    output_format: str,
) -> None:
    messages = annotated_messages()
    llm_server.script(make_script(messages))
    llm_server.fail_next(1, status=500, retry_after=0.001)  # recovered by a retry: loses nothing
    result = await prepare_data(
        options(tmp_path, llm_config, num_rephrases=2, output_format=output_format, train_frac=0.8, seed=7)
    )
    out = tmp_path / "out"
    summary = result.summary
    assert llm_server.script_errors == []

    # --- expected figures, from the rules -------------------------------------------------------------
    tests = {name: len(m) for name, m in messages.items()}
    n_turns = sum(tests.values())
    assert (len(tests), n_turns) == (35, len(LABELS)) == (35, 91)
    rephrased_turns = n_turns - tests[GARBLED_TEST]
    # Each rephrased conversation: one synthetic conversation (S = max |P_i| = 1) on top of the original.
    expected_points = {name: m if name == GARBLED_TEST else 2 * m for name, m in tests.items()}
    assert summary["num_annotated_conversations"] == len(tests)
    assert summary["num_user_messages_to_rephrase_across_conversations"] == n_turns
    assert summary["num_passing_rephrased_user_messages"] == rephrased_turns
    assert summary["num_failing_rephrased_user_messages"] == rephrased_turns
    assert summary["num_synthetic_conversations"] == len(tests) - 1
    assert summary["num_ft_data_points"] == sum(expected_points.values())
    assert len(summary["rephrasing_warnings"]) == 1
    assert GARBLED_TEST in summary["rephrasing_warnings"][0]
    # LLM economy: one call per annotated turn, one rephraser call per conversation, one per candidate.
    purposes = summary["llm_usage"]["purposes"]
    assert purposes["annotate"]["calls"] + purposes["validate"]["calls"] + purposes["rephrase"]["calls"] == (
        n_turns + len(tests) + 2 * rephrased_turns + 1  # + the retried 500
    )

    # --- stage 3: every data point, with its provenance -----------------------------------------------
    records = jsonl(out / "3_llm_finetune_data" / "llm_ft_data.jsonl")
    assert len(records) == summary["num_ft_data_points"]
    assert list(records[0]) == [
        "prompt",
        "output",
        "original_test_name",
        "original_user_utterance",
        "rephrased_user_utterance",
    ]
    per_test = Counter(r["original_test_name"].split("::")[1] for r in records)
    assert per_test == Counter(expected_points)
    rephrased = [r for r in records if r["rephrased_user_utterance"] is not None]
    assert len(rephrased) == rephrased_turns
    assert all(r["rephrased_user_utterance"].endswith("(reworded A)") for r in rephrased)
    assert all(r["rephrased_user_utterance"] in r["prompt"] for r in rephrased)
    # Every training prompt, the synthetic conversations' too (rendered, never sent), shows the state the
    # hand-written table expects for its message, and is labelled with the table's commands.
    table = TableGenerator(rewrite=lambda prompt: SUFFIX.sub("", prompt))
    for record in records:
        assert record["output"] == "\n".join(table.label(record["prompt"]).commands)

    # --- stage 4: the split, by test case --------------------------------------------------------------
    # Worked out by hand from the labels (support.moneybank.LABELS), in split.py's rules:
    # - Train first gets a greedy set cover of the 10 command types over the tests in input order (files
    #   sorted: accounts, cards, repair, payees, transfers). No test holds more than 3 types; the first with 3
    #   is account_question_clarification (clarify, start flow, set slot). No other test then adds more than
    #   one missing type, so each round takes the first test (in input order) holding one: skip question
    #   (replace_expiring_card_skip_delivery_question), human handoff (block_card_human_handoff_mid_flow),
    #   search and reply (block_card_knowledge_question_mid_flow), chitchat (chitchat_greeting_then_balance),
    #   repeat message (repeat_question_during_transfer), cannot handle (cannot_handle_gibberish), cancel flow
    #   (add_payee_cancelled_without_iban): a cover of 8 tests.
    # - Train holds max(8, floor(35 * 0.8)) = 28 tests: the cover and the first 20 of the other 27 test ids
    #   (`<file>::<name>`), sorted, then shuffled by the standard library's random.Random(7); the 7 left
    #   over are validation. Which 7 is the stdlib shuffle's doing (random.Random(7).shuffle of the sorted
    #   ids, outside our code): the names below.
    # - Points: 2 per turn (the original and one synthetic conversation), but check_balance_via_button, whose
    #   rephraser answer is garbage, keeps 1 per turn. Validation: transfer_correct_amount_before_confirming
    #   3 turns, transfer_digression_to_check_balance 3, block_card_declined_at_confirmation 2,
    #   check_checking_balance_in_one_message 1, knowledge_question_savings_interest_rate 1,
    #   human_handoff_direct_request 1 (2 points each turn: 22), check_balance_via_button 1 turn, 1 point:
    #   23. All: 2 * 91 - 1 = 181, so train 158.
    train = jsonl(out / "4_train_test_split" / "ft_splits" / "train.jsonl")
    val = jsonl(out / "4_train_test_split" / "ft_splits" / "val.jsonl")
    assert (summary["num_train_tests"], summary["num_validation_tests"]) == (28, 7)
    assert (len(train), len(val), len(records)) == (158, 23, 181)
    n_train_tests = summary["num_train_tests"]
    assert summary["num_train_data_points"] == len(train)
    assert summary["num_val_data_points"] == len(val)
    if output_format == "instruction":
        assert set(train[0]) == {"prompt", "completion"}
        completions = [r["completion"] for r in train]
    else:
        assert [m["role"] for m in train[0]["messages"]] == ["user", "assistant"]
        completions = [r["messages"][1]["content"] for r in train]
    # Every command type present in the data is trained.
    present = {t for r in records for t in _types(r["output"])}
    assert present <= {t for c in completions for t in _types(c)}
    assert present == set(COMMAND_TYPES)  # the example suite covers every command type
    # The E2E split files are valid suites whose tests partition the passing tests.
    train_suite = read_test_suite(out / "4_train_test_split" / "e2e_tests" / "train.yaml")
    val_suite = read_test_suite(out / "4_train_test_split" / "e2e_tests" / "validation.yaml")
    names = [t.name for t in train_suite.test_cases] + [t.name for t in val_suite.test_cases]
    assert sorted(names) == sorted(tests)
    assert {t.name for t in val_suite.test_cases} == {
        "check_checking_balance_in_one_message",
        "check_balance_via_button",
        "block_card_declined_at_confirmation",
        "knowledge_question_savings_interest_rate",
        "human_handoff_direct_request",
        "transfer_correct_amount_before_confirming",
        "transfer_digression_to_check_balance",
    }
    assert len(train_suite.test_cases) == n_train_tests
    train_points = sum(expected_points[t.name] for t in train_suite.test_cases)
    assert len(train) == train_points

    # --- reports ------------------------------------------------------------------------------------
    rephrasings = yaml.safe_load((out / "2_rephrasings" / "transfers.yml").read_text())
    first_user = rephrasings["conversations"][0]["steps"][0]
    assert first_user["passing_rephrasings"] == [f"{first_user['user']} (reworded A)"]
    assert first_user["failing_rephrasings"] == [f"{first_user['user']} (reworded B)"]
    assert (out / "coverage" / "commands.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "transfer_money" in (out / "coverage" / "flows.md").read_text()
    params = yaml.safe_load((out / "params.yaml").read_text())
    assert params["num_rephrases"] == 2
    assert params["seed"] == 7


def _types(completion: str) -> set[str]:
    from ftrecipe.dataprep.commands import command_type, parse_commands

    return {command_type(c) for c in parse_commands(completion, "v2")}


async def test_same_inputs_and_seed_give_byte_identical_outputs(
    tmp_path: Path,
    llm_server: LLMServer,
    llm_config: Path,
) -> None:
    llm_server.script(make_script(annotated_messages()))
    for name in ("a", "b"):
        await prepare_data(options(tmp_path, llm_config, num_rephrases=2, out=tmp_path / name, seed=3))
    assert llm_server.script_errors == []  # every conversation annotated: the files are not empty alike
    for path in sorted((tmp_path / "a").rglob("*")):
        if path.is_file() and path.name not in (
            "result_summary.yaml",
            "params.yaml",
            "manifest.json",
            "_SUCCESS",
        ):
            twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
            assert path.read_bytes() == twin.read_bytes(), path


async def test_progress_on_a_terminal_and_in_logs(
    tmp_path: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    import io

    from rich.console import Console

    from ftrecipe.dataprep.progress import LineReporter, RichReporter

    llm_server.script(make_script(annotated_messages()))
    screen = io.StringIO()
    with RichReporter(Console(file=screen, force_terminal=True, width=120)) as reporter:
        await prepare_data(options(tmp_path, llm_config, num_rephrases=2, out=tmp_path / "tty"), reporter)
    shown = screen.getvalue()
    n_tests = len(annotated_messages())
    assert "annotate" in shown
    assert "rephrase" in shown
    assert f"{n_tests}/{n_tests}" in shown
    logs = io.StringIO()
    await prepare_data(
        options(tmp_path, llm_config, num_rephrases=2, out=tmp_path / "log"), LineReporter(logs)
    )
    lines = logs.getvalue().splitlines()
    assert llm_server.script_errors == []
    assert sum(line.startswith("annotate [") for line in lines) == n_tests
    assert sum(line.startswith("rephrase [") for line in lines) == n_tests
    assert f"annotate [{n_tests}/{n_tests}]" in logs.getvalue()
    assert "\x1b[" not in logs.getvalue()  # no terminal codes in logs
