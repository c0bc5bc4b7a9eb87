"""Lazy tensors: describe a slice of a (possibly sharded, possibly on-disk) tensor without reading it.

Readers expose every source tensor as a `LazyTensor` in its *global* (unsharded) shape. Re-shard
rules narrow it to the rows or columns one target rank needs; only `materialize()` touches data,
and it reads only the parts that overlap the final slice. Shapes and byte counts are known before
anything is read, which is what planning (peak memory, bytes per rank) relies on.

Data are numpy arrays of the tensor's `DType` (`converters.dtypes`): the conversion path never
imports torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from converters.dtypes import DType

# (file, offset, length): a byte range of a local file that `materialize()` reads.
FileRange = tuple[Path, int, int]


class LazyTensor(ABC):
    """A tensor-valued expression over sources that are read only when materialized."""

    shape: tuple[int, ...]
    dtype: DType

    @abstractmethod
    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        """The slice [start, start + length) along `dim` (no data is read)."""

    @abstractmethod
    def materialize(self) -> np.ndarray:
        """Read the data (an array of `dtype.numpy`). The result may share memory with a
        read-only mapping: do not mutate."""

    @property
    @abstractmethod
    def source_nbytes(self) -> int:
        """Bytes that `materialize()` reads from the source."""

    @property
    def nbytes(self) -> int:
        """Size of the materialized tensor in bytes."""
        return _numel(self.shape) * self.dtype.itemsize

    def file_ranges(self) -> list[FileRange]:
        """Every byte range of local files that `materialize()` reads (no data is read).

        Lets a caller make those bytes present first (e.g. fetch them into a sparse local copy).
        A subclass that cannot tell raises rather than claim it reads nothing.
        """
        raise NotImplementedError(f"{type(self).__name__} does not report the file bytes it reads")

    def index0(self, index: int) -> LazyTensor:
        """Entry `index` of the leading dimension, with that dimension removed."""
        return _Squeeze0(self.narrow(0, index, 1))

    def _check_narrow(self, dim: int, start: int, length: int) -> None:
        if not 0 <= dim < len(self.shape):
            raise IndexError(f"dim {dim} out of range for shape {self.shape}")
        if start < 0 or length < 0 or start + length > self.shape[dim]:
            raise IndexError(
                f"slice [{start}, {start + length}) out of range for dim {dim} of {self.shape}"
            )


def narrow(array: np.ndarray, dim: int, start: int, length: int) -> np.ndarray:
    """The view of `array` covering [start, start + length) along `dim` (no copy)."""
    index = [slice(None)] * array.ndim
    index[dim] = slice(start, start + length)
    return array[tuple(index)]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


class Eager(LazyTensor):
    """An array already addressable in memory (typically memory-mapped from a file)."""

    def __init__(self, array: np.ndarray, dtype: DType) -> None:
        if array.dtype != dtype.numpy:
            raise ValueError(f"an array of {array.dtype} does not hold {dtype}")
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = dtype

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        self._check_narrow(dim, start, length)
        return Eager(narrow(self.array, dim, start, length), self.dtype)

    def materialize(self) -> np.ndarray:
        return self.array

    def file_ranges(self) -> list[FileRange]:
        return []  # already addressable: nothing for a caller to fetch

    @property
    def source_nbytes(self) -> int:
        return self.nbytes


class Zeros(LazyTensor):
    """Zero padding (vocab rows beyond V, missing biases): costs no reads."""

    def __init__(self, shape: Sequence[int], dtype: DType) -> None:
        self.shape = tuple(shape)
        self.dtype = dtype

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        self._check_narrow(dim, start, length)
        shape = list(self.shape)
        shape[dim] = length
        return Zeros(shape, self.dtype)

    def materialize(self) -> np.ndarray:
        return np.zeros(self.shape, dtype=self.dtype.numpy)

    def file_ranges(self) -> list[FileRange]:
        return []

    @property
    def source_nbytes(self) -> int:
        return 0


class Concat(LazyTensor):
    """Parts joined along `dim`; narrowing along `dim` keeps only the overlapping parts."""

    def __init__(self, parts: Sequence[LazyTensor], dim: int) -> None:
        if not parts:
            raise ValueError("Concat needs at least one part")
        first = parts[0]
        for part in parts:
            if part.dtype != first.dtype:
                raise ValueError(f"Concat of mixed dtypes {first.dtype} and {part.dtype}")
            other = [s for d, s in enumerate(part.shape) if d != dim]
            if other != [s for d, s in enumerate(first.shape) if d != dim]:
                raise ValueError(f"Concat along {dim} of shapes {first.shape} and {part.shape}")
        self.parts = list(parts)
        self.dim = dim
        self.dtype = first.dtype
        shape = list(first.shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        self.shape = tuple(shape)

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        self._check_narrow(dim, start, length)
        if dim != self.dim:
            return _concat([p.narrow(dim, start, length) for p in self.parts], self.dim)
        picked, offset, end = [], 0, start + length
        for part in self.parts:
            size = part.shape[dim]
            lo, hi = max(start, offset), min(end, offset + size)
            if lo < hi:
                picked.append(part.narrow(dim, lo - offset, hi - lo))
            offset += size
        if not picked:  # an empty slice
            return self.parts[0].narrow(dim, 0, 0)
        return _concat(picked, dim)

    def materialize(self) -> np.ndarray:
        return np.concatenate([p.materialize() for p in self.parts], axis=self.dim)

    def file_ranges(self) -> list[FileRange]:
        return [r for part in self.parts for r in part.file_ranges()]

    @property
    def source_nbytes(self) -> int:
        return sum(p.source_nbytes for p in self.parts)


def _concat(parts: Sequence[LazyTensor], dim: int) -> LazyTensor:
    return parts[0] if len(parts) == 1 else Concat(parts, dim)


def concat(parts: Sequence[LazyTensor], dim: int) -> LazyTensor:
    """Join parts along `dim` (a single part is returned as is)."""
    return _concat(list(parts), dim)


class _Squeeze0(LazyTensor):
    """A view with a leading dimension of size 1 removed."""

    def __init__(self, inner: LazyTensor) -> None:
        if inner.shape[0] != 1:
            raise ValueError(f"cannot drop leading dim of shape {inner.shape}")
        self.inner = inner
        self.shape = inner.shape[1:]
        self.dtype = inner.dtype

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        self._check_narrow(dim, start, length)
        return _Squeeze0(self.inner.narrow(dim + 1, start, length))

    def materialize(self) -> np.ndarray:
        return self.inner.materialize()[0]

    def file_ranges(self) -> list[FileRange]:
        return self.inner.file_ranges()

    @property
    def source_nbytes(self) -> int:
        return self.inner.source_nbytes
