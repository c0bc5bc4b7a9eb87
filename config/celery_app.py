"""The Celery app: Redis broker and backend, JSON only, the reliability settings of the pipeline spec.

Task modules are named by string (`include`), never imported here: `config` does not depend on
`tasks` (except on `tasks.ops.metrics`, imported at the end for its signal handlers). Queues: `cpu`
(inspect, re-shard, config, publish) and `gpu` (engine builds).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from config.queues import CPU_QUEUE, GPU_QUEUE
from config.settings import Settings

TASK_MODULES = ["tasks.executors.celery", "tasks.triggers.schedules"]
# `porter beat` (celery-redbeat): ticks at least this often (seconds), and a standby beat takes
# over this long after the active one stopped renewing its lock in Redis.
BEAT_MAX_INTERVAL = 5
BEAT_LOCK_TIMEOUT = 30


def celery_config(settings: Settings) -> dict:
    """Celery configuration for `settings` (a plain dict, so tests can read what is set)."""
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": settings.unacked_restore_interval,
        "unacked_restore_throttle": settings.unacked_restore_throttle,
    }
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        # Pickle over the broker would be remote code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A task is acknowledged when it ends, so a worker that dies mid-task hands it back...
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # ...after the visibility timeout, which must exceed the longest task.
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "visibility_timeout": settings.visibility_timeout,
        "result_expires": settings.result_expires,
        "broker_connection_retry_on_startup": True,
        "task_queues": (Queue(CPU_QUEUE), Queue(GPU_QUEUE)),
        "task_default_queue": CPU_QUEUE,
        "task_routes": {"porter.build_engine": {"queue": GPU_QUEUE}},
        "task_track_started": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        # Scheduled re-exports (tasks.triggers.schedules): the schedule lives in this Redis (celery-redbeat);
        # one `porter beat` holds the lock and sends, any other waits to take over.
        "beat_scheduler": "redbeat.RedBeatScheduler",
        "beat_max_loop_interval": BEAT_MAX_INTERVAL,
        "redbeat_redis_url": settings.redis_url,
        "redbeat_redis_options": {"retry_period": 30},  # ride out a Redis restart
        "redbeat_key_prefix": "porter:redbeat:",
        "redbeat_lock_timeout": BEAT_LOCK_TIMEOUT,
    }


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from `settings` (default: the environment)."""
    app = Celery("porter", include=TASK_MODULES)
    app.conf.update(celery_config(settings or Settings.from_env()))
    return app


app = make_app()
