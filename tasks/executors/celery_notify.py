"""The `porter.notify` task: deliver a finished job's notifications (see `tasks.triggers.notify`)."""

from __future__ import annotations

import logging
from typing import Any

from config.celery_app import CPU_QUEUE, app
from config.settings import Settings
from tasks.jobs import service
from tasks.jobs.ids import task_id
from tasks.jobs.records import FAILED, SUCCEEDED
from tasks.jobs.seals import UnsealedJob, check_seal
from tasks.triggers.notify import NotifyFailed, deliver, summary, urls
from tasks.triggers.profiles import load_profiles

log = logging.getLogger(__name__)


def send_notifications(record: dict[str, Any]) -> None:
    """Queue the notifications of the job of `record`, which just ended, if it came from a
    profile (the notify task finds the profile's URLs)."""
    if record.get("profile") and record["state"] in (SUCCEEDED, FAILED):
        job, attempt = record["id"], record.get("attempt", 1)
        app.send_task(
            "porter.notify", args=[job], task_id=task_id(job, "notify", attempt), queue=CPU_QUEUE
        )


@app.task(name="porter.notify")
def notify(job: str) -> dict[str, Any]:
    """POST the job's summary to each of its notification URLs; the outcome per URL is stored
    in the job record (`notifications`). At least once per attempt of the job (receivers dedup
    on X-Porter-Delivery). Sends only what it can check (`tasks.triggers.notify`): a record
    not sealed with the job secret is not announced."""
    settings = Settings.from_env()
    records = service.connect(settings)
    record = records.get(job, steps=False)
    if record is None or record["state"] not in (SUCCEEDED, FAILED):
        return {}
    try:
        check_seal(settings.job_secret, record)
    except UnsealedJob as exc:
        log.warning("notify: %s", exc)
        return {}
    attempt = record.get("attempt", 1)
    if record.get(f"notified:{attempt}"):
        return {}  # a re-delivered message: this attempt was already notified
    targets = urls(record, load_profiles())
    if not targets:
        return {}
    payload, outcome = summary(record), {}
    for url in targets:
        try:
            tries = deliver(
                url,
                payload,
                secret=settings.notify_secret,
                attempts=settings.notify_attempts,
                backoff=settings.notify_backoff,
                delivery=f"{job}:{attempt}",
            )
            outcome[url] = {"delivered": True, "attempts": tries}
        except NotifyFailed as exc:
            log.error("job %s: notification not delivered: %s", job, exc)
            outcome[url] = {"delivered": False, "error": str(exc)}
    records.update(job, notifications=outcome)
    records.mark_once(job, f"notified:{attempt}")  # after: a worker lost mid-way sends again
    return outcome
