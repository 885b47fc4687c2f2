"""Smoke tests for the ``s3``/``s3_bucket`` fixtures: the SeaweedFS server behaves like S3 where ftrecipe needs it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from support.s3 import S3Server

MiB = 1024 * 1024


def test_put_get_list(s3_bucket: S3Server) -> None:
    client = s3_bucket.client()
    bucket = s3_bucket.bucket
    for key in ("data/train.jsonl", "data/eval.jsonl", "adapters/a1/adapter.safetensors"):
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())

    assert client.get_object(Bucket=bucket, Key="data/eval.jsonl")["Body"].read() == b"data/eval.jsonl"
    listed = client.list_objects_v2(Bucket=bucket, Prefix="data/")
    assert sorted(o["Key"] for o in listed.get("Contents", [])) == ["data/eval.jsonl", "data/train.jsonl"]
    with pytest.raises(ClientError) as missing:
        client.get_object(Bucket=bucket, Key="data/nope.jsonl")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"


def test_session_bucket_exists(s3: S3Server) -> None:
    client = s3.client()
    client.head_bucket(Bucket=s3.bucket)
    assert s3.bucket in {b["Name"] for b in client.list_buckets()["Buckets"]}


def test_multipart_upload_round_trip(s3_bucket: S3Server, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    payload = os.urandom(11 * MiB + 12345)  # two parts: 8 MiB and the rest
    src.write_bytes(payload)
    client = s3_bucket.client()
    config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB)

    client.upload_file(str(src), s3_bucket.bucket, "big.bin", Config=config)

    head = client.head_object(Bucket=s3_bucket.bucket, Key="big.bin")
    assert head["ContentLength"] == len(payload)
    assert head["ETag"].strip('"').endswith("-2"), head["ETag"]  # multipart ETag: md5-of-md5s "-<parts>"
    dst = tmp_path / "back.bin"
    client.download_file(s3_bucket.bucket, "big.bin", str(dst), Config=config)
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(payload).digest()


def test_wrong_secret_is_rejected(s3: S3Server) -> None:
    client = s3.client(secret_key="wrong-" + s3.secret_key, max_attempts=1)
    with pytest.raises(ClientError) as denied:
        client.put_object(Bucket=s3.bucket, Key="intruder.txt", Body=b"x")
    assert denied.value.response["Error"]["Code"] in {"AccessDenied", "SignatureDoesNotMatch"}
    with pytest.raises(ClientError) as denied:
        client.list_objects_v2(Bucket=s3.bucket)
    assert denied.value.response["Error"]["Code"] in {"AccessDenied", "SignatureDoesNotMatch"}


def test_unknown_access_key_is_rejected(s3: S3Server) -> None:
    client = replace(s3, access_key="nobody").client(max_attempts=1)
    with pytest.raises(ClientError) as denied:
        client.list_buckets()
    assert denied.value.response["Error"]["Code"] in {"AccessDenied", "InvalidAccessKeyId"}


def test_missing_bucket_is_not_auto_created(s3: S3Server) -> None:
    client = s3.client(max_attempts=1)
    with pytest.raises(ClientError) as missing:
        client.put_object(Bucket="no-such-bucket-ftrecipe", Key="k", Body=b"x")
    assert missing.value.response["Error"]["Code"] == "NoSuchBucket"


def test_env_drives_a_subprocess(s3_bucket: S3Server) -> None:
    """What the operator's child processes see: only the AWS_* env vars, a plain ``boto3.client("s3")``."""
    s3_bucket.client().put_object(Bucket=s3_bucket.bucket, Key="hello.txt", Body=b"from the fixture")
    code = (
        "import boto3, json, sys\n"
        "c = boto3.client('s3')\n"
        "b = sys.argv[1]\n"
        "c.put_object(Bucket=b, Key='child.txt', Body=b'from the child')\n"
        "print(json.dumps(c.get_object(Bucket=b, Key='hello.txt')['Body'].read().decode()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_bucket.env()
    out = subprocess.run(
        [sys.executable, "-c", code, s3_bucket.bucket],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert json.loads(out) == "from the fixture"
    body = s3_bucket.client().get_object(Bucket=s3_bucket.bucket, Key="child.txt")["Body"].read()
    assert body == b"from the child"
