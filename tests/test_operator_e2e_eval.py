"""The operator with evaluation.e2e (issue 23) against the emulated Kubernetes API: the evaluate Job fetches
the assistant first and runs `evaluate --e2e`, its pod's termination message reports the E2E pass rate,
the status shows it, and evaluation.minE2EPassRate gates the recipe on it, also on the figures the status
remembers once the Jobs are gone."""

from __future__ import annotations

import json
from typing import Any

import pytest

from support.k8s import CRD_RESOURCE, K8s
from test_operator import (
    IMAGES,
    JOBS,
    NS,
    apply,
    condition,
    expected_hash,
    expected_job,
    finish,
    generate_line,
    handlers,
    job_names,
    manifest,
    operator,  # noqa: F401  (the fixture the tests use)
    patch_spec,
    report,
    wait_job,
    wait_phase,
    wait_status,
)
from test_phase_hashes_pinned import MINIMAL_HASHES

# What `ftrecipe evaluate --e2e` reports (its figures, fixed by the operator contract): 6 of 7 held-out
# tests pass with the adapter in the loop.
E2E_FIGURES: dict[str, Any] = {
    "command_accuracy": 0.93,
    "per_command_f1": {"start flow": 0.97, "set slot": 0.88},
    "num_turns": 40,
    "e2e_tests": 7,
    "e2e_passed": 6,
    "e2e_pass_rate": 6 / 7,
}


def e2e_manifest(**evaluation: Any) -> dict[str, Any]:
    return manifest(evaluation={"enabled": True, "e2e": True, **evaluation})


def run_to_evaluation(k8s: K8s, body: dict[str, Any]) -> str:
    """Data and train succeed; returns the evaluate Job's name once it exists."""
    for phase, container in (("data", "prepare-data"), ("train", "train")):
        name = expected_job(body, phase)
        wait_job(k8s, name)
        finish(k8s, name, container, report(True, f"{phase} done"))
    return expected_job(body, "evaluate")


@pytest.mark.usefixtures("operator")
def test_the_evaluate_job_fetches_the_assistant_and_the_status_shows_the_pass_rate(k8s: K8s) -> None:
    body = e2e_manifest(minE2EPassRate=0.8, minCommandAccuracy=0.9)
    body["spec"]["assistant"]["config"] = "config.yml"
    apply(k8s, body)
    eval_name = run_to_evaluation(k8s, body)
    pod = wait_job(k8s, eval_name)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert (init["name"], init["image"]) == ("fetch-inputs", IMAGES.operator)
    # A git source: it checks out the commit the data bundle records (the branch may have moved since).
    assert init["args"] == [
        "fetch-inputs",
        "--phase",
        "evaluate",
        "--into",
        "/workspace/inputs",
        "--data",
        f"s3://ml-artifacts/ftrecipe/minimal/data-{expected_hash(body, 'data')[:12]}/",
    ]
    (main,) = pod["containers"]
    assert main["image"] == IMAGES.trainer
    assert main["args"][main["args"].index("--e2e") :] == [
        "--e2e",
        "--assistant",
        "/workspace/inputs/assistant",
        "--llm-config",
        "/workspace/inputs/llm.yml",
        "--config",
        "/workspace/inputs/assistant/config.yml",
        "--work-dir",
        "/workspace/work",
    ]
    assert "--min-e2e-pass-rate" not in main["args"]  # the gate is the operator's, on the figures
    wait_phase(k8s, "Evaluating")
    finish(k8s, eval_name, "evaluate", report(True, "scored 40 turns; 6 of 7 E2E tests pass", **E2E_FIGURES))
    st = wait_phase(k8s, "Succeeded")
    evaluation = st["evaluation"]
    assert (evaluation["e2eTests"], evaluation["e2ePassed"], evaluation["e2ePassRate"]) == (7, 6, 6 / 7)
    assert evaluation["commandAccuracy"] == 0.93
    assert st["message"] == "the adapter is ready: command accuracy 0.930, E2E pass rate 0.857 (6 of 7 tests)"
    assert condition(st, "Ready")["message"] == st["message"]


@pytest.mark.usefixtures("operator")
def test_the_e2e_gate_fails_the_recipe_and_is_checked_again_on_the_remembered_figures(k8s: K8s) -> None:
    body = e2e_manifest(minE2EPassRate=0.9)
    apply(k8s, body)
    eval_name = run_to_evaluation(k8s, body)
    wait_job(k8s, eval_name)
    finish(k8s, eval_name, "evaluate", report(True, "scored", **E2E_FIGURES))
    st = wait_phase(k8s, "Failed")
    ready = condition(st, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "QualityGateNotMet")
    assert condition(st, "Evaluated")["status"] == "False"
    assert st["message"] == (
        "E2E pass rate 0.857 (6 of 7 held-out tests passed) is below spec.evaluation.minE2EPassRate 0.9"
    )
    assert st["evaluation"]["e2ePassRate"] == 6 / 7
    k8s.wait_for(
        lambda: any(
            e["reason"] == "QualityGateNotMet"
            and e["type"] == "Warning"
            and "E2E pass rate 0.857" in e["message"]
            for e in k8s.events(NS)
        ),
        message="a QualityGateNotMet warning Event naming the E2E pass rate",
    )
    # A week later the Jobs are gone (their TTL). Lowering the bar re-checks the figures the status
    # remembers; nothing runs again.
    for name in job_names(k8s):
        k8s.delete(JOBS, name, NS)
    patch_spec(k8s, "minimal", {"evaluation": {"minE2EPassRate": 0.8}})
    st = wait_phase(k8s, "Succeeded")
    assert st["evaluation"]["e2ePassRate"] == 6 / 7
    assert job_names(k8s) == []
    # Raising it again fails on the same remembered figures, still without a Job.
    patch_spec(k8s, "minimal", {"evaluation": {"minE2EPassRate": 0.95}})
    st = wait_phase(k8s, "Failed")
    assert st["message"] == (
        "E2E pass rate 0.857 (6 of 7 held-out tests passed) is below spec.evaluation.minE2EPassRate 0.95"
    )
    assert job_names(k8s) == []


@pytest.mark.usefixtures("operator")
@pytest.mark.parametrize("gate", [None, 0.5])
def test_turning_e2e_on_reruns_only_the_evaluation(k8s: K8s, gate: float | None) -> None:
    """An evaluation made without e2e has no pass rate: turning e2e on gives the evaluate phase another
    hash, so it runs again (with the replay) while data and training are kept."""
    body = manifest(evaluation={"enabled": True})
    apply(k8s, body)
    first_eval = run_to_evaluation(k8s, body)
    assert first_eval == f"minimal-eval-{MINIMAL_HASHES['evaluate'][:8]}"
    wait_job(k8s, first_eval)
    finish(k8s, first_eval, "evaluate", report(True, "scored", command_accuracy=0.93, num_turns=40))
    st = wait_phase(k8s, "Succeeded")
    assert st["message"] == "the adapter is ready: command accuracy 0.930"
    assert "e2ePassRate" not in st["evaluation"]
    before = job_names(k8s)
    evaluation: dict[str, Any] = {"e2e": True} | ({"minE2EPassRate": gate} if gate is not None else {})
    patch_spec(k8s, "minimal", {"evaluation": evaluation})
    changed = {**body, "spec": {**body["spec"], "evaluation": {"enabled": True, **evaluation}}}
    second_eval = expected_job(changed, "evaluate")
    assert second_eval != first_eval
    wait_job(k8s, second_eval)
    wait_phase(k8s, "Evaluating")
    assert job_names(k8s) == sorted([*before, second_eval])  # data and train were not run again
    finish(k8s, second_eval, "evaluate", report(True, "scored", **E2E_FIGURES))
    st = wait_phase(k8s, "Succeeded")
    assert st["evaluation"]["e2ePassRate"] == 6 / 7


def e2e_line(done: int, total: int, eta: float | None) -> str:
    """A progress line of `evaluate --e2e`'s replay (after the scoring's `generate` lines)."""
    return json.dumps({"event": "progress", "stage": "e2e", "done": done, "total": total, "eta_seconds": eta})


def test_the_status_names_the_evaluation_stage_and_counts_each_stage_on_its_own(k8s: K8s) -> None:
    """A user watching `kubectl get ftr` sees the scoring's turns, then the E2E replay's under their own
    name, not the replay's count restarting from 0 under the scoring's words."""
    body = e2e_manifest()
    with k8s.run_operator(handlers(progress_seconds=0.2), namespaces=[NS], watching=[CRD_RESOURCE]) as run:
        apply(k8s, body)
        eval_name = run_to_evaluation(k8s, body)
        wait_job(k8s, eval_name)
        wait_phase(k8s, "Evaluating")
        log = ["loading the adapter", generate_line(0, 40, None), generate_line(30, 40, 20.0)]
        k8s.set_job_pod(eval_name, NS, "Running", container="evaluate", log="\n".join(log) + "\n")
        k8s.set_job_status(eval_name, NS, "running")
        scoring = f"evaluation running (Job {eval_name}): scoring 30/40 turns, ETA 0m20s"
        st = wait_status(k8s, lambda s: s.get("message") == scoring, "the scoring's progress in the message")
        expected: dict[str, Any] = {"stage": "scoring", "turnsDone": 30, "totalTurns": 40, "etaSeconds": 20}
        assert st["evaluation"].items() >= expected.items()

        # The scoring ends, the replay of the held-out tests starts (9 turns they can reach) and moves on.
        log += [generate_line(40, 40, 0.0), e2e_line(0, 9, None), "a warning", e2e_line(4, 9, 30.2)]
        k8s.set_job_pod(eval_name, NS, "Running", container="evaluate", log="\n".join(log) + "\n")
        replay = f"evaluation running (Job {eval_name}): E2E tests 4/9 turns, ETA 0m30s"
        st = wait_status(k8s, lambda s: s.get("message") == replay, "the replay's progress in the message")
        expected = {"stage": "e2e", "turnsDone": 4, "totalTurns": 9, "etaSeconds": 30}
        assert st["evaluation"].items() >= expected.items()

        finish(
            k8s, eval_name, "evaluate", report(True, "scored 40 turns; 6 of 7 E2E tests pass", **E2E_FIGURES)
        )
        evaluation = wait_phase(k8s, "Succeeded")["evaluation"]
        assert "stage" not in evaluation  # the counts are the validation turns again, no stage's
        assert (evaluation["turnsDone"], evaluation["totalTurns"], evaluation["etaSeconds"]) == (40, 40, 0)
    assert not run.errors, run.messages()
