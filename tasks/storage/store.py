"""Artifact store: one interface over a local directory and ``s3://bucket/prefix``.

Keys are relative, '/'-separated paths (``"job/rank0.safetensors"``). Every artifact written by
``put_file`` carries its own sha256 (S3: object metadata ``sha256``; local: a sidecar under
``.porter-meta/``), because a multipart upload's S3 checksum is not a checksum of the file.
``put_json_if_absent`` is the commit primitive: it creates the object only if no object exists
(S3: ``PutObject`` with ``IfNoneMatch="*"``; local: ``os.link`` of a complete temp file).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from converters.errors import ConversionError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_CHUNK = 8 * MiB
_RESERVED = ".porter-"  # path components starting with this are the store's own files
_META_DIR = ".porter-meta"
SHA256_META = "sha256"  # S3 user metadata name (sent as x-amz-meta-sha256)
TAG_META = "porter-tag"  # who wrote an artifact (a job and its source identity), for reuse checks


class ArtifactError(ConversionError):
    """An artifact cannot be read or written; the message names its URI."""


class CorruptArtifact(ArtifactError):
    """An artifact's bytes do not match the sha256 recorded when it was written."""


class NoSpace(ArtifactError):
    """A local write failed for lack of space: disk full, quota, or a file-size limit."""


_NO_SPACE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (the process's file-size limit, RLIMIT_FSIZE, or the file system's)",
}


@contextlib.contextmanager
def space_errors(uri: str, what: str) -> Iterator[None]:
    """Re-raise a write failing for lack of space (ENOSPC, EDQUOT, EFBIG) as NoSpace naming
    `uri` and the local file (`what` says which file and, if useful, how to make room)."""
    try:
        yield
    except OSError as exc:
        reason = _NO_SPACE.get(exc.errno) if exc.errno is not None else None
        if reason is None:
            raise
        raise NoSpace(f"{reason} while writing {what} ([Errno {exc.errno}])", uri) from exc


class InvalidKey(ArtifactError, ValueError):
    """A key is not a relative '/'-separated path inside the store."""


@dataclass(frozen=True)
class Artifact:
    """One stored object: its key, size in bytes, recorded sha256 (None if none), ETag, and the
    tag given by whoever wrote it (None if none)."""

    key: str
    bytes: int
    sha256: str | None
    etag: str
    tag: str | None = None


def check_key(key: str, *, prefix: bool = False) -> str:
    """Return `key` if it is a safe relative key (or key prefix); raise InvalidKey otherwise."""
    what = "prefix" if prefix else "key"
    if not isinstance(key, str):
        raise InvalidKey(f"artifact {what} must be a string, got {type(key).__name__}")
    if "\x00" in key:
        raise InvalidKey(f"artifact {what} {key!r} contains a NUL byte")
    if key.startswith("/") or "\\" in key:
        raise InvalidKey(f"artifact {what} {key!r} must be relative and '/'-separated")
    if prefix and key == "":
        return key
    parts = key.split("/")
    if prefix and parts[-1] == "":
        parts = parts[:-1]  # "a/b/" names a folder
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidKey(f"artifact {what} {key!r} has an empty, '.' or '..' component")
        if part.startswith(_RESERVED):
            raise InvalidKey(f"artifact {what} {key!r} uses the reserved name {part!r}")
    return key


def _hash_copy(src: BinaryIO, dst: BinaryIO | None = None) -> tuple[str, int]:
    """Read `src` to the end (copying into `dst` if given); return (sha256 hex, bytes read)."""
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return digest.hexdigest(), size


def sha256_file(path: Path) -> str:
    """The sha256 of a local file, read in chunks."""
    with open(path, "rb") as f:
        return _hash_copy(f)[0]


@contextlib.contextmanager
def _atomic_target(dest: Path) -> Iterator[Path]:
    """Yield a temp path next to `dest`; on success rename it onto `dest`, else remove it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_RESERVED}tmp-", suffix=f"-{dest.name}", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _verify(uri: str, expected: str | None, actual: str) -> None:
    if expected is not None and expected != actual:
        raise CorruptArtifact(
            f"sha256 mismatch: recorded {expected}, downloaded bytes hash to {actual}; "
            "the object was modified or corrupted after it was written",
            uri,
        )


class ArtifactStore(Protocol):
    """What the steps need from where artifacts live."""

    def uri(self, key: str = "") -> str:
        """The URI of `key` (or of the store root)."""
        ...

    def put_file(
        self,
        local: Path,
        key: str,
        *,
        sha256: str | None = None,
        tag: str | None = None,
        move: bool = False,
    ) -> Artifact:
        """Upload `local` as `key` (replacing it), recording its sha256 (computed unless given)
        and `tag`. With `move`, `local` is consumed (renamed into place where possible)."""
        ...

    @contextlib.contextmanager
    def scratch(self, key: str) -> Iterator[Path]:
        """A temporary local path to produce `key`'s bytes in (then `put_file(..., move=True)`);
        removed on exit if still there. Local stores place it beside `key`, so moving is a rename."""
        ...

    def get_file(self, key: str, local: Path) -> Artifact:
        """Download `key` to `local` atomically; verify the recorded sha256."""
        ...

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of `key` from offset `start` (fewer at the end of the object)."""
        ...

    def stat(self, key: str) -> Artifact | None:
        """Size, ETag and recorded sha256 of `key`; None if absent."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with `prefix` (a string prefix, as in S3)."""
        ...

    def put_json_if_absent(self, key: str, data: dict[str, Any]) -> bool:
        """Create `key` with `data` as JSON unless it exists; True if this call created it."""
        ...

    def get_json(self, key: str) -> dict[str, Any] | None:
        """The JSON object stored at `key`; None if absent."""
        ...

    def delete(self, key: str) -> None:
        """Delete `key` (no error if absent)."""
        ...

    def seal(self, keys: list[str]) -> None:
        """`keys` are committed (listed in a manifest with their sha256): drop the per-artifact
        bookkeeping the store kept beside them, if any."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key starting with `prefix`."""
        ...


# --------------------------------------------------------------------------------------------
# Local directory


class LocalStore:
    """Artifacts as files under `root`. Writes are atomic (temp file + rename).

    The ETag of a file is derived from its inode, size and mtime (every write is a rename of a
    new file, so each write gets a new ETag). The sha256 recorded by `put_file` lives in
    ``root/.porter-meta/<key>.json`` and is trusted only while the file's ETag is unchanged.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()

    def uri(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _meta_path(self, key: str) -> Path:
        return self.root / _META_DIR / f"{key}.json"

    @staticmethod
    def _etag(st: os.stat_result) -> str:
        return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"

    def put_file(
        self,
        local: Path,
        key: str,
        *,
        sha256: str | None = None,
        tag: str | None = None,
        move: bool = False,
    ) -> Artifact:
        with space_errors(self.uri(key), f"{key} in {self.root}"):
            return self._put_file(local, key, sha256=sha256, tag=tag, move=move)

    def _put_file(
        self, local: Path, key: str, *, sha256: str | None, tag: str | None, move: bool
    ) -> Artifact:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move and sha256 is not None and os.stat(local).st_dev == os.stat(dest.parent).st_dev:
            with open(local, "rb+") as f:
                os.fsync(f.fileno())
            etag = self._etag(os.stat(local))  # rename keeps inode, size and mtime
            self._write_meta(key, sha256, os.stat(local).st_size, etag, tag)
            os.replace(local, dest)
            return Artifact(key, os.stat(dest).st_size, sha256, etag, tag)
        with open(local, "rb") as src, _atomic_target(dest) as tmp:
            with open(tmp, "wb") as dst:
                sha, size = _hash_copy(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            if sha256 is not None and sha256 != sha:
                raise CorruptArtifact(
                    f"{local} hashes to {sha}, not the given {sha256}", self.uri(key)
                )
            etag = self._etag(os.stat(tmp))
            self._write_meta(key, sha, size, etag, tag)
        if move:
            Path(local).unlink(missing_ok=True)
        return Artifact(key, size, sha, etag, tag)

    def _write_meta(self, key: str, sha: str, size: int, etag: str, tag: str | None) -> None:
        with _atomic_target(self._meta_path(key)) as mtmp:
            mtmp.write_text(json.dumps({"sha256": sha, "bytes": size, "etag": etag, "tag": tag}))

    @contextlib.contextmanager
    def scratch(self, key: str) -> Iterator[Path]:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        path = dest.parent / f"{_RESERVED}tmp-{uuid.uuid4().hex}-{dest.name}"
        try:
            with space_errors(self.uri(key), f"the scratch file {path}"):
                yield path
        finally:
            path.unlink(missing_ok=True)

    def stat(self, key: str) -> Artifact | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        etag, sha, tag = self._etag(st), None, None
        with contextlib.suppress(FileNotFoundError, ValueError):
            meta = json.loads(self._meta_path(key).read_text())
            if meta.get("etag") == etag:
                sha, tag = meta.get("sha256"), meta.get("tag")
        return Artifact(key, st.st_size, sha, etag, tag)

    def _require(self, key: str) -> Artifact:
        art = self.stat(key)
        if art is None:
            raise ArtifactError("no such artifact", self.uri(key))
        return art

    def get_file(self, key: str, local: Path) -> Artifact:
        art = self._require(key)
        copy = space_errors(self.uri(key), f"the local copy {local}")
        with copy, open(self._path(key), "rb") as src, _atomic_target(Path(local)) as tmp:
            with open(tmp, "wb") as dst:
                sha, _ = _hash_copy(src, dst)
            _verify(self.uri(key), art.sha256, sha)
        return art

    def read_range(self, key: str, start: int, length: int) -> bytes:
        _check_range(start, length)
        self._require(key)
        with open(self._path(key), "rb") as f:
            f.seek(start)
            return f.read(length)

    def list(self, prefix: str = "") -> list[str]:
        check_key(prefix, prefix=True)
        # Walk only the deepest folder that can hold matches.
        base = self.root / prefix.rpartition("/")[0]
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(_RESERVED)]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(_RESERVED) and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def put_json_if_absent(self, key: str, data: dict[str, Any]) -> bool:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f"{_RESERVED}tmp-{uuid.uuid4().hex}-{dest.name}"
        try:
            with space_errors(self.uri(key), str(tmp)), open(tmp, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, dest)  # atomic: fails if dest exists, never shows a partial file
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def get_json(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key).read_bytes())
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        for path in (self._path(key), self._meta_path(key)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._prune(key)

    def seal(self, keys: list[str]) -> None:
        for key in keys:
            self._meta_path(key).unlink(missing_ok=True)
            self._prune(key)

    def _prune(self, key: str) -> None:
        """Remove the folders of `key` (data and sidecar) that are left empty, up to the root."""
        for top in (self.root, self.root / _META_DIR):
            folder = (top / key).parent
            while folder != self.root and folder.is_relative_to(self.root):
                try:
                    folder.rmdir()
                except OSError:
                    break
                folder = folder.parent

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            for path in (self._path(key), self._meta_path(key)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for top in (self.root, self.root / _META_DIR):  # prune folders left empty
            base = top / prefix.rpartition("/")[0]
            for dirpath, _, _ in sorted(os.walk(base), key=lambda w: -len(w[0])):
                if Path(dirpath) != top:
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)


def _check_range(start: int, length: int) -> None:
    if start < 0 or length < 0:
        raise ValueError(f"invalid byte range: start={start}, length={length}")


# --------------------------------------------------------------------------------------------
# S3


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
        fd, tmp = tempfile.mkstemp(prefix=f"{_RESERVED}tmp-", suffix=f"-{key.rsplit('/', 1)[-1]}")
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
        with copy, _atomic_target(Path(local)) as tmp:
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
                    _verify(self.uri(key), art.sha256, sha256_file(tmp))
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
        name = self._name(key)
        for attempt in range(1, BODY_ATTEMPTS + 1):
            with self._errors(key):
                response = self.client.get_object(Bucket=self.bucket, Key=name, **kwargs)
            try:
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
                    _verify(self.uri(key), recorded, hashlib.sha256(data).hexdigest())
                return response, data
            except (_BrokenBody, CorruptArtifact) as exc:
                if attempt == BODY_ATTEMPTS:
                    raise
                log.warning("%s (attempt %d); reading it again", exc, attempt)
                _backoff(attempt)
        raise AssertionError("unreachable")

    def read_range(self, key: str, start: int, length: int) -> bytes:
        from botocore.exceptions import ClientError

        _check_range(start, length)
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


# --------------------------------------------------------------------------------------------


def open_store(uri: str | Path, **s3_options: Any) -> ArtifactStore:
    """``s3://bucket/prefix`` → S3Store (extra options go to it); anything else → LocalStore."""
    text = str(uri)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not bucket:
            raise ArtifactError("an s3:// URI needs a bucket: s3://bucket/prefix", text)
        return S3Store(bucket, prefix, **s3_options)
    return LocalStore(text)


class CachedFetcher:
    """A local cache of store objects keyed by ETag.

    `fetch` asks the store for the object's ETag (a HEAD, no body) and downloads only when this
    ETag is not cached yet; older versions of the same key are removed. With ``verify=True`` a
    cache hit is re-hashed against the recorded sha256 and re-downloaded if it was tampered with.
    """

    def __init__(self, cache_dir: Path | str) -> None:
        self.cache_dir = Path(cache_dir)

    def _slot(self, store: ArtifactStore, key: str) -> Path:
        return self.cache_dir / hashlib.sha256(store.uri(key).encode()).hexdigest()[:32]

    def fetch(self, store: ArtifactStore, key: str, *, verify: bool = False) -> Path:
        art = store.stat(key)
        if art is None:
            raise ArtifactError("no such artifact", store.uri(key))
        slot = self._slot(store, key)
        version = hashlib.sha256(art.etag.encode()).hexdigest()[:32]
        path = slot / version / key.rsplit("/", 1)[-1]
        if path.is_file() and self._intact(path, art, verify):
            return path
        got = store.get_file(key, path)
        if got.etag != art.etag:  # replaced in between: file it under the version we got
            newer = slot / hashlib.sha256(got.etag.encode()).hexdigest()[:32] / path.name
            newer.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, newer)
            path, version = newer, newer.parent.name
        for old in slot.iterdir():
            if old.name != version:
                shutil.rmtree(old, ignore_errors=True)
        return path

    @staticmethod
    def _intact(path: Path, art: Artifact, verify: bool) -> bool:
        if path.stat().st_size != art.bytes:
            log.warning("cached %s has the wrong size; fetching it again", path)
            return False
        if verify and art.sha256 is not None and sha256_file(path) != art.sha256:
            log.warning("cached %s does not match its sha256; fetching it again", path)
            return False
        return True
