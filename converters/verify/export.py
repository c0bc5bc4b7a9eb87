"""Recognise an export from its files: a TensorRT-LLM checkpoint (`config.json` with
`architecture`, `rank{N}.safetensors`) or a Hugging Face one (`config.json` with `architectures`,
`model*.safetensors`); a finished Porter export also has `manifest.json` (written last)."""

from __future__ import annotations

from pathlib import Path

from converters.verify.files import BadExport, read_config
from converters.verify.hf import HfSide
from converters.verify.side import Side
from converters.verify.trtllm import TrtllmSide

MANIFEST = "manifest.json"
FORMATS = ("trtllm", "hf")


def export_format(directory: Path) -> str:
    """ "trtllm" or "hf"; BadExport saying what is there otherwise."""
    if not directory.is_dir():
        raise BadExport("no such export directory", directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise BadExport(
            "unknown export format: no config.json (expected a TensorRT-LLM checkpoint, "
            "config.json + rank{N}.safetensors, or a Hugging Face one, config.json + "
            "model*.safetensors)",
            directory,
        )
    cfg = read_config(cfg_path)
    if "architecture" in cfg and any(directory.glob("rank*.safetensors")):
        return "trtllm"
    if "architectures" in cfg and any(directory.glob("model*.safetensors")):
        return "hf"
    raise BadExport(
        "unknown export format: config.json names neither a TensorRT-LLM architecture with "
        "rank{N}.safetensors files nor Hugging Face architectures with model*.safetensors files",
        cfg_path,
    )


def open_export(directory: Path, *, finished: bool = True) -> Side:
    """The export at `directory` as a verification side. With `finished` (the default) it must
    be a committed export: `manifest.json` is written last, so without it the export is
    unfinished (a job still running, or one that failed) and is refused."""
    directory = Path(directory)
    fmt = export_format(directory)
    if finished and not (directory / MANIFEST).is_file():
        raise BadExport(
            "unfinished export: no manifest.json (Porter writes it last, once every file is "
            "in place); wait for the job to finish, or verify a finished export",
            directory,
        )
    cfg = read_config(directory / "config.json")
    return TrtllmSide(directory, cfg) if fmt == "trtllm" else HfSide(directory, cfg)
