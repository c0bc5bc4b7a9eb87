"""Open the artifact store a URI names: ``s3://bucket/prefix`` or a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.storage.base import ArtifactError, ArtifactStore
from tasks.storage.local import LocalStore


def open_store(uri: str | Path, **s3_options: Any) -> ArtifactStore:
    """``s3://bucket/prefix`` → S3Store (extra options go to it); anything else → LocalStore."""
    text = str(uri)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not bucket:
            raise ArtifactError("an s3:// URI needs a bucket: s3://bucket/prefix", text)
        from tasks.storage.s3 import S3Store  # here, so that local stores never import boto3

        return S3Store(bucket, prefix, **s3_options)
    return LocalStore(text)
