"""What one API request costs the operator's side: a `kubernetes` client per request against the shared one.

`observe.kube_request` (the shared client of `controller/kube_client.py`) against the way it made each
request before commit 721142d (a new `ApiClient`, so a new urllib3 pool and connection, closed after the
request; kept here as `client_per_request`). Each side sends N GETs of a namespace's ConfigMaps, one after
the other from one thread, to the Kubernetes emulator (`support.k8s.KubeCluster`, in this process) behind
the counting proxy (`support.tcp_proxy`), over plain HTTP and over TLS (the proxy terminates it with the
test certificate, P-256). Reported per request: the calling thread's CPU time (`time.thread_time`: the
client's work, TLS handshakes included, not the emulator's or the proxy's threads), the wall time, and the
connections the proxy accepted. Everything is on loopback: no network round trips, and the server side of
a handshake is the proxy's (Python's ssl), not an API server's.

    .venv/bin/python benchmarks/kube_requests.py [--requests 2000] [--repeats 2]
        [--json output/benchmarks/kube_requests.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUTPUT, ROOT, machine, table, write_json

sys.path.insert(0, str(ROOT / "tests"))

import kubernetes.client

from ftrecipe.controller.observe import kube_request
from support.k8s import KubeCluster
from support.tcp_proxy import TLS_CA, CountingProxy

PATH = "/api/v1/namespaces/default/configmaps"
Request = Callable[[str, str], bytes]


def client_per_request(method: str, path: str) -> bytes:
    """`kube_request` before 721142d: a new ApiClient (pool, connection) for each request."""
    with kubernetes.client.ApiClient() as client:
        request = client.param_serialize(
            method,
            path,
            query_params=[],
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = client.call_api(*request)
        response.read()
        return bytes(response.data or b"")


def shared_client(method: str, path: str) -> bytes:
    return kube_request(method, path)


SIDES: dict[str, Request] = {"client per request": client_per_request, "shared client": shared_client}


def measure(cluster: KubeCluster, send: Request, tls: bool, n: int) -> dict[str, Any]:
    with CountingProxy(int(cluster.url.rsplit(":", 1)[1]), tls=tls) as proxy:
        configuration = kubernetes.client.Configuration(host=proxy.url)
        if tls:
            configuration.ssl_ca_cert = str(TLS_CA)
        kubernetes.client.Configuration.set_default(configuration)
        send("GET", PATH)  # the shared client's first connection is not what is measured
        before = proxy.accepted
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(n):
            send("GET", PATH)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        return {
            "cpu_ms_per_request": round(1000 * cpu / n, 3),
            "wall_ms_per_request": round(1000 * wall / n, 3),
            "connections": proxy.accepted - before,
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, interleaved")
    parser.add_argument("--json", type=Path, default=OUTPUT / "kube_requests.json")
    args = parser.parse_args(argv)
    info = machine()
    runs = []
    with KubeCluster() as cluster:
        for tls in (False, True):
            for repeat in range(args.repeats):
                # Alternate the order, so a change of the machine's load falls on both sides.
                order = list(SIDES) if repeat % 2 == 0 else list(reversed(SIDES))
                for side in order:
                    result = measure(cluster, SIDES[side], tls, args.requests)
                    runs.append({"side": side, "tls": tls, "repeat": repeat, **result})
                    print(f"{'TLS' if tls else 'HTTP'} {side} ({repeat + 1}): {result}", flush=True)
    rows = []
    for tls in (False, True):
        for side in SIDES:
            mine = [r for r in runs if r["side"] == side and r["tls"] == tls]
            rows.append(
                {
                    "transport": "TLS" if tls else "HTTP",
                    "side": side,
                    "requests": args.requests,
                    "connections": max(r["connections"] for r in mine),
                    "cpu_ms_per_request": statistics.median(r["cpu_ms_per_request"] for r in mine),
                    "wall_ms_per_request": statistics.median(r["wall_ms_per_request"] for r in mine),
                }
            )
    print()
    print(
        table(
            [
                "transport",
                "side",
                "requests",
                "connections opened (after the first)",
                "client CPU / request (ms)",
                "wall / request (ms)",
            ],
            [list(row.values()) for row in rows],
        )
    )
    write_json(
        args.json,
        {
            "benchmark": "kube_requests",
            "machine": info,
            "params": {"requests": args.requests, "repeats": args.repeats},
            "runs": runs,
            "medians": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
