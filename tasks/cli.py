"""`porter` command line: convert, plan, and write example checkpoints."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import redis

from converters.errors import ConversionError
from converters.model import DTYPES
from tasks import cli_queue, cli_schedule
from tasks.jobs import ConvertSpec, check_location
from tasks.powerinfer_index import IndexSpec


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    parser.add_argument(
        "--pp", type=int, default=1, help="target pipeline-parallel size (default 1)"
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), help="output dtype (default: the checkpoint's)"
    )
    parser.add_argument(
        "--parallel-embedding", action="store_true", help="split the vocab embedding over TP ranks"
    )
    parser.add_argument(
        "--nonfinite",
        choices=["warn", "error"],
        default="warn",
        help="NaN/infinite weights: list them in the summary (warn, default) or fail (error)",
    )


def _location(text: str, what: str) -> str:
    """An s3:// URI as given, a local path made absolute; checked (NUL, '..', bucket names)."""
    check_location(text, what)
    return text if text.startswith("s3://") else str(Path(text).resolve())


def _spec(args: argparse.Namespace, output: str) -> ConvertSpec:
    return ConvertSpec(
        source=_location(args.source, "SOURCE"),
        output=output if output == "-" else _location(output, "OUTPUT"),
        tp=args.tp,
        pp=args.pp,
        dtype=args.dtype,
        parallel_embedding=args.parallel_embedding,
        engines=getattr(args, "engines", False),
        nonfinite=args.nonfinite,
    )


def _add_index_options(index: argparse.ArgumentParser) -> None:
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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="porter", description="Move trained LLM checkpoints to where they are served."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert", help="convert a checkpoint on this machine (no servers)"
    )
    convert_kinds = convert.add_subparsers(dest="kind", required=True)
    megatron = convert_kinds.add_parser(
        "megatron-trtllm", help="Megatron-LM → TensorRT-LLM checkpoint"
    )
    megatron.add_argument(
        "source", help="Megatron checkpoint (root, iteration directory; legacy or torch_dist)"
    )
    megatron.add_argument("output", help="output directory (created; must be empty)")
    _add_target_options(megatron)
    megatron.add_argument(
        "--workers", type=int, help="rank processes in parallel (default: what fits RAM and cores)"
    )
    megatron.add_argument("--quiet", action="store_true", help="no progress bar")

    index = convert_kinds.add_parser(
        "powerinfer-index",
        help="PowerInfer activation statistics → GPU index file(s) PowerInfer loads",
    )
    _add_index_options(index)

    inspect = commands.add_parser(
        "inspect", help="print what a PowerInfer GPU index puts on the GPU"
    )
    inspect.add_argument("file", help="a .gpuidx file (PWRI)")
    inspect.add_argument(
        "--activations",
        help="activation directory, to show the share of activation mass on the GPU",
    )

    plan = commands.add_parser(
        "plan", help="show what a conversion will read, write and hold, per rank"
    )
    plan_kinds = plan.add_subparsers(dest="kind", required=True)
    plan_megatron = plan_kinds.add_parser(
        "megatron-trtllm", help="Megatron-LM → TensorRT-LLM checkpoint"
    )
    plan_megatron.add_argument("source")
    _add_target_options(plan_megatron)

    cli_queue.add_commands(commands, _add_target_options, _add_index_options)
    cli_schedule.add_commands(commands)

    example = commands.add_parser("example", help="write a small real checkpoint to try Porter on")
    example_kinds = example.add_subparsers(dest="kind", required=True)
    example_megatron = example_kinds.add_parser(
        "megatron", help="a tiny Megatron-LM checkpoint written by megatron-core"
    )
    example_megatron.add_argument("output", help="checkpoint root to create")
    example_megatron.add_argument("--family", choices=["llama", "gpt"], default="llama")
    example_megatron.add_argument(
        "--tp", type=int, default=2, help="training tensor-parallel size (default 2)"
    )
    example_megatron.add_argument(
        "--pp", type=int, default=1, help="training pipeline-parallel size (default 1)"
    )
    example_megatron.add_argument("--format", choices=["legacy", "torch_dist"], default="legacy")
    example_megatron.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint already at OUTPUT"
    )
    return parser


def _convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tasks.executors.local import run_conversion

    spec = _spec(args, args.output)
    bar = tqdm(
        total=0,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="converting",
        disable=True if args.quiet else None,
        file=sys.stderr,
    )

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        summary = run_conversion(spec, workers=args.workers, on_progress=on_progress)
    finally:
        bar.close()
    if summary.already_done:
        print(f"{summary.output}: already converted (job {summary.job_id}); nothing to do")
        return 0
    rate = summary.bytes_written / summary.seconds / 1e9 if summary.seconds else 0.0
    print(
        f"converted {spec.source} -> {summary.output} (TP={spec.tp}, PP={spec.pp}) job {summary.job_id}"
    )
    print(
        f"{summary.seconds:.2f} s, {summary.workers} worker(s); read {_human(summary.bytes_read)}, "
        f"wrote {_human(summary.bytes_written)} ({rate:.2f} GB/s)"
    )
    print(
        f"{'rank':>4}  {'bytes':>12}  {'seconds':>8}  {'peak anon':>11}  {'peak rss':>11}  sha256"
    )
    for r in summary.ranks:
        print(
            f"{r['rank']:>4}  {_human(r['bytes_written']):>12}  {r['seconds']:>8.2f}  "
            f"{_human(r['peak_anon_bytes']):>11}  {_human(r['peak_rss_bytes']):>11}  {r['sha256'][:16]}"
            + ("  (reused)" if r.get("reused") else "")
        )
    for r in summary.ranks:
        for found in r.get("nonfinite", []):
            print(
                f"warning: rank {r['rank']}: {found['tensor']} has {found['count']} NaN/infinite "
                f"value(s) (from {', '.join(found['files'])}); --nonfinite error refuses them",
                file=sys.stderr,
            )
    return 0


def _index_budgets(args: argparse.Namespace) -> tuple:
    from converters.powerinfer.solver import capacity_from_vram
    from tasks.powerinfer_index import IndexBudget

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
        capacity = capacity_from_vram(
            budget, n_embd=args.n_embd, bytes_per_weight=args.weight_bytes, gated=args.gated
        )
        budgets.append(IndexBudget(vram, capacity=capacity.neurons, formula=capacity.formula))
    return tuple(budgets)


def _index_spec(args: argparse.Namespace) -> IndexSpec:
    return IndexSpec(
        activations=_location(args.activations, "ACTIVATIONS"),
        output=_location(args.output, "OUTPUT"),
        budgets=_index_budgets(args),
        batch=args.batch,
        threshold=args.threshold,
    )


def _convert_index(args: argparse.Namespace) -> int:
    from tasks.powerinfer_index import export_gpu_indices

    if args.activations.startswith("s3://") or args.output.startswith("s3://"):
        raise ConversionError(
            "porter convert powerinfer-index works on local paths; for s3:// use "
            "`porter submit powerinfer-index`"
        )
    spec = _index_spec(args)
    for result in export_gpu_indices(spec):
        print(
            f"{result['path']}: {sum(result['counts'])} GPU neurons over {len(result['counts'])} layers "
            f"({result['method']}, capacity {result['capacity']}, {result['capacity_formula']}), "
            f"coverage {result['coverage']:.2%}, sha256 {result['sha256'][:16]}"
        )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from converters.powerinfer.activations import load_activations
    from converters.powerinfer.gpuindex import read_gpu_index, summarize

    index = read_gpu_index(Path(args.file))
    values = load_activations(Path(args.activations)).values if args.activations else None
    print(
        f"{args.file}: {len(index.layers)} layers, "
        + ", ".join(f"{k}={v[1]}" for k, v in index.kv.items())
    )
    print(f"{'layer':>5}  {'n_ff':>7}  {'gpu':>7}  {'mass on gpu':>11}")
    for row in summarize(index, values):
        share = "" if row.mass_share is None else f"{row.mass_share:.2%}"
        print(f"{row.layer:>5}  {row.n_ff:>7}  {row.gpu_neurons:>7}  {share:>11}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from tasks import steps

    inspected = steps.inspect_source(_spec(args, "-"))
    cfg = inspected["config"]
    print(
        f"{inspected['format']} checkpoint, training TP={inspected['source_tp']} PP={inspected['source_pp']}, "
        f"family {inspected['family']}, {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, {cfg['dtype']}; "
        f"source files {_human(inspected['source_bytes'])}"
    )
    from config.settings import Settings

    overhead = Settings.from_env().process_overhead_bytes
    print(f"{'rank':>4}  {'reads':>12}  {'writes':>12}  {'peak tensors':>12}  {'peak memory':>12}")
    for r in inspected["ranks"]:
        print(
            f"{r['rank']:>4}  {_human(r['bytes_read']):>12}  {_human(r['bytes_written']):>12}  "
            f"{_human(r['peak_bytes']):>12}  {_human(r['peak_bytes'] + overhead):>12}"
        )
    worst = max(r["peak_bytes"] for r in inspected["ranks"]) + overhead
    print(
        f"a worker process needs about {_human(worst)} of RAM per concurrent rank "
        f"(peak tensors + {_human(overhead)} for Python and torch); "
        f"{len(inspected['ranks'])} ranks can run in parallel"
    )
    return 0


def _example(args: argparse.Namespace) -> int:
    from tasks.megatron_example import write_example_checkpoint

    existing = Path(args.output) / "latest_checkpointed_iteration.txt"
    if existing.exists() and not args.overwrite:
        print(
            f"{args.output} already holds a checkpoint; left as is (--overwrite writes a new one)"
        )
        return 0
    path = write_example_checkpoint(
        Path(args.output), family=args.family, tp=args.tp, pp=args.pp, format=args.format
    )
    print(f"wrote a {args.format} {args.family} checkpoint (TP={args.tp}, PP={args.pp}) to {path}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    if args.batch_file:
        if args.kind:
            raise ConversionError("give either --batch FILE or one job, not both")
        return cli_queue.submit_batch(args)
    if args.kind is None:
        raise ConversionError("porter submit: give a job kind (megatron-trtllm, ...) or --batch")
    spec = _index_spec(args) if args.kind == "powerinfer-index" else _spec(args, args.output)
    return cli_queue.submit(args, spec)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `porter` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    handlers = {
        "convert": _convert,
        "plan": _plan,
        "example": _example,
        "inspect": _inspect,
        "submit": _submit,
        "status": cli_queue.status,
        "jobs": cli_queue.jobs,
        "cancel": cli_queue.cancel,
        "retry": cli_queue.retry,
        "worker": cli_queue.worker,
        "serve": cli_queue.serve,
        "schedule": cli_schedule.schedule,
        "beat": cli_schedule.beat,
    }
    if args.command == "convert" and args.kind == "powerinfer-index":
        handlers["convert"] = _convert_index
    try:
        return handlers[args.command](args)
    except ConversionError as exc:
        print(f"porter: error: {exc}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        if os.environ.get("PORTER_DEBUG"):
            raise
        from config.settings import Settings

        url = re.sub(r"//[^@/]*@", "//***@", Settings.from_env().redis_url)  # no password
        print(f"porter: error: Redis at {url} (PORTER_REDIS_URL): {exc}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError, ValueError) as exc:
        if os.environ.get("PORTER_DEBUG"):
            raise
        where = getattr(exc, "filename", None)
        text = f"{where}: {exc}" if where and str(where) not in str(exc) else str(exc)
        print(f"porter: error: {text}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("porter: interrupted; nothing was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
