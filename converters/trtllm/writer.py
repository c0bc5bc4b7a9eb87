"""Stream a safetensors file tensor by tensor, never holding the whole file in memory.

The format is an 8-byte little-endian header length, a JSON header with every tensor's dtype,
shape and byte range, then the data. Shapes are known from the plan, so the header is written
first and each tensor's bytes follow in order. The writer is a small state machine: it refuses a
tensor out of order, of the wrong shape or dtype, and refuses to finish before all are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

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
                "dtype": SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # align the data section to 8 bytes
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()/__exit__
        self._emit(struct.pack("<Q", len(encoded)) + encoded)

    def _emit(self, data: bytes | memoryview) -> None:
        # Hash on a helper thread while this one writes: both release the GIL on large buffers.
        hashing = self._hasher.submit(self._hash.update, data)
        self._file.write(data)
        hashing.result()
        self._bytes += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, shape and dtype must match the declared spec
        (checked before anything is written: a refused call can be made again correctly)."""
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        mismatched = spec is not None and (tuple(tensor.shape), tensor.dtype) != (
            spec.shape,
            spec.dtype,
        )
        if spec is not None and name == spec.name and mismatched:
            raise RuntimeError(
                f"{self.path}: {name} is {tuple(tensor.shape)} {tensor.dtype}, declared "
                f"{spec.shape} {spec.dtype}"
            )
        self.write_rows(name, [tensor])

    def write_rows(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        """Append the next tensor as consecutive blocks of rows (dim 0), one held at a time; their
        rows must add up to the declared shape, in its dtype. A block that does not fit leaves the
        file unfinished: `close` then fails."""
        if self._next >= len(self.specs):
            raise RuntimeError(
                f"{self.path}: all {len(self.specs)} tensors already written, got {name}"
            )
        spec = self.specs[self._next]
        if name != spec.name:
            raise RuntimeError(f"{self.path}: expected tensor {spec.name} next, got {name}")
        rows = 0
        for piece in pieces:
            shape = tuple(piece.shape)
            fits = (
                (shape[1:] == spec.shape[1:] and rows + shape[0] <= spec.shape[0])
                if shape
                else (spec.shape == () and rows == 0)
            )
            if not fits or piece.dtype != spec.dtype:
                raise RuntimeError(
                    f"{self.path}: {name} got a block {shape} {piece.dtype} after {rows} rows, "
                    f"declared {spec.shape} {spec.dtype}"
                )
            rows += shape[0] if shape else 1
            data = piece.contiguous().reshape(-1).view(torch.uint8).numpy()
            self._emit(memoryview(data))
        if rows != (spec.shape[0] if spec.shape else 1):
            raise RuntimeError(f"{self.path}: {name} has {rows} rows, declared {spec.shape}")
        self._next += 1

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
