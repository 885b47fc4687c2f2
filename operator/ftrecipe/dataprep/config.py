"""Which command generator to imitate: syntax, prompt template and LLM, from our file or Rasa's config.

Precedence, field by field: what `--llm-config` (ours) sets wins; what it leaves out comes from `--config`
+ `--endpoints` (Rasa's production files); then the defaults (syntax v2, our prompt, no LLM). The syntax
follows Rasa's generator type, so an explicit one that disagrees with it is an error, not a silent pick.
Paths inside a config file are relative to that file. API keys never come from files: only from the
environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from ftrecipe.dataprep.commands import Syntax
from ftrecipe.dataprep.llm import LLMSettings
from ftrecipe.dataprep.yamlfile import InputError, load_yaml

# Rasa's command generators and the command syntax each speaks.
GENERATOR_SYNTAX: dict[str, Syntax] = {
    "CompactLLMCommandGenerator": "v2",
    "SearchReadyLLMCommandGenerator": "v3",
    "SingleStepLLMCommandGenerator": "v1",
    "LLMCommandGenerator": "v1",
}
_OUR_KEYS = {"syntax", "prompt_template", "llm"}
# A custom subclass's name that contains one of these speaks its syntax (checked in this order).
_NAME_HINTS: tuple[tuple[str, Syntax], ...] = (
    ("SearchReady", "v3"),
    ("Compact", "v2"),
    ("SingleStep", "v1"),
    ("LLMCommand", "v1"),
)
# Keys only an LLM command generator's config has: with a `…CommandGenerator` class name, a custom one.
_GENERATOR_KEYS = {"llm", "prompt_template", "prompt", "flow_retrieval", "user_input", "minimize_num_calls"}


@dataclass(frozen=True)
class GeneratorConfig:
    syntax: Syntax = "v2"
    prompt_template: Path | None = None
    llm: LLMSettings | None = None
    source: str = "defaults"
    generator_class: str | None = None  # the pipeline component's class name, when a Rasa config names one
    syntax_assumed: bool = False  # a custom generator class: the syntax is a guess an explicit one overrides
    warnings: tuple[str, ...] = ()
    # Rasa's `include_date_time` and `timezone` (defaults true and UTC): whether the template gets
    # `current_datetime`, and in which zone it is shown.
    include_date_time: bool = True
    timezone: str = "UTC"


def llm_settings(mapping: Any, origin: str) -> LLMSettings:
    """A Rasa `llm` block from a config file, or one InputError line naming the file."""
    if not isinstance(mapping, Mapping):
        raise InputError(f"{origin}: `llm` must be a mapping like {{provider: openai, model: gpt-4o}}")
    try:
        return LLMSettings.from_rasa(mapping)
    except ValueError as error:
        raise InputError(f"{origin}: {error}") from None


@dataclass(frozen=True)
class LLMConfigFile:
    """Our `--llm-config` file: each field None where the file leaves it out."""

    path: Path
    syntax: Syntax | None = None
    prompt_template: Path | None = None
    llm: LLMSettings | None = None

    def alone(self) -> GeneratorConfig:
        return GeneratorConfig(
            syntax=self.syntax or "v2",
            prompt_template=self.prompt_template,
            llm=self.llm,
            source=str(self.path),
        )

    def over(self, rasa: GeneratorConfig) -> GeneratorConfig:
        """This file's fields over Rasa's config; a syntax that contradicts the generator type is an error."""
        if self.syntax is not None and rasa.syntax_assumed:  # ours settles what the class name could not
            rasa = replace(rasa, syntax=self.syntax, warnings=())
        if self.syntax is not None and self.syntax != rasa.syntax:
            raise InputError(
                f"{self.path}: syntax {self.syntax} disagrees with {rasa.source}, which speaks {rasa.syntax}; "
                "leave syntax out (commandGenerator.syntax in a recipe) to follow the config"
            )
        return GeneratorConfig(
            syntax=rasa.syntax,
            prompt_template=self.prompt_template or rasa.prompt_template,
            llm=self.llm or rasa.llm,
            source=f"{self.path} over {rasa.source}",
            generator_class=rasa.generator_class,
            warnings=rasa.warnings,
            include_date_time=rasa.include_date_time,
            timezone=rasa.timezone,
        )


def read_llm_config(path: Path) -> LLMConfigFile:
    data = load_yaml(path)
    if data is None:  # an empty file: nothing set
        return LLMConfigFile(path)
    if not isinstance(data, Mapping):
        raise InputError(f"{path}: expected a mapping with syntax, prompt_template and llm")
    unknown = sorted(set(data) - _OUR_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown key {unknown[0]!r}; allowed: llm, prompt_template, syntax")
    syntax = data.get("syntax")
    if syntax is not None and syntax not in ("v1", "v2", "v3"):
        raise InputError(f"{path}: syntax must be v1, v2 or v3, not {syntax!r}")
    template = data.get("prompt_template")
    return LLMConfigFile(
        path=path,
        syntax=cast(Syntax | None, syntax),
        prompt_template=(path.parent / str(template)) if template else None,
        llm=llm_settings(data["llm"], str(path)) if data.get("llm") is not None else None,
    )


def model_group(endpoints: Path | None, group_id: str, origin: str) -> Mapping[str, Any]:
    if endpoints is None:
        raise InputError(
            f"{origin}: the command generator uses model_group {group_id!r}; pass --endpoints too"
        )
    data = load_yaml(endpoints)
    groups = data.get("model_groups") if isinstance(data, Mapping) else None
    for group in groups or []:
        if isinstance(group, Mapping) and group.get("id") == group_id:
            models = group.get("models") or []
            if not models:
                raise InputError(f"{endpoints}: model group {group_id!r} lists no models")
            return cast(Mapping[str, Any], models[0])
    raise InputError(f"{endpoints}: no model group with id {group_id!r} (the config refers to it)")


def read_rasa_config(config: Path, endpoints: Path | None) -> GeneratorConfig:
    data = load_yaml(config)
    pipeline = data.get("pipeline") if isinstance(data, Mapping) else None
    for component in pipeline or []:
        if not isinstance(component, Mapping):
            continue
        name = str(component.get("name", "")).rsplit(".", 1)[-1]
        syntax, assumed, warnings = _generator_syntax(name, component, config)
        if syntax is None:
            continue
        template = component.get("prompt_template") or component.get("prompt")
        llm_block = component.get("llm")
        llm = None
        if isinstance(llm_block, Mapping) and "model_group" in llm_block:
            llm = llm_settings(
                model_group(endpoints, str(llm_block["model_group"]), str(config)), str(endpoints)
            )
        elif llm_block is not None:
            llm = llm_settings(llm_block, str(config))
        return GeneratorConfig(
            syntax=syntax,
            prompt_template=(config.parent / str(template)) if template else None,
            llm=llm,
            source=f"{config} ({name})",
            generator_class=name,
            syntax_assumed=assumed,
            warnings=warnings,
            include_date_time=bool(component.get("include_date_time", True)),
            timezone=str(component.get("timezone") or "UTC"),
        )
    known = ", ".join(GENERATOR_SYNTAX)
    raise InputError(
        f"{config}: no LLM command generator in `pipeline:` (looked for {known}, or a custom class named "
        "…CommandGenerator with `llm` or `prompt_template`)"
    )


def _generator_syntax(
    name: str, component: Mapping[str, Any], config: Path
) -> tuple[Syntax | None, bool, tuple[str, ...]]:
    """The syntax a pipeline component speaks, whether it is only assumed, and the warning saying so;
    None for a component that is no LLM command generator (a router, the NLU command adapter, …)."""
    if name in GENERATOR_SYNTAX:
        return GENERATOR_SYNTAX[name], False, ()
    if not name.endswith("CommandGenerator") or not set(component) & _GENERATOR_KEYS:
        return None, False, ()
    for hint, syntax in _NAME_HINTS:
        if hint in name:
            return syntax, True, ()
    warning = (
        f"{config}: custom command generator {name!r}: assuming command syntax v2 (CompactLLMCommandGenerator's); "
        "set commandGenerator.syntax (or syntax in --llm-config) if it speaks another"
    )
    return "v2", True, (warning,)


def resolve_generator(
    llm_config: Path | None, config: Path | None, endpoints: Path | None
) -> GeneratorConfig:
    """The generator to imitate: `llm_config`'s fields over Rasa's `config` (+ `endpoints`), over defaults."""
    ours = read_llm_config(llm_config) if llm_config is not None else None
    rasa = read_rasa_config(config, endpoints) if config is not None else None
    if ours is not None and rasa is not None:
        return ours.over(rasa)
    if ours is not None:
        return ours.alone()
    return rasa or GeneratorConfig()
