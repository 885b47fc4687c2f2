"""One canonical hash for everything that names or keys work by its inputs: the phase bundles (`plan`),
prepare-data's caches and the phase commands' inputs hashes, so they agree on every machine."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(data: Any) -> str:
    """sha256 of a canonical JSON form (sorted keys, no whitespace), the same on every machine."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
