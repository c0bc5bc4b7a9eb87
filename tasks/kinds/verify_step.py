"""The `verify` step of the Megatron-source kinds (`--verify`, or `verify = true` in an export
profile): after the export's files are written and before anything is published, `porter verify`
runs on the job's SOURCE and OUTPUT. A failed verification fails the job, so nothing is published.

    … ─► config ─► verify (one step, cpu queue) ─► [engines] ─► publish

Why one sequential step rather than a fan-out over layer ranges: layer i's input is the source's
output of layer i-1, so a range can only start from hidden states someone computed. A chain of
range steps, each waiting for its predecessor's activations, is no faster than one step (there
is nothing to run in parallel) and adds a task, a stored activation file and a failure point per
range; independent range steps would each re-run the source's earlier layers (reading on average
half the source each). The work is I/O-bound (each layer's tensors read once from either side),
its memory is a few tensors of one layer whatever the model's size. At the rate measured on the
loaded 2-core sandbox (docs/PERFORMANCE.md, about 40 s per GiB of source) a 70B bf16 model takes
about 1.5 hours, well inside the 12-hour visibility timeout; a re-delivered step starts over.
The result (per-layer maxima, the tolerance, the first failure) goes into the job record (the
step's result) and, through the kind's source summary, into manifest.json.
"""

from __future__ import annotations

from typing import Any

from converters.errors import ConversionError
from tasks.jobs.ids import tag_digest
from tasks.kinds.base import Phase, StepContext

TOKENS, SEED = 16, 0  # what a job step runs through both models (the CLI's defaults)


class VerificationFailed(ConversionError):
    """The export does not compute what its source computes (names the layer and part)."""


def verify_plan(spec: Any, num_layers: int) -> dict[str, Any]:
    """What `inspect` adds for the verify phase: one sequential step over every layer (see the
    module docstring), or none when the spec does not ask for it."""
    if not getattr(spec, "verify", False):
        return {"verify": []}
    return {"verify": [{"layers": [0, num_layers], "tokens": TOKENS, "seed": SEED}]}


def verify_step(ctx: StepContext, index: int) -> dict[str, Any]:
    """Verify OUTPUT (written, not yet published) against SOURCE; raise VerificationFailed when
    they differ. The summary is kept in the job record for the manifest (`verification`)."""
    from converters.megatron.declare import declaration_of
    from converters.verify import verify_export
    from tasks.storage.verify_inputs import local_export, open_verify_source

    plan = ctx.inspected["verify"][index]
    spec = ctx.spec
    source = open_verify_source(
        spec.source,
        expected_digest=tag_digest(ctx.tag),
        architecture=declaration_of(getattr(spec, "architecture", None)),
    )

    def on_stage(stage: Any, done: int, total: int) -> None:
        if ctx.progress:
            ctx.progress(done, total)

    with local_export(spec.output) as directory:
        report = verify_export(
            source,
            directory,
            finished=False,  # manifest.json comes after this step
            tokens=plan["tokens"],
            seed=plan["seed"],
            on_stage=on_stage,
        )
    summary = {
        "ok": report.ok,
        "tokens": len(report.tokens),
        "seed": plan["seed"],
        "tolerance": report.tolerance,
        "max_relative": max(s.relative for s in report.stages),
        "failure": report.failure(),
        "stages": [
            {"stage": s.label, "max_abs": s.max_abs, "relative": s.relative, "ok": s.ok}
            for s in report.stages
        ],
    }
    if not report.ok:
        raise VerificationFailed(f"verification failed: {report.failure()}", spec.output)
    # `inspected` is what the kinds' source summaries (the manifest's `source`) read: keep the
    # verdict there, in this process and in the job record the publish step reads.
    ctx.inspected["verification"] = {k: v for k, v in summary.items() if k != "stages"}
    ctx.remember(inspected=ctx.inspected)
    return summary


def verification_summary(inspected: dict[str, Any]) -> dict[str, Any]:
    """The manifest's record of the verify step ({} when the job did not verify)."""
    found = inspected.get("verification")
    return {"verification": found} if found else {}


def verify_phase(task: str, body_task: str) -> Phase:
    """The verify phase of a kind, under that kind's own Celery task names."""
    return Phase(
        step="verify",
        task=task,
        count="verify",
        run=verify_step,
        body_task=body_task,
        body_id="verified",
        enabled=lambda spec: bool(getattr(spec, "verify", False)),
    )


def verification_line(results: dict[str, dict[str, Any]]) -> str | None:
    """The closing summary's line about the verify step, None when the job did not verify."""
    found = results.get("verify:0")
    if not found:
        return None
    return (
        f"verified against the source: {len(found['stages']) - 2} layers, {found['tokens']} "
        f"tokens, max relative difference {found['max_relative']:.3g} "
        f"(tolerance {found['tolerance']:g})"
    )
