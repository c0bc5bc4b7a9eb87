"""Load PowerInfer activation statistics (`activation_<i>.pt`, one 1-D tensor per layer) safely.

Files are read with `converters.safe_load.load_pt` (no torch; inert globals only): a pickle
that references anything else is refused before it is loaded, so nothing in it runs. Layers
are ordered numerically (0, 1, 2, …, 10), not as strings (PowerInfer issue #247). Only names that
match exactly `activation_<int>.pt` count; other files are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.dtypes import BFLOAT16, BOOL, FLOAT32, cast
from converters.powerinfer.errors import (
    BadActivationShape,
    BadActivationValues,
    MissingActivationLayer,
    NotATensor,
)
from converters.safe_load import load_pt
from converters.torch_zip import StoredTensor

ACTIVATION_NAME = re.compile(r"activation_([0-9]+)\.pt")


@dataclass(frozen=True)
class Activations:
    """Per-layer statistics: `values[l]` is layer l's vector of length n_ff."""

    values: np.ndarray  # float32 (float sources of ≤ 32 bits) or float64 [n_layers, n_ff]
    files: tuple[Path, ...]  # files[l] is the source of values[l]

    @property
    def n_layers(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_ff(self) -> int:
        return int(self.values.shape[1])


def find_activation_files(directory: Path) -> list[Path]:
    """The `activation_<i>.pt` files of `directory` in numeric layer order; checks 0..L-1 all exist."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingActivationLayer("not a directory of activation_<i>.pt files", directory)
    names = [p.name for p in directory.iterdir() if p.is_file()]
    return [directory / name for name in order_activation_names(names, directory)]


def order_activation_names(names: list[str], where: str | Path) -> list[str]:
    """The `activation_<i>.pt` names among `names` in numeric layer order (others ignored);
    checks layers 0..L-1 are all present exactly once. `where` names the directory in errors."""
    by_layer: dict[int, str] = {}
    for name in names:
        match = ACTIVATION_NAME.fullmatch(name)
        if match is None:
            continue
        layer = int(match.group(1))
        if layer in by_layer:
            raise MissingActivationLayer(
                f"both {by_layer[layer]} and {name} claim layer {layer}; keep one", where
            )
        by_layer[layer] = name
    if not by_layer:
        raise MissingActivationLayer("no activation_<i>.pt files found", where)
    n_layers = max(by_layer) + 1
    missing = [i for i in range(n_layers) if i not in by_layer]
    if missing:
        shown = ", ".join(f"activation_{i}.pt" for i in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise MissingActivationLayer(
            f"missing {shown}{more}: layers 0..{n_layers - 1} must all be present", where
        )
    return [by_layer[i] for i in range(n_layers)]


def load_layer(path: Path) -> np.ndarray:
    """One layer's validated activation vector (float32 or float64, length n_ff) from a `.pt`."""
    obj = load_pt(path)
    if not isinstance(obj, StoredTensor):
        raise NotATensor(
            f"expected a torch.save'd 1-D tensor of activation counts, found {type(obj).__name__}",
            path,
        )
    if len(obj.shape) != 1:
        raise BadActivationShape(
            f"expected a 1-D tensor of length n_ff, found shape {tuple(obj.shape)}", path
        )
    if obj.dtype is BOOL:
        raise BadActivationValues(f"dtype torch.{obj.dtype} is not a float or int type", path)
    # float32 (and narrower floats, exactly) stay float32: half the memory, twice the sort speed;
    # integers and float64 become float64. Sums are always taken in float64.
    narrow = obj.dtype.is_floating_point and obj.dtype.itemsize <= 4
    values = obj.array()
    if obj.dtype is BFLOAT16:
        values = cast(values, BFLOAT16, FLOAT32)
    values = values.astype(np.float32 if narrow else np.float64)  # a copy: the file is not kept
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise BadActivationValues(f"value at neuron {bad} is {values[bad]} (NaN or infinite)", path)
    if (values < 0).any():
        bad = int(np.flatnonzero(values < 0)[0])
        raise BadActivationValues(
            f"value at neuron {bad} is negative ({values[bad]}); activation counts must be ≥ 0",
            path,
        )
    return values


def load_activations(directory: Path, *, n_layers: int | None = None) -> Activations:
    """Load and validate every layer; `n_layers`, if given, must equal the number of files."""
    files = find_activation_files(directory)
    if n_layers is not None and len(files) != n_layers:
        raise MissingActivationLayer(
            f"found {len(files)} layers (activation_0.pt..activation_{len(files) - 1}.pt), "
            f"the model has {n_layers}",
            directory,
        )
    rows: list[np.ndarray] = []
    for path in files:
        row = load_layer(path)
        if rows and row.shape != rows[0].shape:
            raise BadActivationShape(
                f"has {row.shape[0]} neurons but {files[0].name} has {rows[0].shape[0]}; "
                "all layers must have the same n_ff",
                path,
            )
        rows.append(row)
    if rows[0].shape[0] == 0:
        raise BadActivationShape("the tensor is empty (n_ff = 0)", files[0])
    return Activations(values=np.stack(rows), files=tuple(files))
