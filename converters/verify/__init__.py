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

__all__ = ["Report", "cross_check_export", "verify_export"]


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


def cross_check_export(source: SourceCheckpoint, export: Path, **options: Any) -> Report | None:
    """The same verification with transformers computing each layer of the Hugging Face export
    (dense model types); None when transformers is not installed."""
    from converters.verify.export import export_format
    from converters.verify.files import BadExport, read_config
    from converters.verify.transformers_side import TransformersSide, transformers_version

    if transformers_version() is None:
        return None
    export = Path(export)
    if export_format(export) != "hf":
        raise BadExport("the transformers cross-check applies to Hugging Face exports", export)
    side = TransformersSide(export, read_config(export / "config.json"))
    try:
        return verify(MegatronSide(source), side, **options)
    finally:
        side.close()
