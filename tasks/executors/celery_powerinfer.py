"""Celery tasks of a queued PowerInfer GPU-index job (canvas built by `plan_index`):

    inspect → chord(stats of layer l, queue cpu) → solve
      → chord(top-k of layer l, queue cpu) → assemble → publish

Same bookkeeping as the Megatron job (`_run_step`: step records, first error fails the job,
delivery cap); the steps are those of `tasks.powerinfer_steps`.
"""

from __future__ import annotations

import functools
from typing import Any

from config.celery_app import app
from tasks import powerinfer_steps as steps
from tasks.executors.celery import commit_job, fan_out, inspect_step, job_record, records, run_step
from tasks.powerinfer_index import IndexSpec


def _job(job: str) -> tuple[dict[str, Any], IndexSpec]:
    record = job_record(job)
    return record, IndexSpec.from_dict(record["spec"])


def plan_index(job: str, attempt: int) -> dict[str, Any]:
    """Inspect the activation files and launch the per-layer statistics chord."""
    record = job_record(job)
    parse = functools.partial(IndexSpec.from_dict, record["spec"])
    result = inspect_step(job, parse, steps.inspect_activations)
    if not result["committed"]:
        layers = len(job_record(job)["inspected"]["layers"])
        fan_out(job, attempt, layer_stats, "stats", layers, solve, "solve")
    return result


@app.task(name="porter.index.stats")
def layer_stats(job: str, layer: int) -> dict[str, Any]:
    record, spec = _job(job)
    key = record["inspected"]["layers"][layer]
    return run_step(job, f"stats:{layer}", lambda: steps.layer_stats_step(spec, layer, key))


@app.task(name="porter.index.solve")
def solve(job: str) -> dict[str, Any]:
    """Solve every budget from the layers' group values, then launch the top-k chord."""
    record, spec = _job(job)
    inspected, attempt = record["inspected"], int(record["attempt"])
    by_step = dict(records().steps(job))

    def work() -> dict[str, Any]:
        stats = [by_step[f"stats:{layer}"] for layer in range(len(inspected["layers"]))]
        splits = steps.solve_step(spec, inspected, stats)
        records().update(job, splits=splits)
        return {"budgets": len(splits), "gpu_neurons": [sum(s["counts"]) for s in splits]}

    result = run_step(job, "solve", work)
    fan_out(job, attempt, top_k, "topk", len(inspected["layers"]), assemble, "assemble")
    return result


@app.task(name="porter.index.topk")
def top_k(job: str, layer: int) -> dict[str, Any]:
    record, spec = _job(job)
    inspected = record["inspected"]
    counts = [split["counts"][layer] for split in record["splits"]]
    key = inspected["layers"][layer]
    return run_step(
        job,
        f"topk:{layer}",
        lambda: steps.top_k_step(spec, job, inspected["tag"], layer, key, counts),
    )


@app.task(name="porter.index.assemble")
def assemble(job: str) -> dict[str, Any]:
    """Write one GGUF per budget, commit the manifest, remove the intermediate indices."""
    record, spec = _job(job)
    inspected, tag = record["inspected"], record["inspected"]["tag"]

    def build() -> dict[str, Any]:
        files = steps.assemble_step(spec, job, tag, inspected, record["splits"])
        return {"files": files}

    files = run_step(job, "assemble", build)["files"]
    source = {k: inspected[k] for k in ("source_bytes", "source_digest")}
    return commit_job(job, spec, tag, source, lambda: files, lambda: steps.remove_work(spec, job))
