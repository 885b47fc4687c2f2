"""The kopf operator against the emulated Kubernetes API: Jobs created, adopted, replaced; status and Events."""

from __future__ import annotations

import copy
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import kopf
import pytest
import yaml
from prometheus_client import generate_latest

from ftrecipe import __version__
from ftrecipe.api import parse_recipe
from ftrecipe.cli.main import main
from ftrecipe.controller.handlers import ANNOTATION_RETRY, OperatorSettings, register
from ftrecipe.controller.manifests import LABEL_PHASE, LABEL_QUEUE, LABEL_RECIPE, Images
from ftrecipe.controller.metrics import OperatorMetrics, serve
from ftrecipe.controller.observe import ReportCache
from ftrecipe.plan.cache_key import PHASES, Phase, phase_hashes, phase_inputs, version_series
from ftrecipe.plan.planner import job_name
from ftrecipe.termination import PhaseReport, encode
from support.k8s import CRD_GROUP, CRD_PLURAL, CRD_RESOURCE, CRD_VERSION, K8s
from test_phase_hashes_pinned import MINIMAL_HASHES, PINNED_VERSION_SERIES

Body = dict[str, Any]
NS = "ml"
JOBS = "batch/v1/jobs"
IMAGES = Images(operator="registry.test/ftrecipe:test", trainer="registry.test/ftrecipe-trainer:test")
MINIMAL = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "minimal.yaml"


def manifest(name: str = "minimal", **spec: Any) -> Body:
    body = cast(Body, yaml.safe_load(MINIMAL.read_text()))
    body["metadata"] = {"name": name}
    body["spec"]["evaluation"] = {"enabled": False}
    body["spec"].update(copy.deepcopy(spec))
    return body


def expected_hash(body: Body, phase: Phase, version: str = __version__) -> str:
    """The hash the operator (at `version`) gives `phase`: for the inputs of examples/recipes/minimal.yaml
    (whatever the recipe's name, evaluation on or off, tolerations), the pinned literal, not computed, so a
    change of the hash input fails these tests; for a changed spec or another version series, computed."""
    spec = parse_recipe(body).spec
    example = parse_recipe(cast(Body, yaml.safe_load(MINIMAL.read_text()))).spec
    upto = PHASES[: PHASES.index(phase) + 1]
    if version_series(version) == PINNED_VERSION_SERIES and all(
        phase_inputs(spec, p) == phase_inputs(example, p) for p in upto
    ):
        return MINIMAL_HASHES[phase]
    return phase_hashes(spec, version=version)[phase]


def expected_job(body: Body, phase: Phase, version: str = __version__) -> str:
    return job_name(body["metadata"]["name"], phase, expected_hash(body, phase, version))


def handlers(**overrides: Any) -> Callable[[kopf.OperatorRegistry], None]:
    options: dict[str, Any] = {
        "images": IMAGES,
        "resync_seconds": None,
        "progress_seconds": None,
        "retry_delay": 0.5,
        "reports": ReportCache(),
        **overrides,
    }
    settings = OperatorSettings(**options)

    def fill(registry: kopf.OperatorRegistry) -> None:
        register(registry, settings=settings)

    return fill


@pytest.fixture
def operator(k8s: K8s) -> Iterator[Any]:
    with k8s.run_operator(handlers(), namespaces=[NS], posting=True, watching=[CRD_RESOURCE, JOBS]) as run:
        yield run
    assert not run.errors, run.messages()


def apply(k8s: K8s, body: Body) -> Body:
    return cast(
        Body, k8s.custom.create_namespaced_custom_object(CRD_GROUP, CRD_VERSION, NS, CRD_PLURAL, body)
    )


def patch_spec(k8s: K8s, name: str, spec: Body) -> None:
    k8s.custom.patch_namespaced_custom_object(CRD_GROUP, CRD_VERSION, NS, CRD_PLURAL, name, {"spec": spec})


def status(k8s: K8s, name: str = "minimal") -> Body:
    body = k8s.get(CRD_RESOURCE, name, NS) or {}
    return cast(Body, body.get("status") or {})


def wait_status(k8s: K8s, where: Callable[[Body], bool], message: str, name: str = "minimal") -> Body:
    def probe() -> Body | None:
        st = status(k8s, name)
        return st if where(st) else None

    found = k8s.wait_for(probe, message=message)
    assert found is not None
    return found


def wait_phase(k8s: K8s, phase: str, name: str = "minimal") -> Body:
    return wait_status(k8s, lambda st: st.get("phase") == phase, f"phase {phase}", name)


def condition(st: Body, kind: str) -> Body:
    return next(c for c in st.get("conditions", []) if c["type"] == kind)


def wait_job(k8s: K8s, name: str) -> Body:
    return k8s.wait_for_object(JOBS, name, NS)


def job_names(k8s: K8s) -> list[str]:
    return sorted(j["metadata"]["name"] for j in k8s.list(JOBS, NS))


# The operator's periodic task leaves a trace of each tick in the API's request log: a progress tick lists
# the namespace's unfinished pods, a resync its unfinished Jobs (each with its field selector). Tests that
# need "N ticks happened" wait for N such listings, so a timer that never runs fails them.
PROGRESS_LISTING = ("pods", "status.phase!=Succeeded")
RESYNC_LISTING = ("jobs", "status.successful!=1")


def tick_listings(k8s: K8s, listing: tuple[str, str], since: int = 0) -> list[Any]:
    plural, field_selector = listing
    return [
        r
        for r in k8s.requests()[since:]
        if r.resource is not None
        and r.resource.plural == plural
        and r.method == "GET"
        and not r.name
        and r.params.get("fieldSelector") == field_selector
        and r.params.get("watch") not in ("true", "1")
    ]


def wait_ticks(k8s: K8s, listing: tuple[str, str], count: int, since: int, timeout: float = 30.0) -> None:
    """Wait until the operator's timer has made `count` more listings of `listing` since request `since`."""
    k8s.wait_for(
        lambda: len(tick_listings(k8s, listing, since)) >= count,
        timeout=timeout,
        message=f"{count} timer ticks listing {listing[0]}",
    )


def test_full_lifecycle(k8s: K8s, operator: Any) -> None:
    body = manifest()
    body["spec"]["evaluation"] = {"enabled": True}
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    body["spec"]["training"]["tolerations"] = [toleration]
    owner = apply(k8s, body)
    data_name = expected_job(body, "data")
    data = wait_job(k8s, data_name)

    meta = data["metadata"]
    assert meta["labels"][LABEL_RECIPE] == "minimal" and meta["labels"][LABEL_PHASE] == "data"
    (ref,) = meta["ownerReferences"]
    assert (ref["uid"], ref["kind"], ref["controller"]) == (owner["metadata"]["uid"], "FinetuneRecipe", True)
    pod = data["spec"]["template"]["spec"]
    assert {c["image"] for c in pod["containers"] + pod["initContainers"]} == {IMAGES.operator}
    assert pod["initContainers"][0]["args"][:3] == ["fetch-inputs", "--phase", "data"]
    assert pod["containers"][0]["args"][0] == "prepare-data"
    for container in pod["containers"] + pod["initContainers"]:
        for env in container["env"]:
            assert "value" in env or set(env["valueFrom"]) == {"secretKeyRef"}, env
    assert data["spec"]["suspend"] is False

    st = wait_phase(k8s, "PreparingData")
    assert condition(st, "DataPrepared")["status"] == "Unknown"
    assert st["dataPreparation"]["jobName"] == data_name

    finish(k8s, data_name, "prepare-data", report(True, "data published", num_ft_data_points=40))
    train_name = expected_job(body, "train")
    train = wait_job(k8s, train_name)
    train_pod = train["spec"]["template"]["spec"]
    limits = train_pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert train_pod["containers"][0]["image"] == IMAGES.trainer
    assert train_pod["tolerations"] == [toleration]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in train_pod["volumes"]
    st = wait_phase(k8s, "Training")
    assert condition(st, "DataPrepared")["status"] == "True"
    assert st["dataPreparation"]["datasetURI"].startswith("s3://ml-artifacts/ftrecipe/minimal/data-")
    assert st["dataPreparation"]["summary"] == {"numFtDataPoints": 40}

    finish(k8s, train_name, "train", report(True, "trained", step=30, total_steps=30, eval_loss=0.7))
    eval_name = expected_job(body, "evaluate")
    wait_job(k8s, eval_name)
    st = wait_phase(k8s, "Evaluating")
    assert st["training"]["adapterURI"].startswith("s3://ml-artifacts/ftrecipe/minimal/train-")
    finish(k8s, eval_name, "evaluate", report(True, "scored", command_accuracy=0.9, per_command_f1={}))
    st = wait_phase(k8s, "Succeeded")
    assert condition(st, "Ready")["status"] == "True"
    assert st["evaluation"]["commandAccuracy"] == 0.9
    assert st["completedAt"] and st["observedGeneration"] == 1
    assert job_names(k8s) == sorted([data_name, train_name, eval_name])
    k8s.wait_for(
        lambda: (
            {e["reason"] for e in k8s.events(NS)} >= {"PreparingData", "Training", "Evaluating", "Succeeded"}
        ),
        message="Events PreparingData, Training, Evaluating and Succeeded",
    )


def test_failed_train_job_fails_the_recipe(k8s: K8s, operator: Any) -> None:
    body = manifest()
    apply(k8s, body)
    k8s.set_job_status(wait_job(k8s, expected_job(body, "data"))["metadata"]["name"], NS, "succeeded")
    train_name = expected_job(body, "train")
    wait_job(k8s, train_name)
    k8s.set_job_status(train_name, NS, "failed", message="CUDA out of memory")
    st = wait_phase(k8s, "Failed")
    assert "CUDA out of memory" in st["message"]
    ready = condition(st, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "JobFailed")
    assert condition(st, "Trained")["status"] == "False"
    k8s.wait_for(
        lambda: any(e["reason"] == "JobFailed" and e["type"] == "Warning" for e in k8s.events(NS)),
        message="a JobFailed warning Event",
    )


def annotate(k8s: K8s, name: str, key: str, value: str) -> None:
    """What `kubectl annotate finetunerecipe NAME KEY=VALUE --overwrite` sends."""
    k8s.custom.patch_namespaced_custom_object(
        CRD_GROUP, CRD_VERSION, NS, CRD_PLURAL, name, {"metadata": {"annotations": {key: value}}}
    )


def test_retry_annotation_runs_the_failed_phase_again(k8s: K8s, operator: Any) -> None:
    body = manifest()
    apply(k8s, body)
    data_name = expected_job(body, "data")
    wait_job(k8s, data_name)
    finish(k8s, data_name, "prepare-data", report(True, "data published", num_ft_data_points=40))
    train_name = expected_job(body, "train")
    failed_uid = wait_job(k8s, train_name)["metadata"]["uid"]
    k8s.set_job_status(train_name, NS, "failed", message="s3://ml-artifacts: AccessDenied")
    wait_phase(k8s, "Failed")

    # The bucket policy was fixed outside the spec: the user asks for a retry.
    annotate(k8s, "minimal", ANNOTATION_RETRY, "1732190000")
    st = wait_status(k8s, lambda s: s.get("observedRetry") == "1732190000", "the retry recorded")
    assert st["phase"] == "Training" and st["observedGeneration"] == 1
    assert condition(st, "Trained")["reason"] == "Running"
    assert condition(st, "DataPrepared")["status"] == "True"
    retried = k8s.get(JOBS, train_name, NS)
    assert retried is not None and retried["metadata"]["uid"] != failed_uid
    assert "conditions" not in (retried.get("status") or {})
    assert job_names(k8s) == sorted([data_name, train_name])  # data preparation is not run again
    deletes = [r for r in k8s.requests() if r.method == "DELETE" and r.name == train_name]
    assert [r.params.get("propagationPolicy") for r in deletes] == ["Background"]  # its pods go too
    k8s.wait_for(
        lambda: any(
            e["reason"] == "RetryRequested" and e["message"] == "Retry requested: re-running train"
            for e in k8s.events(NS)
        ),
        message="a RetryRequested Event",
    )

    finish(k8s, train_name, "train", report(True, "trained", step=30, total_steps=30), suffix="retry")
    st = wait_phase(k8s, "Succeeded")
    assert st["training"]["step"] == 30 and st["observedRetry"] == "1732190000"
    assert job_names(k8s) == sorted([data_name, train_name])


def requests_since(k8s: K8s, first: int, plural: str, method: str) -> list[Any]:
    return [
        r
        for r in k8s.requests()[first:]
        if r.resource is not None and r.resource.plural == plural and r.method == method
    ]


def test_restart_adopts_the_running_job(k8s: K8s) -> None:
    """A restarted operator finds the running Job and creates nothing: not a second Job, not a create
    request answered 409, not a second "PreparingData" Event; it then carries the recipe on."""
    body = manifest()
    data_name = expected_job(body, "data")
    options: dict[str, Any] = {"namespaces": [NS], "posting": True, "watching": [CRD_RESOURCE, JOBS]}
    with k8s.run_operator(handlers(), **options) as first:
        apply(k8s, body)
        wait_job(k8s, data_name)
        wait_phase(k8s, "PreparingData")
        k8s.wait_for(
            lambda: [e["reason"] for e in k8s.events(NS)] == ["PreparingData"], message="the phase's Event"
        )
    k8s.set_job_status(data_name, NS, "running")
    data_uid = k8s.get(JOBS, data_name, NS)["metadata"]["uid"]  # type: ignore[index]
    before = len(k8s.requests())
    with k8s.run_operator(handlers(), **options) as second:
        k8s.wait_for(
            lambda: any("reconciled (recipe seen): PreparingData" in m for m in second.messages()),
            message="the recipe reconciled at start-up",
        )
        # Adopted: no create request at all (a 409 would have meant it did not see the Job).
        assert requests_since(k8s, before, "jobs", "POST") == []
        assert job_names(k8s) == [data_name]
        assert status(k8s)["phase"] == "PreparingData"

        # The restarted operator carries on: the data Job finishes, it creates the train Job.
        finish(k8s, data_name, "prepare-data", report(True, "data published", num_ft_data_points=40))
        train_name = expected_job(body, "train")
        wait_job(k8s, train_name)
        st = wait_phase(k8s, "Training")
        assert st["dataPreparation"]["summary"] == {"numFtDataPoints": 40}
        k8s.wait_for(
            lambda: sorted(e["reason"] for e in k8s.events(NS)) == ["PreparingData", "Training"],
            message="the Training Event",
        )
        created = [r.data["metadata"]["name"] for r in requests_since(k8s, before, "jobs", "POST")]
        assert created == [train_name]
        # Events go out in order: a second "PreparingData" from the restart would precede "Training".
        posted = [r.data["reason"] for r in requests_since(k8s, before, "events", "POST")]
        assert posted == ["Training"]
        assert k8s.get(JOBS, data_name, NS)["metadata"]["uid"] == data_uid  # type: ignore[index]
    assert not first.errors and not second.errors, second.messages()


def test_training_change_keeps_data_and_replaces_train_job(k8s: K8s, operator: Any) -> None:
    body = manifest()
    apply(k8s, body)
    data_name = expected_job(body, "data")
    wait_job(k8s, data_name)
    k8s.set_job_status(data_name, NS, "succeeded")
    old_train = expected_job(body, "train")
    wait_job(k8s, old_train)
    k8s.set_job_status(old_train, NS, "running")

    patch_spec(k8s, "minimal", {"training": {"hyperparameters": {"epochs": 5}}})
    changed = copy.deepcopy(body)
    changed["spec"]["training"]["hyperparameters"] = {"epochs": 5}
    new_train = expected_job(changed, "train")
    assert new_train != old_train and expected_job(changed, "data") == data_name
    wait_job(k8s, new_train)
    k8s.wait_for(lambda: k8s.get(JOBS, old_train, NS) is None, message="the old train Job deleted")
    assert job_names(k8s) == sorted([data_name, new_train])
    st = wait_status(k8s, lambda s: s.get("observedGeneration") == 2, "observedGeneration 2")
    assert st["phase"] == "Training" and st["training"]["jobName"] == new_train
    assert condition(st, "DataPrepared")["status"] == "True"


def test_suspend_suspends_the_running_job(k8s: K8s, operator: Any) -> None:
    body = manifest()
    apply(k8s, body)
    data_name = expected_job(body, "data")
    wait_job(k8s, data_name)
    k8s.set_job_status(data_name, NS, "running")
    patch_spec(k8s, "minimal", {"suspend": True})
    k8s.wait_for_object(JOBS, data_name, NS, where=lambda j: j["spec"].get("suspend") is True)
    wait_phase(k8s, "Suspended")
    patch_spec(k8s, "minimal", {"suspend": False})
    k8s.wait_for_object(JOBS, data_name, NS, where=lambda j: j["spec"].get("suspend") is False)
    wait_phase(k8s, "PreparingData")
    assert job_names(k8s) == [data_name]


def test_kueue_queue_creates_suspended_labelled_jobs(k8s: K8s, operator: Any) -> None:
    body = manifest(queueName="gpu-queue")
    apply(k8s, body)
    job = wait_job(k8s, expected_job(body, "data"))
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][LABEL_QUEUE] == "gpu-queue"
    assert job["spec"]["template"]["metadata"]["labels"][LABEL_QUEUE] == "gpu-queue"
    wait_phase(k8s, "PreparingData")


def test_local_output_fails_without_jobs(k8s: K8s, operator: Any) -> None:
    body = manifest(output={"local": {"path": "/tmp/out"}})
    apply(k8s, body)
    st = wait_phase(k8s, "Failed")
    assert condition(st, "Ready")["reason"] == "LocalPathInCluster"
    assert "spec.output.local" in st["message"]
    assert job_names(k8s) == []


@pytest.mark.parametrize(("accuracy", "outcome"), [(0.91, "Succeeded"), (0.62, "Failed")])
def test_evaluation_and_the_quality_gate(k8s: K8s, operator: Any, accuracy: float, outcome: str) -> None:
    body = manifest()
    body["spec"]["evaluation"] = {"enabled": True, "minCommandAccuracy": 0.8}
    apply(k8s, body)
    for phase, container in (("data", "prepare-data"), ("train", "train")):
        name = expected_job(body, phase)
        wait_job(k8s, name)
        finish(k8s, name, container, report(True, f"{phase} done"))
    eval_name = expected_job(body, "evaluate")
    job = wait_job(k8s, eval_name)
    main_container = job["spec"]["template"]["spec"]["containers"][0]
    assert main_container["args"][0] == "evaluate" and main_container["image"] == IMAGES.trainer
    st = wait_phase(k8s, "Evaluating")
    assert condition(st, "Evaluated")["status"] == "Unknown"
    per_command = {"start flow": 0.97, "set slot": 0.55, "cancel flow": 0.8}
    figures = {"command_accuracy": accuracy, "per_command_f1": per_command, "num_turns": 40}
    finish(k8s, eval_name, "evaluate", report(True, "scored 40 turns", **figures))
    st = wait_phase(k8s, outcome)
    assert st["evaluation"]["commandAccuracy"] == accuracy
    assert st["evaluation"]["perCommand"] == per_command
    assert st["evaluation"]["reportURI"].startswith("s3://ml-artifacts/ftrecipe/minimal/evaluate-")
    ready = condition(st, "Ready")
    if outcome == "Succeeded":
        assert (ready["status"], condition(st, "Evaluated")["status"]) == ("True", "True")
        return
    assert (ready["status"], ready["reason"]) == ("False", "QualityGateNotMet")
    assert st["message"] == (
        "command accuracy 0.620 is below spec.evaluation.minCommandAccuracy 0.8; "
        "lowest F1: set slot 0.55, cancel flow 0.80, start flow 0.97"
    )
    k8s.wait_for(
        lambda: any(e["reason"] == "QualityGateNotMet" and e["type"] == "Warning" for e in k8s.events(NS)),
        message="a QualityGateNotMet warning Event",
    )
    # A retry has no failed Job to re-run: the gate is checked again on the same figures.
    jobs = job_names(k8s)
    annotate(k8s, "minimal", ANNOTATION_RETRY, "1732190000")
    st = wait_status(k8s, lambda s: s.get("observedRetry") == "1732190000", "the retry recorded")
    assert condition(st, "Ready")["reason"] == "QualityGateNotMet" and job_names(k8s) == jobs
    k8s.wait_for(
        lambda: any(
            e["reason"] == "RetryRequested" and "no failed Job to re-run; still failed" in e["message"]
            for e in k8s.events(NS)
        ),
        message="a RetryRequested Event saying nothing re-ran",
    )
    # A week later the Jobs are gone (their TTL); lowering the bar re-checks the remembered figures and
    # nothing runs again.
    for name in job_names(k8s):
        k8s.delete(JOBS, name, NS)
    patch_spec(k8s, "minimal", {"evaluation": {"minCommandAccuracy": 0.6}})
    st = wait_phase(k8s, "Succeeded")
    assert st["evaluation"]["commandAccuracy"] == accuracy
    assert job_names(k8s) == []


def test_complete_bundle_is_reused(k8s: K8s) -> None:
    body = manifest()
    data_hash = MINIMAL_HASHES["data"]
    asked: list[str] = []

    def read_bundle(prefix: str, _output: object) -> dict[str, Any] | None:
        asked.append(prefix)
        return {"num_ft_data_points": 77} if f"/data-{data_hash[:12]}/" in prefix else None

    with k8s.run_operator(handlers(read_bundle=read_bundle), namespaces=[NS]) as run:
        apply(k8s, body)
        wait_job(k8s, expected_job(body, "train"))
        st = wait_phase(k8s, "Training")
        assert st["dataPreparation"]["cached"] is True
        assert st["dataPreparation"]["summary"] == {"numFtDataPoints": 77}  # from the bundle's manifest
        assert condition(st, "DataPrepared")["reason"] == "Cached"
        assert job_names(k8s) == [expected_job(body, "train")]
    assert not run.errors, run.messages()
    assert asked


def recipe_writes(k8s: K8s, first: int = 0) -> list[str]:
    """The operator's writes to recipe objects themselves (not their status): none are expected."""
    return [
        f"{r.method} {r.name}"
        for r in k8s.requests()[first:]
        if r.resource is not None
        and r.resource.plural == CRD_PLURAL
        and not r.subresource
        and r.method in ("PATCH", "PUT")
    ]


def finish_without_a_watch_event(k8s: K8s, job: str) -> None:
    """The Job completes and its watch event is lost (a dropped connection): the object changes in the API
    with no event, so only a listing shows it."""

    async def change(emulator: Any) -> None:
        for (resource, namespace, name), obj in emulator.objects.items():
            if resource.plural == "jobs" and namespace == NS and name == job:
                done = {"type": "Complete", "status": "True", "reason": "CompletionsReached"}
                obj["status"] = {"succeeded": 1, "active": 0, "conditions": [done]}  # no event

    k8s._locked(change)


def test_resync_catches_a_lost_job_event_with_one_request_per_namespace(k8s: K8s) -> None:
    bodies = [manifest("one"), manifest("two")]
    with k8s.run_operator(
        handlers(resync_seconds=0.3), namespaces=[NS], watching=[CRD_RESOURCE, JOBS]
    ) as run:
        for body in bodies:
            apply(k8s, body)
            wait_job(k8s, expected_job(body, "data"))
            wait_phase(k8s, "PreparingData", body["metadata"]["name"])
        first = len(k8s.requests())
        started = time.monotonic()
        wait_ticks(k8s, RESYNC_LISTING, 5, first)  # five resyncs: nothing changed, nothing is reconciled
        # One listing per resync for the namespace, not one per recipe: five listings took at least four
        # 0.3 s intervals (two per resync would have taken two); a busy machine only makes it longer.
        assert time.monotonic() - started >= 4 * 0.3 - 0.05
        listings = [
            r
            for r in k8s.requests()[first:]
            if r.resource is not None and r.resource.plural == "jobs" and r.method == "GET"
        ]
        assert all(r.params.get("fieldSelector") == "status.successful!=1" for r in listings)
        assert all(
            r.params.get("labelSelector") == "app.kubernetes.io/managed-by=ftrecipe-operator"
            for r in listings
        )
        assert not any("(resync)" in m for m in run.messages())

        finish_without_a_watch_event(k8s, expected_job(bodies[0], "data"))
        wait_job(k8s, expected_job(bodies[0], "train"))
        wait_phase(k8s, "Training", "one")
        k8s.wait_for(
            lambda: any("reconciled (resync)" in m for m in run.messages()), message="the resync's log line"
        )
        assert sum("reconciled (resync)" in m for m in run.messages()) == 1
        assert status(k8s, "two")["phase"] == "PreparingData"
        # Neither kopf's last-handled annotation nor one of ours: only the status is written.
        assert recipe_writes(k8s, first) == []
    assert not run.errors, run.messages()


def test_operator_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["operator", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--namespace",
        "--all-namespaces",
        "--liveness",
        "--standalone",
        "--peering",
        "--metrics-port",
        "--log-format",
        "--watch-timeout-seconds",
    ):
        assert option in out
    assert main(["operator"]) == 2


# --------------------------------------------------------------------------------------------- reports


def report(ok: bool, message: str, **figures: Any) -> str:
    return encode(PhaseReport(ok=ok, message=message, figures=figures))


DATA_FIGURES = {
    "num_input_e2e_tests": 35,
    "num_annotated_conversations": 34,
    "num_ft_data_points": 120,
    "num_train_data_points": 96,
    "num_val_data_points": 24,
    "llm_calls": 310,
    "wall_time_seconds": 41.5,  # not a status field: ignored
}


def progress_line(step: int, total: int, loss: float, eta: int) -> str:
    event = {"event": "progress", "step": step, "total_steps": total, "epoch": step / 40}
    return json.dumps(event | {"train_loss": loss, "eval_loss": None, "eta_seconds": eta})


def finish(k8s: K8s, job: str, container: str, message: str, state: str = "succeeded", **pod: Any) -> None:
    """The kubelet writes the pod's final status, then the Job controller the Job's (that order)."""
    k8s.set_job_pod(
        job,
        NS,
        "Succeeded" if state == "succeeded" else "Failed",
        container=container,
        message=message,
        **pod,
    )
    k8s.set_job_status(job, NS, state, message=pod.get("reason") or "")


def test_phase_reports_and_training_progress_fill_the_status(k8s: K8s) -> None:
    metrics = OperatorMetrics()
    body = manifest()
    with k8s.run_operator(
        handlers(metrics=metrics, progress_seconds=0.2), namespaces=[NS], watching=[CRD_RESOURCE]
    ) as run:
        apply(k8s, body)
        data_name = expected_job(body, "data")
        wait_job(k8s, data_name)
        finish(k8s, data_name, "prepare-data", report(True, "data published", **DATA_FIGURES))
        st = wait_phase(k8s, "Training")
        assert st["dataPreparation"]["summary"] == {
            "numInputE2eTests": 35,
            "numAnnotatedConversations": 34,
            "numFtDataPoints": 120,
            "numTrainDataPoints": 96,
            "numValDataPoints": 24,
            "llmCalls": 310,
        }

        train_name = expected_job(body, "train")
        wait_job(k8s, train_name)
        log = "\n".join(
            [
                "loading model",
                progress_line(10, 120, 1.9, 600),
                "a warning",
                progress_line(30, 120, 1.25, 450),
            ]
        )
        k8s.set_job_pod(train_name, NS, "Running", container="train", log=log + "\n")
        k8s.set_job_status(train_name, NS, "running")
        st = wait_status(k8s, lambda s: (s.get("training") or {}).get("step") == 30, "training step 30")
        assert (
            st["training"].items()
            >= {"totalSteps": 120, "trainLoss": 1.25, "epoch": 0.75, "etaSeconds": 450}.items()
        )
        assert (
            st["message"] == f"training running (Job {train_name}): step 30/120, train loss 1.25, ETA 7m30s"
        )
        # The counter counts a patch once the API answered it: one tick later, the step-30 patch is in.
        wait_ticks(k8s, PROGRESS_LISTING, 1, len(k8s.requests()))
        patches = metrics.status_patches._value.get()
        wait_ticks(k8s, PROGRESS_LISTING, 5, len(k8s.requests()))  # five ticks without new progress
        assert metrics.status_patches._value.get() == patches  # no new status patch

        figures = {"step": 120, "total_steps": 120, "train_loss": 0.4, "eval_loss": 0.52, "adapter_uri": "x"}
        finish(k8s, train_name, "train", report(True, "trained 120 steps", **figures))
        st = wait_phase(k8s, "Succeeded")
        training = st["training"]
        assert (training["step"], training["trainLoss"], training["evalLoss"], training["etaSeconds"]) == (
            120,
            0.4,
            0.52,
            0,
        )
        assert st["training"]["adapterURI"].startswith("s3://ml-artifacts/ftrecipe/minimal/train-")
        k8s.wait_for(
            lambda: metrics.recipes.labels("Succeeded")._value.get() == 1, message="the gauge to count it"
        )
    assert not run.errors, run.messages()
    scraped = generate_latest(metrics.registry).decode()
    assert 'ftrecipe_jobs_created_total{phase="data"} 1.0' in scraped
    assert 'ftrecipe_jobs_created_total{phase="train"} 1.0' in scraped
    assert 'ftrecipe_phase_duration_seconds_count{phase="data"} 1.0' in scraped
    assert 'ftrecipe_recipes{phase="Training"} 0.0' in scraped


def generate_line(done: int, total: int, eta: float | None) -> str:
    event = {"event": "progress", "stage": "generate", "done": done, "total": total, "eta_seconds": eta}
    return json.dumps(event)


def test_evaluation_progress_fills_the_message_and_a_reconcile_keeps_it(k8s: K8s) -> None:
    body = manifest()
    body["spec"]["evaluation"] = {"enabled": True}
    with k8s.run_operator(handlers(progress_seconds=0.2), namespaces=[NS], watching=[CRD_RESOURCE]) as run:
        apply(k8s, body)
        for phase, container in (("data", "prepare-data"), ("train", "train")):
            name = expected_job(body, phase)
            wait_job(k8s, name)
            finish(k8s, name, container, report(True, f"{phase} done"))
        eval_name = expected_job(body, "evaluate")
        wait_job(k8s, eval_name)
        wait_phase(k8s, "Evaluating")
        log = [
            "loading the adapter",
            generate_line(0, 480, None),
            generate_line(120, 480, 125.3),
            "a warning",
        ]
        k8s.set_job_pod(eval_name, NS, "Running", container="evaluate", log="\n".join(log) + "\n")
        k8s.set_job_status(eval_name, NS, "running")
        expected = f"evaluation running (Job {eval_name}): scoring 120/480 turns, ETA 2m05s"
        st = wait_status(k8s, lambda s: s.get("message") == expected, "evaluation progress in the message")
        assert st["evaluation"].items() >= {"turnsDone": 120, "totalTurns": 480, "etaSeconds": 125}.items()

        # A reconcile while evaluating (a retry request without a failure is only recorded) writes the
        # same message: it does not go back to the bare line until the next timer tick.
        k8s.custom.patch_namespaced_custom_object(
            CRD_GROUP,
            CRD_VERSION,
            NS,
            CRD_PLURAL,
            "minimal",
            {"metadata": {"annotations": {ANNOTATION_RETRY: "1"}}},
        )
        wait_status(k8s, lambda s: s.get("observedRetry") == "1", "the reconcile to record the retry value")
        versions = [v["status"] for v in k8s.history(CRD_RESOURCE, "minimal", NS) if v and "status" in v]
        reconciled = next(v for v in versions if v.get("observedRetry") == "1")
        assert reconciled["message"] == expected

        figures = {"command_accuracy": 0.9, "per_command_f1": {}, "num_turns": 480}
        finish(k8s, eval_name, "evaluate", report(True, "scored 480 turns", **figures))
        evaluation = wait_phase(k8s, "Succeeded")["evaluation"]
        assert (evaluation["turnsDone"], evaluation["totalTurns"], evaluation["etaSeconds"]) == (480, 480, 0)
    assert not run.errors, run.messages()


def test_failure_reason_comes_from_the_termination_message(k8s: K8s) -> None:
    metrics = OperatorMetrics()
    body = manifest()
    with k8s.run_operator(handlers(metrics=metrics), namespaces=[NS], watching=[CRD_RESOURCE]) as run:
        apply(k8s, body)
        data_name = expected_job(body, "data")
        wait_job(k8s, data_name)
        finish(k8s, data_name, "prepare-data", report(True, "data published"))
        train_name = expected_job(body, "train")
        wait_job(k8s, train_name)
        why = "error: training.lora.targetModules: q_proj is not in the model; it has: wq, wk"
        finish(
            k8s,
            train_name,
            "train",
            report(False, why),
            state="failed",
            exit_code=2,
            reason="BackoffLimitExceeded",
        )
        st = wait_phase(k8s, "Failed")
        assert st["message"] == why
        assert (
            condition(st, "Trained").items()
            >= {"status": "False", "reason": "JobFailed", "message": why}.items()
        )
    assert not run.errors, run.messages()
    scraped = generate_latest(metrics.registry).decode()
    assert 'ftrecipe_job_failures_total{phase="train",reason="BackoffLimitExceeded"} 1.0' in scraped
    assert 'ftrecipe_phase_failures_total{phase="train",reason="JobFailed"} 1.0' in scraped


def test_a_killed_container_without_a_report_is_named_with_its_reason(k8s: K8s, operator: Any) -> None:
    body = manifest()
    apply(k8s, body)
    data_name = expected_job(body, "data")
    wait_job(k8s, data_name)
    finish(k8s, data_name, "prepare-data", "", state="failed", exit_code=137, reason="OOMKilled")
    st = wait_phase(k8s, "Failed")
    assert st["message"] == "container prepare-data ended with OOMKilled (exit code 137)"


def reconciles(run: Any) -> int:
    return sum(m.startswith("reconciled (") for m in run.messages())


def test_jobs_removed_by_their_ttl_do_not_run_again(k8s: K8s) -> None:
    body = manifest()
    with k8s.run_operator(handlers(), namespaces=[NS], watching=[CRD_RESOURCE, JOBS]) as run:
        apply(k8s, body)
        names = []
        for phase, container in (("data", "prepare-data"), ("train", "train")):
            name = expected_job(body, phase)
            names.append(name)
            wait_job(k8s, name)
            finish(k8s, name, container, report(True, f"{phase} done", step=5, total_steps=5))
        wait_phase(k8s, "Succeeded")
        before = reconciles(run)
        for name in names:  # what ttlSecondsAfterFinished does a week later
            k8s.delete(JOBS, name, NS)
        k8s.wait_for(lambda: reconciles(run) >= before + 2, message="a reconcile per deleted Job")
        assert job_names(k8s) == []
        st = status(k8s)
        assert st["phase"] == "Succeeded" and condition(st, "Ready")["status"] == "True"
        assert st["training"]["step"] == 5 and st["dataPreparation"]["cached"] is False
    assert not run.errors, run.messages()


def test_deleting_the_recipe_takes_its_jobs_and_nothing_comes_back(k8s: K8s, operator: Any) -> None:
    body = manifest()
    apply(k8s, body)
    data_name = expected_job(body, "data")
    wait_job(k8s, data_name)
    wait_phase(k8s, "PreparingData")
    handled = handler_runs(operator, "job-event", data_name)
    k8s.delete(CRD_RESOURCE, "minimal", NS)
    k8s.wait_for(
        lambda: k8s.get(CRD_RESOURCE, "minimal", NS) is None, message="the recipe gone (no finalizer)"
    )
    k8s.wait_for(lambda: job_names(k8s) == [], message="its Jobs garbage-collected by ownerReferences")
    # The operator has seen the Job go (after the recipe): it creates nothing for the deleted recipe.
    k8s.wait_for(
        lambda: handler_runs(operator, "job-event", data_name) > handled, message="the Job's deletion handled"
    )
    assert job_names(k8s) == []
    assert requests_since(k8s, 0, "jobs", "POST")[1:] == []  # the data Job was the only one created


def handler_runs(run: Any, handler: str, name: str) -> int:
    """How often kopf ran `handler` for the object `name` (its "succeeded" log records)."""
    return sum(
        r.getMessage() == f"Handler '{handler}' succeeded." and getattr(r, "k8s_ref", {}).get("name") == name
        for r in run.records
    )


def test_metrics_are_served_over_http() -> None:
    metrics = OperatorMetrics()
    metrics.recipe_seen("ml/a", "Training")
    metrics.recipe_seen("ml/b", "Training")
    metrics.recipe_seen("ml/a", "Succeeded")
    metrics.recipe_seen("ml/b", None)  # deleted
    port = serve(metrics, 0, "127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'ftrecipe_recipes{phase="Training"} 0.0' in text
    assert 'ftrecipe_recipes{phase="Succeeded"} 1.0' in text
    assert "# TYPE ftrecipe_phase_duration_seconds histogram" in text


def test_two_replicas_with_peering_one_active_one_standby(k8s: K8s) -> None:
    """The Deployment's replicas: the higher priority one works, the other pauses, then takes over."""
    k8s.ensure_namespace(NS)
    k8s.create("kopf.dev/v1/kopfpeerings", {"metadata": {"name": "ftrecipe"}}, NS)
    body = manifest()
    data_name = expected_job(body, "data")
    options = {"namespaces": [NS], "watching": [CRD_RESOURCE], "peering": "ftrecipe"}
    with k8s.run_operator(handlers(), priority=100, **options) as standby:
        with k8s.run_operator(handlers(), priority=200, **options) as active:
            k8s.wait_for(
                lambda: any("Pausing operations in favour of" in m for m in standby.messages()),
                message="the lower priority replica to pause",
            )
            apply(k8s, body)
            wait_job(k8s, data_name)
            wait_phase(k8s, "PreparingData")
            assert job_names(k8s) == [data_name]
            assert not any("reconcile" in m for m in standby.messages()), [
                m for m in standby.messages() if "reconcile" in m
            ]
        # The active replica stopped (a rollout, a node drain): the standby takes over and carries on.
        k8s.wait_for(
            lambda: any("Resuming operations" in m for m in standby.messages()),
            message="the standby replica to resume",
        )
        k8s.set_job_status(data_name, NS, "succeeded")
        wait_job(k8s, expected_job(body, "train"))
        assert job_names(k8s) == sorted([data_name, expected_job(body, "train")])
    assert not active.errors and not standby.errors, standby.messages()
