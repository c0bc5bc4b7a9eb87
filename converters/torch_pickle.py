"""The restricted unpickler of torch.save pickles: only inert globals, nothing imported or run.

Every global a pickle names resolves to one of
- an inert constructor Porter allows (`ALLOWED`: Megatron's `args` Namespace, BytesIO and bytes of
  Transformer Engine `_extra_state`, numpy's array rebuild for `rng_state`, sets, OrderedDict, ...),
- a torch name reimplemented here without torch: the tensor rebuild functions (which hand the
  storage and view to `rebuild_tensor`, defined by the archive reader), storage classes and element
  types (`torch.BFloat16Storage`, `torch.bfloat16` → `DType`), `torch.Size` (a tuple),
- the stand-in class of a caller's stubbed module prefix (`stubs`, e.g. ``"megatron."``).
Any other global is recorded and replaced by an inert placeholder, so that unpickling can go on and
every refused name be reported at once (`refused`); nothing refused is ever imported or called.
Nothing here imports torch, and no global is looked up by importing: each allowed name maps to an
object already in hand.
"""

from __future__ import annotations

import argparse
import collections
import io
import pickle
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from converters import dtypes
from converters.dtypes import DType


class Malformed(pickle.UnpicklingError):
    """A pickle that names only allowed globals but calls them with arguments torch never writes.
    Its message is Porter's own words (it never quotes the file's values)."""


def _no_sizes(*args: Any) -> None:
    """Refuse `bytes(n)`, `bytearray(n)`: a pickle asking for n zero bytes (n up to 2^63)."""
    if args and isinstance(args[0], int):
        raise Malformed("bytes of a given length requested (pickles carry their bytes)")


def _bytes(*args: Any) -> bytes:
    _no_sizes(*args)
    return bytes(*args)


def _bytearray(*args: Any) -> bytearray:
    _no_sizes(*args)
    return bytearray(*args)


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """`_codecs.encode` as pickle protocol 2 uses it for bytes: (str, "latin1") only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Malformed("_codecs.encode called other than for bytes")
    return text.encode("latin1")


_NDARRAY = object()  # what `numpy.ndarray` names: only an argument of `_reconstruct`


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's array rebuild, for the empty array its pickles always start from (the data follows in
    the pickle): never an allocation of a size the pickle chooses."""
    if subtype is not _NDARRAY or shape != (0,):
        raise Malformed("numpy array rebuilt other than numpy pickles it")
    return np._core.multiarray._reconstruct(np.ndarray, (0,), dtype)


def _size(values: Any = ()) -> tuple[int, ...]:
    """`torch.Size`: a tuple of ints."""
    return tuple(values)


def _parameter_data(data: Any, *_: Any) -> Any:
    """`_rebuild_parameter(_with_state)`: a Parameter is read as its data."""
    return data


# numpy rebuilds these while unpickling a dtype (`numpy.dtypes.UInt32DType`, ...)
_NUMPY_DTYPE_CLASSES = {
    f"numpy.dtypes.{name}": getattr(np.dtypes, name)
    for name in dir(np.dtypes)
    if name.endswith("DType")
}
# Inert globals: what they build holds values, never code.
ALLOWED: dict[str, Any] = {
    "argparse.Namespace": argparse.Namespace,
    "io.BytesIO": io.BytesIO,
    "_io.BytesIO": io.BytesIO,
    "builtins.bytes": _bytes,
    "builtins.bytearray": _bytearray,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "_codecs.encode": _encode,
    "collections.OrderedDict": collections.OrderedDict,
    "collections.Counter": collections.Counter,
    "numpy.ndarray": _NDARRAY,
    "numpy.dtype": np.dtype,
    "numpy.core.multiarray._reconstruct": _reconstruct,
    "numpy._core.multiarray._reconstruct": _reconstruct,
    **_NUMPY_DTYPE_CLASSES,
    "torch.Size": _size,
    "torch._utils._rebuild_parameter": _parameter_data,
    "torch._utils._rebuild_parameter_with_state": _parameter_data,
}


@dataclass(frozen=True)
class StorageType:
    """What a storage class global (`torch.BFloat16Storage`, `torch.UntypedStorage`) names."""

    dtype: DType


@dataclass(frozen=True)
class TensorType:
    """`torch.Tensor` or `torch.nn.parameter.Parameter`: only an argument of
    `_rebuild_from_type_v2` (a tensor saved with Python attributes)."""

    name: str


STORAGE_TYPES: dict[str, StorageType] = {
    **{f"torch.{name}": StorageType(dtype) for name, dtype in dtypes.BY_TORCH_STORAGE.items()},
    "torch.UntypedStorage": StorageType(dtypes.UINT8),
    "torch.storage.UntypedStorage": StorageType(dtypes.UINT8),
}
ELEMENT_TYPES: dict[str, DType] = {
    f"torch.{name}": dtypes.named(name) for name in (*dtypes.BY_NAME, *dtypes.ALIASES)
}
TENSOR_TYPES = {name: TensorType(name) for name in ("torch.Tensor", "torch.nn.parameter.Parameter")}


class _Refused:
    """Stands in for a refused global while the rest of the pickle is read; does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Refused:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles with the globals above only; subclasses read storages (`persistent_load`) and
    build tensors (`rebuild_tensor`)."""

    def __init__(self, data: bytes, stubs: Mapping[str, type] | None = None) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.stubs = dict(stubs or {})
        self.refused: set[str] = set()
        self.names = {
            **ALLOWED,
            **STORAGE_TYPES,
            **ELEMENT_TYPES,
            **TENSOR_TYPES,
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": self._rebuild_tensor_v3,
            "torch._tensor._rebuild_from_type_v2": self._rebuild_from_type_v2,
        }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in NAME_MAPPING:  # Python 2 names, as pickle's own find_class maps them
            module, name = NAME_MAPPING[(module, name)]
        elif module in IMPORT_MAPPING:
            module = IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in self.names:
            return self.names[full]
        stub = next((cls for prefix, cls in self.stubs.items() if full.startswith(prefix)), None)
        if stub is not None:
            return stub
        self.refused.add(full)
        return _Refused

    def rebuild_tensor(
        self, storage: Any, offset: Any, size: Any, stride: Any, dtype: DType | None
    ) -> Any:
        """The tensor over `storage` (from `persistent_load`); `dtype` None: the storage's."""
        raise NotImplementedError

    def _rebuild_tensor_v2(
        self, storage: Any, offset: Any, size: Any, stride: Any, *_flags: Any
    ) -> Any:
        return self.rebuild_tensor(storage, offset, size, stride, None)

    def _rebuild_tensor_v3(
        self, storage: Any, offset: Any, size: Any, stride: Any, _grad: Any, _hooks: Any,
        dtype: Any, *_metadata: Any,
    ) -> Any:  # fmt: skip
        if not isinstance(dtype, DType):
            raise Malformed("_rebuild_tensor_v3 without an element type")
        return self.rebuild_tensor(storage, offset, size, stride, dtype)

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, _state: Any) -> Any:
        """A tensor saved with Python attributes: read as the plain tensor (attributes dropped)."""
        rebuilds = (self._rebuild_tensor_v2, self._rebuild_tensor_v3, _parameter_data)
        if func not in rebuilds or not isinstance(new_type, TensorType):
            raise Malformed("_rebuild_from_type_v2 of something other than a tensor")
        if not isinstance(args, tuple):
            raise Malformed("_rebuild_from_type_v2 without an argument tuple")
        return func(*args)
