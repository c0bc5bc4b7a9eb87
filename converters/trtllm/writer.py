"""Stream a safetensors file tensor by tensor, never holding the whole file in memory.

The format is an 8-byte little-endian header length, a JSON header with every tensor's dtype,
shape and byte range, then the data. Shapes are known from the plan, so the header is written
first and each tensor's bytes follow in order. The writer is a small state machine: it refuses a
tensor out of order, of the wrong shape or dtype, and refuses to finish before all are written.

Each tensor's bytes are read once, in chunks of CHUNK_BYTES that stay in the CPU cache: a chunk
goes to the file straight from the caller's memory (a memory-mapped source needs no copy), a
helper thread hashes it meanwhile, and the NaN/Inf check reads it right after (`nonfinite_in`).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from converters.dtypes import DType, nonfinite_in

CHUNK_BYTES = 4 << 20  # written, hashed and checked at once (stays in cache for the three)
WRITEBACK_BYTES = 64 << 20  # start writing dirty pages to disk after this many (see _Writeback)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: DType

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for size in self.shape:
            n *= size
        return n


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    bytes: int
    sha256: str


class _Writeback:
    """Starts the kernel writing a file's dirty pages while later ones are still being written
    (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the closing `fsync` finds little left to
    do. Only a hint: `fsync` still makes the file durable; elsewhere it does nothing."""

    _call = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if _call is not None:
        _call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _WRITE = 2  # SYNC_FILE_RANGE_WRITE

    def __init__(self, fd: int) -> None:
        self.fd, self.started = fd, 0

    def written(self, total: int) -> None:
        """`total` bytes of the file are written: start writeback once enough are pending."""
        if self._call is not None and total - self.started >= WRITEBACK_BYTES:
            self._call(self.fd, self.started, total - self.started, self._WRITE)
            self.started = total


class SafetensorsWriter:
    """Write `specs` in order to `path`; use as a context manager and call `write` per tensor."""

    def __init__(
        self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names")
        self.path = Path(path)
        self.specs = specs
        self._next = 0
        self._hash = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        self._bytes = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": spec.dtype.safetensors,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # align the data section to 8 bytes
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()/__exit__
        self._writeback = _Writeback(self._file.fileno())
        self._emit(memoryview(struct.pack("<Q", len(encoded)) + encoded), None)

    def _emit(self, data: memoryview, check: DType | None) -> int:
        """Write `data` chunk by chunk, each hashed on the helper thread while this one writes and
        checks it; returns the NaN/Inf values in it when `check` names its dtype."""
        bad = 0
        step = CHUNK_BYTES - CHUNK_BYTES % (check.itemsize if check else 1)
        for start in range(0, len(data), step):
            chunk = data[start : start + step]
            hashing = self._hasher.submit(self._hash.update, chunk)
            self._file.write(chunk)
            if check is not None:
                bad += nonfinite_in(chunk, check)
            self._bytes += len(chunk)
            self._writeback.written(self._bytes)
            hashing.result()
        return bad

    def write(self, name: str, array: np.ndarray, check_nonfinite: bool = False) -> int:
        """Append the next tensor (an array of the declared dtype's storage type); its name,
        shape and dtype must match the declared spec (checked before anything is written: a
        refused call can be made again correctly). Returns its NaN/Inf count when
        `check_nonfinite` (else 0)."""
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        mismatched = spec is not None and (array.shape, array.dtype) != (
            spec.shape,
            spec.dtype.numpy,
        )
        if spec is not None and name == spec.name and mismatched:
            raise RuntimeError(
                f"{self.path}: {name} is {array.shape} {array.dtype}, declared "
                f"{spec.shape} {spec.dtype} ({spec.dtype.numpy})"
            )
        return self.write_rows(name, [array], check_nonfinite)

    def write_rows(
        self, name: str, pieces: Iterable[np.ndarray], check_nonfinite: bool = False
    ) -> int:
        """Append the next tensor as consecutive blocks of rows (dim 0), one held at a time; their
        rows must add up to the declared shape, in its dtype's storage type. A block that does not fit leaves the
        file unfinished: `close` then fails. Returns the NaN/Inf values written when
        `check_nonfinite` (else 0); a contiguous block is written from its own memory."""
        if self._next >= len(self.specs):
            raise RuntimeError(
                f"{self.path}: all {len(self.specs)} tensors already written, got {name}"
            )
        spec = self.specs[self._next]
        if name != spec.name:
            raise RuntimeError(f"{self.path}: expected tensor {spec.name} next, got {name}")
        rows = bad = 0
        check = spec.dtype if check_nonfinite and spec.dtype.is_floating_point else None
        for piece in pieces:
            shape = tuple(piece.shape)
            fits = (
                (shape[1:] == spec.shape[1:] and rows + shape[0] <= spec.shape[0])
                if shape
                else (spec.shape == () and rows == 0)
            )
            if not fits or piece.dtype != spec.dtype.numpy:
                raise RuntimeError(
                    f"{self.path}: {name} got a block {shape} {piece.dtype} after {rows} rows, "
                    f"declared {spec.shape} {spec.dtype}"
                )
            rows += shape[0] if shape else 1
            data = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
            bad += self._emit(memoryview(data), check)
        if rows != (spec.shape[0] if spec.shape else 1):
            raise RuntimeError(f"{self.path}: {name} has {rows} rows, declared {spec.shape}")
        self._next += 1
        return bad

    def close(self) -> WrittenFile:
        """Flush to disk and return the file's size and sha256; fails if tensors are missing."""
        self._hasher.shutdown()
        if self._next != len(self.specs):
            self._file.close()
            raise RuntimeError(
                f"{self.path}: only {self._next} of {len(self.specs)} tensors written"
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return WrittenFile(self.path, self._bytes, self._hash.hexdigest())

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and not self._file.closed:
            self._hasher.shutdown()
            self._file.close()
