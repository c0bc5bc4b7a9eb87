"""The steps of a Megatron → TensorRT-LLM job: plain functions with JSON-serialisable inputs and outputs.

Executors (the local process pool today, Celery tomorrow) call these and nothing else. Every step
is idempotent: it writes under the job's staging directory, and a step that finds its output
already committed returns the recorded result instead of redoing the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from converters.errors import ConversionError
from converters.megatron.layout import open_checkpoint
from converters.model import ModelConfig
from converters.trtllm.config import trtllm_config
from converters.trtllm.convert import Progress, convert_rank, rank_file_name
from converters.trtllm.families import family_for
from converters.trtllm.plan import check_target, estimate_rank
from tasks.jobs import FORMAT_VERSION, ConvertSpec, job_id, porter_version
from tasks.memory import PeakAnonSampler, peak_rss_bytes, reset_peak_rss

MANIFEST = "manifest.json"
CONFIG = "config.json"


def staging_dir(spec: ConvertSpec, job: str) -> Path:
    """Where a job's files are written before they are published (inside OUTPUT, hidden)."""
    return Path(spec.output) / f".porter-staging-{job}"


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)


def inspect_source(spec: ConvertSpec) -> dict[str, Any]:
    """Read the source's metadata only: format, model config, files, per-rank cost estimates."""
    source = open_checkpoint(Path(spec.source))
    target = spec.target
    try:
        check_target(source.config, target)
    except ConversionError as exc:
        if exc.path is None:  # name the checkpoint whose shape does not fit
            raise type(exc)(str(exc), source.path) from None
        raise
    files = source.files()
    return {
        "job_id": job_id(spec, files),
        "format": source.format,
        "source_tp": source.tp,
        "source_pp": source.pp,
        "family": family_for(source.config).name,
        "config": source.config.to_dict(),
        "files": [str(f) for f in files],
        "source_bytes": sum(f.stat().st_size for f in files),
        "ranks": [asdict(estimate_rank(source, target, r)) for r in range(target.world_size)],
    }


def convert_rank_step(
    spec: ConvertSpec, job: str, rank: int, progress: Progress | None = None
) -> dict[str, Any]:
    """Write `rank{rank}.safetensors` into the job's staging directory and record its result."""
    staging = staging_dir(spec, job)
    record = staging / f"rank{rank}.result.json"
    final = staging / rank_file_name(rank)
    if record.is_file() and final.is_file():  # already done (a re-delivered or retried step)
        return json.loads(record.read_text())
    partial = staging / (rank_file_name(rank) + ".partial")
    source = open_checkpoint(Path(spec.source))
    reset_peak_rss()
    try:
        with PeakAnonSampler() as sampler:
            result = convert_rank(source, spec.target, rank, partial, progress)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(final)
    data = {
        **asdict(result),
        "file": final.name,
        "peak_anon_bytes": sampler.peak,
        "peak_rss_bytes": peak_rss_bytes(),
        "pid": os.getpid(),
    }
    _write_json_atomic(record, data)
    return data


def write_config_step(spec: ConvertSpec, job: str, inspected: dict[str, Any]) -> dict[str, Any]:
    """Write `config.json` into the job's staging directory (from `inspect_source`'s config)."""
    path = staging_dir(spec, job) / CONFIG
    config = ModelConfig(**inspected["config"])
    text = json.dumps(trtllm_config(config, spec.target), indent=2) + "\n"
    path.write_text(text)
    data = text.encode()
    return {"file": CONFIG, "bytes_written": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def publish_step(
    spec: ConvertSpec, job: str, inspected: dict, files: list[dict[str, Any]]
) -> dict[str, Any]:
    """Move the staged files into OUTPUT and commit by writing `manifest.json` last."""
    output, staging = Path(spec.output), staging_dir(spec, job)
    for entry in files:
        staged = staging / entry["file"]
        if staged.exists():
            staged.replace(output / entry["file"])
        elif not (output / entry["file"]).exists():
            raise FileNotFoundError(f"{staged}: staged file vanished before publishing")
    manifest = {
        "job_id": job,
        "porter_version": porter_version(),
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "source": {
            k: inspected[k] for k in ("format", "source_tp", "source_pp", "family", "source_bytes")
        },
        "files": [
            {"path": e["file"], "bytes": e["bytes_written"], "sha256": e["sha256"]} for e in files
        ],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json_atomic(output / MANIFEST, manifest)
    shutil.rmtree(staging, ignore_errors=True)
    return manifest
