"""Write one shard file of a Hugging Face checkpoint: read each planned tensor, cast, stream it.

One tensor (its source slice and converted copy) is held at a time. Every tensor gets the NaN /
infinite check of the TensorRT-LLM converter (`HfTarget.nonfinite`: "warn" lists, "error" fails).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from converters.errors import ConversionError
from converters.hf.plan import HfTarget, shard_file_name, shard_tensors
from converters.megatron.layout import SourceCheckpoint
from converters.model import DTYPES
from converters.trtllm.convert import Progress, write_file


@dataclass(frozen=True)
class ShardResult:
    index: int
    file: str
    bytes_written: int  # the whole file, header included
    bytes_read: int
    sha256: str
    seconds: float
    tensors: dict[str, int]  # name → tensor bytes, in file order (what the index records)
    # Tensors with NaN or infinite values: {"tensor", "count", "files"} each.
    nonfinite: list[dict] = field(default_factory=list)


def convert_shard(
    source: SourceCheckpoint,
    target: HfTarget,
    index: int,
    path: Path,
    progress: Progress | None = None,
) -> ShardResult:
    """Write shard `index` of `target` to `path` (any name; the result names the planned file)."""
    started = time.perf_counter()
    groups = shard_tensors(source, target)
    if not 0 <= index < len(groups):
        raise ConversionError(f"shard {index} is outside 0..{len(groups) - 1}")
    tensors = groups[index]
    dtype = DTYPES[target.output_dtype(source.config)]
    written, read, nonfinite = write_file(source, tensors, dtype, target.nonfinite, path, progress)
    return ShardResult(
        index=index,
        file=shard_file_name(index, len(groups)),
        bytes_written=written.bytes,
        bytes_read=read,
        sha256=written.sha256,
        seconds=time.perf_counter() - started,
        tensors={t.name: math.prod(t.source.shape) * dtype.itemsize for t in tensors},
        nonfinite=nonfinite,
    )
