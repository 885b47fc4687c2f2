"""Which bundles lie directly under a prefix (e.g. a training run's `<out>/checkpoints/step-<N>/`).

Only names are returned: whether a bundle is complete is `read_manifest`/`bundle_complete`'s call.
"""

from __future__ import annotations

from pathlib import Path

from ftrecipe.storage.bundle import SUCCESS_NAME, _open_store
from ftrecipe.storage.s3 import S3Settings
from ftrecipe.storage.uri import Location, parse_location


def list_bundles(location: str | Path | Location, settings: S3Settings | None = None) -> list[str]:
    """Sorted names of the direct children of `location` that hold a `_SUCCESS` marker.

    A missing prefix lists as empty; access problems raise `StorageError` like every other call.
    """
    store = _open_store(parse_location(location), settings)
    names = set()
    for relative in store.list_files():
        child, sep, rest = relative.partition("/")
        if sep and rest == SUCCESS_NAME:
            names.add(child)
    return sorted(names)
