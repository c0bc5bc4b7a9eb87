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

_STACK = 128  # divide-and-conquer depth is ⌈log2(budget + 1)⌉ + 1: far below this


@njit(cache=True, nogil=True)
def _layer(best, reach, p, m, n, budget, new, pick):  # pragma: no cover - compiled
    top = min(budget, reach + n)
    for b in range(budget + 1):
        new[b] = best[b]  # k = 0
        pick[b] = 0
    if m > top:
        return
    # Rows b ∈ [lo, hi] whose maximising j lies in [jlo, jhi]; row b may use j ∈ [b − n, b − m].
    stack = np.empty((_STACK, 4), dtype=np.int64)
    stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = m, top, 0, reach
    size = 1
    while size > 0:
        size -= 1
        lo, hi, jlo, jhi = stack[size, 0], stack[size, 1], stack[size, 2], stack[size, 3]
        if lo > hi:
            continue
        mid = (lo + hi) // 2
        arg = -1
        val = -np.inf
        for j in range(max(jlo, mid - n), min(jhi, mid - m) + 1):
            v = best[j] + p[mid - j]
            if v >= val and v > -np.inf:  # ≥: the largest j, i.e. the smallest k, wins ties
                val = v
                arg = j
        if arg >= 0:
            if val > new[mid]:  # strict: k = 0 wins ties
                new[mid] = val
                pick[mid] = mid - arg
            left_hi, right_lo = arg, arg
        else:  # no reachable j: this row says nothing about its neighbours
            left_hi, right_lo = jhi, jlo
        stack[size, 0], stack[size, 1], stack[size, 2], stack[size, 3] = lo, mid - 1, jlo, left_hi
        stack[size + 1, 0], stack[size + 1, 1] = mid + 1, hi
        stack[size + 1, 2], stack[size + 1, 3] = right_lo, jhi
        size += 2


@njit(cache=True, nogil=True)
def _counts(prefix, budget, min_groups):  # pragma: no cover - compiled
    n_layers = prefix.shape[0]
    n = min(prefix.shape[1] - 1, budget)
    best = np.full(budget + 1, -np.inf)
    best[0] = 0.0
    new = np.empty(budget + 1)
    choice = np.zeros((n_layers, budget + 1), dtype=np.int32)
    reach = 0  # highest b with a finite best[b]
    for layer in range(n_layers):
        _layer(best, reach, prefix[layer], min_groups, n, budget, new, choice[layer])
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
    n_layers, n_groups = groups.shape
    prefix = np.zeros((n_layers, n_groups + 1))
    np.cumsum(groups, axis=1, out=prefix[:, 1:])
    return _counts(prefix, int(budget), int(min_groups))
