"""One rank fails on its own under torchrun: the pod says which rank, and why, not what the others saw.

torchrun stops the surviving ranks (SIGTERM, then SIGKILL) when one fails and exits 1 whatever happened;
ranks on other nodes break at their next collective ("Connection closed by peer"). Each rank that fails
leaves a `RankFailure` for its pod's `ftrecipe train` (`launch.RANK_REPORTS_ENV`), which writes the
pod's termination message and exit code (`launch.pod_outcome`); the operator shows, of a failed JobSet's
pods, the one whose rank failed on its own (`observe.jobset_report`).

- the choice, on values written here;
- one two-node launch on the CPU (gloo, one rank per node, each node its own termination log): rank 1
  raises torch's CUDA OOM at its third optimizer step (injected by a test-only `sitecustomize` in the rank
  whose RANK is 1; nothing of ours is replaced); its node reports it and exits 1, the other node reports
  its rank 0 as broken by a peer, and the operator's choice among the two real messages is rank 1's;
- the operator against the emulated cluster: a failed JobSet's status shows the failing pod's line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ftrecipe.controller.manifests import JOBSET_MAX_RESTARTS
from ftrecipe.controller.observe import jobset_report
from ftrecipe.plan.planner import ObservedJob
from ftrecipe.termination import PhaseReport, decode, encode, failure_order
from ftrecipe.training.launch import PodOutcome, RankFailure, pod_outcome
from support.k8s import K8s
from test_operator import NS, apply, condition, handlers, wait_phase, wait_status
from test_operator_jobset import OPTIONS, attempt_tag, child_of, jobset_of, prepare_data, run_nodes, two_nodes

OOM = "error: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
GLOO = (
    "error: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] "
    "Connection closed by peer [127.0.0.1]:44978. This is typically caused by a remote worker crashing."
)
T0 = 1_796_300_000.0  # 2026-12-03T12:13:20Z


def failure(
    rank: int, at: float, message: str, outcome: Any = "error", signalled: bool = False
) -> RankFailure:
    return RankFailure(rank, 2, T0 + at, outcome, message, signalled)


# --------------------------------------------------------------------------------------------- the choice


def test_the_rank_that_failed_on_its_own_is_the_pods_report() -> None:
    """One pod, two GPUs: rank 1 runs out of memory; torchrun SIGTERMs rank 0, whose next collective
    fails. Even a collateral failure stamped earlier (clocks, a slow write) never wins."""
    own = failure(1, 0.0, OOM)
    stopped = failure(0, 2.3, GLOO, signalled=True)
    want = PodOutcome(
        1,
        PhaseReport(
            False,
            "rank 1 of 2: error: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
            {"rank": 1, "world_size": 2, "failed_at": "2026-12-03T12:13:20.000Z", "cause": "own"},
        ),
    )
    assert pod_outcome([stopped, own], 1, sigterm=False) == want
    assert pod_outcome([failure(0, -5.0, GLOO), own], 1, sigterm=False) == want
    # a rank SIGTERMed by torchrun whose error says nothing of collectives is collateral too
    signalled = failure(0, -5.0, "error: ValueError: interrupted", signalled=True)
    assert pod_outcome([signalled, own], 1, sigterm=False) == want
    # two own failures: the earliest
    later = failure(0, 4.0, "error: ValueError: nan loss")
    assert pod_outcome([later, own], 1, sigterm=False) == want


def test_bad_input_exits_2_and_a_pod_sigterm_does_not_hide_a_crash() -> None:
    missing = "error: data s3://b/data/: no train.jsonl"
    outcome = pod_outcome(
        [failure(0, 1.0, missing, "bad-input"), failure(1, 0.5, missing, "bad-input")], 1, False
    )
    assert outcome.code == 2  # the Job's podFailurePolicy fails at once: no retry
    assert outcome.report is not None
    assert outcome.report.message == "rank 1 of 2: error: data s3://b/data/: no train.jsonl"
    # a crash during a preemption is a crash: never "preempted"
    crashed = pod_outcome(
        [failure(1, 0.0, OOM), failure(0, 1.0, "preempted: stopped at step 3", "preempted")], 1, True
    )
    assert (
        crashed.code == 1
        and crashed.report is not None
        and crashed.report.message.startswith("rank 1 of 2: error")
    )


def test_a_preemption_still_exits_143_with_its_line() -> None:
    stopped = [failure(r, r, "preempted: stopped at step 3 after SIGTERM", "preempted") for r in (1, 0)]
    outcome = pod_outcome(stopped, 1, sigterm=True)
    assert outcome.code == 143
    assert (
        outcome.report is not None and outcome.report.message == "preempted: stopped at step 3 after SIGTERM"
    )
    assert outcome.report.figures["cause"] == "preempted"
    # another node was preempted: this one's ranks stopped with it, though this pod got no SIGTERM
    assert pod_outcome(stopped, 1, sigterm=False).code == 143
    # SIGTERM to the pod: ranks that broke while the group was torn down do not make it a crash
    torn = pod_outcome([failure(0, 0.0, GLOO, signalled=True)], 1, sigterm=True)
    assert torn == PodOutcome(
        143, PhaseReport(False, "preempted: SIGTERM; rerun to resume", {"cause": "preempted"})
    )


def test_a_node_whose_ranks_only_broke_says_so_and_nothing_reported_says_that() -> None:
    """The other node of a group: its rank 0 broke because rank 1 (on the failing node) vanished."""
    outcome = pod_outcome([failure(0, 2.0, GLOO)], 1, sigterm=False)
    assert outcome.code == 1 and outcome.report is not None
    assert outcome.report.message == (
        "rank 0 of 2, after another rank failed (its own pod's message or log says why): " + GLOO
    )
    assert outcome.report.figures["cause"] == "peer"
    silent = pod_outcome([], 1, sigterm=False)
    assert silent.code == 1 and silent.report is not None
    assert silent.report.message.startswith("error: torchrun exited 1 and no rank reported why")
    assert pod_outcome([], 137, sigterm=False).code == 137  # torchrun SIGKILLed
    assert pod_outcome([failure(1, 0.0, OOM)], 0, sigterm=False) == PodOutcome(0, None)  # rank 0 reported


@pytest.mark.parametrize(
    ("message", "collateral"),
    [
        (GLOO, True),
        (
            "error: RuntimeError: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out",
            True,
        ),
        (
            "error: DistBackendError: [Rank 0] Watchdog caught collective operation timeout: WorkNCCL(...)",
            True,
        ),
        ("error: RuntimeError: NCCL communicator was aborted on rank 0", True),
        ("error: DistNetworkError: Connection reset by peer", True),
        ("error: DistStoreError: Socket Timeout", True),
        (OOM, False),
        ("error: ValueError: expected sequence of length 4 at dim 1", False),
        ("error: data s3://b/data/: no train.jsonl", False),
    ],
)
def test_what_counts_as_broken_by_a_peer(message: str, collateral: bool) -> None:
    assert failure(0, 0.0, message).collateral is collateral


def test_a_rank_failure_reads_back_and_anything_else_is_none() -> None:
    written = failure(1, 0.25, OOM, signalled=True)
    assert RankFailure.from_json(written.to_json()) == written
    for text in (
        "",
        '{"rank": 1',
        '{"rank": 1}',
        json.dumps({**json.loads(written.to_json()), "outcome": "?"}),
    ):
        assert RankFailure.from_json(text) is None


def _pod(index: int, message: str, finished: str, code: int = 1) -> dict[str, Any]:
    terminated = {"exitCode": code, "reason": "Error", "message": message, "finishedAt": finished}
    return {
        "metadata": {"labels": {"batch.kubernetes.io/job-completion-index": str(index)}},
        "status": {"containerStatuses": [{"name": "train", "state": {"terminated": terminated}}]},
    }


FAILED_JOBSET = ObservedJob(
    "r-train-1", "train", "h" * 12, "failed", kind="JobSet", restarts=0, max_restarts=3
)


def test_a_failed_jobset_reports_the_pod_that_failed_on_its_own() -> None:
    own = encode(
        PhaseReport(False, "rank 1 of 2: " + OOM, {"cause": "own", "failed_at": "2026-12-02T11:33:20.000Z"})
    )
    peer = encode(
        PhaseReport(
            False, "rank 0 of 2, after…: " + GLOO, {"cause": "peer", "failed_at": "2026-12-02T11:33:22.000Z"}
        )
    )
    killed = ""  # a pod OOM-killed by the kubelet writes nothing
    pods = [_pod(1, own, "2026-12-02T11:33:21Z"), _pod(0, peer, "2026-12-02T11:33:23Z")]
    report = jobset_report(FAILED_JOBSET, pods)
    assert report is not None and report.message == "rank 1 of 2: " + OOM
    # a pod that says nothing (killed) tells more than a rank that broke because of it
    pods = [_pod(0, peer, "2026-12-02T11:33:23Z"), _pod(1, killed, "2026-12-02T11:33:25Z", code=137)]
    report = jobset_report(FAILED_JOBSET, pods)
    assert report is not None and report.message == "container train ended with Error (exit code 137)"
    assert [failure_order(decode(text) or PhaseReport(False, "")) for text in (own, killed, peer)] == [
        0,
        1,
        2,
    ]


# --------------------------------------------------------------------------------------------- one launch

# Test-only: imported at start-up by every Python process of the launch (PYTHONPATH); acts only in the
# process whose RANK is 1, through torch's global optimizer-step hook.
INJECT = """
import os

if os.environ.get("RANK") == "1":
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    steps = [0]

    def fail_at_step_3(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    register_optimizer_step_pre_hook(fail_at_step_3)
"""
SETTINGS = [
    "hyperparameters.maxSeqLength=256",
    "hyperparameters.batchSize=2",
    "hyperparameters.gradientAccumulationSteps=1",
    "hyperparameters.warmupSteps=0",
    "hyperparameters.gradientCheckpointing=false",
    "hyperparameters.epochs=1",
    "hyperparameters.evalEverySteps=1000",
    "checkpointEverySteps=1000",
]


def _write_data(root: Path) -> Path:
    """16 training examples (4 steps of 2 per rank on 2 ranks) and 2 for validation."""
    root.mkdir(parents=True)
    for name, count in (("train.jsonl", 16), ("val.jsonl", 2)):
        rows = [
            {
                "prompt": f"USER: send {i} dollars to contact {i % 3}\nWhat next?",
                "completion": "start flow transfer_money",
            }
            for i in range(count)
        ]
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return root


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
def test_one_rank_out_of_memory_names_that_rank_on_its_node(tiny_model: Path, tmp_path: Path) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT, encoding="utf-8")
    data = _write_data(tmp_path / "data")
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH", "")) if p)
    port, processes = _free_port(), []
    try:
        for node in (0, 1):
            log = tmp_path / f"termination-{node}"
            log.write_text("", encoding="utf-8")
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": path,
                "FTRECIPE_TERMINATION_LOG": str(log),
            }
            argv = [sys.executable, "-m", "ftrecipe.cli.main", "train", "--data", str(data)]
            argv += [
                "--base-model",
                str(tiny_model),
                "--out",
                str(tmp_path / "out"),
                "--work-dir",
                str(tmp_path / f"work{node}"),
            ]
            argv += ["--nodes", "2", "--rendezvous", f"127.0.0.1:{port}", "--node-rank", str(node)]
            for item in SETTINGS:
                argv += ["--set", item]
            with (tmp_path / f"node{node}.err").open("wb") as err:
                processes.append(
                    subprocess.Popen(
                        argv, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True
                    )
                )
        deadline = time.monotonic() + 240
        codes = [process.wait(timeout=max(1.0, deadline - time.monotonic())) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    stderr = [(tmp_path / f"node{node}.err").read_text(encoding="utf-8", errors="replace") for node in (0, 1)]
    tails = "\n".join(f"--- node {node}\n{text[-3000:]}" for node, text in enumerate(stderr))
    assert "OutOfMemoryError" in "".join(stderr), tails  # the injection fired
    reports = [decode((tmp_path / f"termination-{node}").read_text(encoding="utf-8")) for node in (0, 1)]
    assert codes == [1, 1], tails  # neither a preemption (143) nor bad input (2)
    by_rank = {
        int(report.figures.get("rank", -1)): (node, report)
        for node, report in enumerate(reports)
        if report is not None
    }
    assert sorted(by_rank) == [0, 1], (reports, tails)
    failing_node, own = by_rank[1]
    assert own.ok is False and own.message == "rank 1 of 2: " + OOM
    assert (own.figures["cause"], own.figures["world_size"]) == ("own", 2)
    assert stderr[failing_node].rstrip().endswith("rank 1 of 2: " + OOM)  # the pod's log ends with it
    _, peer = by_rank[0]
    assert (
        peer.message.startswith("rank 0 of 2, after another rank failed") and peer.figures["cause"] == "peer"
    )
    for report in (own, peer):
        assert "preempted" not in report.message
    assert "gloo" not in own.message and "Connection closed" not in own.message
    # The operator's pick among the two pods' real messages, the collateral one finished last.
    pods = [
        _pod(failing_node, encode(own), "2026-12-02T11:33:20Z"),
        _pod(1 - failing_node, encode(peer), "2026-12-02T11:33:30Z"),
    ]
    assert jobset_report(FAILED_JOBSET, pods) == own


# --------------------------------------------------------------------------------------------- the operator


def test_a_failed_jobset_shows_the_pod_whose_rank_failed_on_its_own(k8s: K8s) -> None:
    k8s.install_jobset()
    body = two_nodes()
    jobset = jobset_of(body)
    own = encode(PhaseReport(False, "rank 1 of 2: " + OOM, {"rank": 1, "world_size": 2, "cause": "own"}))
    peer = encode(
        PhaseReport(
            False,
            "rank 0 of 2, after another rank failed (its own pod's message or log says why): " + GLOO,
            {"rank": 0, "world_size": 2, "cause": "peer"},
        )
    )
    with k8s.run_operator(handlers(progress_seconds=0.2), **OPTIONS) as run:
        apply(k8s, body)
        prepare_data(k8s, body)
        for attempt in range(JOBSET_MAX_RESTARTS + 1):
            child = child_of(k8s, jobset, attempt)
            run_nodes(k8s, child)
            if attempt == 0:
                wait_status(k8s, lambda s: s.get("phase") == "Training", "training")
            tag = attempt_tag(k8s, child)
            # node 1's rank fails first; node 0's, broken by it, finishes last (the pod the operator used)
            k8s.set_job_pod(
                child, NS, "Failed", container="train", suffix=f"1-p{tag}", exit_code=1, message=own
            )
            time.sleep(1.1)  # finishedAt has whole seconds
            k8s.set_job_pod(
                child, NS, "Failed", container="train", suffix=f"0-p{tag}", exit_code=1, message=peer
            )
            k8s.set_job_status(child, NS, "failed")
            if attempt < JOBSET_MAX_RESTARTS:
                wait_status(
                    k8s,
                    lambda s, n=attempt + 1: s.get("training", {}).get("restarts") == n,
                    f"restart {attempt + 1}",
                )
        st = wait_phase(k8s, "Failed")
        expected = f"rank 1 of 2: {OOM} (JobSet {jobset} failed after {JOBSET_MAX_RESTARTS} of {JOBSET_MAX_RESTARTS} restarts)"
        assert st["message"] == expected
        assert condition(st, "Trained")["reason"] == "JobFailed"
    assert not run.errors, run.messages()
