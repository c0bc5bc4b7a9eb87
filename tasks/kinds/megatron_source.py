"""What the job kinds that read a Megatron checkpoint share: their spec checks, their inspect step
(identity, format, model config; the kind adds its plan), their command-line options and the head
of their closing summary. Not a job kind itself."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from converters.choices import DTYPE_NAMES, NONFINITE_POLICIES
from converters.errors import ConversionError
from tasks.jobs.checks import InvalidSpec, check_bool, check_location, show
from tasks.jobs.ids import identity_digest, job_id, output_tag
from tasks.jobs.outputs import put_bytes
from tasks.kinds.base import human, human_rate, local_location
from tasks.kinds.verify_step import verification_line
from tasks.storage.store import open_store

if TYPE_CHECKING:  # the readers import numpy: only the steps that read a checkpoint load them
    from converters.megatron.layout import SourceCheckpoint


def check_source_spec(spec: Any, kind: str) -> None:
    """The checks every Megatron-source spec needs: its kind, SOURCE and OUTPUT (not inside
    SOURCE), `dtype` and `nonfinite`; InvalidSpec names what is wrong."""
    if spec.kind != kind:
        raise InvalidSpec(f"kind must be {kind!r}, got {show(spec.kind)}")
    check_location(spec.source, "SOURCE")
    check_location(spec.output, "OUTPUT")
    if spec.output == spec.source or spec.output.startswith(spec.source.rstrip("/") + "/"):
        raise InvalidSpec(f"OUTPUT {show(spec.output)} lies inside SOURCE")
    if spec.dtype is not None and spec.dtype not in DTYPE_NAMES:
        raise InvalidSpec(f"dtype {show(spec.dtype)} is not one of {', '.join(DTYPE_NAMES)}")
    if spec.nonfinite not in NONFINITE_POLICIES:
        raise InvalidSpec(
            f"nonfinite {show(spec.nonfinite)} is not one of {', '.join(NONFINITE_POLICIES)}"
        )
    check_bool(spec.verify, "verify")


def source_architecture(spec: Any) -> str | None:
    """What the spec declares the source to be where its args cannot say (None: decided from
    the args): `architecture` "gemma" (megatron-trtllm), or the Gemma class (megatron-hf)."""
    from converters.megatron.declare import declaration_of

    return declaration_of(getattr(spec, "architecture", None))


def inspect_megatron(spec: Any, plan: Callable[[SourceCheckpoint], dict[str, Any]]) -> dict:
    """Read the source's metadata only: identity, format, model config, and what `plan(source)`
    adds (the kind's per-step plan; its errors are made to name the checkpoint)."""
    from tasks.storage import sources

    identity = sources.source_identity(spec.source)
    source = sources.open_source(spec.source, architecture=source_architecture(spec))
    try:
        planned = plan(source)
    except ConversionError as exc:
        if exc.path is None:  # name the checkpoint that does not fit
            raise type(exc)(str(exc), spec.source) from None
        raise
    job, digest = job_id(spec, identity), identity_digest(identity)
    return {
        "job_id": job,
        "tag": output_tag(job, digest),
        "source_digest": digest,
        "format": source.format,
        "source_tp": source.tp,
        "source_pp": source.pp,
        "config": source.config.to_dict(),
        "files": [entry[0] for entry in identity],
        "source_bytes": sum(entry[1] for entry in identity),
        **planned,
    }


def source_identity(spec: Any) -> list[list]:
    """The identity of a spec's SOURCE from listings (`JobKind.identity`; no weights read)."""
    from tasks.storage import sources

    return sources.source_identity(spec.source)


def put_json(output: str, tag: str, key: str, data: dict[str, Any]) -> dict[str, Any]:
    """Write `data` as `key` in OUTPUT (atomically, tagged); the step result of that file."""
    return put_bytes(open_store(output), key, (json.dumps(data, indent=2) + "\n").encode(), tag)


def add_source_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """SOURCE (and OUTPUT, but for `plan`), `--dtype` and `--nonfinite`."""
    where = "a path the workers see" if command == "submit" else "a local path"
    parser.add_argument(
        "source",
        help=f"Megatron checkpoint (root or iteration directory; legacy or torch_dist): "
        f"s3://bucket/prefix or {where}",
    )
    if command != "plan":
        parser.add_argument("output", help=f"output (must be empty): s3://bucket/prefix or {where}")
    parser.add_argument(
        "--dtype", choices=list(DTYPE_NAMES), help="output dtype (default: the checkpoint's)"
    )
    parser.add_argument(
        "--nonfinite",
        choices=list(NONFINITE_POLICIES),
        default="warn",
        help="NaN/infinite weights: list them in the summary (warn, default) or fail (error)",
    )
    if command != "plan":
        parser.add_argument(
            "--verify",
            action="store_true",
            help="before publishing, run `porter verify` on the export; a difference fails the job",
        )


def source_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The spec fields `add_source_arguments` gives (OUTPUT is "-" for `plan`)."""
    output = getattr(args, "output", "-")
    return {
        "source": local_location(args.source, "SOURCE"),
        "output": output if output == "-" else local_location(output, "OUTPUT"),
        "dtype": args.dtype,
        "nonfinite": args.nonfinite,
        "verify": getattr(args, "verify", False),
    }


def print_summary_head(spec: Any, summary: Any, what: str) -> None:
    """The first lines of `porter convert`'s closing summary: what, time, bytes and rate."""
    rate = human_rate(summary.bytes_written, summary.seconds)
    print(f"converted {spec.source} -> {summary.output} ({what}) job {summary.job_id}")
    print(
        f"{summary.seconds:.2f} s, {summary.workers} worker(s); read {human(summary.bytes_read)}, "
        f"wrote {human(summary.bytes_written)}" + (f" ({rate})" if rate else "")
    )
    verified = verification_line(summary.results)
    if verified:
        print(verified)


def warn_nonfinite(results: list[dict[str, Any]], where: Callable[[dict[str, Any]], str]) -> None:
    """On stderr, one line per tensor with NaN/infinite values that the steps (`results`) found
    and kept (`--nonfinite warn`); `where(result)` says which step, e.g. "rank 1: "."""
    for result in results:
        for found in result.get("nonfinite", []):
            print(
                f"warning: {where(result)}{found['tensor']} has {found['count']} NaN/infinite "
                f"value(s) (from {', '.join(found['files'])}); --nonfinite error refuses them",
                file=sys.stderr,
            )
