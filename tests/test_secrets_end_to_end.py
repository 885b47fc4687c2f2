"""Secret hygiene end to end: known sentinel values for the LLM key, the hub token and the AWS keys go in
where a user puts them (Secrets the recipe references, for the operator; the environment, for
`ftrecipe run`), and nothing a person or a log collector can read carries one: every operator log line,
Event, the recipe (status included), every Job, every request the operator sent, the phases' output, and
every file under the work and output folders (`status.yaml`, `output.log`, params, reports, bundles)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.k8s import CRD_RESOURCE, K8s
from support.llm_server import LLMServer
from support.moneybank import TableGenerator
from support.s3 import S3Server
from test_operator import (
    JOBS,
    NS,
    apply,
    expected_job,
    finish,
    manifest,
    progress_line,
    report,
)
from test_operator_process import operator_process, wait_until
from test_operator_reuse import s3_env
from test_run import SMALL_TESTS, example_recipe

LLM_KEY = "sk-sentinel-llm-key-5d41402abc4b2a76"
HUB_TOKEN = "hf_sentinelHubToken9b2e6c1fd0a7"
AWS_ACCESS_KEY = "AKIASENTINELACCESS7Q"
AWS_SECRET_KEY = "sentinel/aws+secret/key/3c59dc048e8850243be8"


def forms(value: str) -> list[str]:
    """A value as it may leak: as is, and base64 as a Secret's data holds it."""
    return [value, base64.b64encode(value.encode()).decode()]


def leaks(texts: Iterable[tuple[str, str]], sentinels: Iterable[str]) -> list[str]:
    """`where: sentinel` for every text (with where it came from) that carries a sentinel in any form."""
    found = []
    needles = [form for value in sentinels for form in forms(value)]
    for where, text in texts:
        found += [f"{where}: {needle[:12]}…" for needle in needles if needle in text]
    return found


def files_under(*folders: Path) -> Iterator[tuple[str, str]]:
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                yield str(path), path.read_bytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------- operator


def secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    return {"metadata": {"name": name}, "type": "Opaque", "data": encoded}


def test_the_operator_never_shows_a_secret_value(k8s: K8s, tmp_path: Path, s3_bucket: S3Server) -> None:
    k8s.ensure_namespace(NS)
    k8s.create("v1/secrets", secret("openai", {"api-key": LLM_KEY}), NS)
    k8s.create("v1/secrets", secret("huggingface", {"token": HUB_TOKEN}), NS)
    aws = {"AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": AWS_SECRET_KEY}
    k8s.create("v1/secrets", secret("artifacts-s3", aws), NS)
    body = manifest(
        output={
            "s3": {
                "uri": f"s3://{s3_bucket.bucket}/ftrecipe/",
                "endpoint": s3_bucket.endpoint_url,
                "forcePathStyle": True,
                "credentialsSecretRef": {"name": "artifacts-s3"},
            }
        }
    )
    body["spec"]["commandGenerator"]["llm"]["apiKeySecretRef"] = {"name": "openai", "key": "api-key"}
    body["spec"]["training"]["baseModel"]["huggingFace"]["tokenSecretRef"] = {
        "name": "huggingface",
        "key": "token",
    }
    body["spec"]["evaluation"] = {"enabled": True}
    # The operator's own environment holds keys too (a careless Deployment), and its S3 credentials for
    # --reuse-bundles are real ones: the fixture's random secret key is a sentinel as well.
    env = {**s3_env(s3_bucket), "OPENAI_API_KEY": LLM_KEY, "HF_TOKEN": HUB_TOKEN}
    sentinels = [LLM_KEY, HUB_TOKEN, AWS_ACCESS_KEY, AWS_SECRET_KEY, s3_bucket.secret_key]
    options = ("--reuse-bundles", "--standalone", "--verbose", "--progress-seconds", "1")
    with operator_process(k8s, tmp_path, *options, env=env) as (process, *_, log):
        started = len(k8s.requests())
        apply(k8s, body)
        data = expected_job(body, "data")
        wait_until(lambda: k8s.get(JOBS, data, NS), "the data Job", process)
        finish(k8s, data, "prepare-data", report(True, "data published", num_ft_data_points=8))
        train = expected_job(body, "train")
        wait_until(lambda: k8s.get(JOBS, train, NS), "the train Job", process)
        k8s.set_job_pod(train, NS, "Running", container="train", log=progress_line(3, 6, 1.5, 20) + "\n")
        k8s.set_job_status(train, NS, "running")

        def status() -> dict[str, Any]:
            return dict(((k8s.get(CRD_RESOURCE, "minimal", NS) or {}).get("status")) or {})

        wait_until(lambda: (status().get("training") or {}).get("step") == 3, "training progress", process)
        finish(k8s, train, "train", report(True, "trained", step=6, total_steps=6))
        evaluate = expected_job(body, "evaluate")
        wait_until(lambda: k8s.get(JOBS, evaluate, NS), "the evaluate Job", process)
        finish(
            k8s,
            evaluate,
            "evaluate",
            report(False, "error: the endpoint refused the adapter"),
            state="failed",
        )
        wait_until(lambda: status().get("phase") == "Failed", "phase Failed", process)
        sent = k8s.requests()[started:]

    # The Jobs carry references, which is how the keys reach the pods.
    jobs = [k8s.get(JOBS, name, NS) or {} for name in (data, train, evaluate)]
    main_env = {e["name"]: e for e in jobs[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert main_env["OPENAI_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "openai", "key": "api-key"}}
    assert main_env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "artifacts-s3"
    # The operator never reads a Secret.
    assert not [r for r in sent if r.resource is not None and r.resource.plural == "secrets"]

    texts: list[tuple[str, str]] = [
        (f"operator log line {n}", line) for n, line in enumerate(log.read_text().splitlines())
    ]
    texts += [(f"Event {e['reason']}", json.dumps(e)) for e in k8s.events(NS)]
    texts += [("the recipe", json.dumps(k8s.get(CRD_RESOURCE, "minimal", NS)))]
    texts += [(f"Job {j['metadata']['name']}", json.dumps(j)) for j in jobs]
    texts += [(f"request {r.url.path}", r.text or "") for r in sent]
    logged = [t for where, t in texts if where.startswith("operator log")]
    assert any("reconciled" in line for line in logged)  # the scan read the operator's log
    assert len([r for r in sent if r.method == "POST" and r.text]) >= 3  # and the Jobs it sent
    assert leaks(texts, sentinels) == []


# --------------------------------------------------------------------------------------------- ftrecipe run


@pytest.mark.slow
def test_ftrecipe_run_never_writes_a_secret_value(
    tmp_path: Path, tiny_model: Path, llm_server: LLMServer
) -> None:
    """The example recipe on this machine with the LLM annotator against the scripted LLM, which only
    answers requests that carry the sentinel key: so the key was used, then must be nowhere. A second run
    without the status file reuses both bundles and shows the figures their manifests carry."""
    llm_server.api_key = LLM_KEY
    llm_server.script(TableGenerator())
    llm = {"provider": "self-hosted", "model": "gpt-4o", "apiBase": llm_server.base_url}
    recipe = example_recipe(
        tmp_path / "recipe",
        tiny_model,
        assistant__e2eTests=SMALL_TESTS,
        commandGenerator__llm=llm,
        dataPreparation__annotator="llm",
        training__hyperparameters__epochs=1,
        evaluation__enabled=False,
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPENAI_", "HF_"))},
        "OPENAI_API_KEY": LLM_KEY,
        "HF_TOKEN": HUB_TOKEN,
        "AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET_KEY,
        "OMP_NUM_THREADS": "1",
    }
    workdir = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "ftrecipe.cli.main", "run", str(recipe), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = yaml.safe_load((workdir / "status.yaml").read_text())
    assert status["phase"] == "Succeeded"
    assert status["dataPreparation"]["summary"]["llmCalls"] > 0  # the LLM was asked, with the key
    assert {r.bearer for r in llm_server.requests if r.chat is not None} == {LLM_KEY}

    output = tmp_path / "recipe" / "output"
    scanned = list(files_under(workdir, output))
    names = {Path(where).name for where, _ in scanned}
    assert {"status.yaml", "output.log", "params.yaml", "manifest.json", "adapter_config.json"} <= names
    lines = [
        (f"phase output line {n}", line)
        for n, line in enumerate((result.stdout + result.stderr).splitlines())
    ]
    assert leaks([*lines, *scanned], [LLM_KEY, HUB_TOKEN, AWS_ACCESS_KEY, AWS_SECRET_KEY]) == []

    # Run again, without the status it wrote: both phases are reused, and the status shows the figures
    # their bundles' manifests carry (what --reuse-bundles shows a new recipe in a cluster).
    (workdir / "status.yaml").unlink()
    again = subprocess.run(
        [sys.executable, "-m", "ftrecipe.cli.main", "run", str(recipe), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert again.returncode == 0 and again.stdout.count("cached: ") == 2, again.stdout + again.stderr
    cached = yaml.safe_load((workdir / "status.yaml").read_text())
    assert cached["dataPreparation"]["cached"] and cached["training"]["cached"]
    assert cached["dataPreparation"]["summary"] == status["dataPreparation"]["summary"]
    assert cached["training"]["step"] == status["training"]["step"] > 0
    assert cached["training"]["totalSteps"] == status["training"]["totalSteps"]
    assert cached["training"]["evalLoss"] == status["training"]["evalLoss"]
