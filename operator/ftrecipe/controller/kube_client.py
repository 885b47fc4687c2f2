"""One `kubernetes` client, with one connection pool, for all of the operator's own API requests.

A client per request (what `kube_request` did before) opened a new TCP connection, and on a real cluster
a new TLS handshake, for every list, create and patch. The shared client keeps its connections open
between requests (urllib3's PoolManager, thread-safe), at most `API_THREADS` of them: the size of the
executor the operator's blocking calls run in (`asyncio.to_thread`, set by `use_api_executor`), so a
thread never waits for a connection and none is opened only to be thrown away ("Connection pool is full,
discarding connection").

What stays as it was with a client per request:

* the configuration: the `kubernetes` client's default (the pod's service account, or kubeconfig, as
  `ftrecipe operator` loads it), read when the first request is made; a new default configuration (tests
  install one per emulator) gets a new client and the old one is closed;
* the token: the client's configuration keeps the loader's `refresh_api_key_hook`, which the client calls
  on every request; the in-cluster loader re-reads the service-account token file when a minute has passed
  since it last read it, so a long-lived client sends the rotated (bound, expiring) token within a minute
  of the kubelet writing it;
* connections the API server (or a load balancer in front of it) closed while idle: urllib3 finds them
  closed when it takes them from the pool and opens a new one; a connection that breaks
  while a request is on it is retried by urllib3's default `Retry` (3 tries) for GET, PUT and DELETE; a
  POST or PATCH urllib3 leaves alone (it cannot know whether the server acted on it), and `kube_request`
  sends it once more (this operator's writes bear a repeat).
"""

from __future__ import annotations

import asyncio
import copy
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import kubernetes.client

# Python's own default size for the `asyncio.to_thread` executor (3.8 to 3.12), made explicit so that the
# pool can match it on every Python version.
API_THREADS: Final = min(32, (os.cpu_count() or 1) + 4)

_lock = threading.Lock()
_client: kubernetes.client.ApiClient | None = None
_source: kubernetes.client.Configuration | None = None


def api_client() -> kubernetes.client.ApiClient:
    """The process's client for the `kubernetes` client's current default configuration."""
    global _client, _source
    source = kubernetes.client.Configuration.get_default()
    with _lock:
        if _client is None or _source is not source:
            configuration = copy.deepcopy(source)  # keeps the loader's refresh_api_key_hook
            configuration.connection_pool_maxsize = API_THREADS
            previous, _client, _source = _client, kubernetes.client.ApiClient(configuration), source
            if previous is not None:
                # Idle connections close now; one still in use is closed when its request gives it back.
                previous.close()  # type: ignore[no-untyped-call]
        return _client


def use_api_executor() -> None:
    """Run this event loop's `asyncio.to_thread` calls on `API_THREADS` threads, the pool's size."""
    executor = ThreadPoolExecutor(API_THREADS, thread_name_prefix="ftrecipe-api")
    asyncio.get_running_loop().set_default_executor(executor)
