"""The sparse local copy of one version (ETag) of one store object, filled range by range.

The copy is a sparse file of the object's full size holding only the byte ranges fetched so far
(the rest are holes, which read as zeros), beside a record of the ranges it holds and a lock::

    objects/<hash of object URI>/<hash of ETag>/data          sparse copy of one object version
    objects/<hash of object URI>/<hash of ETag>/ranges.json   [start, end) ranges present in data
    objects/<hash of object URI>/<hash of ETag>/lock          flock held while filling

An object's bytes are keyed by its ETag, so a changed object is fetched afresh. Several processes
may fill the same object: each holds an exclusive `flock` while it fetches the ranges not yet
present, writes them with `os.pwrite`, syncs, checks the ETag is unchanged and only then records
them in ``ranges.json`` (written atomically), so a recorded range always holds that version's bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

from converters.errors import ConversionError
from tasks.storage.base import ArtifactError, ArtifactStore, MiB, space_errors
from tasks.storage.ranges import Range, coalesce, merge, split, subtract, total

log = logging.getLogger(__name__)

_GET_SIZE = 16 * MiB  # largest single GET (bounds the memory of a fetch)
THREADS = 8  # concurrent GETs per process
_SHORT_READS = 4  # a range read short this many times in a row fails (a changed object: at once)
_GETS = threading.BoundedSemaphore(THREADS)


class SourceChanged(ConversionError):
    """An s3:// object changed while Porter was reading it; retrying reads the new version."""


@dataclass
class FetchStats:
    """What reading a source cost: bytes downloaded, range GETs, needed bytes already cached."""

    bytes_fetched: int = 0
    ranges_fetched: int = 0
    bytes_cached: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, fetched: int = 0, ranges: int = 0, cached: int = 0) -> None:
        """Count one fetch (thread-safe: objects are filled on several threads)."""
        with self._lock:
            self.bytes_fetched += fetched
            self.ranges_fetched += ranges
            self.bytes_cached += cached

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


@dataclass(frozen=True)
class SourceObject:
    """One file of the iteration: its key in the store, path in the mirror, size and ETag."""

    key: str
    relative: str
    size: int
    etag: str


def read_exactly(
    store: ArtifactStore, key: str, start: int, length: int, unchanged: Callable[[], None]
) -> bytes:
    """`length` bytes of `key` from `start`, which the caller knows the object holds. A read
    that returns fewer (a body cut short where nothing announced its length, so the store could
    not tell) is continued from where it stopped. A read that returns nothing calls
    `unchanged()`, which raises SourceChanged if the object changed; after `_SHORT_READS` short
    reads this raises ArtifactError: S3 keeps cutting the body short."""
    parts, got, short = [], 0, 0
    while got < length:
        with _GETS:
            data = store.read_range(key, start + got, length - got)
        parts.append(data)
        got += len(data)
        if got < length:
            short += 1
            if not data or short >= _SHORT_READS:
                unchanged()  # nothing more (the end of a shorter object?), or once too often
            if short >= _SHORT_READS:
                raise ArtifactError(
                    f"S3 returned {got} of the {length} bytes at offset {start} after {short} "
                    "short reads (the object is unchanged)",
                    store.uri(key),
                )
            log.warning(
                "%s: short read at %d (%d of %d bytes); reading the rest",
                store.uri(key), start, got, length,
            )  # fmt: skip
    return b"".join(parts)


def digest(text: str, n: int = 32) -> str:
    """The first `n` hex digits of the sha256 of `text` (a cache folder name)."""
    return hashlib.sha256(text.encode()).hexdigest()[:n]


class SparseObject:
    """The sparse local copy of one version (ETag) of one object, filled range by range."""

    def __init__(self, store: ArtifactStore, obj: SourceObject, root: Path, gap: int) -> None:
        self.store, self.obj, self.gap = store, obj, gap
        self.uri = store.uri(obj.key)
        self.dir = root / "objects" / digest(self.uri) / digest(obj.etag)
        self.data = self.dir / "data"
        self._ranges_file = self.dir / "ranges.json"

    def create(self) -> None:
        """Create the data file (a hole of the object's size) if it is not there yet."""
        with self._locked():
            pass

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """Hold the object's exclusive lock; yield a read-write descriptor of the data file.
        A write that fails for lack of space (here or while the caller holds it) is NoSpace
        naming the object and the cache file."""
        where = f"the source cache file {self.data} (PORTER_CACHE_DIR)"
        with space_errors(self.uri, where), self._locked_fd() as fd:
            yield fd

    @contextlib.contextmanager
    def _locked_fd(self) -> Iterator[int]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fd = os.open(self.data, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size != self.obj.size:
                    os.ftruncate(fd, self.obj.size)  # a hole of the object's size
                yield fd
            finally:
                os.close(fd)
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _present(self) -> list[Range]:
        """Ranges recorded for this version; none if the record is missing or unreadable."""
        try:
            record = json.loads(self._ranges_file.read_text())
            if record["etag"] != self.obj.etag or record["size"] != self.obj.size:
                return []
            return merge([(int(s), int(e)) for s, e in record["ranges"]])
        except (OSError, ValueError, TypeError, KeyError):
            return []

    def _record(self, ranges: list[Range]) -> None:
        record = {"uri": self.uri, "etag": self.obj.etag, "size": self.obj.size, "ranges": ranges}
        tmp = self._ranges_file.with_name(f"ranges.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self._ranges_file)

    def ensure(self, ranges: list[Range], stats: FetchStats) -> None:
        """Make `ranges` present, fetching the missing ones (coalesced) under the lock."""
        needed = merge([(max(0, s), min(e, self.obj.size)) for s, e in ranges])
        if not needed:
            return
        with self._locked() as fd:
            present = self._present()
            missing = subtract(needed, present)
            stats.add(cached=total(needed) - total(missing))
            if not missing:
                return
            spans = coalesce(missing, self.gap)
            pieces = split(spans, _GET_SIZE)
            with ThreadPoolExecutor(min(THREADS, len(pieces))) as pool:
                fetched = sum(pool.map(lambda piece: self._fetch(fd, piece), pieces))
            stats.add(fetched=fetched, ranges=len(pieces))
            os.fsync(fd)  # the bytes are durable before the record says they are there
            self._check_unchanged()
            self._record(merge(present + spans))

    def _fetch(self, fd: int, piece: Range) -> int:
        start, end = piece
        data = read_exactly(self.store, self.obj.key, start, end - start, self._check_unchanged)
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, start)
            view, start = view[written:], start + written
        return len(data)

    def _check_unchanged(self) -> None:
        now = self.store.stat(self.obj.key)
        if now is None or now.etag != self.obj.etag:
            raise SourceChanged(
                f"object changed while it was being read (ETag {self.obj.etag} → "
                f"{now.etag if now else 'deleted'}); retry to read the new version",
                self.uri,
            )

    def read(self, start: int, length: int) -> bytes:
        """Bytes of the local copy (callers `ensure` them first)."""
        with open(self.data, "rb") as f:
            f.seek(start)
            return f.read(length)


@dataclass(frozen=True)
class Location:
    """Where an s3:// checkpoint's iteration lives: store, key prefix and its files."""

    store: ArtifactStore
    prefix: str  # "" or "iter_0000100/"
    objects: tuple[SourceObject, ...]

    @property
    def uri(self) -> str:
        return self.store.uri(self.prefix.rstrip("/")) if self.prefix else self.store.uri()
