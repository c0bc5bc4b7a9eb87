"""The PowerInfer GPU-index job kind: per-layer activation statistics become the GGUF "GPU index"
files PowerInfer loads, one per VRAM budget.

    inspect (list the activation files) → stats of layer l (sorted group sums, fan-out)
      → solve (every budget) → top-k of layer l (fan-out) → assemble (one GGUF per budget)
      → publish (manifest.json, last)

ACTIVATIONS and OUTPUT are local directories or `s3://` prefixes. OUTPUT receives
`gpu_index.<vram_capacity>.gpuidx` per budget with its `.porter.json` provenance, and
`manifest.json`. The per-layer GPU neuron indices travel between steps as `.npy` artifacts under
`OUTPUT/_work/<job>/`, removed when the job is published. The local `porter convert
powerinfer-index` does the same work in one process (`tasks/kinds/powerinfer_local.py`) with the
same converter functions.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.settings import Settings
from converters.choices import POWERINFER_BATCH
from converters.errors import ConversionError
from converters.powerinfer.errors import BadActivationShape
from tasks.jobs.checks import InvalidSpec, check_fields, check_int, check_location
from tasks.jobs.ids import identity_digest, job_id, output_tag
from tasks.jobs.locations import check_tree
from tasks.jobs.outputs import put_bytes
from tasks.kinds import register
from tasks.kinds.base import JobKind, KindCli, Phase, Step, StepContext, local_location
from tasks.storage.cache import CachedFetcher
from tasks.storage.store import open_store

if TYPE_CHECKING:
    import numpy as np

# numpy, torch (activation files) and numba (the solver) are imported by the steps that use them:
# the command line and the job service load this module to check specs and show records.

KIND = "powerinfer-index"

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
    batch: int = POWERINFER_BATCH
    threshold: int = 0
    kind: str = field(default="powerinfer-index")

    def __post_init__(self) -> None:
        if self.kind != "powerinfer-index":
            raise InvalidSpec(f"kind must be 'powerinfer-index', got {self.kind!r:.60}")
        check_location(self.activations, "ACTIVATIONS")
        check_location(self.output, "OUTPUT")
        if self.output == self.activations or self.output.startswith(
            self.activations.rstrip("/") + "/"
        ):  # (as Megatron SOURCEs; `porter convert` also resolves links: powerinfer_local)
            raise InvalidSpec("OUTPUT lies inside ACTIVATIONS; choose a path outside it")
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


WORK = "_work"
MAX_ACTIVATION_BYTES = 256 * 2**20  # n_ff float32s: 28672 of them are 112 KiB


def index_file_name(vram_capacity: int) -> str:
    return f"gpu_index.{vram_capacity}.gpuidx"


def work_key(job: str, budget: int, layer: int) -> str:
    return f"{WORK}/{job}/budget{budget}/layer_{layer}.npy"


def activation_identity(uri: str) -> list[list]:
    """[[key, size, version]] of the `activation_<i>.pt` files at `uri`, in layer order."""
    from converters.powerinfer.activations import order_activation_names

    check_tree(uri)  # no symlink out of PORTER_ALLOWED_SOURCES (at submit and in the plan)
    store = open_store(uri)
    keys = order_activation_names([k for k in store.list() if "/" not in k], store.uri())
    identity = []
    for key in keys:
        art = store.stat(key)
        if art is None:
            raise ConversionError("vanished while it was being listed", store.uri(key))
        identity.append([key, art.bytes, art.etag])
    return identity


def inspect_activations(spec: IndexSpec) -> dict[str, Any]:
    """List and check the activation files (nothing is loaded): the job's id and layers."""
    if not spec.budgets:
        raise ConversionError(
            "give at least one budget (--vram-capacity with --capacity, --counts or --vram-budget)"
        )
    identity = activation_identity(spec.activations)
    job, digest = job_id(spec, identity), identity_digest(identity)
    return {
        "job_id": job,
        "tag": output_tag(job, digest),
        "source_digest": digest,
        "layers": [entry[0] for entry in identity],
        "source_bytes": sum(entry[1] for entry in identity),
    }


def _load(spec: IndexSpec, key: str) -> np.ndarray:
    """One layer's activations, fetched into the local cache (by ETag) and validated."""
    from converters.powerinfer.activations import load_layer

    store = open_store(spec.activations)
    check_tree(store.uri(key), walk=False)  # again where it is read: linked since the plan?
    art = store.stat(key)
    if art is not None and art.bytes > MAX_ACTIVATION_BYTES:  # refuse before downloading it
        raise BadActivationShape(
            f"is {art.bytes} bytes; a layer's activation vector (n_ff numbers) is far smaller "
            f"(at most {MAX_ACTIVATION_BYTES} bytes accepted)",
            store.uri(key),
        )
    cache = Path(Settings.from_env().cache_dir or Path.home() / ".cache/porter") / "activations"
    path = CachedFetcher(cache).fetch(store, key)
    try:
        return load_layer(path)
    except ConversionError as exc:  # name the object, not the cached copy
        raise type(exc)(exc.reason, store.uri(key)) from None


def layer_stats_step(spec: IndexSpec, layer: int, key: str) -> dict[str, Any]:
    """Layer `layer`'s group values: sums of `batch` neurons of its descending-sorted activations."""
    from converters.powerinfer.solver import group_values

    values = _load(spec, key)
    groups = group_values(values[None, :], spec.batch)[0]
    return {"layer": layer, "n_ff": int(values.shape[0]), "groups": groups.tolist()}


def solve_step(spec: IndexSpec, inspected: dict, stats: list[dict[str, Any]]) -> list[dict]:
    """Per budget: the per-layer GPU neuron counts (exact solver, or the given counts)."""
    import numpy as np

    from converters.powerinfer.solver import given_split_groups, solve_groups

    n_ff = stats[0]["n_ff"]
    for layer, entry in enumerate(stats):
        if entry["n_ff"] != n_ff:
            raise BadActivationShape(
                f"has {entry['n_ff']} neurons but {inspected['layers'][0]} has {n_ff}; "
                "all layers must have the same n_ff",
                open_store(spec.activations).uri(inspected["layers"][layer]),
            )
    groups = np.array([entry["groups"] for entry in stats], dtype=np.float64)
    splits = []
    for budget in spec.budgets:
        if budget.counts is not None:
            split = given_split_groups(groups, budget.counts, batch=spec.batch)
        else:
            assert budget.capacity is not None
            split = solve_groups(
                groups, budget.capacity, batch=spec.batch, threshold=spec.threshold
            )
        splits.append(
            {
                "vram_capacity": budget.vram_capacity,
                "capacity": budget.capacity,
                "capacity_formula": budget.formula,
                "method": split.method,
                "counts": list(split.counts),
                "objective": split.objective,
                "coverage": split.coverage,
                "n_ff": n_ff,
            }
        )
    return splits


def top_k_step(
    spec: IndexSpec, job: str, tag: str, layer: int, key: str, counts: list[int]
) -> dict[str, Any]:
    """Layer `layer`'s hottest neurons for each budget (`counts[b]` of them), as `.npy` artifacts."""
    import numpy as np

    from converters.powerinfer.select import top_k

    values = _load(spec, key)
    out = open_store(spec.output)
    for budget, count in enumerate(counts):
        with out.scratch(work_key(job, budget, layer)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, top_k(values, count), allow_pickle=False)
            out.put_file(tmp, work_key(job, budget, layer), tag=tag, move=True)
    return {"layer": layer, "gpu_neurons": sum(counts)}


def assemble_step(
    spec: IndexSpec, job: str, tag: str, inspected: dict, splits: list[dict]
) -> list[dict[str, Any]]:
    """One GPU index (PWRI GGUF) per budget from the per-layer indices, with its provenance."""
    import numpy as np

    from converters.powerinfer.gpuindex import write_gpu_index  # gguf: only where it writes

    out = open_store(spec.output)
    layers, files = len(inspected["layers"]), []
    with tempfile.TemporaryDirectory(prefix="porter-assemble-") as tmp:
        scratch = Path(tmp)
        for budget, split in enumerate(splits):
            buckets = []
            for layer in range(layers):
                local = scratch / f"{budget}-{layer}.npy"
                out.get_file(work_key(job, budget, layer), local)
                buckets.append(np.load(local, allow_pickle=False))
            name = index_file_name(split["vram_capacity"])
            written = write_gpu_index(
                scratch / name, buckets, n_ff=split["n_ff"], vram_capacity=split["vram_capacity"]
            )
            out.put_file(written.path, name, sha256=written.sha256, tag=tag, move=True)
            files.append({"file": name, "bytes_written": written.bytes, "sha256": written.sha256})
            provenance = {
                **{k: v for k, v in split.items() if k != "n_ff"},
                "file": name,
                "bytes": written.bytes,
                "sha256": written.sha256,
                "batch": spec.batch,
                "threshold": spec.threshold,
                "source": spec.activations,
            }
            data = (json.dumps(provenance, indent=2, sort_keys=True) + "\n").encode()
            files.append(put_bytes(out, f"{name}.porter.json", data, tag))
    return files


def remove_work(spec: IndexSpec, job: str) -> None:
    """Delete the job's intermediate artifacts."""
    open_store(spec.output).delete_prefix(f"{WORK}/{job}/")


# ── the command line ──


def _add_arguments(index: argparse.ArgumentParser, command: str) -> None:
    index.add_argument("activations", help="directory of activation_<layer>.pt files")
    index.add_argument(
        "output", help="index file to write (a directory when several budgets are given)"
    )
    index.add_argument(
        "--vram-capacity", type=int, action="append", required=True, metavar="BYTES",
        help="VRAM capacity stored in the file (split.vram_capacity); repeat for one file per budget",
    )  # fmt: skip
    how = index.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--capacity",
        type=int,
        action="append",
        metavar="NEURONS",
        help="GPU neurons over all layers (one per --vram-capacity)",
    )
    how.add_argument(
        "--counts", help="explicit per-layer GPU neuron counts c0,c1,... (skips the solver)"
    )
    how.add_argument(
        "--vram-budget",
        type=int,
        action="append",
        metavar="BYTES",
        help="FFN weight bytes allowed on the GPU (one per --vram-capacity)",
    )
    index.add_argument("--n-embd", type=int, help="hidden size (with --vram-budget)")
    index.add_argument(
        "--weight-bytes",
        type=float,
        help="bytes per FFN weight, e.g. 2 for fp16 (with --vram-budget)",
    )
    index.add_argument(
        "--gated", action="store_true", help="gated FFN (up, gate, down) (with --vram-budget)"
    )
    index.add_argument("--batch", type=int, default=256, help="neurons per group (default 256)")
    index.add_argument(
        "--threshold", type=int, default=0, help="minimum GPU neurons of a layer that gets any"
    )


def _index_budgets(args: argparse.Namespace) -> tuple:
    capacities = args.vram_capacity
    if args.counts is not None:
        if len(capacities) != 1:
            raise ConversionError("--counts describes one file: give exactly one --vram-capacity")
        try:
            counts = tuple(int(c) for c in args.counts.split(","))
        except ValueError:
            raise ConversionError(
                f"--counts must be comma-separated integers, got {args.counts!r}"
            ) from None
        return (IndexBudget(capacities[0], counts=counts),)
    values = args.capacity if args.capacity is not None else args.vram_budget
    option = "--capacity" if args.capacity is not None else "--vram-budget"
    if len(values) != len(capacities):
        raise ConversionError(
            f"give one {option} per --vram-capacity ({len(values)} vs {len(capacities)})"
        )
    if args.capacity is not None:
        return tuple(
            IndexBudget(v, capacity=c, formula="given")
            for v, c in zip(capacities, values, strict=True)
        )
    if args.n_embd is None or args.weight_bytes is None:
        raise ConversionError(
            "--vram-budget needs --n-embd and --weight-bytes (and --gated for gated FFNs)"
        )
    budgets = []
    for vram, budget in zip(capacities, values, strict=True):
        from converters.powerinfer.solver import capacity_from_vram

        capacity = capacity_from_vram(
            budget, n_embd=args.n_embd, bytes_per_weight=args.weight_bytes, gated=args.gated
        )
        budgets.append(IndexBudget(vram, capacity=capacity.neurons, formula=capacity.formula))
    return tuple(budgets)


def _spec_from_args(args: argparse.Namespace) -> IndexSpec:
    return IndexSpec(
        activations=local_location(args.activations, "ACTIVATIONS"),
        output=local_location(args.output, "OUTPUT"),
        budgets=_index_budgets(args),
        batch=args.batch,
        threshold=args.threshold,
    )


def _convert_index(args: argparse.Namespace) -> int:
    from tasks.kinds.powerinfer_local import export_gpu_indices

    if args.activations.startswith("s3://") or args.output.startswith("s3://"):
        raise ConversionError(
            "porter convert powerinfer-index works on local paths; for s3:// use "
            "`porter submit powerinfer-index`"
        )
    spec = _spec_from_args(args)
    for result in export_gpu_indices(spec):
        print(
            f"{result['path']}: {sum(result['counts'])} GPU neurons over {len(result['counts'])} layers "
            f"({result['method']}, capacity {result['capacity']}, {result['capacity_formula']}), "
            f"coverage {result['coverage']:.2%}, sha256 {result['sha256'][:16]}"
        )
    return 0


def _stats(ctx: StepContext, layer: int) -> dict[str, Any]:
    return layer_stats_step(ctx.spec, layer, ctx.inspected["layers"][layer])


def _solve(ctx: StepContext) -> dict[str, Any]:
    """Solve every budget from the layers' group values; the splits go into the job record."""
    results = ctx.results()
    stats = [results[f"stats:{layer}"] for layer in range(len(ctx.inspected["layers"]))]
    splits = solve_step(ctx.spec, ctx.inspected, stats)
    ctx.remember(splits=splits)
    return {"budgets": len(splits), "gpu_neurons": [sum(s["counts"]) for s in splits]}


def _top_k(ctx: StepContext, layer: int) -> dict[str, Any]:
    counts = [split["counts"][layer] for split in ctx.record["splits"]]
    key = ctx.inspected["layers"][layer]
    return top_k_step(ctx.spec, ctx.job, ctx.tag, layer, key, counts)


def _assemble(ctx: StepContext) -> dict[str, Any]:
    return {"files": assemble_step(ctx.spec, ctx.job, ctx.tag, ctx.inspected, ctx.record["splits"])}


def progress(record: dict[str, Any]) -> tuple[int, int]:
    """(steps done, steps) over the per-layer steps of a job record."""
    layers = len((record.get("inspected") or {}).get("layers", []))
    per_layer = [s for n, s in record.get("steps", {}).items() if n.startswith(("stats:", "topk:"))]
    return sum(s.get("state") == "SUCCEEDED" for s in per_layer), 2 * layers


def _describe(spec: dict[str, Any]) -> str:
    budgets = ", ".join(str(b["vram_capacity"]) for b in spec["budgets"])
    return f"{spec['activations']} -> {spec['output']} (VRAM capacities {budgets})"


KIND_SPEC = register(
    JobKind(
        name=KIND,
        spec_type=IndexSpec,
        identity=lambda spec: activation_identity(spec.activations),
        inspect=inspect_activations,
        phases=(
            Phase(
                step="stats",
                task="porter.index.stats",
                count="layers",
                run=_stats,
                body_task="porter.index.solve",
                body_id="solve",
                then=Step("solve", _solve),
            ),
            Phase(
                step="topk",
                task="porter.index.topk",
                count="layers",
                run=_top_k,
                body_task="porter.index.assemble",
                body_id="assemble",
                then=Step("assemble", _assemble),
            ),
        ),
        published=lambda ctx: ctx.results()["assemble"]["files"],
        source_summary=lambda inspected: {
            k: inspected[k] for k in ("source_bytes", "source_digest")
        },
        progress=progress,
        progress_unit="layer steps",
        after_publish=lambda ctx: remove_work(ctx.spec, ctx.job),
        cli=KindCli(
            help="PowerInfer activation statistics → GPU index file(s) PowerInfer loads",
            add_arguments=_add_arguments,
            spec_from_args=_spec_from_args,
            report=lambda spec, summary: None,
            convert=_convert_index,
            describe=_describe,
        ),
    )
)
