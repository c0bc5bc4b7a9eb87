"""The dynamic programme of the thresholded split, compiled with numba.

Layer by layer, `best[b]` is the largest value reachable with exactly b groups. A layer takes 0
groups or k ∈ [m, n] (m = ⌊T/B⌋, n groups per layer), worth its prefix sum p[k]:

    new[b] = max(best[b], max_{m ≤ k ≤ n} best[b − k] + p[k])

Within a layer group values are non-increasing, so p is concave and the matrix
A[b][j] = best[j] + p[b − j] is Monge (unreachable j and k outside [m, n] are −∞, which keeps the
property). Hence the largest maximising j (the smallest k: fewest groups on ties) is
non-decreasing in b, and divide and conquer over b finds every row's maximum scanning O(B log B)
cells instead of B·n. With exact arithmetic (integer counts) the result is identical to the
brute-force programme, ties included; with non-integer values rounding can move a near-tie, never
the objective by more than rounding.

Compiled on first use and cached on disk (numba `cache=True`, next to this file or in
NUMBA_CACHE_DIR).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _layer(best, reach, p, m, n, budget, new, pick, low, high):  # pragma: no cover - compiled
    for b in range(budget + 1):
        new[b] = best[b]  # k = 0
        pick[b] = 0
    top = min(budget, reach + n)
    rows = top - m + 1  # row r is b = m + r; it may use j = b − k ∈ [b − n, b − m], j ≤ reach
    if rows <= 0:
        return
    # Divide and conquer, level by level: rows at odd multiples of h (minus one) lie between
    # rows of the previous level, whose maximising j bound theirs. low[r] / high[r]: the bounds
    # row r gives the rows right / left of it (its j; its own bounds if no j reaches it).
    h = 1
    while h * 2 <= rows:
        h *= 2
    while h >= 1:
        for r in range(h - 1, rows, 2 * h):
            b = m + r
            j_low = low[r - h] if r >= h else 0
            j_high = high[r + h] if r + h < rows else reach
            val = -np.inf
            arg = j_low
            for j in range(max(j_low, b - n), min(j_high, b - m) + 1):
                v = best[j] + p[b - j]
                if v >= val:  # ≥: the largest j, i.e. the smallest k, wins ties
                    val = v
                    arg = j
            if val > -np.inf:
                if val > new[b]:  # strict: k = 0 wins ties
                    new[b] = val
                    pick[b] = b - arg
                low[r] = arg
                high[r] = arg
            else:  # no reachable j: this row says nothing about its neighbours
                low[r] = j_low
                high[r] = j_high
        h //= 2


@njit(cache=True, nogil=True)
def _counts(prefix, budget, min_groups):  # pragma: no cover - compiled
    n_layers = prefix.shape[0]
    n = min(prefix.shape[1] - 1, budget)
    best = np.full(budget + 1, -np.inf)
    best[0] = 0.0
    new = np.empty(budget + 1)
    choice = np.zeros((n_layers, budget + 1), dtype=np.int32)
    low = np.empty(budget + 1, dtype=np.int64)
    high = np.empty(budget + 1, dtype=np.int64)
    reach = 0  # highest b with a finite best[b]
    for layer in range(n_layers):
        _layer(best, reach, prefix[layer], min_groups, n, budget, new, choice[layer], low, high)
        best, new = new, best
        reach = min(budget, reach + n)
    used = 0  # the first maximum: the fewest groups among optimal choices
    for b in range(budget + 1):
        if best[b] > best[used]:
            used = b
    counts = np.zeros(n_layers, dtype=np.int64)
    for layer in range(n_layers - 1, -1, -1):
        counts[layer] = choice[layer, used]
        used -= counts[layer]
    return counts


def thresholded_counts(groups: np.ndarray, budget: int, min_groups: int) -> np.ndarray:
    """Groups per layer maximising the total value with ≤ `budget` groups in all and each layer
    at 0 or ≥ `min_groups` (`groups`: [L, n_groups] float64, non-increasing along each row)."""
    if (np.diff(groups, axis=1) > 0).any():  # the divide and conquer relies on it
        raise ValueError("group values must be non-increasing along each layer (group_values)")
    n_layers, n_groups = groups.shape
    prefix = np.zeros((n_layers, n_groups + 1))
    np.cumsum(groups, axis=1, out=prefix[:, 1:])
    return _counts(prefix, int(budget), int(min_groups))
