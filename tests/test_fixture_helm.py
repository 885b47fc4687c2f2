"""Smoke tests for the ``helm`` fixture: a real helm v3 that runs offline and keeps out of the user's HOME."""

from __future__ import annotations

import re
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
