"""How many neurons of each layer go on the GPU: the exact solution of PowerInfer's split program.

Each layer's activations are sorted descending and cut into groups of `batch` (B) neurons; a group's
value is the sum of its entries. Choose at most ⌊C/B⌋ groups in all, per layer either none or at
least ⌊T/B⌋, maximising the total value. Values are non-increasing inside a layer, so a layer's
choice is a prefix: g groups = its g·B hottest neurons.

- ⌊T/B⌋ ≤ 1 (no real threshold): the optimum is the ⌊C/B⌋ most valuable groups over all layers,
  found with one stable sort of the L·n_groups group values (ties: lower layer, then lower group).
- ⌊T/B⌋ ≥ 2: dynamic programming over the exact number of groups used, layer by layer, choosing
  0 or k ∈ [⌊T/B⌋, n_groups] groups for each layer (compiled, `dp_kernel.py`).

Zero-value groups: Porter takes the fewest groups among optimal solutions, so a group whose
neurons were never active is left on the CPU even when capacity is spare (as PowerInfer's integer
program does). It is taken only when a layer needs it to reach its ⌊T/B⌋ minimum and that layer's
positive groups make the choice worthwhile. The objective is exactly optimal, so never below
PowerInfer's integer program (which is solved with a time limit).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from converters.choices import POWERINFER_BATCH
from converters.powerinfer.errors import InvalidSplitParameters

DEFAULT_BATCH = POWERINFER_BATCH
_PARALLEL_SORT_SIZE = 1 << 20  # values per sorting thread, at least


@dataclass(frozen=True)
class Split:
    """Per-layer GPU neuron counts (multiples of `batch`) and what they achieve."""

    counts: tuple[int, ...]
    objective: float  # total activation value of the selected neurons
    total_value: float  # total activation value of all neurons (for coverage)
    batch: int
    capacity: int | None  # neurons (None when counts were given)
    threshold: int
    method: str  # "greedy", "dp" or "given"

    @property
    def coverage(self) -> float:
        """Share of the total activation mass that is on the GPU."""
        return self.objective / self.total_value if self.total_value > 0 else 0.0

    @property
    def gpu_neurons(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class Capacity:
    """A GPU neuron capacity and the formula it came from."""

    neurons: int
    formula: str


def capacity_from_vram(
    budget_bytes: int, *, n_embd: int, bytes_per_weight: float, gated: bool
) -> Capacity:
    """Porter's capacity: ⌊budget / ((3 if gated else 2) · n_embd · bytes_per_weight)⌋ neurons.

    One FFN neuron costs one row of the up (and gate) projection and one column of the down
    projection, each n_embd weights.
    """
    if budget_bytes < 0 or n_embd <= 0 or bytes_per_weight <= 0:
        raise InvalidSplitParameters(
            "the VRAM budget must be ≥ 0 and n_embd, bytes per weight > 0 "
            f"(got {budget_bytes}, {n_embd}, {bytes_per_weight})"
        )
    matrices = 3 if gated else 2
    per_neuron = matrices * n_embd * Fraction(bytes_per_weight)
    neurons = int(Fraction(budget_bytes) // per_neuron)
    return Capacity(
        neurons,
        f"porter: floor({budget_bytes} / ({matrices} · n_embd={n_embd} · {bytes_per_weight} B))",
    )


def powerinfer_engine_capacity(
    budget_bytes: int, *, n_ff: int, bytes_per_weight: float, gated: bool
) -> Capacity:
    """PowerInfer's engine formula, for compatibility: ⌊budget / (n_ff · bpw · (4.5|2))⌋ · 4.

    It divides by n_ff where the per-neuron cost involves n_embd; use `capacity_from_vram` unless
    the aim is to reproduce what PowerInfer's engine would generate.
    """
    if budget_bytes < 0 or n_ff <= 0 or bytes_per_weight <= 0:
        raise InvalidSplitParameters(
            "the VRAM budget must be ≥ 0 and n_ff, bytes per weight > 0 "
            f"(got {budget_bytes}, {n_ff}, {bytes_per_weight})"
        )
    factor = Fraction(9, 2) if gated else Fraction(2)
    neurons = int(Fraction(budget_bytes) // (n_ff * Fraction(bytes_per_weight) * factor)) * 4
    return Capacity(
        neurons,
        f"powerinfer-engine: floor({budget_bytes} / (n_ff={n_ff} · {bytes_per_weight} B · "
        f"{'4.5' if gated else '2'})) · 4",
    )


def group_values(values: np.ndarray, batch: int = DEFAULT_BATCH) -> np.ndarray:
    """[L, n_ff] activations → [L, n_ff/B] float64 group sums of the descending-sorted
    activations (sorted in their own dtype: float32 statistics sort twice as fast)."""
    n_layers, n_ff = values.shape
    if batch <= 0:
        raise InvalidSplitParameters(f"batch must be > 0, got {batch}")
    if n_ff % batch:
        raise InvalidSplitParameters(
            f"n_ff = {n_ff} is not a multiple of batch = {batch}: pass a batch that divides n_ff "
            f"(the largest power of two that does is {n_ff & -n_ff}; PowerInfer's GPU kernels "
            "want multiples of 256), or give the per-layer counts explicitly"
        )

    def sums(rows: np.ndarray) -> np.ndarray:
        ascending = np.sort(rows, axis=1).reshape(rows.shape[0], n_ff // batch, batch)
        return ascending.sum(axis=2, dtype=np.float64)[:, ::-1]

    # numpy sorts without the GIL: large inputs are split by layers over the usable cores, the
    # calling thread taking the first share (a pool that did all the work, fresh per call, was
    # no faster than one thread here once torch was imported).
    threads = min(len(os.sched_getaffinity(0)), n_layers, values.size // _PARALLEL_SORT_SIZE)
    if threads <= 1:
        return np.ascontiguousarray(sums(values))
    first, *rest = np.array_split(values, threads)
    with ThreadPoolExecutor(threads - 1) as pool:
        others = [pool.submit(sums, part) for part in rest]
        return np.concatenate([sums(first), *(future.result() for future in others)])


def _greedy(groups: np.ndarray, budget: int) -> np.ndarray:
    flat = groups.ravel()
    order = np.argsort(-flat, kind="stable")[:budget]
    order = order[flat[order] > 0]  # fewest groups: never spend capacity on zero-value groups
    return np.bincount(order // groups.shape[1], minlength=groups.shape[0])


def solve(
    values: np.ndarray,
    capacity: int,
    *,
    batch: int = DEFAULT_BATCH,
    threshold: int = 0,
    groups: np.ndarray | None = None,
) -> Split:
    """Optimal per-layer GPU neuron counts for `capacity` neurons in all (see module docstring).

    `values` is [L, n_ff]; `groups` may pass precomputed `group_values(values, batch)` so several
    budgets share one sort.
    """
    if groups is None:
        groups = group_values(values, batch)
    return solve_groups(groups, capacity, batch=batch, threshold=threshold)


def solve_groups(
    groups: np.ndarray, capacity: int, *, batch: int = DEFAULT_BATCH, threshold: int = 0
) -> Split:
    """`solve` from the group values alone ([L, n_ff/B], from `group_values`), e.g. when each
    layer's groups were computed by a different worker."""
    if capacity < batch:
        raise InvalidSplitParameters(
            f"capacity = {capacity} neurons is less than one batch of {batch}: nothing fits on "
            "the GPU; raise the capacity (or VRAM budget) or lower the batch"
        )
    if threshold < 0:
        raise InvalidSplitParameters(f"threshold must be ≥ 0, got {threshold}")
    n_layers, n_groups = groups.shape
    budget = min(capacity // batch, n_layers * n_groups)
    min_groups = threshold // batch
    if min_groups <= 1:
        method, chosen = "greedy", _greedy(groups, budget)
    else:
        from converters.powerinfer.dp_kernel import thresholded_counts  # numba: only for dp

        method, chosen = "dp", thresholded_counts(groups, budget, min_groups)
    objective = float(sum(groups[i, : chosen[i]].sum() for i in range(n_layers)))
    return Split(
        counts=tuple(int(g) * batch for g in chosen),
        objective=objective,
        total_value=float(groups.sum()),
        batch=batch,
        capacity=capacity,
        threshold=threshold,
        method=method,
    )


def check_counts(counts: Sequence[int], *, n_layers: int, n_ff: int, batch: int) -> tuple[int, ...]:
    """Validate explicit per-layer counts: L entries, each a multiple of batch in [0, n_ff]."""
    if len(counts) != n_layers:
        raise InvalidSplitParameters(
            f"got {len(counts)} counts for a model with {n_layers} layers; give one per layer"
        )
    for layer, count in enumerate(counts):
        if int(count) != count or count < 0 or count > n_ff or count % batch:
            raise InvalidSplitParameters(
                f"count {count} for layer {layer} must be a multiple of {batch} between 0 and "
                f"n_ff = {n_ff}"
            )
    return tuple(int(c) for c in counts)


def given_split(values: np.ndarray, counts: Sequence[int], *, batch: int = DEFAULT_BATCH) -> Split:
    """A `Split` for explicit counts (the solver is skipped), with its objective and coverage."""
    n_layers, n_ff = values.shape
    checked = check_counts(counts, n_layers=n_layers, n_ff=n_ff, batch=batch)
    ordered = np.sort(values, axis=1)[:, ::-1]
    objective = sum(float(ordered[i, :c].sum(dtype=np.float64)) for i, c in enumerate(checked))
    total = float(values.sum(dtype=np.float64))
    return Split(checked, objective, total, batch, None, 0, "given")


def given_split_groups(groups: np.ndarray, counts: Sequence[int], *, batch: int) -> Split:
    """`given_split` from the group values alone ([L, n_ff/B]); counts are multiples of batch."""
    n_layers, n_groups = groups.shape
    checked = check_counts(counts, n_layers=n_layers, n_ff=n_groups * batch, batch=batch)
    objective = float(sum(groups[i, : c // batch].sum() for i, c in enumerate(checked)))
    return Split(checked, objective, float(groups.sum()), batch, None, 0, "given")
