"""Read a Megatron `torch_dist` checkpoint on CPU, lazily and without running pickled code.

A torch_dist iteration directory holds `metadata.json` (names the backend), `common.pt` (non-tensor
state such as `args`), `.metadata` (a pickled `torch.distributed.checkpoint` `Metadata`) and the
`__{rank}_{i}.distcp` data files. Each saving rank writes one *chunk* per tensor shard it owns
(Megatron: one per layer per TP shard of a stacked `[num_layers, ...]` tensor). `.metadata` gives
every chunk's global offsets and sizes (`state_dict_metadata`) and where its bytes are
(`storage_data`: file, offset, length). Megatron writes each chunk as a `torch.save` zip blob of the
chunk tensor, exactly as `FileSystemReader.read_data` expects; Porter reads only the byte range of
each chunk a slice needs and loads it with `torch.load(weights_only=True)`.

`.metadata` is unpickled by a restricted unpickler that resolves only the checkpoint metadata
classes listed in `_ALLOWED_GLOBALS`; any other global is refused by name before anything runs.
"""

from __future__ import annotations

import collections
import importlib
import io
import json
import math
import os
import pickle
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from converters.errors import CorruptCheckpoint, NotAMegatronCheckpoint, UnsafeCheckpoint
from converters.megatron.safe_load import MegatronStub, load_pt
from converters.safe_load import check_tensor_sizes, check_torch_zip
from converters.tensors import FileRange, LazyTensor

__all__ = ["DistCheckpoint", "DistRegion", "read_dist_metadata"]

_METADATA_JSON = "metadata.json"
_METADATA = ".metadata"
_COMMON = "common.pt"
MAX_JSON_BYTES = 2**20  # metadata.json is a few hundred bytes
# `.metadata` lists every chunk (with optimizer state: hundreds of thousands); larger is refused.
MAX_METADATA_BYTES = 2**30

_DCP = "torch.distributed.checkpoint"
# The globals a `.metadata` written by torch.distributed.checkpoint (via Megatron) references. Seen
# in a real file (torch 2.13, megatron-core 0.16.1): Metadata, TensorStorageMetadata,
# BytesStorageMetadata, ChunkStorageMetadata, TensorProperties, _MEM_FORMAT_ENCODING,
# MetadataIndex, StorageMeta, _StorageInfo, torch.Size, torch.float32 (any dtype),
# torch.serialization._get_layout, and, inside `all_local_plans`, SavePlan, WriteItem,
# WriteItemType, TensorWriteData. All are dataclasses, enums or value constructors.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (f"{_DCP}.metadata", "Metadata"),
        (f"{_DCP}.metadata", "TensorStorageMetadata"),
        (f"{_DCP}.metadata", "BytesStorageMetadata"),
        (f"{_DCP}.metadata", "ChunkStorageMetadata"),
        (f"{_DCP}.metadata", "TensorProperties"),
        (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),
        (f"{_DCP}.metadata", "MetadataIndex"),
        (f"{_DCP}.metadata", "StorageMeta"),
        (f"{_DCP}.filesystem", "_StorageInfo"),
        (f"{_DCP}.filesystem", "_StoragePrefix"),
        (f"{_DCP}.planner", "SavePlan"),
        (f"{_DCP}.planner", "WriteItem"),
        (f"{_DCP}.planner", "WriteItemType"),
        (f"{_DCP}.planner", "TensorWriteData"),
        (f"{_DCP}.planner", "BytesIOWriteData"),
        # Older torch wrote TensorProperties from the sharded-tensor module.
        ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
        ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    }
)
# Megatron classes (older versions pickled `MCoreSavePlan` into `all_local_plans`) become inert.
_STUBBED_PREFIX = "megatron."


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-listed globals; refuses anything else by name."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as exc:
                raise CorruptCheckpoint(
                    f"references {module}.{name}, which this torch version does not have",
                    self._path,
                ) from exc
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype | torch.memory_format | torch.layout):
                return value
        if module.startswith(_STUBBED_PREFIX):
            return MegatronStub
        raise UnsafeCheckpoint(
            f"the pickle references {module}.{name}, which Porter does not load (it could run "
            "code); nothing from the file was executed",
            self._path,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpoint("the pickle uses persistent ids, which Porter refuses", self._path)


def read_dist_metadata(path: Path) -> Any:
    """Unpickle a torch.distributed.checkpoint `.metadata` file with the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpoint("file is missing (torch_dist checkpoints need it)", path)
    size = path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise CorruptCheckpoint(
            f"is {size} bytes; Porter reads checkpoint metadata of at most {MAX_METADATA_BYTES}",
            path,
        )
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except (UnsafeCheckpoint, CorruptCheckpoint):
        raise
    except Exception as exc:  # truncated or garbled pickle stream
        # the exception's text can hold bytes of the file ("invalid load key, 'x'"): its type only
        raise CorruptCheckpoint(
            f"cannot unpickle the checkpoint metadata ({type(exc).__name__})", path
        ) from exc
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpoint(
            f"holds a {type(metadata).__name__}, not torch.distributed.checkpoint Metadata", path
        )
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(
        metadata.storage_data, dict
    ):
        raise CorruptCheckpoint("metadata lacks state_dict_metadata or storage_data", path)
    return metadata


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
        dtype: torch.dtype,
        chunks: list[_Chunk],
        start: tuple[int, ...],
        shape: tuple[int, ...],
    ) -> None:
        self.key = key
        self.dtype = dtype
        self.start = start
        self.shape = shape
        self.chunks = [c for c in chunks if _overlaps(c, start, shape)]

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        self._check_narrow(dim, start, length)
        new_start = list(self.start)
        new_start[dim] += start
        new_shape = list(self.shape)
        new_shape[dim] = length
        return DistRegion(self.key, self.dtype, self.chunks, tuple(new_start), tuple(new_shape))

    @property
    def source_nbytes(self) -> int:
        return sum(c.length for c in self.chunks)

    def file_ranges(self) -> list[FileRange]:
        """The stored bytes of every chunk overlapping the region (each chunk is read whole)."""
        return [(c.file, c.offset, c.length) for c in self.chunks]

    def materialize(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        covered = 0
        by_file: dict[Path, list[_Chunk]] = collections.defaultdict(list)
        for chunk in self.chunks:
            by_file[chunk.file].append(chunk)
        for file, chunks in by_file.items():
            try:
                f = file.open("rb")
            except OSError as exc:
                raise CorruptCheckpoint(
                    f"cannot open (needed for {self.key}): {exc}", file
                ) from exc
            with f:
                for chunk in sorted(chunks, key=lambda c: c.offset):
                    data = _read_chunk(f, chunk, self.key, self.dtype)
                    src, dst, n = [], [], 1
                    for o, size, s, m in zip(
                        chunk.offsets, chunk.sizes, self.start, self.shape, strict=True
                    ):
                        lo, hi = max(o, s), min(o + size, s + m)
                        src.append(slice(lo - o, hi - o))
                        dst.append(slice(lo - s, hi - s))
                        n *= hi - lo
                    out[tuple(dst)].copy_(data[tuple(src)])
                    covered += n
                    del data
        if covered != out.numel():
            raise CorruptCheckpoint(
                f"the chunks of {self.key} cover {covered} of the {out.numel()} elements of "
                f"region start={self.start} shape={self.shape}",
                self.chunks[0].file.parent / _METADATA if self.chunks else None,
            )
        return out

    def __repr__(self) -> str:
        return f"DistRegion({self.key!r}, start={self.start}, shape={self.shape}, {self.dtype})"


def _read_chunk(f: io.BufferedReader, chunk: _Chunk, key: str, dtype: torch.dtype) -> torch.Tensor:
    """Read and check one chunk: its byte range holds a `torch.save` blob of the chunk tensor."""
    file = chunk.file
    where = f"chunk of {key} at offsets {list(chunk.offsets)} (bytes {chunk.offset}+{chunk.length})"
    if chunk.transforms:
        raise CorruptCheckpoint(
            f"{where} is stored with transforms {list(chunk.transforms)} (e.g. compression), "
            "which Porter does not read; re-save the checkpoint without them",
            file,
        )
    f.seek(chunk.offset)
    buf = f.read(chunk.length)
    if len(buf) != chunk.length:
        raise CorruptCheckpoint(
            f"file is truncated: {where} ends past its end ({len(buf)} of {chunk.length} bytes read)",
            file,
        )
    if not buf.startswith(b"PK\x03\x04"):
        raise CorruptCheckpoint(f"{where} is not a torch.save blob", file)
    try:
        check_torch_zip(buf, file)
    except CorruptCheckpoint as exc:
        raise CorruptCheckpoint(f"{where}: {str(exc).removeprefix(f'{file}: ')}", file) from exc
    try:
        tensor = torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(
            f"{where}: refused to unpickle (nothing was executed): {exc}", file
        ) from exc
    except Exception as exc:
        raise CorruptCheckpoint(f"{where} cannot be loaded: {exc}", file) from exc
    del buf
    if not isinstance(tensor, torch.Tensor):
        raise CorruptCheckpoint(f"{where} holds a {type(tensor).__name__}, not a tensor", file)
    try:
        check_tensor_sizes(tensor, file)
    except CorruptCheckpoint as exc:
        raise CorruptCheckpoint(f"{where}: {str(exc).removeprefix(f'{file}: ')}", file) from exc
    if tuple(tensor.shape) != chunk.sizes or tensor.dtype != dtype:
        raise CorruptCheckpoint(
            f"{where} holds {tensor.dtype}{list(tensor.shape)} but the metadata says "
            f"{dtype}{list(chunk.sizes)}",
            file,
        )
    return tensor


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
        self._dtypes: dict[str, torch.dtype] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._chunks: dict[str, list[_Chunk]] = {}
        self._index()

    def _index(self) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        md_path = self.metadata_path
        storage: dict[tuple[str, tuple[int, ...]], Any] = {}
        for index, info in self.metadata.storage_data.items():
            offset = getattr(index, "offset", None)
            if offset is not None:
                storage[(index.fqn, tuple(int(x) for x in offset))] = info
        file_sizes: dict[str, int] = {}
        for key, entry in self.metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata) or "_extra_state" in key:
                continue  # bytes entries (`_extra_state/shard_*`) are not weights
            shape = tuple(int(s) for s in entry.size)
            dtype = entry.properties.dtype
            if not isinstance(dtype, torch.dtype):
                raise CorruptCheckpoint(
                    f"{key} has a dtype that is a {type(dtype).__name__}, not a torch dtype",
                    md_path,
                )
            chunks = []
            for meta in entry.chunks:
                offsets = tuple(int(x) for x in meta.offsets)
                sizes = tuple(int(x) for x in meta.sizes)
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
        dtype: torch.dtype,
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
        common = load_pt(self.directory / _COMMON, mmap=False)
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

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of tensor `key`."""
        return self._dtypes[self._check_key(key)]

    def tensor(self, key: str) -> LazyTensor:
        """The global tensor `key` as a lazy region; nothing is read until `materialize()`."""
        key = self._check_key(key)
        shape = self._shapes[key]
        return DistRegion(key, self._dtypes[key], self._chunks[key], (0,) * len(shape), shape)

    def _check_key(self, key: str) -> str:
        if key not in self._shapes:
            raise KeyError(f"{self.directory}: no tensor {key!r} in the torch_dist checkpoint")
        return key


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
