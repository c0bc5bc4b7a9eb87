"""redis-server restarted mid-job (AOF on): the job completes with the same bytes.

The module runs its own redis-server (AOF on, `appendfsync always`) and two `porter worker`
processes against it, so it can stop Redis without disturbing the session `cluster`.

The fixture ranks convert in a few milliseconds, too fast for an outage to land between two of
their progress writes. The workers here therefore run `porter worker` with each progress report
followed by a short sleep (`SLOW_WORKER`): a rank then takes seconds, as a large model's does,
and writes progress throughout. Everything else (Celery, Redis, S3, the steps) is the real thing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tasks.jobs.records import JobRecords
from tests.cluster import Cluster, free_port, worker_env
from tests.test_distributed import download, reference, submit, upload, wait_state
from tests.test_recovery import LEGACY_TP2

# `porter worker --queues cpu --concurrency 1`, with every progress report of a rank followed by
# a sleep of argv[1] seconds (set before Celery imports the task module and forks its pool).
SLOW_WORKER = """
import sys, time
import tasks.executors.celery as executor
from tasks.cli.main import main

pause, real = float(sys.argv[1]), executor._progress

def slow_progress(job, step):
    report = real(job, step)
    def slowly(done, total):
        report(done, total)
        time.sleep(pause)
    return slowly

executor._progress = slow_progress
sys.exit(main(["worker", "--queues", "cpu", "--concurrency", "1"]))
"""
PAUSE_S = 0.1  # per tensor: a fixture rank (31 tensors) writes progress for about 3 s
OUTAGE_S = 1.0  # Redis down this long: several progress writes, less than stale_after (3 s)


class RedisServer:
    """A redis-server that can be stopped and started again on the same port and data
    directory (AOF on, each write fsynced before it is acknowledged)."""

    def __init__(self, data: Path) -> None:
        self.data, self.port = data, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.fail("redis-server is not installed (tests/run.sh installs it)")
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM: redis-server writes out the AOF and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture(scope="module")
def restartable(tmp_path_factory: pytest.TempPathFactory, moto_s3: str):
    """(its redis-server, two slowed workers on it); tests may stop and start the server."""
    base = tmp_path_factory.mktemp("redis-restart")
    for name in ("data", "logs", "cache"):
        (base / name).mkdir()
    server = RedisServer(base / "data")
    server.start()
    env = worker_env(server.url, moto_s3, base / "cache")
    c = Cluster(server.url, env, base / "logs", base / "cache")
    try:
        for _ in range(2):
            c.start_worker(command=[sys.executable, "-c", SLOW_WORKER, str(PAUSE_S)])
        c.wait_for_workers(2)
        yield server, c
    finally:
        c.stop()
        server.stop()


def converting_step(records: JobRecords, job: str, timeout: float = 60) -> tuple[str, dict]:
    """(name, fields) of the first rank step of `job` seen converting (progress under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, fields in records.steps(job):
            running = name.startswith("reshard:") and fields.get("state") == "RUNNING"
            if running and 0 < fields.get("done", 0) < fields.get("total", 0) / 2:
                return name, fields
        time.sleep(0.01)
    raise AssertionError(f"no rank of {job} was seen converting")


def worker_logs(cluster: Cluster) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(cluster.logs.iterdir()))


def test_redis_restart_mid_rank_completes_with_the_same_bytes(
    restartable, s3_env, megatron, tmp_path
):
    server, cluster = restartable
    source = megatron("llama").paths[LEGACY_TP2]
    upload(source, f"s3://{s3_env}/ckpt")
    records = JobRecords(cluster.redis_url)
    job = submit(cluster, f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "4")
    step, before = converting_step(records, job)
    server.stop()  # SIGTERM mid-rank, then the same port and data directory again
    time.sleep(OUTAGE_S)
    server.start()

    record = wait_state(records, job, ("SUCCEEDED", "FAILED"), timeout=90)
    assert (record["state"], record["error"]) == ("SUCCEEDED", "")
    # What was written before the restart came back from the AOF.
    assert record["steps"][step]["started"] == before["started"]

    # The outage hit this rank's progress writes: they failed, were logged, and the step went on.
    logs = worker_logs(cluster)
    assert f"could not record progress of {job}/{step}" in logs
    rank = record["steps"][step]
    assert rank["state"] == "SUCCEEDED" and rank["error"] == ""
    assert rank["deliveries"] == 1 and rank["reused"] is False  # converted once, not re-run
    assert rank["done"] == rank["total"]  # progress written again once Redis was back
    assert all(s["state"] == "SUCCEEDED" for s in record["steps"].values())

    got = download(f"s3://{s3_env}/out", tmp_path / "got")
    assert b'"job_id"' in got.pop("manifest.json")
    assert got == reference(source, tmp_path, 4), "output differs from an undisturbed run"


def test_redis_down_when_a_rank_ends_the_job_still_ends(restartable, s3_env, megatron, tmp_path):
    """Record writes are retried through the restart, and the reaper starts the chord body if
    Celery lost the chord's count: the job completes with the same bytes."""
    server, cluster = restartable
    source = megatron("llama").paths[LEGACY_TP2]
    upload(source, f"s3://{s3_env}/ckpt")
    records = JobRecords(cluster.redis_url)
    job = submit(cluster, f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "4")
    step, _ = converting_step(records, job)
    server.stop()
    time.sleep(6)  # the rank (about 3 s) ends while Redis is down
    server.start()
    record = wait_state(records, job, ("SUCCEEDED", "FAILED"), timeout=30)
    assert record["state"] == "SUCCEEDED", record["error"]
    got = download(f"s3://{s3_env}/out", tmp_path / "got")
    assert b'"job_id"' in got.pop("manifest.json")
    assert got == reference(source, tmp_path, 4), "output differs from an undisturbed run"
    assert record["steps"][step]["state"] == "SUCCEEDED"
