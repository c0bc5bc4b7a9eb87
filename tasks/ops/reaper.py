"""Fast recovery from dead workers, whatever the visibility timeout.

With the Redis broker and `acks_late`, the message of a task whose worker was killed (`kill -9`,
machine lost) goes back to the queue only after the visibility timeout, which must exceed the
longest rank (hours). Instead, every running step writes a heartbeat into its record; the reaper,
a thread in each worker's main process (one active at a time, under a Redis lock), looks for
running steps whose heartbeat is older than `stale_after` and whose worker does not answer a ping
or no longer holds the task (twice, a pass apart), and moves their unacknowledged message straight back to its queue, first
in line (kombu's own restore). Steps are idempotent, so the late duplicate the broker may still
deliver after the visibility timeout is harmless.

A pool process killed under a live worker (the OOM killer) needs none of this: the worker sees it
die and re-queues its task at once (`task_reject_on_worker_lost`).

The reaper also repairs a stalled chord: when every step of a fan-out finished but the chord's
body never started (Redis was down as the last header task ended, and Celery lost the chord's
count), it sends the body itself, once. Bodies are idempotent, so a late original is harmless.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

from config.queues import CPU_QUEUE
from config.settings import Settings
from tasks.jobs.ids import task_id
from tasks.jobs.records import JobRecords
from tasks.kinds import all_kinds
from tasks.kinds.base import JobKind, Phase

log = logging.getLogger(__name__)

LOCK = "porter:reaper"


def restore_message(app: Any, task_id: str) -> bool:
    """Put the unacknowledged message of `task_id` back on its queue, first in line; False if no
    such message is waiting for an acknowledgement."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for tag, raw in channel.client.hgetall(channel.unacked_key).items():
            message = json.loads(raw)[0]
            if message.get("headers", {}).get("id") == task_id:
                # Workers BRPOP from the right: RPUSH (leftmost=False) makes it the next one taken.
                channel.qos.restore_by_tag(tag, leftmost=False)
                return True
    return False


def alive_nodes(app: Any, nodes: set[str], timeout: float = 1.0) -> set[str]:
    """The worker nodes among `nodes` that answer a ping."""
    if not nodes:
        return set()
    replies = app.control.ping(destination=sorted(nodes), timeout=timeout) or []
    return {node for reply in replies for node in reply}


def _body_step(kind: JobKind, phase: Phase) -> str:
    """The first step a phase's chord body records: its `then` step, else what follows it."""
    if phase.then is not None:
        return phase.then.name
    following = kind.phases[kind.phases.index(phase) + 1 :]
    return f"{following[0].step}:0" if following else "publish"


def stalled_chords(records: JobRecords, older_than: float) -> list[tuple[str, str, str]]:
    """(job, body task, body step) of running jobs whose fan-out finished more than
    `older_than` seconds ago without its chord body starting."""
    found, now, kinds = [], time.time(), all_kinds()
    for job in records.running_jobs():
        record = records.get(job)
        if not record or not record.get("inspected") or record["kind"] not in kinds:
            continue
        done, kind = record["steps"], kinds[record["kind"]]
        for phase in kind.phases:
            names, body_step = phase.names(record["inspected"]), _body_step(kind, phase)
            if not names or body_step in done or any(n not in done for n in names):
                continue
            if any(done[n].get("state") != "SUCCEEDED" for n in names):
                continue
            if now - max(float(done[n].get("finished") or now) for n in names) > older_than:
                found.append((job, phase.body_task, body_step))
    return found


def tasks_held(app: Any, nodes: set[str], timeout: float = 1.0) -> set[str]:
    """Ids of the tasks that the worker nodes among `nodes` are running or hold reserved."""
    if not nodes:
        return set()
    inspect = app.control.inspect(destination=sorted(nodes), timeout=timeout)
    held = set()
    for replies in (inspect.active() or {}, inspect.reserved() or {}):
        held |= {task["id"] for tasks in replies.values() for task in tasks}
    return held


def reap(app: Any, records: JobRecords, settings: Settings) -> list[str]:
    """One pass: re-queue the steps whose worker died and start stalled chord bodies; returns
    the task ids sent again."""
    token = uuid.uuid4().hex
    hold = max(1, int(settings.reaper_interval))
    if not records.redis.set(LOCK, token, nx=True, ex=hold):
        return []  # another worker's reaper has this round
    stale = records.stale_steps(settings.stale_after)
    alive = alive_nodes(app, {f["node"] for _, _, f in stale if f.get("node")})
    # A live worker can lose a task too: a pool process killed before Celery saw the task start
    # is neither re-queued nor running ("Task handler raised error: WorkerLostError").
    held = tasks_held(app, {f["node"] for _, _, f in stale if f.get("node") in alive})
    requeued = []
    now = time.time()
    for job, step, fields in stale:
        lost = fields.get("task_id")
        if not lost or lost in held:
            continue  # a live worker still runs it (slow, or hung: not ours to take)
        # A worker still reconnecting after a Redis restart can miss one ping: take a step only
        # when its worker missed two, a reaper interval apart.
        suspected = float(fields.get("suspected") or 0)
        if suspected <= float(fields["heartbeat"]):
            records.step(job, step, suspected=now)
            continue
        if now - suspected < settings.reaper_interval:
            continue
        if restore_message(app, lost):
            records.step(job, step, state="REQUEUED", requeued=time.time())
            requeued.append(lost)
            log.warning(
                "%s: %s lost its worker %s (no heartbeat for %.0f s); queued again",
                job, step, fields.get("node"), time.time() - float(fields["heartbeat"]),
            )  # fmt: skip
    for job, body, body_step in stalled_chords(records, settings.stale_after):
        attempt = int(records.get(job, steps=False)["attempt"])
        if records.mark_once(job, f"repaired:{body_step}:{attempt}"):
            task = task_id(job, f"{body_step}-repair", attempt)
            app.send_task(body, args=[job], task_id=task, queue=CPU_QUEUE)
            requeued.append(task)
            log.warning("%s: its fan-out finished but %s never started; started it", job, body)
    return requeued


class Reaper(threading.Thread):
    """Runs `reap` every `reaper_interval` seconds in a worker's main process."""

    def __init__(self, app: Any, settings: Settings) -> None:
        super().__init__(name="porter-reaper", daemon=True)
        self.app, self.settings = app, settings
        self.records = JobRecords(settings.redis_url, ttl=settings.record_ttl)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.settings.reaper_interval):
            try:
                reap(self.app, self.records, self.settings)
            except Exception:  # Redis restarting, a malformed record: try again next round
                log.exception("reaper pass failed")
