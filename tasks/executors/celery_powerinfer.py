"""Celery tasks of a queued PowerInfer GPU-index job (canvas built by `plan_index`):

    inspect → chord(stats of layer l, queue cpu) → solve
      → chord(top-k of layer l, queue cpu) → assemble → publish

Same bookkeeping as the Megatron job (`_run_step`: step records, first error fails the job,
delivery cap); the steps are those of `tasks.powerinfer_steps`.
"""

from __future__ import annotations

from typing import Any

from celery import chord
from celery.exceptions import Ignore

from config.celery_app import app
from tasks import powerinfer_steps as steps
from tasks import steps as common
from tasks.executors.celery import records, run_step
from tasks.jobs import output_tag, task_id
from tasks.powerinfer_index import IndexSpec
from tasks.records import SUCCEEDED
from tasks.store import open_store


def _job(job: str) -> tuple[dict[str, Any], IndexSpec]:
    record = records().get(job, steps=False)
    if record is None:
        raise Ignore()
    return record, IndexSpec.from_dict(record["spec"])


def plan_index(job: str, attempt: int) -> dict[str, Any]:
    """Inspect the activation files and launch the per-layer statistics chord."""
    rec = records()
    _, spec = _job(job)

    def inspect() -> dict[str, Any]:
        inspected = steps.inspect_activations(spec)
        inspected["job_id"], inspected["tag"] = job, output_tag(job, inspected["source_digest"])
        manifest = common.prepare_output(spec, job)
        rec.update(job, inspected=inspected, source_digest=inspected["source_digest"])
        return {"committed": manifest is not None, "layers": len(inspected["layers"])}

    result = run_step(job, "inspect", inspect)
    if result["committed"]:
        rec.update(job, manifest_uri=open_store(spec.output).uri(common.MANIFEST))
        rec.finish(job, SUCCEEDED)
        return result
    header = [
        layer_stats.si(job, layer).set(task_id=task_id(job, f"stats:{layer}", attempt))
        for layer in range(result["layers"])
    ]
    chord(header, solve.si(job).set(task_id=task_id(job, "solve", attempt))).apply_async()
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
    header = [
        top_k.si(job, layer).set(task_id=task_id(job, f"topk:{layer}", attempt))
        for layer in range(len(inspected["layers"]))
    ]
    chord(header, assemble.si(job).set(task_id=task_id(job, "assemble", attempt))).apply_async()
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

    def commit() -> dict[str, Any]:
        source = {"files": len(inspected["layers"]), "source_bytes": inspected["source_bytes"],
                  "source_digest": inspected["source_digest"]}  # fmt: skip
        manifest = common.publish_step(spec, job, tag, source, files)
        steps.remove_work(spec, job)
        uri = open_store(spec.output).uri(common.MANIFEST)
        return {"files": len(manifest["files"]), "manifest_uri": uri}

    result = run_step(job, "publish", commit)
    records().update(job, manifest_uri=result["manifest_uri"])
    records().finish(job, SUCCEEDED)
    return result
