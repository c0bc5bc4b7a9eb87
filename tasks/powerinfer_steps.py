"""The steps of a queued PowerInfer GPU-index job: plain functions with JSON inputs and outputs.

    inspect (list the activation files) → stats of layer l (sorted group sums, fan-out)
      → solve (every budget) → top-k of layer l (fan-out) → assemble (one GGUF per budget)
      → publish (manifest.json, last)

ACTIVATIONS and OUTPUT are local directories or `s3://` prefixes. OUTPUT receives
`gpu_index.<vram_capacity>.gpuidx` per budget with its `.porter.json` provenance, and
`manifest.json`. The per-layer GPU neuron indices travel between steps as `.npy` artifacts under
`OUTPUT/_work/<job>/`, removed when the job is published. The local `porter convert
powerinfer-index` does the same work in one process (`tasks/powerinfer_index.py`) with the same
converter functions.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from config.settings import Settings
from converters.errors import ConversionError
from converters.powerinfer.activations import load_layer, order_activation_names
from converters.powerinfer.errors import BadActivationShape
from converters.powerinfer.gpuindex import write_gpu_index
from converters.powerinfer.select import top_k
from converters.powerinfer.solver import given_split_groups, group_values, solve_groups
from tasks.jobs import identity_digest, job_id, output_tag
from tasks.powerinfer_index import IndexSpec
from tasks.store import ArtifactStore, CachedFetcher, open_store

WORK = "_work"
MAX_ACTIVATION_BYTES = 256 * 2**20  # n_ff float32s: 28672 of them are 112 KiB


def index_file_name(vram_capacity: int) -> str:
    return f"gpu_index.{vram_capacity}.gpuidx"


def work_key(job: str, budget: int, layer: int) -> str:
    return f"{WORK}/{job}/budget{budget}/layer_{layer}.npy"


def activation_identity(uri: str) -> list[list]:
    """[[key, size, version]] of the `activation_<i>.pt` files at `uri`, in layer order."""
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
    store = open_store(spec.activations)
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
        message = str(exc).removeprefix(f"{exc.path}: ") if exc.path else str(exc)
        raise type(exc)(message, store.uri(key)) from None


def layer_stats_step(spec: IndexSpec, layer: int, key: str) -> dict[str, Any]:
    """Layer `layer`'s group values: sums of `batch` neurons of its descending-sorted activations."""
    values = _load(spec, key)
    groups = group_values(values[None, :], spec.batch)[0]
    return {"layer": layer, "n_ff": int(values.shape[0]), "groups": groups.tolist()}


def solve_step(spec: IndexSpec, inspected: dict, stats: list[dict[str, Any]]) -> list[dict]:
    """Per budget: the per-layer GPU neuron counts (exact solver, or the given counts)."""
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


def _put_bytes(store: ArtifactStore, key: str, data: bytes, tag: str) -> dict[str, Any]:
    with store.scratch(key) as tmp:
        tmp.write_bytes(data)
        art = store.put_file(tmp, key, tag=tag, move=True)
    return {"file": key, "bytes_written": art.bytes, "sha256": art.sha256}


def top_k_step(
    spec: IndexSpec, job: str, tag: str, layer: int, key: str, counts: list[int]
) -> dict[str, Any]:
    """Layer `layer`'s hottest neurons for each budget (`counts[b]` of them), as `.npy` artifacts."""
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
            files.append(_put_bytes(out, f"{name}.porter.json", data, tag))
    return files


def remove_work(spec: IndexSpec, job: str) -> None:
    """Delete the job's intermediate artifacts."""
    open_store(spec.output).delete_prefix(f"{WORK}/{job}/")
