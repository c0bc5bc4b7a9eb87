"""Convert one TensorRT-LLM rank: plan its tensors, read each slice, cast, stream to safetensors."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from converters.megatron.layout import SourceCheckpoint
from converters.model import DTYPES
from converters.trtllm.plan import OutputTensor, Target, rank_tensors
from converters.trtllm.writer import SafetensorsWriter, TensorSpec

# Called after each tensor with (bytes written so far, bytes of the whole rank file's tensors).
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RankResult:
    rank: int
    file: str
    bytes_written: int
    bytes_read: int
    sha256: str
    seconds: float


def _converted(tensor: OutputTensor, dtype: torch.dtype) -> torch.Tensor:
    data = tensor.source.materialize()
    if tensor.add_one:
        return (data.float() + 1.0).to(dtype)
    return data.to(dtype)


def rank_file_name(rank: int) -> str:
    return f"rank{rank}.safetensors"


def convert_rank(
    source: SourceCheckpoint,
    target: Target,
    rank: int,
    path: Path,
    progress: Progress | None = None,
) -> RankResult:
    """Write rank `rank` of `target` to `path`, holding one source slice and its converted copy at a time."""
    started = time.perf_counter()
    dtype = DTYPES[target.output_dtype(source.config)]
    tensors = rank_tensors(source, target, rank)
    specs = [TensorSpec(t.name, t.source.shape, dtype) for t in tensors]
    total = sum(s.nbytes for s in specs)
    done = read = 0
    with SafetensorsWriter(path, specs, metadata={"format": "pt"}) as writer:
        for tensor, spec in zip(tensors, specs, strict=True):
            writer.write(tensor.name, _converted(tensor, dtype))
            read += tensor.source.source_nbytes
            done += spec.nbytes
            if progress:
                progress(done, total)
        written = writer.close()
    return RankResult(
        rank=rank,
        file=path.name,
        bytes_written=written.bytes,
        bytes_read=read,
        sha256=written.sha256,
        seconds=time.perf_counter() - started,
    )
