"""Smoke tests for the ``llm_server`` fixture, driven through the real ``openai`` client.

Why: other tests trust this fixture to speak the OpenAI wire format and to fault exactly as told; these
tests pin that down against the client ftrecipe actually uses.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from support.llm_server import (
    DEFAULT_API_KEY,
    DEFAULT_MODEL,
    NO_SCRIPT_MESSAGE,
    ChatRequest,
    LLMServer,
    Reply,
)

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a command generator."},
    {"role": "user", "content": "I want to transfer money"},
]


def client(server: LLMServer, **kwargs: object) -> openai.OpenAI:
    """A real client pointed at the fixture; no retries unless a test asks for them."""
    options: dict[str, object] = {"api_key": server.api_key, "max_retries": 0, "timeout": 5.0, **kwargs}
    return openai.OpenAI(base_url=server.base_url, **options)  # type: ignore[arg-type]


def ask(server: LLMServer, prompt: str = "hello", **kwargs: object) -> str | None:
    """One chat call; returns the answer text."""
    with client(server, **kwargs) as oai:
        completion = oai.chat.completions.create(
            model="cmd-gen", messages=[{"role": "user", "content": prompt}]
        )
    return completion.choices[0].message.content


def post_raw(
    server: LLMServer, body: dict[str, object], key: str | None = DEFAULT_API_KEY
) -> tuple[int, bytes]:
    """A chat call without the openai client, to see the exact bytes on the wire."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        f"{server.base_url}/chat/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_scripted_answer_depends_on_prompt_and_request_is_recorded(llm_server: LLMServer) -> None:
    seen: list[ChatRequest] = []

    @llm_server.script
    def answer(request: ChatRequest) -> str:
        seen.append(request)
        return "StartFlow(transfer_money)" if "transfer" in request.prompt else "CannotHandle()"

    with client(llm_server) as oai:
        completion = oai.chat.completions.create(
            model="cmd-gen", messages=MESSAGES, temperature=0.0, max_tokens=32
        )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "cmd-gen"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "StartFlow(transfer_money)"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (10, 1)
    assert completion.usage.total_tokens == 11
    assert ask(llm_server, "what is the weather") == "CannotHandle()"

    request = seen[0]
    assert (request.model, request.temperature, request.max_tokens, request.stream) == (
        "cmd-gen",
        0.0,
        32,
        False,
    )
    assert request.system == "You are a command generator."
    assert request.body["messages"] == MESSAGES
    records = llm_server.requests
    assert [r.path for r in records] == ["/v1/chat/completions"] * 2
    assert records[0].bearer == DEFAULT_API_KEY
    assert records[0].headers["authorization"] == f"Bearer {DEFAULT_API_KEY}"
    assert records[0].status == 200
    assert records[0].received_at <= time.time()
    assert llm_server.prompts == ["I want to transfer money", "what is the weather"]


def test_rules_sequence_and_models(llm_server: LLMServer) -> None:
    llm_server.answer_rules({"transfer": "StartFlow(transfer_money)", "bye": Reply.text("Bye()")})
    assert ask(llm_server, "transfer 50$") == "StartFlow(transfer_money)"
    assert ask(llm_server, "ok bye") == "Bye()"
    with pytest.raises(openai.InternalServerError, match="no rule matched"):
        ask(llm_server, "unknown", max_retries=2)  # not retried: the 500 says x-should-retry: false

    llm_server.answer_sequence("first", "second", then="again")
    assert [ask(llm_server) for _ in range(4)] == ["first", "second", "again", "again"]

    with client(llm_server) as oai:
        assert [m.id for m in oai.models.list()] == [DEFAULT_MODEL]
    assert len(llm_server.requests) == 3 + 4 + 1


def test_unscripted_and_raising_scripts_fail_fast_and_visibly(llm_server: LLMServer) -> None:
    with pytest.raises(openai.InternalServerError, match="no script set"):
        ask(llm_server, max_retries=2)
    assert NO_SCRIPT_MESSAGE in post_raw(llm_server, {"model": "m", "messages": MESSAGES})[1].decode()

    def broken(request: ChatRequest) -> str:
        raise KeyError("oops")

    llm_server.script(broken)
    with pytest.raises(openai.InternalServerError, match="script raised"):
        ask(llm_server, max_retries=2)
    assert len(llm_server.requests) == 3
    assert [type(e) for e in llm_server.script_errors] == [KeyError]


def test_429_with_retry_after_is_retried_then_succeeds(llm_server: LLMServer) -> None:
    llm_server.answer_with("ok")
    llm_server.fail_next(1, status=429, retry_after=0.6)
    started = time.monotonic()
    assert ask(llm_server, max_retries=2) == "ok"
    elapsed = time.monotonic() - started

    first, second = llm_server.requests
    assert (first.status, second.status) == (429, 200)
    # The client's own first backoff is at most 0.5 s, so >= 0.6 s proves it honoured Retry-After.
    assert second.monotonic - first.monotonic >= 0.6
    assert elapsed >= 0.6

    llm_server.fail_next(1, status=429)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(llm_server)
    assert caught.value.response.headers["retry-after"] == "0.01"
    assert caught.value.code == "rate_limit_exceeded"


def test_500_is_retried_then_succeeds(llm_server: LLMServer) -> None:
    llm_server.answer_with("recovered")
    llm_server.fail_next(2, status=500)
    assert ask(llm_server, max_retries=2) == "recovered"
    assert [r.status for r in llm_server.requests] == [500, 500, 200]

    llm_server.fail_next(1, status=503, message="overloaded")
    with pytest.raises(openai.InternalServerError, match="overloaded"):
        ask(llm_server)


def test_hang_raises_api_timeout_and_server_keeps_serving(llm_server: LLMServer) -> None:
    llm_server.answer_with("late but fine")
    llm_server.hang_next(1)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        ask(llm_server, timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 2.0
    assert llm_server.requests[0].status is None  # still hanging server-side
    assert ask(llm_server, timeout=0.5) == "late but fine"

    llm_server.inject(Reply.text("too slow", delay=0.5))
    with pytest.raises(openai.APITimeoutError):
        ask(llm_server, timeout=0.1)


def test_garbage_answers(llm_server: LLMServer) -> None:
    llm_server.answer_with("fine")
    llm_server.garbage_next(1, malformed_json=True)
    # The openai client does not wrap a broken JSON body into an OpenAIError.
    with pytest.raises(json.JSONDecodeError):
        ask(llm_server)

    llm_server.garbage_next(1)
    # A non-JSON 200 comes back as the raw text, unless strict validation is on.
    with client(llm_server) as oai:
        garbage: object = oai.chat.completions.create(model="m", messages=MESSAGES)
        assert garbage == "<html>502 Bad Gateway</html>"
        llm_server.inject(Reply.malformed_stream())
        with pytest.raises(json.JSONDecodeError):
            list(oai.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    llm_server.garbage_next(1)
    with (
        client(llm_server, _strict_response_validation=True) as strict,
        pytest.raises(openai.APIResponseValidationError),
    ):
        strict.chat.completions.create(model="m", messages=MESSAGES)

    llm_server.drop_next(1)
    with pytest.raises(openai.APIConnectionError):
        ask(llm_server)
    llm_server.drop_next(1)
    assert ask(llm_server, max_retries=1) == "fine"


def test_streaming_is_assembled(llm_server: LLMServer) -> None:
    answer = "StartFlow(transfer_money)\nSetSlot(amount, 50)  done"
    llm_server.answer_with(answer)
    with client(llm_server) as oai:
        stream = oai.chat.completions.create(
            model="cmd-gen", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert llm_server.chat_requests[0].stream

    status, raw = post_raw(llm_server, {"model": "m", "messages": MESSAGES, "stream": True})
    events = [line.removeprefix("data: ") for line in raw.decode().split("\n\n") if line]
    assert status == 200
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]) == answer


async def test_concurrent_async_calls_are_all_answered(llm_server: LLMServer) -> None:
    llm_server.latency = 0.25
    llm_server.script(lambda request: f"echo {request.prompt}")
    async with openai.AsyncOpenAI(
        base_url=llm_server.base_url, api_key=llm_server.api_key, max_retries=0
    ) as aclient:

        async def one(i: int) -> str | None:
            completion = await aclient.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"n{i}"}]
            )
            return completion.choices[0].message.content

        started = time.monotonic()
        answers = await asyncio.gather(*(one(i) for i in range(20)))
        elapsed = time.monotonic() - started
    assert answers == [f"echo n{i}" for i in range(20)]
    assert elapsed < 2.5  # 20 x 0.25 s one after another would take 5 s
    assert sorted(r.index for r in llm_server.chat_requests) == list(range(20))


def test_added_latency_is_measurable(llm_server: LLMServer) -> None:
    llm_server.answer_with("ok")
    llm_server.latency = 0.25
    started = time.monotonic()
    ask(llm_server)
    assert time.monotonic() - started >= 0.25

    llm_server.latency = 0.0
    llm_server.inject(Reply.text("slow", delay=0.15))
    started = time.monotonic()
    assert ask(llm_server) == "slow"
    assert time.monotonic() - started >= 0.15
    record = llm_server.requests[-1]
    assert record.responded_at is not None
    assert record.responded_at - record.monotonic >= 0.15


def test_wrong_or_missing_key_gets_401(llm_server: LLMServer) -> None:
    llm_server.answer_with("secret")
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(llm_server, api_key="wrong-key")
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert post_raw(llm_server, {"model": "m", "messages": MESSAGES}, key=None)[0] == 401
    assert [r.bearer for r in llm_server.requests] == ["wrong-key", None]
    assert [r.status for r in llm_server.requests] == [401, 401]

    llm_server.api_key = None  # auth check off
    assert ask(llm_server, api_key="anything") == "secret"


def test_reset_and_standalone_server() -> None:
    with LLMServer(api_key="other") as server:
        server.answer_with("x")
        server.fail_next(3)
        assert post_raw(server, {"model": "m", "messages": MESSAGES}, key="other")[0] == 429
        server.latency = 1.0
        server.reset()
        assert server.requests == []
        assert post_raw(server, {"model": "m", "messages": MESSAGES}, key="other")[0] == 500
        assert post_raw(server, {"model": "m", "messages": "nope"}, key="other")[0] == 400
        assert server.requests[0].chat is not None
        assert server.requests[0].chat.index == 0
