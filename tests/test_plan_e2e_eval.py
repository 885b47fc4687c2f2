"""evaluation.e2e and evaluation.minE2EPassRate in the plan (issue 23): the evaluate hash, the gate on
fresh, reused and remembered figures, the status figures and message, what the evaluate phase fetches,
and its command line in a Job and in `ftrecipe run`. Pure functions; expected values written out."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.api import load_recipe, parse_recipe
from ftrecipe.api.crd import custom_resource_definition
from ftrecipe.api.v1alpha1 import FinetuneRecipeSpec
from ftrecipe.cli.main import main
from ftrecipe.controller.manifests import JOB_PATHS
from ftrecipe.local.layout import resolve
from ftrecipe.local.runner import phase_args, write_inputs
from ftrecipe.phases import inputs
from ftrecipe.phases.commands import evaluate_args
from ftrecipe.plan.cache_key import phase_hashes, phase_prefix
from ftrecipe.plan.planner import (
    Done,
    Fail,
    ObservedJob,
    Reuse,
    Succeed,
    World,
    e2e_quality_gate,
    evaluation_gate,
    job_name,
    plan,
)
from ftrecipe.plan.status import compute_status, remembered
from ftrecipe.termination import PhaseReport
from support.crd_schema import api_server_violations

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = ROOT / "examples" / "recipes" / "minimal.yaml"
MONEYBANK = ROOT / "examples" / "moneybank"
# examples/recipes/minimal.yaml's pinned hashes (tests/test_phase_hashes_pinned.py), written again.
MINIMAL_EVALUATE = "f2bb9672e46523e483492fe196300ffeab0504eeb6174f8d3570361f1a7c052c"
T0 = datetime(2026, 12, 3, 14, 0, tzinfo=UTC)


def spec(**evaluation: Any) -> FinetuneRecipeSpec:
    data = yaml.safe_load(MINIMAL.read_text())
    if evaluation:
        data["spec"]["evaluation"] = evaluation
    return parse_recipe(data).spec


def report(**figures: Any) -> PhaseReport:
    return PhaseReport(True, "scored", figures)


def world(gated: FinetuneRecipeSpec, evaluation: PhaseReport | None) -> World:
    """Data and train done; the evaluation Job succeeded with ``evaluation`` as its report."""
    hashes = phase_hashes(gated)
    jobs = [
        ObservedJob(job_name("minimal", p, hashes[p]), p, hashes[p], "succeeded")
        for p in ("data", "train")  # type: ignore[misc]
    ]
    h = hashes["evaluate"]
    jobs.append(
        ObservedJob(job_name("minimal", "evaluate", h), "evaluate", h, "succeeded", report=evaluation)
    )
    return World(tuple(jobs))


# --------------------------------------------------------------------------------------------- hashes


def test_e2e_changes_only_the_evaluate_hash_and_the_gate_changes_none() -> None:
    off, on = phase_hashes(spec()), phase_hashes(spec(e2e=True))
    assert off["evaluate"] == MINIMAL_EVALUATE
    assert phase_hashes(spec(e2e=False)) == off  # the default written out: nothing re-runs
    assert (on["data"], on["train"]) == (off["data"], off["train"])
    assert on["evaluate"] != off["evaluate"]  # a report without E2E figures is never reused for e2e on
    assert phase_hashes(spec(e2e=True, minE2EPassRate=0.9)) == on
    assert phase_hashes(spec(e2e=True, minE2EPassRate=0.5)) == on


# --------------------------------------------------------------------------------------------- the gate


@pytest.mark.parametrize(
    ("minimum", "figures", "message"),
    [
        (0.8, {"e2e_pass_rate": 0.8, "e2e_tests": 10, "e2e_passed": 8}, None),  # the bound itself passes
        (0.0, {"e2e_pass_rate": 0.0, "e2e_tests": 7, "e2e_passed": 0}, None),
        (
            0.8,
            {"e2e_pass_rate": 6 / 7, "e2e_tests": 7, "e2e_passed": 6},
            None,
        ),
        (
            0.9,
            {"e2e_pass_rate": 6 / 7, "e2e_tests": 7, "e2e_passed": 6},
            "E2E pass rate 0.857 (6 of 7 held-out tests passed) is below spec.evaluation.minE2EPassRate 0.9",
        ),
        (
            0.5,
            {"e2e_pass_rate": 0.25},
            "E2E pass rate 0.250 is below spec.evaluation.minE2EPassRate 0.5",
        ),
        (
            0.5,
            {"command_accuracy": 0.99},
            "evaluation reported no E2E pass rate (it is measured with evaluation.e2e: true); "
            "spec.evaluation.minE2EPassRate is 0.5",
        ),
    ],
)
def test_e2e_quality_gate(minimum: float, figures: dict[str, Any], message: str | None) -> None:
    failed = e2e_quality_gate(minimum, report(**figures))
    if message is None:
        assert failed is None
    else:
        assert failed == Fail("evaluate", "QualityGateNotMet", message)


def test_both_gates_are_named_when_both_fall_short() -> None:
    gated = spec(minCommandAccuracy=0.9, e2e=True, minE2EPassRate=0.8)
    figures = report(command_accuracy=0.7, e2e_pass_rate=0.5, e2e_tests=4, e2e_passed=2)
    assert evaluation_gate(gated, figures) == Fail(
        "evaluate",
        "QualityGateNotMet",
        "command accuracy 0.700 is below spec.evaluation.minCommandAccuracy 0.9; "
        "E2E pass rate 0.500 (2 of 4 held-out tests passed) is below spec.evaluation.minE2EPassRate 0.8",
    )
    only_e2e = report(command_accuracy=0.95, e2e_pass_rate=0.5, e2e_tests=4, e2e_passed=2)
    failed = evaluation_gate(gated, only_e2e)
    assert failed is not None and failed.message.startswith("E2E pass rate 0.500")
    assert evaluation_gate(gated, report(command_accuracy=0.95, e2e_pass_rate=0.75)) is not None
    assert evaluation_gate(gated, report(command_accuracy=0.95, e2e_pass_rate=0.8)) is None
    # e2e on without its gate: the pass rate is shown, never required.
    assert evaluation_gate(spec(e2e=True), report(command_accuracy=0.1, e2e_pass_rate=0.0)) is None


def test_the_plan_fails_a_finished_evaluation_below_the_e2e_gate() -> None:
    gated = spec(e2e=True, minE2EPassRate=0.8)
    low = report(command_accuracy=0.95, e2e_pass_rate=0.6, e2e_tests=5, e2e_passed=3)
    actions = plan("minimal", gated, world(gated, low))
    assert actions[-1] == Fail(
        "evaluate",
        "QualityGateNotMet",
        "E2E pass rate 0.600 (3 of 5 held-out tests passed) is below spec.evaluation.minE2EPassRate 0.8",
    )
    high = report(command_accuracy=0.95, e2e_pass_rate=1.0, e2e_tests=5, e2e_passed=5)
    assert plan("minimal", gated, world(gated, high))[-1] == Succeed()


def test_a_reused_evaluation_is_gated_on_its_cached_figures() -> None:
    """The bundle of an identical evaluation is reused, and a gate changed since is checked on the figures
    its manifest carries: tightening the gate fails the recipe without running anything."""
    loose, tight = spec(e2e=True, minE2EPassRate=0.5), spec(e2e=True, minE2EPassRate=0.9)
    hashes = phase_hashes(loose)
    assert phase_hashes(tight) == hashes
    figures = report(command_accuracy=0.95, e2e_pass_rate=0.75, e2e_tests=8, e2e_passed=6)
    reused = World(complete=frozenset(hashes.values()), reports={hashes["evaluate"]: figures})
    assert plan("minimal", loose, reused)[-2:] == [Reuse("evaluate", hashes["evaluate"], figures), Succeed()]
    assert plan("minimal", tight, reused)[-2:] == [
        Reuse("evaluate", hashes["evaluate"], figures),
        Fail(
            "evaluate",
            "QualityGateNotMet",
            "E2E pass rate 0.750 (6 of 8 held-out tests passed) is below spec.evaluation.minE2EPassRate 0.9",
        ),
    ]


def test_a_reused_evaluation_without_the_gated_figure_runs_again() -> None:
    """A complete bundle whose manifest shows no E2E pass rate cannot pass or fail the E2E gate blindly:
    the evaluation runs again (the same as for command accuracy)."""
    gated = spec(e2e=True, minE2EPassRate=0.5)
    hashes = phase_hashes(gated)
    without = World(
        complete=frozenset(hashes.values()), reports={hashes["evaluate"]: report(command_accuracy=0.9)}
    )
    last = plan("minimal", gated, without)[-1]
    assert (type(last).__name__, last.phase) == ("CreateJob", "evaluate")  # type: ignore[union-attr]
    # Without the E2E gate the same bundle is reused as it is.
    shown = spec(e2e=True)
    assert plan("minimal", shown, without)[-1] == Succeed()


# --------------------------------------------------------------------------------------------- status

E2E_FIGURES = {
    "command_accuracy": 0.93,
    "per_command_f1": {"start flow": 0.97},
    "num_turns": 40,
    "e2e_tests": 7,
    "e2e_passed": 6,
    "e2e_pass_rate": 6 / 7,
}


def test_the_status_shows_the_pass_rate_and_the_ready_message_names_it() -> None:
    gated = spec(e2e=True, minE2EPassRate=0.8)
    hashes = phase_hashes(gated)
    prefixes = {p: phase_prefix("s3://ml-artifacts/ftrecipe", "minimal", p, hashes[p]) for p in hashes}
    status = compute_status(
        gated, 2, plan("minimal", gated, world(gated, report(**E2E_FIGURES))), prefixes=prefixes, now=T0
    )
    assert status.phase == "Succeeded"
    assert (
        status.message == "the adapter is ready: command accuracy 0.930, E2E pass rate 0.857 (6 of 7 tests)"
    )
    assert status.evaluation is not None
    assert (status.evaluation.e2e_tests, status.evaluation.e2e_passed) == (7, 6)
    assert status.evaluation.e2e_pass_rate == 6 / 7
    dumped = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert {k: dumped["evaluation"][k] for k in ("e2eTests", "e2ePassed", "e2ePassRate")} == {
        "e2eTests": 7,
        "e2ePassed": 6,
        "e2ePassRate": 6 / 7,
    }
    document = {**yaml.safe_load(MINIMAL.read_text()), "status": dumped}
    assert api_server_violations(custom_resource_definition(), document) == []
    # The Jobs are gone (their TTL): the remembered figures hold the pass rate, and a tightened gate is
    # checked on them.
    finished, failed = remembered("minimal", gated, status, prefixes)
    assert failed == {}
    kept = finished[hashes["evaluate"]].figures
    assert (kept["e2e_tests"], kept["e2e_passed"], kept["e2e_pass_rate"]) == (7, 6, 6 / 7)
    tight = spec(e2e=True, minE2EPassRate=0.9)
    again = plan("minimal", tight, World(finished=finished))
    assert again[-2] == Done("evaluate", hashes["evaluate"], finished[hashes["evaluate"]])
    assert again[-1] == Fail(
        "evaluate",
        "QualityGateNotMet",
        "E2E pass rate 0.857 (6 of 7 held-out tests passed) is below spec.evaluation.minE2EPassRate 0.9",
    )


def test_the_ready_message_without_e2e_figures() -> None:
    plain = spec()
    hashes = phase_hashes(plain)
    prefixes = {p: phase_prefix("s3://x", "minimal", p, hashes[p]) for p in hashes}
    accuracy_only = report(command_accuracy=0.9, num_turns=40)
    status = compute_status(
        plain, 1, plan("minimal", plain, world(plain, accuracy_only)), prefixes=prefixes, now=T0
    )
    assert status.message == "the adapter is ready: command accuracy 0.900"
    assert status.evaluation is not None and status.evaluation.e2e_pass_rate is None
    nothing = compute_status(
        plain, 1, plan("minimal", plain, world(plain, report())), prefixes=prefixes, now=T0
    )
    assert nothing.message == "the adapter is ready"


# --------------------------------------------------------------------------------------------- inputs


def test_the_evaluate_phase_fetches_the_assistant_only_with_e2e(tmp_path: Path) -> None:
    mounted = tmp_path / "configmap"
    mounted.mkdir()
    for name in ("flows.yml", "domain.yml", "config.yml", "endpoints.yml", "command.jinja2"):
        (mounted / name).write_text(f"# {name}\n", encoding="utf-8")
    data = yaml.safe_load(MINIMAL.read_text())
    data["spec"]["assistant"] = {
        "source": {"configMap": {"name": "assistant"}},
        "e2eTests": ["tests-not-needed-here.yml"],  # the replay reads the data bundle's held-out tests
        "config": "config.yml",
        "endpoints": "endpoints.yml",
    }
    data["spec"]["commandGenerator"] = {"promptTemplate": "command.jinja2"}
    data["spec"]["evaluation"] = {"e2e": True}
    on = parse_recipe(data).spec
    env = {inputs.CONFIGMAP_ROOT_ENV: str(mounted)}
    written = inputs.fetch_inputs(on, "evaluate", tmp_path / "on", env)
    assert written == [
        f"{tmp_path / 'on' / 'assistant'}: 5 key(s) of ConfigMap assistant",
        str(tmp_path / "on" / "llm.yml"),
    ]
    assert sorted(p.name for p in (tmp_path / "on" / "assistant").iterdir()) == [
        "command.jinja2",
        "config.yml",
        "domain.yml",
        "endpoints.yml",
        "flows.yml",
    ]
    assert yaml.safe_load((tmp_path / "on" / "llm.yml").read_text()) == {
        "prompt_template": "assistant/command.jinja2"
    }
    data["spec"]["evaluation"] = {"e2e": False}
    assert inputs.fetch_inputs(parse_recipe(data).spec, "evaluate", tmp_path / "off", env) == []
    assert list((tmp_path / "off").iterdir()) == []
    # A path the replay reads and the assistant lacks: one line naming the recipe field.
    (mounted / "endpoints.yml").unlink()
    with pytest.raises(inputs.FetchError) as missing:
        inputs.fetch_inputs(on, "evaluate", tmp_path / "again", env)
    assert str(missing.value) == (
        "assistant.endpoints: endpoints.yml is not among the assistant's files (4 key(s) of ConfigMap "
        "assistant); fix the path or add it"
    )


def test_fetch_inputs_command_for_evaluate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The init container's command as the evaluate Job runs it, with the spec the Job carries."""
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "flows.yml").write_text("flows: {}\n", encoding="utf-8")
    data = yaml.safe_load(MINIMAL.read_text())
    data["spec"]["assistant"] = {"source": {"pvc": {"claimName": "assistant", "path": "s"}}}
    data["spec"]["evaluation"] = {"e2e": True}
    carried = inputs.spec_json(parse_recipe(data).spec)
    assert json.loads(carried)["evaluation"] == {
        "enabled": True,
        "minCommandAccuracy": 0.0,
        "maxNewTokens": 64,
        "e2e": True,
    }
    monkeypatch.setenv(inputs.PVC_ROOT_ENV, str(tmp_path))
    into = tmp_path / "in"
    code = main(["fetch-inputs", "--phase", "evaluate", "--into", str(into), "--spec-json", carried])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in into.iterdir()) == ["assistant", "llm.yml"]
    assert (into / "assistant" / "flows.yml").read_text() == "flows: {}\n"


# --------------------------------------------------------------------------------------------- commands


def test_evaluate_args_in_a_job() -> None:
    data = yaml.safe_load(MINIMAL.read_text())
    data["spec"]["assistant"].update({"config": "config.yml", "endpoints": "rasa/endpoints.yml"})
    data["spec"]["evaluation"] = {"e2e": True, "minE2EPassRate": 0.8, "minCommandAccuracy": 0.7}
    on = parse_recipe(data).spec
    args = evaluate_args(
        on, "s3://b/eval/", "s3://b/data/", "s3://b/train/", "hf:org/m", "/workspace/work", JOB_PATHS
    )
    assert args == [
        "evaluate",
        "--data",
        "s3://b/data/",
        "--base-model",
        "hf:org/m",
        "--adapter",
        "s3://b/train/",
        "--out",
        "s3://b/eval/",
        "--max-new-tokens",
        "64",
        "--e2e",
        "--assistant",
        "/workspace/inputs/assistant",
        "--llm-config",
        "/workspace/inputs/llm.yml",
        "--config",
        "/workspace/inputs/assistant/config.yml",
        "--endpoints",
        "/workspace/inputs/assistant/rasa/endpoints.yml",
        "--work-dir",
        "/workspace/work",
    ]
    # Without e2e: the command line of before, byte for byte (and no paths needed).
    off = spec()
    assert evaluate_args(off, "s3://b/eval/", "s3://b/data/", "s3://b/train/", "hf:org/m") == [
        "evaluate",
        "--data",
        "s3://b/data/",
        "--base-model",
        "hf:org/m",
        "--adapter",
        "s3://b/train/",
        "--out",
        "s3://b/eval/",
        "--max-new-tokens",
        "64",
    ]
    with pytest.raises(ValueError, match=r"evaluation\.e2e reads the assistant's files"):
        evaluate_args(on, "s3://b/eval/", "s3://b/data/", "s3://b/train/", "hf:org/m")


def test_the_local_run_evaluates_with_the_assistant_folder_itself(tmp_path: Path) -> None:
    """`ftrecipe run` of the demo recipe with e2e on: the evaluate command reads the local assistant as
    it is, the llm.yml it writes beside the assistant link, and Rasa's config and endpoints."""
    data = yaml.safe_load((MONEYBANK / "recipe.yaml").read_text())
    data["spec"]["assistant"]["source"]["local"]["path"] = str(MONEYBANK)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}\n', encoding="utf-8")
    data["spec"]["training"]["baseModel"]["local"]["path"] = str(model)
    data["spec"]["output"] = {"local": {"path": str(tmp_path / "out")}}
    data["spec"]["evaluation"] = {"e2e": True, "minE2EPassRate": 0.5}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data), encoding="utf-8")
    local = resolve(load_recipe(recipe), recipe, tmp_path / "work")
    run = local.run_dir("evaluate")
    assert run.parent == tmp_path / "work" / "runs"
    assert phase_args(local, "evaluate") == [
        "evaluate",
        "--data",
        local.prefixes["data"],
        "--base-model",
        str(model),
        "--adapter",
        local.prefixes["train"],
        "--out",
        local.prefixes["evaluate"],
        "--max-new-tokens",
        "64",
        "--e2e",
        "--assistant",
        str(MONEYBANK),
        "--llm-config",
        f"{run}/inputs/llm.yml",
        "--config",
        f"{MONEYBANK}/config.yml",
        "--endpoints",
        f"{MONEYBANK}/endpoints.yml",
    ]
    write_inputs(local, "evaluate")
    assert sorted(p.name for p in (run / "inputs").iterdir()) == ["assistant", "llm.yml"]
    assert (run / "inputs" / "assistant").resolve() == MONEYBANK
    # The demo names its generator in config.yml: llm.yml sets nothing over it.
    assert yaml.safe_load((run / "inputs" / "llm.yml").read_text()) == {}
