"""The distributed executor: Celery tasks that run the steps of `tasks.steps` on shared workers.

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

from config.celery_app import GPU_QUEUE, app
from config.settings import Settings
from converters.trtllm.convert import Progress
from tasks import metrics, steps
from tasks.executors.celery_notify import send_notifications
from tasks.jobs import ConvertSpec, output_tag, task_id
from tasks.records import CANCELLED, FAILED, RUNNING, SUCCEEDED, TERMINAL, JobRecords
from tasks.store import open_store

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised inside a running step when its job was cancelled."""


@functools.cache
def settings() -> Settings:
    return Settings.from_env()


@functools.cache
def records() -> JobRecords:
    """This process's connection to the job records (redis-py reconnects after a fork)."""
    return JobRecords(settings().redis_url, ttl=settings().record_ttl)


def _spec(record: dict[str, Any]) -> ConvertSpec:
    return ConvertSpec.from_dict(record["spec"])


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


def run_step(job: str, step: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one step of `job` with its bookkeeping; returns the step's result."""
    rec = records()
    state = rec.state(job)
    if state is None or state in TERMINAL:
        log.info("%s: job is %s; %s skipped", job, state, step)
        raise Ignore()
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
    except Exception as exc:
        message = _message(exc)
        try:  # (retried through a Redis restart; if Redis stays away, the original error wins)
            rec.step(job, step, state=FAILED, error=message, finished=time.time())
            if rec.finish(job, FAILED, f"{step}: {message}"):
                job_ended(job, FAILED)
                log.error("%s failed in %s: %s", job, step, message)
        except redis.RedisError:
            log.exception("%s: could not record the failure of %s: %s", job, step, message)
        raise
    if rec.state(job) == CANCELLED:  # cancelled while this step ran: leave nothing behind
        steps.remove_outputs(_spec(rec.get(job, steps=False)), job)
        raise Ignore()
    return result


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


def _inspected(record: dict[str, Any]) -> dict[str, Any]:
    return record["inspected"]


def job_record(job: str) -> dict[str, Any]:
    """The job's record (without steps); a task of a job that no longer exists is dropped."""
    record = records().get(job, steps=False)
    if record is None:
        raise Ignore()
    return record


def inspect_step(
    job: str, parse_spec: Callable[[], Any], inspect: Callable[[Any], dict[str, Any]]
) -> dict[str, Any]:
    """Run the job's `inspect` step: check the spec (a record written by anything with access to
    Redis may hold a bad one), inspect the source, check OUTPUT, keep the result in the record.
    The source may have changed since submission (e.g. fixed before a retry): the job keeps its
    id, and its artifacts are tagged with the version actually read."""

    def work() -> dict[str, Any]:
        spec = parse_spec()
        inspected = inspect(spec)
        inspected["job_id"], inspected["tag"] = job, output_tag(job, inspected["source_digest"])
        manifest = steps.prepare_output(spec, job)
        records().update(job, inspected=inspected, source_digest=inspected["source_digest"])
        return {"committed": manifest is not None, "manifest_uri": _manifest_uri(spec)}

    result = run_step(job, "inspect", work)
    if result["committed"]:  # converted before (same id): nothing to do
        records().update(job, manifest_uri=result["manifest_uri"])
        if records().finish(job, SUCCEEDED):
            job_ended(job, SUCCEEDED)
    return result


def fan_out(
    job: str, attempt: int, task: Any, name: str, count: int, body: Any, body_name: str,
    queue: str | None = None,
) -> None:  # fmt: skip
    """Launch chord(`task`(job, i) for i < count) → `body`(job), with deterministic task ids."""
    options = {"queue": queue} if queue else {}
    header = [
        task.si(job, i).set(task_id=task_id(job, f"{name}:{i}", attempt), **options)
        for i in range(count)
    ]
    chord(header, body.si(job).set(task_id=task_id(job, body_name, attempt))).apply_async()


@app.task(name="porter.plan")
def plan(job: str) -> dict[str, Any]:
    """Inspect the source (metadata only), check OUTPUT, and launch the job's canvas (a PowerInfer
    index job: `celery_powerinfer.plan_index`)."""
    record = job_record(job)
    attempt = int(record["attempt"])
    if record["state"] not in TERMINAL:
        records().start(job)
    if record["kind"] == "powerinfer-index":
        from tasks.executors.celery_powerinfer import plan_index

        return plan_index(job, attempt)
    result = inspect_step(job, functools.partial(_spec, record), steps.inspect_source)
    if not result["committed"]:
        ranks = len(job_record(job)["inspected"]["ranks"])
        fan_out(job, attempt, reshard, "reshard", ranks, assemble, "assemble")
    return result


@app.task(name="porter.reshard")
def reshard(job: str, rank: int) -> dict[str, Any]:
    """Write target rank `rank` to OUTPUT."""
    record = job_record(job)
    step = f"reshard:{rank}"
    tag = _inspected(record)["tag"]
    return run_step(
        job,
        step,
        lambda: steps.convert_rank_step(_spec(record), tag, rank, _progress(job, step)),
    )


@app.task(name="porter.assemble")
def assemble(job: str) -> dict[str, Any]:
    """Write config.json, then build engines (gpu queue) or publish."""
    record = job_record(job)
    spec, inspected = _spec(record), _inspected(record)
    result = run_step(
        job, "config", lambda: steps.write_config_step(spec, inspected["tag"], inspected)
    )
    if not spec.engines:
        return publish(job)
    ranks = len(inspected["ranks"])
    fan_out(job, record["attempt"], build_engine, "engine", ranks, publish, "publish", GPU_QUEUE)
    return result


@app.task(name="porter.build_engine")
def build_engine(job: str, rank: int) -> dict[str, Any]:
    """Build the TensorRT-LLM engine of one rank (only on workers with TensorRT-LLM and a GPU)."""
    from tasks.engines import build_engine_step

    record = job_record(job)
    spec, inspected = _spec(record), _inspected(record)
    world = len(inspected["ranks"])
    return run_step(
        job,
        f"engine:{rank}",
        lambda: build_engine_step(spec.output, job, rank, world, inspected["tag"]),
    )


def _manifest_uri(spec: Any) -> str:
    return open_store(spec.output).uri(steps.MANIFEST)


def _published_files(job: str, world: int, engines: bool) -> list[dict[str, Any]]:
    """The files to list in the manifest, from the step records (ranks, config, engines)."""
    by_step = dict(records().steps(job))
    files = [by_step[f"reshard:{r}"] for r in range(world)] + [by_step["config"]]
    if engines:
        for r in range(world):
            files.extend(by_step[f"engine:{r}"]["files"])
    return files


def commit_job(
    job: str, spec: Any, tag: str, source: dict[str, Any], files: Callable[[], list[dict]],
    after: Callable[[], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The `publish` step: check `files()`, write manifest.json last, run `after` (cleanup of
    intermediates), and mark the job SUCCEEDED."""

    def commit() -> dict[str, Any]:
        manifest = steps.publish_step(spec, job, tag, source, files())
        if after:
            after()
        return {"files": len(manifest["files"]), "manifest_uri": _manifest_uri(spec)}

    result = run_step(job, "publish", commit)
    records().update(job, manifest_uri=result["manifest_uri"])
    if records().finish(job, SUCCEEDED):
        job_ended(job, SUCCEEDED)
    return result


@app.task(name="porter.publish")
def publish(job: str) -> dict[str, Any]:
    """Commit the job: check every file, write manifest.json last, mark the job SUCCEEDED."""
    record = job_record(job)
    spec, inspected = _spec(record), _inspected(record)
    return commit_job(
        job,
        spec,
        inspected["tag"],
        steps.source_summary(inspected),
        lambda: _published_files(job, len(inspected["ranks"]), spec.engines),
    )


@worker_init.connect
def _watch_pool(**_: Any) -> None:
    """A worker whose prefork pool wedges stops, to be restarted (`tasks.pool_watchdog`)."""
    from tasks import pool_watchdog

    pool_watchdog.install()


@worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    """Every worker runs a reaper thread in its main process (one pass at a time cluster-wide)."""
    from tasks.reaper import Reaper

    Reaper(sender.app if sender is not None else app, settings()).start()
