"""The artifact store over ``s3://bucket/prefix``: `S3Store`, its shared boto3 clients, and
the retries of request and response bodies. boto3 is imported only when it is used."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.storage.base import (
    RESERVED,
    SHA256_META,
    TAG_META,
    Artifact,
    ArtifactError,
    CorruptArtifact,
    MiB,
    atomic_target,
    check_key,
    check_range,
    sha256_file,
    space_errors,
    verify_sha256,
)

log = logging.getLogger(__name__)


def default_transfer_config(
    part_size: int = 64 * MiB, threads: int = 8, threshold: int | None = None
) -> Any:
    """Multipart settings for shard-sized files: 64 MiB parts, 8 threads."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=threshold or part_size,
        multipart_chunksize=part_size,
        max_concurrency=threads,
        use_threads=threads > 1,
    )


_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()

# botocore's retries ("standard" mode: 500/502/503/504, throttling such as 503 SlowDown, connection
# resets and timeouts, with exponential backoff and jitter; a per-client quota stops retrying
# while most requests fail, so an outage fails fast). These are the defaults; `AWS_MAX_ATTEMPTS`,
# `AWS_RETRY_MODE` (or a profile's `max_attempts`, `retry_mode`) override them.
S3_MAX_ATTEMPTS = 6  # in all: the first request and up to 5 retries (waits up to 1, 2, 4, 8, 16 s)
S3_CONNECT_TIMEOUT = 10.0  # seconds to open a connection
S3_READ_TIMEOUT = 60.0  # seconds without a byte from S3 before the request is retried
# A response body cut short (a reset, a truncated or mis-framed body) is not retried by botocore,
# whose retries end once the headers arrived: Porter re-reads such GETs itself.
BODY_ATTEMPTS = 5
_DOWNLOAD_ATTEMPTS = 3  # whole-file downloads (s3transfer also re-reads broken bodies itself)
_BODY_BACKOFF = 0.1  # seconds before the second attempt; doubles, with jitter, up to 2 s


def _s3_client(pool: int) -> Any:
    """A boto3 S3 client from the standard configuration, shared by this process's stores.

    Building one costs about 0.1 s (botocore loads its service model for every new session), so
    clients are reused: per process (never across a fork), per connection-pool size and per
    `AWS_*` environment (a changed endpoint or credentials gets a new client)."""
    key = (
        os.getpid(),
        pool,
        tuple(sorted(kv for kv in os.environ.items() if kv[0].startswith("AWS_"))),
    )
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session()
            config = Config(
                max_pool_connections=pool,
                retries=_retry_config(session),
                connect_timeout=S3_CONNECT_TIMEOUT,
                read_timeout=S3_READ_TIMEOUT,
                tcp_keepalive=True,
            )
            client = _CLIENTS[key] = session.client("s3", config=config)
    return client


def _retry_config(session: Any) -> dict[str, Any]:
    """Porter's retry defaults, except what boto3's standard configuration sets."""
    core = session._session  # botocore's session: env vars and the profile's config file
    retries: dict[str, Any] = {}
    if core.get_config_variable("retry_mode") is None:
        retries["mode"] = "standard"
    if core.get_config_variable("max_attempts") is None:
        retries["total_max_attempts"] = S3_MAX_ATTEMPTS
    return retries


def _backoff(attempt: int) -> None:
    """Sleep before re-reading a body (attempt 1 is the first retry): doubling, with jitter."""
    time.sleep(min(2.0, _BODY_BACKOFF * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))


class _BrokenBody(ArtifactError):
    """A response body broke off, ended early or arrived damaged: reading it again may work."""


def _body_errors() -> tuple[type[BaseException], ...]:
    """What reading a response body raises when it breaks off or its checksum fails (botocore
    retried the request itself, up to its headers, already; not what is in the body)."""
    from botocore.exceptions import (
        ChecksumError,
        FlexibleChecksumError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    return (
        ResponseStreamingError,
        IncompleteReadError,
        ReadTimeoutError,
        ChecksumError,
        FlexibleChecksumError,
    )


def _expected_length(response: dict[str, Any]) -> int | None:
    """The body length a GetObject response promises: its Content-Range span (ranged GETs) or
    Content-Length; None if it promises neither."""
    content_range = response.get("ContentRange")  # "bytes 0-99/1234"
    if content_range:
        span = content_range.split()[-1].split("/")[0]
        first, _, last = span.partition("-")
        with contextlib.suppress(ValueError):
            return int(last) - int(first) + 1
    length = response.get("ContentLength")
    return None if length is None else int(length)


class S3Store:
    """Artifacts as objects under ``s3://bucket/prefix``.

    The client comes from boto3's standard configuration (``AWS_ENDPOINT_URL_S3``, credentials,
    region, profile), so nothing about the endpoint or credentials is held or logged here.
    """

    def __init__(
        self, bucket: str, prefix: str = "", *, client: Any = None, transfer_config: Any = None
    ) -> None:
        self.bucket = bucket
        self.prefix = check_key(prefix.strip("/"), prefix=True) if prefix else ""
        self.transfer_config = transfer_config or default_transfer_config()
        if client is None:
            pool = max(10, getattr(self.transfer_config, "max_concurrency", 10) + 2)
            client = _s3_client(pool)
        self.client = client
        self._bucket_ok = False

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str = "") -> str:
        name = self._name(key) if key else self.prefix
        return f"s3://{self.bucket}/{name}"

    @contextlib.contextmanager
    def _errors(self, key: str = "") -> Iterator[None]:
        """Turn boto3/botocore failures into one ArtifactError naming the s3:// URI."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise ArtifactError(_describe(exc), self.uri(key)) from exc

    def _head(self, key: str) -> Artifact | None:
        from botocore.exceptions import ClientError

        try:
            with self._errors(key):
                r = self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except ArtifactError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and _status(cause) == 404:
                self._check_bucket()  # HEAD says 404 for a missing bucket too
                return None
            raise
        meta = r.get("Metadata", {})
        return Artifact(
            key, r["ContentLength"], meta.get(SHA256_META), r["ETag"].strip('"'), meta.get(TAG_META)
        )

    def _check_bucket(self) -> None:
        if not self._bucket_ok:
            with self._errors():
                self.client.head_bucket(Bucket=self.bucket)
            self._bucket_ok = True

    def check(self) -> None:
        """Raise ArtifactError unless the bucket answers (HEAD bucket)."""
        self._bucket_ok = False
        self._check_bucket()

    def stat(self, key: str) -> Artifact | None:
        return self._head(key)

    def _require(self, key: str) -> Artifact:
        art = self._head(key)
        if art is None:
            raise ArtifactError("no such object", self.uri(key))
        return art

    def put_file(
        self,
        local: Path,
        key: str,
        *,
        sha256: str | None = None,
        tag: str | None = None,
        move: bool = False,
    ) -> Artifact:
        # The sha256 goes into the metadata, which S3 takes when the upload starts, so unless the
        # caller knows it, it is computed in a first pass; parts are then read by several threads.
        name = self._name(key)
        sha = sha256 or sha256_file(local)
        metadata = {SHA256_META: sha, **({TAG_META: tag} if tag else {})}
        with self._errors(key):
            self.client.upload_file(
                str(local),
                self.bucket,
                name,
                ExtraArgs={"Metadata": metadata},
                Config=self.transfer_config,
            )
        art = self._require(key)
        if art.sha256 != sha:
            raise ArtifactError("object changed while it was being uploaded", self.uri(key))
        if move:
            Path(local).unlink(missing_ok=True)
        return art

    @contextlib.contextmanager
    def scratch(self, key: str) -> Iterator[Path]:
        check_key(key)
        fd, tmp = tempfile.mkstemp(prefix=f"{RESERVED}tmp-", suffix=f"-{key.rsplit('/', 1)[-1]}")
        os.close(fd)
        try:
            with space_errors(self.uri(key), f"the scratch file {tmp} (set TMPDIR to make room)"):
                yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def get_file(self, key: str, local: Path) -> Artifact:
        # s3transfer re-reads a body that breaks off; a body that ends early without the
        # connection saying so, or whose bytes arrive damaged, shows as a wrong size, checksum or
        # sha256 and is downloaded again, a few times, before the object is called corrupt.
        from botocore.exceptions import ChecksumError, FlexibleChecksumError

        art = self._require(key)
        copy = space_errors(self.uri(key), f"the local copy {local}")
        with copy, atomic_target(Path(local)) as tmp:
            for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
                try:
                    with self._errors(key):
                        try:
                            self.client.download_file(
                                self.bucket, self._name(key), str(tmp), Config=self.transfer_config
                            )
                        except (ChecksumError, FlexibleChecksumError) as exc:
                            raise _BrokenBody(_describe(exc), self.uri(key)) from exc
                    size = os.stat(tmp).st_size
                    if size != art.bytes:
                        raise _BrokenBody(
                            f"downloaded {size} bytes of a {art.bytes}-byte object", self.uri(key)
                        )
                    verify_sha256(self.uri(key), art.sha256, sha256_file(tmp))
                    break
                except (_BrokenBody, CorruptArtifact) as exc:
                    now = self._head(key)
                    if now is None or now.etag != art.etag:
                        msg = "object changed during the download; retry"
                        raise ArtifactError(msg, self.uri(key)) from exc
                    if attempt == _DOWNLOAD_ATTEMPTS:
                        raise
                    log.warning("%s (attempt %d); downloading again", exc, attempt)
                    _backoff(attempt)
        return art

    def _get_body(self, key: str, **kwargs: Any) -> tuple[dict[str, Any], bytes]:
        """GetObject of `key` and its whole body, checked against the length the response
        announced (and the recorded sha256 of a whole object). botocore retries the request;
        a body that breaks off, ends early or arrives damaged is read again here
        (BODY_ATTEMPTS in all). Errors name the URI."""
        from urllib3.exceptions import ProtocolError

        name = self._name(key)
        for attempt in range(1, BODY_ATTEMPTS + 1):
            try:
                try:
                    with self._errors(key):
                        response = self.client.get_object(Bucket=self.bucket, Key=name, **kwargs)
                except ProtocolError as exc:
                    # An error response's body (404, 416, ...) is read by botocore itself, after
                    # its retries: one cut halfway surfaces here, from urllib3.
                    raise _BrokenBody(f"S3 GetObject failed: {exc}", self.uri(key)) from exc
                try:
                    data = response["Body"].read()
                except _body_errors() as exc:
                    raise _BrokenBody(_describe(exc), self.uri(key)) from exc
                expected = _expected_length(response)
                if expected is not None and len(data) != expected:
                    raise _BrokenBody(
                        f"S3 GetObject body ended after {len(data)} of {expected} bytes",
                        self.uri(key),
                    )
                recorded = response.get("Metadata", {}).get(SHA256_META)
                if "Range" not in kwargs and recorded:
                    verify_sha256(self.uri(key), recorded, hashlib.sha256(data).hexdigest())
                return response, data
            except (_BrokenBody, CorruptArtifact) as exc:
                if attempt == BODY_ATTEMPTS:
                    raise
                log.warning("%s (attempt %d); reading it again", exc, attempt)
                _backoff(attempt)
        raise AssertionError("unreachable")

    def read_range(self, key: str, start: int, length: int) -> bytes:
        from botocore.exceptions import ClientError

        check_range(start, length)
        if length == 0:
            return b""
        try:
            _, data = self._get_body(key, Range=f"bytes={start}-{start + length - 1}")
        except ArtifactError as exc:
            if isinstance(exc.__cause__, ClientError) and _status(exc.__cause__) == 416:
                return b""  # start at or past the end: like reading a file at EOF
            raise
        if len(data) > length:
            raise ArtifactError(
                f"S3 returned {len(data)} bytes for a {length}-byte range at {start}", self.uri(key)
            )
        return data

    def list(self, prefix: str = "") -> list[str]:
        check_key(prefix, prefix=True)
        base = f"{self.prefix}/" if self.prefix else ""
        keys = []
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix
            )
            for page in pages:
                keys.extend(o["Key"][len(base) :] for o in page.get("Contents", []))
        return sorted(keys)

    def put_json_if_absent(self, key: str, data: dict[str, Any]) -> bool:
        from botocore.exceptions import ClientError

        body = json.dumps(data).encode()
        try:
            with self._errors(key):
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._name(key),
                    Body=body,
                    ContentType="application/json",
                    Metadata={SHA256_META: hashlib.sha256(body).hexdigest()},
                    IfNoneMatch="*",
                )
        except ArtifactError as exc:
            # 412: it exists. 409 ConditionalRequestConflict: a concurrent create is in flight.
            if isinstance(exc.__cause__, ClientError) and _status(exc.__cause__) in (412, 409):
                return False
            raise
        return True

    def get_json(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            _, data = self._get_body(key)
        except ArtifactError as exc:
            cause = exc.__cause__
            if not isinstance(cause, ClientError) or _status(cause) != 404:
                raise
            if cause.response["Error"].get("Code") != "NoSuchKey":
                self._check_bucket()  # an error body lost on the way: the bucket may be missing
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ArtifactError(f"not a JSON document: {exc}", self.uri(key)) from exc

    def delete(self, key: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def seal(self, keys: list[str]) -> None:
        pass  # the sha256 and tag are the objects' own metadata

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            objects = [{"Key": self._name(k)} for k in keys[i : i + 1000]]
            with self._errors(prefix):
                r = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
                )
            if r.get("Errors"):
                e = r["Errors"][0]
                raise ArtifactError(
                    f"could not delete {len(r['Errors'])} object(s), first {e['Key']!r}: "
                    f"{e.get('Code')} {e.get('Message')}",
                    self.uri(prefix),
                )


def _status(exc: Any) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _describe(exc: Exception) -> str:
    """A short reason for an S3 failure (never includes credentials)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
        exc = exc.__context__
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
    if isinstance(exc, ClientError):
        code, status = exc.response["Error"].get("Code", "?"), _status(exc)
        reasons = {
            "NoSuchBucket": "bucket does not exist",
            "NoSuchKey": "no such object",
            "AccessDenied": "access denied (check credentials and bucket policy)",
            "403": "access denied (check credentials and bucket policy)",
            "404": "not found",
        }
        if exc.operation_name == "HeadBucket" and status == 404:
            code = "NoSuchBucket"
        reason = reasons.get(code) or exc.response["Error"].get("Message") or code
        retried = exc.response.get("ResponseMetadata", {}).get("RetryAttempts")
        after = f", after {retried} retries" if retried else ""
        return f"S3 {exc.operation_name} failed: {reason} ({code}, HTTP {status}{after})"
    return f"S3 request failed: {exc}"
