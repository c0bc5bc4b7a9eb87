"""Benchmark: PowerInfer GPU-index export on a 70B-shaped input (80 layers × 28672 neurons), against
the 0/1 integer program PowerInfer solves, built with `scipy.optimize.milp` on the same statistics.

One run, in a scratch directory (deleted at the end):
  1. write 80 `activation_{i}.pt` files (float32, 28672 each): per-neuron activation counts out of
     100,000 tokens, lognormal with a per-layer location and spread (a heavy-tailed, power-law-like
     hot set), floored to integers (many ties, some zeros, some saturated neurons); layers 0-2
     dense, the others sparse to different degrees, so that a threshold binds;
  2. Porter, --rounds times (median reported), each phase timed separately in this process:
     load (`load_activations`), solve (`group_values` + `solve`), select (`select`),
     write (`write_gpu_index`, fsynced, atomic), for threshold 0 and 2048;
  3. the integer program (PowerInfer's: x[l,g] group taken, y[l] layer used, Σx ≤ ⌊C/B⌋,
     x[l,g] ≤ y[l], Σ_g x[l,g] ≥ ⌊T/B⌋·y[l], maximise Σ v·x) with sparse constraints, solved by
     scipy's HiGHS (PowerInfer uses GLPK through cvxopt) with a time limit, on the same group
     values; build + solve timed;
  4. compare objectives and times; write the "powerinfer-index" section of docs/PERFORMANCE.md.

Usage: python bench/run_powerinfer_index.py [--scratch DIR] [--rounds N] [--milp-time-limit S]
       [--doc PATH] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from docs_section import replace_section  # noqa: E402

from converters.powerinfer.activations import load_activations  # noqa: E402
from converters.powerinfer.gpuindex import read_gpu_index, write_gpu_index  # noqa: E402
from converters.powerinfer.select import select  # noqa: E402
from converters.powerinfer.solver import capacity_from_vram, group_values, solve  # noqa: E402

N_LAYERS, N_FF, N_EMBD = 80, 28672, 8192
BATCH = 256
TOKENS = 100_000
THRESHOLDS = (0, 2048)
VRAM = 24 << 30  # 24 GiB of FFN weights at fp16 on the GPU
PHASES = ("load", "solve", "select", "write")


def write_activations(directory: Path, seed: int = 0) -> np.ndarray:
    """The synthetic statistics (see module docstring); returns them as float64 [L, n_ff]."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(N_LAYERS):
        mu = -1.5 if layer < 3 else rng.uniform(-7.0, -3.0)
        sigma = rng.uniform(1.0, 2.2)
        p = np.minimum(np.exp(rng.normal(mu, sigma, N_FF)), 1.0)
        counts = np.floor(p * TOKENS).astype(np.float32)
        torch.save(torch.from_numpy(counts), directory / f"activation_{layer}.pt")
        rows.append(counts.astype(np.float64))
    return np.stack(rows)


def porter_once(src: Path, out: Path, capacity: int, threshold: int) -> dict[str, Any]:
    """One export, each phase timed."""
    t = {}
    t0 = time.perf_counter()
    acts = load_activations(src)
    t1 = time.perf_counter()
    groups = group_values(acts.values, BATCH)
    t_group = time.perf_counter()
    split = solve(acts.values, capacity, batch=BATCH, threshold=threshold, groups=groups)
    t2 = time.perf_counter()
    buckets = select(acts.values, split.counts)
    t3 = time.perf_counter()
    write_gpu_index(out, buckets, n_ff=acts.n_ff, vram_capacity=VRAM)
    t4 = time.perf_counter()
    t.update(load=t1 - t0, solve=t2 - t1, select=t3 - t2, write=t4 - t3, total=t4 - t0)
    t.update(group=t_group - t1, split=t2 - t_group)
    return {"times": t, "split": split, "groups": groups}


def milp_program(groups: np.ndarray, budget: int, min_groups: int) -> tuple[Any, ...]:
    """PowerInfer's 0/1 program over variables [x (L·G, row-major), y (L)], sparse constraints."""
    n_layers, n_groups = groups.shape
    nx = n_layers * n_groups
    n = nx + n_layers
    c = np.concatenate([-groups.ravel(), np.zeros(n_layers)])
    xi = np.arange(nx)
    layer_of = xi // n_groups
    # row 0: Σx ≤ budget
    r0, c0, v0 = np.zeros(nx, int), xi, np.ones(nx)
    # rows 1..nx: x[l,g] − y[l] ≤ 0
    r1 = np.concatenate([1 + xi, 1 + xi])
    c1 = np.concatenate([xi, nx + layer_of])
    v1 = np.concatenate([np.ones(nx), -np.ones(nx)])
    # rows nx+1..nx+L: Σ_g x[l,g] − ⌊T/B⌋·y[l] ≥ 0
    r2 = np.concatenate([1 + nx + layer_of, 1 + nx + np.arange(n_layers)])
    c2 = np.concatenate([xi, nx + np.arange(n_layers)])
    v2 = np.concatenate([np.ones(nx), np.full(n_layers, -float(min_groups))])
    a = sp.csr_array(
        (
            np.concatenate([v0, v1, v2]),
            (np.concatenate([r0, r1, r2]), np.concatenate([c0, c1, c2])),
        ),
        shape=(1 + nx + n_layers, n),
    )
    lo = np.concatenate([[-np.inf], np.full(nx, -np.inf), np.zeros(n_layers)])
    hi = np.concatenate([[budget], np.zeros(nx), np.full(n_layers, np.inf)])
    return c, LinearConstraint(a, lo, hi), n


def milp_once(groups: np.ndarray, budget: int, min_groups: int, limit: float) -> dict[str, Any]:
    """Build and solve the program; objective recomputed from the rounded solution."""
    t0 = time.perf_counter()
    c, cons, n = milp_program(groups, budget, min_groups)
    t1 = time.perf_counter()
    res = milp(
        c,
        constraints=cons,
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        options={"time_limit": limit, "mip_rel_gap": 0.0},
    )
    t2 = time.perf_counter()
    out: dict[str, Any] = {"build": t1 - t0, "solve_only": t2 - t1, "total": t2 - t0}
    out.update(status=res.status, message=res.message, fun=None, objective=None, feasible=None)
    if res.x is not None:
        n_layers, n_groups = groups.shape
        x = np.round(res.x[: n_layers * n_groups]).reshape(n_layers, n_groups)
        y = np.round(res.x[n_layers * n_groups :])
        taken = x.sum(axis=1)
        out["fun"] = -float(res.fun)
        out["objective"] = float((x * groups).sum())
        out["feasible"] = bool(
            taken.sum() <= budget and (x <= y[:, None]).all() and (taken >= min_groups * y).all()
        )
    return out


def machine() -> str:
    """One line describing what ran the benchmark."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (
        f"{os.cpu_count()} cores ({cpu}), {ram:.1f} GiB RAM, Linux {platform.release()}; "
        f"Python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__} "
        f"(HiGHS), torch {torch.__version__}"
    )


FIRST_CALL = """
import time
t0 = time.perf_counter()
import numpy as np
from converters.powerinfer.dp_kernel import thresholded_counts
t1 = time.perf_counter()
thresholded_counts(np.ones((2, 4)), 4, 2)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def first_call(cache: Path | None) -> tuple[float, float]:
    """(import s, first call s) of the compiled programme in a fresh interpreter: with `cache`
    an empty numba cache directory (it compiles), else the default cache (it loads)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if cache is not None:
        env["NUMBA_CACHE_DIR"] = str(cache)
    out = subprocess.run(
        [sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, check=True
    )
    imported, called = out.stdout.split()
    return float(imported), float(called)


def run(scratch: Path, rounds: int, limit: float) -> dict[str, Any]:
    """Everything but the report."""
    src = scratch / "activation"
    src.mkdir()
    write_activations(src)
    capacity = capacity_from_vram(VRAM, n_embd=N_EMBD, bytes_per_weight=2, gated=True)
    res: dict[str, Any] = {"capacity": capacity, "porter": {}, "milp": {}}
    res["compile"] = first_call(scratch / "numba-cache")  # compiles into an empty cache
    first_call(None)  # make sure the default cache holds it
    res["cached"] = first_call(None)
    for threshold in THRESHOLDS:
        out = scratch / f"model.T{threshold}.gpuidx"
        runs = [porter_once(src, out, capacity.neurons, threshold) for _ in range(rounds)]
        index = read_gpu_index(out)  # the file reads back and matches the split
        counts = tuple(int(layer.bucket.size) for layer in index.layers)
        assert counts == runs[-1]["split"].counts and index.vram_capacity == VRAM
        keys = (*PHASES, "total", "group", "split")
        times = {k: statistics.median(r["times"][k] for r in runs) for k in keys}
        res["porter"][threshold] = {
            "times": times,
            "all_totals": [r["times"]["total"] for r in runs],
            "split": runs[-1]["split"],
            "bytes": out.stat().st_size,
        }
        groups = runs[-1]["groups"]
        budget, min_groups = capacity.neurons // BATCH, threshold // BATCH
        tries = [milp_once(groups, budget, min_groups, limit)]
        while len(tries) < 3 and tries[0]["total"] < 10:  # median of 3 when it is quick
            tries.append(milp_once(groups, budget, min_groups, limit))
        best = sorted(tries, key=lambda r: r["total"])[len(tries) // 2]
        best["runs"] = [r["total"] for r in tries]
        res["milp"][threshold] = best
    return res


def verdicts(res: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(target, met, numbers) rows."""
    out = []
    for t in THRESHOLDS:
        p, m = res["porter"][t], res["milp"][t]
        total = p["times"]["total"]
        out.append((f"whole export under 1 s (T={t})", total < 1.0, f"{total:.3f} s"))
        speed = m["total"] / p["times"]["solve"]
        out.append(
            (
                f"solver ≥ 100× faster than the integer program (T={t})",
                speed >= 100,
                f"{speed:,.0f}× (Porter group+solve {p['times']['solve'] * 1e3:.1f} ms vs milp "
                f"build+solve {m['total']:.2f} s; milp solve alone {m['solve_only']:.2f} s, "
                f"{m['solve_only'] / p['times']['solve']:,.0f}×)",
            )
        )
        obj = p["split"].objective
        if m["objective"] is None:
            out.append((f"objective ≥ integer program's (T={t})", True, "milp found no solution"))
        else:
            ok = obj >= m["objective"] - 1e-6 * abs(m["objective"]) and m["feasible"]
            out.append(
                (
                    f"objective ≥ integer program's (T={t})",
                    ok,
                    f"Porter {obj:,.0f} vs milp {m['objective']:,.0f} "
                    f"(difference {obj - m['objective']:+,.0f}, milp status {m['status']})",
                )
            )
    return out


def table(res: dict[str, Any]) -> list[str]:
    """The markdown table."""
    lines = [
        "| | load s | solve s | select s | write s | total s | objective |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in THRESHOLDS:
        p = res["porter"][t]["times"]
        obj = res["porter"][t]["split"].objective
        lines.append(
            f"| Porter T={t} | {p['load']:.3f} | {p['solve']:.4f} | {p['select']:.3f} | "
            f"{p['write']:.3f} | {p['total']:.3f} | {obj:,.0f} |"
        )
    for t in THRESHOLDS:
        m = res["milp"][t]
        obj = "—" if m["objective"] is None else f"{m['objective']:,.0f}"
        lines.append(f"| milp T={t} | — | {m['total']:.2f} | — | — | {m['total']:.2f} | {obj} |")
    return lines


def report(res: dict[str, Any], rounds: int, limit: float, command: str) -> str:
    """The powerinfer-index section of docs/PERFORMANCE.md."""
    cap = res["capacity"]
    n = N_LAYERS * N_FF
    lines = [
        "## PowerInfer GPU index, 70B-shaped statistics (80 layers × 28672 neurons)",
        "",
        f"Measured {dt.date.today().isoformat()} by `bench/run_powerinfer_index.py` (Porter: median "
        f"of {rounds} runs per phase; milp: median of 3 runs, or 1 run if one takes over 10 s).",
        "",
        *table(res),
        "",
        "- **Porter** phases, in one Python process (interpreter start-up and imports not "
        "included): **load** `load_activations` (80 `torch.load(weights_only=True)` with an "
        "allow-list, validation, numeric order); **solve** `group_values` (sort + group sums) and "
        "`solve`; **select** per-layer top-k; **write** `write_gpu_index` (GGUF via upstream "
        "`gguf`, `PWRI` magic, fsync, atomic rename). The file is read back once afterwards "
        "(untimed) and its per-layer counts checked against the split.",
        "- **milp**: PowerInfer's 0/1 program on the same group values: variables x[l,g] (group g "
        "of layer l, 80 × 112 = 8960) and y[l] (80); Σx ≤ ⌊C/B⌋, x[l,g] ≤ y[l], "
        "Σ_g x[l,g] ≥ ⌊T/B⌋·y[l] (9041 rows, scipy.sparse); maximise Σ v·x. Solved with "
        "`scipy.optimize.milp`, i.e. **HiGHS, not GLPK** (PowerInfer calls GLPK through cvxopt "
        f"with a 30 s limit); here `time_limit` {limit:g} s and `mip_rel_gap` 0 (GLPK's default "
        "gap is 0: solve to optimality). Its time is matrix build + solve; it starts from "
        "Porter's group values, so sorting is charged to Porter only. Objective recomputed from "
        "the rounded solution.",
        "- Porter's solve column includes the per-layer sort and group sums (`group_values`: "
        + ", ".join(
            f"{res['porter'][t]['times']['group'] * 1e3:.1f} ms (T={t})" for t in THRESHOLDS
        )
        + f"; float32 statistics are sorted as float32, layers split over the "
        f"{len(os.sched_getaffinity(0))} usable cores, and summed in float64; shared by all "
        "budgets of a job); the rest is `solve`: "
        + ", ".join(
            f"{res['porter'][t]['times']['split'] * 1e3:.2f} ms (T={t}, "
            f"{res['porter'][t]['split'].method})"
            for t in THRESHOLDS
        )
        + ". HiGHS, oddly, takes much longer on the T = 0 program (where the LP relaxation is "
        "already integral) than on T > 0.",
        "- The dynamic programme is compiled by numba (`converters/powerinfer/dp_kernel.py`) on "
        "first use and cached on disk; not in the numbers above (the median hides the first run). "
        "In a fresh interpreter: importing it (numba included) took "
        f"{res['cached'][0]:.2f} s and its first call {res['cached'][1]:.3f} s with the cache "
        f"present; with an empty cache the first call compiles: {res['compile'][1]:.2f} s (once "
        "per installation and numba version, or per NUMBA_CACHE_DIR where the package directory "
        "is read-only).",
        f"- Capacity C = {cap.neurons:,} neurons ({cap.neurons / n:.1%} of {n:,}): "
        f"{cap.formula} = 24 GiB of fp16 FFN weights of a Llama-2-70B-shaped model "
        f"(n_embd {N_EMBD}, gated); B = {BATCH}, so ⌊C/B⌋ = {cap.neurons // BATCH} groups; "
        f"`split.vram_capacity` = {VRAM:,}. Thresholds T = 0 (greedy) and T = 2048 (⌊T/B⌋ = 8 "
        "groups per used layer: dynamic programming).",
    ]
    for t in THRESHOLDS:
        p, m = res["porter"][t], res["milp"][t]
        s = p["split"]
        used = sum(1 for c in s.counts if c)
        lines.append(
            f"- T={t}: Porter ({s.method}) puts {s.gpu_neurons:,} neurons on the GPU in {used} "
            f"layers, coverage {s.coverage:.2%} of the activation mass, file {p['bytes']:,} bytes; "
            "totals of each run (s): " + ", ".join(f"{x:.3f}" for x in p["all_totals"]) + ". "
            f"milp: status {m['status']} ({m['message']}), runs (s): "
            + ", ".join(f"{x:.2f}" for x in m["runs"])
            + f", build {m['build'] * 1e3:.0f} ms."
        )
    lines += [
        "- Statistics: per-neuron activation counts out of 100,000 tokens, "
        "⌊min(1, lognormal(μ_l, σ_l)) · 100000⌋ stored as float32; layers 0–2 dense (μ = −1.5), "
        "the others μ_l ∈ [−7, −3], σ_l ∈ [1, 2.2] (seed 0): heavy-tailed hot sets of different "
        "sizes per layer, integer counts with many ties, some zeros and saturated neurons. "
        "Files in a scratch directory written just before the runs (page cache warm).",
        f"- Machine: {machine()}.",
        "",
        "### Targets",
        "",
        "| target | met | numbers |",
        "|---|---|---|",
    ]
    for target, ok, numbers in verdicts(res):
        lines.append(f"| {target} | {'yes' if ok else '**no**'} | {numbers} |")
    lines += ["", "Reproduce (under a minute here):", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", type=Path, help="scratch parent directory (default: /tmp)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--milp-time-limit", type=float, default=120.0)
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "PERFORMANCE.md")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    a = ap.parse_args(argv)
    parent = a.scratch or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="porter-bench-pwri-", dir=parent))
    try:
        res = run(scratch, a.rounds, a.milp_time_limit)
    finally:
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    command = ".venv/bin/python bench/run_powerinfer_index.py"
    if a.rounds != 5:
        command += f" --rounds {a.rounds}"
    if a.milp_time_limit != 120.0:
        command += f" --milp-time-limit {a.milp_time_limit:g}"
    replace_section(a.doc, "powerinfer-index", report(res, a.rounds, a.milp_time_limit, command))
    print("\n".join(table(res)))
    print()
    for target, ok, numbers in verdicts(res):
        print(f"[{'met' if ok else 'NOT met'}] {target}: {numbers}")
    print(f"\nwrote {a.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
