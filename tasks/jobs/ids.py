"""Content-derived job ids and the artifact tags that name a job and its source version."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

FORMAT_VERSION = 1  # bump when the bytes Porter writes for the same input change


def porter_version() -> str:
    """The installed Porter's version (written into manifests), "0+source" from a source tree.
    importlib.metadata is imported here, not at the top: it costs the light commands (`porter
    status`, `jobs`, `--help`) about 15 ms, and only a publish asks for the version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("porter")
    except PackageNotFoundError:  # running from a source tree
        return "0+source"


def identity_digest(identity: list) -> str:
    """A short digest of a source identity ([[name, size, version], ...])."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def job_id(spec: Any, identity: list) -> str:
    """Same spec (destination included) + same source files (names, sizes, versions) + same Porter
    format = same id."""
    payload = {
        "spec": spec.to_dict(),
        "source": identity,
        "format_version": FORMAT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{spec.kind}-{digest[:16]}"


_JOB_ID = r"[a-z][a-z0-9-]{0,63}-[0-9a-f]{16}"  # what `job_id` makes: the kind, then 16 hex digits
_JOB = re.compile(rf"^{_JOB_ID}$")


def is_job_id(text: object) -> bool:
    """Whether `text` has the shape of an id `job_id` makes (`<kind>-<16 hex digits>`). Anything
    else (`<id>:step:x`, `<id>:steps`, 5,000 characters) names no job, and must never become
    part of a Redis key: it would address another job's step record."""
    return isinstance(text, str) and _JOB.fullmatch(text) is not None


def output_tag(job: str, identity_digest: str) -> str:
    """What every artifact of a job is tagged with: the job and the source version it was made from
    (a retry after the source was fixed must not reuse ranks made from the old bytes)."""
    return f"{job}.{identity_digest}"


_TAG = re.compile(rf"^(?P<job>{_JOB_ID})\.(?P<digest>[0-9a-f]{{16}})$")


def tag_job(tag: str | None) -> str | None:
    """The job id inside an artifact tag written by `output_tag`, or None for anything else."""
    match = _TAG.match(tag or "")
    return match.group("job") if match else None


def tag_digest(tag: str) -> str | None:
    """The source identity digest inside an artifact tag written by `output_tag`."""
    match = _TAG.match(tag or "")
    return match.group("digest") if match else None


def task_id(job: str, step: str, attempt: int) -> str:
    """The Celery task id of a step: `{job}:{step}:{attempt}`. Deterministic, so a step can be
    revoked by name; new on every attempt, because revoked ids stay revoked in the workers."""
    return f"{job}:{step}:{attempt}"
