"""A bundle directory on a local or mounted filesystem (``ftrecipe run``, a PVC), with S3's guarantees.

Why temp files and ``os.replace``: an S3 PUT is all-or-nothing, a plain file write is not. Writing to a
hidden temp file next to the target, fsyncing it and renaming it over the target gives readers the same
all-or-nothing view, even after a crash or SIGKILL, so the bundle protocol is identical on both kinds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Final

from ftrecipe.storage.errors import AccessDenied, StorageError
from ftrecipe.storage.uri import LocalLocation

_TEMP_MARK: Final = ".ftrecipe-tmp-"
_TEMP_RE: Final = re.compile(r"^\..+\.ftrecipe-tmp-[0-9a-f]{8}$")
_COPY_CHUNK: Final = 1024 * 1024


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our in-flight temp files (left behind only by a killed writer)."""
    return bool(_TEMP_RE.match(name))


@contextlib.contextmanager
def os_errors(action: str, path: Path) -> Iterator[None]:
    """Turn ``OSError`` into a one-line ``StorageError`` naming the action and the path."""
    try:
        yield
    except PermissionError as exc:
        raise AccessDenied(str(path), f"uid {os.getuid()}", exc.strerror or "permission denied") from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StorageError(f"no space left on the device while trying to {action} {path}") from exc
        raise StorageError(f"cannot {action} {path}: {exc.strerror or exc}") from exc


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fsync_dir(path: Path) -> None:
    """Persist renames in ``path`` (a directory entry is only durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(target: Path) -> Path:
    """A fresh hidden temp name next to ``target`` (same filesystem, so ``os.replace`` is atomic)."""
    return target.with_name(f".{target.name}{_TEMP_MARK}{secrets.token_hex(4)}")


def atomic_write(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``target`` through a synced temp file in the same directory, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path(target)
    try:
        with temp.open("xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def remove_temp_files(directory: Path) -> None:
    """Delete temp files a killed writer left in ``directory`` (not recursive; ours only)."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            if is_temp_name(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def copy_file(source: Path, target: Path) -> None:
    """Atomically copy ``source``'s bytes to ``target``."""

    def write(out: BinaryIO) -> None:
        with source.open("rb") as src:
            shutil.copyfileobj(src, out, _COPY_CHUNK)

    atomic_write(target, write)


class LocalStore:
    """One bundle directory, with the operations of ``S3Store`` (same names, same meaning)."""

    def __init__(self, location: LocalLocation) -> None:
        self.location = location
        self.root = location.path
        self._touched: set[Path] = set()  # directories whose entries changed since the last sync
        self._cleaned: set[Path] = set()  # directories already rid of a killed writer's temp files

    def uri(self, relative: str = "") -> str:
        return str(self.root / relative) if relative else str(self.root)

    def _touch(self, path: Path) -> None:
        """Remember the directories whose entries changed (created or renamed into) for ``sync``."""
        parent = path.parent
        while True:
            self._touched.add(parent)
            if parent == self.root or self.root not in parent.parents:
                return
            parent = parent.parent

    def _path(self, relative: str) -> Path:
        return self.root.joinpath(*relative.split("/"))

    def read_bytes(self, relative: str) -> bytes | None:
        path = self._path(relative)
        with os_errors("read", path):
            try:
                return path.read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None

    def write_bytes(self, relative: str, data: bytes, content_type: str) -> None:
        del content_type  # files have no content type
        path = self._path(relative)

        def write(fh: BinaryIO) -> None:
            fh.write(data)

        with os_errors("write", path):
            atomic_write(path, write)
        self._touch(path)

    def upload(self, relative: str, source: Path, sha256: str) -> None:
        del sha256  # a local copy is checked by hashing it, nothing to record
        path = self._path(relative)
        with os_errors("write", path):
            if path.parent not in self._cleaned:
                remove_temp_files(path.parent)
                self._cleaned.add(path.parent)
            copy_file(source, path)
        self._touch(path)

    def stored_sha256(self, relative: str, size: int) -> str | None:
        """The sha256 of the file already there, if it has this size (hashing beats rewriting)."""
        path = self._path(relative)
        with os_errors("read", path):
            try:
                if not path.is_file() or path.stat().st_size != size:
                    return None
                return sha256_file(path)
            except (FileNotFoundError, NotADirectoryError):
                return None

    def list_files(self) -> dict[str, int]:
        found: dict[str, int] = {}
        if not self.root.is_dir():
            return found
        with os_errors("list", self.root):
            for dirpath, _dirs, names in os.walk(self.root):
                for name in names:
                    if is_temp_name(name):
                        continue
                    full = Path(dirpath, name)
                    with contextlib.suppress(FileNotFoundError):
                        found[full.relative_to(self.root).as_posix()] = full.stat().st_size
        return found

    def delete(self, relative: str) -> None:
        """Remove a file and the directories this leaves empty (up to, not including, the root)."""
        path = self._path(relative)
        with os_errors("delete", path):
            path.unlink(missing_ok=True)
            parent = path.parent
            while parent != self.root and self.root in parent.parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
        self._touch(path)

    def download(self, relative: str, target: Path) -> bool:
        source = self._path(relative)
        with os_errors("copy", source):
            try:
                with source.open("rb") as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
            except (FileNotFoundError, NotADirectoryError):
                return False
        return True

    def sync(self) -> None:
        """Make every rename so far durable before the next write (the ``_SUCCESS`` marker) happens."""
        for directory in sorted(self._touched):
            with os_errors("sync", directory), contextlib.suppress(FileNotFoundError):
                fsync_dir(directory)
        self._touched.clear()
