"""Coexistence routing: which user turns Rasa hands to the NLU-based system instead of CALM.

An assistant in coexistence mode has a router (`LLMBasedRouter` or `IntentBasedRouter`) in its pipeline and
the slot `route_session_to_calm` in its domain. While the slot is None the router decides each message;
True sends every message to CALM (the command generator), False to the NLU-based system, which the command
generator then never sees: such a turn has no prompt and no commands, so it is no data point. Facts and
their sources: docs/prepare-data.md, "Coexistence routing". Pure functions; the LLM call is the caller's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jinja2

from ftrecipe.dataprep.config import llm_settings, model_group
from ftrecipe.dataprep.llm import LLMSettings
from ftrecipe.dataprep.patterns import DEFAULT_RESPONSES, ROUTER_SLOT
from ftrecipe.dataprep.yamlfile import InputError, load_yaml

ROUTER_CLASSES = ("LLMBasedRouter", "IntentBasedRouter")
RESET_ACTION = "action_reset_routing"

# The router's question when the config names no `prompt`: ftrecipe's own words (as with the command
# generator's templates, Rasa's text is not copied), with Rasa's variables and its answer, one letter.
# An assistant that needs the router to ask exactly what production asks pins `prompt` in config.yml.
DEFAULT_ROUTER_PROMPT = (
    "Which assistant should handle the user's message?\n\n"
    "A: {{ calm_entry_sticky }}\n"
    "B: {{ nlu_entry_non_sticky }}\n"
    "C: {{ nlu_entry_sticky }}\n\n"
    'User message: """{{ user_message }}"""\n\n'
    "Answer with one letter: A, B or C."
)
# LLMBasedRouter's defaults for the NLU side's descriptions (calm_entry.sticky has none: it is required).
_DEFAULT_NLU_NON_STICKY = "handles chitchat"
_DEFAULT_NLU_STICKY = "handles everything else"

# What a turn's routing was: to CALM, or to the NLU-based system for this turn only (the router's B, a
# NoopCommand) or for the session (its C, the slot set to False; also any other answer or an LLM error).
Route = Literal["calm", "nlu_once", "nlu_sticky"]


@dataclass(frozen=True)
class RouterConfig:
    kind: str  # LLMBasedRouter or IntentBasedRouter
    calm_entry_sticky: str = ""
    nlu_entry_sticky: str = _DEFAULT_NLU_STICKY
    nlu_entry_non_sticky: str = _DEFAULT_NLU_NON_STICKY
    prompt: str = DEFAULT_ROUTER_PROMPT
    source: str = ""
    llm: LLMSettings | None = None  # the router's own `llm` block (a model_group resolved from endpoints)

    @property
    def asks_llm(self) -> bool:
        return self.kind == "LLMBasedRouter"


def read_router(config: Path, endpoints: Path | None = None) -> RouterConfig | None:
    """The coexistence router of Rasa's config.yml (the first one in `pipeline:`), or None."""
    data = load_yaml(config)
    pipeline = data.get("pipeline") if isinstance(data, Mapping) else None
    for component in pipeline or []:
        if not isinstance(component, Mapping):
            continue
        name = str(component.get("name", "")).rsplit(".", 1)[-1]
        if name not in ROUTER_CLASSES:
            continue
        calm = component.get("calm_entry") or {}
        nlu = component.get("nlu_entry") or {}
        if not isinstance(calm, Mapping) or not isinstance(nlu, Mapping):
            raise InputError(
                f"{config}: {name}: calm_entry and nlu_entry must be mappings with sticky / non_sticky"
            )
        prompt = DEFAULT_ROUTER_PROMPT
        if component.get("prompt"):
            path = config.parent / str(component["prompt"])
            try:
                prompt = path.read_text(encoding="utf-8").strip()  # Rasa strips the template too
            except OSError as error:
                raise InputError(f"{config}: {name}: prompt {path}: {error.strerror}") from None
        block = component.get("llm")
        llm = None
        if isinstance(block, Mapping) and "model_group" in block:
            group = model_group(endpoints, str(block["model_group"]), str(config))
            llm = llm_settings(group, str(endpoints))
        elif block is not None:
            llm = llm_settings(block, str(config))
        return RouterConfig(
            kind=name,
            llm=llm,
            calm_entry_sticky=str(calm.get("sticky") or ""),
            nlu_entry_sticky=str(nlu.get("sticky") or _DEFAULT_NLU_STICKY),
            nlu_entry_non_sticky=str(nlu.get("non_sticky") or _DEFAULT_NLU_NON_STICKY),
            prompt=prompt,
            source=f"{config} ({name})",
        )
    return None


def router_llm(router: RouterConfig, generator: LLMSettings) -> LLMSettings:
    """The LLM the router asks: its own `llm`, else the command generator's (Rasa's default is an OpenAI
    chat model; the generator's endpoint is the one a run can reach). Rasa's router defaults apply where the
    block is silent: temperature 0 and one token of answer (its logit bias towards A/B/C is not sent)."""
    if router.llm is not None:
        return router.llm.model_copy(update={"max_tokens": router.llm.max_tokens or 1})
    return generator.model_copy(update={"temperature": 0.0, "max_tokens": 1})


def router_prompt(router: RouterConfig, user_message: str) -> str:
    """The LLMBasedRouter's prompt for one message (a plain Jinja2 template, as Rasa renders it)."""
    return str(
        jinja2.Template(router.prompt).render(
            user_message=user_message,
            calm_entry_sticky=router.calm_entry_sticky,
            nlu_entry_sticky=router.nlu_entry_sticky,
            nlu_entry_non_sticky=router.nlu_entry_non_sticky,
        )
    )


def parse_router_answer(answer: str | None) -> Route:
    """Rasa's parse: the stripped answer `A` is CALM, `B` the NLU system for this turn, `C` for the
    session; anything else (or no answer, an LLM error) is also the NLU system for the session."""
    text = (answer or "").strip()
    if text == "A":
        return "calm"
    if text == "B":
        return "nlu_once"
    return "nlu_sticky"


# ------------------------------------------------------------------------------------------ NLU side


@dataclass(frozen=True)
class NLUSide:
    """What the assistant's NLU-based system (its `stories:` and `rules:`) does, as far as routing needs."""

    said: frozenset[str] = frozenset()  # responses and actions its stories / rules run
    # those every bot turn running them follows with action_reset_routing
    reset_after: frozenset[str] = frozenset()


def _story_actions(steps: Any) -> list[list[str]]:
    """A story's or rule's bot turns: the actions between two `intent:` steps, in order."""
    turns: list[list[str]] = [[]]
    for step in steps if isinstance(steps, list) else []:
        if not isinstance(step, Mapping):
            continue
        if "intent" in step or "user" in step:
            turns.append([])
        elif "action" in step:
            turns[-1].append(str(step["action"]))
    return turns


def read_nlu_side(data: Mapping[str, Any], path: Path, into: dict[str, set[str]]) -> bool:
    """Add one YAML file's stories / rules to `into` ({"said", "reset_after", "not_reset_after", "calm_said"}:
    what they run, what a bot turn runs before action_reset_routing, what one runs without it after, what
    end-to-end stories run); whether it had any. A reset is known after an action only when every bot turn that runs it resets afterwards (a form
    action that also runs turn by turn tells nothing)."""
    found = False
    for key in ("stories", "rules"):
        for story in data.get(key) or []:
            if not isinstance(story, Mapping):
                continue
            found = True
            steps = story.get("steps")
            if isinstance(steps, list) and any(isinstance(x, Mapping) and "user" in x for x in steps):
                # An end-to-end story (user text, no intent) is an example CALM's IntentlessPolicy answers
                # from as well: its responses tell nothing about the routing.
                for actions in _story_actions(steps):
                    into["calm_said"].update(actions)
                continue
            for actions in _story_actions(steps):
                into["said"].update(actions)
                before = actions[: actions.index(RESET_ACTION)] if RESET_ACTION in actions else []
                into["reset_after"].update(before)
                into["not_reset_after"].update(a for a in actions if a not in before)
    return found


def nlu_only(names: Sequence[str], nlu: NLUSide, flow_said: frozenset[str]) -> bool:
    """Whether these shown responses (at least one) can only come from the NLU-based system: each is run by
    its stories / rules, and none by a flow or a pattern (Rasa's default ones included)."""
    return bool(names) and all(
        n in nlu.said and n not in flow_said and n not in DEFAULT_RESPONSES for n in names
    )


def routing_slot_shown(slot_checks: Sequence[tuple[str, bool, Any]]) -> Any:
    """The value a turn shows `route_session_to_calm` set to ((name, has_value, value) triples), or
    `...` when it shows none."""
    for name, has_value, value in slot_checks:
        if name == ROUTER_SLOT and has_value:
            return value
    return ...
