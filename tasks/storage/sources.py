"""Source checkpoints from a local path or ``s3://bucket/prefix``, reading only what is needed.

An s3:// source is read through a *sparse mirror*: a local directory shaped like the checkpoint's
iteration directory, in which every file is a sparse file of its object's full size holding only
the byte ranges fetched so far (the rest are holes, which read as zeros). Because each file keeps
its real size and layout, the ordinary readers (`open_checkpoint`) open the mirror unchanged.

- `open_source` fetches metadata only: whole small metadata files (`metadata.json`, `common.pt`,
  `.metadata`) and, of each legacy rank file (a torch.save zip), the central directory, the
  30-byte local headers and the non-storage records (`data.pkl`, version tags). No weights.
- `open_source_for_rank` then asks the rank's plan which byte ranges its lazy tensors read
  (`LazyTensor.file_ranges`) and fetches exactly those, so a rank downloads its share of the
  weights and never the optimizer state. Holes read as zeros, so this must cover every read.

Cache layout (``cache_dir``)::

    objects/<hash of object URI>/<hash of ETag>/data          sparse copy of one object version
    objects/<hash of object URI>/<hash of ETag>/ranges.json   [start, end) ranges present in data
    objects/<hash of object URI>/<hash of ETag>/lock          flock held while filling
    mirrors/<hash of iteration URI>/<hash of identity>/...    hard links to the `data` files

An object's bytes are keyed by its ETag, so a changed object is fetched afresh; a mirror directory
is keyed by the whole identity, so it never mixes versions. Several processes may fill the same
object: each holds an exclusive `flock` while it fetches the ranges not yet present, writes them
with `os.pwrite`, syncs, checks the ETag is unchanged and only then records them in
``ranges.json`` (written atomically), so a recorded range always holds that version's bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from config.settings import Settings
from converters.errors import ConversionError, CorruptCheckpoint, NotAMegatronCheckpoint
from converters.megatron.layout import (
    LATEST_FILE,
    SourceCheckpoint,
    detect_format,
    open_checkpoint,
    resolve_iteration_dir,
)
from converters.megatron.legacy import is_rank_model_file, is_storage_record, zip_records
from converters.tensors import FileRange, LazyTensor
from converters.trtllm.plan import Target, rank_tensors
from tasks.jobs.ids import identity_digest
from tasks.storage.store import ArtifactError, ArtifactStore, open_store, space_errors

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_GET_SIZE = 16 * MiB  # largest single GET (bounds the memory of a fetch)
_THREADS = 8  # concurrent GETs per process
_SHORT_READS = 4  # a range read short this many times in a row fails (a changed object: at once)
_GETS = threading.BoundedSemaphore(_THREADS)
_WHOLE_FILES = frozenset({"metadata.json", "common.pt", ".metadata"})  # fetched whole
_ZIP_END = 4096  # the end of a zip: end of central directory records (zip64 ones too)
_ZIP_TAIL = 64 * 1024 + 22  # ... and the longest zip comment
_EOCD = struct.Struct(
    "<4s4xHHII"
)  # signature, disk fields, entries on disk, total, cd size, offset
_ZIP64_LOCATOR = struct.Struct("<4s4xQ4x")  # signature, disk, zip64 EOCD offset, disks
_ZIP64_EOCD = struct.Struct("<4s36xQQ")  # signature, ..., cd size, cd offset

Range = tuple[int, int]  # [start, end)


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
class _Object:
    """One file of the iteration: its key in the store, path in the mirror, size and ETag."""

    key: str
    relative: str
    size: int
    etag: str


@dataclass(frozen=True)
class _Location:
    """Where an s3:// checkpoint's iteration lives: store, key prefix and its files."""

    store: ArtifactStore
    prefix: str  # "" or "iter_0000100/"
    objects: tuple[_Object, ...]

    @property
    def uri(self) -> str:
        return self.store.uri(self.prefix.rstrip("/")) if self.prefix else self.store.uri()


# --------------------------------------------------------------------------------------------
# Public interface


def source_identity(uri: str) -> list[list]:
    """[[relative name, size, version]] of every file of the checkpoint's iteration (names relative
    to `uri`; version = ETag for s3://, mtime_ns for local), sorted by name."""
    if _is_s3(uri):
        location = _locate(uri)
        return [[o.key, o.size, o.etag] for o in location.objects]
    root = Path(uri)
    iter_dir = resolve_iteration_dir(root)
    detect_format(iter_dir)
    identity = []
    for path in sorted(p for p in iter_dir.rglob("*") if p.is_file()):
        st = path.stat()
        identity.append([path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return identity


def open_source(
    uri: str, cache_dir: Path | None = None, *, coalesce_gap: int | None = None
) -> SourceCheckpoint:
    """Local path → `open_checkpoint(path)`. s3:// → a sparse mirror under `cache_dir` holding
    only metadata bytes (enough for config, shapes and estimates); no weights are downloaded."""
    if not _is_s3(uri):
        return open_checkpoint(Path(uri))
    mirror = _Mirror(_locate(uri), _cache_root(cache_dir), _gap(coalesce_gap))
    mirror.fetch_metadata(FetchStats())
    return mirror.open()


def open_source_for_rank(
    uri: str,
    target: Target,
    rank: int,
    cache_dir: Path | None = None,
    *,
    coalesce_gap: int | None = None,
    expected_digest: str | None = None,
) -> tuple[SourceCheckpoint, FetchStats]:
    """Like `open_source`, then fetch every byte range `rank_tensors(source, target, rank)` reads.
    Returns the checkpoint and what this call fetched (local paths: zeros). With
    `expected_digest` (the `identity_digest` the job was planned with), a source that changed
    since then raises SourceChanged instead of being converted under the old plan."""
    if not _is_s3(uri):
        if expected_digest is not None:
            _check_digest(uri, source_identity(uri), expected_digest)
        return open_checkpoint(Path(uri)), FetchStats()
    stats = FetchStats()
    location = _locate(uri)
    if expected_digest is not None:
        _check_digest(uri, [[o.key, o.size, o.etag] for o in location.objects], expected_digest)
    mirror = _Mirror(location, _cache_root(cache_dir), _gap(coalesce_gap))
    mirror.fetch_metadata(stats)
    planned = mirror.open()
    with mirror.naming():
        ranges = [r for t in rank_tensors(planned, target, rank) for r in t.source.file_ranges()]
    mirror.fetch(ranges, stats)
    return mirror.open(), stats  # mapped afresh, after the bytes arrived


# --------------------------------------------------------------------------------------------
# Finding the iteration in a store


def _is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def _check_digest(uri: str, identity: list, expected: str) -> None:
    if identity_digest(identity) != expected:
        raise SourceChanged(
            "the checkpoint changed since the job was planned (files added, removed or "
            "rewritten); retry the job to convert the new version",
            uri,
        )


def _gap(coalesce_gap: int | None) -> int:
    return Settings.from_env().fetch_coalesce_bytes if coalesce_gap is None else coalesce_gap


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).absolute()
    configured = Settings.from_env().cache_dir
    return Path(configured).absolute() if configured else Path.home() / ".cache/porter/sources"


def _iteration_prefix(store: ArtifactStore) -> str:
    """ "" when the store's prefix is an iteration directory, else the one the tracker names."""
    tracker = store.stat(LATEST_FILE)
    if tracker is None:
        return ""

    def unchanged() -> None:
        now = store.stat(LATEST_FILE)
        if now is None or now.etag != tracker.etag:
            raise SourceChanged("changed while it was being read; retry", store.uri(LATEST_FILE))

    data = _read_exactly(store, LATEST_FILE, 0, min(tracker.bytes, 64), unchanged)
    text = data.decode("ascii", "replace")
    text = text.strip()
    if text == "release":
        return "release/"
    if text.isdigit():
        return f"iter_{int(text):07d}/"
    raise NotAMegatronCheckpoint(
        f"expected an iteration number or 'release', found {text[:40]!r}", store.uri(LATEST_FILE)
    )


def latest_iteration(root: str) -> tuple[str, str]:
    """(location of the iteration, its label) that `latest_checkpointed_iteration.txt` under the
    training output `root` names: ("s3://b/run/iter_0000300", "300"), or ".../release" and
    "release". A root without the tracker is NotAMegatronCheckpoint naming it."""
    if _is_s3(root):
        store = open_store(root)
        if store.stat(LATEST_FILE) is None:
            raise NotAMegatronCheckpoint(f"no {LATEST_FILE} under this training output", root)
        name = _iteration_prefix(store).rstrip("/")
        location = store.uri(name)
    else:
        if not (Path(root) / LATEST_FILE).is_file():
            raise NotAMegatronCheckpoint(f"no {LATEST_FILE} under this training output", root)
        iter_dir = resolve_iteration_dir(Path(root))
        name, location = iter_dir.name, str(iter_dir)
    return location, "release" if name == "release" else str(int(name[len("iter_") :]))


def _locate(uri: str) -> _Location:
    """The iteration of an s3:// checkpoint and its objects (sizes and ETags); errors name `uri`."""
    store = open_store(uri)
    prefix = _iteration_prefix(store)
    keys = [
        k
        for k in store.list(prefix)
        if not k.endswith("/") and not (prefix == "" and k == LATEST_FILE)  # no folder markers
    ]
    if not keys:
        if prefix:
            raise NotAMegatronCheckpoint(
                f"points at {prefix}, which holds no objects", store.uri(LATEST_FILE)
            )
        raise NotAMegatronCheckpoint("no such checkpoint: no objects under this prefix", uri)
    relative = [k[len(prefix) :] for k in keys]
    if "metadata.json" not in relative and not any(r.startswith("mp_rank_") for r in relative):
        raise NotAMegatronCheckpoint(
            f"not a Megatron checkpoint: no {LATEST_FILE}, metadata.json or mp_rank_* folders",
            store.uri(prefix.rstrip("/")) if prefix else uri,
        )
    objects = []
    for key, rel in zip(keys, relative, strict=True):
        art = store.stat(key)
        if art is None:
            raise SourceChanged(
                "object disappeared while the checkpoint was listed", store.uri(key)
            )
        objects.append(_Object(key, rel, art.bytes, art.etag))
    return _Location(store, prefix, tuple(objects))


# --------------------------------------------------------------------------------------------
# Byte ranges


def _merge(ranges: list[Range]) -> list[Range]:
    """Sorted, non-overlapping ranges covering the same bytes (touching ranges joined)."""
    merged: list[list[int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _subtract(needed: list[Range], present: list[Range]) -> list[Range]:
    """The parts of merged `needed` not covered by merged `present`."""
    missing, i = [], 0
    for start, end in needed:
        while i < len(present) and present[i][1] <= start:
            i += 1
        j, cursor = i, start
        while j < len(present) and present[j][0] < end:
            if present[j][0] > cursor:
                missing.append((cursor, present[j][0]))
            cursor = max(cursor, present[j][1])
            j += 1
        if cursor < end:
            missing.append((cursor, end))
    return missing


def _coalesce(ranges: list[Range], gap: int) -> list[Range]:
    """Join merged ranges whose gap is below `gap` (fewer GETs for a few unneeded bytes)."""
    joined: list[Range] = []
    for start, end in ranges:
        if joined and start - joined[-1][1] < gap:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return joined


def _split(ranges: list[Range], size: int) -> list[Range]:
    """Cut ranges into pieces of at most `size` bytes."""
    return [(s, min(s + size, end)) for start, end in ranges for s in range(start, end, size)]


def _total(ranges: list[Range]) -> int:
    return sum(end - start for start, end in ranges)


def _read_exactly(
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


# --------------------------------------------------------------------------------------------
# One object's sparse local copy


def _digest(text: str, n: int = 32) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


class _SparseObject:
    """The sparse local copy of one version (ETag) of one object, filled range by range."""

    def __init__(self, store: ArtifactStore, obj: _Object, root: Path, gap: int) -> None:
        self.store, self.obj, self.gap = store, obj, gap
        self.uri = store.uri(obj.key)
        self.dir = root / "objects" / _digest(self.uri) / _digest(obj.etag)
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
            return _merge([(int(s), int(e)) for s, e in record["ranges"]])
        except (OSError, ValueError, TypeError, KeyError):
            return []

    def _record(self, ranges: list[Range]) -> None:
        record = {"uri": self.uri, "etag": self.obj.etag, "size": self.obj.size, "ranges": ranges}
        tmp = self._ranges_file.with_name(f"ranges.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self._ranges_file)

    def ensure(self, ranges: list[Range], stats: FetchStats) -> None:
        """Make `ranges` present, fetching the missing ones (coalesced) under the lock."""
        needed = _merge([(max(0, s), min(e, self.obj.size)) for s, e in ranges])
        if not needed:
            return
        with self._locked() as fd:
            present = self._present()
            missing = _subtract(needed, present)
            stats.add(cached=_total(needed) - _total(missing))
            if not missing:
                return
            spans = _coalesce(missing, self.gap)
            pieces = _split(spans, _GET_SIZE)
            with ThreadPoolExecutor(min(_THREADS, len(pieces))) as pool:
                fetched = sum(pool.map(lambda piece: self._fetch(fd, piece), pieces))
            stats.add(fetched=fetched, ranges=len(pieces))
            os.fsync(fd)  # the bytes are durable before the record says they are there
            self._check_unchanged()
            self._record(_merge(present + spans))

    def _fetch(self, fd: int, piece: Range) -> int:
        start, end = piece
        data = _read_exactly(self.store, self.obj.key, start, end - start, self._check_unchanged)
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


# --------------------------------------------------------------------------------------------
# Zip (legacy .pt) metadata


def _central_directory(part: _SparseObject, stats: FetchStats) -> Range:
    """[start, end) of a zip's central directory, from its end records (zip64 aware)."""
    size = part.obj.size
    for length in (_ZIP_END, _ZIP_TAIL):  # torch writes no comment: the short tail suffices
        tail_start = max(0, size - length)
        part.ensure([(tail_start, size)], stats)
        tail = part.read(tail_start, size - tail_start)
        at = tail.rfind(b"PK\x05\x06")
        if at >= 0 and len(tail) - at >= _EOCD.size:
            break
    else:
        raise CorruptCheckpoint("not a torch zip archive (no end of central directory)", part.uri)
    _, _, entries, cd_size, cd_offset = _EOCD.unpack_from(tail, at)
    if 0xFFFFFFFF in (cd_size, cd_offset) or entries == 0xFFFF:
        cd_size, cd_offset = _zip64_directory(part, tail_start + at, stats)
    if cd_offset + cd_size > size:
        raise CorruptCheckpoint(
            f"the zip central directory ({cd_offset}+{cd_size}) lies past the end ({size})",
            part.uri,
        )
    return cd_offset, cd_offset + cd_size


def _zip64_directory(part: _SparseObject, eocd_at: int, stats: FetchStats) -> tuple[int, int]:
    """(size, offset) of the central directory from the zip64 end records."""
    at = eocd_at - _ZIP64_LOCATOR.size
    part.ensure([(max(0, at), eocd_at)], stats)
    magic, record_at = _ZIP64_LOCATOR.unpack(part.read(at, _ZIP64_LOCATOR.size))
    if at < 0 or magic != b"PK\x06\x07":
        raise CorruptCheckpoint("bad zip64 end of central directory locator", part.uri)
    part.ensure([(record_at, record_at + _ZIP64_EOCD.size)], stats)
    magic, cd_size, cd_offset = _ZIP64_EOCD.unpack(part.read(record_at, _ZIP64_EOCD.size))
    if magic != b"PK\x06\x06":
        raise CorruptCheckpoint("bad zip64 end of central directory record", part.uri)
    return cd_size, cd_offset


def _fetch_zip_metadata(part: _SparseObject, stats: FetchStats) -> None:
    """Make a torch.save zip loadable with mmap: directory, local headers, non-storage records."""
    part.ensure([_central_directory(part, stats)], stats)
    try:
        with zipfile.ZipFile(part.data) as archive:
            headers = [(i.header_offset, i.header_offset + 30) for i in archive.infolist()]
    except (zipfile.BadZipFile, ValueError) as exc:
        raise CorruptCheckpoint(f"cannot read the zip directory: {exc}", part.uri) from exc
    part.ensure(headers, stats)
    try:
        records = zip_records(part.data)
    except CorruptCheckpoint as exc:
        raise CorruptCheckpoint(str(exc).removeprefix(f"{exc.path}: "), part.uri) from exc
    small = [(s, s + n) for name, (s, n) in records.items() if not is_storage_record(name)]
    part.ensure(small, stats)


# --------------------------------------------------------------------------------------------
# The mirror of one iteration


class _Mirror:
    """The sparse mirror of one s3:// iteration directory (one identity)."""

    def __init__(self, location: _Location, root: Path, gap: int) -> None:
        self.location = location
        identity = json.dumps([[o.relative, o.size, o.etag] for o in location.objects])
        self.dir = root / "mirrors" / _digest(location.uri) / _digest(identity, 16)
        self.parts = {
            o.relative: _SparseObject(location.store, o, root, gap) for o in location.objects
        }

    def _link(self) -> None:
        """Hard-link every object's data file into the mirror directory (idempotent)."""
        for relative, part in self.parts.items():
            dest = self.dir / relative
            with contextlib.suppress(FileNotFoundError):
                if dest.samefile(part.data):
                    continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{threading.get_ident()}.link")
            tmp.unlink(missing_ok=True)
            os.link(part.data, tmp)
            os.replace(tmp, dest)

    def fetch_metadata(self, stats: FetchStats) -> None:
        """Create every file (sparse, full size) and fetch what opening the checkpoint reads."""
        for part in self.parts.values():
            part.create()
        self._link()
        jobs = []
        for relative, part in self.parts.items():
            if relative in _WHOLE_FILES:
                jobs.append(lambda p=part: p.ensure([(0, p.obj.size)], stats))
            elif is_rank_model_file(relative):
                jobs.append(lambda p=part: _fetch_zip_metadata(p, stats))
        _run_all(jobs)

    def fetch(self, ranges: list[FileRange], stats: FetchStats) -> None:
        """Fetch byte ranges given as (mirror path, offset, length)."""
        by_part: dict[str, list[Range]] = {}
        for path, offset, length in ranges:
            relative = self._relative(path)
            by_part.setdefault(relative, []).append((offset, offset + length))
        _run_all([lambda p=self.parts[r], rs=rs: p.ensure(rs, stats) for r, rs in by_part.items()])

    def _relative(self, path: Path) -> str:
        try:
            relative = Path(path).relative_to(self.dir).as_posix()
        except ValueError:
            relative = None
        if relative not in self.parts:
            raise CorruptCheckpoint(f"reads {path}, which is not a file of the mirror", self.dir)
        return relative

    def open(self) -> SourceCheckpoint:
        with self.naming():
            return MirroredCheckpoint(open_checkpoint(self.dir), self)

    def rename(self, exc: ConversionError) -> ConversionError:
        """The same error naming the s3:// URI instead of the mirror path (if it named one)."""
        local, uri = str(self.dir), self.location.uri
        if exc.path is None or not exc.path.startswith(local):
            return exc
        message = str(exc).removeprefix(f"{exc.path}: ").replace(local, uri)
        try:
            return type(exc)(message, uri + exc.path[len(local) :])
        except TypeError:  # a subclass with another signature
            return ConversionError(message, uri + exc.path[len(local) :])

    @contextlib.contextmanager
    def naming(self) -> Iterator[None]:
        """Re-raise conversion errors with s3:// URIs in place of mirror paths."""
        try:
            yield
        except ConversionError as exc:
            renamed = self.rename(exc)
            if renamed is exc:
                raise
            raise renamed from exc


def _run_all(jobs: list) -> None:
    """Run callables on a few threads (object fetches are independent); re-raise the first error."""
    if not jobs:
        return
    with ThreadPoolExecutor(min(_THREADS, len(jobs))) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


# --------------------------------------------------------------------------------------------
# What callers get


class MirroredCheckpoint:
    """A checkpoint opened from a sparse mirror: the reader's interface, with errors naming the
    s3:// objects. `path` is the local mirror directory, `uri` the iteration's s3:// URI."""

    def __init__(self, inner: SourceCheckpoint, mirror: _Mirror) -> None:
        self._inner, self._mirror = inner, mirror
        self.path, self.format, self.config = inner.path, inner.format, inner.config
        self.tp, self.pp = inner.tp, inner.pp
        self.uri = mirror.location.uri

    def has(self, name: str) -> bool:
        with self._mirror.naming():
            return self._inner.has(name)

    def tensor(self, name: str) -> LazyTensor:
        with self._mirror.naming():
            return _Named(self._inner.tensor(name), self._mirror)

    def files(self) -> list[Path]:
        return self._inner.files()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)


class _Named(LazyTensor):
    """A lazy tensor whose read errors name s3:// URIs instead of mirror paths."""

    def __init__(self, inner: LazyTensor, mirror: _Mirror) -> None:
        self.inner, self.mirror = inner, mirror
        self.shape, self.dtype = inner.shape, inner.dtype

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        return _Named(self.inner.narrow(dim, start, length), self.mirror)

    def materialize(self) -> torch.Tensor:
        with self.mirror.naming():
            return self.inner.materialize()

    def file_ranges(self) -> list[FileRange]:
        with self.mirror.naming():
            return self.inner.file_ranges()

    @property
    def source_nbytes(self) -> int:
        return self.inner.source_nbytes
