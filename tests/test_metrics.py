"""`GET /metrics` (tasks/metrics.py): counters that move as real workers run real jobs, scraped
over HTTP; the queue gauges on a broker database without workers; a Redis outage."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from converters.megatron.example import Layout
from tasks.jobs.records import JobRecords
from tasks.ops import metrics, metrics_collector
from tests.cluster import free_port, serve
from tests.test_distributed import _break_shard, submit, upload, wait_state

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == metric and want <= ls)


@pytest.fixture(scope="module")
def metrics_url(cluster) -> Iterator[str]:
    with serve(cluster.env) as base:
        yield base


@pytest.fixture
def scrape(metrics_url: str) -> Callable[[], Samples]:
    def get() -> Samples:
        with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=10) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            return parse(r.read().decode())

    return get


def settle(scrape: Callable[[], Samples], done: Callable[[Samples], bool]) -> Samples:
    """Scrape until `done` (the last signals of a task come just after the job record ends)."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape()
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_metrics_move_as_a_job_runs(cluster, scrape, s3_env, megatron):
    upload(megatron("gpt").paths[Layout("legacy", 2, 1)], f"s3://{s3_env}/ckpt")
    before = scrape()
    job = submit(cluster, f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "2")
    record = wait_state(JobRecords(cluster.redis_url), job, ("SUCCEEDED", "FAILED"))
    assert record["state"] == "SUCCEEDED", record["error"]
    last = {"name": "porter.assemble"}  # (which runs the publish step too: no engines)

    def moved(metric: str, samples: Samples, /, **labels: str) -> float:
        return value(samples, metric, **labels) - value(before, metric, **labels)

    after = settle(scrape, lambda s: moved("celery_task_runtime_count", s, **last) == 1)

    reshard = {"name": "porter.reshard", "queue_name": "cpu"}
    for event in ("sent", "received", "started", "succeeded"):
        assert moved(f"celery_task_{event}_total", after, **reshard) == 2, event
    assert moved("celery_task_failed_total", after, **reshard) == 0
    assert moved("celery_task_runtime_count", after, **reshard) == 2
    # porter.plan is sent by the CLI process: senders count too.
    assert moved("celery_task_sent_total", after, name="porter.plan", queue_name="cpu") == 1
    for task in ("porter.plan", "porter.assemble"):
        assert moved("celery_task_succeeded_total", after, name=task) == 1, task

    assert moved("porter_jobs", after, state="SUCCEEDED") == 1
    # other tests on this worker's Redis may have left jobs RUNNING: count only what moved
    assert moved("porter_jobs", after, state="RUNNING") == 0
    assert moved("porter_jobs_finished_total", after, kind=record["kind"], state="SUCCEEDED") == 1

    steps = record["steps"]
    ranks = [steps[f"reshard:{r}"] for r in range(2)]
    rank_bytes = sum(s["bytes_written"] for s in ranks)
    assert rank_bytes > 0
    assert moved("porter_bytes_written_total", after, step="reshard") == rank_bytes
    config_bytes = steps["config"]["bytes_written"]
    assert moved("porter_bytes_written_total", after) == rank_bytes + config_bytes
    from tasks.storage.store import open_store

    manifest = open_store(f"s3://{s3_env}/out").get_json("manifest.json")
    assert sum(f["bytes"] for f in manifest["files"]) == rank_bytes + config_bytes
    read = sum(s["bytes_read"] for s in ranks)
    assert read > 0 and moved("porter_bytes_read_total", after, step="reshard") == read
    fetched = sum(s["bytes_fetched"] for s in ranks)
    assert moved("porter_bytes_fetched_total", after, step="reshard") == fetched
    assert moved("porter_step_duration_seconds_count", after, step="reshard") == 2
    seconds = moved("porter_step_duration_seconds_sum", after, step="reshard")
    # The whole step (fetching included), not the converter's own `seconds`.
    assert seconds == pytest.approx(sum(s["finished"] - s["started"] for s in ranks), rel=1e-6)
    assert moved("porter_step_redeliveries_total", after) == 0

    for queue in ("cpu", "gpu"):
        assert value(after, "celery_queue_length", queue_name=queue) == 0
        assert value(after, "porter_queue_oldest_age_seconds", queue_name=queue) == 0
    assert value(after, "celery_workers", queue_name="cpu") >= 2  # the cluster's two workers
    assert value(after, "celery_active_process_count", queue_name="cpu") >= 2


def test_a_failing_job_is_counted(cluster, scrape, s3_env, megatron, tmp_path):
    broken = _break_shard(megatron("gpt").paths[Layout("legacy", 2, 1)], tmp_path)
    upload(broken, f"s3://{s3_env}/ckpt")
    before = scrape()
    job = submit(cluster, f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "2")
    record = wait_state(JobRecords(cluster.redis_url), job, ("SUCCEEDED", "FAILED"))
    assert record["state"] == "FAILED"
    failed = [n for n, s in record["steps"].items() if s["state"] == "FAILED"]

    def moved(metric: str, samples: Samples, /, **labels: str) -> float:
        return value(samples, metric, **labels) - value(before, metric, **labels)

    after = settle(scrape, lambda s: moved("celery_task_failed_total", s) >= len(failed))
    assert moved("celery_task_failed_total", after, name="porter.reshard") == len(failed) >= 1
    assert moved("porter_jobs_finished_total", after, kind=record["kind"], state="FAILED") == 1
    assert moved("porter_jobs", after, state="FAILED") == 1
    assert moved("celery_task_succeeded_total", after, name="porter.assemble") == 0


@pytest.fixture
def broker_db(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Database 1 of the test Redis, where no worker consumes, as the metrics' Redis too."""
    url = redis_url.rsplit("/", 1)[0] + "/1"
    redis.Redis.from_url(url).flushdb()
    monkeypatch.setenv("PORTER_REDIS_URL", url)
    metrics.reset_client()
    yield url
    metrics.reset_client()
    redis.Redis.from_url(url).flushdb()


def test_queue_length_and_oldest_age_across_priorities(broker_db):
    from celery import Celery

    from config.celery_app import celery_config
    from config.settings import Settings

    app = Celery("porter-test")
    app.conf.update(celery_config(Settings(redis_url=broker_db)))
    client = redis.Redis.from_url(broker_db)  # bytes replies (the API's client decodes them)
    app.send_task("porter.reshard", args=["job", 0], queue="cpu")
    app.send_task("porter.reshard", args=["job", 1], queue="cpu", priority=9)
    assert client.llen("cpu") == 1  # the other one is in a priority sub-queue
    time.sleep(0.3)
    samples = parse(metrics_collector.render(client)[0].decode())
    assert value(samples, "celery_queue_length", queue_name="cpu") == 2
    assert value(samples, "celery_queue_length", queue_name="gpu") == 0
    assert 0.3 <= value(samples, "porter_queue_oldest_age_seconds", queue_name="cpu") < 30
    assert value(samples, "porter_queue_oldest_age_seconds", queue_name="gpu") == 0
    sent = value(samples, "celery_task_sent_total", name="porter.reshard", queue_name="cpu")
    assert sent == 2
    assert value(samples, "celery_workers", queue_name="cpu") == 0


def test_histograms_are_cumulative(broker_db):
    metrics.observe_step("reshard:0", 0.3, 10, 20, 5)
    metrics.observe_step("reshard:1", 7.0, 1, 2)
    metrics.observe_step("reshard:2", 1e6, 0, 0)
    samples = parse(
        metrics_collector.render(redis.Redis.from_url(broker_db, decode_responses=True))[0].decode()
    )
    bucket = "porter_step_duration_seconds_bucket"
    assert value(samples, bucket, step="reshard", le="0.25") == 0
    assert value(samples, bucket, step="reshard", le="0.5") == 1
    assert value(samples, bucket, step="reshard", le="10.0") == 2
    assert value(samples, bucket, step="reshard", le="43200.0") == 2
    assert value(samples, bucket, step="reshard", le="+Inf") == 3
    assert value(samples, "porter_step_duration_seconds_count", step="reshard") == 3
    assert value(samples, "porter_bytes_written_total", step="reshard") == 22
    assert value(samples, "porter_bytes_fetched_total", step="reshard") == 5


def test_redis_outage_makes_metric_writes_no_ops(monkeypatch):
    monkeypatch.setenv("PORTER_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing there
    metrics.reset_client()
    try:
        headers: dict = {}
        started = time.monotonic()
        metrics._on_publish(sender="porter.reshard", headers=headers, routing_key="cpu")
        assert isinstance(headers[metrics.SENT_AT], float)  # the message is still stamped
        task = type("Task", (), {"name": "porter.reshard", "request": None})()
        metrics._on_prerun(task_id="t", task=task)
        metrics._on_success(sender=task)
        metrics._on_failure(sender=task, exception=ValueError("x"))
        metrics._on_postrun(task_id="t", task=task, state="SUCCESS")
        metrics.observe_step("reshard:0", 1.0, 1, 1)
        metrics.count_redelivery("reshard:0")
        metrics.count_finished("megatron-trtllm", "FAILED")
        metrics._WorkerBeat("w@h", ["cpu"], 1).beat()
        assert time.monotonic() - started < 2
        with pytest.raises(redis.RedisError):  # a scrape does fail: Prometheus shows up == 0
            metrics_collector.render(redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"))
    finally:
        metrics.reset_client()
