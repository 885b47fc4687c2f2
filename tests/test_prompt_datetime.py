"""A prompt template that shows the date (`current_datetime`): one instant per run inputs, so a re-run makes
the same prompts (no LLM call) and the same data; `--prompt-datetime` and the recipe field set it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.api import load_recipe
from ftrecipe.cli.main import main
from ftrecipe.controller.manifests import JOB_PATHS
from ftrecipe.dataprep.pipeline import prepare_data
from ftrecipe.dataprep.prompt import PromptTemplate, default_template
from ftrecipe.dataprep.yamlfile import InputError
from ftrecipe.local.layout import resolve
from ftrecipe.local.runner import phase_args
from ftrecipe.phases.commands import data_args
from support.llm_server import LLMServer
from support.moneybank import EXAMPLE, LABELS, TESTS, TableGenerator, options

ROOT = Path(__file__).resolve().parents[1]
# Our v2 prompt with the date on top, as production templates often have it: printed whole, and formatted
# the way Rasa's own date-aware templates do (`strftime`, `tzname`), which a plain string could not.
DATE_LINE = "Now: {{ current_datetime }} ({{ current_datetime.strftime('%A %d %B %Y') }}, {{ current_datetime.tzname() }})\n"
FIRST_RUN = datetime(2026, 3, 1, 12, 0, 30, 123456, tzinfo=UTC)


def read(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def date_template(folder: Path) -> Path:
    path = folder / "dated_prompt.jinja2"
    path.write_text(DATE_LINE + default_template("v2").text, encoding="utf-8")
    return path


@pytest.fixture
def dated_llm_config(tmp_path: Path, llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Our --llm-config: the scripted server's LLM and the date-showing template."""
    monkeypatch.setenv("OPENAI_API_KEY", llm_server.api_key or "")
    date_template(tmp_path)
    path = tmp_path / "llm.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "syntax": "v2",
                "prompt_template": "dated_prompt.jinja2",
                "llm": {"provider": "self-hosted", "model": "gpt-4o", "api_base": llm_server.base_url},
            }
        ),
        encoding="utf-8",
    )
    return path


def first_lines(server: LLMServer) -> set[str]:
    return {r.prompt.split("\n", 1)[0] for r in server.chat_requests}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


async def test_a_rerun_a_minute_later_makes_no_call_and_the_same_files(
    tmp_path: Path, llm_server: LLMServer, dated_llm_config: Path
) -> None:
    llm_server.script(TableGenerator())  # the date line above the v2 prompt is no part of its state
    run = options(tmp_path, dated_llm_config)
    first = await prepare_data(run, now=lambda: FIRST_RUN)
    assert first.summary["num_annotated_conversations"] == first.summary["num_input_e2e_tests"]
    assert len(llm_server.chat_requests) == len(LABELS)
    # Whole seconds, UTC: what str() of Rasa's timezone-aware datetime prints.
    assert first_lines(llm_server) == {"Now: 2026-03-01 12:00:30+00:00 (Sunday 01 March 2026, UTC)"}
    record = next((tmp_path / "cache" / "prompt-datetime").glob("*.json"))
    assert json.loads(record.read_text())["current_datetime"] == "2026-03-01T12:00:30+00:00"
    params = read(tmp_path / "out" / "params.yaml")
    assert params["prompt_datetime"] == {
        "value": "2026-03-01T12:00:30+00:00",
        "source": "recorded",
        "record": str(record),
        "timezone": "UTC",
    }
    before = files(tmp_path / "out")
    shutil.rmtree(tmp_path / "out")

    calls = len(llm_server.requests)
    second = await prepare_data(run, now=lambda: FIRST_RUN + timedelta(minutes=1))
    assert len(llm_server.requests) == calls  # zero calls
    assert second.summary["llm_usage"]["purposes"]["annotate"]["cache_hits"] == len(LABELS)
    after = files(tmp_path / "out")
    assert after.keys() == before.keys()
    # Every file byte for byte, but for what records the run itself: the bundle's markers (creation time),
    # and the summary's wall time and cache hits (the rest of it compared below).
    differ = {name for name in before if before[name] != after[name]}
    assert differ <= {"manifest.json", "_SUCCESS", "result_summary.yaml"}, differ
    assert "params.yaml" in before and "3_llm_finetune_data/llm_ft_data.jsonl" in before
    summaries = [yaml.safe_load(run_files["result_summary.yaml"]) for run_files in (before, after)]
    for summary in summaries:
        del summary["wall_time_seconds"], summary["llm_usage"]
    assert summaries[0] == summaries[1]
    manifests = [json.loads(run_files["manifest.json"]) for run_files in (before, after)]
    assert manifests[0]["inputs_hash"] == manifests[1]["inputs_hash"]


async def test_an_edited_test_keeps_the_instant_and_costs_only_its_own_calls(
    tmp_path: Path, llm_server: LLMServer, dated_llm_config: Path
) -> None:
    """The recorded instant belongs to the template and LLM, not to the tests (pipeline's documented choice)."""
    llm_server.script(TableGenerator())  # the date line above the v2 prompt is no part of its state
    some = await prepare_data(
        options(tmp_path, dated_llm_config, e2e_paths=(TESTS / "accounts.yml",)), now=lambda: FIRST_RUN
    )
    first_calls = len(llm_server.chat_requests)
    assert 0 < first_calls < len(LABELS)
    assert some.summary["num_input_e2e_tests"] == 5

    later = FIRST_RUN + timedelta(days=30)
    every = await prepare_data(options(tmp_path, dated_llm_config, out=tmp_path / "all"), now=lambda: later)
    assert every.summary["num_annotated_conversations"] == every.summary["num_input_e2e_tests"]
    assert len(llm_server.chat_requests) == len(LABELS)  # the 5 tests' prompts came from the cache
    assert first_lines(llm_server) == {"Now: 2026-03-01 12:00:30+00:00 (Sunday 01 March 2026, UTC)"}
    # Another template is another instant (its prompts miss the cache anyway): now the later clock.
    template = tmp_path / "dated_prompt.jinja2"
    template.write_text("Today: {{ current_datetime }}\n" + default_template("v2").text, encoding="utf-8")
    await prepare_data(
        options(tmp_path, dated_llm_config, e2e_paths=(TESTS / "accounts.yml",), out=tmp_path / "new"),
        now=lambda: later,
    )
    assert read(tmp_path / "new" / "params.yaml")["prompt_datetime"]["value"] == "2026-03-31T12:00:30+00:00"
    assert len(list((tmp_path / "cache" / "prompt-datetime").glob("*.json"))) == 2


async def test_an_explicit_prompt_datetime_is_what_prompts_show(
    tmp_path: Path, llm_server: LLMServer, dated_llm_config: Path
) -> None:
    llm_server.script(TableGenerator())  # the date line above the v2 prompt is no part of its state
    run = options(
        tmp_path,
        dated_llm_config,
        e2e_paths=(TESTS / "accounts.yml",),
        prompt_datetime="2026-01-15T09:30:00+01:00",
    )
    await prepare_data(run, now=lambda: FIRST_RUN)
    # That instant, shown as Rasa shows the time: in the generator's timezone (UTC unless config.yml says).
    assert first_lines(llm_server) == {"Now: 2026-01-15 08:30:00+00:00 (Thursday 15 January 2026, UTC)"}
    assert not (tmp_path / "cache" / "prompt-datetime").exists()  # nothing recorded: the option decides
    params = read(tmp_path / "out" / "params.yaml")
    assert params["prompt_datetime"] == {
        "value": "2026-01-15T09:30:00+01:00",
        "source": "--prompt-datetime",
        "timezone": "UTC",
    }
    # The training data carries the same prompts.
    records = [
        json.loads(line) for line in (tmp_path / "out" / "3_llm_finetune_data" / "llm_ft_data.jsonl").open()
    ]
    assert records and all(r["prompt"].startswith("Now: 2026-01-15 08:30:00+00:00 (") for r in records)


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftrecipe.cli.main", "prepare-data", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_cli_option_offline_and_without_an_offset_it_is_utc(tmp_path: Path) -> None:
    date_template(tmp_path)
    (tmp_path / "llm.yml").write_text("prompt_template: dated_prompt.jinja2\n", encoding="utf-8")
    common = [str(TESTS / "accounts.yml"), "--assistant", str(EXAMPLE), "--annotator", "assertions"]
    common += [
        "--num-rephrases",
        "0",
        "--llm-config",
        str(tmp_path / "llm.yml"),
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    result = run_cli(*common, "--prompt-datetime", "2026-01-15T09:30", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    records = [
        json.loads(line) for line in (tmp_path / "out" / "3_llm_finetune_data" / "llm_ft_data.jsonl").open()
    ]
    assert records
    assert {r["prompt"].split("\n", 1)[0] for r in records} == {
        "Now: 2026-01-15 09:30:00+00:00 (Thursday 15 January 2026, UTC)"
    }
    assert read(tmp_path / "out" / "params.yaml")["prompt_datetime"]["value"] == "2026-01-15T09:30:00+00:00"

    bad = run_cli(*common, "--prompt-datetime", "15/01/2026", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: --prompt-datetime '15/01/2026': not an ISO 8601 date and time; write e.g. "
        "2026-01-15T09:30:00+00:00 (without an offset it is UTC)"
    ]
    assert not (tmp_path / "bad").exists()


async def test_a_damaged_record_is_one_line_not_a_new_instant(tmp_path: Path) -> None:
    date_template(tmp_path)
    (tmp_path / "llm.yml").write_text("prompt_template: dated_prompt.jinja2\n", encoding="utf-8")
    run = options(tmp_path, tmp_path / "llm.yml", e2e_paths=(TESTS / "accounts.yml",), annotator="assertions")
    await prepare_data(run, now=lambda: FIRST_RUN)
    (record,) = (tmp_path / "cache" / "prompt-datetime").glob("*.json")
    record.write_text("{}", encoding="utf-8")
    with pytest.raises(InputError) as error:
        await prepare_data(run, now=lambda: FIRST_RUN)
    assert str(error.value) == (
        f'{record}: not a prompt datetime record ({{"current_datetime": "2026-01-15T09:30:00+00:00"}}); '
        "delete it to record a new instant, or pass --prompt-datetime"
    )


async def test_a_template_without_the_date_records_nothing(tmp_path: Path) -> None:
    (tmp_path / "llm.yml").write_text("syntax: v2\n", encoding="utf-8")
    run = options(tmp_path, tmp_path / "llm.yml", e2e_paths=(TESTS / "accounts.yml",), annotator="assertions")
    await prepare_data(run, now=lambda: FIRST_RUN)
    assert not (tmp_path / "cache").exists()
    assert read(tmp_path / "out" / "params.yaml")["prompt_datetime"] == {
        "value": None,
        "source": "unused: the prompt template does not show current_datetime",
    }


def test_rendering_passes_a_datetime_as_rasa_does() -> None:
    # Guarded as in Rasa's own date-aware templates, which work with include_date_time: false too.
    text = "{{ current_datetime }}|{% if current_datetime %}{{ current_datetime.strftime('%d %B, %Y') }}{% endif %}"
    template = PromptTemplate("t", text)
    assert template.shows_datetime
    assert (
        template.render({}) == "|"
    )  # undefined without an instant, as in Rasa with include_date_time: false
    moment = datetime(2026, 1, 15, 9, 30, tzinfo=UTC)
    assert template.at(moment).render({}) == "2026-01-15 09:30:00+00:00|15 January, 2026"
    assert not default_template("v2").shows_datetime


# --------------------------------------------------------------------------------------------- the recipe


def test_the_recipe_field_reaches_the_jobs_command_line_and_ftrecipe_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = read(EXAMPLE / "recipe.yaml")
    data["spec"]["assistant"]["source"]["local"]["path"] = str(EXAMPLE)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}\n', encoding="utf-8")
    data["spec"]["training"]["baseModel"]["local"]["path"] = str(model)
    data["spec"]["output"]["local"]["path"] = "output"
    recipe = tmp_path / "recipe.yaml"
    # Unquoted, as people write it: YAML reads a timestamp, the recipe keeps the text.
    text = yaml.safe_dump(data, sort_keys=False).replace(
        "  dataPreparation:\n", "  dataPreparation:\n    promptDatetime: 2026-01-15T09:30:00+01:00\n", 1
    )
    recipe.write_text(text, encoding="utf-8")
    spec = load_recipe(recipe).spec
    assert spec.data_preparation.prompt_datetime == "2026-01-15T09:30:00+01:00"

    job = data_args(spec, "s3://b/data/", JOB_PATHS)
    assert job[job.index("--prompt-datetime") + 1] == "2026-01-15T09:30:00+01:00"
    local = phase_args(resolve(load_recipe(recipe), recipe, tmp_path / "work"), "data")
    assert local[local.index("--prompt-datetime") + 1] == "2026-01-15T09:30:00+01:00"
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "work"), "--dry-run"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "ftrecipe prepare-data" in line]
    assert " --prompt-datetime 2026-01-15T09:30:00+01:00 " in f"{line} "

    # Without the field, prepare-data records its own: no option on the command line.
    plain = load_recipe(EXAMPLE / "recipe.yaml").spec
    assert "--prompt-datetime" not in data_args(plain, "s3://b/data/", JOB_PATHS)


# --------------------------------------------------------------------------------------------- mocked_datetime

MOCKED_TESTS = """\
fixtures:
  - leap_day_morning:
      - mocked_datetime: "2024-02-29 08:15:00"
stub_custom_actions:
  action_check_balance:
    events:
      - {event: slot, name: current_balance, value: 75.5}
    responses: []
test_cases:
  - test_case: balance_on_a_mocked_day
    fixtures: [leap_day_morning]
    steps:
      - user: "savings balance please"
        assertions:
          - flow_started: check_balance
          - slot_was_set:
              - {name: account_type, value: savings}
  - test_case: balance_on_the_run_day
    steps:
      - user: "checking balance please"
        assertions:
          - flow_started: check_balance
          - slot_was_set:
              - {name: account_type, value: checking}
"""


def test_a_test_with_a_mocked_datetime_fixture_shows_that_instant(tmp_path: Path) -> None:
    """Rasa's `mocked_datetime` fixture slot (e2e tests) decides that test's time; the others show the run's."""
    date_template(tmp_path)
    (tmp_path / "llm.yml").write_text("prompt_template: dated_prompt.jinja2\n", encoding="utf-8")
    tests = tmp_path / "tests" / "mocked.yml"
    tests.parent.mkdir()
    tests.write_text(MOCKED_TESTS, encoding="utf-8")
    common = [str(tests), "--assistant", str(EXAMPLE), "--annotator", "assertions", "--num-rephrases", "0"]
    common += ["--llm-config", str(tmp_path / "llm.yml"), "--cache-dir", str(tmp_path / "c")]
    result = run_cli(
        *common, "--prompt-datetime", "2026-01-15T09:30:00+00:00", "--out", str(tmp_path / "out")
    )
    assert result.returncode == 0, result.stderr
    lines = tmp_path.joinpath("out", "3_llm_finetune_data", "llm_ft_data.jsonl").read_text().splitlines()
    shown = {
        r["original_test_name"].rsplit("::", 1)[1]: r["prompt"].split("\n", 1)[0]
        for r in map(json.loads, lines)
    }
    assert shown == {
        "balance_on_a_mocked_day": "Now: 2024-02-29 08:15:00+00:00 (Thursday 29 February 2024, UTC)",
        "balance_on_the_run_day": "Now: 2026-01-15 09:30:00+00:00 (Thursday 15 January 2026, UTC)",
    }

    tests.write_text(MOCKED_TESTS.replace("2024-02-29 08:15:00", "29.02.2024"), encoding="utf-8")
    bad = run_cli(*common, "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {tests}: fixture 'leap_day_morning': mocked_datetime '29.02.2024' is not a date and time Rasa "
        "reads; write e.g. 2026-01-15T09:30:00+00:00 or 2026-01-15 09:30:00"
    ]


# --------------------------------------------------------------------------------------------- config.yml

GUARDED_DATE_LINE = "{% if current_datetime %}Now: {{ current_datetime }} ({{ current_datetime.tzname() }}){% else %}No date{% endif %}\n"


def rasa_config(folder: Path, **generator: Any) -> Path:
    """A production config.yml whose command generator uses a template with a guarded date line."""
    (folder / "guarded_prompt.jinja2").write_text(
        GUARDED_DATE_LINE + default_template("v2").text, encoding="utf-8"
    )
    component = {
        "name": "CompactLLMCommandGenerator",
        "prompt_template": "guarded_prompt.jinja2",
        **generator,
    }
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump({"recipe": "default.v1", "pipeline": [component]}), encoding="utf-8")
    return path


def offline_first_lines(tmp_path: Path, config: Path, tests: Path, *more: str) -> set[str]:
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    result = run_cli(
        str(tests), "--assistant", str(EXAMPLE), "--annotator", "assertions", "--num-rephrases", "0",
        "--config", str(config), "--cache-dir", str(tmp_path / "c"), "--out", str(out), *more,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = (out / "3_llm_finetune_data" / "llm_ft_data.jsonl").read_text().splitlines()
    return {json.loads(line)["prompt"].split("\n", 1)[0] for line in lines}


def test_the_generators_timezone_and_include_date_time_are_rasas(tmp_path: Path) -> None:
    tests = tmp_path / "mocked.yml"
    tests.write_text(MOCKED_TESTS, encoding="utf-8")
    berlin = rasa_config(tmp_path, timezone="Europe/Berlin")
    assert offline_first_lines(tmp_path, berlin, tests, "--prompt-datetime", "2026-01-15T09:30:00Z") == {
        "Now: 2026-01-15 10:30:00+01:00 (CET)",  # the run's instant, in the configured zone
        "Now: 2024-02-29 08:15:00+00:00 (UTC)",  # the fixture's, as Rasa reads it (not converted)
    }
    # Rasa passes no current_datetime at all then, not even a test's mocked one.
    off = rasa_config(tmp_path, include_date_time=False)
    assert offline_first_lines(tmp_path, off, tests) == {"No date"}
    assert not (tmp_path / "c").exists()  # nothing to record
    nowhere = rasa_config(tmp_path, timezone="Mars/Olympus_Mons")
    result = run_cli(str(tests), "--assistant", str(EXAMPLE), "--annotator", "assertions", "--num-rephrases", "0",
                     "--config", str(nowhere), "--out", str(tmp_path / "bad"))  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1:] == [
        f"error: {nowhere} (CompactLLMCommandGenerator): timezone 'Mars/Olympus_Mons' is not an IANA timezone "
        "name; write e.g. Europe/Berlin or UTC"
    ]
