"""What the data was made from: the assistant's source and the files that decide its prompts and replay.

`fetch-inputs` leaves a record beside the assistant folder it fetched (``<folder>.source.yaml``: the kind of
source and, for git, the URL without credentials, the revision, the folder and the commit it resolved to).
prepare-data adds a digest of the files that decide prompts and the replay and writes the whole into
params.yaml (``assistant_source``); `evaluate --e2e` recomputes the digest over the assistant it is given
and refuses one that differs, naming the first differing file.

The digested files are those the flows, the domain and the sub-agents were read from
(`Assistant.files`: every YAML file below the folder with a top-level `flows:` or a domain key, and
`sub_agents/*/config.yml`), plus the Rasa config and endpoints files when given (`--config`,
`--endpoints`: the command generator's settings). E2E test files, other YAML and the prompt template are
not (the template has its own sha256 in params.yaml; the tests replayed come from the data bundle).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import yaml

from ftrecipe.dataprep.assistant import Assistant
from ftrecipe.dataprep.yamlfile import InputError
from ftrecipe.hashing import stable_hash

PARAMS_KEY: Final = "assistant_source"  # params.yaml's key
RECORD_SUFFIX: Final = ".source.yaml"  # fetch-inputs' record beside the assistant folder
KINDS: Final = frozenset({"git", "s3", "configMap", "pvc", "local"})
_GIT_FIELDS: Final = ("url", "revision", "path", "commit")
_COMMIT: Final = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


def record_path(assistant: Path) -> Path | None:
    """Where fetch-inputs leaves its record for ``assistant``: ``<folder>.source.yaml`` beside it (the
    folder as named, not resolved: a local run links the assistant folder into its inputs)."""
    folder = assistant.absolute()
    return folder.with_name(folder.name + RECORD_SUFFIX) if folder.name else None


def safe_url(url: str) -> str:
    """The URL without user name or password: a record is kept and shown, credentials never."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def is_commit(value: object) -> bool:
    """A full commit id (SHA-1 or SHA-256), as `git rev-parse HEAD` prints it."""
    return isinstance(value, str) and _COMMIT.match(value) is not None


def git_record(url: str, revision: str, path: str, commit: str) -> dict[str, str]:
    return {"kind": "git", "url": safe_url(url), "revision": revision, "path": path, "commit": commit}


def read_fetch_record(assistant: Path) -> dict[str, str]:
    """fetch-inputs' record for ``assistant``, or ``{kind: local}`` where there is none (prepare-data run
    on a folder of one's own); InputError naming the file for a record that is not one."""
    path = record_path(assistant)
    if path is None or not path.is_file():
        return {"kind": "local"}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise InputError(f"{path}: cannot read the assistant's source record: {error}") from None
    kind = loaded.get("kind") if isinstance(loaded, dict) else None
    if kind not in KINDS:
        raise InputError(f"{path}: kind must be one of {', '.join(sorted(KINDS))}, not {kind!r}")
    if kind != "git":
        return {"kind": str(kind)}
    missing = [name for name in _GIT_FIELDS if not isinstance(loaded.get(name), str)]
    if missing or not is_commit(loaded["commit"]):
        field = missing[0] if missing else "commit"
        raise InputError(f"{path}: {field} is missing or not valid; fetch the assistant again")
    return git_record(loaded["url"], loaded["revision"], loaded["path"], loaded["commit"])


def _key(path: Path, root: Path, flag: str) -> str:
    """A file's name in the digest: relative to the assistant folder, else the flag that named it."""
    for candidate, base in ((path.absolute(), root.absolute()), (path.resolve(), root.resolve())):
        if candidate.is_relative_to(base):
            return candidate.relative_to(base).as_posix()
    return f"{flag} {path.name}"


def replay_files(
    root: Path, assistant: Assistant, config: Path | None = None, endpoints: Path | None = None
) -> dict[str, str]:
    """sha256 of each file that decides prompts and the replay, by its name (sorted)."""
    files = {_key(path, root, "--assistant"): path for path in assistant.files}
    for flag, path in (("--config", config), ("--endpoints", endpoints)):
        if path is not None:
            files[_key(path, root, flag)] = path
    return {name: hashlib.sha256(files[name].read_bytes()).hexdigest() for name in sorted(files)}


def source_record(fetched: Mapping[str, str], files: Mapping[str, str]) -> dict[str, Any]:
    """params.yaml's ``assistant_source``: the fetch record, the digest over the files and each file's sha256."""
    return {**fetched, "files_sha256": stable_hash(dict(files)), "files": dict(files)}


def first_difference(recorded: Mapping[str, Any], actual: Mapping[str, str]) -> str | None:
    """The first file (by name) whose content differs, said as ``NAME changed|is new|is gone``; None if none."""
    for name in sorted(set(recorded) | set(actual)):
        if name not in actual:
            return f"{name} is gone"
        if name not in recorded:
            return f"{name} is new"
        if recorded[name] != actual[name]:
            return f"{name} changed"
    return None


def describe(record: Mapping[str, Any]) -> str:
    """Where the recorded assistant came from, for messages: ``git commit 3f2c1e9a7b5d at main`` or the kind."""
    if record.get("kind") == "git":
        return f"git {record.get('url')} at {record.get('revision')}, commit {record.get('commit')}"
    return f"a {record.get('kind', 'local')} source"
