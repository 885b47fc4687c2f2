"""`ftrecipe prepare-data` stage 1 end to end: the example assistant against a scripted OpenAI-compatible server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.dataprep.e2e import read_e2e_tests, read_test_suite
from ftrecipe.dataprep.pipeline import prepare_data
from support.llm_server import ChatRequest, LLMServer
from support.moneybank import EXAMPLE, LABELS, TESTS, TableGenerator, options, write_production_endpoints

ROOT = Path(__file__).resolve().parents[1]


def read(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


async def test_llm_annotation_of_the_example_suite(
    tmp_path: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    generator = TableGenerator()
    llm_server.script(generator)
    result = await prepare_data(options(tmp_path, llm_config))
    out = tmp_path / "out"
    assert llm_server.script_errors == []
    n_tests = sum(len(s.test_cases) for s in read_e2e_tests([TESTS]))
    assert n_tests == 35 == len({label.test for label in LABELS})
    assert result.summary["num_input_e2e_tests"] == n_tests
    assert result.summary["num_annotated_conversations"] == n_tests
    # 91 turns: every user message of the suite but the two button clicks (payloads skip the LLM).
    assert result.summary["num_user_messages_to_rephrase_across_conversations"] == len(LABELS) == 91
    # Exactly one call per annotated turn, each sending the rendered production prompt as one user message,
    # each showing the state the table expects for its message (else the generator would have raised).
    assert len(llm_server.chat_requests) == len(LABELS)
    assert sorted(label.state for label in generator.answered) == sorted(label.state for label in LABELS)
    assert all(len(r.messages) == 1 and r.messages[0]["role"] == "user" for r in llm_server.chat_requests)
    assert read(out / "1_command_annotations" / "failed_test_cases.yml") == {"failed_test_cases": []}
    # Every conversation of every file is kept (Rasa's own tool keeps only the last one per file).
    files = sorted(p.name for p in (out / "1_command_annotations").glob("*.yml"))
    assert files == [
        "accounts.yml",
        "cards.yml",
        "failed_test_cases.yml",
        "payees.yml",
        "repair.yml",
        "transfers.yml",
    ]
    conversations = [
        c
        for f in files
        if f != "failed_test_cases.yml"
        for c in read(out / "1_command_annotations" / f)["conversations"]
    ]
    assert len(conversations) == n_tests
    first = read(out / "1_command_annotations" / "transfers.yml")["conversations"][0]
    assert first["original_test_case"].startswith("examples/moneybank/e2e_tests/payments/transfers.yml::")
    labelled = [s for c in conversations for s in c["steps"] if "llm_commands" in s]
    assert len(labelled) == len(LABELS)
    params = read(out / "params.yaml")
    assert params["command_generator"]["syntax"] == "v2"
    assert params["command_generator"]["prompt_template"] == "builtin:command_prompt_v2.jinja2"
    usage = result.summary["llm_usage"]["purposes"]["annotate"]
    assert usage["calls"] == len(LABELS)
    assert usage["cache_hits"] == 0


async def test_same_labels_as_the_assertions_annotator(
    tmp_path: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    """The hand-written labels are what the offline annotator derives from the assertions, byte for byte."""
    llm_server.script(TableGenerator())
    await prepare_data(options(tmp_path, llm_config, out=tmp_path / "by-llm"))
    await prepare_data(options(tmp_path, llm_config, out=tmp_path / "by-assertions", annotator="assertions"))
    for path in (tmp_path / "by-llm" / "1_command_annotations").glob("*.yml"):
        assert (
            path.read_text() == (tmp_path / "by-assertions" / "1_command_annotations" / path.name).read_text()
        )


async def test_a_wrong_answer_fails_only_its_test(
    tmp_path: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    table = TableGenerator()

    def script(request: ChatRequest) -> str:
        if '"Transfer 40 to Priya"' in request.prompt:
            return "start flow check_balance"
        return table(request)

    llm_server.script(script)
    result = await prepare_data(options(tmp_path, llm_config))
    (failure,) = read(tmp_path / "out" / "1_command_annotations" / "failed_test_cases.yml")[
        "failed_test_cases"
    ]
    assert failure["test_case"] == "transfer_correct_amount_before_confirming"
    assert failure["file"] == "examples/moneybank/e2e_tests/payments/transfers.yml"
    assert failure["turn_index"] == 0
    assert failure["user_message"] == "Transfer 40 to Priya"
    assert failure["expected"].splitlines() == [
        "start flow transfer_money",
        "set slot recipient Priya",
        "set slot amount 40",
    ]
    assert failure["actual"].startswith("start flow check_balance\n(missing `start flow transfer_money`")
    assert result.summary["num_annotated_conversations"] == result.summary["num_input_e2e_tests"] - 1
    split_names = [
        t.name
        for side in ("train", "validation")
        for t in read_test_suite(
            tmp_path / "out" / "4_train_test_split" / "e2e_tests" / f"{side}.yaml"
        ).test_cases
    ]
    assert "transfer_correct_amount_before_confirming" not in split_names
    assert len(split_names) == result.summary["num_annotated_conversations"]
    # The failing test stopped at its first turn: no calls for its two later turns.
    assert len(llm_server.chat_requests) == len(LABELS) - 2


async def test_errors_are_retried_and_a_rerun_is_served_from_the_cache(
    tmp_path: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    llm_server.script(TableGenerator())
    llm_server.fail_next(1, status=500, retry_after=0.01)
    llm_server.fail_next(1, status=429, retry_after=0.01)
    first = await prepare_data(options(tmp_path, llm_config))
    assert first.summary["num_annotated_conversations"] == first.summary["num_input_e2e_tests"]
    assert len(llm_server.chat_requests) == len(LABELS) + 2
    assert first.summary["llm_usage"]["purposes"]["annotate"]["failures"] == 2

    before = len(llm_server.requests)
    second = await prepare_data(options(tmp_path, llm_config, out=tmp_path / "again"))
    assert len(llm_server.requests) == before  # zero calls
    assert second.summary["llm_usage"]["purposes"]["annotate"]["cache_hits"] == len(LABELS)
    for path in (tmp_path / "out" / "1_command_annotations").glob("*.yml"):
        assert path.read_text() == (tmp_path / "again" / "1_command_annotations" / path.name).read_text()


async def test_an_llm_that_stays_down_fails_the_conversations_not_the_run(
    tmp_path: Path, llm_server: LLMServer, llm_config: Path
) -> None:
    llm_server.answer_with("x")
    llm_server.fail_next(1000, status=503, retry_after=0.001)
    result = await prepare_data(options(tmp_path, llm_config, e2e_paths=(TESTS / "accounts.yml",)))
    failures = read(tmp_path / "out" / "1_command_annotations" / "failed_test_cases.yml")["failed_test_cases"]
    assert len(failures) == result.summary["num_input_e2e_tests"] == 5
    assert all("LLM call failed" in f["actual"] and "503" in f["actual"] for f in failures)


def run_cli(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftrecipe.cli.main", "prepare-data", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


# Labels from assertions, no rephrasing: a run that needs no LLM.
OFFLINE = ("--assistant", str(EXAMPLE), "--annotator", "assertions", "--num-rephrases", "0")


def test_cli_offline_with_the_assertions_annotator(tmp_path: Path) -> None:
    result = run_cli(str(TESTS), str(EXAMPLE / "e2e_tests_legacy"), *OFFLINE, "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    summary = read(tmp_path / "out" / "result_summary.yaml")
    failures = read(tmp_path / "out" / "1_command_annotations" / "failed_test_cases.yml")["failed_test_cases"]
    # The legacy tests carry no assertions: the offline annotator cannot label them, and says so.
    assert {f["test_case"] for f in failures} == {
        "legacy_check_savings_balance",
        "legacy_transfer_money",
        "legacy_block_card_cancelled",
    }
    assert all("assertions do not determine the commands" in f["actual"] for f in failures)
    assert summary["num_annotated_conversations"] == summary["num_input_e2e_tests"] - 3


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda d: None, ["--assistant", "{ex}", "nope/"], "nope: no such file or folder of E2E tests"),
        (
            lambda d: (d / "bad.yml").write_text(
                "test_cases:\n  - test_case: a\n    steps:\n      - usr: hi\n"
            ),
            ["--assistant", "{ex}", "{d}/bad.yml", "--annotator", "assertions"],
            "bad.yml:4: unknown step (usr)",
        ),
        (
            lambda d: (d / "t.yml").write_text(
                "test_cases:\n  - test_case: a\n    steps:\n      - user: hi\n        assertions:\n"
                "          - flow_started: no_such_flow\n"
            ),
            ["--assistant", "{ex}", "{d}/t.yml", "--annotator", "assertions"],
            "t.yml:4: test 'a': unknown flow 'no_such_flow'",
        ),
        (
            lambda d: (d / "t.yml").write_text(
                "test_cases:\n  - test_case: a\n    steps:\n      - user: hi\n      - utter: utter_nonexistent\n"
            ),
            ["--assistant", "{ex}", "{d}/t.yml", "--annotator", "assertions"],
            "t.yml:5: test 'a': response 'utter_nonexistent' is not in the domain",
        ),
        (
            lambda d: (d / "p.jinja2").write_text("{% for x in %}"),
            ["--assistant", "{ex}", "{tests}", "--llm-config", "{d}/llm.yml"],
            "p.jinja2:1: invalid Jinja2 template",
        ),
        (
            lambda d: None,
            ["--assistant", "{ex}", "{tests}"],
            "--annotator llm needs the command generator's LLM",
        ),
        (
            lambda d: None,
            ["--assistant", "{ex}", "{tests}", "--num-rephrases", "50"],
            "--num-rephrases must be",
        ),
        (
            lambda d: None,
            ["--assistant", "{ex}", "{tests}", "--annotator", "assertions"],
            "--num-rephrases > 0 (to check rephrasings) needs the command generator's LLM",
        ),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path: Path, setup: Any, args: list[str], message: str) -> None:
    setup(tmp_path)
    (tmp_path / "llm.yml").write_text("syntax: v2\nprompt_template: p.jinja2\nllm: {model: gpt-4o}\n")
    filled = [a.format(ex=EXAMPLE, d=tmp_path, tests=TESTS) for a in args]
    result = run_cli(
        *filled, "--out", str(tmp_path / "out"), env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "k"}
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert message in line, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing that looks complete


def test_cli_publishes_a_bundle_to_s3_and_a_folder(tmp_path: Path, s3_bucket: Any) -> None:
    import os

    from ftrecipe.storage import bundle_complete, fetch_bundle, read_manifest

    env = {**os.environ, **s3_bucket.env(), "FTRECIPE_S3_ADDRESSING_STYLE": "path"}
    common = [str(TESTS), *OFFLINE]
    remote = f"s3://{s3_bucket.bucket}/recipes/demo/data/"
    result = run_cli(*common, "--out", remote, env=env)
    assert result.returncode == 0, result.stderr
    local = run_cli(*common, "--out", str(tmp_path / "local"), env=env)
    assert local.returncode == 0, local.stderr

    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        assert bundle_complete(remote)
        manifest = read_manifest(remote)
        assert manifest is not None
        fetched = fetch_bundle(remote, tmp_path / "fetched")
    assert manifest.producer.startswith("ftrecipe prepare-data")
    paths = {f.path for f in manifest.files}
    assert "3_llm_finetune_data/llm_ft_data.jsonl" in paths
    assert "4_train_test_split/ft_splits/train.jsonl" in paths
    # The folder output is the same bundle: same files, same contents, same inputs hash.
    local_manifest = read_manifest(tmp_path / "local")
    assert local_manifest is not None
    assert (tmp_path / "local" / "_SUCCESS").exists()
    assert local_manifest.inputs_hash == fetched.inputs_hash
    same = {
        f.path: f.sha256
        for f in local_manifest.files
        if not f.path.endswith(("result_summary.yaml", "params.yaml"))
    }
    assert same == {f.path: f.sha256 for f in fetched.files if f.path in same}
    assert (tmp_path / "fetched" / "4_train_test_split" / "ft_splits" / "train.jsonl").read_bytes() == (
        tmp_path / "local" / "4_train_test_split" / "ft_splits" / "train.jsonl"
    ).read_bytes()


def test_cli_missing_bucket_is_one_line(tmp_path: Path, s3: Any) -> None:
    import os

    env = {**os.environ, **s3.env(), "FTRECIPE_S3_ADDRESSING_STYLE": "path"}
    result = run_cli(str(TESTS), *OFFLINE, "--out", "s3://no-such-bucket-ftrecipe/x/", env=env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: ")
    assert "no-such-bucket-ftrecipe" in line
    assert "Traceback" not in result.stderr
    assert s3.secret_key not in result.stderr


def test_cli_missing_api_key_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "openai.yml").write_text("llm: {model: gpt-4o}\n")
    result = run_cli(
        str(TESTS),
        "--assistant",
        str(EXAMPLE),
        "--llm-config",
        str(tmp_path / "openai.yml"),
        "--num-rephrases",
        "0",
        "--out",
        str(tmp_path / "out"),
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: LLM openai/gpt-4o: OPENAI_API_KEY is not set: provider openai needs an API key"
    )


async def test_labelled_by_the_production_llm_named_in_config_and_endpoints(
    tmp_path: Path, llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --llm-config at all: Rasa's own files name the generator, its model group and its key variable."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("MONEYBANK_LLM_KEY", llm_server.api_key or "")
    config = tmp_path / "config.yml"
    config.write_text(
        (EXAMPLE / "config.yml").read_text()
    )  # CompactLLMCommandGenerator, command_generator_llm
    endpoints = write_production_endpoints(tmp_path / "endpoints.yml", llm_server)
    llm_server.script(TableGenerator())
    result = await prepare_data(options(tmp_path, None, config=config, endpoints=endpoints))
    assert result.summary["num_annotated_conversations"] == result.summary["num_input_e2e_tests"]
    assert len(llm_server.chat_requests) == len(LABELS)
    assert {r.bearer for r in llm_server.requests if r.chat is not None} == {llm_server.api_key}
    params = read(tmp_path / "out" / "params.yaml")["command_generator"]
    assert params["syntax"] == "v2" and "CompactLLMCommandGenerator" in params["source"]
    assert params["llm"]["api_base"] == llm_server.base_url
    assert "MONEYBANK_LLM_KEY" in str(params["llm"]) and (llm_server.api_key or "-") not in str(params)
