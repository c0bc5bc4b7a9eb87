"""OUTPUT's life cycle, the same for every job kind: checked before a job writes, committed by
`manifest.json` written last (only if absent), cleaned of a failed or cancelled job's files.

Every artifact is written at its final key in OUTPUT, atomically, tagged with the job and the source
version (`output_tag`); OUTPUT without `manifest.json` holds no finished job. Publishing an already
committed job returns its manifest, so a re-delivered publish is harmless.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

from converters.errors import ConversionError
from tasks.jobs.ids import FORMAT_VERSION, porter_version, tag_job
from tasks.storage.base import ArtifactStore
from tasks.storage.store import open_store

MANIFEST = "manifest.json"


class OutputHeld(ConversionError):
    """OUTPUT is held by another job that has not ended."""


def output_held(holder: str, state: str, where: str) -> OutputHeld:
    """The refusal of a job whose OUTPUT another job, `holder` (in `state`), is writing."""
    return OutputHeld(
        f"OUTPUT is being written by job {holder} ({state}); wait for it to end, cancel it, or "
        "choose another OUTPUT",
        where,
    )


def prepare_output(
    spec: Any, job: str, busy: Callable[[str], str | None] | None = None
) -> dict[str, Any] | None:
    """Check OUTPUT before a job writes to it. Returns the manifest if this job is already
    committed there; removes what killed runs of *other* Porter jobs left (never committed);
    keeps this job's own artifacts for reuse; refuses OUTPUT holding anything else, or files of
    another job that `busy(job)` says is still going (its state; None once it ended)."""
    store = open_store(spec.output)
    manifest = _committed(store, job)
    if manifest is not None:
        return manifest
    foreign, leftovers = [], []
    for key in store.list():
        art = store.stat(key)
        owner = tag_job(art.tag) if art else None
        if art is None or owner == job:
            continue
        if owner is None:
            foreign.append(key)
            continue
        state = busy(owner) if busy is not None else None
        if state is not None:
            raise output_held(owner, state, store.uri())
        leftovers.append(key)  # what a killed run of another Porter job left
    if foreign:
        raise ConversionError(
            f"OUTPUT is not empty ({len(foreign)} file(s) Porter did not write); choose an "
            "empty directory",
            store.uri(),
        )
    for key in leftovers:
        store.delete(key)
    return None


def artifact_result(store: ArtifactStore, key: str, tag: str) -> dict[str, Any] | None:
    """The result of a step whose artifact `key` is already in OUTPUT with this job's `tag`."""
    art = store.stat(key)
    if art is None or art.tag != tag or art.sha256 is None:
        return None
    return {"file": key, "bytes_written": art.bytes, "sha256": art.sha256, "reused": True}


def put_bytes(store: ArtifactStore, key: str, data: bytes, tag: str) -> dict[str, Any]:
    """Write a small artifact (a config, a provenance record) as `key`, atomically and tagged;
    the step result that lists it in the manifest."""
    sha = hashlib.sha256(data).hexdigest()
    with store.scratch(key) as tmp:
        tmp.write_bytes(data)
        store.put_file(tmp, key, sha256=sha, tag=tag, move=True)
    return {"file": key, "bytes_written": len(data), "sha256": sha}


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
    _check_nothing_else(store, job, files)
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


def _check_nothing_else(store: ArtifactStore, job: str, files: list[dict[str, Any]]) -> None:
    """Refuse to commit OUTPUT holding a file the manifest would not list that is not this
    job's own (an intermediate it removes after publishing): another writer's file must never
    look like part of a committed output."""
    listed = {entry["file"] for entry in files}
    strays = []
    for key in store.list():
        if key in listed or key == MANIFEST:
            continue
        art = store.stat(key)
        if art is None or tag_job(art.tag) != job:
            strays.append(key)
    if strays:
        raise ConversionError(
            f"OUTPUT holds {len(strays)} file(s) this job did not write and its manifest "
            "would not list; not committing",
            store.uri(),
        )


def check_writable(spec: Any, job: str) -> dict[str, Any] | None:
    """Before a step of `job` writes into OUTPUT: an error if another job committed OUTPUT;
    the manifest if `job` itself did (nothing may be written any more), else None."""
    return _committed(open_store(spec.output), job)


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


def manifest_uri(spec: Any) -> str:
    """Where the job's `manifest.json` is (or will be)."""
    return open_store(spec.output).uri(MANIFEST)
