"""`ftrecipe evaluate --e2e`: replay each held-out E2E test with the model under test in the loop.

Turn-by-turn scoring asks the model for each validation turn with the prompt of the original conversation
(the teacher's state). Here the model's own commands drive the dialogue: at each user turn the prompt is
rendered from the state its earlier answers produced, with prepare-data's replay and prompt code
(`dataprep.annotate.annotate_conversation`, the labeller being the model under test), its answer is read
as Rasa reads it (`dataprep.annotate.answer_parser`), and the turn is checked as prepare-data checks the
teacher's (assertions, or the bot turns that follow). A test passes when every turn passes; it stops at the
first failing turn, so the model is asked once per turn reached.

The tests are the data bundle's `4_train_test_split/e2e_tests/validation.yaml`; the prompt template,
syntax and `current_datetime` are the ones prepare-data used (`--llm-config` / `--config` / `--endpoints`
as given to prepare-data, checked against the template digest and the instant its params.yaml records),
so the model sees prompts laid out exactly as in training. Each prompt goes to the model as the one user
message a training record holds (`references.prompt_messages`).

Tests are independent: an endpoint gets every running test's next turn concurrently (bounded by
`--concurrency`); a local model answers in rounds, one batch holding the next turn of every test still
running (`RoundBatcher`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol

import yaml

from ftrecipe.dataprep.annotate import AnnotatedConversation, annotate_conversation, answer_parser
from ftrecipe.dataprep.assistant import Assistant, check_test_references, load_assistant
from ftrecipe.dataprep.assistant_source import PARAMS_KEY, describe, first_difference, replay_files
from ftrecipe.dataprep.commands import Command, Syntax, format_commands
from ftrecipe.dataprep.config import resolve_generator
from ftrecipe.dataprep.e2e import TestCase, TestSuite, UserStep, read_test_suite
from ftrecipe.dataprep.prompt import PromptTemplate, load_template, parse_prompt_datetime
from ftrecipe.dataprep.prompt_datetime import check_mocked_datetimes, generator_zone
from ftrecipe.dataprep.state import Turn, is_button_payload
from ftrecipe.dataprep.yamlfile import InputError, yaml_files
from ftrecipe.evaluation.endpoint import EndpointClient, EndpointSettings
from ftrecipe.evaluation.errors import EvalError
from ftrecipe.evaluation.references import PARAMS_NAME, SyntaxChoice, prompt_messages, record_messages
from ftrecipe.evaluation.scoring import Generation
from ftrecipe.hashing import stable_hash

VALIDATION_TESTS: Final = Path("4_train_test_split/e2e_tests/validation.yaml")


@dataclass(frozen=True)
class E2EInputs:
    """`--assistant` and the files prepare-data took its command generator from."""

    assistant: Path
    llm_config: Path | None = None
    config: Path | None = None
    endpoints: Path | None = None


@dataclass(frozen=True)
class E2ESetup:
    """Everything the replay needs, checked before a model is loaded."""

    assistant: Assistant
    suite: TestSuite
    template: PromptTemplate
    syntax: Syntax
    file: str  # validation.yaml relative to the data folder, as reports name it
    sha256: str  # of validation.yaml
    assistant_sha256: str  # of the assistant's YAML files: a changed flow changes the replay
    warnings: tuple[str, ...] = ()  # for people (stderr), e.g. a data bundle that records no assistant

    @property
    def tests(self) -> tuple[TestCase, ...]:
        return self.suite.test_cases


@dataclass(frozen=True)
class E2ETurn:
    """One model call: a turn reached in a test, with the prompt the model's own state rendered."""

    test: str
    turn_index: int
    user_message: str
    prompt: str
    answer: str
    commands: str  # as parsed, one per line in the data's syntax
    generation: Generation


@dataclass(frozen=True)
class E2EFailure:
    """A test's first failing turn: what prepare-data's check expected, and what the model's answer did."""

    test: str
    file: str
    turn_index: int
    user_message: str
    expected: str
    actual: str  # the parsed commands, then the reasons in parentheses (as failed_test_cases.yml has it)
    answer: str | None  # the model's raw answer; None when the replay itself stopped there


@dataclass(frozen=True)
class E2EResult:
    tests: int
    failures: list[E2EFailure]
    turns: list[E2ETurn] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return self.tests - len(self.failures)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.tests if self.tests else 0.0


# ------------------------------------------------------------------------------------------ inputs


def find_validation_tests(data_dir: Path, val: Path, shown: str) -> Path:
    """validation.yaml beside the splits (`--data` the bundle, or its ft_splits folder), or one line."""
    candidates = [
        data_dir / VALIDATION_TESTS,
        val.parent.parent / VALIDATION_TESTS.parent.name / VALIDATION_TESTS.name,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise EvalError(
        f"{shown.rstrip('/')}: no {VALIDATION_TESTS.as_posix()}; --e2e replays the held-out E2E tests "
        "prepare-data writes there: point --data at prepare-data's whole output (re-run prepare-data for a "
        "bundle that lacks it)"
    )


def _params(data_dir: Path, validation: Path) -> dict[str, Any]:
    for path in (data_dir / PARAMS_NAME, validation.parent.parent.parent / PARAMS_NAME):
        if path.is_file():
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise EvalError(f"{path}: cannot read prepare-data's parameters: {exc}") from None
            return loaded if isinstance(loaded, dict) else {}
    return {}


def _recorded_instant(params: dict[str, Any], shown: str) -> datetime | None:
    entry = params.get("prompt_datetime")
    value = entry.get("value") if isinstance(entry, dict) else None
    if value is None:
        return None
    try:
        return parse_prompt_datetime(str(value))
    except ValueError:
        raise EvalError(
            f"{shown}: prompt_datetime.value {value!r} is not an ISO 8601 date and time"
        ) from None


def _shown(path: Path | None) -> str:
    return "(none)" if path is None else str(path)


def _check_assistant_source(
    inputs: E2EInputs, assistant: Assistant, params: dict[str, Any], params_shown: str
) -> tuple[str, ...]:
    """Refuse (EvalError) an assistant whose flows, domain, config or endpoints differ from those the data
    was prepared from (params.yaml's ``assistant_source``): its prompts are not the training prompts.
    A bundle from before the record: a warning, and the replay goes on as it always did."""
    record = params.get(PARAMS_KEY)
    recorded = record.get("files") if isinstance(record, dict) else None
    if not isinstance(record, dict) or not isinstance(recorded, dict):
        return (
            f"warning: {params_shown} records no {PARAMS_KEY} (prepared before ftrecipe recorded it): the "
            f"assistant's flows and domain are not checked against the data's; re-run prepare-data to record them",
        )
    actual = replay_files(inputs.assistant, assistant, inputs.config, inputs.endpoints)
    difference = first_difference(recorded, actual)
    if difference is None:
        return ()
    fix = (
        f"pin assistant.source.git.revision to commit {record.get('commit')}"
        if record.get("kind") == "git"
        else "pass the assistant prepare-data was given"
    )
    raise EvalError(
        f"--assistant {inputs.assistant}: {difference} since the data was prepared from it "
        f"({describe(record)}, {params_shown}), so the replay would render other prompts than the model was "
        f"trained on: {fix}, or re-run the data phase on this assistant"
    )


def load_e2e(inputs: E2EInputs, data_dir: Path, val: Path, syntax: SyntaxChoice, data_shown: str) -> E2ESetup:
    """The assistant, the held-out tests and the prompt template as prepare-data rendered it; EvalError
    for anything missing or inconsistent with the data bundle."""
    validation = find_validation_tests(data_dir, val, data_shown)
    relative = VALIDATION_TESTS.as_posix()
    params = _params(data_dir, validation)
    params_shown = f"{data_shown.rstrip('/')}/{PARAMS_NAME}"
    try:
        generator = resolve_generator(inputs.llm_config, inputs.config, inputs.endpoints)
        if generator.syntax != syntax.syntax:
            raise EvalError(
                f"the data is in command syntax {syntax.syntax} ({syntax.source}), but the command generator "
                f"of --llm-config {_shown(inputs.llm_config)} / --config {_shown(inputs.config)} speaks "
                f"{generator.syntax} ({generator.source}): pass the --llm-config / --config prepare-data was given"
            )
        template = load_template(generator.prompt_template, generator.syntax)
        recorded = (params.get("command_generator") or {}).get("prompt_template_sha256")
        digest = hashlib.sha256(template.text.encode("utf-8")).hexdigest()
        if recorded is not None and recorded != digest:
            used = (params.get("command_generator") or {}).get("prompt_template")
            raise EvalError(
                f"the prompt template {template.source} is not the one the data was prepared with ({used}, "
                f"{params_shown}): pass the --llm-config / --config prepare-data was given, so the model sees "
                "the prompts it was trained on"
            )
        if template.shows_datetime and generator.include_date_time:
            instant = _recorded_instant(params, params_shown)
            if instant is None:
                raise EvalError(
                    f"{params_shown} records no prompt_datetime, but the template {template.source} shows "
                    "current_datetime: pass the --llm-config / --config prepare-data was given"
                )
            template = template.at(instant.astimezone(generator_zone(generator)))
        if not inputs.assistant.is_dir():
            raise EvalError(f"--assistant {inputs.assistant}: the assistant folder does not exist")
        assistant = load_assistant(inputs.assistant)
        warnings = _check_assistant_source(inputs, assistant, params, params_shown)
        suite = read_test_suite(validation)
        check_test_references(assistant, [suite])
        check_mocked_datetimes([suite])
    except InputError as error:
        raise EvalError(str(error)) from None
    if not suite.test_cases:
        raise EvalError(
            f"{data_shown.rstrip('/')}/{relative}: no tests to replay; prepare-data puts tests there when "
            "--train-frac is below 1"
        )
    files = {
        str(path.relative_to(inputs.assistant)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in yaml_files(inputs.assistant)
    }
    return E2ESetup(
        assistant=assistant,
        suite=suite,
        template=template,
        syntax=syntax.syntax,
        file=relative,
        sha256=hashlib.sha256(validation.read_bytes()).hexdigest(),
        assistant_sha256=stable_hash(files),
        warnings=warnings,
    )


def reachable_turns(test: TestCase) -> int:
    """The most command-generator turns a test can cost: its user messages but button clicks (a
    sub-agent's messages, known only during the replay, make it fewer)."""
    return sum(1 for s in test.steps if isinstance(s, UserStep) and not is_button_payload(s.text))


# ------------------------------------------------------------------------------------------ the model


class Model(Protocol):
    """The model under test, one turn at a time."""

    async def ask(self, prompt: str, where: str) -> Generation:
        """The answer to one rendered prompt; EvalError when the model cannot answer."""
        ...

    def finished(self) -> None:
        """One more test needs no further answers."""
        ...


class RoundBatcher:
    """A local model answering in rounds: the next turn of every running test goes into one `generate` call.

    A test's next turn depends on its previous answer, but different tests are independent: once every
    running test waits for an answer (or has finished), their prompts are generated together."""

    def __init__(
        self, generate: Callable[[list[Sequence[dict[str, str]]], list[str]], list[Generation]], tests: int
    ) -> None:
        self._generate = generate
        self._running = tests
        self._pending: list[tuple[str, str, asyncio.Future[Generation]]] = []

    async def ask(self, prompt: str, where: str) -> Generation:
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        self._pending.append((prompt, where, future))
        self._round_if_ready()
        return await future

    def finished(self) -> None:
        self._running -= 1
        self._round_if_ready()

    def _round_if_ready(self) -> None:
        if not self._pending or len(self._pending) < self._running:
            return
        batch, self._pending = self._pending, []
        try:
            generations = self._generate(
                [record_messages(prompt) for prompt, _, _ in batch], [where for _, where, _ in batch]
            )
        except Exception as exc:
            for _, _, future in batch:
                future.set_exception(exc)
            return
        for (_, _, future), generation in zip(batch, generations, strict=True):
            future.set_result(generation)


class EndpointModel:
    """A served model: each test's turns in order, the tests concurrently (the client bounds requests)."""

    def __init__(self, ask: Callable[[Sequence[dict[str, str]], str], Awaitable[Generation]]) -> None:
        self._ask = ask

    async def ask(self, prompt: str, where: str) -> Generation:
        return await self._ask(prompt_messages(prompt), where)

    def finished(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ the replay


def _failure(setup: E2ESetup, annotated: AnnotatedConversation, asked: list[E2ETurn]) -> E2EFailure | None:
    failure = annotated.failure
    if failure is None:
        return None
    # The turn that failed is the last one the model was asked, unless the replay stopped before asking.
    last = asked[-1] if asked else None
    answer = last.answer if last is not None and last.turn_index == failure.turn_index else None
    return E2EFailure(
        test=failure.test_case,
        file=setup.file,
        turn_index=failure.turn_index,
        user_message=failure.user_message,
        expected=failure.expected,
        actual=failure.actual,
        answer=answer,
    )


async def replay_tests(
    setup: E2ESetup, model: Model, on_answered: Callable[[int], None] | None = None
) -> E2EResult:
    """Every test of `setup` with `model` in the loop, concurrently; results in file order.
    `on_answered(n)`: n more of the reachable turns are done (answered, or skipped after a failure)."""
    parse = answer_parser(setup.assistant, setup.syntax)
    syntax = setup.syntax

    async def one(test: TestCase) -> tuple[E2EFailure | None, list[E2ETurn]]:
        asked: list[E2ETurn] = []

        async def label(turn: Turn, prompt: str) -> tuple[list[Command], str | None]:
            where = f"{setup.file}::{test.key} turn {turn.turn_index}"
            generation = await model.ask(prompt, where)
            commands = parse(generation.text)
            asked.append(
                E2ETurn(
                    test.key,
                    turn.turn_index,
                    turn.text,
                    prompt,
                    generation.text,
                    format_commands(commands, syntax),
                    generation,
                )
            )
            if on_answered is not None:
                on_answered(1)
            return commands, generation.text

        try:
            annotated = await annotate_conversation(
                setup.assistant, setup.suite, test, setup.template, syntax, label
            )
        except InputError as error:  # the template failed to render
            raise EvalError(str(error)) from None
        finally:
            model.finished()
        if on_answered is not None and reachable_turns(test) > len(asked):
            on_answered(reachable_turns(test) - len(asked))
        return _failure(setup, annotated, asked), asked

    tasks = [asyncio.ensure_future(one(test)) for test in setup.tests]
    try:
        outcomes = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:  # the first failure ends the run: the other tests stop asking
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return E2EResult(
        tests=len(setup.tests),
        failures=[failure for failure, _ in outcomes if failure is not None],
        turns=[turn for _, turns in outcomes for turn in turns],
    )


def replay_with_endpoint(
    setup: E2ESetup, settings: EndpointSettings, on_answered: Callable[[int], None] | None = None
) -> E2EResult:
    """The tests against a served model, `settings.concurrency` requests in flight across tests."""

    async def main() -> E2EResult:
        client = EndpointClient(settings)
        try:
            return await replay_tests(setup, EndpointModel(client.ask), on_answered)
        finally:
            await client.aclose()

    return asyncio.run(main())


def replay_with_local(
    setup: E2ESetup,
    generate: Callable[[list[Sequence[dict[str, str]]], list[str]], list[Generation]],
    on_answered: Callable[[int], None] | None = None,
) -> E2EResult:
    """The tests against a model loaded here: `generate` answers each round's prompts (batched)."""
    return asyncio.run(replay_tests(setup, RoundBatcher(generate, len(setup.tests)), on_answered))


# ------------------------------------------------------------------------------------------ report


def failure_record(failure: E2EFailure) -> dict[str, Any]:
    return {
        "test": failure.test,
        "file": failure.file,
        "turn_index": failure.turn_index,
        "user_message": failure.user_message,
        "expected": failure.expected,
        "actual": failure.actual,
        "answer": failure.answer,
    }


def e2e_json(result: E2EResult, setup: E2ESetup) -> dict[str, Any]:
    """eval.json's `e2e` block."""
    return {
        "tests": result.tests,
        "passed": result.passed,
        "pass_rate": round(result.pass_rate, 6),
        "model_calls": len(result.turns),
        "file": setup.file,
        "sha256": setup.sha256,
        "prompt_template": setup.template.source,
        "failed": [failure_record(f) for f in result.failures],
    }


def e2e_turns_jsonl(result: E2EResult) -> str:
    """One line per model call: the test, the turn, the prompt the model's own state rendered, its answer."""
    lines = []
    for turn in result.turns:
        record = {
            "test": turn.test,
            "turn_index": turn.turn_index,
            "user_message": turn.user_message,
            "answer": turn.answer,
            "commands": turn.commands,
            "truncated": turn.generation.truncated,
            "latency_seconds": round(turn.generation.latency_seconds, 6),
            "prompt": turn.prompt,
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)
