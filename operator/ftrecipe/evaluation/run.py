"""`ftrecipe evaluate`: fetch the inputs, generate the answers, score them, publish the report bundle.

Two ways to get answers, scored the same way: a base model plus a LoRA adapter loaded here
(`--base-model [--adapter]`), or any OpenAI-compatible server (`--endpoint URL --model NAME`). Every
input is checked before a model is loaded or a request is sent, so a typo costs seconds, not a GPU hour.
The report (eval.json, eval.md, predictions.jsonl) is published to `--out` with the storage protocol
(files, manifest.json, `_SUCCESS` last); the manifest's metadata carries the headline figures.
Stdout holds only JSON lines, as train's does: generation progress (`evaluation.progress`) and a final
``{"event": "done", …}``; human notes go to stderr.

With `--e2e` the held-out E2E tests are also replayed with the model in the loop (`evaluation.e2e`): the
same model, loaded once; eval.json gains `e2e`, the bundle `e2e_turns.jsonl`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ftrecipe.dataprep.commands import Syntax
from ftrecipe.evaluation.e2e import E2EInputs, E2EResult, E2ESetup, e2e_json, e2e_turns_jsonl, load_e2e
from ftrecipe.evaluation.endpoint import DEFAULT_API_KEY_ENV, EndpointSettings
from ftrecipe.evaluation.errors import EvalError
from ftrecipe.evaluation.progress import E2E_STAGE, GenerationProgress
from ftrecipe.evaluation.references import Reference, choose_syntax, find_val, read_references
from ftrecipe.evaluation.report import EvalContext, eval_json, eval_md, predictions_jsonl
from ftrecipe.evaluation.scoring import Generation, GenerationRun, Scores, parse_answer, score_turn, summarize
from ftrecipe.hashing import stable_hash
from ftrecipe.training.trainer import Emit, TrainError, fetch_input, print_event, resolve_base_model

PRODUCER: Final = "ftrecipe evaluate"
EVAL_JSON: Final = "eval.json"
EVAL_MD: Final = "eval.md"
PREDICTIONS: Final = "predictions.jsonl"
E2E_TURNS: Final = "e2e_turns.jsonl"  # --e2e: every model call of the replayed tests
ADAPTER_CONFIG: Final = "adapter_config.json"  # what makes a folder a peft adapter
DEFAULT_MAX_NEW_TOKENS: Final = 64  # spec.evaluation.maxNewTokens
MAX_NEW_TOKENS_LIMIT: Final = 4096  # the API's bound on maxNewTokens
DEFAULT_BATCH_SIZE: Final = 8
DEFAULT_CONCURRENCY: Final = 8
EXIT_BELOW_GATE: Final = 3  # --min-command-accuracy / --min-e2e-pass-rate not met (the report is published)


@dataclass(frozen=True)
class EvaluateOptions:
    data: str
    out: str
    base_model: str | None = None
    adapter: str | None = None
    endpoint: str | None = None
    model: str | None = None
    syntax: Syntax | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    api_key_env: str = DEFAULT_API_KEY_ENV
    work_dir: Path | None = None
    # --e2e: replay the held-out E2E tests with the model in the loop; the assistant and the files
    # prepare-data took its command generator from (same meaning as prepare-data's flags).
    e2e: bool = False
    assistant: Path | None = None
    llm_config: Path | None = None
    config: Path | None = None
    endpoints: Path | None = None


@dataclass(frozen=True)
class EvalResult:
    scores: Scores
    out: str
    e2e: E2EResult | None = None

    def figures(self) -> dict[str, Any]:
        """The PhaseReport figures the operator reads (names fixed by the operator contract)."""
        scores = self.scores
        e2e = (
            {}
            if self.e2e is None
            else {
                "e2e_tests": self.e2e.tests,
                "e2e_passed": self.e2e.passed,
                "e2e_pass_rate": self.e2e.pass_rate,
            }
        )
        return {
            "command_accuracy": scores.command_accuracy,
            "num_turns": scores.num_turns,
            "parse_failure_rate": scores.parse_failure_rate,
            "latency_p50_seconds": scores.latency_p50_seconds,
            "latency_p95_seconds": scores.latency_p95_seconds,
            "tokens_per_second": scores.tokens_per_second,
            "per_command_f1": scores.per_command_f1,
            "report_uri": self.out,
            **e2e,
        }

    def summary(self) -> str:
        scores = self.scores
        e2e = (
            ""
            if self.e2e is None
            else f"E2E pass rate {self.e2e.pass_rate:.1%} ({self.e2e.passed} of {self.e2e.tests} tests), "
        )
        return (
            f"command accuracy {scores.command_accuracy:.1%} ({scores.right_turns} of {scores.num_turns} turns), "
            f"{e2e}parse failures {scores.parse_failure_rate:.1%}; report published to {self.out}"
        )


def accuracy_gate(accuracy: float, minimum: float | None) -> str | None:
    """The one line saying the gate is not met, or None when it is (or there is none)."""
    if minimum is None or accuracy >= minimum:
        return None
    return f"command accuracy {accuracy:.4f} is below --min-command-accuracy {minimum:g}"


def e2e_gate(e2e: E2EResult | None, minimum: float | None) -> str | None:
    """The one line saying the E2E pass rate is below `--min-e2e-pass-rate`, or None."""
    if minimum is None or e2e is None or e2e.pass_rate >= minimum:
        return None
    return (
        f"E2E pass rate {e2e.pass_rate:.4f} ({e2e.passed} of {e2e.tests} tests) is below "
        f"--min-e2e-pass-rate {minimum:g}"
    )


def check_options(options: EvaluateOptions) -> None:
    """Every option problem as EvalError, before anything is fetched or loaded."""
    if options.endpoint is None and options.base_model is None:
        raise EvalError(
            "pass --base-model PATH [--adapter DIR] to load a model, or --endpoint URL --model NAME"
        )
    if options.endpoint is not None:
        if options.base_model is not None or options.adapter is not None:
            raise EvalError(
                "--endpoint evaluates a served model; drop --base-model/--adapter (serve the adapter instead)"
            )
        if not options.model:
            raise EvalError("--endpoint needs --model NAME: the served model or LoRA name")
        if not options.endpoint.startswith(("http://", "https://")):
            raise EvalError(
                f"--endpoint {options.endpoint}: expected an http(s) URL such as http://host:8000/v1"
            )
        if options.concurrency < 1:
            raise EvalError(f"--concurrency must be at least 1, not {options.concurrency}")
    elif options.model is not None:
        raise EvalError("--model names a model served at --endpoint; pass --endpoint URL too")
    elif options.batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, not {options.batch_size}")
    if not 1 <= options.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise EvalError(
            f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, not {options.max_new_tokens}"
        )
    if options.e2e and options.assistant is None:
        raise EvalError(
            "--e2e replays the held-out E2E tests on the assistant: pass --assistant DIR (its flows and domain, "
            "as given to prepare-data)"
        )
    e2e_only = {
        "--assistant": options.assistant,
        "--llm-config": options.llm_config,
        "--config": options.config,
        "--endpoints": options.endpoints,
    }
    given = [flag for flag, value in e2e_only.items() if value is not None]
    if given and not options.e2e:
        raise EvalError(f"{given[0]} is for the E2E replay: add --e2e, or leave it out")
    for flag, value in e2e_only.items():
        if value is not None and flag != "--assistant" and not value.is_file():
            raise EvalError(f"{flag} {value}: file not found")


@contextlib.contextmanager
def _shared_helpers() -> Iterator[None]:
    """Training's input helpers speak TrainError; here the same one-line messages are EvalErrors."""
    try:
        yield
    except TrainError as exc:
        raise EvalError(str(exc)) from None


@contextlib.contextmanager
def _work_folder(work_dir: Path | None) -> Iterator[Path]:
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        yield work_dir
        return
    with tempfile.TemporaryDirectory(prefix="ftrecipe-evaluate-") as scratch:
        yield Path(scratch)


def _local(uri: str, work: Path, name: str, what: str) -> Path:
    """A local folder, or the bundle at an s3:// URI fetched into `work/name`."""
    if uri.startswith("s3://"):
        with _shared_helpers():
            return fetch_input(uri, work / name, what)
    return Path(uri)


def _file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\1")
    return digest.hexdigest()


def _adapter_folder(adapter: str, work: Path) -> Path:
    folder = _local(adapter, work, "adapter", "adapter")
    if not folder.is_dir():
        raise EvalError(f"--adapter {adapter}: folder not found")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise EvalError(
            f"--adapter {adapter}: no {ADAPTER_CONFIG}; point it at `ftrecipe train`'s --out (the adapter bundle)"
        )
    return folder


def _generate_local(
    options: EvaluateOptions,
    references: list[Reference],
    work: Path,
    progress: GenerationProgress,
    e2e: E2ESetup | None = None,
    emit: Emit = print_event,
) -> tuple[GenerationRun, dict[str, str | None], dict[str, Any], E2EResult | None]:
    from ftrecipe.evaluation.e2e import reachable_turns, replay_with_local
    from ftrecipe.evaluation.generate import generate_local, load_local_model

    assert options.base_model is not None
    adapter_dir = _adapter_folder(options.adapter, work) if options.adapter else None
    with _shared_helpers():
        base = resolve_base_model(options.base_model, work / "inputs")
        local = load_local_model(base, adapter_dir)
    progress.start()  # the clock starts once the model is loaded: the ETA is about generating
    run = generate_local(
        local,
        [reference.messages for reference in references],
        [reference.where for reference in references],
        max_new_tokens=options.max_new_tokens,
        batch_size=options.batch_size,
        on_answered=progress.answered,
    )
    identity = {
        "kind": "local",
        "base_model": options.base_model,
        "base_model_id": base.model_id,
        "revision": base.revision,
        "adapter": options.adapter,
        "adapter_sha256": _file_digest(list(adapter_dir.glob("adapter_*"))) if adapter_dir else None,
        "device": local.device,
    }
    settings = {"max_new_tokens": options.max_new_tokens, "batch_size": options.batch_size}
    e2e_result = None
    if e2e is not None:
        e2e_progress = GenerationProgress(sum(map(reachable_turns, e2e.tests)), emit, stage=E2E_STAGE)
        e2e_progress.start()

        def generate(prompts: list[Sequence[dict[str, str]]], wheres: list[str]) -> list[Generation]:
            return generate_local(
                local, prompts, wheres, max_new_tokens=options.max_new_tokens, batch_size=options.batch_size
            ).generations

        e2e_result = replay_with_local(e2e, generate, e2e_progress.answered)
    return run, identity, settings, e2e_result


def _generate_endpoint(
    options: EvaluateOptions,
    references: list[Reference],
    progress: GenerationProgress,
    e2e: E2ESetup | None = None,
    emit: Emit = print_event,
) -> tuple[GenerationRun, dict[str, str | None], dict[str, Any], E2EResult | None]:
    from ftrecipe.evaluation.e2e import reachable_turns, replay_with_endpoint
    from ftrecipe.evaluation.endpoint import generate_endpoint

    assert options.endpoint is not None and options.model is not None
    settings = EndpointSettings(
        url=options.endpoint,
        model=options.model,
        max_new_tokens=options.max_new_tokens,
        concurrency=options.concurrency,
        api_key_env=options.api_key_env,
    )
    progress.start()
    run = generate_endpoint(
        settings,
        [reference.prompt_messages for reference in references],
        [reference.where for reference in references],
        on_answered=progress.answered,
    )
    identity: dict[str, str | None] = {
        "kind": "endpoint",
        "endpoint": options.endpoint,
        "model": options.model,
    }
    e2e_result = None
    if e2e is not None:
        e2e_progress = GenerationProgress(sum(map(reachable_turns, e2e.tests)), emit, stage=E2E_STAGE)
        e2e_progress.start()
        e2e_result = replay_with_endpoint(e2e, settings, e2e_progress.answered)
    settings_shown = {"max_new_tokens": options.max_new_tokens, "concurrency": options.concurrency}
    return run, identity, settings_shown, e2e_result


def _write_report(
    folder: Path,
    scores: Scores,
    references: list[Reference],
    run: GenerationRun,
    context: EvalContext,
    e2e: tuple[E2ESetup, E2EResult] | None = None,
) -> dict[str, Any]:
    """eval.json, eval.md and predictions.jsonl (and with --e2e e2e_turns.jsonl) into a fresh `folder`;
    returns eval.json's content."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    document = eval_json(scores, context)
    if e2e is not None:
        document["e2e"] = e2e_json(e2e[1], e2e[0])
    files = {
        EVAL_JSON: json.dumps(document, indent=2, ensure_ascii=False) + "\n",
        EVAL_MD: eval_md(scores, references, run.generations, context, e2e=document.get("e2e")),
        PREDICTIONS: predictions_jsonl(references, run.generations, scores.turns, context),
    }
    if e2e is not None:
        files[E2E_TURNS] = e2e_turns_jsonl(e2e[1])
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return document


def run_evaluate(options: EvaluateOptions, emit: Emit = print_event) -> EvalResult:
    """Evaluate and publish the report to `options.out`; EvalError for anything the user can fix.
    `emit` takes the progress and done events (default: JSON lines on stdout)."""
    from ftrecipe.storage import StorageError, parse_location, publish_bundle

    check_options(options)
    try:
        parse_location(options.out)
    except StorageError as exc:
        raise EvalError(f"--out {options.out}: {exc}") from None
    with _work_folder(options.work_dir) as work:
        data_dir = _local(options.data, work, "data", "data")
        val = find_val(data_dir, shown=options.data)
        val_file = val.relative_to(data_dir).as_posix()
        syntax = choose_syntax(options.syntax, data_dir, val)
        references = read_references(val, syntax, shown=f"{options.data.rstrip('/')}/{val_file}")
        e2e_setup = None
        if options.e2e:
            assert options.assistant is not None
            inputs = E2EInputs(options.assistant, options.llm_config, options.config, options.endpoints)
            e2e_setup = load_e2e(inputs, data_dir, val, syntax, options.data)
            for line in e2e_setup.warnings:  # stdout holds only JSON lines
                print(line, file=sys.stderr)

        progress = GenerationProgress(len(references), emit)
        if options.endpoint is not None:
            run, identity, settings, e2e_result = _generate_endpoint(
                options, references, progress, e2e_setup, emit
            )
        else:
            run, identity, settings, e2e_result = _generate_local(
                options, references, work, progress, e2e_setup, emit
            )
        e2e = None if e2e_setup is None or e2e_result is None else (e2e_setup, e2e_result)

        turns = [
            score_turn(reference.expected, parse_answer(generation.text, syntax.syntax))
            for reference, generation in zip(references, run.generations, strict=True)
        ]
        scores = summarize(turns, run)
        val_sha256 = hashlib.sha256(val.read_bytes()).hexdigest()
        context = EvalContext(identity, options.data, val_file, val_sha256, syntax, settings)
        document = _write_report(work / "report", scores, references, run, context, e2e)
        # Same data, syntax, model and token limit: the same answers (greedy), hence the same report.
        # The E2E replay adds its tests, assistant and template (only with --e2e: other hashes stay).
        e2e_inputs = (
            {}
            if e2e is None
            else {
                "e2e": {
                    "tests": e2e[0].sha256,
                    "assistant": e2e[0].assistant_sha256,
                    "template": e2e[0].template.text,
                    "current_datetime": str(e2e[0].template.current_datetime),
                }
            }
        )
        inputs_hash = stable_hash(
            {
                "val": val_sha256,
                "syntax": syntax.syntax,
                "model": {k: v for k, v in identity.items() if k != "device"},
                "max_new_tokens": options.max_new_tokens,
                **e2e_inputs,
            }
        )
        metadata = {
            "command_accuracy": document["command_accuracy"],
            "per_command_f1": scores.per_command_f1,
            "num_turns": scores.num_turns,
            "model": identity,
            "syntax": syntax.syntax,
        }
        if e2e is not None:  # a reused report shows the same figures as the run that made it
            metadata |= {
                "e2e_tests": e2e[1].tests,
                "e2e_passed": e2e[1].passed,
                "e2e_pass_rate": document["e2e"]["pass_rate"],
            }
        try:
            publish_bundle(
                work / "report", options.out, producer=PRODUCER, inputs_hash=inputs_hash, metadata=metadata
            )
        except StorageError as exc:
            raise EvalError(f"publishing the report to {options.out}: {exc}") from None
    result = EvalResult(scores=scores, out=options.out, e2e=e2e_result)
    done: dict[str, Any] = {
        "event": "done",
        "summary": result.summary(),
        "num_turns": scores.num_turns,
        "command_accuracy": scores.command_accuracy,
    }
    if e2e_result is not None:
        done["e2e_pass_rate"] = e2e_result.pass_rate
    emit({**done, "out": options.out})
    return result
