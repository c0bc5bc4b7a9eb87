"""`porter verify`: prove an export computes what its Megatron source computes, on a CPU, one
layer at a time (run.py). The plain-torch reference layers are in layers.py; each side (the
Megatron source, a TensorRT-LLM or a Hugging Face export) has its own module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from converters.megatron.layout import SourceCheckpoint
from converters.verify.export import open_export
from converters.verify.run import Report, verify
from converters.verify.source import MegatronSide

__all__ = ["Report", "verify_export"]


def verify_export(
    source: SourceCheckpoint, export: Path, *, finished: bool = True, **options: Any
) -> Report:
    """Verify the export in directory `export` against the opened Megatron checkpoint `source`
    (`options`: tokens, seed, tolerance, on_stage of `run.verify`). `finished=False` accepts an
    export without manifest.json (the job step, before it publishes)."""
    side = open_export(Path(export), finished=finished)
    try:
        return verify(MegatronSide(source), side, **options)
    finally:
        side.close()
