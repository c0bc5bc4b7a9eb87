"""Prometheus metrics for `GET /metrics`, kept in Redis so that every process contributes.

The API process that serves `/metrics` runs no tasks, so the workers, the CLI and anything else
that sends tasks count events into Redis (the job records' Redis, keys `porter:metrics:*`), and
`tasks.ops.metrics_collector.render` turns those counts, plus a few gauges read from Redis at scrape
time, into the Prometheus text format.

Celery task metrics use celery-exporter's names (danihodovic/celery-exporter), from Celery signals
in the process where the event happens:

    celery_task_{sent,received,started,succeeded,failed,retried,rejected,revoked}_total
        {name, queue_name}   (failed also has `exception`, the exception's class name)
    celery_task_runtime{name, queue_name}   histogram, prerun → postrun, whatever the outcome
    celery_queue_length{queue_name}, celery_active_worker_count{queue_name},
    celery_active_process_count{queue_name}, celery_worker_up{hostname}

celery-exporter's `hostname` label is left out of the task metrics: the hostnames of Porter
workers contain their pid, so it would add a series per worker restart for no dashboard in use.

Porter's own metrics:

    porter_jobs{state}                       gauge: job records by state
    porter_jobs_finished_total{kind, state}  jobs ended (by the step runner) as SUCCEEDED/FAILED
    porter_step_duration_seconds{step}       histogram of successful steps (step = its kind:
                                             inspect, reshard, config, engine, publish, ...)
    porter_bytes_{read,fetched,written}_total{step}
    porter_step_redeliveries_total{step}     deliveries of a step after its first
    porter_queue_oldest_age_seconds{queue_name}
    celery_workers{queue_name}               live workers per queue (= celery_active_worker_count)

Writes are best-effort: a Redis error is logged at debug level and the event is dropped (never a
failed task), and after one, writes are skipped for `_BACKOFF` seconds. Each event is one
pipelined round trip. Counters have no TTL (they must only go up).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from celery import signals
from prometheus_client.utils import floatToGoString

from config.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "porter:metrics:"
WORKERS_KEY = f"{PREFIX}workers"  # hash: hostname → {"queues", "concurrency", "seen"}
SENT_AT = "porter_sent_at"  # message header: unix time the message was published
QUEUES = ("cpu", "gpu")
JOB_STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
           300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0)  # fmt: skip
WORKER_BEAT = 10.0  # seconds between worker heartbeats...
WORKER_TIMEOUT = 3 * WORKER_BEAT  # ...and a worker silent this long is not counted
_BACKOFF = 5.0
_TASK = ("name", "queue_name")
_STEP = ("step",)

# name (without _total) → (help, label names)
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "celery_task_sent": ("Task messages published.", _TASK),
    "celery_task_received": ("Tasks received by a worker.", _TASK),
    "celery_task_started": ("Tasks started by a worker.", _TASK),
    "celery_task_succeeded": ("Tasks that succeeded.", _TASK),
    "celery_task_failed": ("Tasks that failed.", (*_TASK, "exception")),
    "celery_task_retried": ("Tasks that failed and will be retried.", _TASK),
    "celery_task_rejected": ("Tasks rejected by the worker (Reject, or an unknown task).", _TASK),
    "celery_task_revoked": ("Tasks revoked (cancelled) before or while running.", _TASK),
    "porter_jobs_finished": ("Jobs ended by the step runner.", ("kind", "state")),
    "porter_step_redeliveries": ("Deliveries of a step after its first.", _STEP),
    "porter_bytes_read": ("Source bytes read by successful steps.", _STEP),
    "porter_bytes_fetched": ("Bytes downloaded from the source store.", _STEP),
    "porter_bytes_written": ("Output bytes written by successful steps.", _STEP),
}
HISTOGRAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "celery_task_runtime": ("Task runtime (prerun to postrun), seconds.", _TASK),
    "porter_step_duration_seconds": ("Duration of successful steps, seconds.", _STEP),
}


# --- writing (any process) -------------------------------------------------------------------

_client_state: dict[str, Any] = {"pid": None, "client": None, "down_until": 0.0}
_lock = threading.Lock()


def _client() -> redis.Redis:
    """This process's metrics client (a new one after a fork): fails fast, never retries."""
    with _lock:
        if _client_state["pid"] != os.getpid():
            url = Settings.from_env().redis_url
            _client_state.update(
                pid=os.getpid(),
                down_until=0.0,
                client=redis.Redis.from_url(
                    url, socket_timeout=1, socket_connect_timeout=1, retry_on_timeout=False
                ),
            )
        return _client_state["client"]


def reset_client() -> None:
    """Forget this process's client (tests: after changing `PORTER_REDIS_URL`)."""
    with _lock:
        _client_state.update(pid=None, client=None, down_until=0.0)


def _write(ops: Callable[[Any], None]) -> None:
    """Run `ops` on one pipeline of the metrics client; any error is logged and dropped."""
    if time.monotonic() < _client_state["down_until"]:
        return
    try:
        pipe = _client().pipeline(transaction=False)
        ops(pipe)
        pipe.execute()
    except Exception as exc:
        _client_state["down_until"] = time.monotonic() + _BACKOFF
        log.debug("metrics not recorded: %s", exc)


def _field(labels: Iterable[str]) -> str:
    return json.dumps([str(v) for v in labels])


def _inc(pipe: Any, metric: str, labels: Iterable[str], amount: int = 1) -> None:
    pipe.hincrby(PREFIX + metric, _field(labels), int(amount))


def _observe(pipe: Any, metric: str, labels: Iterable[str], value: float) -> None:
    """One histogram observation: its own bucket (not cumulative), count and sum."""
    field, key = _field(labels), PREFIX + metric
    bound = next((b for b in BUCKETS if value <= b), float("inf"))
    pipe.hincrby(key, f"{field}|{floatToGoString(bound)}", 1)
    pipe.hincrby(key, f"{field}|count", 1)
    pipe.hincrbyfloat(key, f"{field}|sum", float(value))


def step_kind(step: str) -> str:
    """The kind of a step: its name before ':' (`reshard:3` → `reshard`)."""
    return step.split(":", 1)[0]


def observe_step(
    step: str, seconds: float, bytes_read: int, bytes_written: int, bytes_fetched: int = 0
) -> None:
    """A step succeeded: its duration and bytes."""
    kind = (step_kind(step),)

    def ops(pipe: Any) -> None:
        _observe(pipe, "porter_step_duration_seconds", kind, seconds)
        _inc(pipe, "porter_bytes_read", kind, bytes_read)
        _inc(pipe, "porter_bytes_fetched", kind, bytes_fetched)
        _inc(pipe, "porter_bytes_written", kind, bytes_written)

    _write(ops)


def step_bytes(result: dict[str, Any]) -> tuple[int, int, int]:
    """(read, written, fetched) bytes of a step's result; a reused artifact wrote nothing."""
    written = result.get("bytes_written")
    files = result.get("files")
    if written is None and isinstance(files, list):
        written = sum(int(f.get("bytes_written") or 0) for f in files if isinstance(f, dict))
    if result.get("reused"):
        written = 0
    return (
        int(result.get("bytes_read") or 0),
        int(written or 0),
        int(result.get("bytes_fetched") or 0),
    )


def observe_result(step: str, seconds: float, result: dict[str, Any]) -> None:
    """`observe_step` with the bytes taken from the step's result."""
    observe_step(step, seconds, *step_bytes(result))


def count_redelivery(step: str) -> None:
    """A step was delivered again (its worker died, or the reaper queued it again)."""
    _write(lambda pipe: _inc(pipe, "porter_step_redeliveries", (step_kind(step),)))


def count_finished(kind: str, state: str) -> None:
    """A job ended in `state` (counted once: by the caller that ended it)."""
    _write(lambda pipe: _inc(pipe, "porter_jobs_finished", (kind, state)))


# --- Celery signals --------------------------------------------------------------------------

_started: dict[str, float] = {}


def _queue(request: Any) -> str:
    info = getattr(request, "delivery_info", None) or {}
    return str(info.get("routing_key") or info.get("queue") or "unknown")


def _task_labels(task: Any) -> tuple[str, str]:
    return str(getattr(task, "name", None) or "unknown"), _queue(getattr(task, "request", None))


def _count_task(metric: str, labels: tuple[str, ...]) -> None:
    _write(lambda pipe: _inc(pipe, metric, labels))


@signals.before_task_publish.connect
def _on_publish(
    sender: Any = None, headers: dict | None = None, routing_key: str | None = None,
    declare: list | None = None, **_: Any,
) -> None:  # fmt: skip
    """Count the message and stamp it with its send time (for the queue's oldest age)."""
    if isinstance(headers, dict):
        headers.setdefault(SENT_AT, time.time())
    queue = routing_key or (getattr(declare[0], "name", None) if declare else None) or "unknown"
    _count_task("celery_task_sent", (str(sender), str(queue)))


@signals.task_received.connect
def _on_received(request: Any = None, **_: Any) -> None:
    _count_task("celery_task_received", (str(getattr(request, "name", "unknown")), _queue(request)))


@signals.task_prerun.connect
def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    _started[str(task_id)] = time.monotonic()
    _count_task("celery_task_started", _task_labels(task))


@signals.task_postrun.connect
def _on_postrun(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any
) -> None:
    """The task's runtime (any outcome); Reject counts as rejected, as in celery-exporter."""
    began = _started.pop(str(task_id), None)
    labels = _task_labels(task)

    def ops(pipe: Any) -> None:
        if began is not None:
            _observe(pipe, "celery_task_runtime", labels, time.monotonic() - began)
        if state == "REJECTED":
            _inc(pipe, "celery_task_rejected", labels)

    _write(ops)


@signals.task_success.connect
def _on_success(sender: Any = None, **_: Any) -> None:
    _count_task("celery_task_succeeded", _task_labels(sender))


@signals.task_failure.connect
def _on_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
    exc = type(exception).__name__ if exception is not None else ""
    _count_task("celery_task_failed", (*_task_labels(sender), exc))


@signals.task_retry.connect
def _on_retry(sender: Any = None, request: Any = None, **_: Any) -> None:
    _count_task("celery_task_retried", (str(getattr(sender, "name", "unknown")), _queue(request)))


@signals.task_revoked.connect
def _on_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    name = getattr(request, "name", None) or getattr(sender, "name", None) or "unknown"
    _count_task("celery_task_revoked", (str(name), _queue(request)))


@signals.task_rejected.connect
def _on_rejected(message: Any = None, **_: Any) -> None:
    """A message the worker cannot run (an unknown task)."""
    headers = getattr(message, "headers", None) or {}
    info = getattr(message, "delivery_info", None) or {}
    labels = (str(headers.get("task", "unknown")), str(info.get("routing_key") or "unknown"))
    _count_task("celery_task_rejected", labels)


# --- worker heartbeats (the `celery_workers` gauges) -------------------------------------------


class _WorkerBeat(threading.Thread):
    """Writes this worker's queues and concurrency into `WORKERS_KEY` every `WORKER_BEAT` s."""

    def __init__(self, hostname: str, queues: list[str], concurrency: int) -> None:
        super().__init__(name="metrics-worker-beat", daemon=True)
        self.hostname = hostname
        self.info = {"queues": queues, "concurrency": concurrency}
        self.stopping = threading.Event()

    def beat(self) -> None:
        value = json.dumps({**self.info, "seen": time.time()})
        _write(lambda pipe: pipe.hset(WORKERS_KEY, self.hostname, value))

    def run(self) -> None:
        _write(_prune_workers)
        self.beat()
        while not self.stopping.wait(WORKER_BEAT):
            self.beat()


_beats: list[_WorkerBeat] = []


def _prune_workers(pipe: Any, older_than: float = 24 * 3600) -> None:
    """Forget workers not seen for a day (killed ones never remove themselves)."""
    now = time.time()
    for host, value in _client().hgetall(WORKERS_KEY).items():
        try:
            if now - float(json.loads(value)["seen"]) > older_than:
                pipe.hdel(WORKERS_KEY, host)
        except (ValueError, KeyError, TypeError):
            pipe.hdel(WORKERS_KEY, host)


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Start the heartbeat of this worker (in its main process)."""
    try:
        queues = sorted(q.name for q in sender.task_consumer.queues)
    except Exception:
        queues = sorted(sender.app.amqp.queues.consume_from or ())
    concurrency = int(getattr(sender.controller, "concurrency", 0) or 0)
    beat = _WorkerBeat(str(sender.hostname), queues, concurrency)
    _beats.append(beat)
    beat.start()


@signals.worker_shutdown.connect
def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    """A worker that stops cleanly is not counted any more."""
    for beat in _beats:
        beat.stopping.set()
        _write(lambda pipe, name=beat.hostname: pipe.hdel(WORKERS_KEY, name))
    _beats.clear()
