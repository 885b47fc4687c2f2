"""`ftrecipe operator --reuse-bundles` end to end: the real prepare-data publishes a bundle to the S3 fixture
at the prefix of the recipe's data phase; the operator process, reading S3 with its real reader, skips the
phase and shows the figures of that bundle's manifest."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from support.k8s import CRD_RESOURCE, K8s
from support.moneybank import EXAMPLE, TESTS
from support.s3 import S3Server
from test_operator import JOBS, NS, apply, condition, expected_job, job_names, manifest, requests_since
from test_operator_process import operator_process, wait_until
from test_phase_hashes_pinned import MINIMAL_HASHES

# What the real prepare-data makes of the example's accounts.yml offline (assertions, no rephrasing):
# 5 tests, all annotated; 8 annotated user turns, so 8 data points: the split puts 4 tests (6 points) in
# train and 1 test (2 points) in validation; no LLM call.
ACCOUNTS_FIGURES = {
    "numInputE2eTests": 5,
    "numAnnotatedConversations": 5,
    "numUserMessagesToRephrase": 8,
    "numPassingRephrasedUserMessages": 0,
    "numFailingRephrasedUserMessages": 0,
    "numFtDataPoints": 8,
    "numTrainDataPoints": 6,
    "numValDataPoints": 2,
    "llmCalls": 0,
}


def s3_env(s3: S3Server) -> dict[str, str]:
    return {**s3.env(), "FTRECIPE_S3_ADDRESSING_STYLE": "path", "AWS_EC2_METADATA_DISABLED": "true"}


def recipe_on(s3: S3Server) -> dict[str, Any]:
    """minimal.yaml with its output in the fixture's bucket (the output is not part of any phase hash)."""
    return manifest(
        output={
            "s3": {"uri": f"s3://{s3.bucket}/ftrecipe/", "endpoint": s3.endpoint_url, "forcePathStyle": True}
        }
    )


def publish_prepared_data(s3: S3Server, prefix: str) -> None:
    """The real `ftrecipe prepare-data` (what the data Job runs), offline, publishing to `prefix`."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftrecipe.cli.main",
            "prepare-data",
            str(TESTS / "accounts.yml"),
            "--assistant",
            str(EXAMPLE),
            "--annotator",
            "assertions",
            "--num-rephrases",
            "0",
            "--out",
            prefix,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **s3_env(s3)},
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_operator_reuses_a_real_prepare_data_bundle_with_its_figures(
    k8s: K8s, tmp_path: Path, s3_bucket: S3Server
) -> None:
    body = recipe_on(s3_bucket)
    # The data phase's prefix, from the pinned hash: <output>/<recipe>/data-<hash12>/.
    prefix = f"s3://{s3_bucket.bucket}/ftrecipe/minimal/data-{MINIMAL_HASHES['data'][:12]}/"
    publish_prepared_data(s3_bucket, prefix)
    objects = s3_bucket.client().list_objects_v2(Bucket=s3_bucket.bucket, Prefix="ftrecipe/minimal/")
    keys = {o["Key"].removeprefix("ftrecipe/minimal/").split("/", 1)[1] for o in objects["Contents"]}
    assert {
        "_SUCCESS",
        "manifest.json",
        "result_summary.yaml",
        "4_train_test_split/ft_splits/train.jsonl",
    } <= keys
    summary = yaml.safe_load(
        s3_bucket.client()
        .get_object(Bucket=s3_bucket.bucket, Key=prefix.split("/", 3)[3] + "result_summary.yaml")["Body"]
        .read()
    )
    assert (summary["num_ft_data_points"], summary["num_train_data_points"]) == (8, 6)

    train = expected_job(body, "train")
    with operator_process(k8s, tmp_path, "--reuse-bundles", "--standalone", env=s3_env(s3_bucket)) as running:
        process, *_, log = running
        first = len(k8s.requests())
        apply(k8s, body)
        wait_until(lambda: k8s.get(JOBS, train, NS), "the train Job", process)

        def training() -> dict[str, Any] | None:
            st = ((k8s.get(CRD_RESOURCE, "minimal", NS) or {}).get("status")) or {}
            return st if st.get("phase") == "Training" else None

        st = wait_until(training, "phase Training", process)
    data = st["dataPreparation"]
    assert data["cached"] is True and data["datasetURI"] == prefix
    assert data["summary"] == ACCOUNTS_FIGURES  # from the bundle's manifest, as prepare-data wrote it
    assert condition(st, "DataPrepared")["reason"] == "Cached"
    # The data phase never ran: its Job was not even asked for.
    assert job_names(k8s) == [train]
    created = [r.data["metadata"]["name"] for r in requests_since(k8s, first, "jobs", "POST")]
    assert created == [train] and expected_job(body, "data") not in created
    assert "Traceback" not in log.read_text()


def test_the_reader_looks_in_the_recipes_own_store_not_the_operators(
    k8s: K8s, tmp_path: Path, s3_bucket: S3Server
) -> None:
    """The operator's environment names another S3 endpoint (nothing listens there) and no path style; the
    recipe's spec.output.s3 (endpoint, forcePathStyle) names the fixture: the bundle is found there."""
    # By host name: virtual-hosted style would ask <bucket>.localhost, which does not resolve, so only the
    # recipe's forcePathStyle makes the read work (for an IP address botocore uses path style anyway).
    body = recipe_on(s3_bucket)
    body["spec"]["output"]["s3"]["endpoint"] = s3_bucket.endpoint_url.replace("127.0.0.1", "localhost")
    prefix = f"s3://{s3_bucket.bucket}/ftrecipe/minimal/data-{MINIMAL_HASHES['data'][:12]}/"
    publish_prepared_data(s3_bucket, prefix)
    with socket.socket() as probe:  # a free port, closed again: the "other store" refuses connections
        probe.bind(("127.0.0.1", 0))
        elsewhere = f"http://127.0.0.1:{probe.getsockname()[1]}"
    operator_env = {
        **s3_bucket.env(),  # the fixture's credentials stand for the operator's own identity
        "AWS_ENDPOINT_URL": elsewhere,
        "AWS_ENDPOINT_URL_S3": elsewhere,
        "FTRECIPE_S3_ADDRESSING_STYLE": "virtual",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    data_job, train = expected_job(body, "data"), expected_job(body, "train")
    with operator_process(k8s, tmp_path, "--reuse-bundles", "--standalone", env=operator_env) as running:
        process, *_, log = running
        apply(k8s, body)
        # Whichever Job comes first: the data Job means the bundle was not found.
        wait_until(
            lambda: k8s.get(JOBS, train, NS) or k8s.get(JOBS, data_job, NS), "the data or train Job", process
        )
        assert job_names(k8s) == [train], log.read_text()[-3000:]
        st = wait_until(
            lambda: ((k8s.get(CRD_RESOURCE, "minimal", NS) or {}).get("status") or {}).get("dataPreparation"),
            "status.dataPreparation",
            process,
        )
    assert st["cached"] is True and st["datasetURI"] == prefix
    assert st["summary"] == ACCOUNTS_FIGURES
    assert "Traceback" not in log.read_text()
