"""`ftrecipe evaluate --e2e`: the held-out E2E tests of prepare-data's real output on the example assistant,
replayed with the model in the loop.

The model is the scripted `llm_server` answering as the teacher did (support.moneybank's hand-written
table), or with one answer changed; the local path runs the tiny model once. The example's split
(seed 42, train fraction 0.8) holds 7 validation tests with 20 command-generator turns:

    recent_savings_transactions_in_one_message 1, balance_then_transactions_back_to_back 2,
    card_problem_clarification_then_replace 5, cannot_handle_in_the_middle_of_a_flow 3,
    transfer_happy_path_step_by_step 4, transfer_insufficient_funds 2, transfer_digression_to_check_balance 3
    (its last user message is a button click: no turn)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Final

import pytest

from ftrecipe.cli.main import main
from ftrecipe.evaluation.e2e import E2EInputs, load_e2e, replay_with_local
from ftrecipe.evaluation.references import choose_syntax, find_val
from ftrecipe.evaluation.scoring import Generation
from ftrecipe.termination import decode
from support.llm_server import ChatRequest, LLMServer
from support.moneybank import EXAMPLE, LABELS, TESTS, V2_LAYOUT, TableGenerator, read_state

VALIDATION_TESTS: Final = {
    "recent_savings_transactions_in_one_message": 1,
    "balance_then_transactions_back_to_back": 2,
    "card_problem_clarification_then_replace": 5,
    "cannot_handle_in_the_middle_of_a_flow": 3,
    "transfer_happy_path_step_by_step": 4,
    "transfer_insufficient_funds": 2,
    "transfer_digression_to_check_balance": 3,
}
TURNS: Final = 20  # val.jsonl's records, and the E2E turns when every test passes
VALIDATION_FILE: Final = "4_train_test_split/e2e_tests/validation.yaml"
DATETIME_LINE: Final = "Today is {{ current_datetime }}.\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare-data's real output for the example (assertions annotator, offline), once per module."""
    out = tmp_path_factory.mktemp("e2e-data") / "data"
    prepare = ["prepare-data", str(TESTS), "--assistant", str(EXAMPLE), "--annotator", "assertions"]
    assert main([*prepare, "--num-rephrases", "0", "--out", str(out)]) == 0
    return out


@pytest.fixture(autouse=True)
def endpoint_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")


@pytest.fixture
def termination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    path.write_text("", encoding="utf-8")
    monkeypatch.setenv("FTRECIPE_TERMINATION_LOG", str(path))
    return path


def _evaluate(data: Path, server: LLMServer, out: Path, *extra: str) -> int:
    args = ["evaluate", "--data", str(data), "--endpoint", server.base_url, "--model", "moneybank"]
    return main([*args, "--out", str(out), "--e2e", "--assistant", str(EXAMPLE), *extra])


def _message(request: ChatRequest) -> str:
    return read_state(request.prompt, V2_LAYOUT).message


def _e2e_requests(server: LLMServer) -> list[ChatRequest]:
    """The replay's requests: the turn-by-turn scoring's TURNS requests all come first."""
    return server.chat_requests[TURNS:]


class OneChange:
    """The teacher's answers, except at `message`: `answer` there. With `loose`, the prompts of `test` after
    that message are answered by their (message, flow, asked slot) alone, whatever slot values they show
    (the table would refuse them: they are the model's, not the teacher's)."""

    def __init__(self, message: str, answer: str, loose: str | None = None) -> None:
        self.message, self.answer = message, answer
        self.table = TableGenerator()
        self.loose = {label.state: label for label in LABELS if label.test == loose}

    def __call__(self, request: ChatRequest) -> str:
        state = read_state(request.prompt, V2_LAYOUT)
        if state.message == self.message:
            return self.answer
        label = self.loose.get((state.message, state.flow, state.asked))
        if label is not None:
            return "\n".join(label.commands)
        return self.table(request)


def test_teacher_answers_pass_every_test(
    data: Path, llm_server: LLMServer, tmp_path: Path, termination: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llm_server.script(TableGenerator())
    out = tmp_path / "eval"
    assert _evaluate(data, llm_server, out) == 0
    assert llm_server.script_errors == []

    document = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    e2e = document["e2e"]
    assert (e2e["tests"], e2e["passed"], e2e["pass_rate"], e2e["failed"]) == (7, 7, 1.0, [])
    assert e2e["model_calls"] == TURNS and e2e["file"] == VALIDATION_FILE
    assert e2e["prompt_template"] == "builtin:command_prompt_v2.jinja2"
    assert document["command_accuracy"] == 1.0

    # One call per turn; each prompt is the one the teacher's state rendered, i.e. exactly val.jsonl's.
    replayed = _e2e_requests(llm_server)
    assert len(replayed) == TURNS
    scored = llm_server.chat_requests[:TURNS]
    assert sorted(json.dumps(r.messages) for r in replayed) == sorted(json.dumps(r.messages) for r in scored)
    assert all(r.messages == [{"role": "user", "content": r.prompt}] for r in replayed)
    turns = [json.loads(line) for line in (out / "e2e_turns.jsonl").read_text(encoding="utf-8").splitlines()]
    per_test = {name: sum(1 for t in turns if t["test"] == name) for name in VALIDATION_TESTS}
    assert per_test == VALIDATION_TESTS

    markdown = (out / "eval.md").read_text(encoding="utf-8")
    assert "| command accuracy | **100.0%**" in markdown
    assert "| E2E pass rate | **100.0%** (7 of 7 held-out tests" in markdown
    assert "Every test passes." in markdown

    report = decode(termination.read_text(encoding="utf-8"))
    assert report is not None and report.ok
    assert (report.figures["e2e_tests"], report.figures["e2e_passed"], report.figures["e2e_pass_rate"]) == (
        7,
        7,
        1.0,
    )
    assert "E2E pass rate 100.0% (7 of 7 tests)" in report.message

    from ftrecipe.storage import read_manifest

    manifest = read_manifest(out)
    assert manifest is not None
    assert {f.path for f in manifest.files} == {
        "eval.json",
        "eval.md",
        "predictions.jsonl",
        "e2e_turns.jsonl",
    }
    assert (manifest.metadata["e2e_tests"], manifest.metadata["e2e_pass_rate"]) == (7, 1.0)

    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    e2e_progress = [e for e in events if e.get("stage") == "e2e"]
    assert e2e_progress[0]["done"] == 0 and e2e_progress[-1]["done"] == e2e_progress[-1]["total"] == TURNS
    assert events[-1]["event"] == "done" and events[-1]["e2e_pass_rate"] == 1.0


def test_one_wrong_answer_fails_that_test_at_that_turn(
    data: Path, llm_server: LLMServer, tmp_path: Path
) -> None:
    llm_server.script(OneChange("$50", "set slot amount 500"))
    out = tmp_path / "eval"
    assert _evaluate(data, llm_server, out) == 0
    assert llm_server.script_errors == []

    e2e = json.loads((out / "eval.json").read_text(encoding="utf-8"))["e2e"]
    assert (e2e["tests"], e2e["passed"], e2e["pass_rate"]) == (7, 6, 0.857143)
    assert e2e["failed"] == [
        {
            "test": "transfer_happy_path_step_by_step",
            "file": VALIDATION_FILE,
            "turn_index": 2,
            "user_message": "$50",
            "expected": "set slot amount 50",
            "actual": "set slot amount 500\n(missing `set slot amount 50`)",
            "answer": "set slot amount 500",
        }
    ]
    # The test stops there: its last turn costs no call; the tests after it are replayed in full.
    replayed = [_message(r) for r in _e2e_requests(llm_server)]
    assert e2e["model_calls"] == len(replayed) == TURNS - 1
    assert "yes, go ahead" not in replayed
    assert {"yes", "ok, send 300 then"} <= set(replayed)  # transfer_insufficient_funds, …_digression_…

    markdown = (out / "eval.md").read_text(encoding="utf-8")
    assert "| E2E pass rate | **85.7%** (6 of 7 held-out tests" in markdown
    assert (
        "| transfer_happy_path_step_by_step | 2 | $50 | set slot amount 50 | "
        "set slot amount 500<br>(missing `set slot amount 50`) | set slot amount 500 |"
    ) in markdown


def test_the_models_slot_value_shows_in_the_later_prompts(
    data: Path, llm_server: LLMServer, tmp_path: Path
) -> None:
    """The model fills delivery_speed where the teacher did not (the turn's check pins only the started
    flow): the test's later prompts show the model's value, then its own correction."""
    test = "card_problem_clarification_then_replace"
    llm_server.script(
        OneChange(
            "it's damaged, I just need a new one",
            "start flow replace_card\nset slot delivery_speed express",
            loose=test,
        )
    )
    out = tmp_path / "eval"
    assert _evaluate(data, llm_server, out) == 0
    assert llm_server.script_errors == []

    def slots_shown(requests: list[ChatRequest], message: str) -> dict[str, str]:
        (prompt,) = [r.prompt for r in requests if _message(r) == message]
        return read_state(prompt, V2_LAYOUT).slots

    replayed, scored = _e2e_requests(llm_server), llm_server.chat_requests[:TURNS]
    assert slots_shown(replayed, "my debit card") == {"delivery_speed": "express"}
    assert slots_shown(replayed, "standard is fine") == {"card_type": "debit", "delivery_speed": "express"}
    assert slots_shown(replayed, "yes, order it") == {"card_type": "debit", "delivery_speed": "standard"}
    # The teacher-forced prompts of the same turns show the teacher's state.
    assert slots_shown(scored, "my debit card") == {}
    assert slots_shown(scored, "standard is fine") == {"card_type": "debit"}

    e2e = json.loads((out / "eval.json").read_text(encoding="utf-8"))["e2e"]
    assert (e2e["passed"], e2e["failed"], e2e["model_calls"]) == (7, [], TURNS)


def test_the_gate_exits_3_after_publishing(
    data: Path, llm_server: LLMServer, tmp_path: Path, termination: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ftrecipe.storage import bundle_complete

    llm_server.script(OneChange("$50", "set slot amount 500"))
    out = tmp_path / "eval"
    assert _evaluate(data, llm_server, out, "--min-e2e-pass-rate", "0.9") == 3
    assert bundle_complete(out)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: E2E pass rate 0.8571 (6 of 7 tests) is below --min-e2e-pass-rate 0.9"
    report = decode(termination.read_text(encoding="utf-8"))
    assert report is not None and not report.ok
    assert report.message == "E2E pass rate 0.8571 (6 of 7 tests) is below --min-e2e-pass-rate 0.9"
    assert report.figures["e2e_pass_rate"] == pytest.approx(6 / 7)

    assert _evaluate(data, llm_server, tmp_path / "again", "--min-e2e-pass-rate", "0.85") == 0
    # Both gates missed: both lines, exit 3.
    both = ("--min-e2e-pass-rate", "0.9", "--min-command-accuracy", "0.99")
    assert _evaluate(data, llm_server, tmp_path / "both", *both) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2:] == [
        "error: command accuracy 0.9500 is below --min-command-accuracy 0.99",
        "error: E2E pass rate 0.8571 (6 of 7 tests) is below --min-e2e-pass-rate 0.9",
    ]


def test_without_e2e_nothing_changes(data: Path, llm_server: LLMServer, tmp_path: Path) -> None:
    llm_server.script(TableGenerator())
    out = tmp_path / "eval"
    args = ["evaluate", "--data", str(data), "--endpoint", llm_server.base_url, "--model", "m"]
    assert main([*args, "--out", str(out)]) == 0
    assert len(llm_server.chat_requests) == TURNS
    assert "e2e" not in json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert not (out / "e2e_turns.jsonl").exists()
    assert "E2E" not in (out / "eval.md").read_text(encoding="utf-8")


def test_prompts_show_the_instant_the_data_recorded(
    llm_server: LLMServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A template that shows current_datetime: the replay's prompts show the instant prepare-data used
    (params.yaml), in the generator's zone; another template than the data's is one line, no call."""
    builtin = Path(__file__).parents[1] / "operator/ftrecipe/dataprep/templates/command_prompt_v2.jinja2"
    template = tmp_path / "prompt.jinja2"
    template.write_text(DATETIME_LINE + builtin.read_text(encoding="utf-8"), encoding="utf-8")
    llm_config = tmp_path / "llm.yml"
    llm_config.write_text("syntax: v2\nprompt_template: prompt.jinja2\n", encoding="utf-8")
    data = tmp_path / "data"
    prepare = ["prepare-data", str(TESTS), "--assistant", str(EXAMPLE), "--annotator", "assertions"]
    prepare += ["--llm-config", str(llm_config), "--prompt-datetime", "2026-01-15T09:30:00+01:00"]
    assert main([*prepare, "--num-rephrases", "0", "--out", str(data), "--cache-dir", str(tmp_path)]) == 0

    llm_server.script(TableGenerator())
    assert _evaluate(data, llm_server, tmp_path / "eval", "--llm-config", str(llm_config)) == 0
    replayed = _e2e_requests(llm_server)
    assert len(replayed) == TURNS
    assert all(r.prompt.startswith("Today is 2026-01-15 08:30:00+00:00.\n") for r in replayed)
    e2e = json.loads((tmp_path / "eval" / "eval.json").read_text(encoding="utf-8"))["e2e"]
    assert (e2e["passed"], e2e["prompt_template"]) == (7, str(template))

    llm_server.reset()
    capsys.readouterr()
    assert _evaluate(data, llm_server, tmp_path / "other") == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: the prompt template builtin:command_prompt_v2.jinja2 is not the one the data was prepared "
        f"with ({template}, {data}/params.yaml): pass the --llm-config / --config prepare-data was given, so "
        "the model sees the prompts it was trained on"
    )
    assert llm_server.chat_requests == []


def _error(capsys: pytest.CaptureFixture[str], server: LLMServer, *args: str) -> str:
    assert main(["evaluate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert server.chat_requests == []  # before any model call
    return err


def test_errors_are_one_line_before_any_call(
    data: Path, llm_server: LLMServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "--data",
        str(data),
        "--endpoint",
        llm_server.base_url,
        "--model",
        "m",
        "--out",
        str(tmp_path / "o"),
    ]
    assert _error(capsys, llm_server, *base, "--e2e") == (
        "error: --e2e replays the held-out E2E tests on the assistant: pass --assistant DIR (its flows and "
        "domain, as given to prepare-data)"
    )
    assert _error(capsys, llm_server, *base, "--assistant", str(EXAMPLE)) == (
        "error: --assistant is for the E2E replay: add --e2e, or leave it out"
    )
    assert _error(capsys, llm_server, *base, "--min-e2e-pass-rate", "0.5") == (
        "error: --min-e2e-pass-rate gates the E2E replay: add --e2e (and --assistant DIR)"
    )
    assert _error(capsys, llm_server, *base, "--e2e", "--min-e2e-pass-rate", "2") == (
        "error: --min-e2e-pass-rate must be between 0 and 1, not 2"
    )
    missing = tmp_path / "nowhere"
    assert _error(capsys, llm_server, *base, "--e2e", "--assistant", str(missing)) == (
        f"error: --assistant {missing}: the assistant folder does not exist"
    )
    assert _error(
        capsys, llm_server, *base, "--e2e", "--assistant", str(EXAMPLE), "--config", str(missing)
    ) == (f"error: --config {missing}: file not found")
    # A generator that speaks v1, while the data was prepared in v2.
    v1 = tmp_path / "v1.yml"
    v1.write_text("syntax: v1\n", encoding="utf-8")
    assert _error(
        capsys, llm_server, *base, "--e2e", "--assistant", str(EXAMPLE), "--llm-config", str(v1)
    ) == (
        f"error: the data is in command syntax v2 ({data}/params.yaml), but the command generator of "
        f"--llm-config {v1} / --config (none) speaks v1 ({v1}): pass the --llm-config / --config "
        "prepare-data was given"
    )

    # A data bundle without validation.yaml (older, or only the splits copied).
    old = tmp_path / "old"
    shutil.copytree(data, old)
    (old / VALIDATION_FILE).unlink()
    moved = ["--data", str(old), *base[2:]]
    assert _error(capsys, llm_server, *moved, "--e2e", "--assistant", str(EXAMPLE)) == (
        f"error: {old}: no {VALIDATION_FILE}; --e2e replays the held-out E2E tests prepare-data writes there: "
        "point --data at prepare-data's whole output (re-run prepare-data for a bundle that lacks it)"
    )


def test_local_rounds_batch_the_next_turn_of_every_running_test(data: Path) -> None:
    """A local model answers in rounds: each `generate` call holds the next turn of every test still
    running. Here the table answers as the teacher did, so the rounds shrink as tests end."""
    table = TableGenerator()
    rounds: list[list[str]] = []
    seen: list[Any] = []

    def generate(prompts: list[Any], wheres: list[str]) -> list[Generation]:
        rounds.append(wheres)
        seen.extend(prompts)
        answers = ["\n".join(table.label(messages[0]["content"]).commands) for messages in prompts]
        return [Generation(text, 0.0, None) for text in answers]

    val = find_val(data)
    setup = load_e2e(E2EInputs(EXAMPLE), data, val, choose_syntax(None, data, val), str(data))
    result = replay_with_local(setup, generate)
    assert [len(r) for r in rounds] == [7, 6, 4, 2, 1]
    assert rounds[-1] == [f"{VALIDATION_FILE}::card_problem_clarification_then_replace turn 4"]
    assert (result.passed, result.failures, len(result.turns)) == (7, [], TURNS)
    assert all(len(messages) == 2 for messages in seen)  # the prompt, and an empty answer (not shown)


def test_local_model_in_the_loop(data: Path, tiny_model: Path, tmp_path: Path) -> None:
    """The tiny model (random weights) once, batched and one prompt at a time: the same answers. Its first
    answer of every test is gibberish (cannot handle), so each test fails at turn 0: 7 calls in one round."""
    pytest.importorskip("torch", reason="the local-model path needs the 'train' extra")
    runs = {}
    for batch in ("8", "1"):
        out = tmp_path / f"eval-{batch}"
        args = ["evaluate", "--data", str(data), "--base-model", str(tiny_model), "--out", str(out)]
        args += ["--e2e", "--assistant", str(EXAMPLE), "--batch-size", batch, "--max-new-tokens", "8"]
        assert main(args) == 0
        runs[batch] = json.loads((out / "eval.json").read_text(encoding="utf-8"))["e2e"]
    e2e = runs["8"]
    assert (e2e["tests"], e2e["passed"], e2e["model_calls"]) == (7, 0, 7)
    assert {f["turn_index"] for f in e2e["failed"]} == {0}
    assert [f["answer"] for f in e2e["failed"]] == [f["answer"] for f in runs["1"]["failed"]]


def test_ftrecipe_run_shows_the_pass_rate_beside_command_accuracy() -> None:
    from ftrecipe.local.display import result_line

    figures = {
        "command_accuracy": 0.875,
        "num_turns": 20,
        "e2e_tests": 7,
        "e2e_passed": 6,
        "e2e_pass_rate": 6 / 7,
    }
    assert (
        result_line("evaluate", figures)
        == "command accuracy 87.5% on 20 turns, E2E pass rate 85.7% (6 of 7 tests)"
    )


def test_a_cached_evaluation_shows_its_pass_rate_from_the_status() -> None:
    """A reused evaluation's figures come from the status (`ftrecipe run`'s summary and cached lines)."""
    from ftrecipe.api.v1alpha1 import FinetuneRecipeStatus
    from ftrecipe.local.display import result_line, status_figures

    status = FinetuneRecipeStatus.model_validate(
        {"evaluation": {"commandAccuracy": 0.5, "e2eTests": 7, "e2ePassed": 0, "e2ePassRate": 0.0}}
    )
    assert result_line("evaluate", status_figures(status)["evaluate"]) == (
        "command accuracy 50.0%, E2E pass rate 0.0% (0 of 7 tests)"
    )


def test_data_and_report_on_s3(
    data: Path, llm_server: LLMServer, tmp_path: Path, s3_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data bundle fetched from S3 (its e2e_tests/validation.yaml with it), the report published there."""
    from ftrecipe.storage import fetch_bundle, publish_bundle

    for key, value in {**s3_bucket.env(), "FTRECIPE_S3_ADDRESSING_STYLE": "path"}.items():
        monkeypatch.setenv(key, value)
    prefix = f"s3://{s3_bucket.bucket}/recipes/moneybank"
    copy = tmp_path / "data"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns("manifest.json", "_SUCCESS"))
    publish_bundle(copy, f"{prefix}/data/", producer="test", inputs_hash="d")
    llm_server.script(OneChange("$50", "set slot amount 500"))
    args = ["evaluate", "--data", f"{prefix}/data/", "--endpoint", llm_server.base_url, "--model", "m"]
    args += ["--out", f"{prefix}/eval/", "--work-dir", str(tmp_path / "work")]
    assert main([*args, "--e2e", "--assistant", str(EXAMPLE)]) == 0
    manifest = fetch_bundle(f"{prefix}/eval/", tmp_path / "fetched")
    e2e = json.loads((tmp_path / "fetched" / "eval.json").read_text(encoding="utf-8"))["e2e"]
    assert (e2e["passed"], e2e["failed"][0]["test"], e2e["failed"][0]["file"]) == (
        6,
        "transfer_happy_path_step_by_step",
        VALIDATION_FILE,
    )
    assert manifest.metadata["e2e_pass_rate"] == 0.857143


def test_ftrecipe_run_shows_the_e2e_stage_after_generate(tmp_path: Path) -> None:
    import io

    from ftrecipe.api import load_recipe
    from ftrecipe.local.display import LineDisplay
    from ftrecipe.local.progress import parse_line
    from ftrecipe.local.runner import resolve
    from test_run import example_recipe, fake_model

    recipe = example_recipe(tmp_path, fake_model(tmp_path / "model"))
    local = resolve(load_recipe(recipe), recipe, tmp_path / "work")
    lines = io.StringIO()
    plain = LineDisplay(lines)
    plain.begin(local, ["evaluate"])
    plain.started("evaluate", tmp_path / "output.log")
    for stage, done in (("generate", 0), ("generate", 20), ("e2e", 0), ("e2e", 10), ("e2e", 20)):
        line = json.dumps(
            {"event": "progress", "stage": stage, "done": done, "total": 20, "eta_seconds": 0.0}
        )
        event = parse_line(line)
        assert event is not None
        plain.progress("evaluate", event)
    shown = [line.split(None, 1)[1] for line in lines.getvalue().splitlines()[2:]]
    assert shown == [
        "scoring 0/20 turns · ETA 0.0s",
        "scoring 20/20 turns · ETA 0.0s",
        "scoring 20/20 turns · ETA 0.0s, E2E tests 0/20 turns · ETA 0.0s",
        "scoring 20/20 turns · ETA 0.0s, E2E tests 10/20 turns · ETA 0.0s",
        "scoring 20/20 turns · ETA 0.0s, E2E tests 20/20 turns · ETA 0.0s",
    ]


def test_a_request_that_fails_for_good_ends_the_run_in_one_line(
    data: Path, llm_server: LLMServer, tmp_path: Path, termination: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As in the scoring: a report with holes would not be comparable, so nothing is published."""
    from support.llm_server import Reply

    table = TableGenerator()

    def script(request: ChatRequest) -> str | Reply:
        if request.index >= TURNS and _message(request) == "$50":  # the replay's, not the scoring's
            return Reply.fail(404, "no such model")
        return table(request)

    llm_server.script(script)
    out = tmp_path / "eval"
    assert _evaluate(data, llm_server, out) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: --endpoint {llm_server.base_url}: model moneybank not found (HTTP 404) for "
        f"{VALIDATION_FILE}::transfer_happy_path_step_by_step turn 2: check --model and that --endpoint is "
        "the server's /v1 URL"
    )
    assert not out.exists()
    report = decode(termination.read_text(encoding="utf-8"))
    assert report is not None and not report.ok and report.message == err
