"""Artifact storage: S3 or local bundles that pipeline phases hand to each other, complete or not at all.

Why one package: the data Job, the GPU Job, users and vLLM all meet at these locations, so URIs,
credentials, the publish/fetch protocol and the error messages must be the same everywhere.
"""

from ftrecipe.storage.bundle import (
    MANIFEST_NAME,
    SUCCESS_NAME,
    Manifest,
    ManifestFile,
    bundle_complete,
    delete_bundle,
    fetch_bundle,
    publish_bundle,
    read_manifest,
)
from ftrecipe.storage.errors import (
    AccessDenied,
    BucketMissing,
    BundleIncomplete,
    ChecksumMismatch,
    EndpointUnreachable,
    StorageError,
)
from ftrecipe.storage.s3 import S3Settings
from ftrecipe.storage.uri import LocalLocation, Location, S3Location, join, parse_location

__all__ = [
    "MANIFEST_NAME",
    "SUCCESS_NAME",
    "AccessDenied",
    "BucketMissing",
    "BundleIncomplete",
    "ChecksumMismatch",
    "EndpointUnreachable",
    "LocalLocation",
    "Location",
    "Manifest",
    "ManifestFile",
    "S3Location",
    "S3Settings",
    "StorageError",
    "bundle_complete",
    "delete_bundle",
    "fetch_bundle",
    "join",
    "parse_location",
    "publish_bundle",
    "read_manifest",
]
