"""The real helm v3 binary for tests (fixtures ``helm``, ``helm_env``; helper ``run_helm``).

Why: the operator ships a Helm chart; rendering and linting it with the real helm catches what reading
YAML does not. helm is not a Python package, so ``bash scripts/fetch-helm.sh`` puts one in
``.cache/helm/helm``; without it (or ``HELM_BIN``, or helm v3 on PATH) the tests that need it fail, unless
the developer opted out with ``FTRECIPE_TESTS_WITHOUT=helm`` (tests/skips.py: skip ``without-helm``).

helm runs with HOME, the XDG dirs and HELM_*_HOME in a tmp dir and no inherited KUBECONFIG/HELM_*, so
it never reads or writes the user's repositories, plugins, registry logins or clusters.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

import pytest

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
CACHED_HELM: Final = REPO_ROOT / ".cache" / "helm" / "helm"
FETCH_HINT: Final = "run `bash scripts/fetch-helm.sh` (or set HELM_BIN, or put helm v3 on PATH)"
_PROBE_TIMEOUT: Final = 30.0


def _candidates() -> list[tuple[str, Path]]:
    """Where helm may be, in order of preference: the repo's cache, ``$HELM_BIN``, PATH."""
    found: list[tuple[str, Path]] = [(".cache/helm/helm", CACHED_HELM)]
    if env_bin := os.environ.get("HELM_BIN"):
        found.append(("$HELM_BIN", Path(env_bin)))
    if on_path := shutil.which("helm"):
        found.append(("PATH", Path(on_path)))
    return found


def isolated_env(root: Path) -> dict[str, str]:
    """A full environment for helm with every config/cache/data dir under ``root``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HELM_", "XDG_")) and k not in {"KUBECONFIG", "HOME"}
    }
    dirs = {
        "HOME": root / "home",
        "XDG_CONFIG_HOME": root / "config",
        "XDG_CACHE_HOME": root / "cache",
        "XDG_DATA_HOME": root / "data",
        "HELM_CONFIG_HOME": root / "config" / "helm",
        "HELM_CACHE_HOME": root / "cache" / "helm",
        "HELM_DATA_HOME": root / "data" / "helm",
    }
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    # An empty kubeconfig: commands that need a cluster fail fast instead of using the user's.
    kubeconfig = root / "kubeconfig"
    kubeconfig.touch()
    env["KUBECONFIG"] = str(kubeconfig)
    return env


def run_helm(
    helm: Path,
    env: dict[str, str],
    *args: str | os.PathLike[str],
    check: bool = True,
    timeout: float = 120.0,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run helm with the isolated env; on failure the error shows helm's stderr, not just the exit code."""
    proc = subprocess.run(
        [str(helm), *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def _probe(binary: Path, env: dict[str, str]) -> str:
    """``helm version --short`` of ``binary``, or why it cannot be used."""
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return "absent"
    try:
        proc = run_helm(binary, env, "version", "--short", check=False, timeout=_PROBE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"does not run ({exc})"
    version = proc.stdout.strip()
    if proc.returncode != 0:
        return f"does not run (exit {proc.returncode}: {proc.stderr.strip()[:200]})"
    return version


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment to run helm with (HOME, XDG, HELM_*_HOME, KUBECONFIG all in a tmp dir)."""
    return isolated_env(tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def helm(helm_env: dict[str, str]) -> Path:
    """Path of a working helm v3 binary. Without one the test skips with how to get one, and the skip policy
    (tests/skips.py) turns that skip into a failure unless the developer opted out of helm."""
    tried: list[str] = []
    for where, binary in _candidates():
        version = _probe(binary, helm_env)
        if version.startswith("v3."):
            return binary
        tried.append(f"{where} ({binary}): {version}")
    pytest.skip(f"helm v3 not available; {FETCH_HINT}. Tried: " + "; ".join(tried))
