"""`ftrecipe fetch-inputs`: what a phase's Job needs on local disk before its main container starts.

The init container of a Job gets the recipe spec as JSON (env ``FTRECIPE_SPEC``: Secret *references*
only, never values) and writes under ``--into``:

* data: ``assistant/`` (the assistant's files from S3, git, a mounted ConfigMap or a mounted PVC),
  ``llm.yml`` (``--llm-config`` of prepare-data) and, when the recipe sets a rephraser, ``rephrase.yml``;
* train: ``training.yml`` (``--config`` of train); the data and the base model are read by train itself;
* evaluate, with ``evaluation.e2e``: ``assistant/`` and ``llm.yml`` as for data (the held-out E2E tests are
  replayed with the adapter in the loop, and their prompts rendered from the flows, the domain and the
  production prompt template); the tests themselves come from the data bundle. Without e2e: nothing.

The data phase's fetch leaves ``assistant.source.yaml`` beside ``assistant/``: where it came from (for git
the URL without credentials, the revision and the commit it resolved to), which prepare-data records in
params.yaml. The evaluation of a git source (``--data``, the data bundle) checks out that commit rather
than the revision, which may have moved since (`recorded_commit`).

The same functions that write the files also say what the Job's command line refers to (see
`ftrecipe.phases.commands`), so the two cannot drift apart. Credentials only ever come from the
environment (secretKeyRefs) or a mounted Secret: never from the command line, never into a file we keep.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Final

import yaml
from pydantic import ValidationError

from ftrecipe.api.v1alpha1 import FinetuneRecipeSpec, GitSource, LLMSpec, PvcPath, added_later_at_default
from ftrecipe.dataprep.assistant_source import PARAMS_KEY, git_record, is_commit, record_path, safe_url
from ftrecipe.plan.cache_key import Phase
from ftrecipe.storage import S3Location, S3Settings, StorageError, parse_location, read_manifest
from ftrecipe.storage.local import LocalStore
from ftrecipe.storage.s3 import S3Store

SPEC_ENV: Final = "FTRECIPE_SPEC"
WORKSPACE: Final = "/workspace"
INPUTS_DIR: Final = f"{WORKSPACE}/inputs"
# Where the Job mounts a ConfigMap / PVC source, and a git ssh Secret; overridable for tests.
CONFIGMAP_ROOT: Final = f"{WORKSPACE}/configmap"
PVC_ROOT: Final = f"{WORKSPACE}/pvc"
GIT_SSH_DIR: Final = f"{WORKSPACE}/git-ssh"
CONFIGMAP_ROOT_ENV: Final = "FTRECIPE_CONFIGMAP_ROOT"
PVC_ROOT_ENV: Final = "FTRECIPE_PVC_ROOT"
GIT_SSH_DIR_ENV: Final = "FTRECIPE_GIT_SSH_DIR"

ASSISTANT_DIR: Final = "assistant"
LLM_CONFIG: Final = "llm.yml"
REPHRASE_CONFIG: Final = "rephrase.yml"
TRAINING_CONFIG: Final = "training.yml"
DATA_PARAMS: Final = "params.yaml"  # prepare-data's parameters in the data bundle (its assistant_source)

# A credential helper that answers from the environment, so a token is never on a command line.
_GIT_CREDENTIAL_HELPER: Final = (
    '!f() { test "$1" = get && printf \'username=%s\\npassword=%s\\n\' "$GIT_USERNAME" "$GIT_PASSWORD"; }; f'
)
_GIT_TIMEOUT: Final = 1800.0


class FetchError(Exception):
    """An input that cannot be fetched; the message is one line for the user (no credentials)."""


# --------------------------------------------------------------------------------------------- spec


def load_spec(text: str) -> FinetuneRecipeSpec:
    """The spec from its JSON form (``FTRECIPE_SPEC``), or one FetchError line."""
    try:
        return FinetuneRecipeSpec.model_validate_json(text)
    except ValidationError as error:
        first = error.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "spec"
        raise FetchError(f"{SPEC_ENV} is not a valid FinetuneRecipe spec: {where}: {first['msg']}") from None


def spec_json(spec: FinetuneRecipeSpec) -> str:
    """The compact, deterministic JSON form the Job carries in ``FTRECIPE_SPEC`` (fields added later left
    out at their earlier value: the pod's parse defaults them, and existing recipes keep their Jobs)."""
    return spec.model_dump_json(by_alias=True, exclude_none=True, exclude=added_later_at_default(spec))


# --------------------------------------------------------------------------------------------- configs


def _rasa_llm(llm: LLMSpec) -> dict[str, Any]:
    """An LLMSpec as a Rasa `llm` block (what `ftrecipe.dataprep.llm.LLMSettings.from_rasa` reads)."""
    block: dict[str, Any] = {"provider": llm.provider, "model": llm.model}
    if llm.api_base is not None:
        block["api_base"] = llm.api_base
    if llm.api_version is not None:
        block["api_version"] = llm.api_version
    block["temperature"] = llm.temperature
    if llm.max_tokens is not None:
        block["max_tokens"] = llm.max_tokens
    block["timeout"] = llm.timeout_seconds
    return block


def _in_assistant(relative: str) -> str:
    """A path inside the assistant folder, relative to the config files next to it."""
    return str(PurePosixPath(ASSISTANT_DIR) / relative)


def llm_config(spec: FinetuneRecipeSpec) -> dict[str, Any]:
    """The `--llm-config` file of prepare-data: what commandGenerator sets of {syntax, prompt_template, llm}.

    Unset fields stay out, so the assistant's config.yml (`--config`, when assistant.config is set) fills
    them in; prepare-data's defaults fill in the rest.
    """
    generator = spec.command_generator
    config: dict[str, Any] = {}
    if generator.syntax is not None:
        config["syntax"] = generator.syntax
    if generator.prompt_template is not None:
        config["prompt_template"] = _in_assistant(generator.prompt_template)
    if generator.llm is not None:
        config["llm"] = _rasa_llm(generator.llm)
    return config


def rephrase_config(spec: FinetuneRecipeSpec) -> dict[str, Any] | None:
    """The `--rephrase-config` file, or None: without it the pipeline uses the generator's LLM and our prompt."""
    rephraser = spec.data_preparation.rephraser
    config: dict[str, Any] = {}
    if rephraser.prompt_template is not None:
        config["prompt_template"] = _in_assistant(rephraser.prompt_template)
    if rephraser.llm is not None:
        config["llm"] = _rasa_llm(rephraser.llm)
    return config or None


def training_config(spec: FinetuneRecipeSpec) -> dict[str, Any]:
    """The `--config` file of train: the recipe's training block; `--base-model` says where the model is."""
    unchanged = added_later_at_default(spec).get("training")  # e.g. parallelism only when not ddp
    block = spec.training.model_dump(by_alias=True, exclude_none=True, mode="json", exclude=unchanged)
    block.pop("baseModel", None)
    return block


# --------------------------------------------------------------------------------------------- fetch


def _write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def _inside(root: Path, relative: str, what: str) -> Path:
    """``root/relative``, refusing paths that climb out of ``root``."""
    target = (root / relative).resolve()
    if target != root.resolve() and root.resolve() not in target.parents:
        raise FetchError(f"{what} {relative!r} points outside {root}")
    return target


def _copy_folder(source: Path, target: Path, what: str) -> None:
    if not source.is_dir():
        raise FetchError(f"{what}: {source} is not a folder")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".git"))


def _fetch_s3(uri: str, target: Path, environ: Mapping[str, str]) -> int:
    location = parse_location(uri)
    if not isinstance(location, S3Location):
        raise FetchError(f"{uri}: not an s3:// URI")
    store = S3Store(location, S3Settings.from_env(environ))
    files = {name: size for name, size in store.list_files().items() if not name.endswith("/")}
    if not files:
        raise FetchError(
            f"no files under {location.uri}/ (at {store.endpoint}): check the assistant's s3.uri"
        )
    target.mkdir(parents=True)
    for name in sorted(files):
        path = _inside(target, name, "S3 key")
        path.parent.mkdir(parents=True, exist_ok=True)
        if not store.download(name, path):
            raise FetchError(f"{store.uri(name)} disappeared while it was being downloaded; retry")
    return len(files)


def _git_env(environ: Mapping[str, str], scratch: Path) -> tuple[dict[str, str], list[str]]:
    """Environment and `-c` options for git: credentials from env (https) or a mounted key (ssh)."""
    env = dict(environ)
    env["GIT_TERMINAL_PROMPT"] = "0"
    options = ["-c", "advice.detachedHead=false"]
    if environ.get("GIT_USERNAME") or environ.get("GIT_PASSWORD"):
        options += ["-c", "credential.helper=", "-c", f"credential.helper={_GIT_CREDENTIAL_HELPER}"]
    ssh_dir = Path(environ.get(GIT_SSH_DIR_ENV) or GIT_SSH_DIR)
    key = ssh_dir / "ssh-privatekey"
    if key.is_file():
        # A mounted Secret is group-readable under fsGroup; ssh wants a key only its owner can read.
        private = scratch / "ssh-key"
        private.write_bytes(key.read_bytes())
        private.chmod(0o600)
        known_hosts = ssh_dir / "known_hosts"
        checking = (
            f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes"
            if known_hosts.is_file()
            else f"-o UserKnownHostsFile={scratch / 'known_hosts'} -o StrictHostKeyChecking=accept-new"
        )
        env["GIT_SSH_COMMAND"] = f"ssh -i {private} -o IdentitiesOnly=yes {checking}"
    return env, options


def _head_commit(checkout: Path, env: Mapping[str, str]) -> str:
    """The commit checked out (`git rev-parse HEAD`): what the data was made from, recorded beside it."""
    done = _git(["rev-parse", "HEAD"], env, checkout)
    commit = done.stdout.strip() if not isinstance(done, str) else ""
    if isinstance(done, str) or done.returncode != 0 or not is_commit(commit):
        why = done if isinstance(done, str) else done.stderr.strip() or repr(commit)
        raise FetchError(f"git rev-parse HEAD in the clone failed: {why}")
    return commit


def _git(
    args: list[str], env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str] | str:
    """Run git: the finished process, or why it could not run."""
    try:
        return subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        return "git is not installed in this image"
    except subprocess.TimeoutExpired:
        return f"timed out after {_GIT_TIMEOUT:g}s"


def _run_git(args: list[str], env: Mapping[str, str], cwd: Path | None = None) -> str | None:
    """Run git; None on success, else the last line of its error output (credentials masked)."""
    done = _git(args, env, cwd)
    if isinstance(done, str):
        return done
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    message = lines[-1] if lines else f"exit code {done.returncode}"
    for secret in (env.get("GIT_PASSWORD"), env.get("GIT_USERNAME")):
        if secret:
            message = message.replace(secret, "***")
    return message


def _fetch_git(source: GitSource, target: Path, environ: Mapping[str, str], pinned: str | None = None) -> str:
    """Check out ``source`` (or, ``pinned``, that commit: the one the data was made from) and copy its
    folder to ``target``; returns the commit checked out."""
    where = f"git clone of {safe_url(source.url)} at {source.revision}"
    with tempfile.TemporaryDirectory(prefix="ftrecipe-git-", dir=target.parent) as scratch_name:
        scratch = Path(scratch_name)
        env, options = _git_env(environ, scratch)
        checkout = scratch / "checkout"
        # A branch or tag: one shallow clone. A commit SHA cannot be named by --branch: clone, then check out.
        failed = (
            "pinned to a commit"
            if pinned is not None
            else _run_git(
                [
                    *options,
                    "clone",
                    "--quiet",
                    "--depth",
                    "1",
                    "--branch",
                    source.revision,
                    "--",
                    source.url,
                    str(checkout),
                ],
                env,
            )
        )
        if failed is not None:
            shutil.rmtree(checkout, ignore_errors=True)
            failed = _run_git(
                [*options, "clone", "--quiet", "--no-checkout", "--", source.url, str(checkout)], env
            )
            if failed is None:
                failed = _run_git(
                    [*options, "checkout", "--quiet", "--detach", pinned or source.revision], env, checkout
                )
                if failed is not None and pinned is not None:
                    raise FetchError(
                        f"{where}: commit {pinned}, which the data bundle was prepared from, is no longer in "
                        "the repository (force-pushed away?): pin assistant.source.git.revision to a commit "
                        "that exists, so that the data phase runs again on it"
                    )
        if failed is not None:
            raise FetchError(f"{where} failed: {failed}")
        commit = _head_commit(checkout, env)
        folder = _inside(checkout, source.path, "git path")
        if not folder.is_dir():
            raise FetchError(f"{where}: no folder {source.path!r} in the repository")
        _copy_folder(folder, target, where)
        return commit


def _fetch_config_map(target: Path, root: Path) -> int:
    """Copy a mounted ConfigMap's keys (skipping the kubelet's `..data` bookkeeping entries)."""
    names = sorted(p.name for p in root.iterdir() if not p.name.startswith("..")) if root.is_dir() else []
    files = [name for name in names if (root / name).is_file()]
    if not files:
        raise FetchError(
            f"the ConfigMap mounted at {root} has no keys: check assistant.source.configMap.name"
        )
    target.mkdir(parents=True)
    for name in files:
        shutil.copyfile(root / name, target / name)
    return len(files)


def _fetch_pvc(source: PvcPath, target: Path, root: Path) -> None:
    folder = _inside(root, source.path, "pvc path")
    if not folder.is_dir():
        raise FetchError(
            f"no folder {source.path!r} on PersistentVolumeClaim {source.claim_name} (mounted at {root})"
        )
    _copy_folder(folder, target, f"PersistentVolumeClaim {source.claim_name}")


def fetch_assistant(
    spec: FinetuneRecipeSpec,
    target: Path,
    environ: Mapping[str, str],
    pinned: str | None = None,
    *,
    record: bool = True,
) -> str:
    """Materialise the assistant's files in ``target`` (replaced if there); returns a line saying from
    where. ``pinned``: the commit to check out instead of a git source's revision (`recorded_commit`, the
    one the data was made from). ``record``: leave what it was fetched from beside it (`record_path`:
    the kind; for git the URL without credentials, revision, folder and commit), which prepare-data
    copies into params.yaml (the data phase's fetch; the evaluation's has no use for it)."""
    source = spec.assistant.source
    if target.exists():
        shutil.rmtree(target)
    record_file = record_path(target)
    assert record_file is not None  # target is a named folder
    record_file.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    fetched: dict[str, str]
    if source.s3 is not None:
        count = _fetch_s3(source.s3.uri, target, environ)
        fetched, origin = {"kind": "s3"}, f"{count} file(s) from {source.s3.uri}"
    elif source.git is not None:
        git = source.git
        commit = _fetch_git(git, target, environ, pinned)
        pin = f", pinned to {pinned} by the data bundle" if pinned is not None else ""
        fetched = git_record(git.url, git.revision, git.path, commit)
        origin = f"{safe_url(git.url)} at {git.revision}{pin}, folder {git.path}"
    elif source.config_map is not None:
        count = _fetch_config_map(target, Path(environ.get(CONFIGMAP_ROOT_ENV) or CONFIGMAP_ROOT))
        fetched, origin = {"kind": "configMap"}, f"{count} key(s) of ConfigMap {source.config_map.name}"
    elif source.pvc is not None:
        _fetch_pvc(source.pvc, target, Path(environ.get(PVC_ROOT_ENV) or PVC_ROOT))
        fetched = {"kind": "pvc"}
        origin = f"PersistentVolumeClaim {source.pvc.claim_name}, folder {source.pvc.path}"
    else:
        raise FetchError(
            "assistant.source.local is for `ftrecipe run` on one machine; in a cluster use s3, git, configMap "
            "or pvc"
        )
    if record:
        _write_yaml(record_file, fetched)
    return origin


def pins_commit(spec: FinetuneRecipeSpec, phase: Phase) -> bool:
    """Whether ``phase``'s fetch checks out the commit the data bundle records rather than the revision:
    the E2E evaluation of a git source (a branch may have moved since the data was prepared)."""
    return phase == "evaluate" and spec.evaluation.e2e and spec.assistant.source.git is not None


def _data_params(data: str, environ: Mapping[str, str]) -> Mapping[str, Any]:
    """The data bundle's params.yaml (complete bundles only, its bytes checked against the manifest)."""
    try:
        location = parse_location(data)
        settings = S3Settings.from_env(environ)
        manifest = read_manifest(location, settings)
        if manifest is None:
            raise FetchError(
                f"--data {data}: not a complete data bundle (no _SUCCESS); run the data phase first"
            )
        entry = next((item for item in manifest.files if item.path == DATA_PARAMS), None)
        store = S3Store(location, settings) if isinstance(location, S3Location) else LocalStore(location)
        raw = store.read_bytes(DATA_PARAMS) if entry is not None else None
    except StorageError as error:
        raise FetchError(f"--data {data}: {error}") from None
    if entry is None or raw is None:
        return {}
    if hashlib.sha256(raw).hexdigest() != entry.sha256:
        raise FetchError(
            f"{store.uri(DATA_PARAMS)} does not match the bundle's manifest; re-run the data phase"
        )
    try:
        loaded = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise FetchError(f"{store.uri(DATA_PARAMS)}: not readable YAML: {error}") from None
    return loaded if isinstance(loaded, dict) else {}


def recorded_commit(spec: FinetuneRecipeSpec, data: str, environ: Mapping[str, str]) -> str | None:
    """The commit the data bundle at ``data`` was prepared from (params.yaml's ``assistant_source``), for a
    git source; None for other sources and for a bundle from before the record."""
    if spec.assistant.source.git is None:
        return None
    record = _data_params(data, environ).get(PARAMS_KEY)
    if not isinstance(record, dict) or record.get("kind") != "git":
        return None
    commit = record.get("commit")
    if not is_commit(commit):
        raise FetchError(f"--data {data}: {DATA_PARAMS} records {PARAMS_KEY}.commit {commit!r}, not a commit")
    assert isinstance(commit, str)
    return commit


def reads_assistant(spec: FinetuneRecipeSpec, phase: Phase) -> bool:
    """Whether ``phase`` reads the assistant's files and ``llm.yml``: data always; evaluate when
    ``evaluation.e2e`` replays the held-out E2E tests (their prompts need the flows, the domain and the
    production prompt template, as prepare-data rendered them)."""
    return phase == "data" or (phase == "evaluate" and spec.evaluation.e2e)


def named_paths(spec: FinetuneRecipeSpec, phase: Phase = "data") -> list[tuple[str, str]]:
    """(field, path) of every file or folder the spec names inside the assistant's files that ``phase``
    reads: data all of them; the E2E evaluation the Rasa config, endpoints and prompt template only (its
    tests come from the data bundle, the rephraser is data preparation's alone)."""
    named = [("assistant.e2eTests", path) for path in spec.assistant.e2e_tests] if phase == "data" else []
    for field_name, path in (
        ("assistant.config", spec.assistant.config),
        ("assistant.endpoints", spec.assistant.endpoints),
        ("commandGenerator.promptTemplate", spec.command_generator.prompt_template),
    ):
        if path is not None:
            named.append((field_name, path))
    rephraser_template = spec.data_preparation.rephraser.prompt_template
    if phase == "data" and rephraser_template is not None:
        named.append(("dataPreparation.rephraser.promptTemplate", rephraser_template))
    return named


def check_named_paths(spec: FinetuneRecipeSpec, root: Path, origin: str, phase: Phase = "data") -> None:
    """FetchError naming the recipe field of the first path that is not among the assistant's files:
    said before any LLM call, in the recipe's words rather than the Job's paths."""
    for field_name, path in named_paths(spec, phase):
        if not (root / path.strip("/")).exists():
            raise FetchError(
                f"{field_name}: {path} is not among the assistant's files ({origin}); fix the path or add it"
            )


def fetch_inputs(
    spec: FinetuneRecipeSpec,
    phase: Phase,
    into: Path,
    environ: Mapping[str, str] | None = None,
    data: str | None = None,
) -> list[str]:
    """Write what ``phase``'s main container reads under ``into``; returns one line per thing written.
    ``data`` (evaluate, `pins_commit`): the data bundle, whose recorded commit is checked out."""
    env = os.environ if environ is None else environ
    into.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    try:
        if phase == "data":
            origin = fetch_assistant(spec, into / ASSISTANT_DIR, env)
            check_named_paths(spec, into / ASSISTANT_DIR, origin)
            written.append(f"{into / ASSISTANT_DIR}: {origin}")
            _write_yaml(into / LLM_CONFIG, llm_config(spec))
            written.append(str(into / LLM_CONFIG))
            rephrase = rephrase_config(spec)
            if rephrase is not None:
                _write_yaml(into / REPHRASE_CONFIG, rephrase)
                written.append(str(into / REPHRASE_CONFIG))
        elif phase == "train":
            _write_yaml(into / TRAINING_CONFIG, training_config(spec))
            written.append(str(into / TRAINING_CONFIG))
        elif reads_assistant(spec, phase):  # evaluate --e2e
            pinned = (
                recorded_commit(spec, data, env) if data is not None and pins_commit(spec, phase) else None
            )
            origin = fetch_assistant(spec, into / ASSISTANT_DIR, env, pinned, record=False)
            if pinned is None and data is not None and pins_commit(spec, phase):
                origin += " (the data bundle records no commit: the revision as it is now)"
            check_named_paths(spec, into / ASSISTANT_DIR, origin, phase)
            written.append(f"{into / ASSISTANT_DIR}: {origin}")
            _write_yaml(into / LLM_CONFIG, llm_config(spec))
            written.append(str(into / LLM_CONFIG))
    except StorageError as error:
        raise FetchError(str(error)) from None
    except OSError as error:
        raise FetchError(f"{error.filename or into}: {error.strerror or error}") from None
    return written
