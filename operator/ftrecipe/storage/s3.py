"""S3 (and S3-compatible: MinIO, SeaweedFS, Ceph) access the way the AWS ecosystem configures it.

Why no keys in our API: credentials come only from boto3's default chain (env vars, profile, web identity
for IRSA / EKS pod identity, instance metadata), so a pod's identity works unchanged and no secret ever
passes through our code, logs or error messages. What differs between stores (endpoint, region,
path-style addressing) is in ``S3Settings``, read from the standard ``AWS_*`` variables plus
``FTRECIPE_S3_ADDRESSING_STYLE``.

Every botocore/s3transfer failure leaves this module as a one-line ``StorageError`` subclass naming the
bucket, key, endpoint and identity, so a person knows what to fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import urlsplit

import boto3
import boto3.session
import botocore.session
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.loaders import Loader, create_loader

from ftrecipe import __version__
from ftrecipe.storage.errors import (
    AccessDenied,
    BucketMissing,
    EndpointUnreachable,
    StorageError,
)
from ftrecipe.storage.uri import S3Location

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024
AddressingStyle = Literal["auto", "virtual", "path"]
_ADDRESSING_STYLES: Final[tuple[AddressingStyle, ...]] = ("auto", "virtual", "path")
# S3 limits on multipart part sizes.
_MIN_PART: Final = 5 * MiB
_MAX_PART: Final = 5 * 1024 * MiB
_ACCESS_CODES: Final = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "ExpiredToken",
        "Forbidden",
        "InvalidAccessKeyId",
        "InvalidSecurity",
        "InvalidToken",
        "RequestTimeTooSkewed",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
        "403",
    }
)
_MISSING_BUCKET_CODES: Final = frozenset({"NoSuchBucket"})
_MISSING_KEY_CODES: Final = frozenset({"NoSuchKey", "404", "NotFound"})
_REASON_MAX: Final = 200
# Without s3:ListBucket, AWS answers a GET of a missing key (an unfinished bundle's _SUCCESS) with 403.
_POLICY_HINT: Final = (
    "check the credentials, and that the policy allows s3:ListBucket on the bucket and "
    "s3:GetObject, s3:PutObject, s3:DeleteObject on the prefix"
)
# Metadata key (x-amz-meta-sha256) that lets a re-publish skip objects whose bytes already match.
SHA256_METADATA: Final = "sha256"


@dataclass(frozen=True)
class S3Settings:
    """How to talk to the store; credentials are deliberately absent (boto3's default chain finds them).

    ``endpoint_url`` None means AWS, or whatever ``AWS_ENDPOINT_URL[_S3]`` says (botocore reads it too).
    ``addressing_style`` "path" puts the bucket in the URL path, which most non-AWS stores need.
    Multipart: files of ``multipart_threshold`` bytes or more go up in ``multipart_chunksize`` parts,
    ``max_concurrency`` at a time. ``max_attempts`` counts the first try (botocore "standard" retries,
    with exponential backoff and jitter).
    """

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: AddressingStyle = "auto"
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 64 * MiB
    max_concurrency: int = 8
    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.addressing_style not in _ADDRESSING_STYLES:
            raise StorageError(
                f"S3 addressing style {self.addressing_style!r} is not one of {', '.join(_ADDRESSING_STYLES)}"
            )
        if not _MIN_PART <= self.multipart_chunksize <= _MAX_PART:
            raise StorageError(
                f"S3 multipart chunk size {self.multipart_chunksize} is outside S3's 5 MiB..5 GiB part limits"
            )
        if self.multipart_threshold < 1:
            raise StorageError(f"S3 multipart threshold {self.multipart_threshold} must be positive")
        if self.max_concurrency < 1 or self.max_attempts < 1:
            raise StorageError("S3 max_concurrency and max_attempts must be at least 1")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise StorageError("S3 connect and read timeouts must be positive")
        if self.endpoint_url is not None and urlsplit(self.endpoint_url).scheme not in ("http", "https"):
            raise StorageError(f"S3 endpoint {self.endpoint_url!r} must be an http:// or https:// URL")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """Settings from the variables every AWS SDK reads, plus ``FTRECIPE_S3_*`` for the rest.

        ``AWS_ENDPOINT_URL_S3`` > ``AWS_ENDPOINT_URL`` (unless ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS``),
        ``AWS_REGION`` > ``AWS_DEFAULT_REGION``, ``AWS_MAX_ATTEMPTS``, ``FTRECIPE_S3_ADDRESSING_STYLE``
        (auto/virtual/path), ``FTRECIPE_S3_MULTIPART_THRESHOLD``/``_CHUNKSIZE`` (bytes),
        ``FTRECIPE_S3_MAX_CONCURRENCY``.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def integer(name: str, default: int) -> int:
            value = get(name)
            if value is None:
                return default
            try:
                return int(value)
            except ValueError:
                raise StorageError(f"{name}={value!r} is not an integer") from None

        endpoint = None
        if (get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or "").lower() != "true":
            endpoint = get("AWS_ENDPOINT_URL_S3") or get("AWS_ENDPOINT_URL")
        style = (get("FTRECIPE_S3_ADDRESSING_STYLE") or "auto").lower()
        if style not in _ADDRESSING_STYLES:
            raise StorageError(
                f"FTRECIPE_S3_ADDRESSING_STYLE={style!r} is not one of {', '.join(_ADDRESSING_STYLES)}"
            )
        defaults = cls()
        return cls(
            endpoint_url=endpoint,
            region=get("AWS_REGION") or get("AWS_DEFAULT_REGION"),
            addressing_style=style,
            multipart_threshold=integer("FTRECIPE_S3_MULTIPART_THRESHOLD", defaults.multipart_threshold),
            multipart_chunksize=integer("FTRECIPE_S3_MULTIPART_CHUNKSIZE", defaults.multipart_chunksize),
            max_concurrency=integer("FTRECIPE_S3_MAX_CONCURRENCY", defaults.max_concurrency),
            max_attempts=integer("AWS_MAX_ATTEMPTS", defaults.max_attempts),
        )

    def transfer_config(self) -> TransferConfig:
        """s3transfer's settings; "classic" so that the CRT client (if installed) cannot ignore them."""
        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )


_loader_lock: Final = threading.Lock()
_loader: Loader | None = None


def new_session() -> boto3.session.Session:
    """A fresh default-chain session that shares botocore's parsed service models with the others.

    Fresh, because sessions are not thread-safe and must see the env as it is now; sharing the loader
    saves ~50 ms of JSON parsing per client, which matters to a reconcile loop that polls bundles.
    """
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = create_loader()
        loader = _loader
    core = botocore.session.get_session()
    core.register_component("data_loader", loader)
    return boto3.session.Session(botocore_session=core)


def make_client(settings: S3Settings, session: boto3.session.Session | None = None) -> S3Client:
    """An S3 client with our timeouts, retries and addressing, from ``session`` or a fresh one."""
    session = session or new_session()
    config = Config(
        s3={"addressing_style": settings.addressing_style},
        retries={"mode": "standard", "max_attempts": settings.max_attempts},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=max(10, settings.max_concurrency + 2),
        user_agent_extra=f"ftrecipe/{__version__}",
    )
    return session.client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config
    )


def _is_aws(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def describe_identity(session: boto3.session.Session, endpoint: str, region: str | None) -> str:
    """Who we are, for "access denied" messages: the STS ARN on AWS, else the access key's last 4 chars.

    STS is asked only on AWS itself (S3-compatible stores rarely speak STS, and asking a real AWS STS
    about a MinIO key would only add a slow failure); never the secret.
    """
    try:
        credentials = session.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials is not None else None
    except BotoCoreError as exc:
        return f"credentials that could not be loaded ({_reason(str(exc))})"
    if credentials is None or frozen is None or not frozen.access_key:
        return "no credentials (none in env, profile, web identity or instance metadata)"
    key_hint = f"access key ID ending in {frozen.access_key[-4:]!r} (from {credentials.method})"
    if not _is_aws(endpoint):
        return key_hint
    try:
        sts = session.client(
            "sts",
            region_name=region,
            config=Config(connect_timeout=3, read_timeout=5, retries={"mode": "standard", "max_attempts": 1}),
        )
        arn = sts.get_caller_identity().get("Arn")
    except (BotoCoreError, ClientError):
        return key_hint
    return f"{arn}, {key_hint}" if isinstance(arn, str) and arn else key_hint


def _reason(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 1] + "…"


def error_code(exc: ClientError) -> str:
    """The S3 error code ("NoSuchKey", "403", ...) of a client error; "" when the server sent none."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def translate_error(
    exc: BaseException, *, bucket: str, key: str, endpoint: str, identity: Callable[[], str]
) -> StorageError | None:
    """The one-line ``StorageError`` for a boto failure, or None when ``exc`` is not one of ours to map."""
    uri = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
        exc = exc.__context__  # boto3 wraps upload errors in a string; the ClientError is the context
    if isinstance(exc, RetriesExceededError):
        last = getattr(exc, "last_exception", None)  # set by boto3, absent from the stubs
        if isinstance(last, BaseException):
            exc = last
    if isinstance(exc, ClientError):
        code = error_code(exc)
        message = str(exc.response.get("Error", {}).get("Message", "")) or "no message"
        if code in _ACCESS_CODES:
            return AccessDenied(uri, identity(), _reason(f"{code}: {message}"), _POLICY_HINT)
        if code in _MISSING_BUCKET_CODES:
            return BucketMissing(bucket, endpoint)
        operation = getattr(exc, "operation_name", "request")
        return StorageError(f"S3 {operation} on {uri} at {endpoint} failed: {_reason(f'{code}: {message}')}")
    if isinstance(exc, NoCredentialsError):
        return AccessDenied(
            uri,
            "nobody: no AWS credentials were found",
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or give the pod an identity (IRSA)",
        )
    if isinstance(exc, EndpointConnectionError | ConnectionClosedError | ReadTimeoutError):
        return EndpointUnreachable(endpoint, _reason(str(exc)))
    if isinstance(exc, BotoCoreError):
        return StorageError(f"S3 request on {uri} at {endpoint} failed: {_reason(str(exc))}")
    return None


class S3Store:
    """One bundle prefix in a bucket, as the small set of operations the bundle protocol needs."""

    def __init__(self, location: S3Location, settings: S3Settings, client: S3Client | None = None) -> None:
        """``client``: a shared one made by ``make_client(settings)`` (clients are thread-safe), else a new one."""
        self.location = location
        self.settings = settings
        self._session = new_session()
        self._client = client or make_client(settings, self._session)
        self._transfer = settings.transfer_config()

    @property
    def endpoint(self) -> str:
        return str(self._client.meta.endpoint_url)

    def uri(self, relative: str = "") -> str:
        key = self.location.key(relative) if relative else self.location.key_prefix
        return f"s3://{self.location.bucket}/{key}" if key else f"s3://{self.location.bucket}"

    @contextlib.contextmanager
    def _errors(self, relative: str) -> Iterator[None]:
        try:
            yield
        except (BotoCoreError, ClientError, S3UploadFailedError, RetriesExceededError) as exc:
            mapped = translate_error(
                exc,
                bucket=self.location.bucket,
                key=self.location.key(relative) if relative else self.location.key_prefix,
                endpoint=self.endpoint,
                identity=lambda: describe_identity(self._session, self.endpoint, self.settings.region),
            )
            if mapped is None:
                raise
            raise mapped from exc

    def read_bytes(self, relative: str) -> bytes | None:
        """The object's bytes, or None when there is no such key (a missing bucket is an error)."""
        with self._errors(relative):
            try:
                response = self._client.get_object(
                    Bucket=self.location.bucket, Key=self.location.key(relative)
                )
            except ClientError as exc:
                if error_code(exc) in _MISSING_KEY_CODES:
                    return None
                raise
            return response["Body"].read()

    def write_bytes(self, relative: str, data: bytes, content_type: str) -> None:
        with self._errors(relative):
            self._client.put_object(
                Bucket=self.location.bucket,
                Key=self.location.key(relative),
                Body=data,
                ContentType=content_type,
            )

    def upload(self, relative: str, source: Path, sha256: str) -> None:
        """Upload one file (multipart above the threshold); a single PUT or completed upload is atomic."""
        with self._errors(relative):
            self._client.upload_file(
                str(source),
                self.location.bucket,
                self.location.key(relative),
                ExtraArgs={"Metadata": {SHA256_METADATA: sha256}},
                Config=self._transfer,
            )

    def stored_sha256(self, relative: str, size: int) -> str | None:
        """The sha256 recorded when we uploaded this object, if it is there with this size; else None."""
        with self._errors(relative):
            try:
                head = self._client.head_object(Bucket=self.location.bucket, Key=self.location.key(relative))
            except ClientError as exc:
                if error_code(exc) in _MISSING_KEY_CODES:
                    return None
                raise
        if head["ContentLength"] != size:
            return None
        return head.get("Metadata", {}).get(SHA256_METADATA)

    def list_files(self) -> dict[str, int]:
        """Every object under the prefix: bundle-relative path → size."""
        prefix = f"{self.location.key_prefix}/" if self.location.key_prefix else ""
        found: dict[str, int] = {}
        with self._errors(""):
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    key = item.get("Key", "")
                    if key.startswith(prefix) and len(key) > len(prefix):
                        found[key[len(prefix) :]] = int(item.get("Size", 0))
        return found

    def delete(self, relative: str) -> None:
        with self._errors(relative):
            self._client.delete_object(Bucket=self.location.bucket, Key=self.location.key(relative))

    def download(self, relative: str, target: Path) -> bool:
        """Write the object to ``target``; False when the key is gone (the bundle changed under us)."""
        with self._errors(relative), target.open("wb") as fh:  # into our temp file: no stray temp names
            try:
                self._client.download_fileobj(
                    self.location.bucket, self.location.key(relative), fh, Config=self._transfer
                )
            except ClientError as exc:
                if error_code(exc) in _MISSING_KEY_CODES:
                    return False
                raise
        return True

    def sync(self) -> None:
        """Nothing to flush: S3 is strongly consistent once a PUT returns."""
