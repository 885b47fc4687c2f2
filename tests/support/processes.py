"""Stopping child processes the way Kubernetes stops a pod: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop_gracefully(process: subprocess.Popen[Any], grace_seconds: float = 30.0) -> None:
    """SIGTERM, wait up to ``grace_seconds``, then kill; nothing when it has already exited."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
