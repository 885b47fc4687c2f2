"""What the operator reads from Jobs and pods: states, reports in termination messages, progress lines."""

from __future__ import annotations

import json
from typing import Any

from ftrecipe.controller.observe import (
    ReportCache,
    job_report,
    latest_progress,
    observed_job,
    pod_report,
    with_report,
)
from ftrecipe.plan.planner import ObservedJob
from ftrecipe.termination import PhaseReport, encode


def pod(
    container: str,
    *,
    code: int | None,
    message: str = "",
    reason: str | None = None,
    finished: str = "2026-11-21T10:00:00Z",
    init: dict[str, Any] | None = None,
) -> dict[str, Any]:
    state: dict[str, Any] = (
        {"running": {}}
        if code is None
        else {
            "terminated": {
                "exitCode": code,
                "reason": reason or ("Completed" if code == 0 else "Error"),
                "message": message,
                "finishedAt": finished,
            }
        }
    )
    status: dict[str, Any] = {"containerStatuses": [{"name": container, "state": state}]}
    if init is not None:
        status["initContainerStatuses"] = [{"name": "fetch-inputs", "state": {"terminated": init}}]
    return {"status": status}


OK = encode(PhaseReport(True, "trained 10 steps", {"step": 10}))
ERROR = encode(PhaseReport(False, "error: no train.jsonl in s3://b/data/"))


def test_pod_report_reads_the_main_containers_termination_message() -> None:
    assert pod_report(pod("train", code=0, message=OK), "train") == PhaseReport(
        True, "trained 10 steps", {"step": 10}
    )
    assert pod_report(pod("train", code=2, message=ERROR), "train") == PhaseReport(
        False, "error: no train.jsonl in s3://b/data/"
    )
    assert pod_report(pod("train", code=None), "train") is None  # still running


def test_without_a_report_the_reason_and_exit_code_speak() -> None:
    killed = pod_report(pod("train", code=137, reason="OOMKilled"), "train")
    assert killed == PhaseReport(False, "container train ended with OOMKilled (exit code 137)")
    # Plain text (FallbackToLogsOnError puts the log tail there) is kept as the reason.
    crashed = pod_report(pod("train", code=1, message="Traceback ...\nRuntimeError: CUDA error"), "train")
    assert crashed == PhaseReport(False, "Traceback ... RuntimeError: CUDA error")
    # A success report from a container that then crashed is not believed.
    assert pod_report(pod("train", code=139, message=OK, reason="Error"), "train") == PhaseReport(
        False, "container train ended with Error (exit code 139)"
    )


def test_a_failed_init_container_is_the_reason() -> None:
    failing = pod(
        "prepare-data",
        code=None,
        init={
            "exitCode": 2,
            "message": encode(
                PhaseReport(False, "error: git clone of https://example.test/a.git failed: not found")
            ),
        },
    )
    assert pod_report(failing, "data") == PhaseReport(
        False, "fetch-inputs: error: git clone of https://example.test/a.git failed: not found"
    )


def test_job_report_prefers_the_pod_matching_the_outcome() -> None:
    first = pod(
        "train", code=143, message=encode(PhaseReport(False, "preempted")), finished="2026-11-21T10:00:00Z"
    )
    second = pod("train", code=0, message=OK, finished="2026-11-21T11:00:00Z")
    succeeded = ObservedJob("j", "train", "h", "succeeded")
    assert job_report(succeeded, [second, first]) == PhaseReport(True, "trained 10 steps", {"step": 10})
    failed = ObservedJob("j", "train", "h", "failed", message="Job j failed: BackoffLimitExceeded")
    report = job_report(failed, [first])
    assert report == PhaseReport(False, "preempted")
    assert with_report(failed, report).message == "preempted"
    assert with_report(failed, None).message == "Job j failed: BackoffLimitExceeded"


def test_observed_job_keeps_the_job_controllers_failure_reason() -> None:
    job = {
        "metadata": {
            "name": "r-train-1",
            "labels": {"ftrecipe.dev/phase": "train"},
            "annotations": {"ftrecipe.dev/inputs-hash": "abc"},
        },
        "status": {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "DeadlineExceeded",
                    "message": "Job was active longer than specified deadline",
                }
            ]
        },
    }
    seen = observed_job(job)
    assert seen is not None and seen.state == "failed" and seen.failure_reason == "DeadlineExceeded"


def test_latest_progress_line() -> None:
    lines = [
        json.dumps({"event": "progress", "step": 1, "total_steps": 9, "train_loss": 2.0}),
        "{not json",
        json.dumps({"event": "progress", "step": 2, "total_steps": 9, "train_loss": 1.5, "eta_seconds": 70}),
        "Saving checkpoint",
        json.dumps({"event": "checkpoint", "step": 2}),
    ]
    assert latest_progress("\n".join(lines), "train") == {
        "step": 2,
        "total_steps": 9,
        "epoch": None,
        "train_loss": 1.5,
        "eval_loss": None,
        "eta_seconds": 70,
    }
    assert latest_progress("no progress yet\n", "train") is None


def test_latest_evaluation_progress_line() -> None:
    # What evaluate's container log holds: its JSON lines on stdout, people's lines from stderr.
    lines = [
        "loading adapter from /workspace/adapter",
        json.dumps({"event": "progress", "stage": "generate", "done": 0, "total": 480, "eta_seconds": None}),
        json.dumps(
            {"event": "progress", "stage": "generate", "done": 120, "total": 480, "eta_seconds": 125.3}
        ),
        "a library warning",
        json.dumps({"event": "done", "summary": "command accuracy 87.5%", "num_turns": 480}),
    ]
    expected = {"stage": "generate", "done": 120, "total": 480, "eta_seconds": 125.3}
    assert latest_progress("\n".join(lines), "evaluate") == expected
    assert latest_progress(lines[0], "evaluate") is None


def test_report_cache_is_bounded() -> None:
    cache = ReportCache(size=2)
    cache.put("a", None)
    cache.put("b", PhaseReport(True, "b"))
    assert cache.get("a") == (True, None)  # known, and now the most recent
    cache.put("c", PhaseReport(True, "c"))
    assert cache.get("b") == (False, None) and cache.get("a") == (True, None)
