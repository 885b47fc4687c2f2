"""Which command generator to imitate: from Rasa's config.yml + endpoints.yml, or from our --llm-config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ftrecipe.dataprep.config import read_llm_config, read_rasa_config, resolve_generator
from ftrecipe.dataprep.pipeline import PrepareDataOptions, prepare_data
from ftrecipe.dataprep.yamlfile import InputError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "moneybank"


def test_example_config_and_endpoints() -> None:
    generator = read_rasa_config(EXAMPLE / "config.yml", EXAMPLE / "endpoints.yml")
    assert generator.syntax == "v2"
    assert generator.prompt_template is None
    assert generator.llm is not None
    assert generator.llm.provider == "openai"
    assert generator.llm.model == "gpt-4o-2024-11-20"
    assert generator.llm.temperature == 0.0
    assert "CompactLLMCommandGenerator" in generator.source


@pytest.mark.parametrize(
    ("component", "syntax"),
    [
        ("SingleStepLLMCommandGenerator", "v1"),
        ("CompactLLMCommandGenerator", "v2"),
        ("SearchReadyLLMCommandGenerator", "v3"),
        ("rasa.dialogue_understanding.generator.CompactLLMCommandGenerator", "v2"),
    ],
)
def test_generator_type_decides_the_syntax(tmp_path: Path, component: str, syntax: str) -> None:
    config = tmp_path / "conf" / "config.yml"
    config.parent.mkdir()
    config.write_text(
        yaml.safe_dump(
            {
                "pipeline": [
                    {"name": "NLUCommandAdapter"},
                    {
                        "name": component,
                        "prompt_template": "prompts/mine.jinja2",
                        "llm": {"model": "gpt-4o-mini"},
                    },
                ]
            }
        )
    )
    generator = read_rasa_config(config, None)
    assert generator.syntax == syntax
    assert generator.prompt_template == tmp_path / "conf" / "prompts" / "mine.jinja2"  # relative to the file
    assert generator.llm is not None
    assert generator.llm.model == "gpt-4o-mini"


@pytest.mark.parametrize(
    ("config", "endpoints", "message"),
    [
        ({"pipeline": [{"name": "FlowPolicy"}]}, None, "no LLM command generator in `pipeline:`"),
        (
            {"pipeline": [{"name": "CompactLLMCommandGenerator", "llm": {"model_group": "g"}}]},
            None,
            "uses model_group 'g'; pass --endpoints too",
        ),
        (
            {"pipeline": [{"name": "CompactLLMCommandGenerator", "llm": {"model_group": "g"}}]},
            {"model_groups": [{"id": "other", "models": [{"model": "m"}]}]},
            "no model group with id 'g'",
        ),
        (
            {
                "pipeline": [
                    {"name": "CompactLLMCommandGenerator", "llm": {"model": "m", "api_key": "sk-secret"}}
                ]
            },
            None,
            "llm.api_key must not be set",
        ),
    ],
)
def test_bad_rasa_configs(
    tmp_path: Path, config: dict[str, object], endpoints: dict[str, object] | None, message: str
) -> None:
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    if endpoints is not None:
        (tmp_path / "endpoints.yml").write_text(yaml.safe_dump(endpoints))
    with pytest.raises(InputError) as caught:
        read_rasa_config(
            tmp_path / "config.yml", tmp_path / "endpoints.yml" if endpoints is not None else None
        )
    assert message in str(caught.value)
    assert "sk-secret" not in str(caught.value)


def test_our_llm_config_wins_field_by_field_over_rasas(tmp_path: Path) -> None:
    ours = tmp_path / "llm.yml"
    ours.write_text(
        "syntax: v2\nprompt_template: p.jinja2\nllm: {provider: self-hosted, model: m, api_base: http://h/v1}\n"
    )
    generator = resolve_generator(ours, EXAMPLE / "config.yml", EXAMPLE / "endpoints.yml")
    assert generator.syntax == "v2"
    assert generator.prompt_template == tmp_path / "p.jinja2"
    assert generator.llm is not None
    assert generator.llm.api_base == "http://h/v1"

    # What ours leaves out comes from config.yml and the model group in endpoints.yml.
    ours.write_text("prompt_template: p.jinja2\n")
    generator = resolve_generator(ours, EXAMPLE / "config.yml", EXAMPLE / "endpoints.yml")
    assert (generator.syntax, generator.prompt_template) == ("v2", tmp_path / "p.jinja2")
    assert generator.llm is not None and generator.llm.model == "gpt-4o-2024-11-20"
    assert "config.yml" in generator.source and str(ours) in generator.source

    # An empty file (a recipe that sets nothing in commandGenerator) leaves everything to config.yml.
    ours.write_text("{}\n")
    assert resolve_generator(ours, EXAMPLE / "config.yml", EXAMPLE / "endpoints.yml").llm == generator.llm
    # Alone, ours falls back to the defaults.
    assert resolve_generator(ours, None, None).syntax == "v2"


def test_a_syntax_that_contradicts_the_generator_type_is_one_line(tmp_path: Path) -> None:
    ours = tmp_path / "llm.yml"
    ours.write_text("syntax: v1\n")
    with pytest.raises(InputError) as caught:
        resolve_generator(ours, EXAMPLE / "config.yml", EXAMPLE / "endpoints.yml")
    message = str(caught.value)
    assert "\n" not in message
    assert f"{ours}: syntax v1 disagrees with" in message and "CompactLLMCommandGenerator" in message
    assert "speaks v2" in message and "leave syntax out" in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("syntax: v4\n", "syntax must be v1, v2 or v3"),
        ("model: gpt-4o\n", "unknown key 'model'"),
        ("llm: {model: m, api_key: sk-123}\n", "llm.api_key must not be set in the config"),
        ("llm: {provider: self-hosted, model: m}\n", "self-hosted needs api_base"),
    ],
)
def test_bad_llm_configs(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "llm.yml"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        read_llm_config(path)
    assert message in str(caught.value)
    assert "sk-123" not in str(caught.value)


@pytest.mark.parametrize(
    ("syntax", "expected"),
    [
        ("v1", ["StartFlow(transfer_money)", "SetSlot(recipient, John)", "SetSlot(amount, 50)"]),
        ("v3", ["start flow transfer_money", "set slot recipient John", "set slot amount 50"]),
    ],
)
async def test_other_syntaxes_end_to_end(tmp_path: Path, syntax: str, expected: list[str]) -> None:
    config = tmp_path / "llm.yml"
    config.write_text(f"syntax: {syntax}\n")
    result = await prepare_data(
        PrepareDataOptions(
            e2e_paths=(EXAMPLE / "e2e_tests",),
            assistant=EXAMPLE,
            llm_config=config,
            annotator="assertions",
            num_rephrases=0,
            out=tmp_path / "out",
        )
    )
    assert result.summary["num_annotated_conversations"] == result.summary["num_input_e2e_tests"]
    transfers = yaml.safe_load((tmp_path / "out" / "1_command_annotations" / "transfers.yml").read_text())
    by_name = {c["original_test_case"].split("::")[1]: c for c in transfers["conversations"]}
    first = by_name["transfer_start_with_slots_and_button_confirm"]["steps"][0]
    assert first["llm_commands"] == expected
    prompt = result.annotation.passing[0].turns[0].prompt
    assert ("StartFlow(flow_name)" in prompt) == (syntax == "v1")
    assert ("search and reply" in prompt) == (syntax == "v3")
