"""`ftrecipe operator` as its own process, the way the Deployment runs it: against the emulated cluster
through a kubeconfig, with its health endpoint, Prometheus metrics and JSON logs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from support.k8s import CRD_RESOURCE, K8s
from support.processes import stop_gracefully
from test_operator import JOBS, NS, apply, expected_job, manifest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def wait_until(probe: Any, what: str, process: subprocess.Popen[str], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the operator exited with {process.returncode} while waiting for {what}")
        try:
            found = probe()
        except OSError:
            found = None
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def operator_process(
    k8s: K8s, tmp_path: Path, *options: str, env: Mapping[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int, int, Path]]:
    """`ftrecipe operator --namespace ml …` as a process (with `env` over this one's), stopped with SIGTERM
    at the end."""
    k8s.ensure_namespace(NS)
    metrics_port, health_port = free_port(), free_port()
    log = tmp_path / "operator.log"
    env = {
        **os.environ,
        "KUBECONFIG": os.environ["KUBECONFIG"],
        "FTRECIPE_OPERATOR_IMAGE": "registry.test/op:1",
        **(env or {}),
    }
    argv = [
        sys.executable, "-m", "ftrecipe.cli.main", "operator",
        "--namespace", NS,
        "--liveness", f"http://127.0.0.1:{health_port}/healthz",
        "--metrics-port", str(metrics_port),
        "--resync-seconds", "0",
        *options,
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        yield process, metrics_port, health_port, log
    finally:
        stop_gracefully(process)


def test_the_operator_process_serves_health_metrics_and_json_logs(k8s: K8s, tmp_path: Path) -> None:
    with operator_process(k8s, tmp_path, "--log-format", "json", "--standalone") as running:
        check_health_metrics_and_logs(k8s, *running)


def check_health_metrics_and_logs(
    k8s: K8s, process: subprocess.Popen[str], metrics_port: int, health_port: int, log: Path
) -> None:
    wait_until(lambda: get(f"http://127.0.0.1:{health_port}/healthz"), "the health endpoint", process)
    body = manifest()
    apply(k8s, body)
    data_name = expected_job(body, "data")
    job = wait_until(lambda: k8s.get(JOBS, data_name, NS), "the data Job", process)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.test/op:1"
    wait_until(
        lambda: (
            ((k8s.get(CRD_RESOURCE, "minimal", NS) or {}).get("status") or {}).get("phase") == "PreparingData"
        ),
        "phase PreparingData",
        process,
    )
    scraped = wait_until(
        lambda: (
            (text := get(f"http://127.0.0.1:{metrics_port}/metrics"))
            and 'ftrecipe_recipes{phase="PreparingData"} 1.0' in text
            and text
        ),
        "the recipe counted in the metrics",
        process,
    )
    assert 'ftrecipe_jobs_created_total{phase="data"} 1.0' in scraped

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is a JSON object
    assert any(r.get("object", {}).get("name") == "minimal" for r in records), lines[-5:]
    assert all({"message", "severity"} <= r.keys() for r in records), records[:3]


def test_a_replica_with_peering_creates_its_peering_object(k8s: K8s, tmp_path: Path) -> None:
    peerings = "kopf.dev/v1/kopfpeerings"
    with operator_process(k8s, tmp_path, "--peering", "ftrecipe", "--priority", "10") as (process, *_, log):
        body = manifest()
        apply(k8s, body)
        wait_until(lambda: k8s.get(JOBS, expected_job(body, "data"), NS), "the data Job", process)
        assert k8s.get(peerings, "ftrecipe", NS) is not None
        assert "created KopfPeering ml/ftrecipe" in log.read_text()
        wait_until(
            lambda: any(
                p.get("priority") == 10
                for p in ((k8s.get(peerings, "ftrecipe", NS) or {}).get("status") or {}).values()
            ),
            "the replica's keep-alive in the peering object",
            process,
        )
    # A second start finds it there: no error, it serves, and stops cleanly.
    with operator_process(k8s, tmp_path, "--peering", "ftrecipe") as (process, _, health_port, log):
        wait_until(lambda: get(f"http://127.0.0.1:{health_port}/healthz"), "the health endpoint", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()[-2000:]
        assert "created KopfPeering" not in log.read_text()
