"""PowerInfer GPU-index export on this machine: load the statistics once, then per budget solve,
select and write one index file (with its provenance next to it). `spec` is the kind's
`IndexSpec` (`tasks.kinds.powerinfer_index`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from converters.errors import ConversionError
from converters.powerinfer.activations import load_activations
from converters.powerinfer.gpuindex import write_gpu_index
from converters.powerinfer.select import select
from converters.powerinfer.solver import given_split, group_values, solve


def _output_paths(spec: Any) -> list[Path]:
    output = Path(spec.output)
    if len(spec.budgets) == 1:
        return [output]
    if output.exists() and not output.is_dir():
        raise ConversionError("several budgets need OUTPUT to be a directory", output)
    return [output / f"gpu_index.{b.vram_capacity}.gpuidx" for b in spec.budgets]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def export_gpu_indices(spec: Any) -> list[dict[str, Any]]:
    """Write one GPU index per budget; returns per file its path, size, sha256 and solution."""
    if not spec.budgets:
        raise ConversionError(
            "give at least one budget (--vram-capacity with --capacity, --counts or --vram-budget)"
        )
    started = time.perf_counter()
    paths = _output_paths(spec)
    stats = load_activations(Path(spec.activations))
    needs_groups = any(b.counts is None for b in spec.budgets)
    groups = group_values(stats.values, spec.batch) if needs_groups else None
    results = []
    for budget, path in zip(spec.budgets, paths, strict=True):
        if budget.counts is not None:
            split = given_split(stats.values, budget.counts, batch=spec.batch)
        else:
            assert budget.capacity is not None
            split = solve(
                stats.values,
                budget.capacity,
                batch=spec.batch,
                threshold=spec.threshold,
                groups=groups,
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        written = write_gpu_index(
            path,
            select(stats.values, split.counts),
            n_ff=stats.n_ff,
            vram_capacity=budget.vram_capacity,
        )
        provenance = {
            "file": path.name,
            "bytes": written.bytes,
            "sha256": written.sha256,
            "vram_capacity": budget.vram_capacity,
            "capacity": budget.capacity,
            "capacity_formula": budget.formula,
            "batch": spec.batch,
            "threshold": spec.threshold,
            "method": split.method,
            "counts": list(split.counts),
            "objective": split.objective,
            "coverage": split.coverage,
            "source": str(Path(spec.activations).resolve()),
        }
        _write_json(path.with_name(path.name + ".porter.json"), provenance)
        results.append({**provenance, "path": str(path)})
    if len(paths) > 1:  # a directory of indices: the manifest, written last, marks it complete
        manifest = {"kind": spec.kind, "spec": spec.to_dict(), "files": results}
        manifest["seconds"] = time.perf_counter() - started
        _write_json(Path(spec.output) / "manifest.json", manifest)
    return results
