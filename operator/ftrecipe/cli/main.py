"""`ftrecipe` entry point: parse arguments, call the library, turn known errors into one line and an exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftrecipe import __version__
from ftrecipe.api import RecipeError, load_recipe
from ftrecipe.api.crd import render_crd_yaml
from ftrecipe.api.v1alpha1 import FinetuneRecipeSpec

EXIT_USER_ERROR = 2


def _user_error(message: str) -> int:
    """One line on stderr and in the termination message; the "fix your input" exit code."""
    from ftrecipe.termination import PhaseReport, write_report

    print(message, file=sys.stderr)
    write_report(PhaseReport(ok=False, message=message))
    return EXIT_USER_ERROR


def _cmd_crd(args: argparse.Namespace) -> int:
    text = render_crd_yaml()
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)  # atomic: a crash never leaves a half-written CRD
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for name in args.files:
        try:
            recipe = load_recipe(Path(name))
        except RecipeError as error:
            failed = True
            for line in error.lines:
                print(line, file=sys.stderr)
            continue
        spec = recipe.spec
        print(
            f"{name}: valid {recipe.kind} {recipe.metadata.name or '(unnamed)'}: "
            f"annotator {spec.data_preparation.annotator}, syntax {_syntax_shown(spec)}, "
            f"{spec.training.method} r={spec.training.lora.r}, {spec.training.hyperparameters.epochs} epoch(s)"
        )
    return EXIT_USER_ERROR if failed else 0


def _syntax_shown(spec: FinetuneRecipeSpec) -> str:
    if spec.command_generator.syntax is not None:
        return spec.command_generator.syntax
    return f"from {spec.assistant.config}" if spec.assistant.config else "v2"


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    # Imported here: torch and transformers are the `train` extra and slow to import.
    from ftrecipe.training.tiny_model import build_tiny_model

    try:
        path = build_tiny_model(Path(args.dir), seed=args.seed, overwrite=args.overwrite)
    except FileExistsError:
        print(f"{args.dir}: already exists and is not empty; pass --overwrite to replace it", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{path}: tiny random Llama with tokenizer and chat template (for demos and tests)")
    return 0


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    from ftrecipe.dataprep.pipeline import PrepareDataOptions, headline_figures, run_prepare_data
    from ftrecipe.dataprep.progress import LineReporter, RichReporter
    from ftrecipe.dataprep.yamlfile import InputError
    from ftrecipe.storage import StorageError
    from ftrecipe.termination import PhaseReport, write_report

    def optional(value: str | None) -> Path | None:
        return Path(value) if value else None

    options = PrepareDataOptions(
        e2e_paths=tuple(Path(p) for p in (args.e2e_paths or ["e2e_tests"])),
        assistant=Path(args.assistant),
        config=optional(args.config),
        endpoints=optional(args.endpoints),
        llm_config=optional(args.llm_config),
        annotator=args.annotator,
        num_rephrases=args.num_rephrases,
        rephrase_config=optional(args.rephrase_config),
        train_frac=args.train_frac,
        output_format=args.output_format,
        out=args.out,  # a folder or an s3:// prefix
        seed=args.seed,
        concurrency=args.concurrency,
        cache_dir=optional(args.cache_dir),
        prompt_datetime=args.prompt_datetime,
    )
    try:
        if sys.stderr.isatty():
            with RichReporter() as reporter:
                result = run_prepare_data(options, reporter)
        else:
            result = run_prepare_data(options, LineReporter())
    except (InputError, StorageError) as error:
        return _user_error(f"error: {error}")
    except OSError as error:  # e.g. an output folder that cannot be written
        return _user_error(f"error: {error.filename or ''}: {error.strerror or error}")
    except Exception as error:
        write_report(PhaseReport(ok=False, message=f"error: {type(error).__name__}: {error}"))
        raise
    figures = headline_figures(result.summary)
    write_report(PhaseReport(ok=True, message=f"data published to {result.out}", figures=figures))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import os
    import time

    from ftrecipe.termination import PhaseReport, write_report

    # Imported here: the training stack (torch, transformers, peft) is slow to import.
    from ftrecipe.training.config import ConfigError, load_train_config
    from ftrecipe.training.launch import (
        RANK_REPORTS_ENV,
        LaunchError,
        RankOutcome,
        is_main_process,
        launch_command,
        node_group,
        rank_failure,
        train_argv,
    )
    from ftrecipe.training.trainer import (
        EXIT_PREEMPTED,
        Preempted,
        TrainError,
        TrainOptions,
        record_rank_failure,
        run_launched,
        run_train,
        sigterm_received,
        visible_gpus,
    )

    main_process = is_main_process(os.environ)  # under torchrun, rank 0 alone writes the termination log

    def termination(message: str, outcome: RankOutcome) -> None:
        # A rank under our launcher tells it (which writes the pod's message for the rank that failed
        # first on its own); a process alone, or rank 0 under another launcher, writes the message.
        reports = os.environ.get(RANK_REPORTS_ENV)
        if reports:
            failure = rank_failure(os.environ, outcome, message, time.time(), sigterm_received())
            record_rank_failure(Path(reports), failure)
        elif main_process:
            write_report(PhaseReport(ok=False, message=message))

    try:
        config = load_train_config(Path(args.config) if args.config else None, args.set or [])
        group = node_group(os.environ, args.nodes, args.rendezvous, args.node_rank)
        command = launch_command(train_argv(args), visible_gpus(), os.environ, group)
        if command is not None:  # several GPUs or nodes: one process each, under torchrun; the ranks report
            return run_launched(command)
        result = run_train(
            TrainOptions(
                data=args.data,
                base_model=args.base_model,
                out=args.out,
                config=config,
                work_dir=Path(args.work_dir) if args.work_dir else None,
                adapter_name=args.adapter_name,
                merge=args.merge,
            )
        )
    except (ConfigError, TrainError, LaunchError) as error:
        message = f"error: {error}"
        print(message, file=sys.stderr)
        termination(message, "bad-input")
        return EXIT_USER_ERROR
    except Preempted as stopped:
        print(f"preempted: {stopped}", file=sys.stderr)
        termination(f"preempted: {stopped}", "preempted")
        return EXIT_PREEMPTED
    except Exception as error:
        termination(f"error: {type(error).__name__}: {error}", "error")
        raise
    if main_process:
        write_report(PhaseReport(ok=True, message=result.summary(), figures=result.figures()))
        print(result.summary(), file=sys.stderr)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ftrecipe.evaluation.errors import EvalError
    from ftrecipe.evaluation.run import (
        EXIT_BELOW_GATE,
        EvaluateOptions,
        accuracy_gate,
        e2e_gate,
        run_evaluate,
    )
    from ftrecipe.termination import PhaseReport, write_report

    minimum = args.min_command_accuracy
    if minimum is not None and not 0 <= minimum <= 1:
        return _user_error(f"error: --min-command-accuracy must be between 0 and 1, not {minimum:g}")
    min_e2e = args.min_e2e_pass_rate
    if min_e2e is not None and not 0 <= min_e2e <= 1:
        return _user_error(f"error: --min-e2e-pass-rate must be between 0 and 1, not {min_e2e:g}")
    if min_e2e is not None and not args.e2e:
        return _user_error("error: --min-e2e-pass-rate gates the E2E replay: add --e2e (and --assistant DIR)")

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    options = EvaluateOptions(
        data=args.data,
        out=args.out,
        base_model=args.base_model,
        adapter=args.adapter,
        endpoint=args.endpoint,
        model=args.model,
        syntax=args.syntax,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        api_key_env=args.api_key_env,
        work_dir=Path(args.work_dir) if args.work_dir else None,
        e2e=args.e2e,
        assistant=path(args.assistant),
        llm_config=path(args.llm_config),
        config=path(args.config),
        endpoints=path(args.endpoints),
    )
    try:
        result = run_evaluate(options)
    except EvalError as error:
        return _user_error(f"error: {error}")
    except Exception as error:
        write_report(PhaseReport(ok=False, message=f"error: {type(error).__name__}: {error}"))
        raise
    gates = [
        line
        for line in (accuracy_gate(result.scores.command_accuracy, minimum), e2e_gate(result.e2e, min_e2e))
        if line is not None
    ]
    message = "; ".join(gates) or result.summary()
    write_report(PhaseReport(ok=not gates, message=message, figures=result.figures()))
    print(result.summary(), file=sys.stderr)
    for line in gates:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_BELOW_GATE if gates else 0


def _cmd_fetch_inputs(args: argparse.Namespace) -> int:
    import os

    from ftrecipe.phases.inputs import SPEC_ENV, FetchError, fetch_inputs, load_spec

    text = args.spec_json if args.spec_json is not None else os.environ.get(SPEC_ENV, "")
    if not text.strip():
        print(
            f"error: {SPEC_ENV} is not set (the Job passes the recipe spec there) and no --spec-json",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    try:
        written = fetch_inputs(load_spec(text), args.phase, Path(args.into), data=args.data)
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    for line in written:
        print(line, file=sys.stderr)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    # Imported here: the planner, storage and rich are not needed by the other commands.
    from ftrecipe.local.runner import PHASE_ALIASES, RunOptions, run_recipe

    options = RunOptions(
        recipe=Path(args.file),
        workdir=Path(args.workdir) if args.workdir else None,
        from_phase=PHASE_ALIASES[args.from_phase] if args.from_phase else None,
        dry_run=args.dry_run,
    )
    return run_recipe(options)


def _cmd_operator(args: argparse.Namespace) -> int:
    # Imported here: kopf and the kubernetes client are only needed by the operator.
    import random

    import kopf
    import kubernetes.config

    from ftrecipe.controller.handlers import OperatorSettings, register
    from ftrecipe.controller.manifests import Images
    from ftrecipe.controller.metrics import OperatorMetrics, serve
    from ftrecipe.plan.planner import StuckLimits

    if not args.all_namespaces and not args.namespace:
        return _user_error("error: pass --namespace NS (repeatable) or --all-namespaces")
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
        log_refkey="object" if args.log_format == "json" else None,
    )
    # The handlers use the `kubernetes` client's default configuration: in the pod, or from kubeconfig.
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    read_bundle = None
    if args.reuse_bundles:
        from ftrecipe.controller.handlers import bundle_reader
        from ftrecipe.storage import S3Settings

        read_bundle = bundle_reader(S3Settings.from_env())

    metrics = OperatorMetrics()
    if args.metrics_port:
        serve(metrics, args.metrics_port)
    settings = OperatorSettings(
        images=Images.from_env(),
        read_bundle=read_bundle,
        resync_seconds=args.resync_seconds if args.resync_seconds > 0 else None,
        progress_seconds=args.progress_seconds if args.progress_seconds > 0 else None,
        metrics=metrics,
        stuck=StuckLimits(
            image_pull=args.stuck_pull_seconds or None,
            secret=args.stuck_secret_seconds or None,
            unschedulable=args.stuck_unschedulable_seconds or None,
            queued=args.stuck_queued_seconds or None,
            max_evictions=args.max_evictions or None,
        ),
    )
    registry = kopf.OperatorRegistry()
    register(registry, settings=settings)

    # A registry of our own has none of kopf's default login handlers: log in as the `kubernetes`
    # client does (the pod's service account, else kubeconfig).
    @kopf.on.login(registry=registry, id="kubernetes-client")
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    kopf_settings = kopf.OperatorSettings()
    # Without it a silent watch (no events for a long time) can hang on a dead connection forever.
    kopf_settings.watching.server_timeout = args.watch_timeout_seconds
    kopf_settings.watching.client_timeout = args.watch_timeout_seconds + 30
    standalone = args.peering is None
    if not standalone:
        from ftrecipe.controller.peering import PeeringError, ensure_peering

        try:
            for created in ensure_peering(
                args.peering, namespaces=args.namespace or [], clusterwide=args.all_namespaces
            ):
                print(f"created {created}", file=sys.stderr)
        except PeeringError as error:
            return _user_error(f"error: {error}")
    # Replicas with equal priorities all freeze (kopf's rule): a random one makes one active, the rest
    # standby, unless --priority pins it.
    priority = args.priority if args.priority is not None else random.SystemRandom().randint(1, 2**31 - 1)
    kopf.run(
        registry=registry,
        settings=kopf_settings,
        clusterwide=args.all_namespaces,
        namespaces=[] if args.all_namespaces else args.namespace,
        standalone=standalone,
        peering_name=args.peering,
        priority=priority,
        liveness_endpoint=args.liveness,
    )
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftrecipe",
        description="Fine-tune a Rasa CALM command generator, on Kubernetes or on one machine.",
    )
    parser.add_argument("--version", action="version", version=f"ftrecipe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crd = commands.add_parser("crd", help="print the FinetuneRecipe CRD generated from the API models")
    crd.add_argument("--out", help="write to this file instead of standard output")
    crd.set_defaults(run=_cmd_crd)

    validate = commands.add_parser("validate", help="check FinetuneRecipe manifests offline")
    validate.add_argument("files", nargs="+", metavar="FILE", help="recipe YAML files")
    validate.set_defaults(run=_cmd_validate)

    prepare = commands.add_parser(
        "prepare-data", help="turn an assistant's E2E tests into fine-tuning data (Rasa-compatible output)"
    )
    prepare.add_argument(
        "e2e_paths", nargs="*", metavar="E2E_PATH", help="E2E test files or folders (default e2e_tests)"
    )
    prepare.add_argument(
        "--assistant", default=".", help="folder with the flows and domain (searched recursively)"
    )
    prepare.add_argument("--config", help="Rasa config.yml: take the command generator's settings from it")
    prepare.add_argument("--endpoints", help="Rasa endpoints.yml (model_groups), used with --config")
    prepare.add_argument(
        "--llm-config", help="{syntax, prompt_template, llm} file; the keys it sets win over --config's"
    )
    prepare.add_argument(
        "--annotator", choices=["llm", "assertions"], default="llm", help="who labels user turns"
    )
    prepare.add_argument("--num-rephrases", type=int, default=10, help="rephrasings per user message (0-49)")
    prepare.add_argument("--rephrase-config", help="{prompt_template, llm} of the rephraser")
    prepare.add_argument("--train-frac", type=float, default=0.8, help="share of tests in train, (0, 1]")
    prepare.add_argument("--output-format", choices=["instruction", "conversational"], default="instruction")
    prepare.add_argument("--out", default="output", help="output folder or s3://bucket/prefix/")
    prepare.add_argument("--seed", type=int, default=42, help="seed of the train/validation split")
    prepare.add_argument("--concurrency", type=int, default=16, help="concurrent LLM requests")
    prepare.add_argument("--cache-dir", help="LLM answer cache (default ~/.cache/ftrecipe/llm)")
    prepare.add_argument(
        "--prompt-datetime",
        metavar="ISO8601",
        help="the instant a template's current_datetime shows, e.g. 2026-01-15T09:30:00+00:00 (default: the "
        "one a first run recorded in the cache dir, so re-runs make the same prompts)",
    )
    prepare.set_defaults(run=_cmd_prepare_data)

    tiny = commands.add_parser(
        "make-tiny-model", help="build a tiny random Llama and tokenizer offline (for the demo and tests)"
    )
    tiny.add_argument("dir", help="output folder")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same files)")
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    tiny.set_defaults(run=_cmd_make_tiny_model)

    train = commands.add_parser(
        "train", help="LoRA fine-tune a base model on prepare-data's splits and publish the adapter bundle"
    )
    train.add_argument("--data", required=True, help="prepare-data output (folder or s3://) with train.jsonl")
    train.add_argument(
        "--base-model", required=True, help="saved model folder, s3:// bundle, or hf:ORG/NAME[@REVISION]"
    )
    train.add_argument("--out", required=True, help="folder or s3://bucket/prefix/ for the adapter bundle")
    train.add_argument("--config", help="YAML/JSON file with the recipe's `training` block")
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a training setting, e.g. hyperparameters.epochs=1 (repeatable)",
    )
    train.add_argument(
        "--work-dir",
        help="local scratch (default under $TMPDIR); while a run goes, checkpoints are kept under "
        "OUT/checkpoints/step-N/ and a rerun resumes from the latest there; they are deleted once the "
        "adapter is published",
    )
    train.add_argument("--adapter-name", help="LoRA name in the model card (default: last part of --out)")
    train.add_argument(
        "--merge", action="store_true", help="also write the base model merged with the adapter under merged/"
    )
    train.add_argument(
        "--nodes",
        type=int,
        help="train across this many nodes (pods), one torchrun each (default: $FTRECIPE_NODES, else 1)",
    )
    train.add_argument(
        "--rendezvous",
        metavar="HOST:PORT",
        help="with --nodes >= 2: where node 0 hosts the c10d rendezvous (default: $FTRECIPE_RENDEZVOUS)",
    )
    train.add_argument(
        "--node-rank",
        type=int,
        help="with --nodes >= 2: this node's index, 0 hosts the rendezvous (default: $JOB_COMPLETION_INDEX)",
    )
    train.set_defaults(run=_cmd_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="score a model's commands on the validation split (base + adapter, or an OpenAI-compatible endpoint)",
    )
    evaluate.add_argument(
        "--data",
        required=True,
        help="prepare-data output or its ft_splits folder (folder or s3://) with val.jsonl",
    )
    evaluate.add_argument("--out", required=True, help="folder or s3://bucket/prefix/ for the report bundle")
    evaluate.add_argument("--base-model", help="saved model folder, s3:// bundle, or hf:ORG/NAME[@REVISION]")
    evaluate.add_argument(
        "--adapter", help="`ftrecipe train`'s adapter bundle (folder or s3://) to load on it"
    )
    evaluate.add_argument(
        "--endpoint", metavar="URL", help="an OpenAI-compatible server instead, e.g. http://host:8000/v1"
    )
    evaluate.add_argument("--model", help="the model (or LoRA) name to ask at --endpoint")
    evaluate.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="NAME",
        help="environment variable holding the endpoint's key (default OPENAI_API_KEY; unset: no key)",
    )
    evaluate.add_argument(
        "--syntax",
        choices=["v1", "v2", "v3"],
        help="command syntax of the data (default: prepare-data's params.yaml, else v2)",
    )
    evaluate.add_argument(
        "--max-new-tokens", type=int, default=64, help="longest answer in tokens (default 64)"
    )
    evaluate.add_argument(
        "--batch-size", type=int, default=8, help="prompts per generation batch (local model)"
    )
    evaluate.add_argument("--concurrency", type=int, default=8, help="requests in flight (--endpoint)")
    evaluate.add_argument(
        "--min-command-accuracy",
        type=float,
        metavar="X",
        help="exit with code 3 after publishing the report when command accuracy is below X (0-1)",
    )
    evaluate.add_argument(
        "--e2e",
        action="store_true",
        help="also replay the held-out E2E tests (the data's e2e_tests/validation.yaml) with the model in the "
        "loop: its own commands drive each conversation; needs --assistant",
    )
    evaluate.add_argument(
        "--assistant", metavar="DIR", help="--e2e: the assistant's flows and domain, as given to prepare-data"
    )
    evaluate.add_argument(
        "--llm-config",
        metavar="FILE",
        help="--e2e: prepare-data's --llm-config (prompt template and syntax of the command generator)",
    )
    evaluate.add_argument(
        "--config", metavar="FILE", help="--e2e: prepare-data's --config (Rasa's config.yml)"
    )
    evaluate.add_argument(
        "--endpoints", metavar="FILE", help="--e2e: prepare-data's --endpoints (Rasa's endpoints.yml)"
    )
    evaluate.add_argument(
        "--min-e2e-pass-rate",
        type=float,
        metavar="X",
        help="--e2e: exit with code 3 after publishing the report when the E2E pass rate is below X (0-1)",
    )
    evaluate.add_argument("--work-dir", help="local scratch for fetched inputs (default: a temporary folder)")
    evaluate.set_defaults(run=_cmd_evaluate)

    fetch = commands.add_parser(
        "fetch-inputs", help="write what a phase's Job reads (assistant files, LLM and training configs)"
    )
    fetch.add_argument(
        "--phase", required=True, choices=["data", "train", "evaluate"], help="the Job's phase"
    )
    fetch.add_argument("--into", required=True, help="folder to write into (the Job's /workspace/inputs)")
    fetch.add_argument("--spec-json", help="the recipe spec as JSON (default: $FTRECIPE_SPEC)")
    fetch.add_argument(
        "--data",
        metavar="URI",
        help="evaluate with e2e, git source: the data bundle, whose recorded commit is checked out",
    )
    fetch.set_defaults(run=_cmd_fetch_inputs)

    local_run = commands.add_parser(
        "run",
        help="run a FinetuneRecipe on this machine: each phase a local process, the status in WORKDIR/status.yaml",
    )
    local_run.add_argument(
        "file", metavar="FILE", help="the FinetuneRecipe manifest (the file you would kubectl apply)"
    )
    local_run.add_argument(
        "--workdir", metavar="DIR", help="status, logs and scratch (default: .ftrecipe/NAME/ next to FILE)"
    )
    local_run.add_argument(
        "--from-phase",
        choices=["data", "prepare-data", "train", "evaluate"],
        help="run this phase and the later ones again even when their output exists",
    )
    local_run.add_argument(
        "--dry-run", action="store_true", help="print the plan and the commands; run nothing"
    )
    local_run.set_defaults(run=_cmd_run)

    operator = commands.add_parser(
        "operator", help="run the Kubernetes operator: FinetuneRecipes become Jobs (data, train, evaluate)"
    )
    scope = operator.add_mutually_exclusive_group()
    scope.add_argument("--namespace", action="append", metavar="NS", help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace")
    operator.add_argument(
        "--liveness", metavar="URL", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    peering = operator.add_mutually_exclusive_group()
    peering.add_argument(
        "--standalone", action="store_true", help="no peering with other operator instances (the default)"
    )
    peering.add_argument(
        "--peering",
        metavar="NAME",
        help="coordinate replicas through kopf's (Cluster)KopfPeering NAME: one is active, the rest standby",
    )
    operator.add_argument(
        "--priority", type=int, help="peering priority (default: random, so replicas never tie)"
    )
    operator.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port at /metrics"
    )
    operator.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="log lines as text or JSON objects"
    )
    operator.add_argument("--verbose", action="store_true", help="debug logging")
    operator.add_argument(
        "--progress-seconds",
        type=float,
        default=10.0,
        help="copy training and evaluation progress into the status at most this often (0: never)",
    )
    operator.add_argument(
        "--watch-timeout-seconds",
        type=int,
        default=300,
        help="restart each watch request after this long, so a silently dropped connection recovers",
    )
    operator.add_argument(
        "--reuse-bundles",
        action="store_true",
        help="skip a phase whose bundle is already complete in S3 (credentials from the environment)",
    )
    operator.add_argument(
        "--resync-seconds",
        type=float,
        default=60.0,
        help="list unfinished Jobs this often to catch lost watch events (0: never)",
    )
    # How long a phase's pod may be stuck before the phase fails (checked every --progress-seconds).
    for flag, default, what in (
        ("--stuck-pull-seconds", 300.0, "its image cannot be pulled (ImagePullBackOff)"),
        ("--stuck-secret-seconds", 300.0, "a Secret or key it needs is missing (SecretMissing)"),
        ("--stuck-unschedulable-seconds", 0.0, "no node can run it (Unschedulable; 0: wait, autoscalers)"),
        ("--stuck-queued-seconds", 0.0, "Kueue has not admitted its Job (Queued; 0: wait)"),
    ):
        operator.add_argument(
            flag,
            type=float,
            default=default,
            metavar="S",
            help=f"fail a phase whose pod waited this long because {what}",
        )
    operator.add_argument(
        "--max-evictions",
        type=int,
        default=3,
        metavar="N",
        help="fail a phase once its pods were evicted (preempted, drained) N times (0: no bound)",
    )
    operator.set_defaults(run=_cmd_operator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    code = main()
    # The interpreter's exit would collect every object torch, transformers and peft created: ~1.7 s of
    # CPU per `python -m ftrecipe.cli.main` process (each torchrun rank). Frozen objects are left to the OS.
    import gc

    gc.freeze()
    raise SystemExit(code)
