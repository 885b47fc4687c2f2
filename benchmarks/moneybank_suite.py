"""A large assistant made from the MoneyBank example, and a perfect, slow LLM for it in its own process.

`generate_assistant` copies the example's flows, domain and config into a folder and writes its E2E suite
there several times over: copy k renames every test case (``<name>_v<k>``, and its ``<name>::action``
stubs) and starts every typed user message with a different opener ("hey, ", "ok, ", ...), so no two
tests send the same prompt (identical prompts would share one LLM call and shrink the work). Button
payloads and every assertion stay as they are, so the commands a test expects do not change.

`OracleServer` runs `support.llm_server.LLMServer` in a child process (the LLM is not in the measured
process, and the two do not share one GIL) with a fixed latency per request and a script that answers
like a perfect command generator: the commands the generated suite's assertions determine, computed by
the replay (any generated prompt; the tests answer from a hand-written table instead, whose 91 turns the
benchmark's 546 outgrow), and `n` rewordings per user message for the rephraser (each one passes
validation).
"""

from __future__ import annotations

import copy
import multiprocessing
import multiprocessing.connection
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

EXAMPLE = ROOT / "examples" / "moneybank"
EXAMPLE_TESTS = EXAMPLE / "e2e_tests"
# What the assistant is made of (the example folder also holds docs, a recipe and legacy tests).
ASSISTANT_PARTS = ("config.yml", "endpoints.yml", "data", "domain")
OPENERS = ("", "hey, ", "ok, ", "so, ", "hi, ", "right, ", "well, ", "um, ", "hello, ", "quick one: ")
_REWORDED = re.compile(r" \(reworded \d+\)")
_TEST_NAME = re.compile(r'conversations, "([^"]+)"')


@dataclass(frozen=True)
class Suite:
    assistant: Path
    tests: Path
    test_cases: int


def _is_payload(text: str) -> bool:
    from ftrecipe.dataprep.state import is_button_payload

    return is_button_payload(text)


def _vary(raw: dict[str, Any], copy_index: int) -> dict[str, Any]:
    case = copy.deepcopy(raw)
    opener = OPENERS[copy_index % len(OPENERS)] + ("" if copy_index < len(OPENERS) else f"#{copy_index} ")
    if copy_index:
        case["test_case"] = f"{raw['test_case']}_v{copy_index}"
    for step in case["steps"]:
        if isinstance(step, dict) and isinstance(step.get("user"), str) and not _is_payload(step["user"]):
            step["user"] = opener + step["user"]
    return case


def generate_assistant(target: Path, test_cases: int) -> Suite:
    """The example assistant in `target`, with an E2E suite of exactly `test_cases` tests (copies of the
    example's tests, in order, as many times as needed)."""
    if test_cases < 1:
        raise ValueError("test_cases must be at least 1")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for part in ASSISTANT_PARTS:
        source = EXAMPLE / part
        if source.is_dir():
            shutil.copytree(source, target / part)
        else:
            shutil.copyfile(source, target / part)
    files = sorted(p for p in EXAMPLE_TESTS.rglob("*") if p.suffix in {".yml", ".yaml"})
    originals = [(p, yaml.safe_load(p.read_text(encoding="utf-8"))) for p in files]
    tests = target / "e2e_tests"
    written = 0
    copy_index = 0
    while written < test_cases:
        for path, data in originals:
            keep = data["test_cases"][: test_cases - written]
            if not keep:
                break
            cases = [_vary(raw, copy_index) for raw in keep]
            renamed = {raw["test_case"]: case["test_case"] for raw, case in zip(keep, cases, strict=True)}
            stubs: dict[str, Any] = {}
            for key, value in (data.get("stub_custom_actions") or {}).items():
                test, sep, action = str(key).partition("::")
                if not sep:
                    stubs[key] = value
                elif test in renamed:
                    stubs[f"{renamed[test]}::{action}"] = value
            body = {k: v for k, v in data.items() if k not in {"test_cases", "stub_custom_actions"}}
            if stubs:
                body["stub_custom_actions"] = stubs
            body["test_cases"] = cases
            relative = path.relative_to(EXAMPLE_TESTS)
            out = tests / relative.parent / f"{relative.stem}_v{copy_index}{relative.suffix}"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True), encoding="utf-8")
            written += len(cases)
        copy_index += 1
    return Suite(target, tests, written)


def oracle_answers(suite: Suite) -> dict[str, str]:
    """Prompt → the commands its test's assertions determine (v2 syntax, the default template)."""
    from ftrecipe.dataprep.annotate import derive_commands
    from ftrecipe.dataprep.assistant import load_assistant
    from ftrecipe.dataprep.commands import format_commands
    from ftrecipe.dataprep.e2e import read_e2e_tests
    from ftrecipe.dataprep.prompt import default_template
    from ftrecipe.dataprep.state import conversation

    assistant = load_assistant(suite.assistant, exclude=(suite.tests.resolve(),))
    template = default_template("v2")
    answers: dict[str, str] = {}
    for test_suite in read_e2e_tests([suite.tests]):
        for test in test_suite.test_cases:
            replay = conversation(assistant, test_suite, test)
            turn = next(replay, None)
            while turn is not None:
                commands = derive_commands(turn, assistant, "v2")
                if isinstance(commands, str):
                    raise AssertionError(f"{test.name}: {commands}")
                answers[template.render(turn.variables)] = format_commands(commands, "v2")
                try:
                    turn = replay.send(commands)
                except StopIteration:
                    turn = None
    return answers


def annotated_messages(suite: Suite) -> dict[str, list[str]]:
    """Each test's user messages that go to the command generator (button payloads do not), in order."""
    from ftrecipe.dataprep.e2e import UserStep, read_e2e_tests

    return {
        test.name: [s.text for s in test.steps if isinstance(s, UserStep) and not _is_payload(s.text)]
        for test_suite in read_e2e_tests([suite.tests])
        for test in test_suite.test_cases
    }


def oracle_script(suite: Suite, rephrases: int) -> Callable[[Any], str]:
    """The LLM: rewordings for the rephraser prompt, the oracle's commands for everything else (a
    reworded message gets the original's commands)."""
    answers, messages = oracle_answers(suite), annotated_messages(suite)

    def script(request: Any) -> str:
        prompt: str = request.prompt
        name = _TEST_NAME.search(prompt)
        if prompt.startswith("You help build training data") and name:
            return "\n\n".join(
                f"USER: {m}\n" + "\n".join(f"{i}. {m} (reworded {i})" for i in range(1, rephrases + 1))
                for m in messages[name.group(1)]
            )
        return answers[_REWORDED.sub("", prompt)]

    return script


def _serve(
    suite: Suite, rephrases: int, latency: float, connection: multiprocessing.connection.Connection
) -> None:
    """The child process: serve until told to stop; answer `count` / `reset` / `stop` requests."""
    from support.llm_server import LLMServer

    script = oracle_script(suite, rephrases)
    with LLMServer() as server:
        server.script(script)
        server.latency = latency
        connection.send((server.base_url, server.api_key))
        while True:
            command = connection.recv()
            if command == "stop":
                connection.send(None)
                return
            if command == "count":
                prompts = server.prompts
                connection.send(
                    {
                        "calls": len(prompts),
                        "distinct_prompts": len(set(prompts)),
                        "script_errors": len(server.script_errors),
                    }
                )
            elif command == "reset":
                server.reset()
                server.script(script)
                server.latency = latency
                connection.send(None)


class OracleServer:
    """`LLMServer` with the oracle script in a child process; `counts()` says what it was asked."""

    def __init__(self, suite: Suite, *, rephrases: int, latency: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(suite, rephrases, latency, child), name="oracle-llm", daemon=True
        )
        self.base_url = ""
        self.api_key = ""

    def __enter__(self) -> OracleServer:
        self._process.start()
        if not self._connection.poll(120):
            raise RuntimeError("the oracle LLM server did not start")
        self.base_url, self.api_key = self._connection.recv()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process.is_alive():
            try:
                self._connection.send("stop")
                self._connection.poll(10)
            finally:
                self._process.join(10)
                if self._process.is_alive():
                    self._process.terminate()
                    self._process.join()

    def _ask(self, command: str) -> Any:
        self._connection.send(command)
        return self._connection.recv()

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = self._ask("count")
        return counts

    def reset(self) -> None:
        self._ask("reset")
