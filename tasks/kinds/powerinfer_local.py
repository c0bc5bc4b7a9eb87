"""PowerInfer GPU-index export on this machine: load the statistics once, then per budget solve,
select and write one index file (with its provenance next to it). `spec` is the kind's
`IndexSpec` (`tasks.kinds.powerinfer_index`).

OUTPUT follows the rules of the other kinds' OUTPUT: it may not lie inside (or be) ACTIVATIONS;
what is there already must be this very job's (the same spec and activation files: its job id,
recorded in each file's `.porter.json` provenance and in `manifest.json`), else it is refused and
left untouched; a finished job run again writes nothing. Every file is written under a temporary
name and then put in place, without replacing anything that is not this job's (a concurrent
conversion into the same OUTPUT makes one of them fail instead of mixing their files).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from converters.errors import ConversionError
from converters.powerinfer.activations import find_activation_files, load_activations
from converters.powerinfer.gpuindex import write_gpu_index
from converters.powerinfer.select import select
from converters.powerinfer.solver import given_split, group_values, solve
from tasks.jobs.ids import job_id
from tasks.jobs.locations import check_tree
from tasks.storage.base import sha256_file

MANIFEST = "manifest.json"
PROVENANCE = ".porter.json"


def _output_paths(spec: Any) -> list[Path]:
    output = Path(spec.output)
    if len(spec.budgets) == 1:
        if output.is_dir():
            raise ConversionError("is a directory; one budget writes one index file", output)
        return [output]
    if output.exists() and not output.is_dir():
        raise ConversionError("several budgets need OUTPUT to be a directory", output)
    return [output / f"gpu_index.{b.vram_capacity}.gpuidx" for b in spec.budgets]


def local_job_id(spec: Any) -> str:
    """The job id of a local export: its spec and its activation files (names, sizes, mtimes)."""
    identity = []
    for path in find_activation_files(Path(spec.activations)):
        st = path.stat()
        identity.append([path.name, st.st_size, st.st_mtime_ns])
    return job_id(spec, identity)


def _check_not_inside_input(spec: Any) -> None:
    output, activations = Path(spec.output).resolve(), Path(spec.activations).resolve()
    if output == activations or activations in output.parents:
        raise ConversionError(
            f"OUTPUT lies inside ACTIVATIONS ({activations}); choose a path outside it", output
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at `path`; None if there is no such file, or it holds no JSON object."""
    try:
        data = json.loads(path.read_bytes()[: 16 * 2**20])
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _ours(path: Path, job: str) -> dict[str, Any] | None:
    """The provenance of the index file `path` if it names `job`, else None."""
    provenance = _read_json(path.with_name(path.name + PROVENANCE))
    return provenance if provenance is not None and provenance.get("job_id") == job else None


def _finished(path: Path, job: str) -> dict[str, Any] | None:
    """The result of the index at `path` if `job` wrote it completely (provenance and bytes)."""
    provenance = _ours(path, job)
    if provenance is None or not path.is_file() or sha256_file(path) != provenance.get("sha256"):
        return None
    return {**provenance, "path": str(path), "reused": True}


def _check_output(spec: Any, job: str, paths: list[Path]) -> list[dict[str, Any]] | None:
    """Refuse OUTPUT holding anything that is not this job's; the results if this job already
    finished there (None: convert)."""
    if len(paths) == 1:
        path = paths[0]
        sidecar = path.with_name(path.name + PROVENANCE)
        if (path.exists() or sidecar.exists()) and _ours(path, job) is None:
            raise ConversionError(
                "already exists and was not written by this job; remove it or choose another path",
                path if path.exists() else sidecar,
            )
        finished = _finished(path, job)
        return None if finished is None else [finished]
    output = Path(spec.output)
    if not output.is_dir():
        return None
    manifest = _read_json(output / MANIFEST)
    if (output / MANIFEST).exists() and (manifest is None or manifest.get("job_id") != job):
        raise ConversionError(
            "OUTPUT already holds another conversion (manifest.json); choose an empty directory",
            output / MANIFEST,
        )
    allowed = {MANIFEST} if manifest is not None else set()
    for path in paths:
        if _ours(path, job) is not None:
            allowed |= {path.name, path.name + PROVENANCE}
    names = [p.name for p in output.iterdir()]
    foreign = [n for n in names if n not in allowed and not _scratch_name(n)]
    if foreign:
        raise ConversionError(
            f"OUTPUT is not empty ({len(foreign)} entries this job did not write); choose an "
            "empty directory",
            output,
        )
    if manifest is not None:
        finished = [_finished(path, job) for path in paths]
        if all(finished):
            return finished  # type: ignore[return-value]
    return None


def _scratch_name(name: str) -> bool:
    """A temporary file of this module (`.<name>.<random>.tmp`): never a result."""
    return name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def _scratch(path: Path) -> Iterator[Path]:
    """A temporary name next to `path`, removed afterwards if still there."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _place(tmp: Path, path: Path, replace: bool) -> None:
    """Put the complete file `tmp` at `path`: replacing what is there only if `replace` (it is
    this job's), else only if nothing is there (another writer's file is never replaced)."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ConversionError(
            "appeared while this job was writing it (another conversion into the same OUTPUT?); "
            "left as is",
            path,
        ) from None
    tmp.unlink()


def _write_json(path: Path, data: Any, replace: bool) -> None:
    with _scratch(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        _place(tmp, path, replace)


def export_gpu_indices(spec: Any) -> list[dict[str, Any]]:
    """Write one GPU index per budget; returns per file its path, size, sha256 and solution
    (with `reused` when this very job had already written it)."""
    if not spec.budgets:
        raise ConversionError(
            "give at least one budget (--vram-capacity with --capacity, --counts or --vram-budget)"
        )
    started = time.perf_counter()
    check_tree(spec.activations)  # no symlink out of PORTER_ALLOWED_SOURCES
    _check_not_inside_input(spec)
    paths = _output_paths(spec)
    job = local_job_id(spec)
    finished = _check_output(spec, job, paths)
    if finished is not None:
        return finished
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
        ours = _ours(path, job) is not None  # a killed run of this job left it: replace it
        with _scratch(path) as tmp:
            written = write_gpu_index(
                tmp,
                select(stats.values, split.counts),
                n_ff=stats.n_ff,
                vram_capacity=budget.vram_capacity,
            )
            provenance = {
                "job_id": job,
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
            # The provenance first: it claims the file for this job, so a run killed between
            # the two is recognised as this job's and redone.
            _write_json(path.with_name(path.name + PROVENANCE), provenance, ours)
            _place(tmp, path, ours)
        results.append({**provenance, "path": str(path)})
    if len(paths) > 1:  # a directory of indices: the manifest, written last, marks it complete
        manifest = {"job_id": job, "kind": spec.kind, "spec": spec.to_dict(), "files": results}
        manifest["seconds"] = time.perf_counter() - started
        output = Path(spec.output)
        _write_json(output / MANIFEST, manifest, _read_json(output / MANIFEST) is not None)
    return results
