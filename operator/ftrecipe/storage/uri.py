"""Where artifacts live: ``s3://bucket/prefix`` or a local directory (plain path or ``file://``).

Why parse once into frozen values: every later step (keys, error messages, joins) then works on a
validated bucket and a normalised prefix, and a typo fails here with a message naming the input instead
of as an obscure server error after minutes of work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final, TypeAlias
from urllib.parse import unquote, urlsplit

from ftrecipe.storage.errors import StorageError

# S3 bucket naming rules (the common subset AWS and S3-compatible stores accept).
_BUCKET_RE: Final = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_IP_RE: Final = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_FORMS: Final = "use s3://bucket/prefix, file:///abs/path or a plain path"


@dataclass(frozen=True)
class S3Location:
    """A prefix in a bucket; ``key_prefix`` has no leading or trailing slash ("" is the bucket root)."""

    bucket: str
    key_prefix: str = ""

    def key(self, relative: str) -> str:
        """The object key of ``relative`` (a ``/``-separated path) under this prefix."""
        return f"{self.key_prefix}/{relative}" if self.key_prefix else relative

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key_prefix}" if self.key_prefix else f"s3://{self.bucket}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class LocalLocation:
    """A directory on a local or mounted filesystem (a PVC in a pod, a folder for ``ftrecipe run``)."""

    path: Path

    @property
    def uri(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return self.uri


Location: TypeAlias = S3Location | LocalLocation


def _check_segments(parts: list[str], original: str) -> None:
    """Reject empty, ``.`` and ``..`` segments: stores and tools disagree on them, so they are mistakes."""
    for part in parts:
        if part in ("", ".", ".."):
            raise StorageError(f"bad path {original!r}: empty, '.' or '..' segment; {_FORMS}")
        if "\x00" in part:
            raise StorageError(f"bad path {original!r}: NUL character")


def _parse_s3(text: str) -> S3Location:
    rest = text[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket or _IP_RE.match(bucket):
        raise StorageError(
            f"bad S3 URI {text!r}: bucket {bucket!r} is not a valid bucket name "
            f"(3-63 of a-z 0-9 . -, starting and ending with a letter or digit); {_FORMS}"
        )
    prefix = prefix.strip("/")
    if prefix:
        _check_segments(prefix.split("/"), text)
    return S3Location(bucket=bucket, key_prefix=prefix)


def _parse_file_uri(text: str) -> LocalLocation:
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost"):
        raise StorageError(f"bad file URI {text!r}: host {parts.netloc!r} is not local; {_FORMS}")
    if parts.query or parts.fragment:
        raise StorageError(f"bad file URI {text!r}: no query or fragment allowed; {_FORMS}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise StorageError(f"bad file URI {text!r}: the path must be absolute (file:///...); {_FORMS}")
    return LocalLocation(Path(path))


def parse_location(text: str | Path | S3Location | LocalLocation) -> Location:
    """Parse a user-given location; a ``Location`` passes through. Raises ``StorageError`` on bad input."""
    if isinstance(text, S3Location | LocalLocation):
        return text
    if isinstance(text, Path):
        return LocalLocation(text)
    stripped = text.strip()
    if not stripped:
        raise StorageError(f"empty location; {_FORMS}")
    if "\x00" in stripped:
        raise StorageError(f"bad location {stripped!r}: NUL character")
    lowered = stripped.lower()
    if lowered.startswith("s3://"):
        return _parse_s3("s3://" + stripped[len("s3://") :])
    if lowered.startswith("file:"):
        return _parse_file_uri(stripped)
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://", stripped)
    if scheme:
        raise StorageError(f"unsupported scheme {scheme.group(1)!r} in {stripped!r}; {_FORMS}")
    return LocalLocation(Path(stripped).expanduser())


def join(location: Location, *parts: str) -> Location:
    """``location`` extended by ``parts`` (each may hold ``/``); same kind as ``location``."""
    segments = [seg for part in parts for seg in part.split("/") if seg]
    _check_segments(segments, "/".join(parts))
    if isinstance(location, S3Location):
        prefix = "/".join([location.key_prefix, *segments]) if location.key_prefix else "/".join(segments)
        return S3Location(location.bucket, prefix)
    return LocalLocation(location.path.joinpath(*segments))


def check_relative_path(path: str) -> str:
    """Validate a bundle-relative path (``a/b.txt``); it must not escape the bundle once joined."""
    if not path or path.startswith("/") or "\x00" in path:
        raise StorageError(f"bad relative path {path!r} in bundle")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise StorageError(f"bad relative path {path!r} in bundle: empty, '.' or '..' segment")
    if PurePosixPath(path).is_absolute():
        raise StorageError(f"bad relative path {path!r} in bundle")
    return path
