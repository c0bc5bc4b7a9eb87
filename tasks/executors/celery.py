"""The distributed executor: Celery tasks that run the steps of `tasks.kinds.megatron_trtllm` on shared workers.

Canvas of a Megatron → TensorRT-LLM job (built by `plan`, which returns without waiting):

    plan (inspect source, metadata only)
      → chord(reshard rank r for every target rank, queue cpu)
      → assemble (write config.json)
      → [chord(build engine rank r, queue gpu)] → publish (manifest.json, last)

Messages carry only the job id (and a rank); each task reads the spec and the inspected plan from
the job record. Every task runs through `run_step`, which records the step's state, progress,
result and deliveries, ends the job FAILED with the first real error (so nothing depends on a
chord body that never runs), and caps re-deliveries of a step whose worker keeps dying.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import chord, current_task
from celery.exceptions import Ignore, Reject
from celery.signals import worker_init, worker_ready

from config.celery_app import app
from config.queues import CPU_QUEUE
from config.settings import Settings
from converters.errors import ConversionError
from tasks.executors.celery_notify import send_notifications
from tasks.jobs import locations
from tasks.jobs.ids import output_tag, task_id
from tasks.jobs.outputs import (
    check_writable,
    manifest_uri,
    output_held,
    prepare_output,
    publish_step,
    remove_outputs,
)
from tasks.jobs.records import (
    ACTIVE,
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    JobRecords,
)
from tasks.jobs.seals import UnsealedJob, check_seal
from tasks.kinds import all_kinds, kind_named
from tasks.kinds.base import JobKind, Phase, Progress, StepContext
from tasks.ops import metrics

log = logging.getLogger(__name__)
# Errors that refuse a job for a reason its message says (a ConversionError names the file and
# the problem): Celery logs them as expected, at INFO without a traceback.
REFUSALS = (ConversionError,)


class JobCancelled(Exception):
    """Raised inside a running step when its job was cancelled."""


@functools.cache
def settings() -> Settings:
    return Settings.from_env()


@functools.cache
def records() -> JobRecords:
    """This process's connection to the job records (redis-py reconnects after a fork)."""
    return JobRecords(settings().redis_url, ttl=settings().record_ttl, secret=settings().job_secret)


def _spec(record: dict[str, Any]) -> Any:
    return kind_named(record["kind"]).parse(record["spec"])


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


class _Heartbeat(threading.Thread):
    """Writes the running step's heartbeat into its record every `heartbeat_interval` seconds."""

    def __init__(self, job: str, step: str) -> None:
        super().__init__(name=f"heartbeat-{step}", daemon=True)
        self.job, self.step = job, step
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(settings().heartbeat_interval):
            records().step(self.job, self.step, quiet=True, heartbeat=time.time())

    def __enter__(self) -> _Heartbeat:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()


def job_ended(job: str, state: str) -> None:
    """This process ended `job` (its `finish` won): count it, queue its notifications (one read
    of the record for both)."""
    try:
        record = records().get(job, steps=False)
        if record is None:
            return
        metrics.count_finished(record["kind"], state)
        send_notifications(record)
    except Exception:  # the job's state is final whatever happens to its metrics or notifications
        log.exception("%s: could not count it or queue its notifications", job)


def run_step(
    job: str, step: str, work: Callable[[], dict[str, Any]], *, planned: bool = True
) -> dict[str, Any]:
    """Run one step of `job` with its bookkeeping; returns the step's result. Every step but
    the plan (`planned=False`) runs only for a job that was planned and is RUNNING, and never
    writes into an OUTPUT another job committed (`_check_planned`, `_check_output`)."""
    rec = records()
    record = rec.get(job, steps=False)  # read once for the checks below
    state = record["state"] if record else None
    if record is None or state in TERMINAL:
        log.info("%s: job is %s; %s skipped", job, state, step)
        raise Ignore()
    _check_sealed(rec, record, job, step)
    if planned:
        _check_planned(rec, record, job, step)
    deliveries = rec.count_delivery(job, step)
    if deliveries > 1:
        metrics.count_redelivery(step)
    if deliveries > settings().max_deliveries:
        message = (
            f"{step}: its worker died {deliveries - 1} times while running it (killed, or out "
            "of memory?); giving up"
        )
        rec.step(job, step, state=FAILED, error=message, finished=time.time())
        if rec.finish(job, FAILED, message):
            job_ended(job, FAILED)
        raise Reject(message, requeue=False)
    started = time.time()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    request = current_task.request if current_task else None
    node, task = getattr(request, "hostname", None), getattr(request, "id", None)
    try:
        rec.step(job, step, state=RUNNING, started=started, heartbeat=started, worker=worker,
                 node=node, task_id=task, error="")  # fmt: skip
        if planned and _check_output(record, job, step):
            rec.step(job, step, state=SUCCEEDED, finished=time.time(), skipped="committed")
            raise Ignore()  # this job committed OUTPUT already: nothing may be written there
        with _Heartbeat(job, step):
            result = work()
        finished = time.time()
        fields = {k: v for k, v in result.items() if k not in ("state", "error")}
        fields = {"seconds": finished - started, **fields}
        rec.step(job, step, state=SUCCEEDED, finished=finished, **fields)
        metrics.observe_result(step, finished - started, result)
    except JobCancelled:
        rec.step(job, step, quiet=True, state=CANCELLED, finished=time.time())
        raise Ignore() from None
    except Ignore:
        raise
    except Exception as exc:
        message = _message(exc)
        try:  # (retried through a Redis restart; if Redis stays away, the original error wins)
            rec.step(job, step, state=FAILED, error=message, finished=time.time())
            if rec.finish(job, FAILED, f"{step}: {message}"):
                job_ended(job, FAILED)
                # A refusal (bad input, OUTPUT taken) is routine: one line, no traceback
                # (`REFUSALS` are Celery's expected exceptions); anything else is a bug.
                level = logging.WARNING if isinstance(exc, REFUSALS) else logging.ERROR
                log.log(level, "%s failed in %s: %s", job, step, message)
        except redis.RedisError:
            log.exception("%s: could not record the failure of %s: %s", job, step, message)
        raise
    if rec.state(job) == CANCELLED:  # cancelled while this step ran: leave nothing behind
        remove_outputs(_spec(rec.get(job, steps=False)), job)
        raise Ignore()
    return result


def _check_sealed(rec: JobRecords, record: dict[str, Any], job: str, step: str) -> None:
    """Before a step touches storage: its job record carries the submitter's seal
    (`tasks.jobs.seals`, with PORTER_JOB_SECRET); otherwise the job fails, unannounced."""
    try:
        check_seal(settings().job_secret, record)
    except UnsealedJob as exc:
        message = str(exc)
        rec.step(job, step, state=FAILED, error=message, finished=time.time())
        rec.finish(job, FAILED, f"{step}: {message}")
        log.warning("%s: %s", step, message)
        raise Reject(message, requeue=False) from None


def _check_planned(rec: JobRecords, record: dict[str, Any], job: str, step: str) -> None:
    """A step (but the plan) runs only if the job's record says it is RUNNING and was planned in
    this attempt; otherwise (a message sent straight to the broker, or left from an earlier
    attempt) it is refused, noted in the step's record, and the job is left as it is."""
    inspected = record.get("inspected") or {}
    attempt = record.get("attempt")
    planned = inspected.get("job_id") == job and record.get("planned", attempt) == attempt
    if record.get("state") == RUNNING and planned:
        return
    message = f"refused: the job is {record.get('state')}" + ("" if planned else ", not planned")
    log.warning("%s: %s %s", job, step, message)
    rec.step(job, step, quiet=True, refused=message)
    raise Ignore()


def _check_output(record: dict[str, Any], job: str, step: str) -> bool:
    """Before a step writes: an error if another job committed OUTPUT (`manifest.json`); True
    if this job did (only publish may go on: it answers with the manifest)."""
    return check_writable(_spec(record), job) is not None and step != "publish"


def _busy(job: str) -> str | None:
    """The state of `job` while it has not ended (PENDING or RUNNING), else None."""
    state = records().state(job)
    return state if state in ACTIVE else None


def _progress(job: str, step: str) -> Progress:
    """Throttled, best-effort progress into the step record; raises JobCancelled on cancel."""
    rec, interval = records(), settings().progress_interval
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < interval and done < total:
            return
        last[0] = now
        rec.step(job, step, quiet=True, done=done, total=total)
        if rec.state(job, quiet=True) == CANCELLED:  # unknown while Redis restarts: go on
            raise JobCancelled(job)

    return report


def job_record(job: str) -> dict[str, Any]:
    """The job's record (without steps); a task of a job that no longer exists is dropped."""
    record = records().get(job, steps=False)
    if record is None:
        raise Ignore()
    return record


def _context(job: str, record: dict[str, Any], progress: Progress | None = None) -> StepContext:
    """A step's view of its job, backed by the job record in Redis."""
    return StepContext(
        job=job,
        spec=_spec(record),
        record=record,
        results=lambda: dict(records().steps(job)),
        remember_fields=lambda **fields: records().update(job, **fields),
        progress=progress,
    )


def fan_out(job: str, attempt: int, phase: Phase, count: int) -> None:
    """Launch chord(`phase.task`(job, i) for i < count) → `phase.body_task`(job), with
    deterministic task ids."""
    header = [
        app.signature(phase.task, args=(job, i), immutable=True, queue=phase.queue).set(
            task_id=task_id(job, f"{phase.step}:{i}", attempt)
        )
        for i in range(count)
    ]
    body = app.signature(phase.body_task, args=(job,), immutable=True, queue=CPU_QUEUE)
    chord(header, body.set(task_id=task_id(job, phase.body_id, attempt))).apply_async()


def _launch(job: str, record: dict[str, Any], kind: JobKind, after: Phase | None) -> dict | None:
    """Start the first enabled phase after `after` (all of them: None); publish when none is left.
    Returns the publish result when this call published."""
    spec = _spec(record)
    phases = kind.active_phases(spec)
    following = phases if after is None else phases[phases.index(after) + 1 :]
    if not following:
        return publish_job(job, kind)
    phase = following[0]
    fan_out(job, int(record["attempt"]), phase, phase.size(record["inspected"]))
    return None


@app.task(name="porter.plan", throws=REFUSALS)
def plan(job: str) -> dict[str, Any]:
    """Inspect the source (metadata only), check OUTPUT, and launch the job's first phase."""
    record = job_record(job)
    if record["state"] not in TERMINAL:
        records().start(job)
    kind = kind_named(record["kind"])

    def work() -> dict[str, Any]:
        # The spec is checked again (a record written by anything with access to Redis may hold
        # a bad one). The source may have changed since submission (e.g. fixed before a retry):
        # the job keeps its id, and its artifacts are tagged with the version actually read.
        spec = _spec(record)
        locations.check_spec(spec, settings())  # where the files are, symlinks resolved
        held = records().claim_output(job, spec.output)
        if held is not None:  # another job that has not ended writes there: leave it be
            raise output_held(*held, spec.output)
        inspected = kind.inspect(spec)
        inspected["job_id"], inspected["tag"] = job, output_tag(job, inspected["source_digest"])
        manifest = prepare_output(spec, job, busy=_busy)
        records().update(
            job,
            inspected=inspected,
            source_digest=inspected["source_digest"],
            planned=int(record["attempt"]),
        )
        return {"committed": manifest is not None, "manifest_uri": manifest_uri(spec)}

    result = run_step(job, "inspect", work, planned=False)
    if result["committed"]:  # converted before (same id): nothing to do
        records().update(job, manifest_uri=result["manifest_uri"])
        if records().finish(job, SUCCEEDED):
            job_ended(job, SUCCEEDED)
        return result
    _launch(job, job_record(job), kind, None)
    return result


def _fan_out_step(kind: JobKind, phase: Phase, job: str, index: int) -> dict[str, Any]:
    """Run fan-out step `index` of `phase`."""
    record = job_record(job)
    step = f"{phase.step}:{index}"
    return run_step(
        job, step, lambda: phase.run(_context(job, record, _progress(job, step)), index)
    )


def _body(kind: JobKind, phase: Phase, job: str) -> dict[str, Any] | None:
    """The chord body after `phase`'s fan-out: its `then` step, then the next phase or publish."""
    record = job_record(job)
    result = None
    if phase.then is not None:
        then = phase.then
        result = run_step(job, then.name, lambda: then.run(_context(job, record)))
        record = job_record(job)  # with what the step remembered
    published = _launch(job, record, kind, phase)
    return published if published is not None else result


def publish_job(job: str, kind: JobKind) -> dict[str, Any]:
    """The `publish` step: check every file, write manifest.json last, run the kind's
    `after_publish` (cleanup of intermediates), and mark the job SUCCEEDED."""
    record = job_record(job)
    ctx = _context(job, record)

    def commit() -> dict[str, Any]:
        summary = kind.source_summary(ctx.inspected)
        manifest = publish_step(ctx.spec, job, ctx.tag, summary, kind.published(ctx))
        if kind.after_publish:
            kind.after_publish(ctx)
        return {"files": len(manifest["files"]), "manifest_uri": manifest_uri(ctx.spec)}

    result = run_step(job, "publish", commit)
    records().update(job, manifest_uri=result["manifest_uri"])
    if records().finish(job, SUCCEEDED):
        job_ended(job, SUCCEEDED)
    return result


def _register(kind: JobKind, phase: Phase) -> None:
    """Register the Celery tasks of one phase under the names the kind declares."""

    def fan_out_step(job: str, index: int) -> dict[str, Any]:
        return _fan_out_step(kind, phase, job, index)

    def body(job: str) -> dict[str, Any] | None:
        return _body(kind, phase, job)

    fan_out_step.__doc__ = f"{kind.name}: fan-out step `{phase.step}:i` of a job."
    body.__doc__ = f"{kind.name}: after the `{phase.step}` fan-out, {phase.body_id}."
    app.task(name=phase.task, throws=REFUSALS)(fan_out_step)
    app.task(name=phase.body_task, throws=REFUSALS)(body)


for _kind in all_kinds().values():
    for _phase in _kind.phases:
        _register(_kind, _phase)


@worker_init.connect
def _watch_pool(**_: Any) -> None:
    """A worker whose prefork pool wedges stops, to be restarted (`tasks.ops.pool_watchdog`)."""
    from tasks.ops import pool_watchdog

    pool_watchdog.install()


@worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    """Every worker runs a reaper thread in its main process (one pass at a time cluster-wide)."""
    from tasks.ops.reaper import Reaper

    Reaper(sender.app if sender is not None else app, settings()).start()
