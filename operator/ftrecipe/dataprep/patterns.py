"""Rasa's default patterns, slots and responses: what every CALM assistant has without defining it.

Facts gathered from Rasa's documentation (reference: primitives/patterns, Rasa Pro 3.10–3.21); the wording
and structure here are ours. Rasa loads these flows and this domain beside the assistant's own files, so
an assistant may `link`/`call` a pattern it never defines and a test may assert a default response. An
assistant's own definition of any of them overrides the default (assistant.py applies that rule).

Only what the replay needs is recorded: which patterns exist, the responses each may utter, the slots each
asks for (the question being `utter_ask_<slot>`), and the default slots' types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DefaultPattern:
    id: str
    name: str  # Rasa's readable name (what `pattern_clarification_contains`-style lists would show)
    purpose: str  # in our words
    responses: tuple[str, ...] = ()  # responses the default definition may utter
    collects: tuple[str, ...] = ()  # slots the default definition asks for, with `utter_ask_<slot>`


@dataclass(frozen=True)
class DefaultSlot:
    name: str
    type: str
    from_llm: bool = False  # mapped `from_llm` (the command generator fills it)
    initial_value: Any = None


DEFAULT_PATTERNS: tuple[DefaultPattern, ...] = (
    DefaultPattern(
        "pattern_cancel_flow",
        "pattern cancel flow",
        "Runs when the user cancels the current flow; confirms the cancellation.",
        ("utter_flow_cancelled_rasa",),
    ),
    DefaultPattern(
        "pattern_cannot_handle",
        "pattern cannot handle",
        "Runs when no command could be generated or a request is not supported; asks to rephrase.",
        ("utter_ask_rephrase", "utter_cannot_handle", "utter_no_relevant_answer_found"),
    ),
    DefaultPattern(
        "pattern_chitchat",
        "pattern chitchat",
        "Answers off-topic small talk without disturbing the active flow.",
        ("utter_cannot_handle", "utter_free_chitchat_response"),
    ),
    DefaultPattern(
        "pattern_clarification",
        "pattern clarification",
        "Asks which of several matching flows the user means.",
        ("utter_clarification_options_rasa",),
    ),
    DefaultPattern(
        "pattern_code_change",
        "pattern code change",
        "Clears the dialogue stack after the assistant was retrained mid-conversation.",
        ("utter_inform_code_change",),
    ),
    DefaultPattern(
        "pattern_collect_information",
        "pattern collect information",
        "Asks for the slot of a collect step (with the step's question) and validates the answer.",
        ("utter_boolean_slot_rejection", "utter_categorical_slot_rejection", "utter_float_slot_rejection"),
    ),
    DefaultPattern(
        "pattern_completed",
        "pattern completed",
        "Runs when every flow the user started is done; offers further help.",
        ("utter_can_do_something_else",),
    ),
    DefaultPattern(
        "pattern_continue_interrupted",
        "pattern continue interrupted",
        "Offers to resume a flow that another flow interrupted.",
        ("utter_flow_continue_interrupted",),  # the message of Rasa versions before the confirmation question
        collects=("continue_interrupted_flow_confirmation", "interrupted_flow_to_continue"),
    ),
    DefaultPattern(
        "pattern_correction",
        "pattern correction",
        "Updates slots the user corrects and confirms the change.",
        ("utter_corrected_previous_input",),
    ),
    DefaultPattern(
        "pattern_human_handoff",
        "pattern human handoff",
        "Hands the user over to a human agent; by default says that none is available.",
        ("utter_human_handoff_not_available",),
    ),
    DefaultPattern(
        "pattern_internal_error",
        "pattern internal error",
        "Tells the user about an internal error (also empty or over-long messages).",
        (
            "utter_internal_error_rasa",
            "utter_user_input_empty_error_rasa",
            "utter_user_input_too_long_error_rasa",
        ),
    ),
    DefaultPattern(
        "pattern_repeat_bot_messages",
        "pattern repeat bot messages",
        "Repeats the bot's last messages when asked to.",
    ),
    DefaultPattern("pattern_restart", "pattern restart", "Restarts the conversation."),
    DefaultPattern(
        "pattern_search",
        "pattern search",
        "Answers knowledge questions (Enterprise Search); by default says no knowledge base exists.",
        ("utter_no_knowledge_base", "utter_no_relevant_answer_found"),
    ),
    DefaultPattern(
        "pattern_session_start",
        "pattern session start",
        "Lets the assistant open a session proactively.",
    ),
    DefaultPattern(
        "pattern_skip_question",
        "pattern skip question",
        "Runs when the user wants to skip a question; explains that it is needed.",
        ("utter_skip_question_answer",),
    ),
    DefaultPattern(
        "pattern_user_silence",
        "pattern react to silence",
        "Reacts to silence in voice conversations: repeats, checks in, then hangs up.",
        ("utter_ask_still_there", "utter_inform_hangup"),
    ),
    DefaultPattern(
        "pattern_validate_slot",
        "pattern validate slot",
        "Re-asks for a slot whose value failed validation.",
    ),
    # Shipped by later versions (3.14+); known so that links to them load.
    DefaultPattern(
        "pattern_customer_satisfaction",
        "pattern customer satisfaction",
        "Asks the user to rate the conversation.",
    ),
    DefaultPattern(
        "pattern_external_agent_processing",
        "pattern external agent processing",
        "Answers a user who writes while an external agent is still working on a task.",
    ),
    DefaultPattern(
        "pattern_session_end",
        "pattern session end",
        "Closes the session.",
        ("utter_closing_words",),
    ),
)

DEFAULT_PATTERN_IDS = frozenset(p.id for p in DEFAULT_PATTERNS)

# Slots of Rasa's default domain; the command generator fills the `from_llm` ones.
DEFAULT_SLOTS: tuple[DefaultSlot, ...] = (
    DefaultSlot("confirm_correction", "bool", from_llm=True),
    DefaultSlot("continue_interrupted_flow_confirmation", "bool", from_llm=True),
    DefaultSlot("interrupted_flow_to_continue", "text", from_llm=True),
    DefaultSlot("silence_timeout", "float", initial_value=7.0),
    DefaultSlot("consecutive_silence_timeouts", "float", initial_value=0.0),
)

# Set by Rasa's coexistence routers (LLMBasedRouter, IntentBasedRouter) when they route a session to CALM;
# domains declare it (often `from_llm`), but the command generator never sets it.
ROUTER_SLOT = "route_session_to_calm"

# Slots Rasa keeps for itself (the dialogue stack, routing, …): tests may assert them, nobody defines them.
INTERNAL_SLOTS = frozenset(
    {
        "dialogue_stack",
        "requested_slot",
        "flow_hashes",
        "return_value",
        "session_started_metadata",
        ROUTER_SLOT,
        "max_clarification_options",
        "continue_conversation",
        "csat_score",
    }
)

# Every response of the default domain: the patterns' own, and the questions of the slots they collect.
DEFAULT_RESPONSES = frozenset(
    {r for p in DEFAULT_PATTERNS for r in p.responses}
    | {f"utter_ask_{slot}" for p in DEFAULT_PATTERNS for slot in p.collects}
)
