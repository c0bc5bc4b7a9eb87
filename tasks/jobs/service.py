"""Submitting and managing queued jobs of any registered kind: what `porter
submit|status|jobs|cancel|retry` call.

The job id is derived from the content (source identity from listings + normalized spec + format
version), and the record is created with HSETNX: submitting the same job twice, even at the same
moment, yields one record and one conversion.
"""

from __future__ import annotations

import time
from typing import Any

from config.queues import CPU_QUEUE
from config.settings import Settings
from converters.errors import ConversionError
from tasks.jobs import locations
from tasks.jobs.checks import show
from tasks.jobs.ids import is_job_id, job_id, task_id
from tasks.jobs.outputs import output_held, remove_outputs
from tasks.jobs.records import CANCELLED, FAILED, PENDING, SUCCEEDED, TERMINAL, JobRecords
from tasks.jobs.specs import JobSpec, parse_spec
from tasks.kinds import kind_named, kind_of


class JobNotFound(ConversionError):
    """No record of this job id."""


INTERACTIVE_RETRIES = 4  # about 3 s of retries: a person learns at once that Redis is away
INTERACTIVE_TIMEOUT = 5.0  # seconds: a Redis that does not answer (stopped, hung) fails the call


def connect(settings: Settings | None = None, *, interactive: bool = False) -> JobRecords:
    """The job records of the configured Redis. Workers ride out a Redis restart (about half a
    minute of retries); `interactive` callers (a person at a terminal) hear within seconds."""
    settings = settings or Settings.from_env()
    retries = INTERACTIVE_RETRIES if interactive else 20
    return JobRecords(
        settings.redis_url, ttl=settings.record_ttl, retries=retries, secret=settings.job_secret,
        timeout=INTERACTIVE_TIMEOUT if interactive else None,
    )  # fmt: skip


def _celery() -> Any:
    """The Celery app, imported by the calls that send or revoke tasks only (`porter status`,
    `jobs` and `--wait` never load Celery)."""
    from config.celery_app import app
    from tasks.ops import metrics  # noqa: F401  (counts the tasks this process sends)

    return app


def _send_plan(job: str, attempt: int) -> None:
    _celery().send_task(
        "porter.plan", args=[job], task_id=task_id(job, "plan", attempt), queue=CPU_QUEUE
    )


def _identity(spec: JobSpec) -> list:
    """The source identity of a job spec, from listings (no weights or statistics are read)."""
    return kind_of(spec).identity(spec)


def submit(spec: JobSpec, records: JobRecords, **labels: Any) -> tuple[str, bool]:
    """Queue `spec`; returns (job id, whether this call created the job). `labels` (model,
    profile, export, iteration, trigger, notify) are stored in a new record, not in the id."""
    return submit_many([(spec, labels)], records)[0]


def submit_many(
    specs: list[tuple[JobSpec, dict[str, Any]]], records: JobRecords
) -> list[tuple[str, bool]]:
    """Queue several jobs, all or nothing as far as checking goes: every source is listed and
    every id computed before the first job is created, so a bad entry submits none. Locations
    are normalised and checked against the allow-lists first (`tasks.jobs.locations`), so the
    id is the same for every spelling. Returns (job id, created) per spec, in order."""
    settings = Settings.from_env()
    specs = [(locations.admit(spec, settings), labels) for spec, labels in specs]
    jobs = [job_id(spec, _identity(spec)) for spec, _ in specs]
    for job, (spec, _) in zip(jobs, specs, strict=True):  # (the plan step checks it again)
        held = records.output_holder(job, spec.output)
        if held is not None:
            raise output_held(*held, spec.output)
    results = []
    for job, (spec, labels) in zip(jobs, specs, strict=True):
        created = records.create(job, spec.kind, spec.to_dict(), output=spec.output, **labels)
        if created:
            _send_plan(job, 1)
        results.append((job, created))
    return results


def get(records: JobRecords, job: str) -> dict[str, Any]:
    """The job record with its steps; JobNotFound if there is none, or if `job` is not a job id
    at all (never read: `<id>:step:x` would name another job's step record)."""
    if not is_job_id(job):
        raise JobNotFound(f"no job {show(job)}: not a job id (<kind>-<16 hex digits>)")
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
    _celery().control.revoke(
        [task_id(job, name, record["attempt"]) for name in _step_names(record)]
    )
    spec = _spec(record)
    removed = remove_outputs(spec, job)
    records.update(job, finished=time.time())
    return {"job": job, "removed_files": removed}


def _spec(record: dict[str, Any]) -> JobSpec:
    return parse_spec({"kind": record["kind"], **record["spec"]})


def _step_names(record: dict[str, Any]) -> list[str]:
    """Every step the job's canvas can have (queued ones included, so they can be revoked)."""
    return kind_named(record["kind"]).step_names(record.get("inspected") or {})


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
    """Block until the job ends; `on_update(record)` is called after every look at the record.
    The end is learned at once: whatever ends the job publishes it (`JobRecords.ended_channel`),
    and this waits on that message; the record is read at least every `poll` seconds anyway (the
    progress shown, and the fallback should a message be lost to a Redis restart)."""
    with records.watch_end(job) as ended:  # subscribed before the first read: no end missed
        while True:
            record = get(records, job)
            if on_update:
                on_update(record)
            if record["state"] in TERMINAL:
                return record
            ended(poll)


def progress(record: dict[str, Any]) -> tuple[int, int]:
    """(done, total) of a job, in its kind's unit (`JobKind.progress_unit`): bytes written over a
    Megatron job's rank steps, steps done over a PowerInfer index job's per-layer steps."""
    return kind_named(record["kind"]).progress(record)
