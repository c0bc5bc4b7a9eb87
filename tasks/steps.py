"""The steps of a Megatron → TensorRT-LLM job: plain functions with JSON-serialisable inputs and outputs.

Both executors (the local process pool behind `porter convert` and the Celery tasks) call these
and nothing else. SOURCE and OUTPUT are local paths or `s3://` URIs. Every artifact is written at
its final key in OUTPUT, atomically, tagged with the job and the source version (`output_tag`);
`manifest.json`, written last and only if absent, is the commit: OUTPUT without it holds no
finished conversion. Every step is idempotent: a rank whose artifact already carries this job's
tag is returned as it is, and publishing an already committed job returns its manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from converters.errors import ConversionError
from converters.model import ModelConfig
from converters.trtllm.config import trtllm_config
from converters.trtllm.convert import Progress, convert_rank, rank_file_name
from converters.trtllm.families import family_for
from converters.trtllm.plan import check_target, estimate_rank
from tasks import sources
from tasks.jobs import (
    FORMAT_VERSION,
    ConvertSpec,
    identity_digest,
    job_id,
    output_tag,
    porter_version,
    tag_digest,
    tag_job,
)
from tasks.memory import PeakAnonSampler, peak_rss_bytes, reset_peak_rss
from tasks.store import ArtifactStore, open_store

MANIFEST = "manifest.json"
CONFIG = "config.json"


def inspect_source(spec: ConvertSpec) -> dict[str, Any]:
    """Read the source's metadata only: format, model config, identity, per-rank cost estimates."""
    identity = sources.source_identity(spec.source)
    source = sources.open_source(spec.source)
    target = spec.target
    try:
        check_target(source.config, target)
    except ConversionError as exc:
        if exc.path is None:  # name the checkpoint whose shape does not fit
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
        "family": family_for(source.config).name,
        "config": source.config.to_dict(),
        "files": [entry[0] for entry in identity],
        "source_bytes": sum(entry[1] for entry in identity),
        "ranks": [asdict(estimate_rank(source, target, r)) for r in range(target.world_size)],
    }


def prepare_output(spec: Any, job: str) -> dict[str, Any] | None:
    """Check OUTPUT before a job writes to it. Returns the manifest if this job is already
    committed there; removes what killed runs of *other* Porter jobs left (never committed);
    keeps this job's own artifacts for reuse; refuses OUTPUT holding anything else."""
    store = open_store(spec.output)
    manifest = _committed(store, job)
    if manifest is not None:
        return manifest
    foreign = []
    for key in store.list():
        art = store.stat(key)
        owner = tag_job(art.tag) if art else None
        if art is None or owner == job:
            continue
        if owner is not None:  # what a killed run of another Porter job left
            store.delete(key)
        else:
            foreign.append(key)
    if foreign:
        raise ConversionError(
            f"OUTPUT is not empty ({', '.join(sorted(foreign)[:5])}); choose an empty directory",
            store.uri(),
        )
    return None


def _artifact_result(store: ArtifactStore, key: str, tag: str) -> dict[str, Any] | None:
    art = store.stat(key)
    if art is None or art.tag != tag or art.sha256 is None:
        return None
    return {"file": key, "bytes_written": art.bytes, "sha256": art.sha256, "reused": True}


def convert_rank_step(
    spec: ConvertSpec, tag: str, rank: int, progress: Progress | None = None
) -> dict[str, Any]:
    """Write `rank{rank}.safetensors` to OUTPUT (fetching only the source bytes this rank reads)."""
    store = open_store(spec.output)
    key = rank_file_name(rank)
    done = _artifact_result(store, key, tag)
    if done:  # a re-delivered, retried or resumed step
        zero = ("bytes_read", "bytes_fetched", "bytes_cached", "peak_anon_bytes", "peak_rss_bytes")
        return {"rank": rank, "seconds": 0.0, "nonfinite": [], **dict.fromkeys(zero, 0), **done}
    source, fetched = sources.open_source_for_rank(
        spec.source, spec.target, rank, expected_digest=tag_digest(tag)
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
    store = open_store(spec.output)
    config = ModelConfig(**inspected["config"])
    data = (json.dumps(trtllm_config(config, spec.target), indent=2) + "\n").encode()
    sha = hashlib.sha256(data).hexdigest()
    with store.scratch(CONFIG) as tmp:
        tmp.write_bytes(data)
        store.put_file(tmp, CONFIG, sha256=sha, tag=tag, move=True)
    return {"file": CONFIG, "bytes_written": len(data), "sha256": sha}


def source_summary(inspected: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records about a Megatron source (from `inspect_source`)."""
    keys = ("format", "source_tp", "source_pp", "family", "source_bytes", "source_digest")
    return {k: inspected[k] for k in keys}


def publish_step(
    spec: Any, job: str, tag: str, source: dict[str, Any], files: list[dict[str, Any]]
) -> dict[str, Any]:
    """Check every file against its recorded sha256 and tag, then commit by writing
    `manifest.json` (only if absent) with the spec, `source` and the files. Returns the
    committed manifest. `spec` is any job spec with `output` and `to_dict()`."""
    store = open_store(spec.output)
    committed = _committed(store, job)
    if committed is not None:  # a re-delivered publish
        return committed
    for entry in files:
        art = store.stat(entry["file"])
        if art is None or art.tag != tag or art.sha256 != entry["sha256"]:
            raise ConversionError(
                f"{entry['file']} is missing or was replaced before publishing "
                f"(expected sha256 {entry['sha256'][:16]}…, tag {tag})",
                store.uri(entry["file"]),
            )
    manifest = {
        "job_id": job,
        "porter_version": porter_version(),
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "source": source,
        "files": [
            {"path": e["file"], "bytes": e["bytes_written"], "sha256": e["sha256"]} for e in files
        ],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if store.put_json_if_absent(MANIFEST, manifest):
        store.seal([e["file"] for e in files])
        return manifest
    return _committed(store, job) or manifest  # a concurrent duplicate committed it first


def _committed(store: ArtifactStore, job: str) -> dict[str, Any] | None:
    """The manifest in OUTPUT if `job` committed it, None if there is none; an error if another
    job did."""
    manifest = store.get_json(MANIFEST)
    if manifest is None or manifest.get("job_id") == job:
        return manifest
    raise ConversionError(
        "OUTPUT already holds another conversion (manifest.json); choose an empty directory",
        store.uri(MANIFEST),
    )


def remove_outputs(spec: Any, job: str, keep: Callable[[str], bool] | None = None) -> int:
    """Delete the uncommitted artifacts of `job` in OUTPUT (except those `keep` names); never
    touches a committed job. Returns how many were deleted."""
    store = open_store(spec.output)
    manifest = store.get_json(MANIFEST)
    if manifest is not None and manifest.get("job_id") == job:
        return 0
    deleted = 0
    for key in store.list():
        art = store.stat(key)
        if art is not None and tag_job(art.tag) == job and not (keep and keep(key)):
            store.delete(key)
            deleted += 1
    return deleted
