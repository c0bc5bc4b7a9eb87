"""Convert one TensorRT-LLM rank: plan its tensors, read each slice, cast, stream to safetensors.

Every converted floating-point tensor is checked for NaN and infinite values (a sum, which is
finite exactly when no term is NaN or infinite unless it overflows; only then a count in blocks). `Target.nonfinite` says what to do: "warn" lists
them in `RankResult.nonfinite` (and logs a warning), "error" fails the rank naming the tensor and
the source files it was read from.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from converters.errors import NonFiniteWeights
from converters.megatron.layout import SourceCheckpoint
from converters.model import DTYPES
from converters.tensors import Concat, LazyTensor
from converters.trtllm.plan import OutputTensor, Target, rank_tensors
from converters.trtllm.writer import SafetensorsWriter, TensorSpec, WrittenFile

# Called after each tensor with (bytes written so far, bytes of the whole rank file's tensors).
Progress = Callable[[int, int], None]

log = logging.getLogger(__name__)
_SCAN_ELEMENTS = 2**22  # elements checked at once (a bool temporary of 4 MiB)


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


def write_converted(
    writer: SafetensorsWriter,
    source: SourceCheckpoint,
    policy: str,
    tensor: OutputTensor,
    dtype: torch.dtype,
) -> dict | None:
    """Read `tensor`, cast it to `dtype` (adding 1 to zero-centred norm weights), append it to
    `writer` piece by piece, and check it for NaN and infinite values once written (summing
    first, while the bytes were still being paged in from the source, made conversions up to
    twice as slow). Returns None, or by `policy` ("warn" | "error", see `Target.nonfinite`) a
    {"tensor", "count", "files"} record (logged as a warning) or `NonFiniteWeights`."""
    count = 0

    def converted() -> Iterator[torch.Tensor]:
        nonlocal count
        for piece in _pieces(tensor):
            data = piece.materialize()
            data = (data.float() + 1.0).to(dtype) if tensor.add_one else data.to(dtype)
            yield data
            count += count_nonfinite(data)
            del data

    writer.write_rows(tensor.name, converted())
    if not count:
        return None
    files = source_files(source, tensor)
    numel = math.prod(tensor.source.shape)
    what = (
        f"{tensor.name} has {count} NaN or infinite value(s) of {numel} "
        f"(as {str(dtype).removeprefix('torch.')}), read from {', '.join(files)}"
    )
    if policy == "error":
        raise NonFiniteWeights(f"{what}; refused (nonfinite=error)", files[0])
    log.warning("%s", what)
    return {"tensor": tensor.name, "count": count, "files": files}


def count_nonfinite(tensor: torch.Tensor) -> int:
    """NaN and ±inf values in `tensor` (0 for integer tensors).

    A sum is NaN or infinite whenever any term is, and costs no temporary: only a tensor whose
    sum is not finite (or overflows) is counted exactly, in bounded blocks."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    if bool(torch.isfinite(tensor.sum())):
        return 0
    if tensor.dim() == 0:
        return 1
    row = max(1, tensor[0].numel())
    bad = 0
    for block in tensor.split(max(1, _SCAN_ELEMENTS // row), dim=0):
        finite = torch.isfinite(block)
        bad += int(finite.numel() - finite.sum())
    return bad


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
    dtype: torch.dtype,
    policy: str,
    path: Path,
    progress: Progress | None = None,
) -> tuple[WrittenFile, int, list[dict]]:
    """Stream `tensors` (cast to `dtype`) into the safetensors file `path`, one at a time, with
    the NaN/Inf `policy` (a refused tensor fails the step, whose file is then discarded).
    Returns the written file, the source bytes read and the NaN/Inf records."""
    specs = [TensorSpec(t.name, t.source.shape, dtype) for t in tensors]
    total = sum(s.nbytes for s in specs)
    done = read = 0
    nonfinite = []
    with SafetensorsWriter(Path(path), specs, metadata={"format": "pt"}) as writer:
        for tensor, spec in zip(tensors, specs, strict=True):
            if found := write_converted(writer, source, policy, tensor, dtype):
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
