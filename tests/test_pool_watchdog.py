"""A worker whose prefork pool is wedged (pool processes never seen to start) stops itself."""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
import time

import psutil
import redis

from tasks.ops import pool_watchdog
from tasks.ops.pool_watchdog import POOL_LOGGER, UP_TIMEOUT_MESSAGE, PoolWatchdog


def test_the_watched_message_is_the_one_celery_logs():
    from celery.concurrency import asynpool

    source = inspect.getsource(asynpool)
    assert f"error('{UP_TIMEOUT_MESSAGE} from %r', proc)" in source
    assert asynpool.logger.name == POOL_LOGGER


def test_stops_after_the_limit_within_the_window_only():
    stops: list[int] = []
    watchdog = PoolWatchdog(lambda: stops.append(1), limit=3, window=60)
    logger = logging.getLogger(POOL_LOGGER)
    logger.addHandler(watchdog)
    try:
        logger.error("Process 'ForkPoolWorker-3' pid:1 exited with 'signal 9 (SIGKILL)'")
        logger.error("%s from %r", UP_TIMEOUT_MESSAGE, "proc-1")
        logger.error("%s from %r", UP_TIMEOUT_MESSAGE, "proc-2")
        assert stops == []
        logger.error("%s from %r", UP_TIMEOUT_MESSAGE, "proc-3")
        assert stops == [1]
        logger.error("%s from %r", UP_TIMEOUT_MESSAGE, "proc-4")
        assert stops == [1]  # once
    finally:
        logger.removeHandler(watchdog)

    spread = PoolWatchdog(lambda: stops.append(2), limit=2, window=0.05)
    for _ in range(3):
        spread.emit(logging.makeLogRecord({"msg": UP_TIMEOUT_MESSAGE + " from x"}))
        time.sleep(0.1)
    assert 2 not in stops


WEDGED_WORKER = """
import signal
from config.celery_app import app
from tasks.ops import pool_watchdog
if {hang}:  # a cold shutdown that never ends: SIGQUIT stays pending in every thread
    signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGQUIT}})
    pool_watchdog.GRACE = 3
# A replacement pool process is killed if its UP message is not read within this: none will be.
app.conf.worker_proc_alive_timeout = 0.0001
app.worker_main(["worker", "--queues=cpu", "--concurrency=1", "--loglevel=INFO",
                 "--hostname=wedged@%h"])
"""


def run_wedged_worker(cluster, tmp_path, *, hang: bool) -> tuple[int, str, int]:
    """Start a worker, kill its pool process, send it a task; (exit status, log, queue length)
    once it has stopped by itself."""
    url = cluster.redis_url.rsplit("/", 1)[0] + "/3"  # a queue no other worker reads
    client = redis.Redis.from_url(url)
    client.flushdb()
    env = {**cluster.env, "PORTER_REDIS_URL": url}
    log = tmp_path / "wedged.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", WEDGED_WORKER.format(hang=hang)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b"ready." not in log.read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        for child in psutil.Process(proc.pid).children():  # the OOM killer strikes
            child.kill()
        subprocess.run(
            [sys.executable, "-c", "from config.celery_app import app; "
             "app.send_task('porter.notify', args=['no-such-job'], queue='cpu')"],
            env=env, check=True, timeout=60,
        )  # fmt: skip
        status = proc.wait(timeout=8 * pool_watchdog.LIMIT + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert text.count(UP_TIMEOUT_MESSAGE) >= pool_watchdog.LIMIT, text[-3000:]
    assert "Celery's prefork pool is wedged" in text
    assert "succeeded" not in text  # no pool process ever ran it
    return status, text, client.llen("cpu")


def test_a_wedged_worker_stops_and_hands_back_its_message(cluster, tmp_path):
    status, text, queued = run_wedged_worker(cluster, tmp_path, hang=False)
    assert queued == 1  # back on its queue, not lost
    assert status != pool_watchdog.EX_SOFTWARE and "did not end the worker" not in text


def test_a_wedged_worker_whose_cold_shutdown_hangs_exits_anyway(cluster, tmp_path):
    """Seen in a full run: the cold shutdown waited on the wedged pool for minutes."""
    status, text, queued = run_wedged_worker(cluster, tmp_path, hang=True)
    assert status == pool_watchdog.EX_SOFTWARE, text[-3000:]
    assert "handed back 1 held message(s)" in text
    assert queued == 1  # back on its queue, not lost
