"""A counting TCP proxy on 127.0.0.1 in front of another local server (e.g. the Kubernetes emulator).

Why: the emulator (kmock on aiohttp) records requests, not the TCP connections they came on. Put this in
front of it and point a client at ``proxy.url``: ``accepted`` counts the connections the client opened
(with ``tls=True``, the TLS handshakes it made), ``user_agents`` them by the User-Agent of their first
request (which client opened them), ``peak_open`` the most open at once. It also plays what an
API server (or a load balancer) does to keep-alive connections:

* ``close_connections()`` closes every client connection (between requests: the idle ones), as a server's
  idle timeout does;
* ``drop_next_reused()`` closes the next connection that sends a request after already having served one,
  without forwarding that request: a server closing an idle connection just as the client reuses it.

``tls=True`` terminates TLS with the test-only certificate in ``tests/support/tls/`` (for 127.0.0.1 and
localhost, signed by ``TLS_CA``) and forwards plain bytes, so a client that insists on https (the
``kubernetes`` client's in-cluster configuration) reaches a plain-HTTP server.

The proxy runs its own event loop in a background thread, like the emulator; use it as a context manager.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final

TLS_DIR: Final = Path(__file__).resolve().parent / "tls"
TLS_CA: Final = TLS_DIR / "ca.crt"  # what a client verifies the proxy's certificate with
_CHUNK: Final = 65536
_TIMEOUT: Final = 10.0


def _user_agent(request_start: bytes) -> str:
    for line in request_start.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"user-agent":
            return value.strip().decode("latin-1")
    return "-"


class _Connection:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.responses = 0  # chunks sent back to the client (0: it has not been answered yet)
        self.awaiting_request = True  # the last bytes went to the client: the next ones start a request
        self.handler = asyncio.current_task()

    def close(self) -> None:
        self.client.close()
        self.upstream.close()


class CountingProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream_port``, counting the connections accepted."""

    def __init__(self, upstream_port: int, *, tls: bool = False) -> None:
        self.upstream_port = upstream_port
        self.tls = tls
        self.accepted = 0
        # Connections by the User-Agent of their first request (which client opened them).
        self.user_agents: collections.Counter[str] = collections.Counter()
        self.open = 0
        self.peak_open = 0
        self.dropped_reused = 0
        self._drop_reused = 0
        self._connections: set[_Connection] = set()
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # ---- lifecycle ----

    def __enter__(self) -> CountingProxy:
        self._thread = threading.Thread(target=self._run, name="counting-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(_TIMEOUT) or self._failure is not None:
            self.__exit__()
            raise RuntimeError("the counting proxy did not start") from self._failure
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(_TIMEOUT)
            if self._thread.is_alive():
                raise RuntimeError("the counting proxy thread did not stop")

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the counting proxy is not running")
        return self._port

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    # ---- what a server does to keep-alive connections ----

    def close_connections(self) -> int:
        """Close every client connection now (and its upstream one); returns how many were open."""
        return self._call(self._close_all())

    def drop_next_reused(self, count: int = 1) -> None:
        """Close the next `count` connections that send a request after having been answered once, without
        forwarding that request (the client sees the connection closed with no response)."""
        self._drop_reused += count

    # ---- internals ----

    def _call(self, coroutine: Coroutine[Any, Any, int]) -> int:
        if self._loop is None:
            raise RuntimeError("the counting proxy is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(_TIMEOUT)

    async def _close_all(self) -> int:
        connections = list(self._connections)
        for connection in connections:
            connection.close()
        handlers = [connection.handler for connection in connections if connection.handler is not None]
        if handlers:  # each handler ends once both of its streams are closed
            await asyncio.wait(handlers, timeout=_TIMEOUT)
        return len(connections)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as error:  # reported to __enter__, which raises it
            self._failure = error
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        context = None
        if self.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(TLS_DIR / "server.crt", TLS_DIR / "server.key")
        # An idle client answers no TLS close_notify: closing waits this long for it, then drops the socket.
        server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, ssl=context, ssl_shutdown_timeout=0.5 if context else None
        )
        self._port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            await self._close_all()
            await server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        try:
            try:
                upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                client.close()
                return
            connection = _Connection(client, upstream)
            self._connections.add(connection)
            try:
                await asyncio.gather(
                    self._pipe(client_reader, connection, to_upstream=True),
                    self._pipe(upstream_reader, connection, to_upstream=False),
                )
            finally:
                self._connections.discard(connection)
                connection.close()
        finally:
            self.open -= 1

    async def _pipe(
        self, reader: asyncio.StreamReader, connection: _Connection, *, to_upstream: bool
    ) -> None:
        writer = connection.upstream if to_upstream else connection.client
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if to_upstream:
                    if connection.awaiting_request and connection.responses and self._drop_reused > 0:
                        self._drop_reused -= 1
                        self.dropped_reused += 1
                        break
                    if not connection.responses and connection.awaiting_request:
                        self.user_agents[_user_agent(data)] += 1
                    connection.awaiting_request = False
                else:
                    connection.responses += 1
                    connection.awaiting_request = True
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            connection.close()  # either side gone: the other goes too
