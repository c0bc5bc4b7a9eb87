"""Load torch `.pt` files without executing pickled code.

`torch.load(weights_only=True)` only rebuilds tensors and plain containers; Porter adds an explicit
allow-list for the few other inert globals checkpoints contain. A caller may also name module
prefixes whose classes become inert stand-ins (`stubs`; the Megatron reader stubs `megatron.`
classes, see `converters.megatron.safe_load`): they are never imported or run. Any other global
is refused by name before the file is loaded.

Before torch reads a file, its zip directory is checked (`check_torch_zip`): torch.save writes
every record uncompressed, so a compressed record (a zip bomb that would inflate in memory) or a
record claiming more bytes than the file holds is refused. After loading, every tensor must fit in
its storage (`check_tensor_sizes`): an expanded (stride-0) tensor of a few bytes claiming 10^12
elements would otherwise allocate terabytes when converted.
"""

from __future__ import annotations

import argparse
import io
import pickle
import threading
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.errors import CorruptCheckpoint, UnsafeCheckpoint

# Globals that rebuild inert values. Namespace holds Megatron's `args`, numpy's appear in its
# `rng_state`, BytesIO in Transformer Engine `_extra_state` entries.
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
_LOAD_LOCK = threading.Lock()

# The pickle inside a torch.save zip (`data.pkl`) holds structure, never tensor bytes; a real one is
# kilobytes to a few MiB. A larger one is refused before it is read into memory.
MAX_PICKLE_BYTES = 256 * 2**20


def _safe_globals(path: Path, names: list[str], stubs: Mapping[str, type]) -> list[Any]:
    allowed: list[Any] = list(_NUMPY_DTYPE_CLASSES)  # numpy rebuilds these while unpickling
    refused = []
    for name in names:
        stub = next((cls for prefix, cls in stubs.items() if name.startswith(prefix)), None)
        if name in _ALLOWED:
            allowed.append((_ALLOWED[name], name))
        elif stub is not None:  # a class of a stubbed module: rebuilt as the inert stand-in
            allowed.append((stub, name))
        else:
            refused.append(name)
    if refused:
        raise UnsafeCheckpoint(
            f"the pickle references {', '.join(sorted(refused))}, which Porter does not load "
            "(it could run code); nothing from the file was executed",
            path,
        )
    return allowed


def check_torch_zip(data: Path | bytes, path: Path) -> None:
    """Refuse a torch.save zip (a file, or the bytes of one) that could make the loader allocate
    more than it holds: compressed or encrypted records, records past the end, a huge pickle.
    Reads only the zip directory. `path` names the file in errors."""
    size = len(data) if isinstance(data, bytes) else Path(data).stat().st_size
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        with zipfile.ZipFile(source) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise CorruptCheckpoint(f"cannot read the zip directory: {exc}", path) from exc
    for info in infos:
        name = info.filename
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptCheckpoint(
                f"zip record {name} is compressed (method {info.compress_type}); torch.save "
                "stores records uncompressed, and a compressed one could inflate without bound "
                "(refused before reading it)",
                path,
            )
        if info.flag_bits & 0x1:
            raise CorruptCheckpoint(f"zip record {name} is encrypted", path)
        if info.file_size != info.compress_size or info.header_offset + info.file_size > size:
            raise CorruptCheckpoint(
                f"zip record {name} claims {info.file_size} bytes at offset {info.header_offset}, "
                f"past the end of the {size}-byte file (truncated or forged)",
                path,
            )
        if name.endswith("data.pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise CorruptCheckpoint(
                f"the pickle ({name}) is {info.file_size} bytes; Porter reads at most "
                f"{MAX_PICKLE_BYTES} (a checkpoint's pickle holds no tensor data)",
                path,
            )


def _tensors(obj: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(location, tensor) for every tensor inside dicts, lists, tuples and Namespaces of `obj`."""
    stack, seen = [(obj, where)], set()
    while stack:
        value, at = stack.pop()
        if isinstance(value, torch.Tensor):
            yield at, value
            continue
        if isinstance(value, argparse.Namespace):
            value = vars(value)
        if isinstance(value, dict | list | tuple):
            if id(value) in seen:  # a pickle can reference one container many times
                continue
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, f"{at}/{k}" if at else str(k)) for k, v in items)


def check_tensor_sizes(obj: Any, path: Path) -> None:
    """Refuse tensors that claim more elements than their storage holds (expanded, stride-0 or
    overlapping views): materializing one would allocate far more than the file contains."""
    for where, tensor in _tensors(obj):
        claimed = tensor.numel() * tensor.element_size()
        held = tensor.untyped_storage().nbytes()
        if claimed > held:
            raise CorruptCheckpoint(
                f"{f'tensor {where}' if where else 'the tensor'} has shape {list(tensor.shape)} "
                f"({claimed} bytes) but its storage "
                f"holds {held} bytes (an expanded or overlapping view); refused before "
                "allocating it",
                path,
            )


def load_pt(path: Path, *, mmap: bool = True, stubs: Mapping[str, type] | None = None) -> Any:
    """Load a torch `.pt` file safely; tensors stay memory-mapped so only touched bytes are read.

    `stubs` maps a module prefix (e.g. ``"megatron."``) to an inert class that stands in for every
    global under it; without it, such globals are refused like any other."""
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
    check_torch_zip(path, path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # a broken archive or pickle stream
        raise CorruptCheckpoint(f"cannot read the pickle: {exc}", path) from exc
    allowed = _safe_globals(path, names, stubs or {})
    try:
        # torch's safe-globals list is process-wide, not per thread: one load at a time.
        with _LOAD_LOCK, torch.serialization.safe_globals(allowed):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()
        reason = detail[0] if detail else repr(exc)
        raise UnsafeCheckpoint(
            f"refused to unpickle (nothing was executed): {reason}", path
        ) from exc
    except Exception as exc:
        raise CorruptCheckpoint(f"cannot load: {_load_error(exc)}", path) from exc
    check_tensor_sizes(loaded, path)
    return loaded


def _load_error(exc: Exception) -> str:
    """torch's reason, said plainly where torch's own words are obscure."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    if "not resizable" in text or "does not match expected size" in text:
        return (
            "a tensor claims more elements than its storage record holds (truncated or forged "
            f"header; refused before allocating): {text}"
        )
    return text
