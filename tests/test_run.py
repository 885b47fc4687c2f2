"""`ftrecipe run`: the example recipe end to end on this machine (tiny model, offline), the phase cache,
one-line errors for broken recipes, Ctrl-C, and the pure pieces (progress lines, input digests)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from ftrecipe.api import load_recipe
from ftrecipe.api.crd import custom_resource_definition
from ftrecipe.cli.main import main
from ftrecipe.controller.manifests import JOB_PATHS
from ftrecipe.local import runner
from ftrecipe.local.display import LineDisplay, LiveDisplay, duration, result_line
from ftrecipe.local.layout import resolve
from ftrecipe.local.progress import Counted, Note, Steps, parse_line
from ftrecipe.local.runner import phase_args
from ftrecipe.phases.commands import base_model_arg, data_args, evaluate_args, train_args
from ftrecipe.plan.cache_key import Phase
from ftrecipe.plan.planner import ObservedJob, World, job_name, plan
from ftrecipe.plan.status import compute_status
from ftrecipe.storage import S3Settings, bundle_complete, join, parse_location, publish_bundle
from ftrecipe.termination import decode
from support.crd_schema import api_server_violations
from support.moneybank import EXAMPLE
from support.s3 import S3Server

ROOT = Path(__file__).resolve().parents[1]
RECIPE = EXAMPLE / "recipe.yaml"
# Two test files instead of all: the same pipeline on 17 data points, so the whole recipe runs in seconds.
SMALL_TESTS = ["e2e_tests/accounts.yml", "e2e_tests/payments/payees.yml"]
TRACEBACK = "Traceback (most recent call last)"


def set_field(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def example_recipe(folder: Path, model: Path, assistant: Path = EXAMPLE, **changes: Any) -> Path:
    """The example recipe, moved to ``folder``: its paths point at the example assistant, ``model`` and an
    output folder inside ``folder``; ``changes`` set more spec fields (``training__gpus=0``)."""
    data = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    spec = data["spec"]
    spec["assistant"]["source"]["local"]["path"] = str(assistant)
    spec["training"]["baseModel"]["local"]["path"] = str(model)
    spec["output"]["local"]["path"] = "output"
    for key, value in changes.items():
        set_field(spec, key.replace("__", "."), value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def fake_model(folder: Path) -> Path:
    """Enough of a saved model for planning (a config.json); nothing loads it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama"}\n', encoding="utf-8")
    return folder


def ftrecipe(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftrecipe.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_status(workdir: Path) -> dict[str, Any]:
    status: dict[str, Any] = yaml.safe_load((workdir / "status.yaml").read_text(encoding="utf-8"))
    return status


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_example_recipe_end_to_end_then_cached(tmp_path: Path, tiny_model: Path) -> None:
    recipe = example_recipe(
        tmp_path,
        tiny_model,
        assistant__e2eTests=SMALL_TESTS,
        training__hyperparameters__epochs=1,
        training__hyperparameters__evalEverySteps=2,
        evaluation__maxNewTokens=8,
    )
    workdir = tmp_path / "work"
    first = ftrecipe("run", str(recipe), "--workdir", str(workdir))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert TRACEBACK not in first.stdout + first.stderr

    local = resolve(load_recipe(recipe), recipe, workdir)
    data, train, evaluate = (Path(local.prefixes[p]) for p in ("data", "train", "evaluate"))
    for bundle in (data, train, evaluate):
        assert bundle_complete(bundle), bundle
    assert (data / "coverage" / "flows.md").read_text().strip()
    assert (data / "4_train_test_split" / "ft_splits" / "train.jsonl").read_text().strip()
    assert (train / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((train / "adapter_config.json").read_text())["peft_type"] == "LORA"
    metrics = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
    assert any(row["eval_loss"] is not None for row in metrics)
    assert (train / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert (
        f"--lora-modules {local.name}=" in (train / "README.md").read_text()
    )  # served under the recipe's name
    evaluation = json.loads((evaluate / "eval.json").read_text())
    assert 0.0 <= evaluation["command_accuracy"] <= 1.0
    assert (evaluate / "eval.md").read_text().strip()
    for phase in ("data", "train", "evaluate"):  # each phase wrote its report where we pointed it
        report = decode((local.run_dir(phase) / "report.json").read_text())
        assert report is not None and report.ok, phase

    status = read_status(workdir)
    assert status["phase"] == "Succeeded"
    assert {kind: c["status"] for kind, c in conditions(status).items()} == {
        "DataPrepared": "True",
        "Trained": "True",
        "Evaluated": "True",
        "Ready": "True",
    }
    assert status["dataPreparation"]["datasetURI"] == str(data) + "/"
    assert status["dataPreparation"]["summary"]["numTrainDataPoints"] > 0
    assert status["training"]["adapterURI"] == str(train) + "/"
    assert status["training"]["step"] == status["training"]["totalSteps"] > 0
    assert status["evaluation"]["reportURI"] == str(evaluate) + "/"
    assert 0.0 <= status["evaluation"]["commandAccuracy"] <= 1.0
    assert not any(status[s]["cached"] for s in ("dataPreparation", "training", "evaluation"))
    # The status is the operator's: the API server would take the example recipe with it as its status.
    manifest = {**yaml.safe_load(RECIPE.read_text()), "status": status}
    assert api_server_violations(custom_resource_definition(), manifest) == []
    summary = first.stdout
    for where in ("coverage/flows.md", "loss_curve.png", "metrics.jsonl", "eval.md", "status.yaml"):
        assert where in summary, where
    turns = status["dataPreparation"]["summary"]["numValDataPoints"]
    assert f"evaluate     scoring {turns}/{turns} turns" in first.stdout  # evaluate's progress lines, shown

    started = time.monotonic()
    second = ftrecipe("run", str(recipe), "--workdir", str(workdir))
    seconds = time.monotonic() - started
    assert second.returncode == 0, second.stdout + second.stderr
    assert seconds < 15, f"a fully cached run took {seconds:.1f}s"
    assert second.stdout.count("cached: ") == 3
    again = read_status(workdir)
    assert again["phase"] == "Succeeded"
    assert all(again[s]["cached"] for s in ("dataPreparation", "training", "evaluation"))
    assert {c["reason"] for kind, c in conditions(again).items() if kind != "Ready"} == {"Cached"}
    assert again["evaluation"]["commandAccuracy"] == status["evaluation"]["commandAccuracy"]

    # A quality gate above the figures: checked on the cached evaluation's figures, nothing runs again.
    accuracy = status["evaluation"]["commandAccuracy"]
    assert accuracy < 1.0  # a random model
    gated = yaml.safe_load(recipe.read_text())
    gated["spec"]["evaluation"]["minCommandAccuracy"] = (accuracy + 1.0) / 2
    recipe.write_text(yaml.safe_dump(gated))
    third = ftrecipe("run", str(recipe), "--workdir", str(workdir))
    assert third.returncode != 0 and third.stdout.count("cached: ") == 3, third.stdout + third.stderr
    failed = read_status(workdir)
    assert failed["phase"] == "Failed" and conditions(failed)["Ready"]["reason"] == "QualityGateNotMet"
    assert "below spec.evaluation.minCommandAccuracy" in failed["message"]

    forced = ftrecipe("run", str(recipe), "--workdir", str(workdir), "--from-phase", "train", "--dry-run")
    assert forced.returncode == 0, forced.stderr
    assert "prepare-data cached: " in forced.stdout
    assert "would run: ftrecipe train " in forced.stdout
    assert "would run: ftrecipe evaluate " in forced.stdout


@pytest.mark.slow
def test_ctrl_c_stops_training_with_a_checkpoint_and_says_so(tmp_path: Path, tiny_model: Path) -> None:
    recipe = example_recipe(
        tmp_path,
        tiny_model,
        assistant__e2eTests=SMALL_TESTS,
        training__hyperparameters__epochs=200,
        evaluation__enabled=False,
    )
    workdir = tmp_path / "work"
    process = subprocess.Popen(
        [sys.executable, "-m", "ftrecipe.cli.main", "run", str(recipe), "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status = read_status(workdir) if (workdir / "status.yaml").is_file() else {}
            if (status.get("training") or {}).get("step"):
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.5)
        else:
            pytest.fail("training did not report progress in time")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, out + err
    assert TRACEBACK not in out + err
    status = read_status(workdir)
    assert status["phase"] == "Failed"
    trained = conditions(status)["Trained"]
    assert (trained["status"], trained["reason"]) == ("False", "Interrupted")
    assert "Ctrl-C" in trained["message"]
    assert "checkpoint" in trained["message"]  # what train itself said, from its report
    local = resolve(load_recipe(recipe), recipe, workdir)
    checkpoints = Path(local.prefixes["train"]) / "checkpoints"
    assert any(bundle_complete(step) for step in checkpoints.iterdir()), "no checkpoint to resume from"
    assert not bundle_complete(local.prefixes["train"])


# --------------------------------------------------------------------------------------------- bad input


def test_unknown_flow_in_a_test_fails_data_preparation_in_one_line(tmp_path: Path) -> None:
    assistant = tmp_path / "assistant"
    shutil.copytree(EXAMPLE, assistant, ignore=shutil.ignore_patterns("recipe.yaml", ".*"))
    tests = assistant / "e2e_tests" / "accounts.yml"
    tests.write_text(
        tests.read_text().replace("flow_started: check_balance", "flow_started: check_balanse", 1)
    )
    recipe = example_recipe(tmp_path, fake_model(tmp_path / "model"), assistant=assistant)
    workdir = tmp_path / "work"
    result = ftrecipe("run", str(recipe), "--workdir", str(workdir))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "accounts.yml" in lines[0] and "unknown flow 'check_balanse'" in lines[0]
    assert TRACEBACK not in result.stdout + result.stderr
    status = read_status(workdir)
    assert status["phase"] == "Failed"
    assert not [c for c in status["conditions"] if c["status"] == "True"]
    assert conditions(status)["DataPrepared"]["reason"] == "JobFailed"
    local = resolve(load_recipe(recipe), recipe, workdir)
    assert not bundle_complete(local.prefixes["data"])


def _bad_yaml(path: Path) -> None:
    path.write_text(path.read_text().replace("  training:\n", "  training: [\n", 1))


def _unknown_field(path: Path) -> None:
    path.write_text(path.read_text().replace("    gpus: 0\n", "    gpus: 0\n    gpu: 1\n", 1))


def _missing_file(path: Path) -> None:
    path.unlink()


def _no_assistant(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    data["spec"]["assistant"]["source"]["local"]["path"] = "no-such-assistant"
    path.write_text(yaml.safe_dump(data))


def _no_model(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    data["spec"]["training"]["baseModel"]["local"]["path"] = "no-such-model"
    path.write_text(yaml.safe_dump(data))


def _cluster_source(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    data["spec"]["assistant"]["source"] = {"pvc": {"claimName": "assistants"}}
    path.write_text(yaml.safe_dump(data))


def _two_nodes(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    data["spec"]["training"].update(nodes=2, gpus=1)  # valid for the operator (a JobSet), not here
    path.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize(
    ("breaks", "expected"),
    [
        (_missing_file, "cannot read the recipe"),
        (_bad_yaml, "invalid YAML"),
        (_unknown_field, "spec.training: unknown field 'gpu'"),
        (_no_assistant, "spec.assistant.source.local.path: no-such-assistant is not a folder"),
        (_no_model, "ftrecipe make-tiny-model"),
        (_cluster_source, "spec.assistant.source.pvc exists only in a cluster"),
        (
            _two_nodes,
            "spec.training.nodes: 2 nodes need a cluster; `ftrecipe run` trains on this one machine",
        ),
    ],
    ids=[
        "missing-file",
        "bad-yaml",
        "unknown-field",
        "no-assistant",
        "no-model",
        "cluster-source",
        "two-nodes",
    ],
)
def test_broken_recipes_get_one_line_and_nothing_complete(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    breaks: Any,
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = example_recipe(tmp_path, fake_model(tmp_path / "model"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "status.yaml").write_text("phase: Succeeded\n")  # an earlier run's
    breaks(recipe)
    code = main(["run", str(recipe), "--workdir", str(workdir)])
    captured = capsys.readouterr()
    assert code == 2
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err
    assert expected in lines[0]
    status = read_status(workdir)
    assert status["phase"] == "Failed"
    assert conditions(status)["Ready"]["reason"] == "InvalidRecipe"
    assert not [c for c in status["conditions"] if c["status"] == "True"]
    assert not (tmp_path / "output").exists()


def test_from_phase_must_be_a_phase_of_the_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = example_recipe(tmp_path, fake_model(tmp_path / "model"), evaluation__enabled=False)
    code = main(["run", str(recipe), "--workdir", str(tmp_path / "work"), "--from-phase", "evaluate"])
    assert code == 2
    assert "spec.evaluation.enabled is false" in capsys.readouterr().err


def demo_step(number: int) -> str:
    """The commands of step ``number`` of scripts/demo.sh, as the script has them."""
    lines = (ROOT / "scripts" / "demo.sh").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f'echo "== {number}. '))
    # Up to the `echo` that prints the blank line before the next step's title.
    end = next(i for i in range(start + 1, len(lines)) if lines[i] == "echo")
    return "\n".join(lines[start + 1 : end])


def test_demo_step_2_shows_the_error_of_its_broken_recipe(tmp_path: Path) -> None:
    """The README's demo, step 2, run as the script runs it: the one line is about what the copy breaks,
    not about where the copy was written."""
    step = demo_step(2)
    env = {**os.environ, "BIN": str(Path(sys.executable).parent), "OUT": str(tmp_path / "demo")}
    env["RECIPE"] = "examples/moneybank/recipe.yaml"
    (tmp_path / "demo").mkdir()
    result = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{step}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr  # `|| true`: the demo goes on
    assert error_lines(result.stdout + result.stderr) == [
        f"{tmp_path}/demo/broken-recipe.yaml: spec: dataPreparation.numRephrases > 0 needs commandGenerator.llm "
        "(or assistant.config naming the LLM) to check the rephrasings"
    ]


# --------------------------------------------------------------------------------------------- the plan


def test_dry_run_prints_each_phase_command_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = example_recipe(tmp_path, fake_model(tmp_path / "model"))
    workdir = tmp_path / "work"
    assert main(["run", str(recipe), "--workdir", str(workdir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    commands = [line.split("would run: ", 1)[1] for line in out.splitlines() if "would run: " in line]
    assert [command.split()[1] for command in commands] == ["prepare-data", "train", "evaluate"]
    assert not workdir.exists()
    assert not (tmp_path / "output").exists()


def test_local_commands_are_the_jobs_commands_with_local_paths(tmp_path: Path) -> None:
    """Same builders as the Jobs: the same options in the same order; only paths differ."""
    recipe = example_recipe(tmp_path, fake_model(tmp_path / "model"))
    local = resolve(load_recipe(recipe), recipe, tmp_path / "work")
    spec, prefixes = local.spec, local.prefixes
    spec_for_job = spec.model_copy(
        update={"training": spec.training.model_copy(update={"base_model": _hub_model()})}
    )
    jobs: dict[Phase, list[str]] = {
        "data": data_args(spec, "s3://b/data/", JOB_PATHS),
        "train": train_args(
            spec, "s3://b/train/", "s3://b/data/", base_model_arg(spec_for_job), JOB_PATHS, local.name
        ),
        # The example recipe replays its held-out E2E tests (evaluation.e2e): the assistant's paths too.
        "evaluate": evaluate_args(
            spec, "s3://b/eval/", "s3://b/data/", "s3://b/train/", "hf:org/model", paths=JOB_PATHS
        ),
    }
    for phase, job in jobs.items():
        mine = phase_args(local, phase)
        assert [a for a in mine if a.startswith("--")] == [a for a in job if a.startswith("--")], phase
        assert len(mine) == len(job)
        for ours, theirs in zip(mine, job, strict=True):
            is_path = theirs.startswith(("/workspace", "s3://", "hf:"))
            assert ours == theirs or is_path, (phase, ours, theirs)
            if is_path:
                assert ours.startswith(str(tmp_path)) or ours.startswith(str(EXAMPLE)), (phase, ours)
    assert phase_args(local, "train")[phase_args(local, "train").index("--data") + 1] == prefixes["data"]
    evaluate = phase_args(local, "evaluate")
    assert evaluate[evaluate.index("--adapter") + 1] == prefixes["train"]
    assert evaluate[evaluate.index("--max-new-tokens") + 1] == str(spec.evaluation.max_new_tokens)


def _hub_model() -> Any:
    from ftrecipe.api.v1alpha1 import BaseModelSource

    return BaseModelSource.model_validate({"huggingFace": {"id": "org/model"}})


def test_bundle_names_follow_the_local_files_not_the_recipe_file(tmp_path: Path) -> None:
    assistant = tmp_path / "assistant"
    shutil.copytree(EXAMPLE, assistant, ignore=shutil.ignore_patterns("recipe.yaml", ".*"))
    model = fake_model(tmp_path / "model")
    recipe = example_recipe(assistant, model, assistant=assistant)  # the recipe inside the assistant
    workdir = assistant / ".ftrecipe" / "moneybank"

    def hashes() -> dict[Phase, str]:
        return dict(resolve(load_recipe(recipe), recipe, workdir).bundle_hashes)

    first = hashes()
    (workdir / "runs").mkdir(parents=True)
    (workdir / "runs" / "llm.yml").write_text("syntax: v2\n")  # the run's own files do not count
    (assistant / "README.md").write_text("docs change nothing\n")
    data = yaml.safe_load(recipe.read_text())
    data["spec"]["training"]["hyperparameters"]["epochs"] = 5  # the recipe file itself: training only
    recipe.write_text(yaml.safe_dump(data))
    second = hashes()
    assert second["data"] == first["data"]
    assert second["train"] != first["train"]
    tests = assistant / "e2e_tests" / "cards.yml"
    tests.write_text(tests.read_text() + "\n# edited\n")
    assert hashes()["data"] != second["data"]
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}\n')
    assert hashes()["train"] != second["train"]


def test_s3_output_is_the_cache_and_a_forced_train_forgets_its_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_bucket: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith(("AWS_", "FTRECIPE_S3_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_bucket.access_key)  # credentials: the environment's
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_bucket.secret_key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    output = {"uri": f"s3://{s3_bucket.bucket}/ftrecipe/", "endpoint": s3_bucket.endpoint_url}
    recipe = example_recipe(tmp_path, fake_model(tmp_path / "model"))
    data = yaml.safe_load(recipe.read_text())
    data["spec"]["output"] = {"s3": {**output, "region": s3_bucket.region, "forcePathStyle": True}}
    recipe.write_text(yaml.safe_dump(data))
    local = resolve(load_recipe(recipe), recipe, tmp_path / "work")
    assert local.prefixes["data"].startswith(f"s3://{s3_bucket.bucket}/ftrecipe/moneybank/data-")
    assert local.env["train"]["AWS_ENDPOINT_URL"] == s3_bucket.endpoint_url  # the spec's store settings
    settings = S3Settings.from_env({**os.environ, **local.env["data"]})

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "result_summary.yaml").write_text("num_ft_data_points: 1\n")
    publish_bundle(bundle, local.prefixes["data"], producer="test", inputs_hash="x", settings=settings)
    step = join(parse_location(local.prefixes["train"]), "checkpoints/step-1")
    publish_bundle(bundle, step, producer="test", inputs_hash="x", settings=settings)

    assert main(["run", str(recipe), "--workdir", str(tmp_path / "work"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"prepare-data cached: {local.prefixes['data']}" in out
    assert "would run: ftrecipe train " in out

    runner.forget(local, frozenset({"train", "evaluate"}))
    assert not bundle_complete(step, settings)
    assert bundle_complete(local.prefixes["data"], settings)


def test_a_git_assistant_is_cloned_into_the_run_folder(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(EXAMPLE, repository / "bot", ignore=shutil.ignore_patterns("recipe.yaml", ".*"))
    for command in (["init", "--quiet", "--initial-branch", "main"], ["add", "."]):
        subprocess.run(["git", *command], cwd=repository, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "--quiet", "-m", "bot"],
        cwd=repository,
        check=True,
    )
    recipe = example_recipe(tmp_path, fake_model(tmp_path / "model"))
    data = yaml.safe_load(recipe.read_text())
    data["spec"]["assistant"]["source"] = {"git": {"url": f"file://{repository}", "path": "bot"}}
    recipe.write_text(yaml.safe_dump(data))
    local = resolve(load_recipe(recipe), recipe, tmp_path / "work")
    assert local.assistant is None  # nothing to read before the data phase runs
    runner.write_inputs(local, "data")
    args = phase_args(local, "data")
    assistant = Path(args[args.index("--assistant") + 1])
    assert (assistant / "e2e_tests" / "accounts.yml").is_file()
    assert assistant.is_relative_to(local.run_dir("data"))
    assert yaml.safe_load(Path(args[args.index("--llm-config") + 1]).read_text()) == {}  # nothing overridden
    assert Path(args[args.index("--config") + 1]) == assistant / "config.yml"
    assert Path(args[args.index("--endpoints") + 1]) == assistant / "endpoints.yml"


# --------------------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "annotate [3/38] e2e_tests/accounts.yml::check_balance: ok",
            Counted("annotate", 3, 38, "e2e_tests/accounts.yml::check_balance: ok"),
        ),
        ("rephrase [1/2]", Counted("rephrase", 1, 2)),
        (
            '{"event": "progress", "step": 4, "total_steps": 9, "epoch": 0.5, "train_loss": 6.1, "eval_loss": null, "eta_seconds": 3.5}',
            Steps(step=4, total_steps=9, epoch=0.5, train_loss=6.1, eta_seconds=3.5),
        ),
        ('{"event": "progress", "step": 4, "train_loss": NaN}', Steps(step=4)),
        ('{"event": "progress", "stage": "generate", "done": 8, "total": 20}', Counted("generate", 8, 20)),
        (
            '{"event": "progress", "stage": "generate", "done": 8, "total": 20, "eta_seconds": 12.5}',
            Counted("generate", 8, 20, eta_seconds=12.5),
        ),
        (
            '{"event": "data", "train_examples": 11, "val_examples": 6, "dropped_too_long": 1}',
            Note("11 train / 6 validation examples, 1 dropped as too long"),
        ),
        ("resuming from step 40", Note("resuming from step 40")),
        ('{"event": "done", "steps": 9}', None),
        ("{not json", None),
        ("Failed to load CPU gemm_4bit_forward from kernels-community", None),
    ],
    ids=[
        "annotate",
        "no-detail",
        "train",
        "nan",
        "counted-json",
        "evaluate-with-eta",
        "data",
        "resume",
        "done",
        "broken-json",
        "noise",
    ],
)
def test_progress_lines(line: str, expected: object) -> None:
    assert parse_line(line) == expected


def test_both_displays_show_evaluation_progress(tmp_path: Path) -> None:
    recipe = example_recipe(tmp_path, fake_model(tmp_path / "model"))
    local = resolve(load_recipe(recipe), recipe, tmp_path / "work")
    event = parse_line(
        '{"event": "progress", "stage": "generate", "done": 120, "total": 480, "eta_seconds": 125.0}'
    )
    assert event is not None

    lines = io.StringIO()
    plain = LineDisplay(lines)
    plain.begin(local, ["evaluate"])
    plain.started("evaluate", tmp_path / "output.log")
    plain.progress("evaluate", event)
    assert lines.getvalue().splitlines()[-1] == "evaluate     scoring 120/480 turns · ETA 2m05s"

    screen = io.StringIO()
    live = LiveDisplay(Console(file=screen, width=120))
    live.begin(local, ["evaluate"])
    live.started("evaluate", tmp_path / "output.log")
    live.progress("evaluate", event)
    live.close()  # away from a terminal, rich prints the last frame when it stops
    row = screen.getvalue().splitlines()[-1]
    assert row.split()[1:3] == ["evaluate", "running"]
    assert row.endswith(" scoring 120/480 turns · ETA 2m05s")
    assert "━" * 6 in row and "━" * 7 not in row  # a quarter of the 24-wide bar


def test_evaluation_progress_reaches_the_status_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "STATUS_EVERY_SECONDS", 0.0)  # every line is written, none held back
    recipe = example_recipe(tmp_path, fake_model(tmp_path / "model"))
    local = resolve(load_recipe(recipe), recipe, tmp_path / "work")
    trained = tuple(
        ObservedJob(job_name(local.name, phase, local.hashes[phase]), phase, local.hashes[phase], "succeeded")
        for phase in ("data", "train")
    )
    actions = plan(local.name, local.spec, World(jobs=trained), in_cluster=False)
    evaluating = compute_status(
        local.spec, local.generation, actions, prefixes=local.prefixes, now=datetime.now(UTC)
    )
    eval_job = job_name(local.name, "evaluate", local.hashes["evaluate"])
    assert evaluating.phase == "Evaluating" and evaluating.message == f"evaluation running (Job {eval_job})"
    display = LineDisplay(io.StringIO())
    display.begin(local, ["evaluate"])
    display.started("evaluate", tmp_path / "output.log")
    run = runner.Runner(local, display, frozenset())
    run.save(evaluating)

    run.on_line("evaluate", "loading the adapter")
    run.on_line("evaluate", '{"event": "progress", "step": 4, "total_steps": 9}')  # not evaluate's kind
    assert read_status(local.workdir) == evaluating.model_dump(by_alias=True, exclude_none=True, mode="json")
    run.on_line(
        "evaluate",
        '{"event": "progress", "stage": "generate", "done": 120, "total": 480, "eta_seconds": 125.3}',
    )
    written = read_status(local.workdir)
    assert written["message"] == f"evaluation running (Job {eval_job}): scoring 120/480 turns, ETA 2m05s"
    expected = {"stage": "scoring", "turnsDone": 120, "totalTurns": 480, "etaSeconds": 125}
    assert written["evaluation"].items() >= expected.items()
    run.on_line(
        "evaluate", '{"event": "progress", "stage": "e2e", "done": 5, "total": 19, "eta_seconds": 30}'
    )
    written = read_status(local.workdir)
    assert written["message"] == f"evaluation running (Job {eval_job}): E2E tests 5/19 turns, ETA 0m30s"
    expected = {"stage": "e2e", "turnsDone": 5, "totalTurns": 19, "etaSeconds": 30}
    assert written["evaluation"].items() >= expected.items()
    document = {
        "apiVersion": "ftrecipe.dev/v1alpha1",
        "kind": "FinetuneRecipe",
        "metadata": {"name": local.name},
    }
    document |= {"spec": yaml.safe_load(recipe.read_text())["spec"], "status": written}
    assert api_server_violations(custom_resource_definition(), document) == []


def test_result_lines_and_durations() -> None:
    data = {
        "num_annotated_conversations": 35,
        "num_input_e2e_tests": 38,
        "num_ft_data_points": 91,
        "num_train_data_points": 71,
        "num_val_data_points": 20,
        "num_passing_rephrased_user_messages": 0,
    }
    assert result_line("data", data) == "35/38 tests annotated, 91 data points (71 train, 20 validation)"
    assert (
        result_line("train", {"step": 54, "train_loss": 5.8181, "eval_loss": None})
        == "54 steps, train loss 5.818"
    )
    assert (
        result_line("evaluate", {"command_accuracy": 0.875, "num_turns": 20})
        == "command accuracy 87.5% on 20 turns"
    )
    assert result_line("evaluate", {}) == ""
    assert [duration(s) for s in (3.21, 65, 7300)] == ["3.2s", "1m05s", "2h01m"]


def test_status_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "status.yaml"
    status = runner.invalid_status("broken", 1, datetime(2026, 1, 1, tzinfo=UTC))
    runner.write_status(path, status, "demo")
    assert runner.read_status(path) == status
    assert [p.name for p in tmp_path.iterdir()] == ["status.yaml"]
    assert os.access(path, os.R_OK)
