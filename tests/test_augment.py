"""Checking rephrasings and recombining them into synthetic conversations (stages 2 and 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftrecipe.dataprep.annotate import AnnotatedConversation, annotate_conversation, assertions_labeller
from ftrecipe.dataprep.assistant import Assistant, load_assistant
from ftrecipe.dataprep.augment import (
    CheckedRephrasing,
    check_rephrasing,
    conversation_data_points,
    same_commands,
    synthetic_plans,
    transcript,
)
from ftrecipe.dataprep.commands import CancelFlow, ChitChat, SetSlot, StartFlow
from ftrecipe.dataprep.e2e import read_test_suite
from ftrecipe.dataprep.llm import LLMClient, LLMSettings
from ftrecipe.dataprep.prompt import default_template
from support.llm_server import ChatRequest, LLMServer
from test_dialogue_state import CORRECTION_AND_CANCEL
from test_rasa_files import make_assistant, write

TEMPLATE = default_template("v2")


@pytest.fixture
def assistant(tmp_path: Path) -> Assistant:
    return load_assistant(
        make_assistant(tmp_path / "bot"), exclude=((tmp_path / "bot" / "e2e_tests").resolve(),)
    )


@pytest.fixture
async def annotated(tmp_path: Path, assistant: Assistant) -> AnnotatedConversation:
    suite = read_test_suite(write(tmp_path / "t.yml", CORRECTION_AND_CANCEL))
    result = await annotate_conversation(
        assistant, suite, suite.test_cases[0], TEMPLATE, "v2", assertions_labeller(assistant, "v2")
    )
    assert result.passed
    return result


@pytest.mark.parametrize(
    ("original", "candidate", "same"),
    [
        ([StartFlow("t"), SetSlot("amount", "2400")], [SetSlot("amount", "2,400"), StartFlow("t")], True),
        ([StartFlow("t"), SetSlot("amount", "2400")], [StartFlow("t")], False),
        ([StartFlow("t")], [StartFlow("u")], False),
        ([SetSlot("a", "1")], [SetSlot("b", "1")], False),
        ([SetSlot("a", "1"), SetSlot("a", "2")], [SetSlot("a", "3"), SetSlot("a", "4")], True),
        ([CancelFlow()], [CancelFlow(), ChitChat()], False),
        ([], [], True),
    ],
)
def test_same_commands_rule(original: list, candidate: list, same: bool) -> None:  # type: ignore[type-arg]
    assert same_commands(original, candidate) is same


def checked(text: str, *commands: object) -> CheckedRephrasing:
    return CheckedRephrasing(text, True, tuple(commands))  # type: ignore[arg-type]


def test_synthetic_plans_cycle_uneven_lists_and_keep_originals(annotated: AnnotatedConversation) -> None:
    steps = [t.step_index for t in annotated.turns]
    passing = {
        steps[0]: [
            checked("wire money to Ann", StartFlow("transfer_money"), SetSlot("recipient", "Ann")),
            checked("pay Annie", StartFlow("transfer_money"), SetSlot("recipient", "Annie")),
            checked("money for Ann please", StartFlow("transfer_money"), SetSlot("recipient", "Ann")),
        ],
        steps[1]: [],
        steps[2]: [checked("no, 50 actually", SetSlot("amount", "50"))],
    }
    plans = synthetic_plans(annotated, passing)
    assert len(plans) == 3  # S = max |P_i|
    assert [p[steps[0]].text for p in plans] == ["wire money to Ann", "pay Annie", "money for Ann please"]
    assert [p[steps[1]].text for p in plans] == ["40", "40", "40"]  # empty list: the original
    assert [p[steps[1]].rephrased for p in plans] == [False] * 3
    assert [p[steps[2]].text for p in plans] == ["no, 50 actually"] * 3  # k mod 1


def test_no_passing_rephrasing_means_no_synthetic_conversation(annotated: AnnotatedConversation) -> None:
    assert synthetic_plans(annotated, {}) == []


def test_synthetic_prompts_are_re_rendered_from_their_own_history_and_state(
    assistant: Assistant, annotated: AnnotatedConversation
) -> None:
    steps = [t.step_index for t in annotated.turns]
    passing = {steps[0]: [checked("pay Annie", StartFlow("transfer_money"), SetSlot("recipient", "Annie"))]}
    points = conversation_data_points(assistant, annotated, passing, TEMPLATE, "v2", {}, None)
    n_turns = len(annotated.turns)
    assert len(points) == n_turns * 2  # the original conversation, then one synthetic conversation
    originals, synthetic = points[:n_turns], points[n_turns:]
    assert [p.prompt for p in originals] == [t.prompt for t in annotated.turns]
    assert all(p.rephrased_user_utterance is None for p in originals)
    assert synthetic[0].rephrased_user_utterance == "pay Annie"
    assert synthetic[0].original_user_utterance == "send money to Ann"
    assert synthetic[0].output == "start flow transfer_money\nset slot recipient Annie"
    assert synthetic[0].command_types == ("start flow", "set slot")
    # Later turns of the synthetic conversation see its own message and its own slot value.
    assert "USER: pay Annie\n" in synthetic[1].prompt
    assert "recipient (text): Annie" in synthetic[1].prompt
    assert "send money to Ann" not in synthetic[1].prompt
    assert synthetic[1].rephrased_user_utterance is None  # this turn kept its original text
    assert synthetic[1].output == originals[1].output
    assert {p.original_test_name for p in points} == {f"{annotated.test.file}::correction_then_cancel"}


def test_transcript_has_both_sides(assistant: Assistant, annotated: AnnotatedConversation) -> None:
    lines = transcript(assistant, annotated)
    assert lines[:2] == ["USER: send money to Ann", "AI: How much?"]
    assert lines[-1] == "USER: how's the weather?"


async def test_check_rephrasing_labels_with_the_candidates_own_commands(
    assistant: Assistant,
    annotated: AnnotatedConversation,
    llm_server: LLMServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", llm_server.api_key or "")

    def script(request: ChatRequest) -> str:
        if '"forty bucks"' in request.prompt:
            assert "USER: send money to Ann\nAI: How much?\nUSER: forty bucks" in request.prompt
            # The candidate is checked in the original turn's state: the flow it offers, the question asked.
            assert (
                "- transfer_money: Send money to someone.\n    - slot `recipient`: who gets the money\n"
                "    - slot `amount`: how much\n" in request.prompt
            )
            assert (
                "Active flow: transfer_money\nThe assistant asked for: amount (how much)\n" in request.prompt
            )
            return "set slot amount forty"
        if '"40 or so"' in request.prompt:
            return "set slot recipient 40"
        return "cannot handle"

    llm_server.script(script)
    settings = LLMSettings(provider="self-hosted", model="m", api_base=llm_server.base_url)
    second = annotated.turns[1]
    async with LLMClient(settings, backoff_base=0.001) as client:
        good = await check_rephrasing(client, assistant, TEMPLATE, "v2", annotated, second, "forty bucks", {})
        bad = await check_rephrasing(client, assistant, TEMPLATE, "v2", annotated, second, "40 or so", {})
        llm_server.fail_next(10, status=503, retry_after=0.001)
        down = await check_rephrasing(client, assistant, TEMPLATE, "v2", annotated, second, "4-0", {})
    assert good == CheckedRephrasing("forty bucks", True, (SetSlot("amount", "forty"),))
    assert bad.passed is False
    assert bad.reason == "different commands"
    assert down.passed is False
    assert down.reason is not None
    assert "LLM call failed" in down.reason
