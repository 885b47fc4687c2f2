"""A scriptable, local OpenAI-compatible chat server for tests (fixture ``llm_server``).

Why: ftrecipe talks to LLMs through the real ``openai`` client. Tests need answers they control, the exact
wire formats (JSON and SSE), and deterministic faults (429 with Retry-After, 500, hangs, garbage bodies)
so the client's retry and error paths run for real, with no network, no GPU and no mocking of the client.

The server is aiohttp on its own event loop in a background thread, bound to a free port on 127.0.0.1.
Start and stop take a few milliseconds, so every test gets a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, TypeAlias

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

DEFAULT_API_KEY: Final = "test-key"
DEFAULT_MODEL: Final = "ftrecipe-test-model"
CHAT_PATH: Final = "/v1/chat/completions"
NO_SCRIPT_MESSAGE: Final = "llm_server: no script set (call llm_server.script/answer_with/answer_rules)"
# Bounds how long stop() waits for handlers that are still running a blocking script.
_SHUTDOWN_TIMEOUT: Final = 1.0
_TOKEN_RE: Final = re.compile(r"\s*\S+|\s+")


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer, possibly faulty; a plain ``str`` answer is shorthand for ``Reply(content)``.

    Fields other than ``content`` describe faults so a test can say exactly how one call goes wrong.
    """

    content: str = ""
    status: int = 200
    # Seconds to wait before answering, added to the server-wide ``latency``.
    delay: float = 0.0
    # Sent as ``Retry-After`` (seconds, fractions allowed: the openai client accepts them).
    retry_after: float | None = None
    # Never answer (until the server stops or is reset), so the client's own timeout fires.
    hang: bool = False
    # Close the connection without any response (the client sees a connection error).
    drop: bool = False
    # Raw bytes sent verbatim with ``content_type`` instead of the JSON/SSE answer: garbage on purpose.
    body: str | bytes | None = None
    content_type: str = "application/json"
    # Error message for ``status >= 400`` (a default per status otherwise).
    error: str | None = None
    # ``x-should-retry`` header; the openai client obeys it over its status-code rules.
    should_retry: bool | None = None
    finish_reason: str = "stop"
    # Pause between SSE chunks when the request streams.
    chunk_delay: float = 0.0
    # Overrides the model name echoed back (default: the requested model).
    model: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, content: str, *, delay: float = 0.0, finish_reason: str = "stop") -> Reply:
        """A normal answer, optionally slow or cut short (``finish_reason="length"``)."""
        return cls(content=content, delay=delay, finish_reason=finish_reason)

    @classmethod
    def fail(
        cls,
        status: int = 500,
        message: str | None = None,
        *,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> Reply:
        """An OpenAI-shaped error answer (``{"error": {...}}``) with the given HTTP status."""
        return cls(status=status, error=message, retry_after=retry_after, should_retry=should_retry)

    @classmethod
    def rate_limited(cls, retry_after: float | None = 0.01) -> Reply:
        """HTTP 429 with ``Retry-After``; the short default keeps retry tests fast."""
        return cls.fail(429, retry_after=retry_after)

    @classmethod
    def timeout(cls) -> Reply:
        """Hang until the client gives up (its timeout), like an overloaded backend."""
        return cls(hang=True)

    @classmethod
    def disconnect(cls) -> Reply:
        """Drop the TCP connection without answering."""
        return cls(drop=True)

    @classmethod
    def garbage(
        cls, body: str | bytes = "<html>502 Bad Gateway</html>", content_type: str = "text/html"
    ) -> Reply:
        """HTTP 200 whose body is not an API answer at all (e.g. a proxy error page)."""
        return cls(body=body, content_type=content_type)

    @classmethod
    def malformed_json(cls) -> Reply:
        """HTTP 200, ``application/json``, but the JSON is cut off mid-object."""
        return cls(
            body='{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"index": 0, "mess'
        )

    @classmethod
    def malformed_stream(cls) -> Reply:
        """An SSE stream whose event data is not valid JSON."""
        return cls(body='data: {"id": "chatcmpl-broken", "choi\n\n', content_type="text/event-stream")


Answer: TypeAlias = str | Reply
Script: TypeAlias = Callable[["ChatRequest"], Answer | Awaitable[Answer]]


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A parsed ``POST /v1/chat/completions`` call, as handed to scripts and kept in the records."""

    model: str
    messages: list[dict[str, Any]]
    # Text of the last ``user`` message ("" if none): what scripts and rules usually key on.
    prompt: str
    # Text of the ``system``/``developer`` messages joined by newlines, None if there are none.
    system: str | None
    temperature: float | None
    # ``max_tokens`` or ``max_completion_tokens``; the server does not truncate answers to it.
    max_tokens: int | None
    stream: bool
    n: int
    stop: list[str]
    body: dict[str, Any]
    headers: Mapping[str, str]
    # 0-based position among chat requests, in arrival order (faulted calls count too).
    index: int

    @property
    def transcript(self) -> str:
        """All messages as ``role: text`` lines, for rules that must see the whole conversation."""
        return "\n".join(f"{m.get('role', '?')}: {_content_text(m.get('content'))}" for m in self.messages)


@dataclass(slots=True)
class RecordedRequest:
    """One HTTP request the server received (every path, including rejected ones)."""

    method: str
    path: str
    # Case-insensitive: ``headers["authorization"] == headers["Authorization"]``.
    headers: Mapping[str, str]
    raw_body: bytes
    # Parsed JSON body, None when the body is empty or not JSON.
    body: Any
    # Wall-clock (``time.time()``) and ``time.monotonic()`` arrival times.
    received_at: float
    monotonic: float
    chat: ChatRequest | None = None
    # HTTP status the server answered with; None while pending, or if it hung / dropped the connection.
    status: int | None = None
    # ``time.monotonic()`` when the answer (first byte for streams) was ready to send.
    responded_at: float | None = None

    @property
    def bearer(self) -> str | None:
        """The API key the client sent as ``Authorization: Bearer <key>``, if any."""
        value = self.headers.get("Authorization", "")
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None

    @property
    def prompt(self) -> str | None:
        """Shortcut to ``chat.prompt`` (None for non-chat requests)."""
        return self.chat.prompt if self.chat else None


def _content_text(content: Any) -> str:
    """Text of a message ``content``: a string, or the text parts of a multi-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def count_tokens(text: str) -> int:
    """Rough token count (whitespace words): enough for usage numbers that are plausible and stable."""
    return len(text.split())


def _as_reply(answer: Answer) -> Reply:
    if isinstance(answer, Reply):
        return answer
    if isinstance(answer, str):
        return Reply(content=answer)
    raise TypeError(f"llm_server script must return str or Reply, got {type(answer).__name__}")


def _error_body(status: int, message: str | None) -> dict[str, Any]:
    """OpenAI's error envelope, so the client builds the same exception types as against the real API."""
    kinds: dict[int, tuple[str, str | None, str]] = {
        400: ("invalid_request_error", None, "Bad request"),
        401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided"),
        404: ("invalid_request_error", None, "Not found"),
        429: ("requests", "rate_limit_exceeded", "Rate limit reached (injected by llm_server)"),
    }
    kind, code, default = kinds.get(status, ("server_error", None, f"Injected HTTP {status} from llm_server"))
    return {"error": {"message": message or default, "type": kind, "param": None, "code": code}}


_RECORD: Final = web.RequestKey("llm_record", RecordedRequest)
_DROPPED: Final = web.RequestKey("llm_dropped", bool)


class LLMServer:
    """Local OpenAI-compatible server whose answers come from a script the test sets.

    Thread-safe: configure it from the test (sync or async), it answers from its own thread.
    """

    def __init__(
        self, *, api_key: str | None = DEFAULT_API_KEY, model: str = DEFAULT_MODEL, host: str = "127.0.0.1"
    ) -> None:
        # None disables the bearer check; tests may assign it at any time.
        self.api_key: str | None = api_key
        self.model = model
        self.host = host
        self._default_api_key = api_key
        self._lock = threading.Condition()
        self._script: Script = self._no_script
        self._faults: deque[Reply] = deque()
        self._latency = 0.0
        self._records: list[RecordedRequest] = []
        self._chat_count = 0
        self._script_errors: list[BaseException] = []
        self._port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._release: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> LLMServer:
        """Bind a free port and serve from a background thread; returns once it accepts connections."""
        if self._thread is not None:
            raise RuntimeError("llm_server already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, 0))
        sock.listen(128)
        sock.setblocking(False)
        self._port = sock.getsockname()[1]
        self._executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="llm-server-script")
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="llm-server", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._start_error is not None:
            raise RuntimeError("llm_server failed to start") from self._start_error
        return self

    def stop(self) -> None:
        """Release hanging calls, close connections, and join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        thread.join(_SHUTDOWN_TIMEOUT + 5)
        if self._executor is not None:
            # A script blocked forever must not hang the test run; its thread is abandoned.
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._thread = None

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._setup(sock))
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _setup(self, sock: socket.socket) -> None:
        self._release = asyncio.Event()
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_post(CHAT_PATH, self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/v1/models/{model}", self._handle_model)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def _shutdown(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- addresses -----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """Server root, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self._port}"

    @property
    def base_url(self) -> str:
        """What ``openai.OpenAI(base_url=...)`` wants: the root plus ``/v1``."""
        return f"{self.url}/v1"

    # -- scripting -----------------------------------------------------------------------------------

    def script(self, fn: Script) -> Script:
        """Answer every chat call with ``fn(request)`` (str or Reply, sync or async); usable as a decorator.

        ``fn`` runs in a worker thread, so it may block, and concurrent calls may run it concurrently.
        """
        with self._lock:
            self._script = fn
        return fn

    def answer_with(self, answer: Answer) -> None:
        """Answer every chat call the same way."""
        reply = _as_reply(answer)
        self.script(lambda _request: reply)

    def answer_rules(
        self,
        rules: Mapping[str, Answer] | Sequence[tuple[str, Answer]],
        *,
        default: Answer | None = None,
    ) -> None:
        """Answer by the first rule whose substring occurs in the prompt (the last user message).

        Unmatched prompts get ``default``, or a non-retryable 500 naming the prompt so the gap is visible.
        """
        pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
        compiled = [(needle, _as_reply(answer)) for needle, answer in pairs]
        fallback = _as_reply(default) if default is not None else None

        def by_rules(request: ChatRequest) -> Reply:
            for needle, reply in compiled:
                if needle in request.prompt:
                    return reply
            if fallback is not None:
                return fallback
            return Reply.fail(
                500, f"llm_server: no rule matched prompt {request.prompt[:300]!r}", should_retry=False
            )

        self.script(by_rules)

    def answer_sequence(self, *answers: Answer, then: Answer | None = None) -> None:
        """Give ``answers`` to successive script calls; afterwards ``then``, or a non-retryable 500."""
        queue = deque(_as_reply(a) for a in answers)
        after = _as_reply(then) if then is not None else None
        guard = threading.Lock()

        def in_sequence(_request: ChatRequest) -> Reply:
            with guard:
                if queue:
                    return queue.popleft()
            if after is not None:
                return after
            return Reply.fail(500, "llm_server: answer_sequence exhausted", should_retry=False)

        self.script(in_sequence)

    @staticmethod
    def _no_script(_request: ChatRequest) -> Reply:
        # Not retryable: an unscripted call is a test bug, it should fail at once and say so.
        return Reply.fail(500, NO_SCRIPT_MESSAGE, should_retry=False)

    # -- faults --------------------------------------------------------------------------------------

    @property
    def latency(self) -> float:
        """Seconds added before every chat answer (on top of each Reply's ``delay``)."""
        with self._lock:
            return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        with self._lock:
            self._latency = seconds

    def inject(self, *replies: Reply) -> None:
        """Queue replies that pre-empt the script for the next chat calls, one each, in arrival order."""
        with self._lock:
            self._faults.extend(replies)

    def fail_next(
        self,
        n: int = 1,
        status: int = 429,
        *,
        retry_after: float | None = 0.01,
        message: str | None = None,
        should_retry: bool | None = None,
    ) -> None:
        """Fail the next ``n`` chat calls with ``status``; ``retry_after=None`` omits the header.

        The short default Retry-After keeps retry tests fast; None exercises the client's own backoff.
        """
        self.inject(*[Reply.fail(status, message, retry_after=retry_after, should_retry=should_retry)] * n)

    def hang_next(self, n: int = 1) -> None:
        """Let the next ``n`` chat calls hang until the client times out."""
        self.inject(*[Reply.timeout()] * n)

    def garbage_next(self, n: int = 1, *, malformed_json: bool = False) -> None:
        """Answer the next ``n`` chat calls with an HTML page, or with cut-off JSON."""
        self.inject(*[Reply.malformed_json() if malformed_json else Reply.garbage()] * n)

    def drop_next(self, n: int = 1) -> None:
        """Close the connection on the next ``n`` chat calls without answering."""
        self.inject(*[Reply.disconnect()] * n)

    # -- records -------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._records)

    @property
    def chat_requests(self) -> list[ChatRequest]:
        """Snapshot of the well-formed chat-completion calls (including faulted and 401-rejected ones)."""
        with self._lock:
            return [r.chat for r in self._records if r.chat is not None]

    @property
    def prompts(self) -> list[str]:
        """The prompt of each chat call, in arrival order."""
        return [c.prompt for c in self.chat_requests]

    @property
    def script_errors(self) -> list[BaseException]:
        """Exceptions raised by scripts (each was answered with a non-retryable 500)."""
        with self._lock:
            return list(self._script_errors)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least ``n`` requests arrived (for calls made from other threads)."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._records) >= n, timeout):
                raise TimeoutError(f"llm_server got {len(self._records)} requests, expected {n}")
            return list(self._records)

    def reset(self) -> None:
        """Back to a fresh state: no script, faults, latency or records; hanging calls are released."""
        with self._lock:
            self._script = self._no_script
            self._faults.clear()
            self._latency = 0.0
            self._records.clear()
            self._chat_count = 0
            self._script_errors.clear()
            self.api_key = self._default_api_key
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._release_waiters)

    def _release_waiters(self) -> None:
        if self._release is not None:
            self._release.set()
        self._release = asyncio.Event()

    # -- HTTP handling -------------------------------------------------------------------------------

    async def _sleep(self, seconds: float | None) -> bool:
        """Sleep ``seconds`` (None: forever); False when cut short by stop/reset."""
        if seconds is not None and seconds <= 0:
            return True
        release = self._release
        assert release is not None
        try:
            await asyncio.wait_for(release.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Record every request, check the bearer key, and note the status sent."""
        raw = await request.read()
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        headers: Mapping[str, str] = CIMultiDictProxy(CIMultiDict(request.headers))
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            headers=headers,
            raw_body=raw,
            body=parsed,
            received_at=time.time(),
            monotonic=time.monotonic(),
        )
        with self._lock:
            self._records.append(record)
            self._lock.notify_all()
        request[_RECORD] = record
        try:
            response = await self._authorized(request, record, handler)
        except web.HTTPException as exc:
            response = web.json_response(_error_body(exc.status, exc.reason), status=exc.status)
        if record.status is None and not request.get(_DROPPED, False):
            record.status = response.status
            record.responded_at = record.responded_at or time.monotonic()
        return response

    async def _authorized(
        self,
        request: web.Request,
        record: RecordedRequest,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        key = self.api_key
        if key is not None and record.bearer != key:
            if request.path == CHAT_PATH:
                record.chat = self._parse_chat(record)
            return web.json_response(_error_body(401, None), status=401)
        return await handler(request)

    async def _handle_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card(self.model)]})

    async def _handle_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.model:
            return web.json_response(_error_body(404, f"The model '{name}' does not exist"), status=404)
        return web.json_response(self._model_card(name))

    @staticmethod
    def _model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "ftrecipe-tests"}

    def _parse_chat(self, record: RecordedRequest) -> ChatRequest | None:
        """Typed view of a chat body; None if it is not a JSON object with a ``messages`` list."""
        body = record.body
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return None
        messages: list[dict[str, Any]] = [m for m in body["messages"] if isinstance(m, dict)]
        users = [m for m in messages if m.get("role") == "user"]
        systems = [
            _content_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")
        ]
        stop = body.get("stop")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        temperature = body.get("temperature")
        with self._lock:
            index = self._chat_count
            self._chat_count += 1
        return ChatRequest(
            model=str(body.get("model", "")),
            messages=messages,
            prompt=_content_text(users[-1].get("content")) if users else "",
            system="\n".join(systems) if systems else None,
            temperature=float(temperature) if isinstance(temperature, int | float) else None,
            max_tokens=int(max_tokens) if isinstance(max_tokens, int | float) else None,
            stream=bool(body.get("stream", False)),
            n=int(body.get("n") or 1),
            stop=[stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str)],
            body=body,
            headers=record.headers,
            index=index,
        )

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        record = request[_RECORD]
        chat = self._parse_chat(record)
        if chat is None:
            message = "Invalid JSON body" if record.body is None else "'messages' is a required property"
            return web.json_response(_error_body(400, message), status=400)
        record.chat = chat
        if not chat.model:
            return web.json_response(_error_body(400, "you must provide a model parameter"), status=400)
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
            script = self._script
            latency = self._latency
        reply = fault if fault is not None else await self._run_script(script, chat)

        waited = await self._sleep(latency + reply.delay)
        if waited and reply.hang:
            waited = await self._sleep(None)
        if not waited:
            # Released by stop/reset: the client has usually given up already.
            return web.json_response(_error_body(503, "llm_server released a waiting call"), status=503)
        if reply.drop:
            request[_DROPPED] = True
            # aiohttp then fails to write this response to the closed transport and ignores that quietly.
            request.protocol.force_close()
            return web.Response(status=204)
        record.responded_at = time.monotonic()
        headers = {"x-request-id": f"req_{uuid.uuid4().hex}", **reply.headers}
        if reply.retry_after is not None:
            headers["Retry-After"] = f"{reply.retry_after:g}"
        if reply.should_retry is not None:
            headers["x-should-retry"] = "true" if reply.should_retry else "false"
        if reply.body is not None:
            raw = reply.body.encode() if isinstance(reply.body, str) else reply.body
            return web.Response(
                body=raw, status=reply.status, headers={**headers, "Content-Type": reply.content_type}
            )
        if reply.status >= 400:
            return web.json_response(
                _error_body(reply.status, reply.error), status=reply.status, headers=headers
            )
        if chat.stream:
            return await self._stream(request, chat, reply, headers)
        return web.json_response(self._completion(chat, reply), status=reply.status, headers=headers)

    async def _run_script(self, script: Script, chat: ChatRequest) -> Reply:
        """Run the script off the event loop; a raising or ill-typed script becomes a visible 500."""
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, script, chat)
            if inspect.isawaitable(result):
                result = await result
            return _as_reply(result)
        except Exception as exc:
            with self._lock:
                self._script_errors.append(exc)
            return Reply.fail(500, f"llm_server script raised {exc!r}", should_retry=False)

    @staticmethod
    def _usage(chat: ChatRequest, content: str) -> dict[str, int]:
        prompt_tokens = sum(count_tokens(_content_text(m.get("content"))) for m in chat.messages)
        completion_tokens = count_tokens(content) * chat.n
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _completion(self, chat: ChatRequest, reply: Reply) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.model or chat.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": reply.content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
                for i in range(chat.n)
            ],
            "usage": self._usage(chat, reply.content),
            "system_fingerprint": None,
        }

    async def _stream(
        self, request: web.Request, chat: ChatRequest, reply: Reply, headers: dict[str, str]
    ) -> web.StreamResponse:
        """SSE ``chat.completion.chunk`` events: role, content pieces, finish, [usage], ``[DONE]``."""
        response = web.StreamResponse(
            status=200, headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        include_usage = bool((chat.body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": reply.model or chat.model,
            "system_fingerprint": None,
        }

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            payload = {**base, "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n".encode()

        def choice(delta: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
            return [
                {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                for i in range(chat.n)
            ]

        await response.write(event(choice({"role": "assistant", "content": "", "refusal": None})))
        for piece in _TOKEN_RE.findall(reply.content):
            if not await self._sleep(reply.chunk_delay):
                return response
            await response.write(event(choice({"content": piece})))
        await response.write(event(choice({}, reply.finish_reason)))
        if include_usage:
            await response.write(event([], usage=self._usage(chat, reply.content)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
def llm_server() -> Iterator[LLMServer]:
    """A fresh local OpenAI-compatible server per test (starting one costs a few ms), key ``test-key``."""
    with LLMServer() as server:
        yield server
