"""The chat-completions client data preparation uses for the command-generator LLM and the rephraser.

Why its own retry loop: every HTTP attempt (retries included) must be counted per purpose, and answers
that are not answers (a proxy's HTML page, cut-off JSON, no choices, empty content) must be retried like
a 5xx. The openai client retries only on status codes and hands garbage back as a ``str`` or a bare
``JSONDecodeError``, so it runs with ``max_retries=0`` and the raw body is parsed here.

Keys come only from the environment (``OPENAI_API_KEY``, ``AZURE_API_KEY`` for azure) and never appear in
logs or exception messages; prompts never appear in them either.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Final, Literal

import openai
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger(__name__)

Provider = Literal["openai", "azure", "self-hosted"]

# Sent as the bearer token to self-hosted servers that need no key (vLLM without --api-key ignores it).
NO_KEY_PLACEHOLDER: Final = "no-key"
# Statuses worth another try besides 5xx: request timeout, lock conflict, rate limit (as the openai client).
_RETRYABLE_4XX: Final = frozenset({408, 409, 429})
_REASON_MAX: Final = 200
_CACHE_VERSION: Final = 1

# `${NAME}`: how Rasa's files refer to an environment variable.
_ENV_REFERENCE: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Rasa's keys → our field names; the older spellings are aliases.
_RASA_KEYS: Final = {
    "provider": "provider",
    "model": "model",
    "model_name": "model",
    "api_base": "api_base",
    "api_version": "api_version",
    "temperature": "temperature",
    "max_tokens": "max_tokens",
    "timeout": "timeout",
    "request_timeout": "timeout",
    # Rasa's azure blocks name the deployment (see from_rasa).
    "deployment": "model",
}


class LLMSettings(BaseModel):
    """One LLM as Rasa's ``llm`` block describes it (no key: that comes from the environment)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: Provider = "openai"
    # The model name, or the deployment name for azure.
    model: Annotated[str, Field(min_length=1)]
    api_base: str | None = None
    api_version: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    # Seconds for one HTTP attempt, end to end.
    timeout: Annotated[float, Field(gt=0)] = 60.0
    # The variable a Rasa block names for its key (`api_key: ${AZURE_OPENAI_KEY}`); None: the provider's own.
    key_variable: Annotated[str | None, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = None

    @model_validator(mode="after")
    def _provider_needs(self) -> LLMSettings:
        if self.provider == "azure" and (self.api_base is None or self.api_version is None):
            raise ValueError("provider azure needs api_base and api_version")
        if self.provider == "self-hosted" and self.api_base is None:
            raise ValueError("provider self-hosted needs api_base, e.g. http://vllm:8000/v1")
        return self

    @property
    def api_key_env(self) -> str:
        """The environment variable the key is read from."""
        if self.key_variable is not None:
            return self.key_variable
        return "AZURE_API_KEY" if self.provider == "azure" else "OPENAI_API_KEY"

    @classmethod
    def from_rasa(cls, mapping: Mapping[str, Any]) -> LLMSettings:
        """Settings from a Rasa ``llm`` block; a bad block raises one ``ValueError`` line naming the key.

        Values are never echoed: a misnamed key may well hold a secret.
        """
        provider = mapping.get("provider", "openai")
        fields: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for key, value in mapping.items():
            if key == "api_key":
                # Rasa reads `${VAR}` from the environment: a reference, not a secret, so we follow it.
                reference = _ENV_REFERENCE.fullmatch(value) if isinstance(value, str) else None
                if reference is None:
                    env = "AZURE_API_KEY" if provider == "azure" else "OPENAI_API_KEY"
                    raise ValueError(
                        f"llm.api_key must not be set in the config: put the key in ${env} instead, "
                        "or name another variable as Rasa does (api_key: ${MY_KEY})"
                    )
                fields["key_variable"] = reference.group(1)
                origin["key_variable"] = key
                continue
            if key == "model_group":
                raise ValueError("llm.model_group must be resolved from endpoints.yml before it gets here")
            name = _RASA_KEYS.get(key) if isinstance(key, str) else None
            if name is None:
                raise ValueError(f"unknown llm key {str(key)!r} (allowed: {', '.join(sorted(_RASA_KEYS))})")
            if key == "deployment":
                if provider != "azure":
                    raise ValueError("llm.deployment is only valid with provider azure (use llm.model)")
                continue
            if name in fields:
                raise ValueError(f"llm.{origin[name]} and llm.{key} both set {name}: keep one")
            fields[name] = value
            origin[name] = key
        if "deployment" in mapping:
            # For Azure the model *is* the deployment name; Rasa's `model` is then only informative.
            fields["model"] = mapping["deployment"]
            origin["model"] = "deployment"
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise ValueError(_one_line_validation(exc, origin)) from None


def _one_line_validation(exc: ValidationError, origin: Mapping[str, str]) -> str:
    """Pydantic's errors as one line, by the user's key names, without the input values."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in error["loc"]]
        if loc:
            loc[0] = origin.get(loc[0], loc[0])
        where = f"llm.{'.'.join(loc)}" if loc else "llm"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


class LLMError(RuntimeError):
    """An LLM call that did not give an answer: one line with purpose, model, reason and attempts."""

    def __init__(self, *, purpose: str, model: str, reason: str, attempts: int, status: int | None) -> None:
        self.purpose = purpose
        self.model = model
        self.reason = reason
        self.attempts = attempts
        self.status = status
        plural = "" if attempts == 1 else "s"
        super().__init__(f"{purpose}: LLM {model} failed after {attempts} attempt{plural}: {reason}")


@dataclass
class Usage:
    """What one purpose cost: HTTP attempts, tokens of successful answers, cache hits, failures."""

    # HTTP attempts, retries included.
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Answers served without HTTP: from the disk cache, or shared with an identical call in flight.
    cache_hits: int = 0
    # HTTP attempts that gave no usable answer (retried or not).
    failures: int = 0
    # complete() calls that ended in LLMError.
    errors: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(**{k: v + getattr(other, k) for k, v in asdict(self).items()})


@dataclass(frozen=True, slots=True)
class _Answer:
    content: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: str
    retryable: bool
    status: int | None = None
    retry_after: float | None = None


class LLMClient:
    """Async chat-completions client with bounded concurrency, retries, usage accounting and a disk cache.

    Fire everything with ``asyncio.gather``: the client's semaphore bounds the HTTP requests in flight.
    """

    def __init__(
        self,
        settings: LLMSettings,
        *,
        concurrency: int = 8,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        max_retry_after: float = 120.0,
        cache_dir: Path | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.settings = settings
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_retry_after = max_retry_after
        self.cache_dir = cache_dir
        self._key = _api_key(settings)
        self._semaphore = asyncio.Semaphore(concurrency)
        self._usage: dict[str, Usage] = {}
        self._inflight: dict[str, asyncio.Future[_Answer]] = {}
        self._closed = False
        self._client = _openai_client(settings, self._key)

    # -- public ------------------------------------------------------------------------------------

    async def complete(self, prompt: str, *, purpose: str) -> str:
        """The answer to ``prompt`` sent as one user message (as Rasa's command generators send it)."""
        if self._closed:
            raise RuntimeError("LLMClient is closed")
        usage = self._usage.setdefault(purpose, Usage())
        if self.cache_dir is None:
            return (await self._fetch(prompt, purpose)).content
        key = self.cache_key(prompt)
        shared = self._inflight.get(key)
        if shared is None:
            # Identical prompts in flight together share one request: E2E conversations share prefixes.
            task = asyncio.ensure_future(self._cached_fetch(prompt, purpose, key))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
            return (await asyncio.shield(task)).content
        answer = await asyncio.shield(shared)
        usage.cache_hits += 1
        return answer.content

    @property
    def usage(self) -> dict[str, Usage]:
        """A snapshot of the usage per purpose."""
        return {purpose: replace(usage) for purpose, usage in self._usage.items()}

    def summary(self) -> dict[str, Any]:
        """Usage as plain data for the YAML report: per purpose and in total."""
        total = sum(self._usage.values(), Usage())
        return {
            "provider": self.settings.provider,
            "model": self.settings.model,
            "purposes": {purpose: asdict(usage) for purpose, usage in sorted(self._usage.items())},
            "total": asdict(total),
        }

    def cache_key(self, prompt: str) -> str:
        """sha256 of everything that decides the answer, as canonical JSON."""
        s = self.settings
        identity = {
            "provider": s.provider,
            "model": s.model,
            "api_base": s.api_base,
            "api_version": s.api_version,
            "temperature": s.temperature,
            "max_tokens": s.max_tokens,
            "prompt": prompt,
        }
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def cache_path(self, prompt: str) -> Path | None:
        """Where the answer to ``prompt`` is cached (None without a cache)."""
        if self.cache_dir is None:
            return None
        key = self.cache_key(prompt)
        return self.cache_dir / key[:2] / f"{key}.json"

    async def aclose(self) -> None:
        """Cancel shared calls still running and close the HTTP connections; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        pending = list(self._inflight.values())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._client.close()

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- calls -------------------------------------------------------------------------------------

    async def _cached_fetch(self, prompt: str, purpose: str, key: str) -> _Answer:
        assert self.cache_dir is not None
        path = self.cache_dir / key[:2] / f"{key}.json"
        cached = await asyncio.to_thread(_cache_read, path, key)
        if cached is not None:
            self._usage[purpose].cache_hits += 1
            return cached
        answer = await self._fetch(prompt, purpose)
        try:
            await asyncio.to_thread(_cache_write, path, key, self.settings.model, answer)
        except OSError as exc:
            # The answer is good; a cache that cannot be written only costs a re-ask next run.
            log.warning("LLM cache: cannot write %s: %s", path, exc.strerror or type(exc).__name__)
        return answer

    def _forget(self, key: str, task: asyncio.Future[_Answer]) -> None:
        """Drop a finished shared call; reading its exception keeps asyncio quiet if nobody awaited it."""
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()

    async def _fetch(self, prompt: str, purpose: str) -> _Answer:
        """Ask until an answer comes, a failure is final, or ``max_attempts`` is spent."""
        usage = self._usage[purpose]
        failure = _Failure("no attempt made", retryable=False)
        for attempt in range(1, self.max_attempts + 1):
            async with self._semaphore:
                usage.calls += 1
                outcome = await self._attempt(prompt)
            if isinstance(outcome, _Answer):
                usage.prompt_tokens += outcome.prompt_tokens
                usage.completion_tokens += outcome.completion_tokens
                return outcome
            failure = outcome
            usage.failures += 1
            if not failure.retryable or attempt == self.max_attempts:
                break
            delay = self._delay(attempt, failure.retry_after)
            if delay is None:
                failure = replace(
                    failure,
                    reason=f"{failure.reason}; Retry-After {failure.retry_after:g}s is over "
                    f"the {self.max_retry_after:g}s limit",
                )
                break
            log.info(
                "%s: LLM attempt %d/%d failed (%s), retrying in %.2fs",
                purpose,
                attempt,
                self.max_attempts,
                failure.reason,
                delay,
            )
            await asyncio.sleep(delay)
        usage.errors += 1
        reason = failure.reason if not failure.retryable else f"gave up: {failure.reason}"
        raise LLMError(
            purpose=purpose,
            model=self.settings.model,
            reason=reason,
            attempts=attempt,
            status=failure.status,
        )

    def _delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Retry-After when the server gives one (None: longer than we wait), else backoff with jitter."""
        if retry_after is not None:
            return None if retry_after > self.max_retry_after else max(retry_after, 0.0)
        ceiling = min(self.backoff_cap, self.backoff_base * 2.0 ** (attempt - 1))
        # "Equal jitter": at least half the backoff, so many callers hit by one 5xx spread out.
        return ceiling * random.uniform(0.5, 1.0)

    async def _attempt(self, prompt: str) -> _Answer | _Failure:
        """One HTTP attempt, classified; never raises for anything the server or network does."""
        s = self.settings
        try:
            async with asyncio.timeout(s.timeout):
                raw = await self._client.chat.completions.with_raw_response.create(
                    model=s.model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=s.temperature,
                    max_tokens=s.max_tokens if s.max_tokens is not None else openai.omit,
                )
        except (TimeoutError, openai.APITimeoutError):
            return _Failure(f"timed out after {s.timeout:g}s", retryable=True)
        except openai.APIConnectionError as exc:
            cause = exc.__cause__
            detail = f": {type(cause).__name__}" if cause is not None else ""
            return _Failure(f"connection error{detail}", retryable=True)
        except openai.APIStatusError as exc:
            return self._status_failure(exc)
        except openai.APIError as exc:
            return _Failure(f"bad response ({type(exc).__name__})", retryable=True)
        return _parse_completion(raw.content, raw.headers.get("content-type", "?"))

    def _status_failure(self, exc: openai.APIStatusError) -> _Failure:
        """An HTTP error status → a reason a person can act on, and whether to retry."""
        status = exc.status_code
        headers = exc.response.headers
        if status == 401:
            return _Failure(
                f"authentication failed (HTTP 401): check {self.settings.api_key_env}",
                retryable=False,
                status=status,
            )
        retryable = status in _RETRYABLE_4XX or status >= 500
        # The server's explicit word wins, as in the openai client.
        should_retry = headers.get("x-should-retry")
        if should_retry in ("true", "false"):
            retryable = should_retry == "true"
        kind = {
            403: "permission denied",
            404: "not found (check model and api_base)",
            429: "rate limited",
        }.get(status, "server error" if status >= 500 else "request rejected")
        message = exc.body.get("message") if isinstance(exc.body, dict) else None
        detail = f": {self._clean(str(message))}" if message else ""
        return _Failure(
            f"{kind} (HTTP {status}){detail}",
            retryable=retryable,
            status=status,
            retry_after=_retry_after(headers) if retryable else None,
        )

    def _clean(self, text: str) -> str:
        """One short line with the key blanked (real OpenAI messages quote part of a wrong key)."""
        if self._key and len(self._key) >= 4:
            text = text.replace(self._key, "***")
        text = " ".join(text.split())
        return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 1] + "…"


def _api_key(settings: LLMSettings) -> str:
    """The key from the environment; self-hosted servers may have none."""
    key = os.environ.get(settings.api_key_env, "").strip()
    if key:
        return key
    if settings.provider == "self-hosted":
        return NO_KEY_PLACEHOLDER
    raise ValueError(f"{settings.api_key_env} is not set: provider {settings.provider} needs an API key")


def _openai_client(settings: LLMSettings, key: str) -> openai.AsyncOpenAI:
    """ONE client for all calls (one connection pool); retries are ours, so the library's are off."""
    if settings.provider == "azure":
        assert settings.api_base is not None
        return openai.AsyncAzureOpenAI(
            azure_endpoint=settings.api_base,
            api_version=settings.api_version,
            api_key=key,
            timeout=settings.timeout,
            max_retries=0,
        )
    return openai.AsyncOpenAI(
        api_key=key, base_url=settings.api_base, timeout=settings.timeout, max_retries=0
    )


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, ``Retry-After`` (fractions ok) or a date."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if math.isfinite(seconds):
            return max(seconds, 0.0)
    value = headers.get("retry-after")
    if value:
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            when = email.utils.parsedate_to_datetime(value)
            return max(when.timestamp() - time.time(), 0.0)
    return None


def _parse_completion(body: bytes, content_type: str) -> _Answer | _Failure:
    """A chat completion's first choice, or a retryable failure when the body is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        kind = content_type.split(";")[0].strip() or "?"
        return _Failure(f"malformed response: not JSON ({kind}, {len(body)} bytes)", retryable=True)
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return _Failure("malformed response: no choices", retryable=True)
    choice = choices[0]
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or not content.strip():
        finish = choice.get("finish_reason")
        return _Failure(f"empty answer (finish_reason={finish!s})", retryable=True)
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return _Answer(content, _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _cache_read(path: Path, key: str) -> _Answer | None:
    """A cached answer, or None when absent or unreadable (a corrupt file is simply asked again)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("LLM cache: ignoring unreadable %s", path)
        return None
    if (
        not isinstance(data, dict)
        or data.get("key") != key
        or not isinstance(data.get("answer"), str)
        or not data["answer"]
    ):
        log.warning("LLM cache: ignoring malformed %s", path)
        return None
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return _Answer(data["answer"], _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))


def _cache_write(path: Path, key: str, model: str, answer: _Answer) -> None:
    """Write via a temp file and ``os.replace`` so a crash never leaves half a file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "version": _CACHE_VERSION,
        "key": key,
        "model": model,
        "answer": answer.content,
        "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(record, out, ensure_ascii=False)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
