"""`ftrecipe prepare-data`: read the assistant and its tests, run the stages, publish the output bundle.

Every stage writes into a local staging folder; only a complete run is published to `--out` (a folder or
an s3:// prefix) as a bundle: files, then `manifest.json`, then `_SUCCESS`. Readers ignore a prefix
without `_SUCCESS`, so a crash never leaves an output that looks finished.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from ftrecipe import __version__
from ftrecipe.dataprep.annotate import (
    AnnotatedConversation,
    AnnotationResult,
    Annotator,
    annotate_conversation,
    assertions_labeller,
    conversation_id,
    conversation_record,
    display_path,
    failure_record,
    llm_labeller,
    llm_router,
)
from ftrecipe.dataprep.assistant import Assistant, check_test_references, load_assistant
from ftrecipe.dataprep.assistant_source import PARAMS_KEY, read_fetch_record, replay_files, source_record
from ftrecipe.dataprep.augment import (
    CheckedRephrasing,
    check_rephrasing,
    conversation_data_points,
    transcript,
)
from ftrecipe.dataprep.commands import Syntax
from ftrecipe.dataprep.config import GeneratorConfig, resolve_generator
from ftrecipe.dataprep.coverage import flow_coverage, write_command_histogram, write_flow_coverage_markdown
from ftrecipe.dataprep.e2e import TestCase, TestSuite, UserStep, scan_e2e_tests
from ftrecipe.dataprep.llm import LLMClient, LLMSettings
from ftrecipe.dataprep.progress import Reporter
from ftrecipe.dataprep.prompt import PromptTemplate, format_prompt_datetime, load_template
from ftrecipe.dataprep.prompt_datetime import (
    PromptInstant,
    check_mocked_datetimes,
    check_prompt_datetime,
    generator_zone,
    resolve_prompt_datetime,
    utc_now,
)
from ftrecipe.dataprep.rephrase import RephraserConfig, read_rephrase_config, rephrase_conversation
from ftrecipe.dataprep.routing import read_router, router_llm
from ftrecipe.dataprep.split import (
    DataPoint,
    SplitResult,
    ft_data_record,
    split_tests,
    training_record,
    write_e2e_split,
    write_jsonl,
)
from ftrecipe.dataprep.state import is_button_payload
from ftrecipe.dataprep.yamlfile import InputError, yaml_files
from ftrecipe.hashing import stable_hash
from ftrecipe.storage import LocalLocation, parse_location, publish_bundle

ANNOTATIONS_DIR = "1_command_annotations"
REPHRASINGS_DIR = "2_rephrasings"
FT_DATA_FILE = "3_llm_finetune_data/llm_ft_data.jsonl"
SPLITS_DIR = "4_train_test_split"
COVERAGE_DIR = "coverage"
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
    out: str | Path = "output"  # a folder or an s3:// prefix
    seed: int = 42
    concurrency: int = 16
    cache_dir: Path | None = None
    # The instant a template's `current_datetime` shows (ISO 8601); None: the one recorded beside the cache.
    prompt_datetime: str | None = None


@dataclass
class PrepareDataResult:
    out: str
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
    if options.prompt_datetime is not None:
        check_prompt_datetime(options.prompt_datetime)


def _params(
    options: PrepareDataOptions,
    generator: GeneratorConfig,
    template_source: str,
    rephraser_source: str,
    instant: PromptInstant | None = None,
    *,
    template_text: str,
    assistant_source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    params["e2e_paths"] = [str(p) for p in options.e2e_paths]
    params["command_generator"] = {
        "source": generator.source,
        "class": generator.generator_class,  # None: no Rasa config named one
        "syntax": generator.syntax,
        "prompt_template": template_source,
        # What `train` copies into the bundle, so production's template can be checked against it.
        "prompt_template_sha256": hashlib.sha256(template_text.encode("utf-8")).hexdigest(),
        "llm": generator.llm.model_dump(exclude_none=True) if generator.llm else None,
    }
    params["rephraser"] = {"source": rephraser_source}
    if assistant_source is not None:  # what `evaluate --e2e` checks its assistant against
        params[PARAMS_KEY] = dict(assistant_source)
    if instant is not None:
        params["prompt_datetime"] = {**instant.params(), "timezone": generator.timezone}
    elif not generator.include_date_time:
        params["prompt_datetime"] = {
            "value": None,
            "source": f"unused: include_date_time is false in {generator.source}",
        }
    else:
        params["prompt_datetime"] = {
            "value": None,
            "source": "unused: the prompt template does not show current_datetime",
        }
    return params


def _summary(
    suites: Sequence[TestSuite],
    annotation: AnnotationResult,
    augmented: Sequence[Augmented],
    points: Sequence[DataPoint],
    split: SplitResult,
    train: Sequence[DataPoint],
    validation: Sequence[DataPoint],
    clients: Sequence[LLMClient],
) -> dict[str, Any]:
    passing = annotation.passing
    user_steps = [step for c in passing for step in c.test.steps if isinstance(step, UserStep)]
    checked = [r for a in augmented for results in a.checked.values() for r in results]
    usage: dict[str, Any] = {"models": [], "purposes": {}}
    for client in clients:
        report = client.summary()
        usage["models"].append(f"{report['provider']}/{report['model']}")
        usage["purposes"].update(report["purposes"])
    return {
        # Rasa's keys, same meaning.
        "num_input_e2e_tests": sum(len(s.test_cases) for s in suites),
        "num_annotated_conversations": len(passing),
        "num_user_messages_across_conversations": len(user_steps),
        "num_user_messages_to_rephrase_across_conversations": sum(len(c.turns) for c in passing),
        "num_passing_rephrased_user_messages": sum(1 for r in checked if r.passed),
        "num_failing_rephrased_user_messages": sum(1 for r in checked if not r.passed),
        "num_ft_data_points": len(points),
        "num_train_data_points": len(train),
        "num_val_data_points": len(validation),
        # Ours.
        "num_failed_conversations": len(annotation.failures),
        "num_button_payload_messages": sum(1 for s in user_steps if is_button_payload(s.text)),
        "num_synthetic_conversations": sum(a.synthetic for a in augmented),
        "num_train_tests": len(split.train),
        "num_validation_tests": len(split.validation),
        "command_types_missing_in_validation": list(split.missing_in_validation),
        "rephrasing_warnings": [a.warning for a in augmented if a.warning],
        "llm_usage": usage,
    }


def headline_figures(summary: Mapping[str, Any]) -> dict[str, int | float]:
    """The figures of `result_summary.yaml` that a status shows (`DataSummary`): reported when the phase
    ends and carried in the bundle's manifest, so that a reused bundle (`--reuse-bundles`, a cached local
    run) shows the same figures as the run that made it."""
    figures: dict[str, int | float] = {
        key: value
        for key, value in summary.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    figures["num_user_messages_to_rephrase"] = int(
        summary.get("num_user_messages_to_rephrase_across_conversations", 0)
    )
    purposes = (summary.get("llm_usage") or {}).get("purposes", {})
    figures["llm_calls"] = sum(int(usage.get("calls", 0)) for usage in purposes.values())
    return figures


def _assistant_metadata(record: Mapping[str, Any]) -> dict[str, str]:
    """What the manifest says of the assistant, for readers that open no file: the files' digest and,
    for git, the commit (params.yaml's ``assistant_source`` has the rest)."""
    metadata = {"assistant_files_sha256": str(record["files_sha256"])}
    if record.get("kind") == "git":
        metadata["assistant_commit"] = str(record["commit"])
    return metadata


def _sub_agent_messages(annotation: AnnotationResult) -> int:
    """User messages of annotated tests that a sub-agent answered: neither a button nor a labelled turn."""
    count = 0
    for conversation in annotation.passing:
        labelled = {turn.step_index for turn in conversation.turns} | set(conversation.routes())
        for index, step in enumerate(conversation.test.steps):
            if isinstance(step, UserStep) and not is_button_payload(step.text) and index not in labelled:
                count += 1
    return count


def _write_annotations(staging: Path, annotation: AnnotationResult, syntax: Syntax, base: Path) -> None:
    folder = staging / ANNOTATIONS_DIR
    for stem, conversations in _by_file(annotation.passing).items():
        _dump_yaml(
            folder / f"{stem}.yml",
            {"conversations": [conversation_record(c, syntax, base) for c in conversations]},
        )
    failures = [failure_record(f, base) for f in annotation.failures]
    _dump_yaml(folder / FAILED_TESTS_FILE, {"failed_test_cases": failures})


def _by_file(conversations: Sequence[AnnotatedConversation]) -> dict[str, list[AnnotatedConversation]]:
    """Conversations grouped by their test file, keyed by a unique file stem."""
    grouped: dict[str, list[AnnotatedConversation]] = {}
    paths: dict[str, Path] = {}
    for conversation in conversations:
        path = conversation.suite.path
        stem = path.stem
        if stem in paths and paths[stem] != path:  # same file name in two folders: keep both
            stem = f"{path.parent.name}_{stem}"
        paths[stem] = path
        grouped.setdefault(stem, []).append(conversation)
    return grouped


def _write_rephrasings(staging: Path, augmented: Sequence[Augmented], syntax: Syntax, base: Path) -> None:
    folder = staging / REPHRASINGS_DIR
    by_conversation = {id(a.annotated): a for a in augmented}
    for stem, conversations in _by_file([a.annotated for a in augmented]).items():
        records = []
        for annotated in conversations:
            record = conversation_record(annotated, syntax, base)
            checked = by_conversation[id(annotated)].checked
            user_steps = [i for i, s in enumerate(annotated.test.steps) if isinstance(s, UserStep)]
            for index, entry in zip(user_steps, (e for e in record["steps"] if "user" in e), strict=True):
                if "llm_commands" in entry:
                    results = checked.get(index, [])
                    entry["passing_rephrasings"] = [r.text for r in results if r.passed]
                    entry["failing_rephrasings"] = [r.text for r in results if not r.passed]
            records.append(record)
        _dump_yaml(folder / f"{stem}.yml", {"conversations": records})


@dataclass(frozen=True)
class Augmented:
    """A passing conversation with its checked rephrasings (by step index) and synthetic count."""

    annotated: AnnotatedConversation
    checked: dict[int, list[CheckedRephrasing]]
    warning: str | None = None
    synthetic: int = 0


async def _augment_one(
    annotated: AnnotatedConversation,
    *,
    assistant: Assistant,
    rephraser: RephraserConfig,
    rephrase_client: LLMClient,
    validate_client: LLMClient,
    template: PromptTemplate,
    syntax: Syntax,
    n: int,
    prompt_variables: dict[str, Any],
    base: Path,
) -> Augmented:
    turns = annotated.turns
    outcome = await rephrase_conversation(
        rephrase_client,
        rephraser,
        test_case_name=annotated.test.name,
        transcript="\n".join(transcript(assistant, annotated)),
        user_messages=[t.text for t in turns],
        number_of_rephrasings=n,
    )
    warning = None
    candidates: list[list[str]] = outcome.candidates or [[] for _ in turns]
    if outcome.candidates is None:
        warning = f"{conversation_id(annotated.test, base)}: {outcome.warning or 'no rephrasings'}"
    jobs = [
        check_rephrasing(
            validate_client, assistant, template, syntax, annotated, turn, text, prompt_variables
        )
        for turn, texts in zip(turns, candidates, strict=True)
        for text in texts
    ]
    results = iter(await asyncio.gather(*jobs))
    checked = {
        turn.step_index: [next(results) for _ in texts] for turn, texts in zip(turns, candidates, strict=True)
    }
    passing = {i: [r for r in rs if r.passed] for i, rs in checked.items()}
    synthetic = max((len(p) for p in passing.values()), default=0)
    return Augmented(annotated, checked, warning, synthetic)


def inputs_hash(
    options: PrepareDataOptions,
    generator: GeneratorConfig,
    template: PromptTemplate,
    rephraser: RephraserConfig,
) -> str:
    """Everything that decides this run's output: input files' contents, templates, LLMs and options."""
    files: dict[str, str] = {}
    for root in (options.assistant, *options.e2e_paths):
        for path in yaml_files(root):
            files[display_path(path, options.assistant)] = hashlib.sha256(path.read_bytes()).hexdigest()
    # A coexistence router decides which turns become data (its prompt, descriptions and LLM); only a
    # config that has one adds the key, so other runs' hash is what it always was.
    router = read_router(options.config, options.endpoints) if options.config is not None else None
    return stable_hash(
        {
            **(
                {
                    "router": {
                        **asdict(router),
                        "llm": router.llm.model_dump(exclude={"timeout", "key_variable"})
                        if router.llm
                        else None,
                    }
                }
                if router is not None
                else {}
            ),
            "files": files,
            "template": template.text,
            "rephrase_template": rephraser.template.text,
            # Neither the timeout nor where the key is read from changes an answer.
            "llm": generator.llm.model_dump(exclude={"timeout", "key_variable"}) if generator.llm else None,
            "rephraser_llm": (
                rephraser.llm.model_dump(exclude={"timeout", "key_variable"}) if rephraser.llm else None
            ),
            "syntax": generator.syntax,
            # Only where a template shows it, so the hash of other runs is what it always was.
            **(
                {"current_datetime": format_prompt_datetime(template.current_datetime)}
                if template.current_datetime is not None
                else {}
            ),
            "options": {
                "annotator": options.annotator,
                "num_rephrases": options.num_rephrases,
                "train_frac": options.train_frac,
                "output_format": options.output_format,
                "seed": options.seed,
            },
        }
    )


def _llm_client(settings: LLMSettings, options: PrepareDataOptions) -> LLMClient:
    try:
        return LLMClient(
            settings, concurrency=options.concurrency, cache_dir=options.cache_dir or default_cache_dir()
        )
    except ValueError as error:  # e.g. the API key variable is not set
        raise InputError(f"LLM {settings.provider}/{settings.model}: {error}") from None


class _Silent:
    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self, stage: str, detail: str) -> None:
        pass

    def log(self, line: str) -> None:
        pass


async def prepare_data(
    options: PrepareDataOptions, progress: Reporter | None = None, now: Callable[[], datetime] = utc_now
) -> PrepareDataResult:
    """Run the stages and publish the bundle; ``now`` is the clock a first run records its prompt instant from."""
    report: Reporter = progress or _Silent()
    log = report.log
    _check_options(options)
    started = time.monotonic()
    generator = resolve_generator(options.llm_config, options.config, options.endpoints)
    template = load_template(generator.prompt_template, generator.syntax)
    rephraser = read_rephrase_config(options.rephrase_config)
    e2e_roots = tuple(p.resolve() for p in options.e2e_paths)
    assistant: Assistant = load_assistant(options.assistant, exclude=e2e_roots)
    # Where the assistant came from (fetch-inputs' record beside it) and a digest of what decides prompts.
    assistant_source = source_record(
        read_fetch_record(options.assistant),
        replay_files(options.assistant, assistant, options.config, options.endpoints),
    )
    e2e_tests = scan_e2e_tests(options.e2e_paths)
    suites = list(e2e_tests.suites)
    check_test_references(assistant, suites)
    check_mocked_datetimes(suites)
    n_tests = e2e_tests.num_test_cases
    own_flows = sum(1 for flow in assistant.flows.values() if flow.file is not None)
    log(f"read {own_flows} flows, {len(assistant.slots)} slots, {n_tests} tests in {len(suites)} files")
    for skipped in e2e_tests.skipped:
        log(skipped.note(Path.cwd()))
    # What Rasa accepts with a warning: reported here and in result_summary.yaml, never fatal.
    load_warnings = [*generator.warnings, *assistant.warnings]
    for warning in load_warnings:
        log(f"warning: {warning}")
    if generator.llm is None and (options.annotator == "llm" or options.num_rephrases > 0):
        why = (
            "--annotator llm" if options.annotator == "llm" else "--num-rephrases > 0 (to check rephrasings)"
        )
        raise InputError(
            f"{why} needs the command generator's LLM: pass --llm-config FILE, or --config with an LLM command "
            "generator (and --endpoints for model groups); offline, use --annotator assertions --num-rephrases 0"
        )

    instant: PromptInstant | None = None
    if template.shows_datetime and generator.include_date_time:
        zone = generator_zone(generator)
        cache_dir = options.cache_dir or default_cache_dir()
        instant = resolve_prompt_datetime(options.prompt_datetime, generator, template, cache_dir, now)
        template = template.at(instant.value.astimezone(zone))  # shown in the zone Rasa shows it in
        log(f"current_datetime in prompts: {template.current_datetime} ({instant.source})")
        if instant.warning:
            log(instant.warning)

    clients: list[LLMClient] = []
    # Only when asked: a config.yml that names the production LLM must not demand its key offline.
    needs_llm = options.annotator == "llm" or options.num_rephrases > 0
    generator_client = _llm_client(generator.llm, options) if generator.llm and needs_llm else None
    if generator_client is not None:
        clients.append(generator_client)
    base = Path.cwd()
    # Variables every prompt gets beyond the replay's; `current_datetime` is the template's own (`at`).
    fixed: dict[str, Any] = {}
    try:
        # Stages 1 and 2 per conversation, all conversations at once: a conversation's rephrasings are
        # asked for as soon as it is labelled, so the LLM is never idle between stages.
        if options.annotator == "llm":
            assert generator_client is not None
            label = llm_labeller(generator_client, assistant, generator.syntax)
        else:
            label = assertions_labeller(assistant, generator.syntax)
        # Coexistence: Rasa asks an LLMBasedRouter before the command generator (with the generator's LLM
        # here); an IntentBasedRouter needs an NLU model, so its routing is only what the tests show.
        router = read_router(options.config, options.endpoints) if options.config is not None else None
        route = None
        if router is not None and router.asks_llm and options.annotator == "llm" and assistant.coexistence:
            assert generator.llm is not None
            router_client = _llm_client(router_llm(router, generator.llm), options)
            clients.append(router_client)
            route = llm_router(router_client, router)
        rephrasing = options.num_rephrases > 0 and generator_client is not None
        rephrase_client = generator_client
        if rephrasing and rephraser.llm is not None and rephraser.llm != generator.llm:
            rephrase_client = _llm_client(rephraser.llm, options)
            clients.append(rephrase_client)
        report.start("annotate", n_tests)
        if rephrasing:
            report.start("rephrase", n_tests)

        async def one(suite: TestSuite, test: TestCase) -> tuple[AnnotatedConversation, Augmented | None]:
            annotated = await annotate_conversation(
                assistant, suite, test, template, generator.syntax, label, fixed, route
            )
            report.advance("annotate", f"{test.key}: {'ok' if annotated.passed else 'FAILED'}")
            if not annotated.passed:
                if rephrasing:
                    report.advance("rephrase", f"{test.key}: skipped (not annotated)")
                return annotated, None
            if not rephrasing:
                return annotated, Augmented(annotated, {})
            assert rephrase_client is not None and generator_client is not None
            augmented = await _augment_one(
                annotated,
                assistant=assistant,
                rephraser=rephraser,
                rephrase_client=rephrase_client,
                validate_client=generator_client,
                template=template,
                syntax=generator.syntax,
                n=options.num_rephrases,
                prompt_variables=fixed,
                base=base,
            )
            kept = sum(1 for results in augmented.checked.values() for r in results if r.passed)
            report.advance("rephrase", f"{test.key}: {kept} rephrasings kept")
            return annotated, augmented

        results = await asyncio.gather(*(one(suite, test) for suite in suites for test in suite.test_cases))
        annotation = AnnotationResult([annotated for annotated, _ in results])
        augmented = [item for _, item in results if item is not None]
        log(f"{len(annotation.passing)} of {n_tests} tests annotated, {len(annotation.failures)} failed")
        if rephrasing:
            checked = [r for a in augmented for rs in a.checked.values() for r in rs]
            kept = sum(1 for r in checked if r.passed)
            log(f"rephrasings: {kept} passed, {len(checked) - kept} failed")
    finally:
        for client in clients:
            await client.aclose()

    # Stage 3: data points of every original and synthetic conversation.
    points_by_test: dict[str, list[DataPoint]] = {}
    for item in augmented:
        passing = {i: [r for r in rs if r.passed] for i, rs in item.checked.items()}
        points = conversation_data_points(
            assistant, item.annotated, passing, template, generator.syntax, fixed, base
        )
        points_by_test[conversation_id(item.annotated.test, base)] = points
    all_points = [p for points in points_by_test.values() for p in points]

    # Stage 4: split by test case so every command type is trained.
    types = {
        test: sorted({t for p in points for t in p.command_types}) for test, points in points_by_test.items()
    }
    split = split_tests(types, options.train_frac, options.seed)
    train = [p for test in split.train for p in points_by_test[test]]
    validation = [p for test in split.validation for p in points_by_test[test]]

    out = parse_location(options.out)
    if isinstance(out, LocalLocation):
        out.path.parent.mkdir(parents=True, exist_ok=True)
        staging = out.path.with_name(f".{out.path.name}.staging-{uuid.uuid4().hex[:8]}")
    else:
        staging = Path(tempfile.mkdtemp(prefix="ftrecipe-prepare-data-"))
    try:
        _write_annotations(staging, annotation, generator.syntax, base)
        _write_rephrasings(staging, augmented, generator.syntax, base)
        write_jsonl(staging / FT_DATA_FILE, (ft_data_record(p) for p in all_points))
        splits = staging / SPLITS_DIR
        write_jsonl(
            splits / "ft_splits" / "train.jsonl", (training_record(p, options.output_format) for p in train)
        )
        write_jsonl(
            splits / "ft_splits" / "val.jsonl",
            (training_record(p, options.output_format) for p in validation),
        )
        passing_suites = [s for s in suites if any(c.suite is s for c in annotation.passing)]
        write_e2e_split(
            passing_suites,
            split.train,
            splits / "e2e_tests" / "train.yaml",
            splits / "e2e_tests" / "validation.yaml",
            base,
            validation_ids=split.validation,  # failed tests belong to neither side
        )
        (staging / COVERAGE_DIR).mkdir(parents=True, exist_ok=True)
        write_command_histogram(train, validation, staging / COVERAGE_DIR / "commands.png")
        write_flow_coverage_markdown(
            flow_coverage(assistant, [c.test for c in annotation.passing]),
            staging / COVERAGE_DIR / "flows.md",
        )
        summary = _summary(suites, annotation, augmented, all_points, split, train, validation, clients)
        summary["skipped_test_files"] = [skipped.note(base) for skipped in e2e_tests.skipped]
        summary["num_sub_agent_messages"] = _sub_agent_messages(annotation)
        summary["num_nlu_routed_turns"] = sum(len(c.nlu_routes) for c in annotation.conversations)
        summary["warnings"] = [*load_warnings, *summary["skipped_test_files"]]
        summary["wall_time_seconds"] = round(time.monotonic() - started, 3)
        _dump_yaml(
            staging / "params.yaml",
            _params(
                options,
                generator,
                template.source,
                rephraser.source,
                instant,
                template_text=template.text,
                assistant_source=assistant_source,
            ),
        )
        _dump_yaml(staging / "result_summary.yaml", summary)
        publish_bundle(
            staging,
            out,
            producer=f"ftrecipe prepare-data {__version__}",
            inputs_hash=inputs_hash(options, generator, template, rephraser),
            metadata={**headline_figures(summary), **_assistant_metadata(assistant_source)},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    routed = summary["num_nlu_routed_turns"]
    log(
        f"{len(all_points)} data points: {len(train)} train, {len(validation)} validation; "
        + (f"{routed} turns routed to the NLU-based system, skipped; " if routed else "")
        + f"failed tests in {str(options.out).rstrip('/')}/{ANNOTATIONS_DIR}/{FAILED_TESTS_FILE}"
    )
    for missing in split.missing_in_validation:
        log(f"warning: command type {missing!r} appears in train but not in validation")
    return PrepareDataResult(str(options.out), annotation, summary)


def run_prepare_data(
    options: PrepareDataOptions, progress: Reporter | None = None, now: Callable[[], datetime] = utc_now
) -> PrepareDataResult:
    return asyncio.run(prepare_data(options, progress, now))
