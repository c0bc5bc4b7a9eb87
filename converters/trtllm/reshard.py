"""Re-shard rules (spec §2) as pure functions from a global lazy tensor to one target rank's slice."""

from __future__ import annotations

import numpy as np

from converters.errors import IncompatibleParallelism
from converters.model import ModelConfig
from converters.tensors import FileRange, LazyTensor, Zeros, concat


def split(tensor: LazyTensor, dim: int, rank: int, parts: int) -> LazyTensor:
    """Rank `rank`'s equal share of `tensor` along `dim`."""
    size = tensor.shape[dim]
    if size % parts:
        raise IncompatibleParallelism(
            f"dimension {dim} of size {size} does not split into {parts} equal parts"
        )
    share = size // parts
    return tensor.narrow(dim, rank * share, share)


def padded_rows(rows: int, parts: int) -> int:
    """`rows` rounded up to a multiple of `parts` (vocab padding)."""
    return -(-rows // parts) * parts


def pad_rows(tensor: LazyTensor, rows: int) -> LazyTensor:
    """`tensor` with zero rows appended up to `rows` rows."""
    extra = rows - tensor.shape[0]
    if extra <= 0:
        return tensor
    return concat([tensor, Zeros((extra, *tensor.shape[1:]), tensor.dtype)], 0)


def split_padded_rows(tensor: LazyTensor, rank: int, parts: int) -> LazyTensor:
    """Zero-pad rows to a multiple of `parts`, then take rank `rank`'s share (vocab-parallel)."""
    return split(pad_rows(tensor, padded_rows(tensor.shape[0], parts)), 0, rank, parts)


def gated_halves(fc1: LazyTensor) -> tuple[LazyTensor, LazyTensor]:
    """(first, second) halves of a global gated `linear_fc1`: TRT-LLM's `fc` and `gate`."""
    half = fc1.shape[0] // 2
    return fc1.narrow(0, 0, half), fc1.narrow(0, half, half)


def check_attention_split(cfg: ModelConfig, parts: int) -> None:
    """Raise unless the heads and query groups of `cfg` can be split over `parts` ranks."""
    nh, ng = cfg.num_attention_heads, cfg.num_query_groups
    if nh % parts:
        raise IncompatibleParallelism(
            f"num_attention_heads={nh} is not divisible by the target TP={parts}; choose a TP that divides {nh}"
        )
    if ng >= parts and ng % parts:
        raise IncompatibleParallelism(
            f"num_query_groups={ng} is not divisible by the target TP={parts}; choose a TP that divides {ng}"
        )
    if ng < parts and parts % ng:
        raise IncompatibleParallelism(
            f"target TP={parts} is larger than num_query_groups={ng} but not a multiple of it, "
            "so KV heads cannot be duplicated evenly"
        )


def _gather_rows(tensor: LazyTensor, ranges: list[tuple[int, int]]) -> LazyTensor:
    """Concatenate row ranges [(start, length)], merging ranges that touch."""
    merged: list[list[int]] = []
    for start, length in ranges:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1][1] += length
        else:
            merged.append([start, length])
    return concat([tensor.narrow(0, start, length) for start, length in merged], 0)


def qkv_for_rank(qkv: LazyTensor, cfg: ModelConfig, rank: int, parts: int) -> LazyTensor:
    """Rank `rank`'s `[Q_r; K_r; V_r]` rows from Megatron's per-group `[ng, q + 2, d]` QKV layout.

    Works for the weight (2-D) and the bias (1-D). With fewer KV groups than ranks, each KV head
    is repeated `parts / ng` times and rank r gets KV head ⌊r·ng/parts⌋.
    """
    check_attention_split(cfg, parts)
    nh, ng, d, q = (
        cfg.num_attention_heads,
        cfg.num_query_groups,
        cfg.kv_channels,
        cfg.heads_per_group,
    )
    group_rows = (q + 2) * d
    heads = range(rank * nh // parts, (rank + 1) * nh // parts)
    query = [((h // q) * group_rows + (h % q) * d, d) for h in heads]
    groups = (
        range(rank * ng // parts, (rank + 1) * ng // parts) if ng >= parts else [rank * ng // parts]
    )
    keys = [(g * group_rows + q * d, d) for g in groups]
    values = [(g * group_rows + (q + 1) * d, d) for g in groups]
    return _gather_rows(qkv, query + keys + values)


class _Unsqueeze0(LazyTensor):
    """A view with a leading dimension of size 1 added (one entry of a stacked tensor)."""

    def __init__(self, inner: LazyTensor) -> None:
        self.inner = inner
        self.shape = (1, *inner.shape)
        self.dtype = inner.dtype

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        self._check_narrow(dim, start, length)
        if dim == 0:
            return self if length == 1 else Zeros((0, *self.inner.shape), self.dtype)
        return _Unsqueeze0(self.inner.narrow(dim - 1, start, length))

    def materialize(self) -> np.ndarray:
        return self.inner.materialize()[None]

    def file_ranges(self) -> list[FileRange]:
        return self.inner.file_ranges()

    @property
    def source_nbytes(self) -> int:
        return self.inner.source_nbytes


def stack0(parts: list[LazyTensor]) -> LazyTensor:
    """`np.stack(parts)` lazily: a row-wise join of one-entry views, so the writer reads and
    writes one part (one expert) at a time."""
    return concat([_Unsqueeze0(part) for part in parts], 0)
