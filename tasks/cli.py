"""`porter` command line: convert, plan, and write example checkpoints."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from converters.errors import ConversionError
from converters.model import DTYPES
from tasks.jobs import ConvertSpec


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


def _spec(args: argparse.Namespace, output: str) -> ConvertSpec:
    return ConvertSpec(
        source=str(Path(args.source).resolve()),
        output=str(Path(output).resolve()),
        tp=args.tp,
        pp=args.pp,
        dtype=args.dtype,
        parallel_embedding=args.parallel_embedding,
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

    plan = commands.add_parser(
        "plan", help="show what a conversion will read, write and hold, per rank"
    )
    plan_kinds = plan.add_subparsers(dest="kind", required=True)
    plan_megatron = plan_kinds.add_parser(
        "megatron-trtllm", help="Megatron-LM → TensorRT-LLM checkpoint"
    )
    plan_megatron.add_argument("source")
    _add_target_options(plan_megatron)

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
        )
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
    print(f"{'rank':>4}  {'reads':>12}  {'writes':>12}  {'peak tensors':>12}")
    for r in inspected["ranks"]:
        print(
            f"{r['rank']:>4}  {_human(r['bytes_read']):>12}  {_human(r['bytes_written']):>12}  {_human(r['peak_bytes']):>12}"
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `porter` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    handlers = {"convert": _convert, "plan": _plan, "example": _example}
    try:
        return handlers[args.command](args)
    except ConversionError as exc:
        print(f"porter: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as exc:
        if os.environ.get("PORTER_DEBUG"):
            raise
        print(f"porter: error: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("porter: interrupted; nothing was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
