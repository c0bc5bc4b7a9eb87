"""The GPU index file PowerInfer loads (`<model>.generated.gpuidx`): writer, reader and summary.

Layout (a GGUF v3 file whose magic is then replaced by `PWRI`), little-endian:

    magic b"PWRI" · u32 version 3 · u64 tensor count (2·L) · u64 KV count (3)
    KVs: general.architecture = "generic.gpu_index" (string)
         generic.gpu_index.block_count = L (uint32)
         split.vram_capacity = budget in bytes (uint64; PowerInfer refuses the model otherwise)
    tensor infos, in order blk.0.gpu_idx, blk.0.gpu_bucket, blk.1.gpu_idx, …:
         name (u64 length + bytes) · u32 n_dims (1) · u64 dim · u32 type (18 = I32 in PowerInfer's
         ggml) · u64 offset from the data section, each tensor padded to 32 bytes
    zero padding to a multiple of 32, then the tensor data
    blk.{i}.gpu_idx int32 [n_ff]: 1 where the neuron is on the GPU; blk.{i}.gpu_bucket int32 [k_i]:
    the GPU neuron indices, ascending.

The writer drives upstream `gguf.GGUFWriter` exactly as PowerInfer's exporter does (so the bytes
are the same), passing type code 18 and the key string `split.vram_capacity` explicitly (upstream
gguf 0.19 numbers I32 as 26 and has no such key), and writes atomically: temp file, fsync, rename.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFWriter

from converters.powerinfer.errors import CorruptGpuIndex, InvalidSplitParameters

ARCH = "generic.gpu_index"
KEY_ARCH = "general.architecture"
KEY_BLOCK_COUNT = f"{ARCH}.block_count"
KEY_VRAM_CAPACITY = "split.vram_capacity"
POWERINFER_MAGIC = b"PWRI"
GGUF_MAGIC = b"GGUF"
POWERINFER_I32 = 18  # GGML_TYPE_I32 in PowerInfer's ggml (upstream gguf: IQ3_XXS)
ALIGNMENT = 32


@dataclass(frozen=True)
class WrittenIndex:
    path: Path
    bytes: int
    sha256: str


def _masks(buckets: Sequence[np.ndarray], n_ff: int) -> list[np.ndarray]:
    masks = []
    for layer, bucket in enumerate(buckets):
        bucket = np.asarray(bucket)
        if bucket.ndim != 1 or (bucket.size and (bucket.min() < 0 or bucket.max() >= n_ff)):
            raise InvalidSplitParameters(
                f"layer {layer}: bucket indices must be 1-D in [0, {n_ff})"
            )
        if bucket.size > 1 and not (np.diff(bucket) > 0).all():
            raise InvalidSplitParameters(
                f"layer {layer}: bucket indices must be strictly ascending"
            )
        mask = np.zeros(n_ff, dtype=np.int32)
        mask[bucket] = 1
        masks.append(mask)
    return masks


def write_gpu_index(
    path: Path, buckets: Sequence[np.ndarray], *, n_ff: int, vram_capacity: int
) -> WrittenIndex:
    """Write the index for per-layer ascending GPU neuron indices `buckets`, atomically at `path`."""
    path = Path(path)
    if not 0 <= vram_capacity < 2**64:
        raise InvalidSplitParameters(f"vram_capacity {vram_capacity} does not fit a uint64")
    masks = _masks(buckets, n_ff)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        writer = GGUFWriter(tmp, ARCH)
        for layer, (mask, bucket) in enumerate(zip(masks, buckets, strict=True)):
            gpu_bucket = np.ascontiguousarray(bucket, dtype=np.int32)
            # PowerInfer's exporter: raw_shape=shape[::-1], raw_dtype=I32 (18 in its ggml).
            writer.add_tensor(
                f"blk.{layer}.gpu_idx", mask, raw_shape=mask.shape[::-1], raw_dtype=POWERINFER_I32
            )
            writer.add_tensor(
                f"blk.{layer}.gpu_bucket",
                gpu_bucket,
                raw_shape=gpu_bucket.shape[::-1],
                raw_dtype=POWERINFER_I32,
            )
        writer.add_block_count(len(masks))
        writer.add_uint64(KEY_VRAM_CAPACITY, int(vram_capacity))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "r+b") as fout:
            fout.write(POWERINFER_MAGIC)
            fout.flush()
            os.fsync(fout.fileno())
        data = tmp.read_bytes()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return WrittenIndex(path, len(data), hashlib.sha256(data).hexdigest())


# ---------------------------------------------------------------- reader

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}  # fmt: skip


@dataclass(frozen=True)
class LayerIndex:
    mask: np.ndarray  # int32 [n_ff], 1 = on the GPU
    bucket: np.ndarray  # int32 [k], ascending GPU neuron indices


@dataclass(frozen=True)
class GpuIndex:
    path: Path
    magic: bytes
    version: int
    kv: dict[str, tuple[str, Any]]  # key → (GGUF type name, value), in file order
    layers: list[LayerIndex]

    @property
    def vram_capacity(self) -> int:
        return int(self.kv[KEY_VRAM_CAPACITY][1])


class _Cursor:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise CorruptGpuIndex(
                f"truncated at byte {self.pos} (file is {len(self.data)} bytes)", self.path
            )
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.data):
            raise CorruptGpuIndex(f"truncated string at byte {self.pos}", self.path)
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptGpuIndex(
                f"invalid UTF-8 string at byte {self.pos - n}", self.path
            ) from exc

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            sub, n = self.take("<I"), self.take("<Q")
            return [self.value(sub) for _ in range(n)]
        raise CorruptGpuIndex(f"unknown value type {vtype} at byte {self.pos - 4}", self.path)


def read_gpu_index(path: Path) -> GpuIndex:
    """Parse a GPU index (`PWRI`, or a not-yet-stamped `GGUF`) and check it is consistent."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptGpuIndex(f"cannot read: {exc}", path) from exc
    cur = _Cursor(data, path)
    if len(data) < 24:
        raise CorruptGpuIndex(f"too short for a GGUF header ({len(data)} bytes)", path)
    magic = data[:4]
    if magic not in (POWERINFER_MAGIC, GGUF_MAGIC):
        raise CorruptGpuIndex(f"magic is {magic!r}, expected b'PWRI'", path)
    cur.pos = 4
    version, n_tensors, n_kv = cur.take("<I"), cur.take("<Q"), cur.take("<Q")
    if version != 3:
        raise CorruptGpuIndex(f"GGUF version {version}, expected 3", path)
    kv: dict[str, tuple[str, Any]] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.take("<I")
        kv[key] = (_TYPE_NAMES.get(vtype, str(vtype)), cur.value(vtype))
    if kv.get(KEY_VRAM_CAPACITY, ("", 0))[0] != "uint64":
        raise CorruptGpuIndex(f"{KEY_VRAM_CAPACITY} is missing or not a uint64", path)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    alignment = int(kv.get("general.alignment", ("", ALIGNMENT))[1])
    data_start = -(-cur.pos // alignment) * alignment
    if n_tensors % 2:
        raise CorruptGpuIndex(f"{n_tensors} tensors: expected gpu_idx/gpu_bucket pairs", path)
    n_layers = n_tensors // 2
    block_count = kv.get(KEY_BLOCK_COUNT, ("", n_layers))[1]
    if block_count != n_layers:
        raise CorruptGpuIndex(f"{KEY_BLOCK_COUNT} = {block_count} but {n_tensors} tensors", path)
    arrays = []
    for position, (name, dims, ttype, offset) in enumerate(infos):
        layer, kind = divmod(position, 2)
        expected = f"blk.{layer}.{('gpu_idx', 'gpu_bucket')[kind]}"
        if name != expected or ttype != POWERINFER_I32 or len(dims) != 1:
            raise CorruptGpuIndex(
                f"tensor {position} is {name} type {ttype} dims {dims}, expected {expected} "
                f"type {POWERINFER_I32} 1-D",
                path,
            )
        start, nbytes = data_start + offset, dims[0] * 4
        if offset % alignment or start + nbytes > len(data):
            raise CorruptGpuIndex(f"{name} at offset {offset} is misaligned or past the end", path)
        arrays.append(np.frombuffer(data, dtype="<i4", count=dims[0], offset=start).copy())
    layers = []
    for layer in range(n_layers):
        mask, bucket = arrays[2 * layer], arrays[2 * layer + 1]
        if not np.array_equal(np.flatnonzero(mask), bucket) or not np.isin(mask, (0, 1)).all():
            raise CorruptGpuIndex(f"blk.{layer}: gpu_bucket does not list gpu_idx's ones", path)
        layers.append(LayerIndex(mask, bucket))
    return GpuIndex(path, magic, version, kv, layers)


@dataclass(frozen=True)
class LayerSummary:
    layer: int
    n_ff: int
    gpu_neurons: int
    mass_share: float | None  # share of the layer's activation mass on the GPU (None: no stats)


def summarize(index: GpuIndex, values: np.ndarray | None = None) -> list[LayerSummary]:
    """Per-layer GPU counts and, given activations [L, n_ff], the share of mass on the GPU."""
    if values is not None and values.shape != (len(index.layers), index.layers[0].mask.size):
        raise CorruptGpuIndex(
            f"the index has {len(index.layers)} layers × {index.layers[0].mask.size} neurons, "
            f"the activations {values.shape[0]} × {values.shape[1]}",
            index.path,
        )
    rows = []
    for layer, entry in enumerate(index.layers):
        share = None
        if values is not None:
            total = float(values[layer].sum(dtype=np.float64))
            share = (
                float(values[layer][entry.bucket].sum(dtype=np.float64)) / total
                if total > 0
                else 0.0
            )
        rows.append(LayerSummary(layer, entry.mask.size, int(entry.bucket.size), share))
    return rows
