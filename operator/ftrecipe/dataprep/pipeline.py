"""`ftrecipe prepare-data`: read the assistant and its tests, run the stages, publish the output folder.

Every stage writes into a staging folder beside `--out`; only a complete run is moved into place, so a
crash never leaves an output that looks finished.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from ftrecipe.dataprep.annotate import (
    AnnotatedConversation,
    AnnotationResult,
    Annotator,
    annotate_all,
    assertions_labeller,
    conversation_record,
    failure_record,
    llm_labeller,
)
from ftrecipe.dataprep.assistant import Assistant, check_test_references, load_assistant
from ftrecipe.dataprep.commands import Syntax
from ftrecipe.dataprep.config import GeneratorConfig, resolve_generator
from ftrecipe.dataprep.e2e import TestSuite, UserStep, read_e2e_tests
from ftrecipe.dataprep.llm import LLMClient
from ftrecipe.dataprep.prompt import load_template
from ftrecipe.dataprep.state import is_button_payload
from ftrecipe.dataprep.yamlfile import InputError

ANNOTATIONS_DIR = "1_command_annotations"
FAILED_TESTS_FILE = "failed_test_cases.yml"


@dataclass(frozen=True)
class PrepareDataOptions:
    e2e_paths: tuple[Path, ...] = (Path("e2e_tests"),)
    assistant: Path = Path(".")
    config: Path | None = None
    endpoints: Path | None = None
    llm_config: Path | None = None
    annotator: Annotator = "llm"
    num_rephrases: int = 10
    rephrase_config: Path | None = None
    train_frac: float = 0.8
    output_format: Literal["instruction", "conversational"] = "instruction"
    out: Path = Path("output")
    seed: int = 42
    concurrency: int = 16
    cache_dir: Path | None = None


@dataclass
class PrepareDataResult:
    out: Path
    annotation: AnnotationResult
    summary: dict[str, Any] = field(default_factory=dict)


def _dump_yaml(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120), encoding="utf-8")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ftrecipe" / "llm"


def _check_options(options: PrepareDataOptions) -> None:
    if not 0 <= options.num_rephrases <= 49:
        raise InputError(f"--num-rephrases must be between 0 and 49, not {options.num_rephrases}")
    if not 0 < options.train_frac <= 1:
        raise InputError(f"--train-frac must be in (0, 1], not {options.train_frac}")
    if options.concurrency < 1:
        raise InputError(f"--concurrency must be at least 1, not {options.concurrency}")


def _params(options: PrepareDataOptions, generator: GeneratorConfig, template_source: str) -> dict[str, Any]:
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    params["e2e_paths"] = [str(p) for p in options.e2e_paths]
    params["command_generator"] = {
        "source": generator.source,
        "syntax": generator.syntax,
        "prompt_template": template_source,
        "llm": generator.llm.model_dump(exclude_none=True) if generator.llm else None,
    }
    return params


def _summary(
    suites: Sequence[TestSuite], annotation: AnnotationResult, client: LLMClient | None
) -> dict[str, Any]:
    passing = annotation.passing
    user_steps = [step for c in passing for step in c.test.steps if isinstance(step, UserStep)]
    return {
        "num_input_e2e_tests": sum(len(s.test_cases) for s in suites),
        "num_annotated_conversations": len(passing),
        "num_failed_conversations": len(annotation.failures),
        "num_user_messages_across_conversations": len(user_steps),
        "num_user_messages_to_rephrase_across_conversations": sum(len(c.turns) for c in passing),
        "num_button_payload_messages": sum(1 for s in user_steps if is_button_payload(s.text)),
        "llm_usage": client.summary() if client is not None else {},
    }


def _write_annotations(staging: Path, annotation: AnnotationResult, syntax: Syntax, base: Path) -> None:
    folder = staging / ANNOTATIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    by_file: dict[Path, list[AnnotatedConversation]] = {}
    for conversation in annotation.passing:
        by_file.setdefault(conversation.suite.path, []).append(conversation)
    stems: dict[str, Path] = {}
    for path, conversations in by_file.items():
        stem = path.stem
        if stem in stems and stems[stem] != path:  # same file name in two folders: keep both
            stem = f"{path.parent.name}_{stem}"
        stems[stem] = path
        records = [conversation_record(c, syntax, base) for c in conversations]
        _dump_yaml(folder / f"{stem}.yml", {"conversations": records})
    _dump_yaml(
        folder / FAILED_TESTS_FILE,
        {"failed_test_cases": [failure_record(f, base) for f in annotation.failures]},
    )


def publish(staging: Path, out: Path) -> None:
    """Move a finished staging folder into place; an older output is replaced only after that."""
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


async def prepare_data(
    options: PrepareDataOptions, log: Callable[[str], None] = lambda line: None
) -> PrepareDataResult:
    _check_options(options)
    started = time.monotonic()
    generator = resolve_generator(options.llm_config, options.config, options.endpoints)
    template = load_template(generator.prompt_template, generator.syntax)
    e2e_roots = tuple(p.resolve() for p in options.e2e_paths)
    assistant: Assistant = load_assistant(options.assistant, exclude=e2e_roots)
    suites = read_e2e_tests(options.e2e_paths)
    check_test_references(assistant, suites)
    n_tests = sum(len(s.test_cases) for s in suites)
    log(
        f"read {len(assistant.flows)} flows, {len(assistant.slots)} slots, {n_tests} tests in {len(suites)} files"
    )

    client: LLMClient | None = None
    if options.annotator == "llm":
        if generator.llm is None:
            raise InputError(
                "--annotator llm needs the command generator's LLM: pass --llm-config FILE, or --config with "
                "an LLM command generator (and --endpoints for model groups)"
            )
        client = LLMClient(
            generator.llm, concurrency=options.concurrency, cache_dir=options.cache_dir or default_cache_dir()
        )
        label = llm_labeller(client, assistant, generator.syntax)
    else:
        label = assertions_labeller(assistant, generator.syntax)

    done = 0

    def progress(conversation: AnnotatedConversation) -> None:
        nonlocal done
        done += 1
        state = "ok" if conversation.passed else "FAILED"
        log(f"annotate [{done}/{n_tests}] {conversation.test.name}: {state}")

    # Fixed per run, so a template that shows the date renders identically on every turn (and caches).
    fixed = {"current_datetime": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}
    try:
        annotation = await annotate_all(assistant, suites, template, generator.syntax, label, fixed, progress)
    finally:
        if client is not None:
            await client.aclose()

    out = options.out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.staging-{uuid.uuid4().hex[:8]}")
    try:
        base = Path.cwd()
        _write_annotations(staging, annotation, generator.syntax, base)
        summary = _summary(suites, annotation, client)
        summary["wall_time_seconds"] = round(time.monotonic() - started, 3)
        _dump_yaml(staging / "params.yaml", _params(options, generator, template.source))
        _dump_yaml(staging / "result_summary.yaml", summary)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(
        f"{summary['num_annotated_conversations']} of {n_tests} tests annotated, "
        f"{summary['num_failed_conversations']} failed (see {out / ANNOTATIONS_DIR / FAILED_TESTS_FILE})"
    )
    return PrepareDataResult(out, annotation, summary)


def run_prepare_data(options: PrepareDataOptions, log: Callable[[str], None]) -> PrepareDataResult:
    return asyncio.run(prepare_data(options, log))
