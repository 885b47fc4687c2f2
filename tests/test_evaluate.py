"""`ftrecipe evaluate`: scoring (fixed answers against fixed references), the report, and the endpoint path
against the scripted `llm_server` with exact figures; input errors as one line with exit code 2.

The local-model path (tiny model + adapter, locally and on S3) is in test_evaluate_local.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ftrecipe.cli.main import main
from ftrecipe.dataprep.commands import (
    CancelFlow,
    CannotHandle,
    ChitChat,
    Clarify,
    Command,
    HumanHandoff,
    RepeatLastBotMessages,
    SearchAndReply,
    SetSlot,
    SkipQuestion,
    StartFlow,
    Syntax,
)
from ftrecipe.evaluation.progress import GenerationProgress, due
from ftrecipe.evaluation.references import Reference, SyntaxChoice
from ftrecipe.evaluation.report import EvalContext, eval_json, eval_md, worst_turns
from ftrecipe.evaluation.run import accuracy_gate
from ftrecipe.evaluation.scoring import (
    NOTHING,
    Generation,
    GenerationRun,
    Scores,
    Tally,
    parse_answer,
    percentile,
    score_turn,
    summarize,
)
from ftrecipe.termination import decode
from support.llm_server import ChatRequest, LLMServer, count_tokens

FIGURE_KEYS = {
    "command_accuracy",
    "num_turns",
    "parse_failure_rate",
    "latency_p50_seconds",
    "latency_p95_seconds",
    "tokens_per_second",
    "per_command_f1",
    "report_uri",
}

# --------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("syntax", "text", "commands", "failure"),
    [
        ("v2", "cannot handle", (CannotHandle(),), False),
        ("v1", "CannotHandle()", (CannotHandle(),), False),
        ("v2", "", (), True),
        ("v2", "I think the user wants to send money.", (), True),
        ("v1", "StartFlow(transfer_money", (), True),  # cut off: no closing parenthesis
        ("v2", "disambiguate flows", (), True),  # a clarify without options is dropped by the parser
        (
            "v2",
            "- start flow transfer_money\n- set slot amount 50.",
            (StartFlow("transfer_money"), SetSlot("amount", "50")),
            False,
        ),
        ("v1", 'StartFlow(a) SetSlot(b, "x y")', (StartFlow("a"), SetSlot("b", "x y")), False),
        ("v3", "offtopic reply", (SearchAndReply(),), False),  # v3 folds chitchat into search and reply
        ("v2", "offtopic reply", (ChitChat(),), False),
    ],
    ids=[
        "explicit-cannot-handle",
        "v1-explicit-cannot-handle",
        "empty",
        "prose",
        "v1-truncated",
        "clarify-without-options",
        "bullets-and-period",
        "v1-two-on-a-line",
        "v3-folds-chitchat",
        "v2-chitchat",
    ],
)
def test_parse_answer(syntax: Syntax, text: str, commands: tuple[Command, ...], failure: bool) -> None:
    parsed = parse_answer(text, syntax)
    assert parsed.commands == commands
    assert parsed.parse_failure is failure


# --------------------------------------------------------------------------------------------- one turn

EVERY_TYPE_V2 = {
    "start flow": ("start flow transfer_money", StartFlow("transfer_money")),
    "set slot": ("set slot amount 50", SetSlot("amount", "50")),
    "cancel flow": ("cancel flow", CancelFlow()),
    "clarify": (
        "disambiguate flows check_balance transfer_money",
        Clarify(("check_balance", "transfer_money")),
    ),
    "skip question": ("skip question", SkipQuestion()),
    "search and reply": ("provide info", SearchAndReply()),
    "chitchat": ("offtopic reply", ChitChat()),
    "human handoff": ("hand over", HumanHandoff()),
    "repeat message": ("repeat message", RepeatLastBotMessages()),
    "cannot handle": ("cannot handle", CannotHandle()),
}


@pytest.mark.parametrize("type_name", list(EVERY_TYPE_V2))
def test_every_command_type_scores_right_against_itself(type_name: str) -> None:
    text, command = EVERY_TYPE_V2[type_name]
    expected = parse_answer(text, "v2").commands
    assert expected == (command,)
    turn = score_turn(expected, parse_answer(text, "v2"))
    assert turn.right and not turn.parse_failure and turn.errors == 0
    want = {type_name: Tally(tp=1)}
    if type_name == "set slot":
        want["set slot value"] = Tally(tp=1)
    assert turn.tallies == want


def _turn(expected: str, answer: str, syntax: Syntax = "v2") -> Any:
    return score_turn(parse_answer(expected, syntax).commands, parse_answer(answer, syntax))


@pytest.mark.parametrize(
    ("expected", "answer", "right", "tallies"),
    [
        (
            "start flow transfer_money\nset slot recipient John",
            "set slot recipient john\nstart flow transfer_money",
            True,
            {"start flow": Tally(1), "set slot": Tally(1), "set slot value": Tally(1)},
        ),
        (
            "set slot amount 2400",
            "set slot amount 2,400",
            True,
            {"set slot": Tally(1), "set slot value": Tally(1)},
        ),
        (
            "set slot amount 100",
            "set slot amount 200",
            False,
            {"set slot": Tally(1), "set slot value": Tally(0, 1, 1)},
        ),
        (
            "set slot amount 100",
            "set slot recipient 100",
            False,
            {"set slot": Tally(0, 1, 1), "set slot value": Tally(0, 1, 1)},
        ),
        (
            "start flow transfer_money\nset slot amount 100",
            "start flow transfer_money",
            False,
            {"start flow": Tally(1), "set slot": Tally(0, 0, 1), "set slot value": Tally(0, 0, 1)},
        ),
        (
            "start flow check_balance",
            "start flow check_balance\ncancel flow",
            False,
            {"start flow": Tally(1), "cancel flow": Tally(0, 1, 0)},
        ),
        ("start flow a", "start flow b", False, {"start flow": Tally(0, 1, 1)}),
        ("disambiguate flows a b", "disambiguate flows b a", True, {"clarify": Tally(1)}),
        ("disambiguate flows a b c", "disambiguate flows a b", False, {"clarify": Tally(0, 1, 1)}),
        (
            "start flow a\nset slot x 1",
            "Let me start the flow.",
            False,
            {"start flow": Tally(0, 0, 1), "set slot": Tally(0, 0, 1), "set slot value": Tally(0, 0, 1)},
        ),
        ("cannot handle", "gibberish", False, {"cannot handle": Tally(0, 0, 1)}),
        (
            "offtopic reply",
            "provide info",
            False,
            {"chitchat": Tally(0, 0, 1), "search and reply": Tally(0, 1, 0)},
        ),
    ],
    ids=[
        "order-and-case-insensitive",
        "number-formatting",
        "wrong-slot-value",
        "wrong-slot-name",
        "missed-command",
        "extra-command",
        "wrong-flow",
        "clarify-order",
        "clarify-partial",
        "parse-failure-misses-everything",
        "parse-failure-is-not-cannot-handle",
        "chitchat-vs-knowledge",
    ],
)
def test_partial_matches(expected: str, answer: str, right: bool, tallies: dict[str, Tally]) -> None:
    turn = _turn(expected, answer)
    assert turn.right is right
    assert turn.tallies == tallies


def test_v1_and_v3_syntaxes() -> None:
    assert _turn("StartFlow(a)\nSetSlot(x, 1)", "SetSlot(x, 1.0) StartFlow(a)", "v1").right
    assert not _turn("StartFlow(a)", "start flow a", "v1").right  # v2 words are prose in v1
    assert _turn("search and reply", "offtopic reply", "v3").right  # both mean search and reply in v3


def test_tally_figures() -> None:
    assert Tally(2, 1, 1).precision == pytest.approx(2 / 3)
    assert Tally(2, 1, 1).recall == pytest.approx(2 / 3)
    assert Tally(2, 1, 1).f1 == pytest.approx(2 / 3)
    assert Tally(1, 0, 3).f1 == pytest.approx(2 / 5)  # harmonic mean of 1 and 1/4
    assert (Tally(0, 0, 1).precision, Tally(0, 0, 1).recall, Tally(0, 0, 1).f1) == (None, 0.0, 0.0)
    assert (Tally(0, 1, 0).precision, Tally(0, 1, 0).recall, Tally(0, 1, 0).f1) == (0.0, None, 0.0)
    assert Tally().f1 is None


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert percentile([float(v) for v in range(1, 21)], 0.95) == pytest.approx(19.05)


# --------------------------------------------------------------------------------------------- progress


@pytest.mark.parametrize(
    ("done", "total", "last_done", "seconds", "expected"),
    [
        (11, 11, 9, 0.0, True),
        (3, 11, 2, 0.0, True),  # 3/11 crosses a quarter
        (2, 11, 1, 0.1, False),
        (2, 11, 1, 5.0, True),
        (2, 11, 2, 60.0, False),
        (0, 0, 0, 0.0, True),
    ],
    ids=["the-end", "new-quarter", "too-soon", "time-is-up", "nothing-new", "no-turns"],
)
def test_progress_is_due_at_the_end_each_quarter_and_every_few_seconds(
    done: int, total: int, last_done: int, seconds: float, expected: bool
) -> None:
    assert due(done, total, last_done, seconds, every_seconds=5.0) is expected


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_one_turn_a_second_and_all_at_once() -> None:
    events: list[dict[str, Any]] = []
    clock = FakeClock()
    progress = GenerationProgress(100, events.append, every_seconds=10.0, clock=clock)
    progress.start()
    for _ in range(100):
        clock.now += 1.0
        progress.answered(1)
    assert [e["done"] for e in events] == [0, 10, 20, 25, 35, 45, 50, 60, 70, 75, 85, 95, 100]
    assert events[0] == {
        "event": "progress",
        "stage": "generate",
        "done": 0,
        "total": 100,
        "eta_seconds": None,
    }
    assert events[3] == {
        "event": "progress",
        "stage": "generate",
        "done": 25,
        "total": 100,
        "eta_seconds": 75.0,
    }
    assert events[-1]["eta_seconds"] == 0.0

    events.clear()
    burst = GenerationProgress(1000, events.append, every_seconds=10.0, clock=FakeClock())
    burst.start()
    for _ in range(500):
        burst.answered(2)
    assert [e["done"] for e in events] == [0, 250, 500, 750, 1000]  # quarters only: no time went by


# --------------------------------------------------------------------------------------------- a data set

# (expected, answer): every command type, right answers, partial matches and a parse failure.
CASES: list[tuple[str, str]] = [
    ("start flow transfer_money", "start flow transfer_money"),
    ("set slot amount 50", "set slot amount 50."),
    (
        "start flow transfer_money\nset slot recipient John",
        "set slot recipient john\nstart flow transfer_money",
    ),
    ("set slot amount 100", "set slot amount 200"),
    ("cancel flow", "Sure, I will cancel that for you."),
    ("disambiguate flows check_balance transfer_money", "disambiguate flows transfer_money check_balance"),
    ("offtopic reply", "provide info"),
    ("start flow check_balance", "start flow check_balance\ncancel flow"),
    ("hand over", "hand over"),
    ("cannot handle", "cannot handle"),
    ("skip question", "repeat message"),
]
RIGHT = {0, 1, 2, 5, 8, 9}
# type → (tp, fp, fn) over CASES
TALLIES = {
    "start flow": (3, 0, 0),
    "set slot": (3, 0, 0),
    "set slot value": (2, 1, 1),
    "cancel flow": (0, 1, 1),
    "clarify": (1, 0, 0),
    "skip question": (0, 0, 1),
    "search and reply": (0, 1, 0),
    "chitchat": (0, 0, 1),
    "human handoff": (1, 0, 0),
    "repeat message": (0, 1, 0),
    "cannot handle": (1, 0, 0),
}
CONFUSION = {
    "start flow": {"start flow": 3},
    "set slot": {"set slot": 3},
    "cancel flow": {NOTHING: 1},  # the parse failure predicted nothing
    "clarify": {"clarify": 1},
    "skip question": {"repeat message": 1},
    "chitchat": {"search and reply": 1},
    "human handoff": {"human handoff": 1},
    "cannot handle": {"cannot handle": 1},
    NOTHING: {"cancel flow": 1},  # spurious, with nothing missed beside it
}


def _scores(latencies: list[float] | None = None, seconds: float = 2.0) -> Scores:
    latencies = latencies or [0.1 * (i + 1) for i in range(len(CASES))]
    turns = [_turn(expected, answer) for expected, answer in CASES]
    generations = [
        Generation(answer, latency, count_tokens(answer))
        for (_, answer), latency in zip(CASES, latencies, strict=True)
    ]
    return summarize(turns, GenerationRun(generations, seconds))


def test_summary_figures_are_exact() -> None:
    scores = _scores()
    assert scores.num_turns == len(CASES) == 11
    assert scores.right_turns == len(RIGHT)
    assert scores.command_accuracy == pytest.approx(6 / 11)
    assert scores.parse_failures == 1
    assert scores.parse_failure_rate == pytest.approx(1 / 11)
    assert {name: (t.tp, t.fp, t.fn) for name, t in scores.per_command.items()} == TALLIES
    assert list(scores.per_command) == list(TALLIES)  # command-type order, set slot value after set slot
    assert scores.per_command_f1 == {
        "start flow": 1.0,
        "set slot": 1.0,
        "set slot value": pytest.approx(2 / 3),
        "cancel flow": 0.0,
        "clarify": 1.0,
        "skip question": 0.0,
        "search and reply": 0.0,
        "chitchat": 0.0,
        "human handoff": 1.0,
        "repeat message": 0.0,
        "cannot handle": 1.0,
    }
    assert {row: dict(cells) for row, cells in scores.confusion.items()} == CONFUSION
    assert scores.latency_p50_seconds == pytest.approx(0.6)
    assert scores.latency_p95_seconds == pytest.approx(1.05)
    expected_tokens = sum(count_tokens(answer) for _, answer in CASES)
    assert scores.generated_tokens == expected_tokens
    assert scores.tokens_per_second == pytest.approx(expected_tokens / 2.0)
    assert [i for i, turn in enumerate(scores.turns) if turn.right] == sorted(RIGHT)


def test_tokens_per_second_is_none_without_usage() -> None:
    turn = _turn("cancel flow", "cancel flow")
    scores = summarize([turn], GenerationRun([Generation("cancel flow", 0.1, None)], 1.0))
    assert scores.generated_tokens is None and scores.tokens_per_second is None


def test_accuracy_gate() -> None:
    assert accuracy_gate(0.5, None) is None
    assert accuracy_gate(0.8, 0.8) is None
    assert accuracy_gate(0.5, 0.8) == "command accuracy 0.5000 is below --min-command-accuracy 0.8"


# --------------------------------------------------------------------------------------------- report


def _context() -> EvalContext:
    return EvalContext(
        model={"kind": "endpoint", "endpoint": "http://x/v1", "model": "m"},
        data="data",
        val_file="val.jsonl",
        val_sha256="0" * 64,
        syntax=SyntaxChoice("v2", "--syntax"),
        settings={"max_new_tokens": 64, "concurrency": 8},
    )


def _references() -> list[Reference]:
    return [
        Reference(
            where=f"val.jsonl:{i + 1}",
            line=i + 1,
            messages=[
                {"role": "user", "content": f"USER: message {i}\n" + "x" * 1000 + f"\nlast words {i}"},
                {"role": "assistant", "content": expected},
            ],
            expected_text=expected,
            expected=parse_answer(expected, "v2").commands,
        )
        for i, (expected, _) in enumerate(CASES)
    ]


def test_eval_json_holds_every_figure() -> None:
    document = eval_json(_scores(), _context())
    assert FIGURE_KEYS - {"report_uri"} <= set(document)
    assert document["command_accuracy"] == pytest.approx(6 / 11, abs=1e-6)
    assert document["per_command"]["set slot value"] == {
        "precision": pytest.approx(2 / 3, abs=1e-6),
        "recall": pytest.approx(2 / 3, abs=1e-6),
        "f1": pytest.approx(2 / 3, abs=1e-6),
        "expected": 3,
        "predicted": 3,
        "tp": 2,
        "fp": 1,
        "fn": 1,
    }
    assert document["per_command"]["chitchat"]["precision"] is None
    assert document["confusion"]["rows"][-1] == NOTHING and document["confusion"]["columns"][-1] == NOTHING
    assert document["confusion"]["counts"]["skip question"] == {"repeat message": 1}
    json.dumps(document, allow_nan=False)  # plain JSON


def test_worst_examples_put_parse_failures_then_most_errors_first() -> None:
    scores = _scores()
    worst = worst_turns(scores.turns)
    assert set(worst) == set(range(len(CASES))) - RIGHT
    # the parse failure (4), then two errors each: wrong value (3), chitchat (6), skip→repeat (10)
    assert worst[:4] == [4, 3, 6, 10]
    assert worst[-1] == 7  # one spurious command


def test_eval_md_is_readable() -> None:
    scores = _scores()
    text = eval_md(scores, _references(), [Generation(a, 0.1, 1) for _, a in CASES], _context())
    assert "| command accuracy | **54.5%** (6 of 11 turns" in text
    assert "| set slot value | 0.667 | 0.667 | 0.667 | 3 | 3 |" in text
    assert "| chitchat | n/a | 0.000 | 0.000 | 1 | 0 |" in text
    assert "| expected \\ predicted |" in text
    assert "### 1. `val.jsonl:5`: parse failure" in text
    assert "Sure, I will cancel that for you." in text  # what the model said, as it said it
    assert "last words 4" in text and "x" * 1000 not in text  # the prompt's tail only


# --------------------------------------------------------------------------------------------- endpoint


def _write_val(root: Path, records: list[dict[str, Any]]) -> Path:
    splits = root / "4_train_test_split" / "ft_splits"
    splits.mkdir(parents=True)
    (splits / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root


def _records() -> list[dict[str, Any]]:
    """CASES as records: instruction format, every third conversational with a system message."""
    records: list[dict[str, Any]] = []
    for i, (expected, _) in enumerate(CASES):
        prompt = f"Conversation so far:\nUSER: message {i:02d}\nWhat commands?"
        if i % 3 == 2:
            records.append(
                {
                    "messages": [
                        {"role": "system", "content": "You are a command generator."},
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": expected},
                    ]
                }
            )
        else:
            records.append({"prompt": prompt, "completion": expected})
    return records


def _answer_by_message(request: ChatRequest) -> str:
    number = int(request.prompt.split("message ")[1][:2])
    return CASES[number][1]


@pytest.fixture(autouse=True)
def endpoint_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key `llm_server` wants, where `--endpoint` looks for one by default."""
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")


@pytest.fixture
def termination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    path.write_text("", encoding="utf-8")
    monkeypatch.setenv("FTRECIPE_TERMINATION_LOG", str(path))
    return path


def test_endpoint_figures_are_exact(
    llm_server: LLMServer, tmp_path: Path, termination: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVAL_KEY", "test-key")
    llm_server.script(_answer_by_message)
    llm_server.latency = 0.02
    data = _write_val(tmp_path / "data", _records())
    out = tmp_path / "report"
    code = main(
        [
            "evaluate",
            "--data",
            str(data),
            "--endpoint",
            llm_server.base_url,
            "--model",
            "moneybank-lora",
            "--api-key-env",
            "EVAL_KEY",
            "--syntax",
            "v2",
            "--out",
            str(out),
            "--concurrency",
            "4",
        ]
    )
    assert code == 0

    requests = llm_server.chat_requests
    assert len(requests) == len(CASES)
    assert all(r.model == "moneybank-lora" and r.temperature == 0 and r.max_tokens == 64 for r in requests)
    assert all(r.headers["Authorization"] == "Bearer test-key" for r in requests)
    sent = sorted(json.dumps(r.messages) for r in requests)
    records = _records()
    prompts = [
        r["messages"][:-1] if "messages" in r else [{"role": "user", "content": r["prompt"]}] for r in records
    ]
    assert sent == sorted(json.dumps(p) for p in prompts)  # the record's messages, without the answer

    document = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert document["command_accuracy"] == pytest.approx(6 / 11, abs=1e-6)
    assert document["num_turns"] == 11 and document["right_turns"] == 6
    assert document["parse_failure_rate"] == pytest.approx(1 / 11, abs=1e-6)
    assert {name: (v["tp"], v["fp"], v["fn"]) for name, v in document["per_command"].items()} == TALLIES
    assert document["confusion"]["counts"] == CONFUSION
    assert document["generated_tokens"] == sum(count_tokens(answer) for _, answer in CASES)
    assert document["tokens_per_second"] > 0
    assert 0.02 <= document["latency_p50_seconds"] <= document["latency_p95_seconds"]
    assert document["model"] == {
        "kind": "endpoint",
        "endpoint": llm_server.base_url,
        "model": "moneybank-lora",
    }
    assert (document["syntax"], document["syntax_source"]) == ("v2", "--syntax")
    assert document["data"]["val"] == "4_train_test_split/ft_splits/val.jsonl"

    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["right"] for p in predictions] == [i in RIGHT for i in range(len(CASES))]
    assert predictions[4]["parse_failure"] and predictions[4]["answer"] == CASES[4][1]
    assert "| command accuracy | **54.5%**" in (out / "eval.md").read_text(encoding="utf-8")

    from ftrecipe.storage import bundle_complete, read_manifest

    assert bundle_complete(out)
    manifest = read_manifest(out)
    assert manifest is not None and manifest.producer == "ftrecipe evaluate"
    assert {f.path for f in manifest.files} == {"eval.json", "eval.md", "predictions.jsonl"}
    assert manifest.metadata["command_accuracy"] == document["command_accuracy"]

    report = decode(termination.read_text(encoding="utf-8"))
    assert report is not None and report.ok
    assert set(report.figures) == FIGURE_KEYS
    assert report.figures["command_accuracy"] == pytest.approx(6 / 11)
    assert report.figures["num_turns"] == 11
    assert report.figures["report_uri"] == str(out)
    assert report.figures["per_command_f1"]["set slot value"] == pytest.approx(2 / 3)
    assert report.message.startswith("command accuracy 54.5% (6 of 11 turns)")


def test_endpoint_progress_is_json_lines_on_stdout(
    llm_server: LLMServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llm_server.script(_answer_by_message)
    data = _write_val(tmp_path / "data", _records())
    out = tmp_path / "out"
    args = ["evaluate", "--data", str(data), "--endpoint", llm_server.base_url, "--model", "m"]
    assert main([*args, "--out", str(out), "--concurrency", "2"]) == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]  # stdout: JSON lines only
    progress, done = events[:-1], events[-1]
    assert all(e["event"] == "progress" and e["stage"] == "generate" for e in progress)
    assert all(e["total"] == len(CASES) for e in progress)
    counts = [e["done"] for e in progress]
    assert counts == sorted(counts) and {0, 3, 6, 9, 11} <= set(counts)  # start, each quarter, the end
    assert progress[0]["eta_seconds"] is None and progress[-1]["eta_seconds"] == 0.0
    assert done == {
        "event": "done",
        "summary": f"command accuracy 54.5% (6 of 11 turns), parse failures 9.1%; report published to {out}",
        "num_turns": 11,
        "command_accuracy": pytest.approx(6 / 11),
        "out": str(out),
    }
    assert captured.err.strip().splitlines()[-1] == done["summary"]


def test_syntax_comes_from_params_yaml(llm_server: LLMServer, tmp_path: Path) -> None:
    """prepare-data records its syntax; --data may name the ft_splits folder itself."""
    data = _write_val(tmp_path / "data", [{"prompt": "p", "completion": "StartFlow(a)"}])
    (data / "params.yaml").write_text("command_generator:\n  syntax: v1\n", encoding="utf-8")
    llm_server.answer_with("StartFlow(a)")
    splits = data / "4_train_test_split" / "ft_splits"
    out = tmp_path / "out"
    args = ["evaluate", "--data", str(splits), "--endpoint", llm_server.base_url, "--model", "m"]
    assert main([*args, "--out", str(out)]) == 0
    document = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert (document["syntax"], document["syntax_source"]) == ("v1", str(data / "params.yaml"))
    assert document["command_accuracy"] == 1.0


def test_below_the_gate_exits_3_after_publishing(
    llm_server: LLMServer, tmp_path: Path, termination: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ftrecipe.storage import bundle_complete

    llm_server.script(_answer_by_message)
    data = _write_val(tmp_path / "data", _records())
    out = tmp_path / "out"
    args = [
        "evaluate",
        "--data",
        str(data),
        "--endpoint",
        llm_server.base_url,
        "--model",
        "m",
        "--out",
        str(out),
    ]
    assert main([*args, "--min-command-accuracy", "0.9"]) == 3
    assert bundle_complete(out)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: command accuracy 0.5455 is below --min-command-accuracy 0.9"
    report = decode(termination.read_text(encoding="utf-8"))
    assert report is not None and not report.ok and set(report.figures) == FIGURE_KEYS
    assert main([*args, "--min-command-accuracy", "0.5"]) == 0


# --------------------------------------------------------------------------------------------- errors


def _error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["evaluate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_error_no_val_jsonl(tmp_path: Path, termination: Path, capsys: pytest.CaptureFixture[str]) -> None:
    splits = tmp_path / "data" / "4_train_test_split" / "ft_splits"
    splits.mkdir(parents=True)
    (splits / "train.jsonl").write_text("{}\n", encoding="utf-8")
    err = _error(
        capsys,
        "--data",
        str(tmp_path / "data"),
        "--endpoint",
        "http://x/v1",
        "--model",
        "m",
        "--out",
        str(tmp_path / "o"),
    )
    assert "no val.jsonl" in err and "--train-frac" in err
    report = decode(termination.read_text(encoding="utf-8"))
    assert report is not None and not report.ok and "no val.jsonl" in report.message


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "val.jsonl:2: not JSON"),
        ('{"prompt": "p"}', "val.jsonl:2: instruction record without a string 'completion'"),
        (
            '{"prompt": "p", "completion": "StartFlow(a)"}',
            "val.jsonl:2: the completion 'StartFlow(a)' holds no command",
        ),
    ],
    ids=["not-json", "no-completion", "wrong-syntax"],
)
def test_error_bad_reference_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "val.jsonl").write_text(
        '{"prompt": "p", "completion": "cancel flow"}\n' + line + "\n", encoding="utf-8"
    )
    err = _error(
        capsys, "--data", str(data), "--endpoint", "http://x/v1", "--model", "m", "--out", str(tmp_path / "o")
    )
    assert message in err
    if "holds no command" in message:
        assert "syntax v2 (from default)" in err and "--syntax" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "pass --base-model PATH [--adapter DIR] to load a model, or --endpoint URL --model NAME"),
        (["--endpoint", "http://x/v1"], "--endpoint needs --model NAME"),
        (["--endpoint", "http://x/v1", "--model", "m", "--base-model", "b"], "drop --base-model/--adapter"),
        (["--base-model", "b", "--model", "m"], "pass --endpoint URL too"),
        (["--endpoint", "x:8000", "--model", "m"], "expected an http(s) URL"),
        (["--base-model", "b", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--base-model", "b", "--max-new-tokens", "0"], "--max-new-tokens must be between 1 and 4096"),
        (
            ["--base-model", "b", "--min-command-accuracy", "1.5"],
            "--min-command-accuracy must be between 0 and 1",
        ),
    ],
    ids=[
        "no-model",
        "endpoint-without-model",
        "both",
        "model-without-endpoint",
        "bad-url",
        "batch",
        "tokens",
        "gate",
    ],
)
def test_error_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert message in _error(capsys, "--data", str(tmp_path), "--out", str(tmp_path / "o"), *args)


def test_error_adapter_or_base_model_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both are checked before anything is loaded."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")
    data = _write_val(tmp_path / "data", _records())
    args = ["--data", str(data), "--out", str(tmp_path / "o"), "--base-model", str(model)]
    assert "no adapter_config.json" in _error(capsys, *args, "--adapter", str(model))
    assert "folder not found" in _error(capsys, *args, "--adapter", str(tmp_path / "nope"))
    assert "base model folder not found" in _error(capsys, *args[:-1], str(tmp_path / "nope"))


def test_error_endpoint_rejects_the_key(
    llm_server: LLMServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-secret")
    llm_server.script(_answer_by_message)
    data = _write_val(tmp_path / "data", _records())
    err = _error(
        capsys,
        "--data",
        str(data),
        "--endpoint",
        llm_server.base_url,
        "--model",
        "m",
        "--out",
        str(tmp_path / "o"),
    )
    assert "authentication failed (HTTP 401)" in err and "OPENAI_API_KEY" in err
    assert "sk-wrong-secret" not in err
    assert not (tmp_path / "o").exists()


def test_error_endpoint_answers_garbage(
    llm_server: LLMServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llm_server.script(_answer_by_message)
    llm_server.garbage_next(20)  # an HTML page, every retry included
    data = _write_val(tmp_path / "data", _records()[:1])
    err = _error(
        capsys,
        "--data",
        str(data),
        "--endpoint",
        llm_server.base_url,
        "--model",
        "m",
        "--out",
        str(tmp_path / "o"),
    )
    assert "is not a chat completion" in err and "val.jsonl:1" in err


def test_endpoint_retries_rate_limits_and_server_errors(llm_server: LLMServer, tmp_path: Path) -> None:
    llm_server.script(_answer_by_message)
    llm_server.fail_next(2, 429)
    llm_server.fail_next(1, 503, retry_after=0.01)
    data = _write_val(tmp_path / "data", _records())
    out = tmp_path / "out"
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(data),
                "--endpoint",
                llm_server.base_url,
                "--model",
                "m",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len(llm_server.chat_requests) == len(CASES) + 3
    document = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert document["right_turns"] == len(RIGHT)


def test_error_empty_val_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "val.jsonl").write_text("\n", encoding="utf-8")
    err = _error(
        capsys, "--data", str(data), "--endpoint", "http://x/v1", "--model", "m", "--out", str(tmp_path / "o")
    )
    assert f"{data}/val.jsonl: no records to evaluate" in err


def test_prepare_data_output_against_a_perfect_generator(
    llm_server: LLMServer, tmp_path: Path, termination: Path
) -> None:
    """The phases' hand-off: prepare-data's real output, scored against a generator that answers with the
    hand-written labels (support.moneybank), the labels the assertions annotator must have derived."""
    from support.moneybank import EXAMPLE, TESTS, TableGenerator

    prepare = ["prepare-data", str(TESTS), "--assistant", str(EXAMPLE), "--annotator", "assertions"]
    assert main([*prepare, "--num-rephrases", "0", "--out", str(tmp_path / "data")]) == 0
    llm_server.script(TableGenerator())
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--data",
        str(tmp_path / "data"),
        "--endpoint",
        llm_server.base_url,
        "--model",
        "oracle",
    ]
    assert main([*args, "--out", str(out)]) == 0
    document = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    val = tmp_path / "data" / "4_train_test_split" / "ft_splits" / "val.jsonl"
    assert document["num_turns"] == len(val.read_text(encoding="utf-8").splitlines()) > 0
    assert document["command_accuracy"] == 1.0 and document["parse_failure_rate"] == 0.0
    assert document["syntax_source"] == str(tmp_path / "data" / "params.yaml")
    assert all(row["f1"] == 1.0 for row in document["per_command"].values())
    assert "start flow" in document["per_command"] and "set slot value" in document["per_command"]
    assert "Every turn is right." in (out / "eval.md").read_text(encoding="utf-8")
