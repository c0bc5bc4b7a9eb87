"""Load Megatron `.pt` files without executing pickled code.

`torch.load(weights_only=True)` only rebuilds tensors and plain containers; Porter adds an explicit
allow-list for the few other globals Megatron checkpoints contain. Megatron's own classes (enums
inside `args`) become inert `MegatronStub` objects: they are never imported or run. Any other global
is refused by name before the file is loaded.
"""

from __future__ import annotations

import argparse
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.errors import CorruptCheckpoint, UnsafeCheckpoint


class MegatronStub:
    """Inert stand-in for a Megatron class found in a pickle (e.g. `ModelType.encoder_or_decoder`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"MegatronStub{self.args}"


# Globals that rebuild inert values. numpy's appear in Megatron's `rng_state`, BytesIO in
# Transformer Engine `_extra_state` entries.
_ALLOWED: dict[str, Any] = {
    "argparse.Namespace": argparse.Namespace,
    "io.BytesIO": io.BytesIO,
    "_io.BytesIO": io.BytesIO,
    "builtins.bytes": bytes,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    "numpy.core.multiarray._reconstruct": np.core.multiarray._reconstruct,
    "numpy._core.multiarray._reconstruct": np.core.multiarray._reconstruct,
}
_NUMPY_DTYPE_CLASSES = [
    getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")
]
_STUBBED_PREFIX = "megatron."


def _safe_globals(path: Path, names: list[str]) -> list[Any]:
    allowed: list[Any] = list(_NUMPY_DTYPE_CLASSES)  # numpy rebuilds these while unpickling
    refused = []
    for name in names:
        if name in _ALLOWED:
            allowed.append((_ALLOWED[name], name))
        elif name.startswith(_STUBBED_PREFIX):
            allowed.append((MegatronStub, name))
        else:
            refused.append(name)
    if refused:
        raise UnsafeCheckpoint(
            f"the pickle references {', '.join(sorted(refused))}, which Porter does not load "
            "(it could run code); nothing from the file was executed",
            path,
        )
    return allowed


def load_pt(path: Path, *, mmap: bool = True) -> Any:
    """Load a torch `.pt` file safely; tensors stay memory-mapped so only touched bytes are read."""
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpoint("file is missing", path)
    if path.stat().st_size == 0:
        raise CorruptCheckpoint("file is empty", path)
    if not zipfile.is_zipfile(path):
        raise CorruptCheckpoint(
            "not a torch zip archive (truncated, corrupted, or saved with the legacy "
            "non-zip format); re-save it with torch.save",
            path,
        )
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # a broken archive or pickle stream
        raise CorruptCheckpoint(f"cannot read the pickle: {exc}", path) from exc
    allowed = _safe_globals(path, names)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()
        reason = detail[0] if detail else repr(exc)
        raise UnsafeCheckpoint(
            f"refused to unpickle (nothing was executed): {reason}", path
        ) from exc
    except Exception as exc:
        raise CorruptCheckpoint(f"cannot load: {exc}", path) from exc
