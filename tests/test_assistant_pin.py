"""The E2E evaluation replays the assistant the data was made from.

The data Job and the evaluate Job (`evaluation.e2e`) each fetch the assistant; with a git source on a
branch, the branch may move between them. So the data phase's fetch records the commit it checked out
(beside the assistant), prepare-data writes it with a digest of the files that decide prompts and the
replay into params.yaml (`assistant_source`), the evaluate phase's fetch checks out that commit, and
`evaluate --e2e` refuses an assistant whose files differ from the record, naming the first one.

Git sources are a local bare repository behind a file:// URL; the data bundle is published to the
SeaweedFS S3 fixture as a Job publishes it; the refusal and old-bundle tests use the example's prepared
data of tests/test_evaluate_e2e.py with the scripted command generator.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from ftrecipe.api import load_recipe
from ftrecipe.api.v1alpha1 import FinetuneRecipeSpec
from ftrecipe.cli.main import main
from ftrecipe.controller.manifests import build_job
from ftrecipe.hashing import stable_hash
from ftrecipe.local import runner
from ftrecipe.local.layout import resolve
from ftrecipe.phases import inputs
from ftrecipe.plan.cache_key import phase_hashes
from ftrecipe.plan.planner import CreateJob, job_name
from ftrecipe.storage import publish_bundle, read_manifest
from support.llm_server import LLMServer
from support.moneybank import EXAMPLE, TableGenerator
from support.s3 import S3Server
from test_evaluate_e2e import data  # noqa: F401  (the example's prepared data, once per module)
from test_fetch_inputs import assistant_files, copy_assistant, data_job_args, git, rewrite
from test_run import example_recipe, fake_model

FOLDER: Final = "bots/moneybank"
# What decides prompts and the replay in the example: its flows and domain files (no config is named).
REPLAY_FILES: Final = (
    "data/flows/accounts.yml",
    "data/flows/cards.yml",
    "data/flows/patterns.yml",
    "data/flows/payments.yml",
    "domain/actions.yml",
    "domain/responses.yml",
    "domain/slots.yml",
)
OLD_DESCRIPTION: Final = "Send money from the user's checking account to another person or a saved payee."
NEW_DESCRIPTION: Final = "Send money to anyone, from any of the user's accounts."
NO_CALL_ENDPOINT: Final = "http://127.0.0.1:9/v1"  # refused before any request: nothing listens there


def expected_files(root: Path) -> dict[str, str]:
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in REPLAY_FILES}


def make_spec(
    url: str, bucket: str = "ml-artifacts", source: dict[str, Any] | None = None
) -> FinetuneRecipeSpec:
    return FinetuneRecipeSpec.model_validate(
        {
            "assistant": {
                "source": source or {"git": {"url": url, "revision": "main", "path": FOLDER}},
                "e2eTests": ["e2e_tests"],
            },
            "dataPreparation": {"annotator": "assertions", "numRephrases": 0},
            "training": {"baseModel": {"huggingFace": {"id": "org/model"}}, "gpus": 0},
            "evaluation": {"e2e": True},
            "output": {"s3": {"uri": f"s3://{bucket}/ftrecipe/", "forcePathStyle": True}},
        }
    )


def fetch(spec: FinetuneRecipeSpec, phase: str, into: Path, *extra: str) -> None:
    """`ftrecipe fetch-inputs` as the Job's init container runs it (the spec on the command line here)."""
    args = ["fetch-inputs", "--phase", phase, "--into", str(into), "--spec-json", inputs.spec_json(spec)]
    assert main([*args, *extra]) == 0


def commit_all(work: Path, message: str) -> str:
    git("add", ".", cwd=work)
    git("commit", "--quiet", "-m", message, cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str, str]:
    """A working repository with the example under FOLDER on main, pushed to a bare one behind a file://
    URL; returns (work tree, URL, the commit)."""
    work = tmp_path / "work"
    work.mkdir()
    git("init", "--quiet", cwd=work)
    copy_assistant(work / FOLDER)
    sha = commit_all(work, "assistant")
    bare = tmp_path / "remote.git"
    git("clone", "--quiet", "--bare", str(work), str(bare))
    git("remote", "add", "origin", str(bare), cwd=work)
    return work, f"file://{bare}", sha


def move_main(work: Path) -> str:
    """A later commit on main changing a flow's description (what the prompts show), pushed."""
    payments = work / FOLDER / "data" / "flows" / "payments.yml"
    text = payments.read_text(encoding="utf-8")
    assert OLD_DESCRIPTION in text
    payments.write_text(text.replace(OLD_DESCRIPTION, NEW_DESCRIPTION), encoding="utf-8")
    sha = commit_all(work, "reword transfer_money")
    git("push", "--quiet", "origin", "main", cwd=work)
    return sha


@pytest.fixture
def s3_env(s3_bucket: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name, value in s3_bucket.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FTRECIPE_S3_ADDRESSING_STYLE", "path")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    return s3_bucket


def prepare(spec: FinetuneRecipeSpec, into: Path, out: str, cache: Path) -> None:
    """The data Job's own command line, on what fetch-inputs wrote into ``into``."""
    args = rewrite(data_job_args(spec), into, Path("/unused"), cache)
    args[args.index("--out") + 1] = out
    assert main(args) == 0


def evaluate_job_init(spec: FinetuneRecipeSpec, data_prefix: str) -> dict[str, Any]:
    """The evaluate Job's init container, as the operator builds it."""
    hashes = phase_hashes(spec)
    action = CreateJob(
        "evaluate", hashes["evaluate"], job_name("moneybank", "evaluate", hashes["evaluate"]), False
    )
    job = build_job("moneybank", "ml", spec, action, output_prefix="s3://x/eval/", data_prefix=data_prefix)
    init: dict[str, Any] = job["spec"]["template"]["spec"]["initContainers"][0]
    return init


def evaluate(data_uri: str, endpoint: str, out: Path, into: Path) -> int:
    return main(
        [
            "evaluate",
            "--data",
            data_uri,
            "--endpoint",
            endpoint,
            "--model",
            "moneybank",
            "--out",
            str(out),
            "--e2e",
            "--assistant",
            str(into / inputs.ASSISTANT_DIR),
            "--llm-config",
            str(into / inputs.LLM_CONFIG),
        ]
    )


def test_the_evaluation_checks_out_the_commit_the_data_was_made_from(
    repo: tuple[Path, str, str],
    s3_env: S3Server,
    llm_server: LLMServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    work, url, data_sha = repo
    spec = make_spec(url, s3_env.bucket)
    data_prefix = f"s3://{s3_env.bucket}/ftrecipe/moneybank/data-0123456789ab/"

    # The data Job: fetch main (the data commit), record it beside the assistant, prepare the data.
    data_into = tmp_path / "data-inputs"
    fetch(spec, "data", data_into)
    assert capsys.readouterr().err.splitlines() == [
        f"{data_into}/assistant: {url} at main, folder {FOLDER}",
        f"{data_into}/llm.yml",
    ]
    record = yaml.safe_load((data_into / "assistant.source.yaml").read_text(encoding="utf-8"))
    assert record == {"kind": "git", "url": url, "revision": "main", "path": FOLDER, "commit": data_sha}
    prepare(spec, data_into, data_prefix, tmp_path / "cache")
    key = "ftrecipe/moneybank/data-0123456789ab/params.yaml"
    params = yaml.safe_load(s3_env.client().get_object(Bucket=s3_env.bucket, Key=key)["Body"].read())
    files = expected_files(EXAMPLE)
    assert params["assistant_source"] == {
        "kind": "git",
        "url": url,
        "revision": "main",
        "path": FOLDER,
        "commit": data_sha,
        "files_sha256": stable_hash(files),
        "files": files,
    }

    manifest = read_manifest(data_prefix)
    assert manifest is not None
    assert (manifest.metadata["assistant_commit"], manifest.metadata["assistant_files_sha256"]) == (
        data_sha,
        stable_hash(files),
    )

    # Hours later main has moved on.
    capsys.readouterr()
    moved_sha = move_main(work)
    assert moved_sha != data_sha

    # The evaluate Job's init container reads the data bundle, and checks out the data's commit.
    init = evaluate_job_init(spec, data_prefix)
    assert {"name": "FTRECIPE_S3_ADDRESSING_STYLE", "value": "path"} in init["env"]  # output.s3's settings
    assert init["args"] == [
        "fetch-inputs",
        "--phase",
        "evaluate",
        "--into",
        "/workspace/inputs",
        "--data",
        data_prefix,
    ]
    eval_into = tmp_path / "eval-inputs"
    fetch(spec, "evaluate", eval_into, "--data", data_prefix)
    assert capsys.readouterr().err.splitlines() == [
        f"{eval_into}/assistant: {url} at main, pinned to {data_sha} by the data bundle, folder {FOLDER}",
        f"{eval_into}/llm.yml",
    ]
    assert assistant_files(eval_into / "assistant") == assistant_files(data_into / "assistant")
    payments = (eval_into / "assistant" / "data" / "flows" / "payments.yml").read_text(encoding="utf-8")
    assert OLD_DESCRIPTION in payments and NEW_DESCRIPTION not in payments

    # The replay on the pinned assistant: the digest matches, the teacher's answers pass every test.
    llm_server.script(TableGenerator())
    assert evaluate(data_prefix, llm_server.base_url, tmp_path / "eval", eval_into) == 0
    assert llm_server.script_errors == []
    e2e = json.loads((tmp_path / "eval" / "eval.json").read_text(encoding="utf-8"))["e2e"]
    assert (e2e["tests"], e2e["passed"], e2e["failed"]) == (7, 7, [])
    assert "warning" not in capsys.readouterr().err

    # Fetched at main as it is now (what the Job did before), the replay is refused in one line.
    moved_into = tmp_path / "moved-inputs"
    fetch(spec, "data", moved_into)
    assert NEW_DESCRIPTION in (moved_into / "assistant" / "data" / "flows" / "payments.yml").read_text()
    capsys.readouterr()
    assert evaluate(data_prefix, NO_CALL_ENDPOINT, tmp_path / "eval-moved", moved_into) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --assistant {moved_into}/assistant: data/flows/payments.yml changed since the data was "
        f"prepared from it (git {url} at main, commit {data_sha}, {data_prefix.rstrip('/')}/params.yaml), so "
        "the replay would render other prompts than the model was trained on: pin "
        f"assistant.source.git.revision to commit {data_sha}, or re-run the data phase on this assistant"
    ]


def test_a_commit_gone_from_the_repository_is_one_line(
    repo: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """main force-pushed to a history without the data's commit: exit 2, one line, nothing fetched."""
    work, url, data_sha = repo
    spec = make_spec(url)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "assistant_source": {
                    "kind": "git",
                    "url": url,
                    "revision": "main",
                    "path": FOLDER,
                    "commit": data_sha,
                }
            }
        ),
        encoding="utf-8",
    )
    data_uri = str(tmp_path / "data")
    publish_bundle(bundle, data_uri, producer="test", inputs_hash="0" * 64)
    git("checkout", "--quiet", "--orphan", "rewritten", cwd=work)
    commit_all(work, "history rewritten")
    git("push", "--quiet", "--force", "origin", "rewritten:main", cwd=work)
    bare = Path(url.removeprefix("file://"))
    git("reflog", "expire", "--expire=now", "--all", cwd=bare)
    git("gc", "--quiet", "--prune=now", cwd=bare)

    into = tmp_path / "inputs"
    args = ["fetch-inputs", "--phase", "evaluate", "--into", str(into), "--spec-json", inputs.spec_json(spec)]
    assert main([*args, "--data", data_uri]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: git clone of {url} at main: commit {data_sha}, which the data bundle was prepared from, is no "
        "longer in the repository (force-pushed away?): pin assistant.source.git.revision to a commit that "
        "exists, so that the data phase runs again on it"
    ]
    assert not (into / "assistant").exists()


def test_credentials_in_the_url_never_reach_params_yaml(
    repo: tuple[Path, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An https URL with a user and token (git rewrites it to the local repository here): the record and
    params.yaml hold the URL without them."""
    _, url, data_sha = repo
    secret_url = "https://bot:s3cr3t-token@git.example.com/org/assistant.git"
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", f"url.{url}.insteadOf")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", secret_url)
    monkeypatch.setenv("GIT_USERNAME", "bot")
    monkeypatch.setenv("GIT_PASSWORD", "s3cr3t-token")
    spec = make_spec(secret_url)
    into = tmp_path / "inputs"
    fetch(spec, "data", into)
    out = tmp_path / "data"
    prepare(spec, into, str(out), tmp_path / "cache")
    text = (out / "params.yaml").read_text(encoding="utf-8")
    assert "s3cr3t" not in text and "bot@" not in text
    source = yaml.safe_load(text)["assistant_source"]
    assert (source["url"], source["commit"]) == ("https://git.example.com/org/assistant.git", data_sha)
    assert "s3cr3t" not in (into / "assistant.source.yaml").read_text(encoding="utf-8")


def test_other_sources_record_the_digest_alone(tmp_path: Path) -> None:
    """A PVC (as a ConfigMap or S3): nothing to pin, so the record is the kind and the digest."""
    mount = tmp_path / "pvc"
    copy_assistant(mount / "assistants" / "moneybank")
    spec = make_spec("", source={"pvc": {"claimName": "assistants", "path": "assistants/moneybank"}})
    into = tmp_path / "inputs"
    inputs.fetch_inputs(spec, "data", into, {inputs.PVC_ROOT_ENV: str(mount)})
    out = tmp_path / "data"
    prepare(spec, into, str(out), tmp_path / "cache")
    # Nothing to pin: the evaluate Job's fetch reads no data bundle.
    assert evaluate_job_init(spec, "s3://ml-artifacts/data/")["args"][-2:] == ["--into", "/workspace/inputs"]
    files = expected_files(EXAMPLE)
    assert yaml.safe_load((out / "params.yaml").read_text())["assistant_source"] == {
        "kind": "pvc",
        "files_sha256": stable_hash(files),
        "files": files,
    }
    # prepare-data on a folder of one's own: kind local.
    local_out = tmp_path / "local"
    args = [
        "prepare-data",
        str(EXAMPLE / "e2e_tests"),
        "--assistant",
        str(EXAMPLE),
        "--annotator",
        "assertions",
    ]
    assert (
        main([*args, "--num-rephrases", "0", "--cache-dir", str(tmp_path / "cache"), "--out", str(local_out)])
        == 0
    )
    recorded = yaml.safe_load((local_out / "params.yaml").read_text())["assistant_source"]
    assert (recorded["kind"], recorded["files"]) == ("local", files)
    manifest = read_manifest(local_out)
    assert manifest is not None and "assistant_commit" not in manifest.metadata  # git alone has one
    assert manifest.metadata["assistant_files_sha256"] == stable_hash(files)


# ----------------------------------------------------------------- evaluate --e2e on the example's data


def _e2e(data_dir: Path, server: LLMServer, out: Path, assistant: Path) -> int:
    args = ["evaluate", "--data", str(data_dir), "--endpoint", server.base_url, "--model", "moneybank"]
    return main([*args, "--out", str(out), "--e2e", "--assistant", str(assistant)])


def test_a_changed_flows_file_is_refused_in_one_line(
    data: Path,  # noqa: F811
    llm_server: LLMServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    assistant = tmp_path / "assistant"
    shutil.copytree(EXAMPLE, assistant)
    payments = assistant / "data" / "flows" / "payments.yml"
    payments.write_text(payments.read_text().replace(OLD_DESCRIPTION, NEW_DESCRIPTION), encoding="utf-8")
    llm_server.script(TableGenerator())
    assert _e2e(data, llm_server, tmp_path / "eval", assistant) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --assistant {assistant}: data/flows/payments.yml changed since the data was prepared from it "
        f"(a local source, {data}/params.yaml), so the replay would render other prompts than the model was "
        "trained on: pass the assistant prepare-data was given, or re-run the data phase on this assistant"
    ]
    assert llm_server.chat_requests == []  # refused before any call
    # A file that decides nothing (a new E2E test, a README) is no drift; a new domain file is.
    shutil.copytree(EXAMPLE, assistant, dirs_exist_ok=True)
    (assistant / "e2e_tests" / "new_tests.yml").write_text("test_cases: []\n", encoding="utf-8")
    (assistant / "domain" / "more_slots.yml").write_text(
        "slots:\n  extra:\n    type: text\n", encoding="utf-8"
    )
    assert _e2e(data, llm_server, tmp_path / "eval", assistant) == 2
    assert "domain/more_slots.yml is new since the data was prepared" in capsys.readouterr().err


def test_a_bundle_from_before_the_record_evaluates_with_a_warning(
    data: Path,  # noqa: F811
    llm_server: LLMServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    old = tmp_path / "old-data"
    shutil.copytree(data, old, ignore=shutil.ignore_patterns("manifest.json", "_SUCCESS"))
    params: dict[str, Any] = yaml.safe_load((old / "params.yaml").read_text(encoding="utf-8"))
    del params["assistant_source"]
    (old / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    llm_server.script(TableGenerator())
    assert _e2e(old, llm_server, tmp_path / "eval", EXAMPLE) == 0
    e2e = json.loads((tmp_path / "eval" / "eval.json").read_text(encoding="utf-8"))["e2e"]
    assert (e2e["tests"], e2e["passed"]) == (7, 7)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == [
        f"warning: {old}/params.yaml records no assistant_source (prepared before ftrecipe recorded it): the "
        "assistant's flows and domain are not checked against the data's; re-run prepare-data to record them"
    ]


def test_a_bundle_from_before_the_record_fetches_the_revision(
    repo: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work, url, _ = repo
    move_main(work)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "params.yaml").write_text("command_generator:\n  syntax: v2\n", encoding="utf-8")
    data_uri = str(tmp_path / "data")
    publish_bundle(bundle, data_uri, producer="test", inputs_hash="0" * 64)
    into = tmp_path / "inputs"
    fetch(make_spec(url), "evaluate", into, "--data", data_uri)
    assert capsys.readouterr().err.splitlines()[0] == (
        f"{into}/assistant: {url} at main, folder {FOLDER} (the data bundle records no commit: the revision "
        "as it is now)"
    )
    assert NEW_DESCRIPTION in (into / "assistant" / "data" / "flows" / "payments.yml").read_text()
    assert not (into / "assistant.source.yaml").exists()  # the data phase's fetch alone leaves a record


def test_a_local_run_evaluates_on_the_commit_the_data_was_made_from(
    repo: tuple[Path, str, str], tmp_path: Path
) -> None:
    """`ftrecipe run` writes the same inputs as the Jobs: the record beside the data's assistant, and the
    E2E evaluation's assistant at the data bundle's commit."""
    work, url, data_sha = repo
    recipe = example_recipe(tmp_path / "recipe", fake_model(tmp_path / "model"))
    document = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    document["spec"]["assistant"]["source"] = {"git": {"url": url, "path": FOLDER}}
    document["spec"]["assistant"]["e2eTests"] = ["e2e_tests"]  # what the repository holds
    recipe.write_text(yaml.safe_dump(document), encoding="utf-8")
    local = resolve(load_recipe(recipe), recipe, tmp_path / "work")
    runner.write_inputs(local, "data")
    record = yaml.safe_load((local.run_dir("data") / "inputs" / "assistant.source.yaml").read_text())
    assert record == {"kind": "git", "url": url, "revision": "main", "path": FOLDER, "commit": data_sha}
    bundle = tmp_path / "bundle"  # what prepare-data publishes there, as far as the fetch reads it
    bundle.mkdir()
    (bundle / "params.yaml").write_text(yaml.safe_dump({"assistant_source": record}), encoding="utf-8")
    publish_bundle(bundle, local.prefixes["data"], producer="test", inputs_hash="0" * 64)
    move_main(work)
    runner.write_inputs(local, "evaluate")
    assistant = local.run_dir("evaluate") / "inputs" / "assistant"
    assert assistant_files(assistant) == assistant_files(local.run_dir("data") / "inputs" / "assistant")
    assert OLD_DESCRIPTION in (assistant / "data" / "flows" / "payments.yml").read_text(encoding="utf-8")
