"""Element types of the conversion path, without torch.

A conversion reads and writes bytes: it never needs torch's tensors, only to know what the bytes
are. `DType` says that (its names are torch's and TensorRT-LLM's: "bfloat16", ...), arrays of it
are numpy arrays of its `storage` type (bfloat16, which numpy lacks, is stored as uint16 bits),
and `cast` converts between them with torch's rounding (round to nearest, ties to even), so that a
file converted here is byte for byte the file torch's `.to(dtype)` would give.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    """One element type: its name, size, safetensors tag and numpy storage type."""

    name: str  # torch's name without "torch." ("bfloat16", "int64", ...)
    itemsize: int
    safetensors: str  # the safetensors header's tag ("BF16", ...)
    storage: str  # the numpy dtype its arrays have ("uint16" for bfloat16)
    torch_storage: str  # torch.save's legacy storage class ("BFloat16Storage", ...)
    # NaN/±inf test on the bits: (bits & magnitude) >= exponent; None for non-float types.
    magnitude: int | None = None
    exponent: int | None = None

    @property
    def is_floating_point(self) -> bool:
        return self.exponent is not None

    @property
    def numpy(self) -> np.dtype:
        """The little-endian numpy dtype of this type's arrays."""
        return np.dtype(self.storage).newbyteorder("<")

    def __str__(self) -> str:
        return self.name


FLOAT32 = DType("float32", 4, "F32", "float32", "FloatStorage", 0x7FFF_FFFF, 0x7F80_0000)
FLOAT16 = DType("float16", 2, "F16", "float16", "HalfStorage", 0x7FFF, 0x7C00)
BFLOAT16 = DType("bfloat16", 2, "BF16", "uint16", "BFloat16Storage", 0x7FFF, 0x7F80)
FLOAT64 = DType(
    "float64", 8, "F64", "float64", "DoubleStorage", 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000
)
INT64 = DType("int64", 8, "I64", "int64", "LongStorage")
INT32 = DType("int32", 4, "I32", "int32", "IntStorage")
INT16 = DType("int16", 2, "I16", "int16", "ShortStorage")
INT8 = DType("int8", 1, "I8", "int8", "CharStorage")
UINT8 = DType("uint8", 1, "U8", "uint8", "ByteStorage")
BOOL = DType("bool", 1, "BOOL", "bool", "BoolStorage")

ALL: tuple[DType, ...] = (
    FLOAT32, FLOAT16, BFLOAT16, FLOAT64, INT64, INT32, INT16, INT8, UINT8, BOOL
)  # fmt: skip
BY_NAME: dict[str, DType] = {d.name: d for d in ALL}
BY_TORCH_STORAGE: dict[str, DType] = {d.torch_storage: d for d in ALL}
# torch's other spellings of the same types (`torch.half`, `torch.float`, ...)
ALIASES: dict[str, DType] = {
    "half": FLOAT16,
    "float": FLOAT32,
    "double": FLOAT64,
    "long": INT64,
    "int": INT32,
    "short": INT16,
}


def named(name: str) -> DType:
    """The DType called `name` ("bfloat16", "torch.bfloat16", "half", ...); KeyError if none."""
    name = name.removeprefix("torch.")
    found = BY_NAME.get(name) or ALIASES.get(name)
    if found is None:
        raise KeyError(f"unsupported element type {name!r}")
    return found


def nonfinite_in(data: memoryview | bytes | np.ndarray, dtype: DType) -> int:
    """NaN and ±inf values among the little-endian `dtype` values in `data` (0 for integer
    types), from the exponent bits: integer operations on a view, no float arithmetic."""
    if dtype.exponent is None:
        return 0
    bits = np.frombuffer(data, dtype=f"<u{dtype.itemsize}")
    if not bits.size:
        return 0
    masked = np.bitwise_and(bits, dtype.magnitude)
    if masked.max() < dtype.exponent:  # the common case: one pass, no count
        return 0
    return int(np.count_nonzero(masked >= dtype.exponent))


def _to_float32(values: np.ndarray, src: DType) -> np.ndarray:
    """`values` widened to float32 exactly (bfloat16 bits shifted into place)."""
    if src is BFLOAT16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def _float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits, rounding to nearest with ties to even, as torch does.

    NaN keeps its sign and top payload bits and is made quiet (never rounded into ±inf)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = (bits & 0x7FFF_FFFF) > 0x7F80_0000
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def cast(values: np.ndarray, src: DType, dst: DType, add_one: bool = False) -> np.ndarray:
    """`values` (an array of `src`) as a contiguous array of `dst` (`values` itself when it is one
    already: do not mutate the result), rounded as torch's
    `.to(dst)` rounds; with `add_one`, as torch's `(x.float() + 1).to(dst)` (the zero-centred
    norm weights), the addition in float32. Overflow gives ±inf, as in torch."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _cast(values, src, dst, add_one)


def _cast(values: np.ndarray, src: DType, dst: DType, add_one: bool) -> np.ndarray:
    if not add_one:
        if src == dst:
            return np.ascontiguousarray(values)
        if dst is BFLOAT16:
            return _float32_to_bfloat16(_to_float32(values, src))
        if src is BFLOAT16:
            return _to_float32(values, src).astype(dst.numpy)
        return values.astype(dst.numpy)
    widened = _to_float32(values, src) + np.float32(1.0)
    if dst is BFLOAT16:
        return _float32_to_bfloat16(widened)
    return widened.astype(dst.numpy)
