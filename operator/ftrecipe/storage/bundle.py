"""Bundles: how pipeline phases hand a directory of files to each other through storage, all or nothing.

Why this protocol: a reader must never take a half-written output for a finished one. A publisher
therefore (1) removes ``_SUCCESS``, (2) uploads every file, (3) writes ``manifest.json`` listing each
file's size and sha256, and (4) writes ``_SUCCESS`` last. A bundle is complete only when ``_SUCCESS``
exists *and* names the sha256 of the ``manifest.json`` that is there, so a publisher killed at any
point, or one re-publishing right now, leaves something every reader sees as incomplete. Readers
verify every file against the manifest, so bytes damaged or replaced after publishing are caught too.

The same protocol runs on S3 and on local directories (each file written atomically via a temp file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from ftrecipe import __version__
from ftrecipe.storage.errors import BundleIncomplete, ChecksumMismatch, StorageError
from ftrecipe.storage.local import (
    LocalStore,
    fsync_dir,
    os_errors,
    remove_temp_files,
    sha256_file,
    temp_path,
)
from ftrecipe.storage.s3 import S3Settings, S3Store
from ftrecipe.storage.uri import (
    LocalLocation,
    Location,
    S3Location,
    check_relative_path,
    parse_location,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

MANIFEST_NAME: Final = "manifest.json"
SUCCESS_NAME: Final = "_SUCCESS"
RESERVED_NAMES: Final = frozenset({MANIFEST_NAME, SUCCESS_NAME})
_JSON: Final = "application/json"
_HEX64: Final = frozenset("0123456789abcdef")
_UNKNOWN_SHOWN: Final = 5


@dataclass(frozen=True)
class ManifestFile:
    """One file of a bundle: ``path`` is relative with ``/`` separators."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a bundle holds and where it came from; ``created`` is ISO-8601 UTC."""

    files: tuple[ManifestFile, ...]
    producer: str
    version: str
    inputs_hash: str
    created: str
    # What the producer wants readers to know without opening files, e.g. training's base model and
    # dataset hash. JSON-serialisable; empty for bundles that have nothing to add.
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        """The ``manifest.json`` text: files sorted by path, stable key order, UTF-8 names kept readable."""
        document: dict[str, Any] = {
            "files": [
                {"path": f.path, "size": f.size, "sha256": f.sha256}
                for f in sorted(self.files, key=lambda f: f.path)
            ],
            "producer": self.producer,
            "version": self.version,
            "inputs_hash": self.inputs_hash,
            "created": self.created,
        }
        if self.metadata:
            document["metadata"] = dict(self.metadata)
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate (paths may not escape the bundle); ``StorageError`` says what is wrong."""
        try:
            document = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StorageError(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise StorageError("manifest is not a JSON object")
        raw_files = document.get("files")
        if not isinstance(raw_files, list):
            raise StorageError("manifest has no 'files' list")
        files = [_manifest_file(entry, index) for index, entry in enumerate(raw_files)]
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise StorageError("manifest lists a file twice")
        if RESERVED_NAMES & set(paths):
            raise StorageError(f"manifest lists a reserved name ({', '.join(sorted(RESERVED_NAMES))})")
        return cls(
            files=tuple(sorted(files, key=lambda f: f.path)),
            producer=_string(document, "producer"),
            version=_string(document, "version"),
            inputs_hash=_string(document, "inputs_hash"),
            created=_string(document, "created"),
            metadata=_metadata(document),
        )


def _metadata(document: Mapping[str, object]) -> Mapping[str, Any]:
    value = document.get("metadata", {})
    if not isinstance(value, dict):
        raise StorageError("manifest field 'metadata' is not an object")
    return value


def _string(document: Mapping[str, object], field: str) -> str:
    value = document.get(field)
    if not isinstance(value, str):
        raise StorageError(f"manifest field {field!r} is missing or not a string")
    return value


def _manifest_file(entry: object, index: int) -> ManifestFile:
    if not isinstance(entry, dict):
        raise StorageError(f"manifest files[{index}] is not an object")
    path, size, sha = entry.get("path"), entry.get("size"), entry.get("sha256")
    if not isinstance(path, str):
        raise StorageError(f"manifest files[{index}].path is not a string")
    check_relative_path(path)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise StorageError(f"manifest files[{index}].size is not a non-negative integer")
    if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= _HEX64:
        raise StorageError(f"manifest files[{index}].sha256 is not 64 lowercase hex digits")
    return ManifestFile(path=path, size=size, sha256=sha)


class _Store(Protocol):
    """What the protocol needs from a backend (``S3Store``, ``LocalStore``); paths are bundle-relative."""

    def uri(self, relative: str = "") -> str: ...
    def read_bytes(self, relative: str) -> bytes | None: ...
    def write_bytes(self, relative: str, data: bytes, content_type: str) -> None: ...
    def upload(self, relative: str, source: Path, sha256: str) -> None: ...
    def stored_sha256(self, relative: str, size: int) -> str | None: ...
    def list_files(self) -> dict[str, int]: ...
    def delete(self, relative: str) -> None: ...
    def download(self, relative: str, target: Path) -> bool: ...
    def sync(self) -> None: ...


def _open_store(location: Location, settings: S3Settings | None, client: S3Client | None = None) -> _Store:
    if isinstance(location, S3Location):
        return S3Store(location, settings or S3Settings.from_env(), client)
    return LocalStore(location)


def _marker(manifest_bytes: bytes) -> bytes:
    """The ``_SUCCESS`` content: it seals exactly this manifest (a stale or newer one will not match)."""
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    return (json.dumps({"manifest_sha256": digest}) + "\n").encode()


def _read_sealed(store: _Store) -> tuple[Manifest | None, str]:
    """The sealed manifest, or None and why not. Access problems raise: a person must act on those."""
    marker = store.read_bytes(SUCCESS_NAME)
    if marker is None:
        return None, f"no {SUCCESS_NAME} marker"
    raw = store.read_bytes(MANIFEST_NAME)
    if raw is None:
        return None, f"{SUCCESS_NAME} is there but {MANIFEST_NAME} is missing"
    try:
        sealed = json.loads(marker).get("manifest_sha256")
    except (ValueError, UnicodeDecodeError, AttributeError):
        sealed = None
    if not isinstance(sealed, str):
        return None, f"{SUCCESS_NAME} was not written by ftrecipe (no manifest_sha256)"
    if hashlib.sha256(raw).hexdigest() != sealed:
        return None, f"{MANIFEST_NAME} does not match {SUCCESS_NAME} (being re-published?)"
    try:
        return Manifest.from_json(raw), ""
    except StorageError as exc:
        return None, f"{MANIFEST_NAME} is unreadable: {exc}"


def read_manifest(
    location: str | Path | Location, settings: S3Settings | None = None, client: S3Client | None = None
) -> Manifest | None:
    """The bundle's manifest if the bundle is complete, else None (never a half-published one).
    ``client``: a shared S3 client made for ``settings`` (the operator keeps one per store)."""
    return _read_sealed(_open_store(parse_location(location), settings, client))[0]


def bundle_complete(location: str | Path | Location, settings: S3Settings | None = None) -> bool:
    """True only with ``_SUCCESS`` sealing a readable ``manifest.json``; access errors still raise."""
    return read_manifest(location, settings) is not None


@dataclass(frozen=True)
class _SourceFile:
    relative: str
    path: Path
    size: int
    sha256: str
    mtime_ns: int


def _scan_source(source_dir: Path) -> list[_SourceFile]:
    """Every regular file under ``source_dir`` with size and sha256, sorted by relative path.

    Symlinks to files are followed (model caches use them); symlinked directories and special files are
    refused rather than silently skipped, so nothing the producer wrote goes missing unnoticed.
    """
    if not source_dir.is_dir():
        raise StorageError(f"cannot publish {source_dir}: not a directory")
    files: list[_SourceFile] = []

    def walk_error(exc: OSError) -> None:  # os.walk skips unreadable directories unless told otherwise
        with os_errors("list", Path(exc.filename or source_dir)):
            raise exc

    for dirpath, dirnames, filenames in os.walk(source_dir, onerror=walk_error):
        for name in dirnames:
            if Path(dirpath, name).is_symlink():
                raise StorageError(
                    f"cannot publish {Path(dirpath, name)}: symlinked directories are not followed; "
                    "copy it into the source directory"
                )
        for name in filenames:
            path = Path(dirpath, name)
            relative = path.relative_to(source_dir).as_posix()
            if relative in RESERVED_NAMES:
                raise StorageError(
                    f"cannot publish {path}: {name} at the top level is reserved for the bundle protocol"
                )
            try:
                relative.encode("utf-8")
            except UnicodeEncodeError:
                raise StorageError(f"cannot publish {path!r}: the file name is not valid UTF-8") from None
            check_relative_path(relative)
            if not path.is_file():
                raise StorageError(f"cannot publish {path}: not a regular file (broken symlink, socket?)")
            with os_errors("read", path):
                stat = path.stat()
                files.append(_SourceFile(relative, path, stat.st_size, sha256_file(path), stat.st_mtime_ns))
    return sorted(files, key=lambda f: f.relative)


def _check_overlap(source_dir: Path, location: Location) -> None:
    """A local destination inside the source (or the reverse) would publish or delete its own files."""
    if not isinstance(location, LocalLocation):
        return
    source, destination = source_dir.resolve(), location.path.resolve()
    if source == destination or source in destination.parents or destination in source.parents:
        raise StorageError(
            f"cannot publish {source_dir} to {location.path}: one lies inside the other; pick another directory"
        )


def _previous_paths(store: _Store) -> set[str]:
    """Files the last publish (finished or not) listed: the only ones a re-publish may delete."""
    raw = store.read_bytes(MANIFEST_NAME)
    if raw is None:
        return set()
    try:
        return {f.path for f in Manifest.from_json(raw).files}
    except StorageError:
        return set()


def _created_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def publish_bundle(
    source_dir: Path,
    destination: str | Path | Location,
    *,
    producer: str,
    inputs_hash: str,
    settings: S3Settings | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Manifest:
    """Publish every file under ``source_dir`` to ``destination`` as a complete bundle; returns its manifest.

    Re-publishing over an existing prefix is safe: ``_SUCCESS`` goes first, objects whose size and
    sha256 already match are not uploaded again, files of the previous bundle that are not in this one
    are deleted, and ``_SUCCESS`` comes back last. Objects under the prefix that no manifest of ours
    listed are left alone (and logged): the prefix may not be ours alone.
    """
    location = parse_location(destination)
    _check_overlap(source_dir, location)
    files = _scan_source(source_dir)
    store = _open_store(location, settings)
    previous = _previous_paths(store)

    store.delete(SUCCESS_NAME)  # from here on no reader takes this prefix for a complete bundle
    existing = store.list_files()
    # Stale files go before the uploads: locally, an old file "a" would block a new "a/b" otherwise.
    wanted = {item.relative for item in files}
    for stale in sorted((previous - wanted) & existing.keys()):
        store.delete(stale)
        log.info("deleted %s: in the previous bundle, not in this one", store.uri(stale))
    unknown = sorted(existing.keys() - wanted - previous - RESERVED_NAMES)
    if unknown:
        log.warning(
            "%d object(s) under %s belong to no bundle and were left alone, e.g. %s",
            len(unknown),
            store.uri(),
            ", ".join(unknown[:_UNKNOWN_SHOWN]),
        )

    uploaded = 0
    for item in files:
        if existing.get(item.relative) == item.size and (
            store.stored_sha256(item.relative, item.size) == item.sha256
        ):
            log.debug("unchanged, not uploaded again: %s", store.uri(item.relative))
            continue
        store.upload(item.relative, item.path, item.sha256)
        uploaded += 1
        log.debug("uploaded %s (%d bytes)", store.uri(item.relative), item.size)
        with os_errors("read", item.path):
            stat = item.path.stat()
        if (stat.st_size, stat.st_mtime_ns) != (item.size, item.mtime_ns):
            raise StorageError(
                f"{item.path} changed while it was being published; publish once its producer has finished"
            )

    manifest = Manifest(
        files=tuple(ManifestFile(f.relative, f.size, f.sha256) for f in files),
        producer=producer,
        version=__version__,
        inputs_hash=inputs_hash,
        created=_created_now(),
        metadata=dict(metadata or {}),
    )
    manifest_bytes = manifest.to_json().encode("utf-8")
    store.write_bytes(MANIFEST_NAME, manifest_bytes, _JSON)
    store.sync()  # files and manifest durable before the marker that vouches for them
    store.write_bytes(SUCCESS_NAME, _marker(manifest_bytes), _JSON)
    store.sync()
    log.info(
        "published %d file(s), %d bytes (%d uploaded, %d unchanged) to %s",
        len(files),
        manifest.total_size,
        uploaded,
        len(files) - uploaded,
        store.uri(),
    )
    return manifest


def delete_bundle(location: str | Path | Location, settings: S3Settings | None = None) -> int:
    """Delete a bundle: ``_SUCCESS`` first (from then on nobody takes it for complete), then the files its
    manifest lists, then the manifest. Objects no manifest listed are left alone, as in `publish_bundle`.
    Returns how many files were deleted; a missing bundle is not an error (deleting is idempotent)."""
    store = _open_store(parse_location(location), settings)
    listed = _previous_paths(store)
    store.delete(SUCCESS_NAME)
    existing = store.list_files()
    deleted = 0
    for relative in sorted(listed & existing.keys()):
        store.delete(relative)
        deleted += 1
    store.delete(MANIFEST_NAME)
    store.sync()
    if isinstance(store, LocalStore):
        with contextlib.suppress(OSError):  # not empty: someone else's files stay, and so does the folder
            store.root.rmdir()
    if deleted:
        log.info("deleted the bundle at %s (%d file(s))", store.uri(), deleted)
    return deleted


def _fetch_file(store: _Store, item: ManifestFile, target: Path) -> bool:
    """Bring one file to ``target`` verified; False if it was already there with the right bytes."""
    with os_errors("write", target):
        if target.is_file() and target.stat().st_size == item.size and sha256_file(target) == item.sha256:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_path(target)
        try:
            if not store.download(item.path, temp):
                raise BundleIncomplete(
                    store.uri(), f"{item.path} is listed in the manifest but missing; publish it again"
                )
            size = temp.stat().st_size
            if size != item.size:
                raise ChecksumMismatch(store.uri(item.path), "size", f"{item.size} bytes", f"{size} bytes")
            digest = sha256_file(temp)
            if digest != item.sha256:
                raise ChecksumMismatch(store.uri(item.path), "sha256", item.sha256, digest)
            with temp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
    return True


def fetch_bundle(
    source: str | Path | Location,
    destination_dir: Path,
    settings: S3Settings | None = None,
    only: Callable[[str], bool] | None = None,
) -> Manifest:
    """Download a complete bundle's files into ``destination_dir``, each verified, then moved into place.

    Raises ``BundleIncomplete`` when ``source`` is not a sealed bundle and ``ChecksumMismatch`` (naming
    the file) when bytes differ from the manifest. Files already present with the right size and sha256
    are kept, so a retried fetch resumes. Only the bundle's files are written (no manifest or marker);
    with ``only``, only those whose manifest path it accepts (a node that needs a model's config and
    tokenizer but not its weights). The whole manifest is returned.
    """
    store = _open_store(parse_location(source), settings)
    manifest, reason = _read_sealed(store)
    if manifest is None:
        if not store.list_files():
            reason = "nothing at all there: check the URI"
        raise BundleIncomplete(store.uri(), reason)
    targets = [
        (item, destination_dir.joinpath(*item.path.split("/")))
        for item in manifest.files
        if only is None or only(item.path)
    ]
    with os_errors("create", destination_dir):
        destination_dir.mkdir(parents=True, exist_ok=True)
        for directory in {target.parent for _, target in targets}:
            remove_temp_files(directory)  # what a killed fetch left
    fetched = 0
    for item, target in targets:
        fetched += _fetch_file(store, item, target)
    with os_errors("sync", destination_dir):
        fsync_dir(destination_dir)
    log.info(
        "fetched %d file(s), %d bytes (%d already present) from %s to %s",
        len(targets),
        sum(item.size for item, _ in targets),
        len(targets) - fetched,
        store.uri(),
        destination_dir,
    )
    return manifest
