"""The split solver against an independent exact oracle (scipy's MILP), counts, capacity, top-k."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp

from converters.powerinfer.errors import InvalidSplitParameters
from converters.powerinfer.select import top_k
from converters.powerinfer.solver import (
    capacity_from_vram,
    given_split,
    group_values,
    powerinfer_engine_capacity,
    solve,
    solve_groups,
)


def milp_objective(groups: np.ndarray, budget: int, min_groups: int) -> float:
    """PowerInfer's 0/1 program: x[l,j] group taken, y[l] layer used; Σx ≤ budget,
    x[l,j] ≤ y[l], Σ_j x[l,j] ≥ min_groups · y[l]; maximise Σ v·x."""
    n_layers, n_groups = groups.shape
    nx = n_layers * n_groups
    c = np.concatenate([-groups.ravel(), np.zeros(n_layers)])
    rows, lo, hi = [np.concatenate([np.ones(nx), np.zeros(n_layers)])], [-np.inf], [budget]
    for layer in range(n_layers):
        for j in range(n_groups):
            row = np.zeros(nx + n_layers)
            row[layer * n_groups + j], row[nx + layer] = 1, -1
            rows.append(row), lo.append(-np.inf), hi.append(0)
        row = np.zeros(nx + n_layers)
        row[layer * n_groups : (layer + 1) * n_groups] = 1
        row[nx + layer] = -min_groups
        rows.append(row), lo.append(0), hi.append(np.inf)
    res = milp(
        c,
        constraints=LinearConstraint(np.array(rows), lo, hi),
        integrality=np.ones(nx + n_layers),
        bounds=Bounds(0, 1),
    )
    assert res.success
    return -res.fun


def random_values(rng: np.random.Generator, n_layers: int, n_ff: int) -> np.ndarray:
    values = rng.gamma(0.4, size=(n_layers, n_ff)) * (rng.random((n_layers, 1)) * 3)
    values[rng.random(values.shape) < 0.3] = 0.0  # plenty of zeros (zero-value groups)
    if rng.random() < 0.5:
        values = np.round(values * 2)  # integer counts with ties
    return values


@pytest.mark.parametrize("seed", range(40))
def test_solver_matches_milp(seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = int(rng.choice([1, 2, 4]))
    n_layers, n_groups = int(rng.integers(1, 6)), int(rng.integers(1, 7))
    values = random_values(rng, n_layers, n_groups * batch)
    groups = group_values(values, batch)
    capacity = int(rng.integers(batch, n_layers * n_groups * batch + 2 * batch))
    for threshold in (0, batch, 2 * batch, int(rng.integers(0, n_groups + 2)) * batch):
        split = solve(values, capacity, batch=batch, threshold=threshold)
        budget = capacity // batch
        oracle = milp_objective(groups, budget, threshold // batch)
        assert split.objective >= oracle - 1e-9
        # feasibility of Porter's answer and its objective
        chosen = [c // batch for c in split.counts]
        assert all(c % batch == 0 for c in split.counts)
        assert sum(chosen) <= budget
        assert all(g == 0 or g >= threshold // batch for g in chosen)
        assert split.objective == pytest.approx(
            sum(groups[i, :g].sum() for i, g in enumerate(chosen))
        )
        if threshold < 2 * batch:  # no real threshold: the best ⌊C/B⌋ groups overall
            best = np.sort(groups.ravel())[::-1][:budget].sum()
            assert split.objective == pytest.approx(best) and split.method == "greedy"
        # fewest groups: never a trailing zero-value group beyond the layer minimum
        for i, g in enumerate(chosen):
            if g > max(threshold // batch, 1):
                assert groups[i, g - 1] > 0


def brute_force_counts(groups: np.ndarray, budget: int, min_groups: int) -> np.ndarray:
    """The same dynamic programme cell by cell (all B·n cells, no divide and conquer): per layer
    k = 0 or k ∈ [min_groups, n]; ties to the smaller k, then to the fewest groups in all."""
    n_layers, n_groups = groups.shape
    prefix = np.concatenate([np.zeros((n_layers, 1)), np.cumsum(groups, axis=1)], axis=1)
    best = [0.0] + [-np.inf] * budget
    choice = []
    for layer in range(n_layers):
        new, pick = list(best), [0] * (budget + 1)
        for b in range(budget + 1):
            for k in range(min_groups, min(n_groups, b) + 1):
                if best[b - k] + prefix[layer, k] > new[b]:
                    new[b], pick[b] = best[b - k] + prefix[layer, k], k
        best = new
        choice.append(pick)
    used = int(np.argmax(best))
    counts = np.zeros(n_layers, dtype=np.int64)
    for layer in range(n_layers - 1, -1, -1):
        counts[layer] = choice[layer][used]
        used -= counts[layer]
    return counts


@pytest.mark.parametrize("seed", range(300))
def test_dp_equals_the_cell_by_cell_programme_on_integer_counts(seed: int) -> None:
    """Integer counts (exact arithmetic, many ties): the same counts, tie for tie. The last
    seeds are larger (deeper divide and conquer, budgets in the hundreds)."""
    rng = np.random.default_rng(seed)
    large = seed >= 295
    n_layers = int(rng.integers(10, 25) if large else rng.integers(1, 9))
    n_groups = int(rng.integers(20, 40) if large else rng.integers(2, 12))
    top = 1000 if large else 4
    groups = -np.sort(-rng.integers(0, top, (n_layers, n_groups)).astype(float), axis=1)
    groups[rng.random(n_layers) < 0.2] = 0.0  # idle layers
    budget = int(rng.integers(2, n_layers * n_groups + 1))
    min_groups = int(rng.integers(2, n_groups + 2))
    split = solve_groups(groups, budget, batch=1, threshold=min_groups)
    assert split.method == "dp"
    assert split.counts == tuple(brute_force_counts(groups, budget, min_groups))


def test_dp_refuses_unsorted_groups() -> None:
    with pytest.raises(ValueError, match="non-increasing"):
        solve_groups(np.array([[1.0, 2.0, 0.0]]), 3, batch=1, threshold=2)


def test_zero_value_groups_left_off_unless_threshold_needs_them() -> None:
    values = np.array([[5.0, 0, 0, 0], [1.0, 1.0, 0, 0]])
    assert solve(values, 8, batch=1).counts == (1, 2)  # capacity spare, zeros not taken
    # threshold 3: layer 0 must take 3 groups (two zero) to count; value 5 > 2
    split = solve(values, 4, batch=1, threshold=3)
    assert split.counts == (3, 0) and split.objective == 5.0 and split.method == "dp"


def test_70b_shape() -> None:
    """Speed is measured in bench/run_powerinfer_index.py; here the full-size answers."""
    rng = np.random.default_rng(0)
    values = rng.gamma(0.3, size=(80, 28672)).astype(np.float32)
    groups = group_values(values)
    assert groups.dtype == np.float64 and groups.shape == (80, 112)
    assert np.array_equal(groups, -np.sort(-groups, axis=1))  # hottest group first
    exact = np.sort(values.astype(np.float64), axis=1)[:, ::-1].reshape(80, 112, 256).sum(axis=2)
    np.testing.assert_allclose(groups, exact, rtol=1e-12)
    split = solve(values, 80 * 28672 // 3, groups=groups)
    assert sum(split.counts) == 80 * 28672 // 3 // 256 * 256
    split = solve(values, 80 * 28672, groups=groups, threshold=4096)  # DP, budget 8960 groups
    assert split.counts == (28672,) * 80 and split.method == "dp"
    thresholded = solve(values, 80 * 28672 // 3, groups=groups, threshold=4096)
    assert all(c == 0 or c >= 4096 for c in thresholded.counts)
    assert thresholded.objective <= solve(values, 80 * 28672 // 3, groups=groups).objective


def test_parameter_errors() -> None:
    values = np.ones((2, 512))
    with pytest.raises(InvalidSplitParameters, match="less than one batch"):
        solve(values, 255)
    with pytest.raises(
        InvalidSplitParameters, match=r"not a multiple of batch = 256.*divides n_ff"
    ):
        solve(np.ones((2, 320)), 1024)
    with pytest.raises(InvalidSplitParameters, match="got 3 counts for a model with 2 layers"):
        given_split(values, [256, 0, 0])
    with pytest.raises(InvalidSplitParameters, match="multiple of 256"):
        given_split(values, [256, 100])
    with pytest.raises(InvalidSplitParameters, match="n_ff = 512"):
        given_split(values, [768, 0])
    split = given_split(np.arange(1024.0).reshape(2, 512), [256, 0])
    assert split.objective == sum(range(256, 512)) and split.method == "given"


def test_capacity_formulas() -> None:
    cap = capacity_from_vram(3 * 8192 * 2 * 1000 + 5, n_embd=8192, bytes_per_weight=2, gated=True)
    assert cap.neurons == 1000 and cap.formula.startswith("porter")
    assert (
        capacity_from_vram(2 * 4096 * 1000, n_embd=4096, bytes_per_weight=1, gated=False).neurons
        == 1000
    )
    assert capacity_from_vram(
        2**30, n_embd=4096, bytes_per_weight=0.5625, gated=True
    ).neurons == int(2**30 // (3 * 4096 * 0.5625))
    engine = powerinfer_engine_capacity(10**10, n_ff=28672, bytes_per_weight=2, gated=True)
    assert engine.neurons == int(10**10 // (28672 * 2 * 4.5)) * 4
    assert engine.formula.startswith("powerinfer-engine")
    assert powerinfer_engine_capacity(
        10**9, n_ff=11008, bytes_per_weight=2, gated=False
    ).neurons == (10**9 // (11008 * 2 * 2) * 4)


@pytest.mark.parametrize("seed", range(20))
def test_top_k_lower_index_wins_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 4, size=64).astype(np.float64)
    for k in (0, 1, 7, 32, 63, 64):
        expected = np.sort(np.argsort(-values, kind="stable")[:k])
        got = top_k(values, k)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected)
    assert list(top_k(np.array([1.0, 2, 2, 2, 0]), 2)) == [1, 2]
