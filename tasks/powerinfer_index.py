"""PowerInfer GPU-index export on this machine: load the statistics once, then per budget solve,
select and write one index file (with its provenance next to it)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from converters.errors import ConversionError
from converters.powerinfer.activations import load_activations
from converters.powerinfer.gpuindex import write_gpu_index
from converters.powerinfer.select import select
from converters.powerinfer.solver import DEFAULT_BATCH, given_split, group_values, solve
from tasks.jobs import InvalidSpec, check_fields, check_int, check_location

MAX_LAYERS = 100_000
MAX_BUDGETS = 64


@dataclass(frozen=True)
class IndexBudget:
    """One output file: the VRAM capacity stored in it and how its neuron counts are chosen."""

    vram_capacity: int  # bytes, written as `split.vram_capacity`
    capacity: int | None = None  # neurons on the GPU over all layers (solver input)
    counts: tuple[int, ...] | None = None  # explicit per-layer counts (solver skipped)
    formula: str = "given"  # how `capacity` was obtained

    def __post_init__(self) -> None:
        check_int(self.vram_capacity, "vram_capacity", 0, 2**64 - 1)
        if self.capacity is not None:
            check_int(self.capacity, "capacity", 0, 2**63 - 1)
        if self.counts is not None:
            if len(self.counts) > MAX_LAYERS:
                raise InvalidSpec(f"counts has {len(self.counts)} entries (at most {MAX_LAYERS})")
            for count in self.counts:
                check_int(count, "a count", 0, 2**31 - 1)
        if not isinstance(self.formula, str) or len(self.formula) > 1000:
            raise InvalidSpec("formula must be a string of at most 1000 characters")


@dataclass(frozen=True)
class IndexSpec:
    """A PowerInfer GPU-index export: JSON-serialisable, like every Porter job spec."""

    activations: str
    output: str  # the index file (one budget) or a directory (several budgets)
    budgets: tuple[IndexBudget, ...]
    batch: int = DEFAULT_BATCH
    threshold: int = 0
    kind: str = field(default="powerinfer-index")

    def __post_init__(self) -> None:
        if self.kind != "powerinfer-index":
            raise InvalidSpec(f"kind must be 'powerinfer-index', got {self.kind!r:.60}")
        check_location(self.activations, "ACTIVATIONS")
        check_location(self.output, "OUTPUT")
        if not isinstance(self.budgets, tuple) or len(self.budgets) > MAX_BUDGETS:
            raise InvalidSpec(f"budgets must be a list of at most {MAX_BUDGETS}")
        check_int(self.batch, "batch", 1, 2**31 - 1)
        check_int(self.threshold, "threshold", 0, 2**31 - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> IndexSpec:
        """A spec from its JSON form; unknown, missing or mistyped fields are InvalidSpec."""
        data = check_fields(data, cls, ("activations", "output", "budgets"), "the index spec")
        if not isinstance(data["budgets"], list) or len(data["budgets"]) > MAX_BUDGETS:
            raise InvalidSpec(f"budgets must be a list of at most {MAX_BUDGETS}")
        budgets = []
        for entry in data["budgets"]:
            entry = check_fields(entry, IndexBudget, ("vram_capacity",), "a budget")
            counts = entry.get("counts")
            if counts is not None and not isinstance(counts, list):
                raise InvalidSpec("a budget's counts must be a list of integers")
            budgets.append(IndexBudget(**{**entry, "counts": tuple(counts) if counts else None}))
        return cls(**{**data, "budgets": tuple(budgets)})


def _output_paths(spec: IndexSpec) -> list[Path]:
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


def export_gpu_indices(spec: IndexSpec) -> list[dict[str, Any]]:
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
