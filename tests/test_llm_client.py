"""LLMClient against the real local OpenAI-compatible server: answers, retries, errors, cache, concurrency.

Why against a server: the retry and garbage paths depend on what the installed openai client does with
real HTTP (429 headers, cut-off JSON, dropped connections), which a mock would only guess at.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.dataprep.llm import NO_KEY_PLACEHOLDER, LLMClient, LLMError, LLMSettings, Usage
from support.llm_server import DEFAULT_API_KEY, ChatRequest, LLMServer, Reply

ANSWER = "start flow transfer_money"
PROMPT = "Your task is to analyze the current conversation...\nUSER: I want to send money"

MakeClient = Callable[..., LLMClient]


@pytest.fixture
def make_client(llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch) -> MakeClient:
    """Clients on the fixture server with the right key in the environment and near-zero backoff."""
    monkeypatch.setenv("OPENAI_API_KEY", DEFAULT_API_KEY)

    def make(**options: Any) -> LLMClient:
        settings_options = {
            k: options.pop(k) for k in ("timeout", "max_tokens", "temperature") if k in options
        }
        settings = LLMSettings(
            provider="self-hosted", model="cmd-gen", api_base=llm_server.base_url, **settings_options
        )
        defaults: dict[str, Any] = {"backoff_base": 0.001, "backoff_cap": 0.01}
        return LLMClient(settings, **{**defaults, **options})

    return make


def max_in_flight(server: LLMServer) -> int:
    """Most requests the server held at once, from arrival and answer times."""
    events: list[tuple[float, int]] = []
    for record in server.requests:
        assert record.responded_at is not None
        events += [(record.monotonic, 1), (record.responded_at, -1)]
    # At equal times count the departure first: a request sent after an answer arrived does not overlap it.
    events.sort(key=lambda event: (event[0], event[1]))
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def temp_files(root: Path) -> list[Path]:
    """Temp files an interrupted cache write would leave behind."""
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# -- answers ---------------------------------------------------------------------------------------


async def test_plain_answer_sends_one_user_message_with_the_key(
    llm_server: LLMServer, make_client: MakeClient
) -> None:
    llm_server.answer_with(ANSWER)
    async with make_client(max_tokens=64) as client:
        assert await client.complete(PROMPT, purpose="annotate") == ANSWER

    (request,) = llm_server.requests
    assert request.bearer == DEFAULT_API_KEY
    assert request.chat is not None
    assert request.chat.messages == [{"role": "user", "content": PROMPT}]
    assert request.chat.model == "cmd-gen"
    assert request.chat.temperature == 0.0
    assert request.chat.max_tokens == 64
    assert not request.chat.stream
    usage = client.usage["annotate"]
    assert usage.calls == 1 and usage.failures == 0 and usage.cache_hits == 0
    assert usage.prompt_tokens == len(PROMPT.split())
    assert usage.completion_tokens == len(ANSWER.split())


async def test_max_tokens_is_left_out_when_unset(llm_server: LLMServer, make_client: MakeClient) -> None:
    llm_server.answer_with(ANSWER)
    async with make_client() as client:
        await client.complete(PROMPT, purpose="annotate")
    assert "max_tokens" not in llm_server.requests[0].body
    assert "max_completion_tokens" not in llm_server.requests[0].body


# -- retries ---------------------------------------------------------------------------------------


async def test_429_waits_for_fractional_retry_after(llm_server: LLMServer, make_client: MakeClient) -> None:
    llm_server.answer_with(ANSWER)
    llm_server.fail_next(1, 429, retry_after=0.3)
    async with make_client() as client:
        assert await client.complete(PROMPT, purpose="annotate") == ANSWER

    first, second = llm_server.requests
    assert first.status == 429 and second.status == 200
    # The backoff alone would be ~1 ms: the gap is the server's Retry-After.
    assert second.monotonic - first.monotonic >= 0.29
    usage = client.usage["annotate"]
    assert (usage.calls, usage.failures, usage.errors) == (2, 1, 0)


async def test_retry_after_over_the_limit_fails_at_once(
    llm_server: LLMServer, make_client: MakeClient
) -> None:
    llm_server.fail_next(1, 429, retry_after=3600)
    async with make_client(max_retry_after=5) as client:
        with pytest.raises(LLMError, match=r"Retry-After 3600s is over the 5s limit") as caught:
            await client.complete(PROMPT, purpose="annotate")
    assert caught.value.attempts == 1 and caught.value.status == 429
    assert len(llm_server.requests) == 1


async def test_5xx_is_retried_with_backoff(llm_server: LLMServer, make_client: MakeClient) -> None:
    llm_server.answer_with(ANSWER)
    llm_server.fail_next(2, 500, retry_after=None)
    async with make_client() as client:
        assert await client.complete(PROMPT, purpose="annotate") == ANSWER
    assert [r.status for r in llm_server.requests] == [500, 500, 200]
    assert client.usage["annotate"].calls == 3


async def test_timeout_is_retried(llm_server: LLMServer, make_client: MakeClient) -> None:
    llm_server.answer_with(ANSWER)
    llm_server.hang_next(1)
    async with make_client(timeout=0.3) as client:
        assert await client.complete(PROMPT, purpose="annotate") == ANSWER
    assert len(llm_server.requests) == 2
    assert (client.usage["annotate"].calls, client.usage["annotate"].failures) == (2, 1)


async def test_dropped_connection_is_retried(llm_server: LLMServer, make_client: MakeClient) -> None:
    llm_server.answer_with(ANSWER)
    llm_server.drop_next(1)
    async with make_client() as client:
        assert await client.complete(PROMPT, purpose="annotate") == ANSWER
    assert len(llm_server.requests) == 2
    assert client.usage["annotate"].calls == 2


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(Reply.garbage(), id="html-page"),
        pytest.param(Reply.malformed_json(), id="cut-off-json"),
        pytest.param(Reply(body='{"object": "chat.completion", "choices": []}'), id="no-choices"),
        pytest.param(Reply(body='["not", "a", "completion"]'), id="json-list"),
        pytest.param(Reply.text(""), id="empty-content"),
        pytest.param(Reply.text("  \n"), id="blank-content"),
    ],
)
async def test_garbage_answers_are_retried(
    llm_server: LLMServer, make_client: MakeClient, bad: Reply
) -> None:
    llm_server.answer_with(ANSWER)
    llm_server.inject(bad)
    async with make_client() as client:
        assert await client.complete(PROMPT, purpose="annotate") == ANSWER
    assert [r.status for r in llm_server.requests] == [200, 200]
    usage = client.usage["annotate"]
    assert (usage.calls, usage.failures) == (2, 1)
    # Only the good answer's tokens count.
    assert usage.completion_tokens == len(ANSWER.split())


async def test_exhausted_attempts_raise_one_line_naming_purpose_and_attempts(
    llm_server: LLMServer, make_client: MakeClient
) -> None:
    llm_server.fail_next(10, 503, retry_after=None)
    async with make_client(max_attempts=3) as client:
        with pytest.raises(LLMError) as caught:
            await client.complete(PROMPT, purpose="rephrase")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "rephrase: LLM cmd-gen failed after 3 attempts: gave up: server error (HTTP 503)"
    )
    assert PROMPT.split()[0] not in message
    assert (caught.value.purpose, caught.value.attempts, caught.value.status) == ("rephrase", 3, 503)
    assert len(llm_server.requests) == 3
    usage = client.usage["rephrase"]
    assert (usage.calls, usage.failures, usage.errors) == (3, 3, 1)


async def test_exhausted_garbage_names_the_reason(llm_server: LLMServer, make_client: MakeClient) -> None:
    llm_server.garbage_next(2)
    async with make_client(max_attempts=2) as client:
        with pytest.raises(LLMError, match=r"failed after 2 attempts: gave up: malformed response: not JSON"):
            await client.complete(PROMPT, purpose="annotate")


async def test_wrong_key_fails_at_once_without_the_key(
    llm_server: LLMServer,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-secret-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    llm_server.answer_with(ANSWER)
    async with make_client() as client:
        with pytest.raises(LLMError) as caught:
            await client.complete(PROMPT, purpose="annotate")
    message = str(caught.value)
    assert message == (
        "annotate: LLM cmd-gen failed after 1 attempt: authentication failed (HTTP 401): check OPENAI_API_KEY"
    )
    assert wrong not in repr(caught.value) and caught.value.__cause__ is None
    assert wrong not in caplog.text
    (request,) = llm_server.requests
    assert request.bearer == wrong and request.status == 401


async def test_other_4xx_is_not_retried(llm_server: LLMServer, make_client: MakeClient) -> None:
    llm_server.inject(Reply.fail(400, "This model's maximum context length is 8192 tokens"))
    async with make_client() as client:
        with pytest.raises(LLMError, match=r"after 1 attempt: request rejected \(HTTP 400\): This model's"):
            await client.complete(PROMPT, purpose="annotate")
    assert len(llm_server.requests) == 1


async def test_x_should_retry_false_is_obeyed(llm_server: LLMServer, make_client: MakeClient) -> None:
    # The fixture answers unscripted calls with a 500 marked "do not retry".
    async with make_client() as client:
        with pytest.raises(
            LLMError, match=r"after 1 attempt: server error \(HTTP 500\): llm_server: no script"
        ):
            await client.complete(PROMPT, purpose="annotate")


# -- cache -----------------------------------------------------------------------------------------


async def test_second_run_is_served_from_the_cache(
    llm_server: LLMServer, make_client: MakeClient, tmp_path: Path
) -> None:
    llm_server.script(lambda request: f"answer to {request.prompt[-4:]}")
    prompts = ["prompt one", "prompt two"]
    async with make_client(cache_dir=tmp_path) as first:
        answers = await asyncio.gather(*(first.complete(p, purpose="annotate") for p in prompts))
    assert answers == ["answer to  one", "answer to  two"]
    assert len(llm_server.requests) == 2

    path = first.cache_path("prompt one")
    assert path is not None and path.parent.parent == tmp_path
    key = first.cache_key("prompt one")
    assert path == tmp_path / key[:2] / f"{key}.json"
    stored = json.loads(path.read_text())
    assert stored["answer"] == "answer to  one" and stored["usage"]["completion_tokens"] == 3
    assert not temp_files(tmp_path)

    llm_server.reset()  # no script: any request would now fail
    async with make_client(cache_dir=tmp_path) as second:
        again = await asyncio.gather(*(second.complete(p, purpose="annotate") for p in prompts))
    assert again == answers
    assert llm_server.requests == []
    usage = second.usage["annotate"]
    assert (usage.calls, usage.cache_hits, usage.prompt_tokens) == (0, 2, 0)


async def test_cache_key_covers_the_settings(
    llm_server: LLMServer, make_client: MakeClient, tmp_path: Path
) -> None:
    llm_server.answer_with(ANSWER)
    async with make_client(cache_dir=tmp_path) as client:
        await client.complete(PROMPT, purpose="annotate")
    async with make_client(cache_dir=tmp_path, temperature=0.7) as warmer:
        await warmer.complete(PROMPT, purpose="annotate")
        assert warmer.cache_key(PROMPT) != client.cache_key(PROMPT)
    assert len(llm_server.requests) == 2


async def test_corrupt_cache_file_is_ignored_and_overwritten(
    llm_server: LLMServer, make_client: MakeClient, tmp_path: Path
) -> None:
    llm_server.answer_with(ANSWER)
    async with make_client(cache_dir=tmp_path) as client:
        path = client.cache_path(PROMPT)
        assert path is not None
        path.parent.mkdir(parents=True)
        path.write_text('{"answer": "half a fi')
        assert await client.complete(PROMPT, purpose="annotate") == ANSWER
    assert len(llm_server.requests) == 1
    assert json.loads(path.read_text())["answer"] == ANSWER
    assert client.usage["annotate"].cache_hits == 0


async def test_failures_are_not_cached(
    llm_server: LLMServer, make_client: MakeClient, tmp_path: Path
) -> None:
    llm_server.fail_next(1, 400)
    async with make_client(cache_dir=tmp_path) as client:
        with pytest.raises(LLMError):
            await client.complete(PROMPT, purpose="annotate")
        path = client.cache_path(PROMPT)
    assert path is not None and not path.exists()


async def test_identical_prompts_in_flight_share_one_request(
    llm_server: LLMServer, make_client: MakeClient, tmp_path: Path
) -> None:
    llm_server.answer_with(Reply.text(ANSWER, delay=0.05))
    async with make_client(cache_dir=tmp_path) as client:
        answers = await asyncio.gather(*(client.complete(PROMPT, purpose="annotate") for _ in range(3)))
    assert answers == [ANSWER] * 3
    assert len(llm_server.requests) == 1
    assert (client.usage["annotate"].calls, client.usage["annotate"].cache_hits) == (1, 2)


# -- concurrency and accounting ----------------------------------------------------------------------


async def test_concurrency_is_bounded(llm_server: LLMServer, make_client: MakeClient) -> None:
    llm_server.answer_with(ANSWER)
    llm_server.latency = 0.1
    async with make_client(concurrency=2) as client:
        await asyncio.gather(*(client.complete(f"prompt {i}", purpose="annotate") for i in range(6)))
    assert len(llm_server.requests) == 6
    assert max_in_flight(llm_server) == 2


async def test_usage_is_counted_by_purpose(llm_server: LLMServer, make_client: MakeClient) -> None:
    def by_purpose(request: ChatRequest) -> str:
        return "a rephrased message" if request.prompt.startswith("rephrase") else ANSWER

    llm_server.script(by_purpose)
    llm_server.fail_next(1, 429)
    async with make_client() as client:
        await client.complete("rephrase: hello", purpose="rephrase")
        await client.complete("annotate: one", purpose="annotate")
        await client.complete("annotate: two", purpose="annotate")

    usage = client.usage
    assert usage["rephrase"] == Usage(calls=2, prompt_tokens=2, completion_tokens=3, failures=1)
    assert usage["annotate"] == Usage(calls=2, prompt_tokens=4, completion_tokens=6)
    usage["annotate"].calls = 99  # a snapshot: the client's numbers do not change
    assert client.usage["annotate"].calls == 2

    summary = client.summary()
    assert summary["provider"] == "self-hosted" and summary["model"] == "cmd-gen"
    assert list(summary["purposes"]) == ["annotate", "rephrase"]
    assert summary["total"] == {
        "calls": 4,
        "prompt_tokens": 6,
        "completion_tokens": 9,
        "cache_hits": 0,
        "failures": 1,
        "errors": 0,
    }
    assert yaml.safe_load(yaml.safe_dump(summary)) == summary


async def test_closed_client_refuses_calls(make_client: MakeClient) -> None:
    client = make_client()
    await client.aclose()
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await client.complete(PROMPT, purpose="annotate")


# -- settings and keys -----------------------------------------------------------------------------


def test_from_rasa_reads_rasa_keys_and_old_aliases() -> None:
    settings = LLMSettings.from_rasa(
        {
            "provider": "self-hosted",
            "model_name": "cmd-gen",
            "api_base": "http://vllm:8000/v1",
            "temperature": 0,
            "request_timeout": 7,
            "max_tokens": 256,
        }
    )
    assert settings == LLMSettings(
        provider="self-hosted",
        model="cmd-gen",
        api_base="http://vllm:8000/v1",
        temperature=0.0,
        timeout=7.0,
        max_tokens=256,
    )
    assert LLMSettings.from_rasa({"model": "gpt-4o"}).provider == "openai"
    assert LLMSettings.from_rasa({"model": "gpt-4o"}).timeout == 60.0


def test_from_rasa_takes_the_azure_deployment_as_model() -> None:
    settings = LLMSettings.from_rasa(
        {
            "provider": "azure",
            "deployment": "rasa-gpt-4o",
            "model": "gpt-4o",
            "api_base": "https://x.openai.azure.com",
            "api_version": "2024-06-01",
        }
    )
    assert settings.model == "rasa-gpt-4o" and settings.api_key_env == "AZURE_API_KEY"


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"model": "m", "api_key": "sk-secret-value"}, r"llm\.api_key must not be set .* \$OPENAI_API_KEY"),
        (
            {"provider": "azure", "model": "m", "api_key": "sk-secret-value"},
            r"llm\.api_key must not be set .* \$AZURE_API_KEY",
        ),
        ({"model": "m", "openai_api_key": "sk-secret-value"}, r"unknown llm key 'openai_api_key'"),
        ({"model": "m", "model_name": "n"}, r"llm\.model and llm\.model_name both set model"),
        ({"model": "m", "deployment": "d"}, r"llm\.deployment is only valid with provider azure"),
        ({"model": "m", "temperature": "hot"}, r"^llm\.temperature: Input should be a valid number"),
        ({"model": "m", "request_timeout": -1}, r"^llm\.request_timeout: Input should be greater than 0"),
        ({"provider": "bedrock", "model": "m"}, r"^llm\.provider: Input should be 'openai', 'azure'"),
        ({"temperature": 0}, r"^llm\.model: Field required$"),
        ({"provider": "self-hosted", "model": "m"}, r"^llm: provider self-hosted needs api_base"),
        (
            {"provider": "azure", "model": "m", "api_base": "https://x"},
            r"azure needs api_base and api_version",
        ),
        ({"model_group": "openai_llm"}, r"model_group must be resolved"),
    ],
)
def test_from_rasa_rejects_bad_blocks_in_one_line(mapping: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        LLMSettings.from_rasa(mapping)
    assert "\n" not in str(caught.value)
    assert "sk-secret-value" not in str(caught.value) and "hot" not in str(caught.value)


def test_openai_needs_a_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"^OPENAI_API_KEY is not set: provider openai needs an API key$"):
        LLMClient(LLMSettings(model="gpt-4o"))


async def test_a_key_variable_named_as_rasa_does_is_read_and_sent(
    llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """endpoints.yml's `api_key: ${VAR}` is a reference to the environment, as in Rasa."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("CMD_GEN_KEY", DEFAULT_API_KEY)
    llm_server.answer_with(ANSWER)
    settings = LLMSettings.from_rasa(
        {
            "provider": "self-hosted",
            "model": "cmd-gen",
            "api_base": llm_server.base_url,
            "api_key": "${CMD_GEN_KEY}",
        }
    )
    assert settings.api_key_env == "CMD_GEN_KEY"
    async with LLMClient(settings) as client:
        assert await client.complete(PROMPT, purpose="annotate") == ANSWER
    assert llm_server.requests[0].bearer == DEFAULT_API_KEY
    monkeypatch.delenv("CMD_GEN_KEY")
    azure = LLMSettings.from_rasa(
        {
            "provider": "azure",
            "deployment": "d",
            "api_base": "https://x",
            "api_version": "v",
            "api_key": "${AZ}",
        }
    )
    with pytest.raises(ValueError, match=r"^AZ is not set: provider azure needs an API key$"):
        LLMClient(azure)


async def test_self_hosted_without_key_sends_a_placeholder(
    llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    llm_server.api_key = None
    llm_server.answer_with(ANSWER)
    settings = LLMSettings(provider="self-hosted", model="cmd-gen", api_base=llm_server.base_url)
    async with LLMClient(settings) as client:
        assert await client.complete(PROMPT, purpose="annotate") == ANSWER
    assert llm_server.requests[0].bearer == NO_KEY_PLACEHOLDER
