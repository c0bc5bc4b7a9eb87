"""Safetensors files of an export, opened lazily and read one tensor (or a row range) at a time,
with a record of which tensors were read (what is left over is not used by the model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from converters.errors import ConversionError

MAX_CONFIG_BYTES = 2**20


class BadExport(ConversionError):
    """An export that cannot be verified: unfinished, of an unknown format, or malformed."""


def read_config(path: Path) -> dict[str, Any]:
    """A `config.json` as a dict; BadExport naming the file otherwise."""
    if not path.is_file():
        raise BadExport("missing config.json", path)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise BadExport(f"larger than {MAX_CONFIG_BYTES} bytes", path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadExport(f"not JSON: {exc}", path) from None
    if not isinstance(data, dict):
        raise BadExport("not a JSON object", path)
    return data


class TensorFiles:
    """Tensors by name across safetensors files ({name: file})."""

    def __init__(self, locations: dict[str, Path]) -> None:
        self.locations = locations
        self._handles: dict[Path, Any] = {}
        self.used: set[str] = set()

    @classmethod
    def of(cls, files: list[Path]) -> TensorFiles:
        """Every tensor of `files` (a name in two files is an error)."""
        locations: dict[str, Path] = {}
        for path in files:
            for name in _names(path):
                if name in locations:
                    raise BadExport(f"tensor {name} is also in {locations[name].name}", path)
                locations[name] = path
        return cls(locations)

    def has(self, name: str) -> bool:
        return name in self.locations

    def _slice(self, name: str) -> Any:
        if name not in self.locations:
            raise BadExport(f"missing tensor {name}", self.where())
        path = self.locations[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        self.used.add(name)
        return self._handles[path].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor `name` as float32, checked against `shape`."""
        view = self._slice(name)
        found = tuple(view.get_shape())
        if shape is not None and found != tuple(shape):
            raise BadExport(
                f"tensor {name} has shape {found}, expected {tuple(shape)} (the export and the "
                "source are different models, or the export is malformed)",
                self.locations[name],
            )
        return view[:].to(torch.float32)

    def rows(self, name: str, start: int, count: int) -> torch.Tensor:
        """Rows [start, start + count) of a 2-D tensor, as float32."""
        return self._slice(name)[start : start + count].to(torch.float32)

    def unused(self) -> list[str]:
        return sorted(set(self.locations) - self.used)

    def where(self) -> str:
        files = sorted({p.name for p in self.locations.values()})
        return str(next(iter(self.locations.values())).parent / ",".join(files)) if files else ""

    def dtype(self) -> str:
        """The stored dtype of the first floating-point tensor ("bfloat16", ...)."""
        for name in self.locations:
            dtype = str(self._slice(name).get_dtype())
            self.used.discard(name)
            return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtype, dtype)
        return "float32"

    def close(self) -> None:
        self._handles.clear()


def _names(path: Path) -> list[str]:
    if not path.is_file():
        raise BadExport("missing weight file", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise BadExport(f"not a readable safetensors file: {exc}", path) from None
