"""Read torch.save zip archives without torch: every tensor described (`StoredTensor`), not read.

A torch.save archive is a zip of uncompressed records: `<prefix>/data.pkl` (the pickled structure),
`<prefix>/data/<key>` (one storage's bytes each), `<prefix>/byteorder`, `version`, ... `load`
reads the zip directory, each record's 30-byte local header, the byte order and the pickle, and
nothing else: a tensor's bytes are read only when its `array()` is touched (a view over one
read-only memory map of the file), so a sparse copy holding just those records (the S3 mirror) is
enough to open an archive.

It is as strict as `torch.load(weights_only=True)` with Porter's allow-list, before anything is
unpickled: compressed or encrypted records (a zip bomb), records past the end of the file, a
pickle over `MAX_PICKLE_BYTES` and big-endian archives are refused; the pickle may name only the
inert globals of `converters.torch_pickle` (any other is refused by name, nothing executed); and
every tensor must lie inside its storage, and its storage inside its record.
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import re
import struct
import threading
import weakref
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.dtypes import DType
from converters.errors import CorruptCheckpoint, UnsafeCheckpoint
from converters.torch_pickle import Malformed, RestrictedUnpickler, StorageType

# The pickle holds structure, never tensor bytes: a real one is kilobytes to a few MiB.
MAX_PICKLE_BYTES = 256 * 2**20
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature ... name/extra lengths
_PLAIN_NAME = re.compile(r"[\w.:/\[\]-]{1,200}")
_STORAGE_RECORD = re.compile(r"(?:^|/)data/[^/]+$")  # "<prefix>/data/<storage key>"


def shown(name: object) -> str:
    """A record or key name for an error message: as is when it looks like a name, else not at all
    (errors never quote a file's contents)."""
    text = str(name)
    return text if _PLAIN_NAME.fullmatch(text) else "(a name that is not plain text)"


# --------------------------------------------------------------------------------------------
# The zip directory


@dataclass(frozen=True)
class Record:
    """One stored zip record: where its data starts in the file, and its length."""

    offset: int  # absolute byte offset in the file
    nbytes: int


class _Window:
    """Read-only file access to bytes [start, end) of a source, for `zipfile`."""

    def __init__(self, pread: Callable[[int, int], bytes], start: int, end: int) -> None:
        self.pread, self.start, self.size, self.pos = pread, start, end - start, 0

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = (0, self.pos, self.size)[whence] + offset
        if pos < 0:
            raise OSError("seek before the start of the archive")
        self.pos = pos
        return pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self.size - self.pos)
        n = left if n is None or n < 0 else min(n, left)
        data = self.pread(n, self.start + self.pos) if n else b""
        self.pos += len(data)
        return data


def _records(window: _Window, path: Path) -> dict[str, Record]:
    """{name: Record} of the archive in `window`, refusing what torch.save never writes:
    compressed or encrypted records, records past the end, a huge pickle. Reads the directory and
    each record's 30-byte local header only."""
    try:
        with zipfile.ZipFile(window) as archive:  # type: ignore[arg-type]
            infos = archive.infolist()
    except zipfile.BadZipFile as exc:
        if "not a zip file" in str(exc):
            raise CorruptCheckpoint(
                "not a torch zip archive (truncated, corrupted, or saved with the legacy "
                "non-zip format); re-save it with torch.save",
                path,
            ) from exc
        raise CorruptCheckpoint(f"cannot read the zip directory: {exc}", path) from exc
    except (zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise CorruptCheckpoint(f"cannot read the zip directory: {exc}", path) from exc
    records = {}
    for info in infos:
        name = shown(info.filename)
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptCheckpoint(
                f"zip record {name} is compressed (method {info.compress_type}); torch.save "
                "stores records uncompressed, and a compressed one could inflate without bound "
                "(refused before reading it)",
                path,
            )
        if info.flag_bits & 0x1:
            raise CorruptCheckpoint(f"zip record {name} is encrypted", path)
        header = window.pread(_LOCAL_HEADER.size, window.start + info.header_offset)
        if len(header) != _LOCAL_HEADER.size or not header.startswith(b"PK\x03\x04"):
            raise CorruptCheckpoint(
                f"zip record {name} has no local header at offset {info.header_offset} "
                "(truncated or forged)",
                path,
            )
        _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if info.file_size != info.compress_size or start + info.file_size > window.size:
            raise CorruptCheckpoint(
                f"zip record {name} claims {info.file_size} bytes at offset {start}, "
                f"past the end of the {window.size}-byte archive (truncated or forged)",
                path,
            )
        if info.filename.endswith("data.pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise CorruptCheckpoint(
                f"the pickle ({name}) is {info.file_size} bytes; Porter reads at most "
                f"{MAX_PICKLE_BYTES} (a checkpoint's pickle holds no tensor data)",
                path,
            )
        records[info.filename] = Record(window.start + start, info.file_size)
    return records


def is_storage_record(name: str) -> bool:
    """Whether a torch.save zip record holds a storage's bytes (rather than the pickle or tags)."""
    return bool(_STORAGE_RECORD.search(name))


def check_torch_zip(
    data: Path | bytes, path: Path, span: tuple[int, int] | None = None
) -> dict[str, Record]:
    """Refuse a torch.save zip (a file, bytes [start, end) of one, or the bytes of one) that could
    make a loader allocate more than it holds; its {record name: Record} otherwise. `path` names
    the file in errors."""
    if isinstance(data, bytes):
        return _records(_Window(lambda n, at: data[at : at + n], 0, len(data)), path)
    with open(data, "rb") as f:
        return _records(_file_window(f, path, span), path)


def _file_window(f: Any, path: Path, span: tuple[int, int] | None) -> _Window:
    size = os.fstat(f.fileno()).st_size
    start, end = span if span is not None else (0, size)
    if not 0 <= start <= end <= size:
        raise CorruptCheckpoint(
            f"the archive at bytes {start}..{end} lies outside the {size}-byte file", path
        )
    return _Window(lambda n, at: os.pread(f.fileno(), n, at), start, end)


# --------------------------------------------------------------------------------------------
# Tensors


@dataclass(frozen=True)
class StoredTensor:
    """A tensor inside a torch.save archive: described, not read."""

    file: Path  # the file holding the archive
    dtype: DType  # from the storage class (torch.BFloat16Storage -> BFLOAT16, ...)
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements
    storage_offset: int  # in elements
    record_offset: int  # absolute byte offset in `file` of the storage record's data
    record_nbytes: int  # bytes of that storage record

    def __post_init__(self) -> None:
        problem = _view_problem(
            self.shape, self.stride, self.storage_offset, self.record_nbytes // self.dtype.itemsize
        )
        if problem:
            raise ValueError(f"StoredTensor outside its record: {problem}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def byte_range(self) -> tuple[int, int] | None:
        """Absolute [start, end) bytes of `file` the view covers; None when empty."""
        if self.numel == 0:
            return None
        last = self.storage_offset + sum(
            (n - 1) * s for n, s in zip(self.shape, self.stride, strict=True)
        )
        size = self.dtype.itemsize
        return self.record_offset + self.storage_offset * size, self.record_offset + (
            last + 1
        ) * size

    def array(self) -> np.ndarray:
        """A read-only view (shape and stride applied) over the file's shared memory map."""
        if self.numel == 0:
            empty = np.empty(self.shape, self.dtype.numpy)
            empty.flags.writeable = False
            return empty
        size = self.dtype.itemsize
        return np.ndarray(
            self.shape,
            self.dtype.numpy,
            buffer=_mapping(self.file),
            offset=self.record_offset + self.storage_offset * size,
            strides=tuple(s * size for s in self.stride),
        )

    def __repr__(self) -> str:
        return (
            f"StoredTensor({self.dtype}{list(self.shape)}, {self.file.name}@{self.record_offset})"
        )


_MAPS: weakref.WeakValueDictionary[tuple, mmap.mmap] = weakref.WeakValueDictionary()
_MAPS_LOCK = threading.Lock()


def _mapping(file: Path) -> mmap.mmap:
    """The read-only memory map of `file`: one per (file, inode, size), shared by every tensor
    of it and kept while an array over it lives."""
    st = os.stat(file)
    key = (str(file), st.st_dev, st.st_ino, st.st_size)
    with _MAPS_LOCK:
        found = _MAPS.get(key)
        if found is None:
            with open(file, "rb") as f:
                found = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            _MAPS[key] = found
        return found


def _view_problem(
    shape: tuple[int, ...], stride: tuple[int, ...], offset: int, elements: int
) -> str | None:
    """Why a view (shape, stride, offset) does not lie within a storage of `elements`; None if
    it does (an empty view always does)."""
    if len(shape) != len(stride):
        return f"has {len(shape)} sizes but {len(stride)} strides"
    if min((*shape, *stride, offset), default=0) < 0:
        return f"has a negative size, stride or offset (shape {list(shape)}, stride {list(stride)})"
    if 0 in shape:
        return None
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if last >= elements:
        return (
            f"has shape {list(shape)}, stride {list(stride)} and offset {offset}, reaching "
            f"element {last} of a storage of {elements}"
        )
    return None


@dataclass(frozen=True)
class _Storage:
    """A storage the pickle refers to (its persistent id), with its record."""

    dtype: DType
    key: str
    numel: int  # in elements of `dtype` (bytes for an untyped storage)
    record: Record


@dataclass(frozen=True)
class _BadTensor:
    """A tensor refused while unpickling; reported with its location once the tree is known."""

    reason: str


def _ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise Malformed("a tensor's size or stride is not a sequence of integers")
    return tuple(value)


class _ArchiveUnpickler(RestrictedUnpickler):
    """Storages are the records of one archive; tensors are `StoredTensor`s over them."""

    def __init__(self, data: bytes, stubs: Mapping[str, type] | None, file: Path,
                 records: dict[str, Record], prefix: str) -> None:  # fmt: skip
        super().__init__(data, stubs)
        self.file, self.records, self.prefix = file, records, prefix
        self.bad: list[_BadTensor] = []

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Malformed("a persistent id that is not a torch storage")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, StorageType) or not isinstance(key, str):
            raise Malformed("a storage without a storage class or key")
        if not isinstance(numel, int) or numel < 0:
            raise Malformed(f"storage {shown(key)} has no valid element count")
        record = self.records.get(f"{self.prefix}/data/{key}")
        if record is None:
            raise Malformed(f"storage record data/{shown(key)} is missing")
        return _Storage(kind.dtype, key, numel, record)

    def rebuild_tensor(
        self, storage: Any, offset: Any, size: Any, stride: Any, dtype: DType | None
    ) -> StoredTensor | _BadTensor:
        if not isinstance(storage, _Storage) or not isinstance(offset, int):
            raise Malformed("a tensor rebuilt without a storage and offset")
        shape, strides, dtype = _ints(size), _ints(stride), dtype or storage.dtype
        need = storage.numel * storage.dtype.itemsize
        elements = need // dtype.itemsize
        if need > storage.record.nbytes:
            problem = (
                f"claims more elements than its storage record holds: storage {shown(storage.key)}"
                f" of {storage.numel} {storage.dtype} elements needs {need} bytes, its record "
                f"holds {storage.record.nbytes} (truncated or forged header; refused before "
                "allocating)"
            )
        elif problem := _view_problem(shape, strides, offset, elements):
            problem = f"{problem} (a view outside its storage; refused before reading it)"
        elif math.prod(shape) > elements:
            problem = (
                f"has shape {list(shape)} ({math.prod(shape) * dtype.itemsize} bytes) but its "
                f"storage holds {need} bytes (an expanded or overlapping view); refused before "
                "allocating it"
            )
        if problem:
            self.bad.append(_BadTensor(problem))
            return self.bad[-1]
        record = storage.record
        return StoredTensor(self.file, dtype, shape, strides, offset, record.offset, record.nbytes)


def _leaves(obj: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """(location, leaf) for every StoredTensor (or refused one) inside dicts, lists, tuples and
    Namespaces of `obj`."""
    stack, seen = [(obj, where)], set()
    while stack:
        value, at = stack.pop()
        if isinstance(value, StoredTensor | _BadTensor):
            yield at, value
            continue
        if isinstance(value, argparse.Namespace):
            value = vars(value)
        if isinstance(value, dict | list | tuple):
            if id(value) in seen:  # a pickle can reference one container many times
                continue
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, f"{at}/{shown(k)}" if at else shown(k)) for k, v in items)


def check_tensor_sizes(obj: Any, path: Path) -> None:
    """Refuse tensors refused while unpickling, and tensors claiming more bytes than their record
    holds (expanded, stride-0 or overlapping views): materializing one would allocate far more
    than the file contains."""
    for where, leaf in _leaves(obj):
        name = f"tensor {where}" if where else "the tensor"
        if isinstance(leaf, _BadTensor):
            raise CorruptCheckpoint(f"{name} {leaf.reason}", path)
        if leaf.nbytes > leaf.record_nbytes:
            raise CorruptCheckpoint(
                f"{name} has shape {list(leaf.shape)} ({leaf.nbytes} bytes) but its storage "
                f"holds {leaf.record_nbytes} bytes (an expanded or overlapping view); refused "
                "before allocating it",
                path,
            )


# --------------------------------------------------------------------------------------------
# Loading


def _pickle_record(records: dict[str, Record], path: Path) -> tuple[str, Record]:
    """(archive prefix, data.pkl record): the prefix is the first record's folder, as torch's."""
    first = next(iter(records), "")
    prefix = first.split("/", 1)[0] if "/" in first else ""
    record = records.get(f"{prefix}/data.pkl")
    if record is None:
        raise CorruptCheckpoint("not a torch.save archive (no data.pkl record)", path)
    return prefix, record


def _check_byteorder(
    read: Callable[[Record], bytes], records: dict, prefix: str, path: Path
) -> None:
    record = records.get(f"{prefix}/byteorder")
    if record is None:  # torch's older archives: little-endian
        return
    order = read(record) if record.nbytes <= 16 else b""
    if order == b"big":
        raise CorruptCheckpoint(
            "the archive was saved on a big-endian machine; Porter reads little-endian ones "
            "(re-save it on a little-endian machine)",
            path,
        )
    if order != b"little":
        raise CorruptCheckpoint("the archive's byteorder record is neither little nor big", path)


def load(
    path: Path, *, span: tuple[int, int] | None = None, stubs: Mapping[str, type] | None = None
) -> Any:
    """Unpickle the torch.save archive in `path` (or in bytes [start, end) of it: torch_dist
    .distcp files hold one archive per chunk), with StoredTensor for every tensor.

    `stubs` maps a module prefix (e.g. ``"megatron."``) to an inert class standing in for every
    global under it; any global neither allowed nor stubbed is refused (UnsafeCheckpoint naming
    them all, nothing executed)."""
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed below, before unpickling)
    except OSError as exc:
        raise CorruptCheckpoint(f"cannot open: {exc.strerror}", path) from exc
    with f:
        window = _file_window(f, path, span)
        records = _records(window, path)
        prefix, pickle_record = _pickle_record(records, path)

        def read(record: Record) -> bytes:
            data = os.pread(f.fileno(), record.nbytes, record.offset)
            if len(data) != record.nbytes:
                raise CorruptCheckpoint("file is truncated (a record ends past its end)", path)
            return data

        _check_byteorder(read, records, prefix, path)
        data = read(pickle_record)
    unpickler = _ArchiveUnpickler(data, stubs, path, records, prefix)
    try:
        loaded = unpickler.load()
        error = None
    except Exception as exc:  # any failure of a damaged or hostile pickle
        error = exc
    if unpickler.refused:
        raise UnsafeCheckpoint(
            f"the pickle references {', '.join(sorted(unpickler.refused))}, which Porter does not "
            "load (it could run code); nothing from the file was executed",
            path,
        ) from error
    if isinstance(error, Malformed):
        raise CorruptCheckpoint(f"cannot read the pickle: {error}", path) from error
    if error is not None:
        raise CorruptCheckpoint(
            f"cannot read the pickle ({type(error).__name__}): damaged, or not written by "
            "torch.save",
            path,
        ) from error
    check_tensor_sizes(loaded, path)
    if unpickler.bad:  # a refused tensor somewhere the walk does not go (inside a set, a stub)
        raise CorruptCheckpoint(f"a tensor {unpickler.bad[0].reason}", path)
    return loaded
