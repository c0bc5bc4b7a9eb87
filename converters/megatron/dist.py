"""Read a Megatron `torch_dist` checkpoint on CPU, lazily, without torch and without running
pickled code.

A torch_dist iteration directory holds `metadata.json` (names the backend), `common.pt` (non-tensor
state such as `args`), `.metadata` (a pickled `torch.distributed.checkpoint` `Metadata`) and the
`__{rank}_{i}.distcp` data files. Each saving rank writes one *chunk* per tensor shard it owns
(Megatron: one per layer per TP shard of a stacked `[num_layers, ...]` tensor). `.metadata` gives
every chunk's global offsets and sizes (`state_dict_metadata`) and where its bytes are
(`storage_data`: file, offset, length). Megatron writes each chunk as a `torch.save` zip blob of the
chunk tensor, exactly as `FileSystemReader.read_data` expects; Porter reads that blob in place
(`load_pt(file, span=...)`: the chunk's array is a view of the mapped file) and only for the chunks
a slice overlaps.

`.metadata` is unpickled into inert stand-ins (`converters.megatron.dcp_metadata`); any global
outside its allow-list is refused by name before anything runs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from converters.dtypes import DType
from converters.errors import (
    ConversionError,
    CorruptCheckpoint,
    NotAMegatronCheckpoint,
    UnsafeCheckpoint,
    UnsupportedModel,
)
from converters.megatron.dcp_metadata import Constant, TensorStorageMetadata, read_dist_metadata
from converters.megatron.safe_load import load_pt
from converters.tensors import FileRange, LazyTensor
from converters.torch_zip import StoredTensor, shown

__all__ = ["DistCheckpoint", "DistRegion", "read_dist_metadata"]

_METADATA_JSON = "metadata.json"
_METADATA = ".metadata"
_COMMON = "common.pt"
MAX_JSON_BYTES = 2**20  # metadata.json is a few hundred bytes
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class _Chunk:
    """One stored chunk of a global tensor: its global box and its bytes' location."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


def _overlaps(chunk: _Chunk, start: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return all(
        max(o, s) < min(o + n, s + m)
        for o, n, s, m in zip(chunk.offsets, chunk.sizes, start, shape, strict=True)
    )


class DistRegion(LazyTensor):
    """A box of a chunked global tensor; `materialize` reads only the chunks overlapping it."""

    def __init__(
        self,
        key: str,
        dtype: DType,
        chunks: list[_Chunk],
        start: tuple[int, ...],
        shape: tuple[int, ...],
        loaded: dict[_Chunk, StoredTensor] | None = None,
    ) -> None:
        """`loaded`: the chunks read so far, shared by every region of one checkpoint (a chunk's
        archive is parsed once, however many slices read it)."""
        self.key = key
        self.dtype = dtype
        self.start = start
        self.shape = shape
        self.chunks = [c for c in chunks if _overlaps(c, start, shape)]
        self._loaded = {} if loaded is None else loaded

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        self._check_narrow(dim, start, length)
        new_start = list(self.start)
        new_start[dim] += start
        new_shape = list(self.shape)
        new_shape[dim] = length
        return DistRegion(
            self.key, self.dtype, self.chunks, tuple(new_start), tuple(new_shape), self._loaded
        )

    @property
    def source_nbytes(self) -> int:
        return sum(c.length for c in self.chunks)

    def file_ranges(self) -> list[FileRange]:
        """The stored bytes of every chunk overlapping the region (each chunk is read whole)."""
        return [(c.file, c.offset, c.length) for c in self.chunks]

    def materialize(self) -> np.ndarray:
        """The region's values: a read-only view of the mapped chunk when one chunk holds the
        whole region, else a new array filled from the overlapping chunks."""
        if len(self.chunks) == 1 and _contains(self.chunks[0], self.start, self.shape):
            chunk = self.chunks[0]
            return _read_chunk(chunk, self.key, self.dtype, self._loaded)[self._boxes(chunk)[0]]
        out = np.empty(self.shape, dtype=self.dtype.numpy)
        covered = 0
        for chunk in sorted(self.chunks, key=lambda c: (str(c.file), c.offset)):
            src, dst = self._boxes(chunk)
            part = _read_chunk(chunk, self.key, self.dtype, self._loaded)[src]
            out[dst] = part
            covered += part.size
        if covered != out.size:
            raise CorruptCheckpoint(
                f"the chunks of {self.key} cover {covered} of the {out.size} elements of "
                f"region start={self.start} shape={self.shape}",
                self.chunks[0].file.parent / _METADATA if self.chunks else None,
            )
        return out

    def _boxes(self, chunk: _Chunk) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """(the overlap in the chunk's coordinates, the same in the region's)."""
        src, dst = [], []
        for o, n, s, m in zip(chunk.offsets, chunk.sizes, self.start, self.shape, strict=True):
            lo, hi = max(o, s), min(o + n, s + m)
            src.append(slice(lo - o, hi - o))
            dst.append(slice(lo - s, hi - s))
        return tuple(src), tuple(dst)

    def __repr__(self) -> str:
        return f"DistRegion({self.key!r}, start={self.start}, shape={self.shape}, {self.dtype})"


def _contains(chunk: _Chunk, start: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return all(
        o <= s and s + m <= o + n
        for o, n, s, m in zip(chunk.offsets, chunk.sizes, start, shape, strict=True)
    )


def _read_chunk(
    chunk: _Chunk, key: str, dtype: DType, loaded: dict[_Chunk, StoredTensor]
) -> np.ndarray:
    """One chunk's array, checked: its byte range holds a `torch.save` blob of the chunk tensor,
    read in place (a read-only view of the mapped file; nothing is copied). The file's size is
    checked on every read; the archive is parsed once (`loaded`)."""
    file = chunk.file
    where = f"chunk of {key} at offsets {list(chunk.offsets)} (bytes {chunk.offset}+{chunk.length})"
    if chunk.transforms:
        raise CorruptCheckpoint(
            f"{where} is stored with transforms {list(chunk.transforms)} (e.g. compression), "
            "which Porter does not read; re-save the checkpoint without them",
            file,
        )
    try:
        with file.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            magic = os.pread(f.fileno(), len(_ZIP_MAGIC), chunk.offset)
    except OSError as exc:
        raise CorruptCheckpoint(f"cannot open (needed for {key}): {exc}", file) from exc
    if chunk.offset + chunk.length > size:
        held = max(0, size - chunk.offset)
        raise CorruptCheckpoint(
            f"file is truncated: {where} ends past its end ({held} of {chunk.length} bytes read)",
            file,
        )
    if magic != _ZIP_MAGIC:
        raise CorruptCheckpoint(f"{where} is not a torch.save blob", file)
    if chunk in loaded:
        return loaded[chunk].array()
    try:
        stored = load_pt(file, span=(chunk.offset, chunk.offset + chunk.length))
    except ConversionError as exc:  # the same error, saying which chunk
        raise type(exc)(f"{where}: {exc.reason}", file) from exc
    if not isinstance(stored, StoredTensor):
        raise CorruptCheckpoint(f"{where} holds a {type(stored).__name__}, not a tensor", file)
    if tuple(stored.shape) != chunk.sizes or stored.dtype != dtype:
        raise CorruptCheckpoint(
            f"{where} holds {stored.dtype}{list(stored.shape)} but the metadata says "
            f"{dtype}{list(chunk.sizes)}",
            file,
        )
    loaded[chunk] = stored
    return stored.array()


class DistCheckpoint:
    """One torch_dist iteration directory (metadata.json, common.pt, .metadata, __*_*.distcp)."""

    def __init__(self, directory: Path) -> None:
        """Check `metadata.json` names torch_dist, read `.metadata` safely and index every chunk."""
        self.directory = Path(directory)
        meta_json = self.directory / _METADATA_JSON
        if not meta_json.is_file():
            raise NotAMegatronCheckpoint(
                f"no {_METADATA_JSON}: not a Megatron torch_dist checkpoint directory",
                self.directory,
            )
        if meta_json.stat().st_size > MAX_JSON_BYTES:
            raise CorruptCheckpoint(f"is larger than {MAX_JSON_BYTES} bytes", meta_json)
        try:
            config = json.loads(meta_json.read_text())
        except (OSError, ValueError) as exc:
            raise CorruptCheckpoint(f"cannot parse: {exc}", meta_json) from exc
        backend = config.get("sharded_backend") if isinstance(config, dict) else None
        if backend != "torch_dist":  # (its value is the file's: not shown)
            raise NotAMegatronCheckpoint(
                "its sharded_backend is not supported (only torch_dist)", meta_json
            )
        self.metadata_path = self.directory / _METADATA
        self.metadata = read_dist_metadata(self.metadata_path)
        self._dtypes: dict[str, DType] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._chunks: dict[str, list[_Chunk]] = {}
        self._loaded: dict[_Chunk, StoredTensor] = {}  # chunks read so far (described, not held)
        self._index()

    def _index(self) -> None:
        md_path = self.metadata_path
        storage: dict[tuple[str, tuple[int, ...]], Any] = {}
        for index, info in self.metadata.storage_data.items():
            fqn, offset = getattr(index, "fqn", None), getattr(index, "offset", None)
            if isinstance(fqn, str) and offset is not None:
                where = f"the offset of the storage entry of {shown(fqn)}"
                storage[(fqn, _ints(offset, where, md_path))] = info
        file_sizes: dict[str, int] = {}
        for key, entry in self.metadata.state_dict_metadata.items():
            if not isinstance(key, str):
                raise CorruptCheckpoint(f"a tensor name is a {type(key).__name__}", md_path)
            if not isinstance(entry, TensorStorageMetadata) or "_extra_state" in key:
                continue  # bytes entries (`_extra_state/shard_*`) are not weights
            shape = _ints(entry.size, f"the size of {key}", md_path)
            dtype = getattr(entry.properties, "dtype", None)
            if isinstance(dtype, Constant) and dtype.kind == "dtype":
                raise UnsupportedModel(
                    f"{key} is stored as torch.{dtype.value}, an element type Porter does not "
                    "convert",
                    md_path,
                )
            if not isinstance(dtype, DType):
                raise CorruptCheckpoint(
                    f"{key} has a dtype that is a {type(dtype).__name__}, not a torch dtype",
                    md_path,
                )
            chunks = []
            if not isinstance(entry.chunks, list | tuple):
                raise CorruptCheckpoint(f"the chunks of {key} are not a list", md_path)
            for meta in entry.chunks:
                offsets = _ints(getattr(meta, "offsets", None), f"a chunk offset of {key}", md_path)
                sizes = _ints(getattr(meta, "sizes", None), f"a chunk size of {key}", md_path)
                if len(offsets) != len(shape) or len(sizes) != len(shape):
                    raise CorruptCheckpoint(
                        f"chunk of {key} at {list(offsets)} has the wrong rank for {list(shape)}",
                        md_path,
                    )
                if any(
                    o < 0 or n < 0 or o + n > s
                    for o, n, s in zip(offsets, sizes, shape, strict=True)
                ):
                    raise CorruptCheckpoint(
                        f"chunk of {key} at {list(offsets)} size {list(sizes)} lies outside "
                        f"{list(shape)}",
                        md_path,
                    )
                info = storage.get((key, offsets))
                if info is None:
                    raise CorruptCheckpoint(
                        f"no storage entry for the chunk of {key} at {list(offsets)}", md_path
                    )
                chunks.append(self._chunk(key, offsets, sizes, info, dtype, file_sizes))
            _check_cover(key, shape, chunks, md_path)
            self._dtypes[key] = dtype
            self._shapes[key] = shape
            self._chunks[key] = chunks

    def _chunk(
        self,
        key: str,
        offsets: tuple[int, ...],
        sizes: tuple[int, ...],
        info: Any,
        dtype: DType,
        file_sizes: dict[str, int],
    ) -> _Chunk:
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(rel, str) or not isinstance(offset, int) or not isinstance(length, int):
            raise CorruptCheckpoint(
                f"bad storage entry for {key} (a {type(info).__name__} without a file name, "
                "offset and length)",
                self.metadata_path,
            )
        if rel != os.path.basename(rel) or rel in ("", ".", "..") or "\x00" in rel:
            raise UnsafeCheckpoint(
                f"storage entry for {key} names a file outside the checkpoint directory",
                self.metadata_path,
            )
        file = self.directory / rel
        if rel not in file_sizes:
            if not file.is_file():
                raise CorruptCheckpoint(f"file is missing (it holds {key})", file)
            file_sizes[rel] = file.stat().st_size
        if offset < 0 or length < math.prod(sizes) * dtype.itemsize:
            raise CorruptCheckpoint(
                f"storage entry of {key} at {list(offsets)} ({offset}+{length} bytes) is too "
                f"small for {dtype}{list(sizes)}",
                self.metadata_path,
            )
        if offset + length > file_sizes[rel]:
            raise CorruptCheckpoint(
                f"file is truncated: the chunk of {key} at {list(offsets)} needs bytes up to "
                f"{offset + length}, the file has {file_sizes[rel]}",
                file,
            )
        transforms = tuple(getattr(info, "transform_descriptors", None) or ())
        return _Chunk(offsets, sizes, file, offset, length, transforms)

    @cached_property
    def common(self) -> dict:
        """`common.pt` (non-tensor state: `args`, `iteration`, ...), loaded safely."""
        common = load_pt(self.directory / _COMMON)
        if not isinstance(common, dict):
            raise CorruptCheckpoint(
                f"holds a {type(common).__name__}, not a dict", self.directory / _COMMON
            )
        return common

    def keys(self) -> list[str]:
        """Tensor keys (global names; `_extra_state` and other byte entries are skipped)."""
        return list(self._shapes)

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        """Global shape of tensor `key`."""
        return self._shapes[self._check_key(key)]

    def dtype(self, key: str) -> DType:
        """Stored dtype of tensor `key`."""
        return self._dtypes[self._check_key(key)]

    def tensor(self, key: str) -> LazyTensor:
        """The global tensor `key` as a lazy region; nothing is read until `materialize()`."""
        key = self._check_key(key)
        shape = self._shapes[key]
        return DistRegion(
            key, self._dtypes[key], self._chunks[key], (0,) * len(shape), shape, self._loaded
        )

    def _check_key(self, key: str) -> str:
        if key not in self._shapes:
            raise KeyError(f"{self.directory}: no tensor {key!r} in the torch_dist checkpoint")
        return key


def _ints(values: Any, what: str, md_path: Path) -> tuple[int, ...]:
    """`values` (a `torch.Size` in the pickle) as a tuple of ints; refused if it is not one."""
    if not isinstance(values, tuple | list) or not all(type(v) is int for v in values):
        raise CorruptCheckpoint(
            f"{what} is a {type(values).__name__}, not a list of integers", md_path
        )
    return tuple(values)


def _check_cover(key: str, shape: tuple[int, ...], chunks: list[_Chunk], md_path: Path) -> None:
    """Chunks must tile the global tensor: no overlaps and no gaps."""
    total = sum(math.prod(c.sizes) for c in chunks)
    if total != math.prod(shape):
        raise CorruptCheckpoint(
            f"the chunks of {key} hold {total} elements, its shape {list(shape)} has {math.prod(shape)}",
            md_path,
        )
    if not shape:
        return
    # Sweep along dim 0 so only chunks sharing rows are compared (Megatron: one layer's shards).
    ordered = sorted(chunks, key=lambda c: c.offsets[0])
    for i, a in enumerate(ordered):
        if math.prod(a.sizes) == 0:
            continue
        for b in ordered[i + 1 :]:
            if b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                break
            if math.prod(b.sizes) and _overlaps(b, a.offsets, a.sizes):
                raise CorruptCheckpoint(
                    f"chunks of {key} at {list(a.offsets)} and {list(b.offsets)} overlap", md_path
                )
