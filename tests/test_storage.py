"""Artifact storage: bundles on a real S3 server (SeaweedFS) and on local directories, same tests for both.

What users fear most is a half-written output that looks complete, so the protocol is tested the hard
way: a publisher in a subprocess is SIGKILLed mid-publish, and stored bytes are damaged behind its back.
S3 tests reach the server only through the ``AWS_*`` env and boto3's default credential chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest

import ftrecipe
from ftrecipe.storage import (
    MANIFEST_NAME,
    SUCCESS_NAME,
    AccessDenied,
    BucketMissing,
    BundleIncomplete,
    ChecksumMismatch,
    EndpointUnreachable,
    LocalLocation,
    Manifest,
    ManifestFile,
    S3Location,
    S3Settings,
    StorageError,
    bundle_complete,
    delete_bundle,
    fetch_bundle,
    join,
    parse_location,
    publish_bundle,
    read_manifest,
)
from support.s3 import S3Server

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MiB: Final = 1024 * 1024
REPO: Final = Path(__file__).resolve().parents[1]
UNICODE_NAME: Final = "données/ünï cødé 🚀.txt"


def quick(settings: S3Settings) -> S3Settings:
    """Fail fast in error tests (the defaults retry for a while, as production should)."""
    return replace(settings, max_attempts=1, connect_timeout=1.0, read_timeout=5.0)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No AWS settings from the developer's env or ~/.aws may leak into a test."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "FTRECIPE_S3_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


@pytest.fixture
def s3_env(s3_bucket: S3Server, aws_env: pytest.MonkeyPatch) -> S3Server:
    """The fresh bucket's server, reachable only through the standard env (default credential chain)."""
    for name, value in s3_bucket.env().items():
        aws_env.setenv(name, value)
    aws_env.setenv("FTRECIPE_S3_ADDRESSING_STYLE", "path")
    return s3_bucket


@dataclass(frozen=True)
class Target:
    """Where a test publishes: an ``s3://`` prefix in a fresh bucket, or a local directory."""

    uri: str
    server: S3Server | None = None
    root: Path | None = None

    @cached_property
    def client(self) -> S3Client:
        """One raw client per target: making one takes ~60 ms, too slow for the kill test's polling."""
        assert self.server is not None
        return self.server.client()

    def key(self, relative: str) -> str:
        location = parse_location(self.uri)
        assert isinstance(location, S3Location)
        return location.key(relative)

    def overwrite(self, relative: str, data: bytes) -> None:
        """Replace stored bytes behind the protocol's back (bit rot, a careless hand, another writer)."""
        if self.server is not None:
            self.client.put_object(Bucket=self.server.bucket, Key=self.key(relative), Body=data)
        else:
            assert self.root is not None
            (self.root / relative).write_bytes(data)

    def names(self) -> set[str]:
        """Everything stored under the target, as bundle-relative paths (local temp files included)."""
        if self.server is not None:
            prefix = self.key("")
            listed = self.client.list_objects_v2(Bucket=self.server.bucket, Prefix=prefix)
            return {item["Key"][len(prefix) :] for item in listed.get("Contents", [])}
        assert self.root is not None
        return {
            Path(d, n).relative_to(self.root).as_posix() for d, _, files in os.walk(self.root) for n in files
        }


@pytest.fixture(params=["s3", "local"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3_env")
        return Target(uri=f"s3://{server.bucket}/runs/r1/adapter", server=server)
    root = tmp_path / "store" / "adapter"
    return Target(uri=str(root), root=root)


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        Path(d, n).relative_to(root).as_posix(): Path(d, n).read_bytes()
        for d, _, files in os.walk(root)
        for n in files
    }


SAMPLE: Final = {
    "adapter_config.json": b'{"r": 16}',
    "adapter_model.safetensors": os.urandom(300_000),
    "tokenizer/special/empty.txt": b"",
    "tokenizer/vocab.json": b'{"a": 1}' * 1000,
    UNICODE_NAME: "ünïcødé inside too".encode(),
}


# --- locations and settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://bucket-1/a/b/", S3Location("bucket-1", "a/b")),
        ("s3://my.bucket", S3Location("my.bucket", "")),
        ("S3://bkt/x", S3Location("bkt", "x")),
        ("file:///data/out", LocalLocation(Path("/data/out"))),
        ("file://localhost/data/a%20b", LocalLocation(Path("/data/a b"))),
        ("relative/dir", LocalLocation(Path("relative/dir"))),
        (Path("/abs"), LocalLocation(Path("/abs"))),
    ],
)
def test_parse_location(text: str | Path, expected: object) -> None:
    assert parse_location(text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("s3://Bad_Bucket/x", "Bad_Bucket"),
        ("s3://ab", "'ab'"),
        ("s3://bucket/a/../b", "'..'"),
        ("s3://bucket/a//b", "empty"),
        ("gs://bucket/x", "unsupported scheme 'gs'"),
        ("file://otherhost/x", "not local"),
        ("  ", "empty location"),
    ],
)
def test_parse_location_rejects_with_one_line(text: str, needle: str) -> None:
    with pytest.raises(StorageError) as err:
        parse_location(text)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_join() -> None:
    assert join(S3Location("b", ""), "runs", "r1/adapter/") == S3Location("b", "runs/r1/adapter")
    assert join(S3Location("b", "p"), "x") == S3Location("b", "p/x")
    assert join(LocalLocation(Path("/d")), "a/b", "c") == LocalLocation(Path("/d/a/b/c"))
    with pytest.raises(StorageError):
        join(S3Location("b", "p"), "../escape")


def test_settings_from_env() -> None:
    settings = S3Settings.from_env(
        {
            "AWS_ENDPOINT_URL": "http://minio:9000",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "AWS_REGION": "eu-central-1",
            "FTRECIPE_S3_ADDRESSING_STYLE": "PATH",
            "AWS_MAX_ATTEMPTS": "7",
            "FTRECIPE_S3_MULTIPART_CHUNKSIZE": str(16 * MiB),
        }
    )
    assert settings == S3Settings(
        endpoint_url="http://minio:9000",
        region="eu-central-1",
        addressing_style="path",
        max_attempts=7,
        multipart_chunksize=16 * MiB,
    )
    assert S3Settings.from_env({"AWS_ENDPOINT_URL_S3": "https://s3.x", "AWS_ENDPOINT_URL": "http://y"}) == (
        S3Settings(endpoint_url="https://s3.x")
    )
    assert S3Settings.from_env({}).multipart_chunksize == 64 * MiB
    with pytest.raises(StorageError, match="FTRECIPE_S3_ADDRESSING_STYLE"):
        S3Settings.from_env({"FTRECIPE_S3_ADDRESSING_STYLE": "sideways"})
    with pytest.raises(StorageError, match="5 MiB"):
        S3Settings(multipart_chunksize=MiB)


def test_manifest_json_round_trip_and_validation() -> None:
    manifest = Manifest(
        files=(ManifestFile("a/ü.txt", 3, "0" * 64), ManifestFile("b", 0, "f" * 64)),
        producer="dataprep",
        version="1.2.3",
        inputs_hash="abc",
        created="2025-01-01T00:00:00.000Z",
    )
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert "ü" in manifest.to_json()
    document = json.loads(manifest.to_json())
    for bad_path in ("../etc/passwd", "/abs", "a//b", "_SUCCESS"):
        document["files"][0]["path"] = bad_path
        with pytest.raises(StorageError):
            Manifest.from_json(json.dumps(document))
    with pytest.raises(StorageError, match="not valid JSON"):
        Manifest.from_json("{")


# --- the protocol, on S3 and on local directories --------------------------------------------------


def test_publish_and_fetch_round_trip(target: Target, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", SAMPLE)

    manifest = publish_bundle(source, target.uri, producer="trainer", inputs_hash="sha256:in")

    assert [f.path for f in manifest.files] == sorted(SAMPLE)
    by_path = {f.path: f for f in manifest.files}
    for relative, data in SAMPLE.items():
        assert by_path[relative].size == len(data)
        assert by_path[relative].sha256 == hashlib.sha256(data).hexdigest()
    assert (manifest.producer, manifest.inputs_hash) == ("trainer", "sha256:in")
    assert manifest.version == ftrecipe.__version__
    assert datetime.fromisoformat(manifest.created).utcoffset() is not None
    assert target.names() == set(SAMPLE) | {MANIFEST_NAME, SUCCESS_NAME}
    assert bundle_complete(target.uri)
    assert read_manifest(target.uri) == manifest

    fetched = fetch_bundle(target.uri, tmp_path / "dst")

    assert fetched == manifest
    assert read_tree(tmp_path / "dst") == SAMPLE  # byte equality, and no manifest/marker/temp files


def test_delete_bundle_removes_what_its_manifest_listed(target: Target, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", SAMPLE)
    publish_bundle(source, target.uri, producer="trainer", inputs_hash="h")
    target.overwrite("not-ours.txt", b"someone else's")

    assert delete_bundle(target.uri) == len(SAMPLE)

    assert not bundle_complete(target.uri)
    assert target.names() == {"not-ours.txt"}  # only what no manifest listed is left
    assert delete_bundle(target.uri) == 0  # idempotent


def test_corrupted_object_is_detected(target: Target, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", SAMPLE)
    publish_bundle(source, target.uri, producer="trainer", inputs_hash="h")
    original = SAMPLE["adapter_model.safetensors"]
    target.overwrite("adapter_model.safetensors", bytes(len(original)))  # same size, other bytes

    with pytest.raises(ChecksumMismatch) as err:
        fetch_bundle(target.uri, tmp_path / "dst")

    message = str(err.value)
    assert "adapter_model.safetensors" in message and "sha256" in message and "\n" not in message
    assert hashlib.sha256(original).hexdigest() in message
    assert hashlib.sha256(bytes(len(original))).hexdigest() in message
    assert "adapter_model.safetensors" not in read_tree(tmp_path / "dst")  # never moved into place

    target.overwrite("adapter_model.safetensors", original)
    target.overwrite(UNICODE_NAME, b"shorter")
    with pytest.raises(ChecksumMismatch, match="size mismatch"):
        fetch_bundle(target.uri, tmp_path / "dst2")

    publish_bundle(source, target.uri, producer="trainer", inputs_hash="h")  # repairs what it must
    fetch_bundle(target.uri, tmp_path / "dst3")
    assert read_tree(tmp_path / "dst3") == SAMPLE


def test_double_publish_is_idempotent(
    target: Target, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_tree(tmp_path / "src", SAMPLE)
    first = publish_bundle(source, target.uri, producer="trainer", inputs_hash="h")
    with caplog.at_level(logging.INFO, logger="ftrecipe.storage"):
        second = publish_bundle(source, target.uri, producer="trainer", inputs_hash="h")

    assert replace(second, created=first.created) == first
    assert f"(0 uploaded, {len(SAMPLE)} unchanged)" in caplog.text
    assert target.names() == set(SAMPLE) | {MANIFEST_NAME, SUCCESS_NAME}
    fetch_bundle(target.uri, tmp_path / "dst")
    assert read_tree(tmp_path / "dst") == SAMPLE

    # A changed bundle replaces the old one entirely: changed bytes, removed and added files, and a
    # file that became a directory.
    changed = {k: v for k, v in SAMPLE.items() if k != "tokenizer/vocab.json"}
    changed["adapter_config.json"] = b'{"r": 32}'
    changed["new/file.bin"] = b"new"
    changed["tokenizer/vocab.json/shard-0"] = b"{}"
    (source / "tokenizer/vocab.json").unlink()
    make_tree(source, changed)
    publish_bundle(source, target.uri, producer="trainer", inputs_hash="h2")
    assert target.names() == set(changed) | {MANIFEST_NAME, SUCCESS_NAME}
    fetch_bundle(target.uri, tmp_path / "dst3")
    assert read_tree(tmp_path / "dst3") == changed


def test_fetch_of_nothing_says_so(target: Target, tmp_path: Path) -> None:
    with pytest.raises(BundleIncomplete, match="nothing at all"):
        fetch_bundle(target.uri, tmp_path / "dst")
    assert not bundle_complete(target.uri)
    assert read_manifest(target.uri) is None


# A publisher whose every per-file log record takes 0.1 s: a slow link, so the kill lands mid-publish.
_PUBLISHER: Final = """
import logging, sys, time
from pathlib import Path
from ftrecipe.storage import publish_bundle

class SlowLink(logging.Handler):
    def emit(self, record):
        time.sleep(0.1)

logger = logging.getLogger("ftrecipe.storage")
logger.setLevel(logging.DEBUG)
logger.addHandler(SlowLink())
publish_bundle(Path(sys.argv[1]), sys.argv[2], producer="doomed", inputs_hash="x")
"""


def _kill_when_written(proc: subprocess.Popen[bytes], target: Target, watched: set[str]) -> None:
    """SIGKILL ``proc`` as soon as one of ``watched`` is stored (temp files do not count)."""
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if target.names() & watched:
            proc.kill()
            break
        time.sleep(0.002)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"publisher not killed mid-publish: {stderr.decode()[-2000:]}"


@pytest.mark.parametrize("over_existing", [False, True], ids=["fresh", "over-complete-bundle"])
def test_killed_publisher_never_looks_complete(target: Target, tmp_path: Path, over_existing: bool) -> None:
    if over_existing:
        old = make_tree(tmp_path / "old", {"old.txt": b"v1", "tokenizer.json": b"{}"})
        publish_bundle(old, target.uri, producer="v1", inputs_hash="v1")
        assert bundle_complete(target.uri)
    # ~40 MiB in several files; the tiny one sorts first and is what the poll sees.
    files = {"a_first.txt": b"first"} | {f"shard-{i}.bin": os.urandom(8 * MiB) for i in range(5)}
    source = make_tree(tmp_path / "src", files)
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), os.environ.get("PYTHONPATH", "")])
    }

    proc = subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER, str(source), target.uri],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _kill_when_written(proc, target, set(files))

    assert target.names() & set(files)  # it did write part of the bundle
    assert SUCCESS_NAME not in target.names()
    assert not bundle_complete(target.uri)
    assert read_manifest(target.uri) is None
    with pytest.raises(BundleIncomplete, match=f"no {SUCCESS_NAME}"):
        fetch_bundle(target.uri, tmp_path / "dst")

    # Publishing again over the debris ends complete, with exactly the new bundle.
    manifest = publish_bundle(source, target.uri, producer="retry", inputs_hash="x")
    assert bundle_complete(target.uri) and read_manifest(target.uri) == manifest
    assert target.names() == set(files) | {MANIFEST_NAME, SUCCESS_NAME}  # old.txt went with v1
    fetch_bundle(target.uri, tmp_path / "dst")
    assert read_tree(tmp_path / "dst") == files


def test_manifest_not_sealed_by_marker_is_incomplete(target: Target, tmp_path: Path) -> None:
    """A manifest rewritten after ``_SUCCESS`` (a re-publish in flight) must not be trusted."""
    publish_bundle(make_tree(tmp_path / "src", SAMPLE), target.uri, producer="p", inputs_hash="h")
    target.overwrite(MANIFEST_NAME, Manifest((), "p", "0", "h", "now").to_json().encode())
    assert not bundle_complete(target.uri)
    with pytest.raises(BundleIncomplete, match="does not match"):
        fetch_bundle(target.uri, tmp_path / "dst")


# --- S3 specifics ----------------------------------------------------------------------------------


def test_big_file_goes_multipart(s3_env: S3Server, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    big = source / "model.safetensors"
    with big.open("wb") as fh:  # 101 MiB: a random head and tail around a sparse middle
        fh.write(os.urandom(MiB))
        fh.truncate(100 * MiB)
        fh.seek(0, os.SEEK_END)
        fh.write(os.urandom(MiB))
    uri = f"s3://{s3_env.bucket}/base"

    publish_bundle(source, uri, producer="p", inputs_hash="h")

    head = s3_env.client().head_object(Bucket=s3_env.bucket, Key="base/model.safetensors")
    assert head["ContentLength"] == 101 * MiB
    assert head["ETag"].strip('"').endswith("-2"), head["ETag"]  # 64 MiB parts by default
    fetch_bundle(uri, tmp_path / "dst")
    assert (tmp_path / "dst/model.safetensors").read_bytes() == big.read_bytes()


@pytest.mark.parametrize("what", ["wrong-secret", "unknown-key"])
def test_bad_credentials_are_access_denied(
    s3_env: S3Server, aws_env: pytest.MonkeyPatch, tmp_path: Path, what: str
) -> None:
    if what == "wrong-secret":
        aws_env.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_env.secret_key)
    else:
        aws_env.setenv("AWS_ACCESS_KEY_ID", "nobodyXYZW")
    settings = quick(S3Settings.from_env())
    source = make_tree(tmp_path / "src", {"a.txt": b"a"})

    with pytest.raises(AccessDenied) as err:
        publish_bundle(source, f"s3://{s3_env.bucket}/p", producer="p", inputs_hash="h", settings=settings)

    message = str(err.value)
    assert s3_env.bucket in message and "\n" not in message
    assert s3_env.secret_key not in message
    assert ("'test'" if what == "wrong-secret" else "'XYZW'") in message  # the key's last 4 chars
    with pytest.raises(AccessDenied):
        bundle_complete(f"s3://{s3_env.bucket}/p", settings)


def test_missing_bucket(s3_env: S3Server, tmp_path: Path) -> None:
    uri = "s3://ftrecipe-no-such-bucket/p"
    with pytest.raises(BucketMissing) as err:
        publish_bundle(make_tree(tmp_path / "src", {"a": b"a"}), uri, producer="p", inputs_hash="h")
    assert "ftrecipe-no-such-bucket" in str(err.value) and s3_env.endpoint_url in str(err.value)
    with pytest.raises(BucketMissing):
        fetch_bundle(uri, tmp_path / "dst")


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_endpoint_fails_fast(aws_env: pytest.MonkeyPatch, closed_port: int) -> None:
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE1234")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    endpoint = f"http://127.0.0.1:{closed_port}"
    settings = quick(S3Settings(endpoint_url=endpoint, region="us-east-1", addressing_style="path"))
    started = time.monotonic()

    with pytest.raises(EndpointUnreachable) as err:
        bundle_complete("s3://bucket/p", settings)

    assert time.monotonic() - started < 5
    assert endpoint in str(err.value) and "not-a-real-secret" not in str(err.value)


# --- local specifics -------------------------------------------------------------------------------


def test_local_publish_refuses_what_it_cannot_publish_faithfully(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", {"a.txt": b"a"})
    with pytest.raises(StorageError, match="inside"):
        publish_bundle(source, source / "out", producer="p", inputs_hash="h")
    (source / "_SUCCESS").write_bytes(b"")
    with pytest.raises(StorageError, match="reserved"):
        publish_bundle(source, tmp_path / "dst", producer="p", inputs_hash="h")
    (source / "_SUCCESS").unlink()
    (source / "linked").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(StorageError, match="symlinked directories"):
        publish_bundle(source, tmp_path / "dst", producer="p", inputs_hash="h")
    with pytest.raises(StorageError, match="not a directory"):
        publish_bundle(tmp_path / "missing", tmp_path / "dst", producer="p", inputs_hash="h")


def test_manifest_metadata_round_trips(tmp_path: Path) -> None:
    from ftrecipe.storage import publish_bundle, read_manifest

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("a")
    meta = {
        "baseModel": {"id": "meta-llama/Llama-3.1-8B-Instruct", "revision": None},
        "dataset_hash": "ab" * 32,
    }
    published = publish_bundle(
        tmp_path / "src", tmp_path / "out", producer="p", inputs_hash="h", metadata=meta
    )
    assert published.metadata == meta
    read = read_manifest(tmp_path / "out")
    assert read is not None
    assert read.metadata == meta
    plain = publish_bundle(tmp_path / "src", tmp_path / "plain", producer="p", inputs_hash="h")
    assert plain.metadata == {}
    assert "metadata" not in (tmp_path / "plain" / "manifest.json").read_text()
