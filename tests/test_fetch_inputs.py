"""`ftrecipe fetch-inputs`: the init container of a Job materialises the assistant and the config files,
and the main container's command line from `build_job` runs on what it wrote."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.api.v1alpha1 import FinetuneRecipeSpec
from ftrecipe.cli.main import main
from ftrecipe.controller.manifests import build_job
from ftrecipe.dataprep.config import read_llm_config
from ftrecipe.dataprep.rephrase import read_rephrase_config
from ftrecipe.phases import inputs
from ftrecipe.phases.inputs import FetchError, fetch_inputs, spec_json
from ftrecipe.plan.cache_key import phase_hashes
from ftrecipe.plan.planner import CreateJob, job_name
from ftrecipe.training.config import load_train_config
from support.moneybank import EXAMPLE
from support.s3 import S3Server

ASSISTANT_PARTS = ("config.yml", "endpoints.yml", "data", "domain", "e2e_tests")


def make_spec(source: dict[str, Any], **changes: Any) -> FinetuneRecipeSpec:
    data: dict[str, Any] = {
        "assistant": {"source": source, "e2eTests": ["e2e_tests"]},
        "dataPreparation": {"annotator": "assertions", "numRephrases": 0},
        "training": {"baseModel": {"huggingFace": {"id": "org/model"}}, "gpus": 0},
        "output": {"s3": {"uri": "s3://ml-artifacts/ftrecipe/"}},
        "evaluation": {"enabled": False},
    }
    data.update(changes)
    return FinetuneRecipeSpec.model_validate(data)


def assistant_files(root: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for part in ASSISTANT_PARTS:
        path = root / part
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            found[file.relative_to(root).as_posix()] = file.read_bytes()
    return found


def copy_assistant(target: Path) -> None:
    for relative, data in assistant_files(EXAMPLE).items():
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        (target / relative).write_bytes(data)


def fetched(into: Path) -> dict[str, bytes]:
    return assistant_files(into / inputs.ASSISTANT_DIR)


def data_job_args(spec: FinetuneRecipeSpec) -> list[str]:
    inputs_hash = phase_hashes(spec)["data"]
    action = CreateJob("data", inputs_hash, job_name("moneybank", "data", inputs_hash), False)
    job = build_job("moneybank", "ml", spec, action, output_prefix="s3://ml-artifacts/ftrecipe/x/")
    args: list[str] = job["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def rewrite(args: list[str], into: Path, out: Path, cache: Path) -> list[str]:
    """The Job's command line with the pod's folders replaced by the test's."""
    rewritten = [
        arg.replace(inputs.INPUTS_DIR, str(into)).replace("/workspace/cache", str(cache)) for arg in args
    ]
    rewritten[rewritten.index("--out") + 1] = str(out)
    return rewritten


# --------------------------------------------------------------------------------------------- S3


def upload_assistant(s3: S3Server, prefix: str) -> None:
    client = s3.client()
    for relative, data in assistant_files(EXAMPLE).items():
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{relative}", Body=data)


@pytest.fixture
def s3_env(s3_bucket: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name, value in s3_bucket.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FTRECIPE_S3_ADDRESSING_STYLE", "path")
    return s3_bucket


def test_data_inputs_from_s3_then_prepare_data_runs(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_assistant(s3_env, "assistants/moneybank")
    spec = make_spec({"s3": {"uri": f"s3://{s3_env.bucket}/assistants/moneybank/", "forcePathStyle": True}})
    into = tmp_path / "inputs"
    monkeypatch.setenv(inputs.SPEC_ENV, spec_json(spec))
    assert main(["fetch-inputs", "--phase", "data", "--into", str(into)]) == 0

    assert fetched(into) == assistant_files(EXAMPLE)
    generator = read_llm_config(into / inputs.LLM_CONFIG)
    assert generator.syntax is None and generator.llm is None  # the recipe sets neither
    assert not (into / inputs.REPHRASE_CONFIG).exists()

    # The Job's own command line, pointed at this test's folders, prepares data from the fetched files.
    out = tmp_path / "out"
    args = rewrite(data_job_args(spec), into, out, tmp_path / "cache")
    assert args[0] == "prepare-data" and "--annotator" in args
    assert main(args) == 0
    assert (out / "4_train_test_split" / "ft_splits" / "train.jsonl").stat().st_size > 0


def test_assistant_config_and_endpoints_reach_prepare_data(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The production config.yml decides the syntax and endpoints.yml's model group the LLM."""
    upload_assistant(s3_env, "assistants/moneybank")
    single_step = (
        (EXAMPLE / "config.yml")
        .read_text()
        .replace("CompactLLMCommandGenerator", "SingleStepLLMCommandGenerator")
    )
    s3_env.client().put_object(
        Bucket=s3_env.bucket, Key="assistants/moneybank/config.yml", Body=single_step.encode()
    )
    spec = make_spec(
        {"s3": {"uri": f"s3://{s3_env.bucket}/assistants/moneybank/", "forcePathStyle": True}},
        assistant={
            "source": {"s3": {"uri": f"s3://{s3_env.bucket}/assistants/moneybank/", "forcePathStyle": True}},
            "e2eTests": ["e2e_tests"],
            "config": "config.yml",
            "endpoints": "endpoints.yml",
        },
    )
    into = tmp_path / "inputs"
    monkeypatch.setenv(inputs.SPEC_ENV, spec_json(spec))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # offline (assertions): the LLM is named, not called
    assert main(["fetch-inputs", "--phase", "data", "--into", str(into)]) == 0

    out = tmp_path / "out"
    args = rewrite(data_job_args(spec), into, out, tmp_path / "cache")
    assert args[args.index("--config") + 1] == str(into / "assistant" / "config.yml")
    assert args[args.index("--endpoints") + 1] == str(into / "assistant" / "endpoints.yml")
    assert main(args) == 0
    params = yaml.safe_load((out / "params.yaml").read_text())["command_generator"]
    assert params["syntax"] == "v1"
    assert "SingleStepLLMCommandGenerator" in params["source"]
    assert params["llm"]["model"] == "gpt-4o-2024-11-20"
    train = (out / "4_train_test_split" / "ft_splits" / "train.jsonl").read_text()
    assert "StartFlow(" in train and "start flow" not in train


def test_a_named_file_missing_from_the_source_names_the_recipe_field(
    s3_env: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upload_assistant(s3_env, "assistants/moneybank")
    source = {"s3": {"uri": f"s3://{s3_env.bucket}/assistants/moneybank/", "forcePathStyle": True}}
    cases = [
        ({"assistant": {"source": source, "config": "rasa/config.yml"}}, "assistant.config: rasa/config.yml"),
        (
            {"assistant": {"source": source, "e2eTests": ["tests/passed.yml"]}},
            "assistant.e2eTests: tests/passed.yml",
        ),
        (
            {"commandGenerator": {"promptTemplate": "prompts/cmd.jinja2"}},
            "commandGenerator.promptTemplate: prompts/cmd.jinja2",
        ),
    ]
    for changes, named in cases:
        spec = make_spec(source, **changes)
        into = tmp_path / "inputs"
        code = main(["fetch-inputs", "--phase", "data", "--into", str(into), "--spec-json", spec_json(spec)])
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and named in err, err
        assert (
            "is not among the assistant's files" in err
            and f"s3://{s3_env.bucket}/assistants/moneybank/" in err
        )


def test_empty_s3_prefix_is_one_line_exit_2(
    s3_env: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = make_spec({"s3": {"uri": f"s3://{s3_env.bucket}/nothing/here/"}})
    code = main(["fetch-inputs", "--phase", "data", "--into", str(tmp_path), "--spec-json", spec_json(spec)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"s3://{s3_env.bucket}/nothing/here" in err and "no files" in err


def test_missing_spec_is_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(inputs.SPEC_ENV, raising=False)
    assert main(["fetch-inputs", "--phase", "data", "--into", str(tmp_path)]) == 2
    assert "FTRECIPE_SPEC is not set" in capsys.readouterr().err
    assert main(["fetch-inputs", "--phase", "data", "--into", str(tmp_path), "--spec-json", "{}"]) == 2
    assert "not a valid FinetuneRecipe spec" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- git


def git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [
            "git",
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "init.defaultBranch=main",
            *args,
        ],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


@pytest.fixture
def git_repo(tmp_path: Path) -> tuple[str, str]:
    """A bare repository (file:// URL) with the assistant under `bots/moneybank`; returns (url, commit SHA)."""
    work = tmp_path / "work"
    work.mkdir()
    git("init", "--quiet", cwd=work)
    copy_assistant(work / "bots" / "moneybank")
    (work / "README.md").write_text("not part of the assistant\n")
    git("add", ".", cwd=work)
    git("commit", "--quiet", "-m", "assistant", cwd=work)
    sha = git("rev-parse", "HEAD", cwd=work)
    git("branch", "release", cwd=work)
    (work / "bots" / "moneybank" / "later.txt").write_text("a later commit\n")
    git("add", ".", cwd=work)
    git("commit", "--quiet", "-m", "later", cwd=work)
    bare = tmp_path / "remote.git"
    git("clone", "--quiet", "--bare", str(work), str(bare))
    return f"file://{bare}", sha


@pytest.mark.parametrize("revision", ["sha", "release", "main"])
def test_data_inputs_from_git(git_repo: tuple[str, str], tmp_path: Path, revision: str) -> None:
    url, sha = git_repo
    spec = make_spec(
        {"git": {"url": url, "revision": sha if revision == "sha" else revision, "path": "bots/moneybank"}}
    )
    into = tmp_path / "inputs"
    fetch_inputs(spec, "data", into, {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert fetched(into) == assistant_files(EXAMPLE)
    assert (into / "assistant" / "later.txt").exists() == (revision == "main")
    assert not (into / "assistant" / ".git").exists()
    assert not (into / "assistant" / "README.md").exists()
    # Fetching again (a retried init container) replaces what is there.
    fetch_inputs(spec, "data", into, {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert fetched(into) == assistant_files(EXAMPLE)


def test_git_failure_names_url_without_credentials(git_repo: tuple[str, str], tmp_path: Path) -> None:
    url, _ = git_repo
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "GIT_USERNAME": "bot",
        "GIT_PASSWORD": "s3cr3t-token",
    }
    missing = make_spec({"git": {"url": url, "revision": "no-such-branch"}})
    with pytest.raises(
        FetchError, match=r"git clone of file://.*remote\.git at no-such-branch failed"
    ) as caught:
        fetch_inputs(missing, "data", tmp_path / "a", env)
    assert "s3cr3t" not in str(caught.value)
    unreachable = make_spec({"git": {"url": "https://bot:s3cr3t-token@127.0.0.1:9/org/repo.git"}})
    with pytest.raises(
        FetchError, match=r"git clone of https://127\.0\.0\.1:9/org/repo\.git at main"
    ) as caught:
        fetch_inputs(unreachable, "data", tmp_path / "b", env)
    assert "s3cr3t" not in str(caught.value) and "bot" not in str(caught.value)
    no_folder = make_spec({"git": {"url": url, "path": "bots/other"}})
    with pytest.raises(FetchError, match="no folder 'bots/other'"):
        fetch_inputs(no_folder, "data", tmp_path / "c", env)


# --------------------------------------------------------------------------------------------- volumes


def test_data_inputs_from_config_map(tmp_path: Path) -> None:
    mount = tmp_path / "configmap"
    # What the kubelet mounts: keys as links into a timestamped folder, behind `..data`.
    stamp = mount / "..2026_01_01_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for name in ("flows.yml", "domain.yml", "tests.yml"):
        (stamp / name).write_text(f"# {name}\n")
        (mount / name).symlink_to(Path("..data") / name)
    (mount / "..data").symlink_to(stamp.name)
    source = {"configMap": {"name": "moneybank"}}
    spec = make_spec(source, assistant={"source": source, "e2eTests": ["tests.yml"]})
    into = tmp_path / "inputs"
    fetch_inputs(spec, "data", into, {inputs.CONFIGMAP_ROOT_ENV: str(mount)})
    assert sorted(p.name for p in (into / "assistant").iterdir()) == ["domain.yml", "flows.yml", "tests.yml"]
    assert (into / "assistant" / "flows.yml").read_text() == "# flows.yml\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FetchError, match="has no keys"):
        fetch_inputs(spec, "data", tmp_path / "other", {inputs.CONFIGMAP_ROOT_ENV: str(empty)})


def test_data_inputs_from_pvc(tmp_path: Path) -> None:
    mount = tmp_path / "pvc"
    copy_assistant(mount / "assistants" / "moneybank")
    spec = make_spec({"pvc": {"claimName": "assistants", "path": "assistants/moneybank"}})
    into = tmp_path / "inputs"
    fetch_inputs(spec, "data", into, {inputs.PVC_ROOT_ENV: str(mount)})
    assert fetched(into) == assistant_files(EXAMPLE)
    for path in ("assistants/other", "../outside"):
        bad = make_spec({"pvc": {"claimName": "assistants", "path": path}})
        with pytest.raises(FetchError):
            fetch_inputs(bad, "data", tmp_path / "x", {inputs.PVC_ROOT_ENV: str(mount)})


def test_local_source_is_refused(tmp_path: Path) -> None:
    spec = make_spec({"local": {"path": "."}})
    with pytest.raises(FetchError, match="ftrecipe run"):
        fetch_inputs(spec, "data", tmp_path, {})


# --------------------------------------------------------------------------------------------- configs


def test_llm_and_rephrase_configs(tmp_path: Path) -> None:
    mount = tmp_path / "pvc"
    copy_assistant(mount)
    (mount / "prompts").mkdir()
    (mount / "prompts" / "command.jinja2").write_text("{{ current_conversation }}")
    (mount / "prompts" / "rephrase.jinja2").write_text("{{ conversation }}")
    llm = {
        "provider": "azure",
        "model": "gpt-4o-prod",
        "apiBase": "https://example.openai.azure.com",
        "apiVersion": "2024-06-01",
        "maxTokens": 256,
        "timeoutSeconds": 30,
        "apiKeySecretRef": {"name": "azure-openai", "key": "api-key"},
    }
    spec = make_spec(
        {"pvc": {"claimName": "assistants"}},
        commandGenerator={"syntax": "v1", "promptTemplate": "prompts/command.jinja2", "llm": llm},
        dataPreparation={
            "annotator": "llm",
            "rephraser": {"promptTemplate": "prompts/rephrase.jinja2", "llm": {**llm, "temperature": 0.7}},
        },
    )
    into = tmp_path / "inputs"
    fetch_inputs(spec, "data", into, {inputs.PVC_ROOT_ENV: str(mount)})
    generator = read_llm_config(into / inputs.LLM_CONFIG)
    assert generator.syntax == "v1"
    assert generator.prompt_template == into / "assistant" / "prompts" / "command.jinja2"
    assert generator.prompt_template.is_file()
    assert generator.llm is not None
    assert (generator.llm.provider, generator.llm.model, generator.llm.timeout) == (
        "azure",
        "gpt-4o-prod",
        30,
    )
    assert generator.llm.max_tokens == 256 and generator.llm.api_version == "2024-06-01"
    rephraser = read_rephrase_config(into / inputs.REPHRASE_CONFIG)
    assert rephraser.llm is not None and rephraser.llm.temperature == 0.7
    text = (into / inputs.LLM_CONFIG).read_text() + (into / inputs.REPHRASE_CONFIG).read_text()
    assert "api-key" not in text and "azure-openai" not in text  # not even the reference
    assert "--rephrase-config" in data_job_args(spec)


def test_train_inputs_are_the_training_block(tmp_path: Path) -> None:
    spec = make_spec(
        {"pvc": {"claimName": "assistants"}},
        training={
            "baseModel": {"huggingFace": {"id": "org/model"}},
            "gpus": 0,
            "lora": {"r": 8},
            "hyperparameters": {"epochs": 1},
        },
    )
    code = main(["fetch-inputs", "--phase", "train", "--into", str(tmp_path), "--spec-json", spec_json(spec)])
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [inputs.TRAINING_CONFIG]
    config = load_train_config(tmp_path / inputs.TRAINING_CONFIG, [])
    assert config.lora.r == 8 and config.hyperparameters.epochs == 1 and config.base_model is None
    assert yaml.safe_load((tmp_path / inputs.TRAINING_CONFIG).read_text())["gpus"] == 0


def test_spec_json_round_trips() -> None:
    spec = make_spec({"configMap": {"name": "moneybank"}})
    # Fields added later (training.nodes, training.parallelism, evaluation.e2e) are left out at their
    # earlier value.
    dumped = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    dumped["training"] = {k: v for k, v in dumped["training"].items() if k not in {"nodes", "parallelism"}}
    dumped["evaluation"] = {k: v for k, v in dumped["evaluation"].items() if k != "e2e"}
    assert json.loads(spec_json(spec)) == dumped
    assert inputs.load_spec(spec_json(spec)) == spec
