"""Which neurons of a layer go on the GPU: the k most active, ties broken by lower index first.

The result equals a stable descending sort's first k indices (`np.argsort(-a, kind="stable")[:k]`)
returned in ascending order, computed in O(n_ff) with a partition. Without ties the set is the
same as PowerInfer's `torch.topk`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Ascending int32 indices of the k largest entries of 1-D `values` (lower index wins ties)."""
    n = values.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} is outside [0, {n}]")
    if k == 0:
        return np.zeros(0, dtype=np.int32)
    if k == n:
        return np.arange(n, dtype=np.int32)
    kth = np.partition(values, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(values > kth)
    tied = np.flatnonzero(values == kth)[: k - above.size]
    return np.sort(np.concatenate([above, tied])).astype(np.int32)


def select(values: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Per-layer `top_k(values[l], counts[l])`; `values` is [L, n_ff]."""
    if len(counts) != values.shape[0]:
        raise ValueError(f"{len(counts)} counts for {values.shape[0]} layers")
    return [top_k(values[layer], int(k)) for layer, k in enumerate(counts)]
