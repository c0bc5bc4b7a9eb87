"""Stop a worker whose prefork pool is wedged, so its supervisor starts a fresh one.

Seen here (Celery 5.7, billiard 4.2): after pool processes are SIGKILLed mid-task (the OOM
killer, or Porter's own fault tests), a worker can fall into a loop where every new pool process
starts and sends its UP message, the main process never reads it, kills the process after
`proc_alive_timeout` (4 s) and starts another: "Timed out waiting for UP message" forever. The
main process still answers pings and reserves a message at a time, so nothing else notices:
reserved messages wait for the visibility timeout and the worker does no work again (py-spy: the
new process idle in its work loop, the main process idle in epoll).

The watchdog counts those errors (they are logged by `celery.concurrency.asynpool`); after
`LIMIT` of them within `WINDOW` seconds it logs why and stops the worker with a cold shutdown
(SIGQUIT): the connection closes, kombu puts the reserved message back on its queue, and the
supervisor (Kubernetes, Compose, systemd) starts a new worker. Running steps of other workers are
unaffected; steps this worker held are re-queued by the reaper of the surviving workers.

The cold shutdown can itself hang on the wedged pool (seen in full test runs: the worker was
still alive minutes later; its signal handler runs inside the event loop's callback that logged
the error, so it may wait on a loop that no longer turns). So if the worker is still running
`GRACE` seconds after SIGQUIT, the watchdog puts the messages of the tasks this worker held back on
their queues (first in line, as the reaper does), kills its pool processes and exits at once
(`os._exit`, status 70).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import psutil

POOL_LOGGER = "celery.concurrency.asynpool"
UP_TIMEOUT_MESSAGE = "Timed out waiting for UP message"
LIMIT = 5
WINDOW = 120.0
GRACE = 20.0  # seconds the cold shutdown may take before the worker exits anyway
EX_SOFTWARE = 70

log = logging.getLogger(__name__)


def held_task_ids() -> set[str]:
    """Ids of the tasks this worker holds (reserved or running)."""
    from celery.worker import state

    return {request.id for request in list(state.reserved_requests)}


def hand_back_held_messages(task_ids: set[str]) -> int:
    """Put the messages of `task_ids` back on their queues, first in line; returns how many were
    still waiting for an acknowledgement."""
    from config.celery_app import app
    from tasks.ops.reaper import restore_message

    return sum(restore_message(app, task_id) for task_id in task_ids)


def _exit_if_still_running(grace: float, held: set[str]) -> None:
    time.sleep(grace)
    handed = 0
    try:  # what it held when stopped, too: a cancelled request leaves the reserved set
        handed = hand_back_held_messages(held | held_task_ids())
    except Exception:  # exit regardless: the reaper or the visibility timeout returns them
        log.exception("could not hand back the messages this worker holds")
    log.critical(
        "the cold shutdown did not end the worker in %.0f s; handed back %d held message(s); "
        "exiting now",
        grace,
        handed,
    )
    # No logging.shutdown(): the main thread, stuck in the shutdown, may hold a handler's lock
    # (seen: the process lived on). Records are flushed as they are written.
    for child in psutil.Process().children(recursive=True):  # the wedged pool's processes
        with contextlib.suppress(psutil.Error):
            child.kill()
    os._exit(EX_SOFTWARE)


def stop_worker() -> None:
    """Cold shutdown (SIGQUIT); if the worker still runs `GRACE` seconds later, hand back what it
    holds and exit."""
    threading.Thread(
        target=_exit_if_still_running,
        args=(GRACE, held_task_ids()),
        name="pool-watchdog-exit",
        daemon=True,
    ).start()
    os.kill(os.getpid(), signal.SIGQUIT)


class PoolWatchdog(logging.Handler):
    """A logging handler on the pool's logger that calls `stop` once the pool looks wedged."""

    def __init__(
        self,
        stop: Callable[[], None] = stop_worker,
        limit: int = LIMIT,
        window: float = WINDOW,
    ) -> None:
        super().__init__(level=logging.ERROR)
        self.stop, self.limit, self.window = stop, limit, window
        self.times: collections.deque[float] = collections.deque(maxlen=limit)
        self.stopped = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.stopped or not record.getMessage().startswith(UP_TIMEOUT_MESSAGE):
            return
        now = time.monotonic()
        self.times.append(now)
        if len(self.times) == self.limit and now - self.times[0] <= self.window:
            self.stopped = True
            log.critical(
                "%d pool processes in %.0f s were never seen to start (Celery's prefork pool is "
                "wedged); stopping this worker so that it is restarted",
                self.limit,
                now - self.times[0],
            )
            self.stop()


def install(stop: Callable[[], None] = stop_worker) -> PoolWatchdog:
    """Attach a watchdog to the pool's logger (in the worker's main process)."""
    watchdog = PoolWatchdog(stop)
    logging.getLogger(POOL_LOGGER).addHandler(watchdog)
    return watchdog
