"""`porter verify SOURCE EXPORT`: run the same random token ids through the Megatron source and
a finished export, one layer at a time, and say whether (and where) they differ."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tasks.kinds.base import local_location


def add_command(commands: Any) -> None:
    """The `verify` subcommand."""
    parser = commands.add_parser(
        "verify",
        help="prove an export computes what its Megatron source computes (CPU, layer by layer)",
    )
    parser.add_argument("source", help="Megatron checkpoint: a local path or s3://bucket/prefix")
    parser.add_argument(
        "export",
        help="a finished TensorRT-LLM or Hugging Face export (with manifest.json): a local "
        "path or s3://bucket/prefix",
    )
    parser.add_argument(
        "--tokens", type=int, default=16, help="random token ids run through both (default 16)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the token ids (default 0)")
    parser.add_argument(
        "--tolerance",
        default="auto",
        help="largest relative difference accepted: auto (from the dtypes: 1e-4 when the export "
        "holds the source's values, more when it rounded them to bf16/fp16) or a number",
    )
    parser.add_argument(
        "--cross-check",
        action="store_true",
        help="Hugging Face exports: also run every layer through transformers' own modules "
        "(when transformers is installed; dense Llama, Qwen2, Qwen3)",
    )
    parser.add_argument(
        "--architecture",
        choices=("gemma",),
        help="declare what the source's args cannot say (as for convert): gemma",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_tolerance(text: str) -> float | None:
    """None for "auto", else a positive number."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--tolerance {text!r}: give auto or a number such as 1e-4") from None
    if not value > 0:
        raise ValueError(f"--tolerance {text!r}: must be positive")
    return value


def verify(args: argparse.Namespace) -> int:
    """Run the verification; exit 0 only when every stage agrees within the tolerance."""
    from tqdm import tqdm

    from converters.verify import cross_check_export, verify_export
    from tasks.storage.verify_inputs import local_export, open_verify_source

    tolerance = parse_tolerance(args.tolerance)
    source_uri = local_location(args.source, "SOURCE")
    export_uri = local_location(args.export, "EXPORT")
    source = open_verify_source(source_uri, architecture=args.architecture)
    bar = tqdm(
        total=source.config.num_layers + 2,
        unit="stage",
        desc="verifying",
        disable=True if (args.quiet or args.json) else None,
        file=sys.stderr,
    )
    if not args.json:
        print(f"{'stage':<22}  {'max abs':>10}  {'relative':>10}  result")

    def on_stage(stage: Any, done: int, total: int) -> None:
        if not args.json:
            bad = next((p.part for p in stage.parts if not p.ok), None)
            result = "ok" if bad is None else f"DIFFERS ({bad})"
            where = f"  {stage.where}" if stage.where else ""
            bar.write(
                f"{stage.label:<22}  {stage.max_abs:>10.3g}  {stage.relative:>10.3g}  {result}{where}"
            )
        bar.update(1)

    options = {"tokens": args.tokens, "seed": args.seed, "tolerance": tolerance}
    checked = None
    try:
        with local_export(export_uri) as directory:
            report = verify_export(source, directory, on_stage=on_stage, **options)
            if args.cross_check:
                if not args.json:
                    bar.write("cross-check: transformers computes each layer of the export")
                bar.reset(total=source.config.num_layers + 2)
                checked = cross_check_export(source, directory, on_stage=on_stage, **options)
    finally:
        bar.close()
    report.export = export_uri
    if args.cross_check and checked is None:
        print("porter: transformers is not installed: no cross-check", file=sys.stderr)
    if args.json:
        data = report.to_dict()
        if checked is not None:
            data["cross_check"] = checked.to_dict()
        print(json.dumps(data, indent=2))
    failure = report.failure() or (checked.failure() if checked else None)
    if failure:
        print(f"porter: verification failed: {failure}", file=sys.stderr)
        return 1
    if not args.json:
        print(
            f"verified: {export_uri} computes what {source_uri} computes "
            f"({len(report.tokens)} tokens, seed {args.seed}, tolerance {report.tolerance:g})"
            + ("; transformers' own layers agree" if checked else "")
        )
    return 0
