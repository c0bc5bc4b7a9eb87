"""Batch files for `porter submit --batch`: many job specs, checked together before any is queued.

YAML or JSON (YAML is a superset): a list of job specs, or `{jobs: [...]}`. Each entry is the
JSON of POST /v1/jobs (`kind` plus the spec's fields, and optionally an `iteration`, which points
SOURCE at that iteration's directory: `tasks.jobs.iterations`); locations are s3:// URIs or
absolute paths.

    - {kind: megatron-trtllm, source: s3://ckpts/llama/iter_0003000, output: s3://out/tp2, tp: 2}
    - {kind: megatron-trtllm, source: s3://ckpts/llama/iter_0003000, output: s3://out/tp8, tp: 8}
    - {kind: megatron-hf, source: s3://ckpts/llama/, iteration: 3000, output: s3://out/hf}
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tasks.jobs.checks import InvalidSpec
from tasks.jobs.iterations import parse_job
from tasks.jobs.specs import JobSpec

MAX_BATCH_BYTES = 16 * 2**20
MAX_JOBS = 10_000
_SHOWN_ERRORS = 10


def read_batch(path: str | Path) -> list[tuple[JobSpec, dict[str, str]]]:
    """Every job spec of the batch file, with the labels to store with it ({"iteration": ...}
    where an entry gives one); InvalidSpec naming the file and each bad entry (all of them, up to
    ten) if any entry is invalid, so nothing is queued from a half-good file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BATCH_BYTES:
            raise InvalidSpec(f"{path}: larger than {MAX_BATCH_BYTES // 2**20} MiB")
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InvalidSpec(f"{path}: cannot read the batch file: {exc}") from None
    if isinstance(data, dict) and set(data) == {"jobs"}:
        data = data["jobs"]
    if not isinstance(data, list) or not data:
        raise InvalidSpec(f"{path}: expected a non-empty list of job specs (or {{jobs: [...]}})")
    if len(data) > MAX_JOBS:
        raise InvalidSpec(f"{path}: {len(data)} jobs; at most {MAX_JOBS} per batch")
    specs, errors = [], []
    for number, entry in enumerate(data, start=1):
        try:
            specs.append(parse_job(entry))
        except InvalidSpec as exc:
            errors.append(f"entry {number}: {exc}")
    if errors:
        more = (
            f"\n  ... and {len(errors) - _SHOWN_ERRORS} more" if len(errors) > _SHOWN_ERRORS else ""
        )
        shown = "\n  ".join(errors[:_SHOWN_ERRORS])
        raise InvalidSpec(
            f"{path}: {len(errors)} invalid job spec(s); nothing was submitted:\n  {shown}{more}"
        )
    return specs
