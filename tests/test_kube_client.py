"""The operator's one `kubernetes` client (`controller/kube_client.py`, behind `observe.kube_request`):
connections are kept and shared, against the real emulator behind a counting proxy (`support.tcp_proxy`).

What is counted is TCP connections accepted at the proxy (with TLS, handshakes). A client per request, as
`kube_request` had before, opens one per request: the first two tests then fail with 40 and 300.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.config.incluster_config import InClusterConfigLoader

from ftrecipe.controller.kube_client import use_api_executor
from ftrecipe.controller.observe import kube_request
from support.k8s import K8s
from support.tcp_proxy import TLS_CA, CountingProxy

CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
# Python's default size of the asyncio.to_thread executor (3.8 to 3.12), which the operator makes explicit.
THREADS = min(32, (os.cpu_count() or 1) + 4)
CLIENT_AGENT = "OpenAPI-Generator/"  # the kubernetes client's User-Agent: kopf's requests are not ours


def emulator_port(k8s: K8s) -> int:
    return int(k8s.url.rsplit(":", 1)[1])


@pytest.fixture
def proxy(k8s: K8s) -> Iterator[CountingProxy]:
    """The emulator behind a counting proxy, installed as the kubernetes client's default configuration
    (the k8s fixture puts its own back afterwards)."""
    with CountingProxy(emulator_port(k8s)) as counting:
        kubernetes.client.Configuration.set_default(kubernetes.client.Configuration(host=counting.url))
        yield counting


def client_requests(k8s: K8s) -> list[tuple[str, str]]:
    """(method, path) of every request the kubernetes client made, in order."""
    return [
        (r.method, r.url.path)
        for r in k8s.requests()
        if str(r.headers.get("User-Agent", "")).startswith(CLIENT_AGENT)
    ]


def configmap(name: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}}


def test_sequential_requests_use_one_connection(k8s: K8s, proxy: CountingProxy) -> None:
    for index in range(20):
        kube_request("POST", CONFIGMAPS, body=configmap(f"cm-{index}"), content_type="application/json")
        kube_request("GET", f"{CONFIGMAPS}/cm-{index}")
    assert len(client_requests(k8s)) == 40
    assert proxy.accepted == 1


def test_the_operators_threads_share_at_most_one_connection_each(
    k8s: K8s, proxy: CountingProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """300 requests from the operator's executor (asyncio.to_thread, as the handlers call them) open at most
    one connection per thread, and never one the pool has no room to keep."""

    async def burst() -> list[bytes]:
        use_api_executor()
        return await asyncio.gather(
            *(asyncio.to_thread(kube_request, "GET", CONFIGMAPS, query={"limit": i}) for i in range(300))
        )

    with caplog.at_level(logging.WARNING, logger="urllib3"):
        answers = asyncio.run(burst())
    assert [json.loads(a)["kind"] for a in answers] == ["ConfigMapList"] * 300
    assert len(client_requests(k8s)) == 300
    assert 1 <= proxy.accepted <= THREADS
    assert proxy.peak_open <= THREADS
    assert not [r.getMessage() for r in caplog.records if "pool is full" in r.getMessage()]


def test_connections_the_server_closed_while_idle_are_replaced(k8s: K8s, proxy: CountingProxy) -> None:
    kube_request("POST", CONFIGMAPS, body=configmap("cm"), content_type="application/json")
    assert proxy.close_connections() == 1  # what an API server's idle timeout does
    # Every verb the operator uses goes through, on one new connection, nothing sent twice.
    kube_request("GET", CONFIGMAPS)
    kube_request("POST", CONFIGMAPS, body=configmap("cm-2"), content_type="application/json")
    kube_request(
        "PATCH", f"{CONFIGMAPS}/cm", body={"data": {"k": "w"}}, content_type="application/merge-patch+json"
    )
    kube_request("DELETE", f"{CONFIGMAPS}/cm-2", query={"propagationPolicy": "Background"})
    assert proxy.accepted == 2
    assert client_requests(k8s) == [
        ("POST", CONFIGMAPS),
        ("GET", CONFIGMAPS),
        ("POST", CONFIGMAPS),
        ("PATCH", f"{CONFIGMAPS}/cm"),
        ("DELETE", f"{CONFIGMAPS}/cm-2"),
    ]
    assert k8s.get("v1/configmaps", "cm", "default")["data"] == {"k": "w"}  # type: ignore[index]


def test_a_connection_closed_as_it_is_reused_sends_the_request_again(k8s: K8s, proxy: CountingProxy) -> None:
    """The race an idle timeout leaves: the server closes the connection just as a request goes out on it.
    urllib3's default Retry sends a GET again on a new connection; a POST or PATCH, which urllib3 cannot
    know was not acted on, `kube_request` sends once more itself (the operator's writes bear it)."""
    kube_request("GET", CONFIGMAPS)
    proxy.drop_next_reused()
    assert json.loads(kube_request("GET", CONFIGMAPS))["kind"] == "ConfigMapList"
    assert (proxy.dropped_reused, proxy.accepted) == (1, 2)
    proxy.drop_next_reused()
    created = json.loads(
        kube_request("POST", CONFIGMAPS, body=configmap("cm"), content_type="application/json")
    )
    assert created["metadata"]["name"] == "cm"
    assert (proxy.dropped_reused, proxy.accepted) == (2, 3)
    proxy.drop_next_reused()
    kube_request(
        "PATCH",
        f"{CONFIGMAPS}/cm",
        body={"data": {"key": "value"}},
        content_type="application/merge-patch+json",
    )
    assert (proxy.dropped_reused, proxy.accepted) == (3, 4)
    # The dropped ones never reached the server; each write reached it once.
    assert client_requests(k8s) == [
        ("GET", CONFIGMAPS),
        ("GET", CONFIGMAPS),
        ("POST", CONFIGMAPS),
        ("PATCH", f"{CONFIGMAPS}/cm"),
    ]


def test_api_errors_keep_their_status_and_the_connection(k8s: K8s, proxy: CountingProxy) -> None:
    with pytest.raises(ApiException) as missing:
        kube_request("GET", f"{CONFIGMAPS}/absent")
    assert missing.value.status == 404
    kube_request("POST", CONFIGMAPS, body=configmap("cm"), content_type="application/json")
    with pytest.raises(ApiException) as conflict:
        kube_request("POST", CONFIGMAPS, body=configmap("cm"), content_type="application/json")
    assert conflict.value.status == 409
    assert proxy.accepted == 1


def test_a_new_default_configuration_gets_a_new_client(k8s: K8s, proxy: CountingProxy) -> None:
    kube_request("GET", CONFIGMAPS)
    with CountingProxy(emulator_port(k8s)) as other:
        kubernetes.client.Configuration.set_default(kubernetes.client.Configuration(host=other.url))
        kube_request("GET", CONFIGMAPS)
        kube_request("GET", CONFIGMAPS)
        assert (proxy.accepted, other.accepted) == (1, 1)
        k8s.wait_for(lambda: proxy.open == 0, timeout=5, message="the replaced client's connection closed")


def test_in_cluster_a_rotated_token_reaches_the_long_lived_connection(k8s: K8s, tmp_path: Path) -> None:
    """The pod's configuration (the kubernetes client's in-cluster loader, https with the service account's
    CA and token file): when the kubelet rewrites the token, the next request after the loader's refresh
    period sends the new one, on the same TLS connection."""
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("token-1")
    shutil.copy(TLS_CA, ca)
    with CountingProxy(emulator_port(k8s), tls=True) as proxy:
        loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
            token_filename=str(token),
            cert_filename=str(ca),
            environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(proxy.port)},
        )
        loader.load_and_set()  # type: ignore[no-untyped-call]  # the default configuration, as in a pod

        def sent_token() -> str:
            kube_request("GET", CONFIGMAPS)
            return str(k8s.requests()[-1].headers["Authorization"])

        assert sent_token() == "bearer token-1"
        token.write_text("token-2")  # the kubelet rotates the bound token
        assert sent_token() == "bearer token-1"  # the loader re-reads the file once a minute
        # A minute later, as far as the loader knows (its own clock; waiting a minute here would be slow).
        loader.token_expires_at = datetime.datetime.now()
        assert sent_token() == "bearer token-2"
        assert sent_token() == "bearer token-2"
        assert proxy.accepted == 1  # one TLS handshake for all four
