"""Submitting and managing queued jobs: what `porter submit|status|jobs|cancel|retry` call.

The job id is derived from the content (source identity from listings + normalized spec + format
version), and the record is created with HSETNX: submitting the same job twice, even at the same
moment, yields one record and one conversion.
"""

from __future__ import annotations

import time
from typing import Any

from config.celery_app import app
from config.settings import Settings
from converters.errors import ConversionError
from tasks import sources, steps
from tasks.jobs import ConvertSpec, job_id, task_id
from tasks.records import CANCELLED, FAILED, PENDING, SUCCEEDED, TERMINAL, JobRecords


class JobNotFound(ConversionError):
    """No record of this job id."""


def connect(settings: Settings | None = None) -> JobRecords:
    """The job records of the configured Redis."""
    settings = settings or Settings.from_env()
    return JobRecords(settings.redis_url, ttl=settings.record_ttl)


def _send_plan(job: str, attempt: int) -> None:
    app.send_task("porter.plan", args=[job], task_id=task_id(job, "plan", attempt), queue="cpu")


def submit(spec: ConvertSpec, records: JobRecords) -> tuple[str, bool]:
    """Queue `spec`; returns (job id, whether this call created the job)."""
    identity = sources.source_identity(spec.source)  # listings only: no weights are read
    job = job_id(spec, identity)
    created = records.create(job, spec.kind, spec.to_dict(), output=spec.output)
    if created:
        _send_plan(job, 1)
    return job, created


def get(records: JobRecords, job: str) -> dict[str, Any]:
    """The job record with its steps; JobNotFound if there is none."""
    record = records.get(job)
    if record is None:
        raise JobNotFound(f"no job {job!r} (submitted to another Redis, or expired?)")
    return record


def cancel(records: JobRecords, job: str) -> dict[str, Any]:
    """Stop a job: queued steps are revoked, running ranks stop at their next tensor, and the
    job's uncommitted files are removed from OUTPUT."""
    record = get(records, job)
    if record["state"] in (SUCCEEDED, CANCELLED):
        raise ConversionError(f"job {job} already ended {record['state']}; nothing to cancel")
    records.force_state(job, CANCELLED, "cancelled by request")
    attempt = int(record.get("attempt") or 0)
    ranks = len((record.get("inspected") or {}).get("ranks", []))
    names = ["plan", "assemble", "publish"]
    names += [f"reshard:{r}" for r in range(ranks)] + [f"engine:{r}" for r in range(ranks)]
    app.control.revoke([task_id(job, name, attempt) for name in names])
    removed = steps.remove_outputs(ConvertSpec.from_dict(record["spec"]), job)
    records.update(job, finished=time.time())
    return {"job": job, "removed_files": removed}


def retry(records: JobRecords, job: str) -> int:
    """Run a FAILED or CANCELLED job again: steps whose artifacts are intact are not redone.
    Returns the new attempt number."""
    record = get(records, job)
    if record["state"] not in (FAILED, CANCELLED, PENDING):
        raise ConversionError(
            f"job {job} is {record['state']}; only failed or cancelled jobs retry"
        )
    unfinished = [name for name, step in records.steps(job) if step.get("state") != SUCCEEDED]
    records.reset_steps(job, unfinished)
    attempt = records.new_attempt(job)
    _send_plan(job, attempt)
    return attempt


def wait(records: JobRecords, job: str, on_update: Any = None, poll: float = 0.5) -> dict[str, Any]:
    """Block until the job ends; `on_update(record)` is called after every poll."""
    while True:
        record = get(records, job)
        if on_update:
            on_update(record)
        if record["state"] in TERMINAL:
            return record
        time.sleep(poll)


def progress(record: dict[str, Any]) -> tuple[int, int]:
    """(bytes written so far, bytes to write) over the job's rank steps."""
    planned = {
        f"reshard:{r['rank']}": r["bytes_written"]
        for r in (record.get("inspected") or {}).get("ranks", [])
    }
    done = 0
    for name, step in record.get("steps", {}).items():
        if name in planned:
            done += planned[name] if step.get("state") == SUCCEEDED else int(step.get("done", 0))
    return done, sum(planned.values())
