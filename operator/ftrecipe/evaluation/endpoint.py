"""Answers of any OpenAI-compatible chat-completions server: vLLM serving the adapter, GPT-4o, the oracle.

Each prompt goes as the record's messages (for prepare-data's records: one user message, as Rasa's
command generators send it), greedy (`temperature 0`), at most `max_new_tokens`. One `AsyncOpenAI`
client with its own retries (429 with Retry-After, 5xx, timeouts) and a semaphore of `concurrency`
requests in flight. A turn's latency is its request's wall time, retries included; tokens are the
server's `usage.completion_tokens`. A request that still fails after the retries ends the evaluation
with one line: figures with holes in them would not be comparable. `on_answered` hears of each turn
as its answer arrives (the progress lines).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import openai
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from ftrecipe.evaluation.errors import EvalError
from ftrecipe.evaluation.scoring import Generation, GenerationRun

# Sent as the bearer token when the key variable is unset: vLLM without --api-key ignores it.
NO_KEY: Final = "no-key"
DEFAULT_API_KEY_ENV: Final = "OPENAI_API_KEY"
MAX_RETRIES: Final = 5
REQUEST_TIMEOUT_SECONDS: Final = 300.0
_REASON_CHARS: Final = 200


@dataclass(frozen=True)
class EndpointSettings:
    url: str  # the base URL, ending in /v1
    model: str
    max_new_tokens: int
    concurrency: int
    api_key_env: str = DEFAULT_API_KEY_ENV
    timeout_seconds: float = REQUEST_TIMEOUT_SECONDS
    max_retries: int = MAX_RETRIES


def _reason(text: object) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= _REASON_CHARS else flat[: _REASON_CHARS - 1] + "…"


def _failure(settings: EndpointSettings, where: str, exc: openai.OpenAIError) -> EvalError:
    """One line for a request that failed for good; never the key (OpenAI quotes part of a wrong one)."""
    url, model = settings.url, settings.model
    if isinstance(exc, openai.AuthenticationError):
        return EvalError(
            f"--endpoint {url}: authentication failed (HTTP 401) for {where}: "
            f"set {settings.api_key_env} to the server's key (or pass --api-key-env NAME)"
        )
    if isinstance(exc, openai.NotFoundError):
        return EvalError(
            f"--endpoint {url}: model {model} not found (HTTP 404) for {where}: "
            "check --model and that --endpoint is the server's /v1 URL"
        )
    if isinstance(exc, openai.APITimeoutError):
        return EvalError(
            f"--endpoint {url}: {where} timed out after {settings.timeout_seconds:g}s "
            f"({settings.max_retries} retries)"
        )
    if isinstance(exc, openai.APIConnectionError):
        cause = f": {type(exc.__cause__).__name__}" if exc.__cause__ is not None else ""
        return EvalError(
            f"--endpoint {url}: cannot connect{cause} ({settings.max_retries} retries); "
            "check the URL and that the server is up"
        )
    if isinstance(exc, openai.APIStatusError):
        message = exc.body.get("message") if isinstance(exc.body, dict) else None
        detail = f": {_reason(message)}" if message else ""
        return EvalError(f"--endpoint {url}: HTTP {exc.status_code} for {where}{detail}")
    return EvalError(f"--endpoint {url}: bad answer for {where}: {type(exc).__name__}: {_reason(exc)}")


def _generation(settings: EndpointSettings, where: str, response: Any, seconds: float) -> Generation:
    if not isinstance(response, ChatCompletion):
        # The client hands back a bare string when the body is not JSON (an HTML page, a proxy's error).
        raise EvalError(
            f"--endpoint {settings.url}: the answer to {where} is not a chat completion; "
            "is --endpoint an OpenAI-compatible /v1 URL?"
        )
    if not response.choices:
        raise EvalError(f"--endpoint {settings.url}: the answer to {where} has no choices")
    choice = response.choices[0]
    usage = response.usage
    return Generation(
        text=(choice.message.content or "").strip(),
        latency_seconds=seconds,
        generated_tokens=usage.completion_tokens if usage is not None else None,
        truncated=choice.finish_reason == "length",
    )


class EndpointClient:
    """One `AsyncOpenAI` client and a semaphore of `concurrency` requests in flight; `ask` answers one prompt.
    Shared by the turn-by-turn scoring (all prompts at once) and `evaluate --e2e` (each test's next turn
    once its previous answer is known)."""

    def __init__(self, settings: EndpointSettings) -> None:
        key = os.environ.get(settings.api_key_env, "").strip() or NO_KEY
        self.settings = settings
        self._client = openai.AsyncOpenAI(
            base_url=settings.url,
            api_key=key,
            timeout=settings.timeout_seconds,
            max_retries=settings.max_retries,
        )
        self._semaphore = asyncio.Semaphore(settings.concurrency)

    async def ask(self, messages: Sequence[dict[str, str]], where: str) -> Generation:
        settings = self.settings
        async with self._semaphore:
            started = time.perf_counter()
            try:
                response = await self._client.chat.completions.create(
                    model=settings.model,
                    # the records' roles as they are: the server is the judge of what it accepts
                    messages=cast("list[ChatCompletionMessageParam]", [dict(m) for m in messages]),
                    temperature=0.0,
                    max_tokens=settings.max_new_tokens,
                )
            except openai.OpenAIError as exc:
                raise _failure(settings, where, exc) from None
            return _generation(settings, where, response, time.perf_counter() - started)

    async def aclose(self) -> None:
        await self._client.close()


async def _generate_all(
    settings: EndpointSettings,
    prompts: Sequence[Sequence[dict[str, str]]],
    wheres: Sequence[str],
    on_answered: Callable[[int], None] | None,
) -> GenerationRun:
    client = EndpointClient(settings)

    async def ask(messages: Sequence[dict[str, str]], where: str) -> Generation:
        generation = await client.ask(messages, where)
        if on_answered is not None:
            on_answered(1)
        return generation

    started = time.perf_counter()
    tasks = [
        asyncio.ensure_future(ask(messages, where)) for messages, where in zip(prompts, wheres, strict=True)
    ]
    try:
        generations = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:  # the first failure ends the run: no point in asking the rest
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        await client.aclose()
    return GenerationRun(list(generations), time.perf_counter() - started)


def generate_endpoint(
    settings: EndpointSettings,
    prompts: Sequence[Sequence[dict[str, str]]],
    wheres: Sequence[str],
    on_answered: Callable[[int], None] | None = None,
) -> GenerationRun:
    """Answers to `prompts` (the messages to send) in their order; `wheres` name them in error messages;
    `on_answered(1)` as each answer arrives."""
    return asyncio.run(_generate_all(settings, prompts, wheres, on_answered))
