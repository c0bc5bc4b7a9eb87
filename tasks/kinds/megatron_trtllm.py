"""The Megatron → TensorRT-LLM job kind: a Megatron checkpoint becomes a TensorRT-LLM checkpoint
(`config.json` + `rank{N}.safetensors`) for any TP x PP, and optionally its engines.

    inspect ─► reshard rank r (fan-out) ─► config ─► [build engine rank r (gpu)] ─► publish

The steps are plain functions; both executors (the local process pool behind `porter convert` and
the Celery tasks) call them through the phases declared at the end. Every step is idempotent: a
rank whose artifact already carries this job's tag is returned as it is.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from config.queues import GPU_QUEUE
from config.settings import Settings
from converters.megatron.declare import DECLARABLE
from tasks.jobs.checks import InvalidSpec, check_bool, check_fields, check_int, show
from tasks.jobs.ids import tag_digest
from tasks.jobs.outputs import artifact_result
from tasks.kinds import register
from tasks.kinds.base import (
    JobKind,
    KindCli,
    Phase,
    Step,
    StepContext,
    bytes_progress,
    human,
)
from tasks.kinds.megatron_source import (
    add_source_arguments,
    check_source_spec,
    inspect_megatron,
    print_summary_head,
    put_json,
    source_architecture,
    source_fields,
    source_identity,
    warn_nonfinite,
)
from tasks.kinds.verify_step import verification_summary, verify_phase, verify_plan
from tasks.ops.memory import PeakAnonSampler, peak_rss_bytes, reset_peak_rss
from tasks.storage.store import open_store

if TYPE_CHECKING:
    from converters.trtllm.convert import Progress
    from converters.trtllm.plan import Target

# The converters (numpy, the readers) are imported by the steps that use them: the command line and the job
# service load this module to check specs and show records (tests/test_cli_imports.py).

KIND = "megatron-trtllm"
CONFIG = "config.json"
MAX_PARALLEL = 4096  # target TP x PP: far above any real deployment, far below a DoS


@dataclass(frozen=True)
class ConvertSpec:
    """A Megatron → TensorRT-LLM conversion: JSON-serialisable, the unit of work of a job."""

    source: str
    output: str
    tp: int
    pp: int = 1
    dtype: str | None = None
    parallel_embedding: bool = False
    engines: bool = False  # also build TensorRT-LLM engines (gpu queue)
    kind: str = KIND
    # NaN/infinite weights: "warn" (listed in each rank's result) or "error" (the rank fails).
    nonfinite: str = "warn"
    verify: bool = False  # run `porter verify` on the export before publishing
    moe_ep: int = 1  # MoE: expert-parallel ranks inside the target TP group (moe_tp = tp / moe_ep)
    # What the args cannot say (converters/megatron/declare.py): "gemma"; None = from the args.
    architecture: str | None = None

    def __post_init__(self) -> None:
        check_source_spec(self, KIND)
        check_int(self.tp, "tp", 1, MAX_PARALLEL)
        check_int(self.pp, "pp", 1, MAX_PARALLEL)
        check_int(self.moe_ep, "moe_ep", 1, MAX_PARALLEL)
        if self.tp % self.moe_ep:
            raise InvalidSpec(f"moe_ep={self.moe_ep} does not divide tp={self.tp}")
        if self.tp * self.pp > MAX_PARALLEL:
            raise InvalidSpec(f"tp x pp = {self.tp * self.pp} ranks (at most {MAX_PARALLEL})")
        check_bool(self.parallel_embedding, "parallel_embedding")
        check_bool(self.engines, "engines")
        if self.architecture is not None and self.architecture not in DECLARABLE:
            raise InvalidSpec(
                f"architecture {show(self.architecture)} is not one of {', '.join(DECLARABLE)}"
            )

    @property
    def target(self) -> Target:
        from converters.trtllm.plan import Target

        return Target(
            tp=self.tp,
            pp=self.pp,
            dtype=self.dtype,
            parallel_embedding=self.parallel_embedding,
            nonfinite=self.nonfinite,
            moe_ep=self.moe_ep,
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["nonfinite"] == "warn":  # the default: job ids stay what they were before it
            del data["nonfinite"]
        if not data["verify"]:  # likewise
            del data["verify"]
        if data["moe_ep"] == 1:  # likewise
            del data["moe_ep"]
        if data["architecture"] is None:  # likewise
            del data["architecture"]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ConvertSpec:
        """A spec from its JSON form; unknown, missing or mistyped fields are InvalidSpec."""
        return cls(**check_fields(data, cls, ("source", "output", "tp"), "the job spec"))


def inspect_source(spec: ConvertSpec) -> dict[str, Any]:
    """Read the source's metadata only: format, model config, identity, per-rank cost estimates."""
    from converters.trtllm.families import family_for
    from converters.trtllm.plan import check_target, estimate_rank

    target = spec.target

    def plan(source: Any) -> dict[str, Any]:
        check_target(source.config, target)
        return {
            "family": family_for(source.config).name,
            "ranks": [asdict(estimate_rank(source, target, r)) for r in range(target.world_size)],
            **verify_plan(spec, source.config.num_layers),
        }

    return inspect_megatron(spec, plan)


def convert_rank_step(
    spec: ConvertSpec, tag: str, rank: int, progress: Progress | None = None
) -> dict[str, Any]:
    """Write `rank{rank}.safetensors` to OUTPUT (fetching only the source bytes this rank reads)."""
    from converters.trtllm.convert import convert_rank, rank_file_name
    from tasks.storage import sources

    store = open_store(spec.output)
    key = rank_file_name(rank)
    done = artifact_result(store, key, tag)
    if done:  # a re-delivered, retried or resumed step
        zero = ("bytes_read", "bytes_fetched", "bytes_cached", "peak_anon_bytes", "peak_rss_bytes")
        return {"rank": rank, "seconds": 0.0, "nonfinite": [], **dict.fromkeys(zero, 0), **done}
    source, fetched = sources.open_source_for_rank(
        spec.source,
        spec.target,
        rank,
        expected_digest=tag_digest(tag),
        architecture=source_architecture(spec),
    )
    reset_peak_rss()
    with store.scratch(key) as tmp, PeakAnonSampler() as sampler:
        result = convert_rank(source, spec.target, rank, tmp, progress)
        store.put_file(tmp, key, sha256=result.sha256, tag=tag, move=True)
    return {
        **asdict(result),
        "file": key,
        "bytes_fetched": fetched.bytes_fetched,  # downloaded from the store by this step
        "bytes_cached": fetched.bytes_cached,  # needed, and already in this machine's cache
        "peak_anon_bytes": sampler.peak,
        "peak_rss_bytes": peak_rss_bytes(),
        "pid": os.getpid(),
        "reused": False,
    }


def write_config_step(spec: ConvertSpec, tag: str, inspected: dict[str, Any]) -> dict[str, Any]:
    """Write `config.json` to OUTPUT (from `inspect_source`'s model config)."""
    from converters.model import ModelConfig
    from converters.trtllm.config import trtllm_config

    config = ModelConfig(**inspected["config"])
    return put_json(spec.output, tag, CONFIG, trtllm_config(config, spec.target))


def source_summary(inspected: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records about a Megatron source (from `inspect_source`)."""
    keys = ("format", "source_tp", "source_pp", "family", "source_bytes", "source_digest")
    return {**{k: inspected[k] for k in keys}, **verification_summary(inspected)}


def _published(ctx: StepContext) -> list[dict[str, Any]]:
    """The files the manifest lists: every rank, config.json, and the engines if built."""
    results, world = ctx.results(), len(ctx.inspected["ranks"])
    files = [results[f"reshard:{r}"] for r in range(world)] + [results["config"]]
    if ctx.spec.engines:
        for r in range(world):
            files.extend(results[f"engine:{r}"]["files"])
    return files


def _engine_builder_problem() -> str | None:
    from tasks.kinds.trtllm_engines import engine_builder_problem

    problem = engine_builder_problem()
    return problem and f"cannot build engines: {problem}"


def _build_engine(ctx: StepContext, rank: int) -> dict[str, Any]:
    from tasks.kinds.trtllm_engines import build_engine_step

    world = len(ctx.inspected["ranks"])
    return build_engine_step(ctx.spec.output, ctx.job, rank, world, ctx.tag)


RESHARD = Phase(
    step="reshard",
    task="porter.reshard",
    count="ranks",
    run=lambda ctx, rank: convert_rank_step(ctx.spec, ctx.tag, rank, ctx.progress),
    body_task="porter.assemble",
    body_id="assemble",
    then=Step("config", lambda ctx: write_config_step(ctx.spec, ctx.tag, ctx.inspected)),
    cost=lambda inspected, r: (
        inspected["ranks"][r]["peak_bytes"],
        inspected["ranks"][r]["bytes_written"],
    ),
)
VERIFY = verify_phase("porter.verify", "porter.verified")
ENGINES = Phase(
    step="engine",
    task="porter.build_engine",
    count="ranks",
    run=_build_engine,
    body_task="porter.publish",
    body_id="publish",
    queue=GPU_QUEUE,
    enabled=lambda spec: spec.engines,
    requires=_engine_builder_problem,
)

# ── the command line ──────────────────────────────────────────────────────────────────────────


def _add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_source_arguments(parser, command)
    parser.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    parser.add_argument(
        "--pp", type=int, default=1, help="target pipeline-parallel size (default 1)"
    )
    parser.add_argument(
        "--parallel-embedding", action="store_true", help="split the vocab embedding over TP ranks"
    )
    parser.add_argument(
        "--moe-ep",
        type=int,
        default=1,
        help="MoE models: expert-parallel ranks within the target TP group; each holds a "
        "contiguous block of experts split over TP / MOE_EP ranks (default 1)",
    )
    parser.add_argument(
        "--architecture",
        choices=DECLARABLE,
        help="declare what the checkpoint's args cannot say: gemma (GeGLU, embeddings scaled by "
        "sqrt(hidden)); default: decided from the args",
    )
    if command == "submit":
        parser.add_argument(
            "--engines", action="store_true", help="also build TensorRT-LLM engines (gpu workers)"
        )


def _spec_from_args(args: argparse.Namespace) -> ConvertSpec:
    return ConvertSpec(
        **source_fields(args),
        tp=args.tp,
        pp=args.pp,
        parallel_embedding=args.parallel_embedding,
        engines=getattr(args, "engines", False),
        moe_ep=args.moe_ep,
        architecture=args.architecture,
    )


def _report(spec: ConvertSpec, summary: Any) -> None:
    """The closing summary of `porter convert megatron-trtllm`."""
    ranks = summary.fanned("reshard")
    print_summary_head(spec, summary, f"TP={spec.tp}, PP={spec.pp}")
    print(
        f"{'rank':>4}  {'bytes':>12}  {'seconds':>8}  {'peak anon':>11}  {'peak rss':>11}  sha256"
    )
    for r in ranks:
        print(
            f"{r['rank']:>4}  {human(r['bytes_written']):>12}  {r['seconds']:>8.2f}  "
            f"{human(r['peak_anon_bytes']):>11}  {human(r['peak_rss_bytes']):>11}  {r['sha256'][:16]}"
            + ("  (reused)" if r.get("reused") else "")
        )
    warn_nonfinite(ranks, lambda r: f"rank {r['rank']}: ")


def _print_plan(inspected: dict[str, Any]) -> None:
    """`porter plan megatron-trtllm`: per rank, what it reads, writes and holds."""
    cfg = inspected["config"]
    print(
        f"{inspected['format']} checkpoint, training TP={inspected['source_tp']} PP={inspected['source_pp']}, "
        f"family {inspected['family']}, {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, {cfg['dtype']}; "
        f"source files {human(inspected['source_bytes'])}"
    )
    if cfg.get("num_experts"):
        print(
            f"mixture of experts: {cfg['num_experts']} experts (top-{cfg['moe_router_topk']}), "
            f"expert FFN {cfg['moe_ffn_hidden_size'] or cfg['ffn_hidden_size']}; expert weights "
            f"(layer x expert) per rank: {', '.join(str(r['experts']) for r in inspected['ranks'])}"
        )
    overhead = Settings.from_env().process_overhead_bytes
    print(f"{'rank':>4}  {'reads':>12}  {'writes':>12}  {'peak tensors':>12}  {'peak memory':>12}")
    for r in inspected["ranks"]:
        print(
            f"{r['rank']:>4}  {human(r['bytes_read']):>12}  {human(r['bytes_written']):>12}  "
            f"{human(r['peak_bytes']):>12}  {human(r['peak_bytes'] + overhead):>12}"
        )
    worst = max(r["peak_bytes"] for r in inspected["ranks"]) + overhead
    print(
        f"a worker process needs about {human(worst)} of RAM per concurrent rank "
        f"(peak tensors + {human(overhead)} for the process itself); "
        f"{len(inspected['ranks'])} ranks can run in parallel"
    )


def _describe(spec: dict[str, Any]) -> str:
    return f"{spec['source']} -> {spec['output']} TP={spec['tp']} PP={spec['pp']}"


KIND_SPEC = register(
    JobKind(
        name=KIND,
        spec_type=ConvertSpec,
        identity=source_identity,
        inspect=inspect_source,
        phases=(RESHARD, VERIFY, ENGINES),
        published=_published,
        source_summary=source_summary,
        progress=lambda record: bytes_progress(record, "reshard", "ranks"),
        checkpoint_field="source",
        cli=KindCli(
            help="Megatron-LM → TensorRT-LLM checkpoint",
            add_arguments=_add_arguments,
            spec_from_args=_spec_from_args,
            report=_report,
            print_plan=_print_plan,
            describe=_describe,
        ),
    )
)
