"""numpy arrays of a `DType` as torch tensors and back, for the code that computes with torch
(`porter verify`, tests): the conversion path itself never imports this module."""

from __future__ import annotations

import numpy as np
import torch

from converters import dtypes
from converters.dtypes import DType
from converters.tensors import Eager, LazyTensor


def to_torch(array: np.ndarray, dtype: DType) -> torch.Tensor:
    """A torch tensor (a copy) holding `array`, an array of `dtype`."""
    copy = np.array(array, dtype=dtype.numpy, copy=True)
    if dtype is dtypes.BFLOAT16:
        return torch.from_numpy(copy.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(copy)


def from_torch(tensor: torch.Tensor) -> tuple[np.ndarray, DType]:
    """(an array of the same bits, its DType) of a CPU tensor (a copy)."""
    dtype = dtypes.named(str(tensor.dtype))
    data = tensor.detach().contiguous()
    if dtype is dtypes.BFLOAT16:
        return data.view(torch.int16).numpy().view(np.uint16).copy(), dtype
    return data.numpy().copy(), dtype


def materialize(tensor: LazyTensor) -> torch.Tensor:
    """`tensor.materialize()` as a torch tensor of its dtype."""
    return to_torch(tensor.materialize(), tensor.dtype)


def torch_dtype(dtype: DType) -> torch.dtype:
    """torch's type for `dtype`."""
    return getattr(torch, dtype.name)


def eager(tensor: torch.Tensor) -> Eager:
    """A lazy tensor holding (a copy of) `tensor`."""
    return Eager(*from_torch(tensor))
