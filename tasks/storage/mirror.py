"""The sparse mirror of one s3:// iteration directory, and the checkpoint opened from it.

The mirror is a local directory shaped like the checkpoint's iteration directory, in which every
file is a hard link to the sparse copy of its object (`tasks.storage.sparse`): a file of the
object's full size holding only the byte ranges fetched so far (the rest are holes, which read as
zeros). Because each file keeps its real size and layout, the ordinary readers (`open_checkpoint`)
open the mirror unchanged. `Mirror.fetch_metadata` fetches whole small metadata files
(`metadata.json`, `common.pt`, `.metadata`) and, of each legacy rank file (a torch.save zip), the
central directory, the 30-byte local headers and the non-storage records (`data.pkl`, version
tags); `Mirror.fetch` fetches given byte ranges.

Cache layout (``cache_dir``)::

    objects/<hash of object URI>/<hash of ETag>/...           sparse copies (`tasks.storage.sparse`)
    mirrors/<hash of iteration URI>/<hash of identity>/...    hard links to the `data` files

A mirror directory is keyed by the whole identity, so it never mixes versions.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from converters.errors import ConversionError, CorruptCheckpoint
from converters.megatron.layout import SourceCheckpoint, open_checkpoint
from converters.megatron.rank_dirs import is_rank_model_file
from converters.tensors import FileRange, LazyTensor
from converters.torch_zip import check_torch_zip, is_storage_record
from tasks.storage.ranges import Range
from tasks.storage.sparse import THREADS, FetchStats, Location, SparseObject, digest

_WHOLE_FILES = frozenset({"metadata.json", "common.pt", ".metadata"})  # fetched whole
_ZIP_END = 4096  # the end of a zip: end of central directory records (zip64 ones too)
_ZIP_TAIL = 64 * 1024 + 22  # ... and the longest zip comment
_EOCD = struct.Struct(
    "<4s4xHHII"
)  # signature, disk fields, entries on disk, total, cd size, offset
_ZIP64_LOCATOR = struct.Struct("<4s4xQ4x")  # signature, disk, zip64 EOCD offset, disks
_ZIP64_EOCD = struct.Struct("<4s36xQQ")  # signature, ..., cd size, cd offset


# --------------------------------------------------------------------------------------------
# Zip (legacy .pt) metadata


def _central_directory(part: SparseObject, stats: FetchStats) -> Range:
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


def _zip64_directory(part: SparseObject, eocd_at: int, stats: FetchStats) -> tuple[int, int]:
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


def _fetch_zip_metadata(part: SparseObject, stats: FetchStats) -> None:
    """Make a torch.save zip loadable with mmap: directory, local headers, non-storage records."""
    part.ensure([_central_directory(part, stats)], stats)
    try:
        with zipfile.ZipFile(part.data) as archive:
            headers = [(i.header_offset, i.header_offset + 30) for i in archive.infolist()]
    except (zipfile.BadZipFile, ValueError) as exc:
        raise CorruptCheckpoint(f"cannot read the zip directory: {exc}", part.uri) from exc
    part.ensure(headers, stats)
    try:
        records = check_torch_zip(part.data, part.data)
    except CorruptCheckpoint as exc:
        raise CorruptCheckpoint(exc.reason, part.uri) from exc
    small = [
        (r.offset, r.offset + r.nbytes)
        for name, r in records.items()
        if not is_storage_record(name)
    ]
    part.ensure(small, stats)


# --------------------------------------------------------------------------------------------
# The mirror of one iteration


class Mirror:
    """The sparse mirror of one s3:// iteration directory (one identity)."""

    def __init__(self, location: Location, root: Path, gap: int) -> None:
        self.location = location
        identity = json.dumps([[o.relative, o.size, o.etag] for o in location.objects])
        self.dir = root / "mirrors" / digest(location.uri) / digest(identity, 16)
        self.parts = {
            o.relative: SparseObject(location.store, o, root, gap) for o in location.objects
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

    def open(self, architecture: str | None = None) -> SourceCheckpoint:
        with self.naming():
            return MirroredCheckpoint(open_checkpoint(self.dir, architecture), self)

    def rename(self, exc: ConversionError) -> ConversionError:
        """The same error naming the s3:// URI instead of the mirror path (if it named one)."""
        local, uri = str(self.dir), self.location.uri
        if exc.path is None or not exc.path.startswith(local):
            return exc
        message = exc.reason.replace(local, uri)
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
    with ThreadPoolExecutor(min(THREADS, len(jobs))) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


# --------------------------------------------------------------------------------------------
# What callers get


class MirroredCheckpoint:
    """A checkpoint opened from a sparse mirror: the reader's interface, with errors naming the
    s3:// objects. `path` is the local mirror directory, `uri` the iteration's s3:// URI."""

    def __init__(self, inner: SourceCheckpoint, mirror: Mirror) -> None:
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

    def __init__(self, inner: LazyTensor, mirror: Mirror) -> None:
        self.inner, self.mirror = inner, mirror
        self.shape, self.dtype = inner.shape, inner.dtype

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        return _Named(self.inner.narrow(dim, start, length), self.mirror)

    def materialize(self) -> np.ndarray:
        with self.mirror.naming():
            return self.inner.materialize()

    def file_ranges(self) -> list[FileRange]:
        with self.mirror.naming():
            return self.inner.file_ranges()

    @property
    def source_nbytes(self) -> int:
        return self.inner.source_nbytes
