"""The operator at scale: N FinetuneRecipes applied at once, driven through a full lifecycle.

`ftrecipe operator` runs as its own process (as the Deployment runs it, with its default settings:
resync every 60 s, training progress every 10 s, standalone) against the kmock-based Kubernetes emulator
(`support.k8s.KubeCluster`, in this process) through a kubeconfig. This script plays the user and the
Job controller with the emulator's direct helpers (no HTTP, so every request the emulator records is the
operator's): it creates N recipes (`examples/recipes/minimal.yaml`, renamed), waits until every data Job
exists, then finishes every Job of a phase the way the kubelet and the Job controller would (a pod whose
container ends with the phase's report as its termination message, then the Job's Complete condition),
phase after phase, until every recipe is `Succeeded`. Evaluation is enabled (`--no-evaluation` skips it).

Per N: time until every data Job exists, time of the whole lifecycle, the operator's API requests per
recipe (by verb and resource), status patches and Events (by reason) per recipe, the operator's CPU
seconds, the machine's load average at the start and the end, and the operator's RSS (idle
before the recipes, after the data Jobs, at the end, and the peak, VmHWM), and the TCP connections it
opened: the operator reaches the emulator through a counting proxy (`support.tcp_proxy`, in this
process), which counts connections by the User-Agent of their first request (the `kubernetes` client's
against kopf's), next to the requests each client made. ``--tls`` makes the proxy terminate TLS (the
test certificate in `tests/support/tls/`), so each new connection also costs a handshake, as on a real
cluster; by default it is plain HTTP on loopback. The operator's log is kept
beside the JSON file (`<json stem>-<N>.log`). The emulator is the tests' own (a request costs the same
however many came before), with the OpenAPI/CEL validation of recipe writes off.

``--heap FRAMES`` (a developer's option) runs the operator under `traced_operator.py` and takes its heap
figures when idle, once every recipe is PreparingData, and at the end (RSS, glibc's and pymalloc's
arenas, live objects by type; kept in ``<json stem>-<N>-heap/``). With FRAMES > 0 tracemalloc traces the
operator's allocations (FRAMES frames each): the largest allocation sites and what grew from idle go
into the JSON and on the terminal. Tracing slows the operator and adds to its RSS (its own
bookkeeping), so RSS figures of a traced run are not the untraced ones; ``--heap 0`` leaves them as
they are.

    .venv/bin/python benchmarks/operator_scale.py [--recipes 200 500] [--no-evaluation] [--tls]
        [--json output/benchmarks/operator_scale.json] [--heap FRAMES]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUTPUT, ROOT, machine, rss_mib, table, write_json

sys.path.insert(0, str(ROOT / "tests"))

import yaml

from ftrecipe.controller.manifests import LABEL_PHASE, LABEL_RECIPE, MAIN_CONTAINER
from ftrecipe.plan.cache_key import Phase
from ftrecipe.termination import PhaseReport, encode
from support.k8s import CRD_PLURAL, CRD_RESOURCE, KubeCluster
from support.processes import stop_gracefully
from support.tcp_proxy import TLS_CA, CountingProxy

Body = dict[str, Any]
NS = "ml"
JOBS = "batch/v1/jobs"
MINIMAL = ROOT / "examples" / "recipes" / "minimal.yaml"
REPORTS: dict[Phase, PhaseReport] = {
    "data": PhaseReport(
        ok=True,
        message="data published",
        figures={"num_input_e2e_tests": 35, "num_ft_data_points": 120, "llm_calls": 310},
    ),
    "train": PhaseReport(
        ok=True, message="trained", figures={"step": 30, "total_steps": 30, "eval_loss": 0.7}
    ),
    "evaluate": PhaseReport(
        ok=True, message="scored", figures={"command_accuracy": 0.9, "per_command_f1": {"start flow": 0.95}}
    ),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--no-evaluation", action="store_true", help="recipes with evaluation.enabled false")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="the operator reaches the emulator over TLS (the proxy terminates it)",
    )
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for each milestone")
    parser.add_argument("--json", type=Path, default=OUTPUT / "operator_scale.json")
    parser.add_argument(
        "--heap",
        type=int,
        default=None,
        metavar="FRAMES",
        help="take the operator's heap figures; FRAMES > 0 also traces its allocations with tracemalloc",
    )
    return parser.parse_args(argv)


def recipe(name: str, evaluation: bool) -> dict[str, Any]:
    body = cast(dict[str, Any], yaml.safe_load(MINIMAL.read_text(encoding="utf-8")))
    body["metadata"] = {"name": name}
    body["spec"]["evaluation"] = {"enabled": evaluation}
    return body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """Samples a process's RSS every `interval` seconds, keeping the maximum seen."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, rss_mib(self.pid))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@dataclasses.dataclass(frozen=True)
class Tracing:
    """Where a traced operator (`traced_operator.py`) dumps its snapshots, and how many frames it keeps."""

    directory: Path
    frames: int


def proxied_kubeconfig(cluster: KubeCluster, proxy: CountingProxy, path: Path) -> Path:
    """The emulator's kubeconfig with the proxy as the server (and its CA when it speaks TLS)."""
    config = yaml.safe_load(cluster.kubeconfig(path).read_text())
    server = config["clusters"][0]["cluster"]
    server["server"] = proxy.url
    if proxy.tls:
        server["certificate-authority"] = str(TLS_CA)
    path.write_text(yaml.safe_dump(config))
    return path


CLIENT_AGENT: Final = "OpenAPI-Generator"  # the `kubernetes` client's User-Agent (kube_request)


def client_name(user_agent: str) -> str:
    return "kubernetes client" if user_agent.startswith(CLIENT_AGENT) else user_agent.split("/", 1)[0]


def requests_by_client(cluster: KubeCluster, first: int) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for request in cluster.requests()[first:]:
        counts[client_name(request.headers.get("User-Agent", "-"))] += 1
    return dict(counts.most_common())


def connections_by_client(proxy: CountingProxy, before: collections.Counter[str]) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for agent, count in (proxy.user_agents - before).items():
        counts[client_name(agent)] += count
    return dict(counts.most_common())


@contextlib.contextmanager
def operator_process(
    cluster: KubeCluster, proxy: CountingProxy, work: Path, tracing: Tracing | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    kubeconfig = proxied_kubeconfig(cluster, proxy, work / "kubeconfig")
    metrics_port, health_port = free_port(), free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "FTRECIPE_OPERATOR_IMAGE": "registry.test/op:1"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    argv = [sys.executable, "-m", "ftrecipe.cli.main"]
    if tracing is not None:
        traced = Path(__file__).resolve().with_name("traced_operator.py")
        argv = [sys.executable, str(traced), str(tracing.directory), str(tracing.frames)]
    argv += ["operator", "--namespace", NS, "--standalone"]
    argv += ["--liveness", f"http://127.0.0.1:{health_port}/healthz", "--metrics-port", str(metrics_port)]
    with (work / "operator.log").open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        yield process, metrics_port, health_port
    finally:
        stop_gracefully(process)


def snapshot(process: subprocess.Popen[bytes], tracing: Tracing | None, label: str) -> None:
    """Ask a traced operator for a tracemalloc snapshot and wait until it is written."""
    if tracing is None:
        return
    index = len(list(tracing.directory.glob("snapshot-*.done")))
    process.send_signal(signal.SIGUSR1)
    done = tracing.directory / f"snapshot-{index}.done"
    wait_until(done.exists, f"tracemalloc snapshot {label}", process, 600)
    (tracing.directory / f"snapshot-{index}.label").write_text(label)


def _site(statistic: tracemalloc.Statistic | tracemalloc.StatisticDiff) -> str:
    frames = statistic.traceback
    where = " <- ".join(f"{_short(frame.filename)}:{frame.lineno}" for frame in frames)
    return where


def _short(filename: str) -> str:
    for marker in ("site-packages/", "operator/", "lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


_PYMALLOC_FIGURES: Final = {
    "arenas": "arenas allocated current",
    "in_blocks": "bytes in allocated blocks",
    "free_blocks": "bytes in available blocks",
}


def heap_report(directory: Path, top: int = 25) -> dict[str, Any]:
    """Each snapshot's RSS, glibc and pymalloc figures and live objects by type; when traced, the
    largest live allocation sites (by file, line and traceback) and what grew from the first snapshot
    (idle) to each later one."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<unknown>")]
    report: dict[str, Any] = {}
    stems = sorted(directory.glob("snapshot-*.done"), key=lambda p: int(p.stem.split("-")[1]))
    first: tracemalloc.Snapshot | None = None
    for done in stems:
        stem = done.with_suffix("")
        label = stem.with_suffix(".label").read_text() if stem.with_suffix(".label").exists() else stem.name
        facts = json.loads(stem.with_suffix(".json").read_text())
        pymalloc = facts.get("pymalloc") or {}
        entry: dict[str, Any] = {
            "rss_mib": round(facts["rss_kib"] / 1024, 1),
            "traced_mib": round(facts["traced_bytes"] / 2**20, 1),
            "tracemalloc_overhead_mib": round(facts["tracemalloc_overhead_bytes"] / 2**20, 1),
            "glibc_heap_mib": {k: round(v / 2**20, 1) for k, v in (facts["glibc_heap"] or {}).items()},
            "pymalloc_mib": {
                key: round(pymalloc.get(name, 0) / (1 if key == "arenas" else 2**20), 1)
                for key, name in _PYMALLOC_FIGURES.items()
            },
            "gc_objects_by_type": facts["gc_objects_by_type"],
        }
        report[label] = entry
        traces = stem.with_suffix(".tracemalloc")
        if not traces.exists():
            continue
        loaded = tracemalloc.Snapshot.load(str(traces)).filter_traces(ignore)
        for group in ("filename", "lineno", "traceback"):
            entry[f"by_{group}"] = [
                f"{s.size / 2**20:8.2f} MiB {s.count:9d} {_site(s)}" for s in loaded.statistics(group)[:top]
            ]
        if first is None:
            first = loaded
            continue
        for group in ("filename", "lineno", "traceback"):
            entry[f"grown_by_{group}"] = [
                f"{s.size_diff / 2**20:+8.2f} MiB {s.count_diff:+9d} {_site(s)}"
                for s in loaded.compare_to(first, group)[:top]
            ]
    return report


def wait_until(probe: Callable[[], Any], what: str, process: subprocess.Popen[bytes], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the operator exited with {process.returncode} while waiting for {what}")
        with contextlib.suppress(OSError):
            found = probe()
            if found:
                return found
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def census(cluster: KubeCluster) -> tuple[dict[str, dict[str, str]], collections.Counter[str]]:
    """Jobs by phase (recipe → Job name) and recipes by status phase, read in place (no copies: the
    emulator's own helpers deep-copy every object, which at this scale would cost more than polling)."""

    async def read(emulator: Any) -> tuple[dict[str, dict[str, str]], collections.Counter[str]]:
        jobs: dict[str, dict[str, str]] = collections.defaultdict(dict)
        phases: collections.Counter[str] = collections.Counter()
        for (resource, namespace, name), obj in emulator.objects.items():
            if namespace != NS or obj.deleted:
                continue
            if resource.plural == "jobs":
                labels = obj.raw["metadata"].get("labels") or {}
                jobs[labels.get(LABEL_PHASE, "?")][labels.get(LABEL_RECIPE, "?")] = name
            elif resource.plural == CRD_PLURAL:
                phases[(obj.raw.get("status") or {}).get("phase") or "-"] += 1
        return jobs, phases

    return cluster._locked(read)  # the helpers' own lock: consistent with the emulator's writes


def jobs_of(cluster: KubeCluster, phase: str, n: int) -> dict[str, str] | None:
    found = census(cluster)[0].get(phase, {})
    return found if len(found) == n else None


def finish(cluster: KubeCluster, phase: Phase, jobs: dict[str, str]) -> None:
    """The kubelet writes each pod's final status (with the report), then the Job controller the Job's."""
    message = encode(REPORTS[phase])
    for job in jobs.values():
        cluster.set_job_pod(job, NS, "Succeeded", container=MAIN_CONTAINER[phase], message=message)
        cluster.set_job_status(job, NS, "succeeded")


def recipe_patches(cluster: KubeCluster, first: int) -> dict[str, int]:
    """What the operator's patches of the recipe object itself (not its status) change: the annotation
    keys, or other top-level fields, each patch sets."""
    counts: collections.Counter[str] = collections.Counter()
    for request in cluster.requests()[first:]:
        if request.resource is None or request.resource.plural != CRD_PLURAL or request.subresource:
            continue
        if request.action is None or request.action.value != "UPDATE" or not isinstance(request.data, dict):
            continue
        annotations = (request.data.get("metadata") or {}).get("annotations") or {}
        others = [key for key in request.data if key != "metadata"]
        others += [f"metadata.{key}" for key in request.data.get("metadata") or {} if key != "annotations"]
        counts[" + ".join(sorted(annotations) + sorted(others)) or "(empty)"] += 1
    return dict(counts.most_common())


def event_reasons(cluster: KubeCluster, first: int) -> dict[str, int]:
    """The Events the operator tried to create (also any the API refused), by reason."""
    counts: collections.Counter[str] = collections.Counter()
    for request in cluster.requests()[first:]:
        if request.resource is None or request.resource.plural != "events" or request.method != "POST":
            continue
        data = request.data if isinstance(request.data, dict) else {}
        counts[str(data.get("reason"))] += 1
    return dict(counts.most_common())


def request_counts(cluster: KubeCluster, first: int) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for request in cluster.requests()[first:]:
        resource = request.resource.plural if request.resource is not None else "-"
        sub = f"/{request.subresource}" if request.subresource else ""
        action = request.action.value if request.action is not None else request.method
        counts[f"{action} {resource}{sub}"] += 1
    return dict(sorted(counts.items()))


def run_scale(
    n: int,
    evaluation: bool,
    timeout: float,
    log_copy: Path,
    heap_frames: int | None = None,
    tls: bool = False,
) -> dict[str, Any]:
    phases: list[Phase] = ["data", "train", "evaluate"] if evaluation else ["data", "train"]
    # Validation off: the operator's writes are valid (tests/test_operator.py checks them with it on), and
    # here the emulator's OpenAPI checks of every recipe write would only take CPU from the operator.
    with (
        tempfile.TemporaryDirectory(prefix="ftrecipe-bench-operator-") as tmp,
        KubeCluster(validation=False) as cluster,
        CountingProxy(int(cluster.url.rsplit(":", 1)[1]), tls=tls) as proxy,
    ):
        cluster.ensure_namespace(NS)
        tracing = None
        if heap_frames is not None:
            tracing = Tracing(log_copy.with_name(f"{log_copy.stem}-heap"), heap_frames)
            shutil.rmtree(tracing.directory, ignore_errors=True)
        with operator_process(cluster, proxy, Path(tmp), tracing) as (process, metrics_port, health_port):
            wait_until(lambda: get(f"http://127.0.0.1:{health_port}/healthz"), "health", process, 60)
            wait_until(
                lambda: cluster.watching(CRD_RESOURCE, NS) and cluster.watching(JOBS, NS),
                "the operator's watches",
                process,
                60,
            )
            time.sleep(1.0)  # settle: imports done, watches open
            snapshot(process, tracing, "idle")
            load_start = os.getloadavg()
            sampler = RssSampler(process.pid)
            sampler.start()
            rss_idle = rss_mib(process.pid)
            cpu_idle = cpu_seconds(process.pid)
            first_request = len(cluster.requests())
            connections_before = collections.Counter(proxy.user_agents)
            bodies = [recipe(f"recipe-{i:04d}", evaluation) for i in range(n)]
            started = time.monotonic()
            for body in bodies:
                cluster.create(CRD_RESOURCE, copy.deepcopy(body), NS)
            applied_s = time.monotonic() - started
            data_jobs = wait_until(
                lambda: jobs_of(cluster, "data", n),
                f"{n} data Jobs",
                process,
                timeout,
            )
            data_jobs_s = time.monotonic() - started
            wait_until(
                lambda: census(cluster)[1]["PreparingData"] == n, "phase PreparingData", process, timeout
            )
            requests_to_data = len(cluster.requests()) - first_request
            rss_data = rss_mib(process.pid)
            snapshot(process, tracing, "PreparingData")
            milestones = {"all data Jobs exist": round(data_jobs_s, 3)}
            jobs: dict[str, str] = data_jobs
            for index, phase in enumerate(phases):
                finish(cluster, phase, jobs)
                if index + 1 < len(phases):
                    following = phases[index + 1]
                    jobs = wait_until(
                        functools.partial(jobs_of, cluster, following, n),
                        f"{n} {following} Jobs",
                        process,
                        timeout,
                    )
                    milestones[f"all {following} Jobs exist"] = round(time.monotonic() - started, 3)
            wait_until(
                lambda: census(cluster)[1]["Succeeded"] == n, "every recipe Succeeded", process, timeout
            )
            lifecycle_s = time.monotonic() - started
            milestones["all recipes Succeeded"] = round(lifecycle_s, 3)
            time.sleep(2.0)  # anything still in flight (Events, the last patches) lands
            counts = request_counts(cluster, first_request)
            by_client = requests_by_client(cluster, first_request)
            connections = connections_by_client(proxy, connections_before)
            events = event_reasons(cluster, first_request)
            load_end = os.getloadavg()
            patches = recipe_patches(cluster, first_request)
            scraped = get(f"http://127.0.0.1:{metrics_port}/metrics")
            rss_end = rss_mib(process.pid)
            sampler.stop()
            peak = max(sampler.peak, rss_end)
            status = Path(f"/proc/{process.pid}/status").read_text()
            hwm = next(
                int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")
            )
            cpu = cpu_seconds(process.pid) - cpu_idle
            snapshot(process, tracing, "Succeeded")
        log = (Path(tmp) / "operator.log").read_text(errors="replace")
        log_copy.parent.mkdir(parents=True, exist_ok=True)
        log_copy.write_text(log)
        errors = [line for line in log.splitlines() if "[ERROR" in line or "Traceback" in line]
        history = [len(cluster.history(CRD_RESOURCE, body["metadata"]["name"], NS)) for body in bodies]
    total = sum(counts.values())
    client_requests = by_client.get("kubernetes client", 0)
    client_connections = connections.get("kubernetes client", 0)
    status_patches = counts.get(f"UPDATE {CRD_PLURAL}/status", 0)
    return {
        "recipes": n,
        "evaluation": evaluation,
        "apply_s": round(applied_s, 3),
        "milestones_s": milestones,
        "data_jobs_s": round(data_jobs_s, 3),
        "lifecycle_s": round(lifecycle_s, 3),
        "requests_total": total,
        "requests_per_recipe": round(total / n, 2),
        "requests_to_data_jobs_per_recipe": round(requests_to_data / n, 2),
        "requests_by_kind": counts,
        "tls": tls,
        "requests_by_client": by_client,
        "connections_by_client": connections,
        "connections_total": sum(connections.values()),
        "client_connections_per_request": round(client_connections / client_requests, 3)
        if client_requests
        else None,
        "peak_open_connections": proxy.peak_open,
        "status_patches_per_recipe": round(status_patches / n, 2),
        "events_per_recipe": round(sum(events.values()) / n, 2),
        "events_by_reason": events,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in load_end],
        "recipe_patches_by_change": patches,
        "status_patches_metric": metric(scraped, "ftrecipe_status_patches_total"),
        "reconciles_metric": metric(scraped, "ftrecipe_reconciles_total"),
        "recipe_versions_per_recipe": round(sum(history) / n, 2),
        "operator_cpu_s": round(cpu, 2),
        "operator_cpu_ms_per_recipe": round(1000 * cpu / n, 1),
        "rss_idle_mib": round(rss_idle, 1),
        "rss_after_data_jobs_mib": round(rss_data, 1),
        "rss_end_mib": round(rss_end, 1),
        "rss_peak_mib": round(max(peak, hwm), 1),
        "rss_growth_per_recipe_kib": round(1024 * (max(peak, hwm) - rss_idle) / n, 1),
        "operator_errors": errors[:10],
        "heap": heap_report(tracing.directory) if tracing is not None else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    results = []
    for n in args.recipes:
        print(f"{n} recipes, evaluation {'off' if args.no_evaluation else 'on'} ...", flush=True)
        log = args.json.with_name(f"{args.json.stem}-{n}.log")
        result = run_scale(n, not args.no_evaluation, args.timeout, log, args.heap, args.tls)
        results.append(result)
        for label, entry in (result["heap"] or {}).items():
            print(f"\n  heap {label}: RSS {entry['rss_mib']} MiB, traced {entry['traced_mib']} MiB")
            print(f"  glibc {entry['glibc_heap_mib']}\n  pymalloc {entry['pymalloc_mib']}")
            for key in ("grown_by_filename", "grown_by_lineno"):
                if key not in entry:
                    continue
                print(f"  {key}:")
                print("\n".join(f"    {line}" for line in entry[key][:15]))
        print(
            f"  data Jobs after {result['data_jobs_s']:.2f} s, all Succeeded after {result['lifecycle_s']:.2f} s, "
            f"{result['requests_per_recipe']:.1f} requests per recipe, peak RSS {result['rss_peak_mib']:.0f} MiB"
        )
        print(
            f"  requests by client {result['requests_by_client']}, connections opened by client "
            f"{result['connections_by_client']} ({result['client_connections_per_request']} per kubernetes "
            f"client request; at most {result['peak_open_connections']} open at once)"
        )
    print()
    print(
        table(
            [
                "recipes",
                "all data Jobs (s)",
                "all Succeeded (s)",
                "requests / recipe",
                "status patches / recipe",
                "Events / recipe",
                "operator CPU (ms / recipe)",
                "RSS idle → peak (MiB)",
            ],
            [
                [
                    r["recipes"],
                    r["data_jobs_s"],
                    r["lifecycle_s"],
                    r["requests_per_recipe"],
                    r["status_patches_per_recipe"],
                    r["events_per_recipe"],
                    r["operator_cpu_ms_per_recipe"],
                    f"{r['rss_idle_mib']:.0f} → {r['rss_peak_mib']:.0f}",
                ]
                for r in results
            ],
        )
    )
    kinds = sorted({k for r in results for k in r["requests_by_kind"]})
    print("\nrequests per recipe by kind:")
    print(
        table(
            ["request", *(str(r["recipes"]) for r in results)],
            [
                [k, *(round(r["requests_by_kind"].get(k, 0) / r["recipes"], 2) for r in results)]
                for k in kinds
            ],
        )
    )
    write_json(
        args.json,
        {
            "benchmark": "operator_scale",
            "machine": info,
            "params": {"recipes": args.recipes, "evaluation": not args.no_evaluation, "tls": args.tls},
            "runs": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
