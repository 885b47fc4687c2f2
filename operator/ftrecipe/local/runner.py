"""`ftrecipe run FILE`: the operator's loop on one machine.

Same recipe file, same planner (`plan(..., in_cluster=False)`), same status (`compute_status`), same phase
commands (`phases.commands.data_args` / `train_args` / `evaluate_args`) as the cluster's Jobs. Only the shell
differs: a `CreateJob` runs `ftrecipe <phase>` as a child process here, with the phase's termination report
in a file of its own; a phase whose bundle is already complete is reused (`Reuse`, reported `cached`); the
status goes to `<workdir>/status.yaml` (written whole, then renamed) as the run goes.

Work folder (`--workdir`, default `.ftrecipe/<name>/` next to the recipe file)::

    status.yaml                       the FinetuneRecipe status, camelCase, as the operator writes it
    cache/                            prepare-data's LLM answer cache
    runs/<phase>-<hash>/inputs/       llm.yml, rephrase.yml, training.yml (what fetch-inputs writes in a Job)
    runs/<phase>-<hash>/output.log    everything the phase printed
    runs/<phase>-<hash>/report.json   its termination report (FTRECIPE_TERMINATION_LOG)
    runs/train-<hash>/work/           train's scratch; a rerun resumes from its checkpoints

Ctrl-C (or SIGTERM) stops the running phase with SIGTERM, so training saves a checkpoint, and leaves the
status saying so; a second Ctrl-C kills it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

import yaml
from pydantic import ValidationError

from ftrecipe.api import RecipeError, load_recipe
from ftrecipe.api.v1alpha1 import KIND, FinetuneRecipeStatus
from ftrecipe.local.display import (
    Display,
    LineDisplay,
    make_display,
    result_line,
    status_figures,
    summary_rows,
)
from ftrecipe.local.layout import (
    STATUS_FILE,
    WORKDIR_FOLDER,
    LocalRecipe,
    LocalRunError,
    resolve,
    s3_env,
)
from ftrecipe.local.progress import Counted, Event, Steps, parse_line
from ftrecipe.phases import inputs
from ftrecipe.phases.commands import CommandPaths, data_args, evaluate_args, train_args
from ftrecipe.plan.cache_key import PHASES, Phase
from ftrecipe.plan.planner import (
    Action,
    CreateJob,
    Fail,
    ObservedJob,
    Reuse,
    Succeed,
    World,
    phases,
    plan,
)
from ftrecipe.plan.status import ProgressPhase, compute_status, invalid_status, with_progress
from ftrecipe.storage import S3Settings, StorageError, join, parse_location, read_manifest
from ftrecipe.termination import TERMINATION_LOG_ENV, PhaseReport, decode, report_from_metadata

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USER_ERROR: Final = 2  # a bad recipe or input, as everywhere in ftrecipe
EXIT_INTERRUPTED: Final = 130  # the shell's convention for Ctrl-C
STATUS_EVERY_SECONDS: Final = 2.0  # training and evaluation progress reach status.yaml at most this often
KILL_AFTER_SECONDS: Final = 600.0  # a stopped phase that has closed its output but not exited is killed
PHASE_ALIASES: Final[dict[str, Phase]] = {
    "data": "data",
    "prepare-data": "data",
    "train": "train",
    "evaluate": "evaluate",
}
_URI_FIELD: Final[dict[Phase, str]] = {
    "data": "dataset_uri",
    "train": "adapter_uri",
    "evaluate": "report_uri",
}
_SECTION: Final[dict[Phase, str]] = {
    "data": "data_preparation",
    "train": "training",
    "evaluate": "evaluation",
}


@dataclass(frozen=True)
class RunOptions:
    recipe: Path
    workdir: Path | None = None
    from_phase: Phase | None = None  # re-run this phase and the later ones even when their bundle exists
    dry_run: bool = False


# --------------------------------------------------------------------------------------------- status file


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def read_status(path: Path) -> FinetuneRecipeStatus | None:
    """The status an earlier run wrote, or None when there is none (or it cannot be read)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return FinetuneRecipeStatus.model_validate(data or {})
    except (OSError, yaml.YAMLError, ValidationError):
        return None


def write_status(path: Path, status: FinetuneRecipeStatus, recipe: str) -> None:
    """The status as the operator writes it (camelCase, no empty fields), replacing the file atomically."""
    data = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    text = f"# status of {KIND} {recipe}, written by `ftrecipe run`\n" + yaml.safe_dump(data, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def carry_over(
    previous: FinetuneRecipeStatus | None, local: LocalRecipe, forced: frozenset[Phase]
) -> FinetuneRecipeStatus | None:
    """What a new run keeps of the last one's status: conditions (their transition times) and the
    sections of phases whose output is still the current one (their figures); not the run's times."""
    if previous is None:
        return None
    update: dict[str, Any] = {"started_at": None, "completed_at": None}
    for phase in PHASES:
        section = getattr(previous, _SECTION[phase])
        current = section is not None and getattr(section, _URI_FIELD[phase]) == local.prefixes[phase]
        if not current or phase in forced:
            update[_SECTION[phase]] = None
    return previous.model_copy(update=update)


# --------------------------------------------------------------------------------------------- inputs


def complete_bundles(local: LocalRecipe, forced: frozenset[Phase], jobs: Sequence[ObservedJob] = ()) -> World:
    """The planner's world: ``jobs``, and the phases whose bundle is complete (forced phases never count)
    with the figures their manifests carry (an evaluation's accuracy, for the quality gate)."""
    complete: set[str] = set()
    reports: dict[str, PhaseReport] = {}
    for phase in phases(local.spec):
        if phase in forced:
            continue
        settings = S3Settings.from_env({**os.environ, **local.env[phase]}) if local.spec.output.s3 else None
        try:
            manifest = read_manifest(local.prefixes[phase], settings)
        except StorageError as error:
            raise LocalRunError(f"{local.prefixes[phase]}: {error}") from None
        if manifest is not None:
            complete.add(local.hashes[phase])
            reports[local.hashes[phase]] = report_from_metadata(manifest.metadata, local.prefixes[phase])
    return World(jobs=tuple(jobs), complete=frozenset(complete), reports=reports)


def command_paths(local: LocalRecipe, phase: Phase) -> CommandPaths:
    """Where the phase command reads its inputs: the recipe's local assistant as it is, the config files
    in the phase's run folder."""
    run_dir = local.run_dir(phase)
    fetched = run_dir / "inputs" / inputs.ASSISTANT_DIR
    return CommandPaths(
        assistant=str(local.assistant if local.assistant is not None else fetched),
        inputs=str(run_dir / "inputs"),
        cache=str(local.cache_dir),
        work=str(run_dir / "work"),
    )


def phase_args(local: LocalRecipe, phase: Phase) -> list[str]:
    """The phase command's arguments: the Job's, with this machine's paths."""
    spec, prefixes = local.spec, local.prefixes
    if phase == "data":
        return data_args(spec, prefixes["data"], command_paths(local, phase))
    if phase == "train":
        return train_args(
            spec,
            prefixes["train"],
            prefixes["data"],
            local.base_model,
            command_paths(local, phase),
            local.name,
        )
    return evaluate_args(
        spec,
        prefixes["evaluate"],
        prefixes["data"],
        prefixes["train"],
        local.base_model,
        paths=command_paths(local, phase),
    )


def _write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")


def write_inputs(local: LocalRecipe, phase: Phase) -> None:
    """What `fetch-inputs` writes in a Job, from the same functions: the assistant (linked when local,
    fetched from git or S3 otherwise) and llm.yml / rephrase.yml for data (the assistant and llm.yml for
    an evaluation with e2e too), training.yml for train. Raises `inputs.FetchError` when the assistant
    cannot be fetched."""
    folder = local.run_dir(phase) / "inputs"
    if folder.exists():
        shutil.rmtree(folder)  # a link inside is removed, never followed
    folder.mkdir(parents=True)
    spec = local.spec
    if inputs.reads_assistant(spec, phase):
        assistant = folder / inputs.ASSISTANT_DIR
        if local.assistant is not None:  # prompt templates are named relative to the config files
            assistant.symlink_to(local.assistant, target_is_directory=True)
            origin = str(local.assistant)
        else:
            source = spec.assistant.source.s3
            environ = {**os.environ, **(s3_env(source) if source is not None else {})}
            # The E2E evaluation of a git source checks out the commit the data was made from, as a Job does.
            pinned = (
                inputs.recorded_commit(spec, local.prefixes["data"], {**os.environ, **local.env[phase]})
                if inputs.pins_commit(spec, phase)
                else None
            )
            origin = inputs.fetch_assistant(spec, assistant, environ, pinned, record=phase == "data")
        inputs.check_named_paths(spec, assistant, origin, phase)
        _write_yaml(folder / inputs.LLM_CONFIG, inputs.llm_config(spec))
        rephrase = inputs.rephrase_config(spec) if phase == "data" else None
        if rephrase is not None:
            _write_yaml(folder / inputs.REPHRASE_CONFIG, rephrase)
    elif phase == "train":
        _write_yaml(folder / inputs.TRAINING_CONFIG, inputs.training_config(spec))


def forget(local: LocalRecipe, forced: frozenset[Phase]) -> None:
    """For `--from-phase`: a forced train starts over instead of resuming from an identical run's
    checkpoints (in its work folder and under its bundle's checkpoints/)."""
    if "train" not in forced:
        return
    shutil.rmtree(local.run_dir("train") / "work", ignore_errors=True)
    checkpoints = join(parse_location(local.prefixes["train"]), "checkpoints")
    if local.spec.output.local is not None:
        shutil.rmtree(str(checkpoints), ignore_errors=True)
        return
    from ftrecipe.storage import S3Location
    from ftrecipe.storage.s3 import S3Store

    assert isinstance(checkpoints, S3Location)
    store = S3Store(checkpoints, S3Settings.from_env({**os.environ, **local.env["train"]}))
    for name in store.list_files():
        store.delete(name)


# --------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    interrupted: bool
    tail: tuple[str, ...]  # the last non-empty lines it printed


def run_child(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log: Path,
    on_line: Callable[[str], None],
    on_interrupt: Callable[[], None],
) -> ChildResult:
    """Run ``command``, its output (stdout and stderr) line by line to ``log`` and ``on_line``.

    The child gets a session of its own, so a terminal's Ctrl-C reaches only us; we pass it on as SIGTERM
    (train saves a checkpoint on it) and a second Ctrl-C as SIGKILL."""
    tail: deque[str] = deque(maxlen=5)
    interrupted = False
    with log.open("w", encoding="utf-8") as sink:
        sink.write(f"$ {shlex.join(command)}\n")
        sink.flush()
        child = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
        assert child.stdout is not None
        while True:
            try:
                for raw in child.stdout:
                    sink.write(raw)
                    sink.flush()
                    line = raw.rstrip("\n")
                    if line.strip():
                        tail.append(line.strip())
                    on_line(line)
                break
            except KeyboardInterrupt:
                if interrupted:
                    child.kill()
                else:
                    interrupted = True
                    child.terminate()
                    on_interrupt()
        try:
            code = child.wait(timeout=KILL_AFTER_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
    return ChildResult(code, interrupted, tuple(tail))


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (e.g. `kill`, a CI timeout) stops the run like Ctrl-C does."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------------- the loop


def status_progress(phase: Phase, event: Event) -> tuple[ProgressPhase, dict[str, Any]] | None:
    """A progress event as `with_progress` takes it: train's steps, evaluate's answered turns."""
    if phase == "train" and isinstance(event, Steps):
        return "train", event.as_progress()
    if phase == "evaluate" and isinstance(event, Counted):
        progress = {"done": event.done, "total": event.total, "eta_seconds": event.eta_seconds}
        return "evaluate", {"stage": event.stage, **progress}
    return None


@dataclass(frozen=True)
class PhaseOutcome:
    job: ObservedJob
    exit_code: int  # what `ftrecipe run` exits with if the recipe stops here
    interrupted: bool = False


class Runner:
    """Plan, run the phase the plan asks for, observe it, plan again, until the recipe succeeds or fails."""

    def __init__(self, local: LocalRecipe, display: Display, forced: frozenset[Phase]) -> None:
        self.local = local
        self.display = display
        self.forced = forced
        self.status: FinetuneRecipeStatus | None = None
        self.figures: dict[Phase, Mapping[str, Any]] = {}
        self.actions: list[Action] = []
        self.problem: str | None = None  # a line to end with instead of the status message
        self._written = 0.0

    def save(self, status: FinetuneRecipeStatus, *, now: bool = True) -> None:
        self.status = status
        clock = time.monotonic()
        if now or clock - self._written >= STATUS_EVERY_SECONDS:
            write_status(self.local.status_file, status, self.local.name)
            self._written = clock

    def _status(self, actions: Sequence[Action]) -> FinetuneRecipeStatus:
        local = self.local
        return compute_status(
            local.spec, local.generation, actions, prefixes=local.prefixes, now=_now(), previous=self.status
        )

    def run(self) -> int:
        local = self.local
        started = time.monotonic()
        self.status = carry_over(read_status(local.status_file), local, self.forced)
        self.display.begin(local, phases(local.spec))
        try:
            code = self._loop()
        except KeyboardInterrupt:  # between phases: nothing is running
            code = EXIT_INTERRUPTED
            self.save(
                self._status([*self.actions[:-1], Fail(self._current(), "Interrupted", "stopped by Ctrl-C")])
            )
        assert self.status is not None
        figures = status_figures(self.status)
        for phase, reported in self.figures.items():
            figures[phase] = {**figures[phase], **reported}
        self.display.end(summary_rows(self.status, figures, local, time.monotonic() - started))
        if self.status.phase == "Failed" and code == EXIT_OK:
            code = EXIT_FAILED  # e.g. the quality gate
        if self.problem is not None:
            self.display.error(self.problem)
        elif self.status.phase == "Failed" and self.status.message:
            message = self.status.message
            self.display.error(message if message.startswith("error:") else f"error: {message}")
        return code

    def _current(self) -> Phase | None:
        last = self.actions[-1] if self.actions else None
        return last.phase if isinstance(last, CreateJob) else None

    def _loop(self) -> int:
        local = self.local
        forget(local, self.forced)
        jobs: list[ObservedJob] = []
        shown: set[Phase] = set()
        code = EXIT_OK
        while True:
            world = complete_bundles(local, self.forced, jobs)
            actions = self.actions = plan(local.name, local.spec, world, in_cluster=False)
            last = actions[-1]
            for action in actions:
                if isinstance(action, Reuse) and action.phase not in shown:
                    shown.add(action.phase)
                    self.display.cached(action.phase, local.prefixes[action.phase])
            self.save(self._status(actions))
            if not isinstance(last, CreateJob):
                if not isinstance(last, Succeed | Fail):  # Wait and the like: only a cluster's Jobs do that
                    raise RuntimeError(f"unexpected plan for a local run: {actions}")
                return code
            if local.spec.suspend:
                self.problem = (
                    f"{local.file}: spec.suspend is true: nothing runs while a recipe is suspended; "
                    "set it to false"
                )
                return EXIT_USER_ERROR
            if any(job.phase == last.phase for job in jobs):
                raise RuntimeError(f"phase {last.phase} planned twice: {actions}")
            outcome = self._run_phase(last)
            if outcome.interrupted:
                message = outcome.job.message or "stopped by Ctrl-C"
                self.save(self._status([*actions[:-1], Fail(last.phase, "Interrupted", message)]))
                return EXIT_INTERRUPTED
            jobs.append(outcome.job)
            if outcome.job.state == "failed":
                code = outcome.exit_code

    def on_line(self, phase: Phase, line: str) -> None:
        """One line the running phase printed: to the display, and its progress into the status."""
        event = parse_line(line)
        if event is None:
            return
        self.display.progress(phase, event)
        progress = status_progress(phase, event)
        if progress is not None and self.status is not None:
            self.save(with_progress(self.status, *progress), now=False)

    def _run_phase(self, action: CreateJob) -> PhaseOutcome:
        local, phase = self.local, action.phase
        run_dir = local.run_dir(phase)
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "output.log"
        self.display.started(phase, log)
        begun = time.monotonic()

        def failed(
            message: str, code: int, report: PhaseReport | None = None, *, interrupted: bool = False
        ) -> PhaseOutcome:
            self.display.finished(phase, "interrupted" if interrupted else "failed", message)
            job = ObservedJob(
                action.name, phase, action.inputs_hash, "failed", message=message, report=report
            )
            return PhaseOutcome(job, code, interrupted)

        try:
            write_inputs(local, phase)
        except inputs.FetchError as error:
            return failed(str(error), EXIT_USER_ERROR)
        report_file = run_dir / "report.json"
        report_file.write_text("", encoding="utf-8")  # phase commands report only into a file that exists
        env = {
            **os.environ,
            **local.env[phase],
            "PYTHONUNBUFFERED": "1",
            TERMINATION_LOG_ENV: str(report_file),
        }
        cwd = local.assistant if phase == "data" and local.assistant is not None else run_dir
        args = phase_args(local, phase)
        result = run_child(
            [sys.executable, "-m", "ftrecipe.cli.main", *args],
            env=env,
            cwd=cwd,
            log=log,
            on_line=lambda line: self.on_line(phase, line),
            on_interrupt=lambda: self.display.stopping(phase),
        )
        report = decode(report_file.read_text(encoding="utf-8"))
        if result.interrupted:
            said = (
                report.message if report is not None and report.message else f"exit code {result.returncode}"
            )
            seconds = time.monotonic() - begun
            return failed(
                f"stopped by Ctrl-C after {seconds:.0f}s: {said}", EXIT_INTERRUPTED, interrupted=True
            )
        if result.returncode == 0 and (report is None or report.ok):
            figures = dict(report.figures) if report is not None else {}
            self.figures[phase] = figures
            self.display.finished(phase, "done", result_line(phase, figures))
            job = ObservedJob(action.name, phase, action.inputs_hash, "succeeded", report=report)
            return PhaseOutcome(job, EXIT_OK)
        if report is not None and not report.ok and report.message:
            message = report.message
        else:
            last = result.tail[-1] if result.tail else "no output"
            message = f"ftrecipe {args[0]} exited with code {result.returncode}: {last}"
        code = EXIT_USER_ERROR if result.returncode == EXIT_USER_ERROR else EXIT_FAILED
        return failed(message, code, report)


# --------------------------------------------------------------------------------------------- entry


def forced_phases(local: LocalRecipe, from_phase: Phase | None) -> frozenset[Phase]:
    if from_phase is None:
        return frozenset()
    planned = phases(local.spec)
    if from_phase not in planned:
        raise LocalRunError(
            f"{local.file}: --from-phase {from_phase}: the recipe has no {from_phase} phase "
            "(spec.evaluation.enabled is false)"
        )
    return frozenset(planned[planned.index(from_phase) :])


def dry_run(local: LocalRecipe, forced: frozenset[Phase], out: TextIO) -> int:
    """The plan and each phase's command, as a run would have them; nothing is written or run."""
    from ftrecipe.local.display import LABELS

    print(f"ftrecipe run {local.name} ({local.file}): dry run, nothing runs", file=out)
    print(f"{'work folder':<13}{local.workdir} (status in {local.status_file.name})", file=out)
    world = complete_bundles(local, forced)
    jobs: list[ObservedJob] = []
    shown: set[Phase] = set()
    while True:
        actions = plan(local.name, local.spec, replace(world, jobs=tuple(jobs)), in_cluster=False)
        for action in actions:
            if isinstance(action, Reuse) and action.phase not in shown:
                shown.add(action.phase)
                print(f"{LABELS[action.phase]:<13}cached: {local.prefixes[action.phase]}", file=out)
        last = actions[-1]
        if not isinstance(last, CreateJob):
            break
        if local.spec.suspend:
            print(f"{LABELS[last.phase]:<13}suspended (spec.suspend is true): nothing would run", file=out)
            break
        command = shlex.join(["ftrecipe", *phase_args(local, last.phase)])
        print(f"{LABELS[last.phase]:<13}would run: {command}", file=out)
        jobs.append(ObservedJob(last.name, last.phase, last.inputs_hash, "succeeded"))
    return EXIT_OK


def _peek_name(path: Path) -> str | None:
    """metadata.name of a recipe file that does not validate, if it can be read at all."""
    with contextlib.suppress(OSError, yaml.YAMLError, UnicodeDecodeError):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(document, dict) and document.get("kind") == KIND:
                name = (document.get("metadata") or {}).get("name")
                return name if isinstance(name, str) and name else None
    return None


def _record_invalid(options: RunOptions, message: str, name: str | None) -> None:
    """Leave the work folder's status saying the recipe failed, so nothing looks complete; only where
    the folder is known (given, or the default one already exists)."""
    if options.workdir is not None:
        folder = options.workdir
    elif name is not None and (options.recipe.parent / WORKDIR_FOLDER / name).is_dir():
        folder = options.recipe.parent / WORKDIR_FOLDER / name
    else:
        return
    with contextlib.suppress(OSError):
        write_status(folder / STATUS_FILE, invalid_status(message, 1, _now()), name or options.recipe.stem)


def run_recipe(options: RunOptions, display: Display | None = None, out: TextIO | None = None) -> int:
    """`ftrecipe run`: the exit code; bad input is one line per problem on standard error (code 2)."""
    stream = out or sys.stdout
    shown = display or (LineDisplay(stream) if options.dry_run else make_display(stream))
    try:
        recipe = load_recipe(options.recipe)
        local = resolve(recipe, options.recipe, options.workdir)
        forced = forced_phases(local, options.from_phase)
        if options.dry_run:
            return dry_run(local, forced, stream)
    except RecipeError as error:
        _record_invalid(options, "; ".join(error.lines), _peek_name(options.recipe))
        for line in error.lines:
            shown.error(line)
        return EXIT_USER_ERROR
    except LocalRunError as error:
        _record_invalid(options, str(error), _peek_name(options.recipe))
        shown.error(str(error))
        return EXIT_USER_ERROR
    try:
        with sigterm_as_interrupt(), shown:
            return Runner(local, shown, forced).run()
    except LocalRunError as error:
        shown.close()
        shown.error(str(error))
        return EXIT_USER_ERROR
    except OSError as error:  # the work folder or a bundle folder cannot be written
        shown.close()
        shown.error(f"error: {error.filename or local.workdir}: {error.strerror or error}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # between phases: nothing is running
        shown.close()
        shown.error("interrupted")
        return EXIT_INTERRUPTED
