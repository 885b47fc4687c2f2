"""Storage errors a person can act on: each message is one line that says what, where and what to do.

Why a hierarchy: callers (the operator's status, the CLI) catch ``StorageError`` once and show ``str(exc)``;
the subclasses let them react to the few cases that need different handling (retry later for an
unreachable endpoint, fail the recipe for denied access, re-run the producer for an incomplete bundle).
Messages never contain secrets.
"""

from __future__ import annotations


def _one_line(text: str) -> str:
    """Collapse whitespace so that a message stays on one line, whatever a server put in it."""
    return " ".join(text.split())


class StorageError(Exception):
    """Anything that stops reading or writing artifacts; ``str()`` is one line fit for a status field."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class AccessDenied(StorageError):
    """The store refused our credentials or this identity may not touch this bucket/key."""

    def __init__(
        self, uri: str, identity: str, reason: str, hint: str = "check the credentials and permissions"
    ) -> None:
        self.uri = uri
        self.identity = identity
        self.reason = reason
        super().__init__(f"access denied to {uri} for {identity} ({reason}); {hint}")


class BucketMissing(StorageError):
    """The bucket does not exist at this endpoint (typo, wrong region/endpoint, or not created yet)."""

    def __init__(self, bucket: str, endpoint: str) -> None:
        self.bucket = bucket
        self.endpoint = endpoint
        super().__init__(
            f"bucket {bucket!r} does not exist at {endpoint}; create it or fix the URI/endpoint/region"
        )


class EndpointUnreachable(StorageError):
    """No connection to the endpoint: DNS, firewall, proxy, TLS, or a server that is down."""

    def __init__(self, endpoint: str, reason: str) -> None:
        self.endpoint = endpoint
        self.reason = reason
        super().__init__(
            f"cannot reach the S3 endpoint {endpoint} ({reason}); check AWS_ENDPOINT_URL, network and TLS"
        )


class ChecksumMismatch(StorageError):
    """A file's bytes differ from what the manifest promises: damaged or overwritten after publishing."""

    def __init__(self, uri: str, field: str, expected: str, actual: str) -> None:
        self.uri = uri
        self.field = field
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"{field} mismatch for {uri}: expected {expected}, got {actual}; "
            "the bundle was damaged or changed after publishing, publish it again"
        )


class BundleIncomplete(StorageError):
    """No sealed bundle at this location: the producer has not finished, died, or is re-publishing."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(
            f"no complete bundle at {uri} ({reason}); wait for the producer to finish or run it again"
        )
