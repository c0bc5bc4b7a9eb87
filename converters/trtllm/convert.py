"""Convert one TensorRT-LLM rank: plan its tensors, read each slice, cast, stream to safetensors.

Every converted floating-point tensor is checked for NaN and infinite values by the writer, from
the exponent bits of the chunks it has just written (`dtypes.nonfinite_in`). `Target.nonfinite`
says what to do: "warn" lists them in `RankResult.nonfinite` (and logs a warning), "error" fails
the rank naming the tensor and the source files it was read from.

Bytes that need no conversion are written straight from the memory-mapped source; a cast (or a
copy of a strided slice) is made in blocks of rows of at most `CONVERT_BYTES`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters.dtypes import DType, cast
from converters.errors import NonFiniteWeights
from converters.megatron.layout import SourceCheckpoint
from converters.model import DTYPES
from converters.tensors import Concat, LazyTensor
from converters.trtllm.plan import OutputTensor, Target, rank_tensors
from converters.trtllm.writer import SafetensorsWriter, TensorSpec, WrittenFile

# Called after each tensor with (bytes written so far, bytes of the whole rank file's tensors).
Progress = Callable[[int, int], None]

log = logging.getLogger(__name__)
CONVERT_BYTES = 16 << 20  # at most this much of a tensor is cast or copied at once


@dataclass(frozen=True)
class RankResult:
    rank: int
    file: str
    bytes_written: int
    bytes_read: int
    sha256: str
    seconds: float
    # Tensors with NaN or infinite values: {"tensor", "count", "files"} each (see Target.nonfinite).
    nonfinite: list[dict] = field(default_factory=list)


def _pieces(tensor: OutputTensor) -> list[LazyTensor]:
    """What to read and write one after another: the parts of a row-wise join of TP shards (a
    merged vocab embedding), so that the joined copy is never held; else the tensor itself."""
    source = tensor.source
    if isinstance(source, Concat) and source.dim == 0:
        return list(source.parts)
    return [source]


def _blocks(data: np.ndarray, src: DType, dtype: DType, add_one: bool) -> Iterator[np.ndarray]:
    """`data` (an array of `src`) cast to `dtype` (plus 1 for zero-centred norm weights):
    `data` itself when it is already contiguous `dtype` (written from where it lies), else
    blocks of rows of at most CONVERT_BYTES each, so a cast or a strided copy never holds the
    whole tensor twice."""
    if not add_one and src == dtype and data.flags.c_contiguous:
        yield data
        return
    if data.ndim == 0:
        yield cast(data, src, dtype, add_one)
        return
    row_bytes = max(1, math.prod(data.shape[1:]) * max(dtype.itemsize, src.itemsize))
    rows = max(1, CONVERT_BYTES // row_bytes)
    for start in range(0, data.shape[0], rows):
        yield cast(data[start : start + rows], src, dtype, add_one)


def write_converted(
    writer: SafetensorsWriter,
    source: SourceCheckpoint,
    policy: str,
    tensor: OutputTensor,
    dtype: DType,
) -> dict | None:
    """Read `tensor`, cast it to `dtype` (adding 1 to zero-centred norm weights), append it to
    `writer` piece by piece, and count its NaN and infinite values as they are written. Returns
    None, or by `policy` ("warn" | "error", see `Target.nonfinite`) a {"tensor", "count",
    "files"} record (logged as a warning) or `NonFiniteWeights` (once the tensor is written)."""

    def converted() -> Iterator[np.ndarray]:
        for piece in _pieces(tensor):
            yield from _blocks(piece.materialize(), piece.dtype, dtype, tensor.add_one)

    count = writer.write_rows(tensor.name, converted(), check_nonfinite=True)
    if not count:
        return None
    files = source_files(source, tensor)
    numel = math.prod(tensor.source.shape)
    what = (
        f"{tensor.name} has {count} NaN or infinite value(s) of {numel} "
        f"(as {dtype}), read from {', '.join(files)}"
    )
    if policy == "error":
        raise NonFiniteWeights(f"{what}; refused (nonfinite=error)", files[0])
    log.warning("%s", what)
    return {"tensor": tensor.name, "count": count, "files": files}


def source_files(source: SourceCheckpoint, tensor: OutputTensor) -> list[str]:
    """The source files a planned tensor is read from, as the source names them (s3:// URIs for
    a mirrored source); the checkpoint itself when the reader cannot tell."""
    root = getattr(source, "uri", None) or str(source.path)
    try:
        paths = sorted({str(path) for path, _, _ in tensor.source.file_ranges()})
    except NotImplementedError:
        return [root]
    names = []
    for path in paths:
        try:
            names.append(f"{root}/{Path(path).relative_to(source.path).as_posix()}")
        except ValueError:
            names.append(path)
    return names or [root]


def write_file(
    source: SourceCheckpoint,
    tensors: list[OutputTensor],
    dtype: DType,
    policy: str,
    path: Path,
    progress: Progress | None = None,
) -> tuple[WrittenFile, int, list[dict]]:
    """Stream `tensors` (cast to `dtype`) into the safetensors file `path`, one at a time, with
    the NaN/Inf `policy` (a refused tensor fails the step, whose file is then discarded).
    Returns the written file, the source bytes read and the NaN/Inf records."""
    specs = [TensorSpec(t.name, t.source.shape, t.output_dtype(dtype)) for t in tensors]
    total = sum(s.nbytes for s in specs)
    done = read = 0
    nonfinite = []
    with SafetensorsWriter(Path(path), specs, metadata={"format": "pt"}) as writer:
        for tensor, spec in zip(tensors, specs, strict=True):
            if found := write_converted(writer, source, policy, tensor, spec.dtype):
                nonfinite.append(found)
            read += tensor.source.source_nbytes
            done += spec.nbytes
            if progress:
                progress(done, total)
        written = writer.close()
    return written, read, nonfinite


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
    written, read, nonfinite = write_file(source, tensors, dtype, target.nonfinite, path, progress)
    return RankResult(
        rank=rank,
        file=path.name,
        bytes_written=written.bytes,
        bytes_read=read,
        sha256=written.sha256,
        seconds=time.perf_counter() - started,
        nonfinite=nonfinite,
    )
