"""`porter convert|plan|inspect|example`: work on this machine, no servers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.kinds import kind_named


def convert(args: argparse.Namespace) -> int:
    """`porter convert KIND ...`: run the job here (the local executor) with a progress bar."""
    from tqdm import tqdm

    from tasks.executors.local import run_conversion

    kind = kind_named(args.kind)
    if kind.cli.convert is not None:
        return kind.cli.convert(args)
    spec = kind.cli.spec_from_args(args)
    in_bytes = kind.progress_unit == "bytes"
    bar = tqdm(
        total=0,
        unit="B" if in_bytes else "step",
        unit_scale=in_bytes,
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
    kind.cli.report(spec, summary)
    return 0


def plan(args: argparse.Namespace) -> int:
    """`porter plan KIND ...`: inspect the source (metadata only) and print the plan."""
    kind = kind_named(args.kind)
    assert kind.cli.print_plan is not None  # only such kinds have a `plan` parser
    kind.cli.print_plan(kind.inspect(kind.cli.spec_from_args(args)))
    return 0


def inspect(args: argparse.Namespace) -> int:
    """`porter inspect FILE`: what a PowerInfer GPU index puts on the GPU, per layer."""
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


def example(args: argparse.Namespace) -> int:
    """`porter example megatron OUT`: a tiny real checkpoint written by megatron-core."""
    from converters.megatron.example import write_example_checkpoint

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
