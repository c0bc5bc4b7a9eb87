"""The artifact store interface (`ArtifactStore`) and what its implementations share.

One interface over a local directory (`tasks.storage.local`) and ``s3://bucket/prefix``
(`tasks.storage.s3`); `tasks.storage.store.open_store` picks one for a URI.

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
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from converters.errors import ConversionError

MiB = 1024 * 1024
_CHUNK = 8 * MiB
RESERVED = ".porter-"  # path components starting with this are the store's own files
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
        if part.startswith(RESERVED):
            raise InvalidKey(f"artifact {what} {key!r} uses the reserved name {part!r}")
    return key


def hash_copy(src: BinaryIO, dst: BinaryIO | None = None) -> tuple[str, int]:
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
        return hash_copy(f)[0]


@contextlib.contextmanager
def atomic_target(dest: Path) -> Iterator[Path]:
    """Yield a temp path next to `dest`; on success rename it onto `dest`, else remove it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{RESERVED}tmp-", suffix=f"-{dest.name}", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def verify_sha256(uri: str, expected: str | None, actual: str) -> None:
    """Raise CorruptArtifact naming `uri` if the recorded sha256 (`expected`, None if none)
    is not `actual`."""
    if expected is not None and expected != actual:
        raise CorruptArtifact(
            f"sha256 mismatch: recorded {expected}, downloaded bytes hash to {actual}; "
            "the object was modified or corrupted after it was written",
            uri,
        )


def check_range(start: int, length: int) -> None:
    """Raise ValueError for a negative start or length."""
    if start < 0 or length < 0:
        raise ValueError(f"invalid byte range: start={start}, length={length}")


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
