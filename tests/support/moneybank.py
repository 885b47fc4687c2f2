"""The example MoneyBank assistant as test material: paths, a perfect command generator, run options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.dataprep.annotate import derive_commands
from ftrecipe.dataprep.assistant import load_assistant
from ftrecipe.dataprep.commands import format_commands
from ftrecipe.dataprep.e2e import UserStep, read_e2e_tests
from ftrecipe.dataprep.pipeline import PrepareDataOptions
from ftrecipe.dataprep.prompt import default_template
from ftrecipe.dataprep.state import conversation, is_button_payload
from support.llm_server import LLMServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "moneybank"
TESTS = EXAMPLE / "e2e_tests"


def oracle_answers() -> dict[str, str]:
    """What a perfect command generator answers to each prompt of the example suite: the commands its
    assertions determine (computed by the replay, independently of the pipeline under test)."""
    assistant = load_assistant(EXAMPLE, exclude=(TESTS.resolve(), (EXAMPLE / "e2e_tests_legacy").resolve()))
    template = default_template("v2")
    answers: dict[str, str] = {}
    for suite in read_e2e_tests([TESTS]):
        for test in suite.test_cases:
            replay = conversation(assistant, suite, test)
            turn = next(replay, None)
            while turn is not None:
                commands = derive_commands(turn, assistant, "v2")
                assert not isinstance(commands, str), f"{test.name}: {commands}"
                answers[template.render(turn.variables)] = format_commands(commands, "v2")
                try:
                    turn = replay.send(commands)
                except StopIteration:
                    turn = None
    return answers


def annotated_messages() -> dict[str, list[str]]:
    """Each test's user messages that go to the command generator, in order."""
    messages: dict[str, list[str]] = {}
    for suite in read_e2e_tests([TESTS]):
        for test in suite.test_cases:
            messages[test.name] = [
                s.text for s in test.steps if isinstance(s, UserStep) and not is_button_payload(s.text)
            ]
    return messages


@pytest.fixture
def llm_config(tmp_path: Path, llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPENAI_API_KEY", llm_server.api_key or "")
    path = tmp_path / "llm.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "syntax": "v2",
                "llm": {"provider": "self-hosted", "model": "gpt-4o", "api_base": llm_server.base_url},
            }
        )
    )
    return path


def options(tmp_path: Path, llm_config: Path, **changes: Any) -> PrepareDataOptions:
    values: dict[str, Any] = {
        "e2e_paths": (TESTS,),
        "assistant": EXAMPLE,
        "llm_config": llm_config,
        "out": tmp_path / "out",
        "cache_dir": tmp_path / "cache",
        "concurrency": 4,
        "num_rephrases": 0,  # stage 1 only; tests/test_prepare_data_full.py covers rephrasing
    }
    values.update(changes)
    return PrepareDataOptions(**values)


@pytest.fixture(scope="session")
def answers() -> dict[str, str]:
    return oracle_answers()
