"""Render Porter's metrics for `GET /metrics`: what `tasks.ops.metrics` counted in Redis, plus gauges
read from Redis at scrape time (queue lengths and ages, live workers, jobs by state). Names and
labels are listed in `tasks.ops.metrics`."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from tasks.ops.metrics import (
    BUCKETS,
    COUNTERS,
    HISTOGRAMS,
    JOB_STATES,
    PREFIX,
    QUEUES,
    SENT_AT,
    WORKER_TIMEOUT,
    WORKERS_KEY,
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _subqueues(queue: str) -> list[str]:
    """The Redis lists of a kombu queue: one per priority step (`cpu`, `cpu\\x06\\x163`, ...)."""
    return [queue if pri == 0 else f"{queue}{Channel.sep}{pri}" for pri in PRIORITY_STEPS]


def _sent_at(raw: Any) -> float | None:
    try:
        return float(json.loads(raw)["headers"][SENT_AT])
    except (TypeError, ValueError, KeyError):
        return None


class RedisCollector:
    """Collects the metrics from Redis at scrape time (one pipeline, plus one for job states)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        names = [*COUNTERS, *HISTOGRAMS]
        lists = [sub for q in QUEUES for sub in _subqueues(q)]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(PREFIX + name)
        pipe.hgetall(WORKERS_KEY)
        pipe.zrange("porter:jobs", 0, -1)
        for sub in lists:
            pipe.llen(sub)
            pipe.lindex(sub, -1)  # kombu LPUSHes and BRPOPs: the oldest is last
        replies = pipe.execute()
        stored = dict(zip(names, replies, strict=False))
        workers, jobs = replies[len(names)], replies[len(names) + 1]
        queue_replies = replies[len(names) + 2 :]
        for name, (doc, labels) in COUNTERS.items():
            yield _counter(name, doc, labels, stored[name])
        for name, (doc, labels) in HISTOGRAMS.items():
            yield _histogram(name, doc, labels, stored[name])
        yield from _queue_gauges(lists, queue_replies)
        yield from _worker_gauges(workers)
        yield self._jobs_gauge([_text(j) for j in jobs])

    def _jobs_gauge(self, jobs: list[str], chunk: int = 10_000) -> GaugeMetricFamily:
        counts = dict.fromkeys(JOB_STATES, 0)
        for start in range(0, len(jobs), chunk):
            pipe = self.client.pipeline(transaction=False)
            for job in jobs[start : start + chunk]:
                pipe.hget(f"porter:job:{job}", "state")
            for state in pipe.execute():
                if state is not None:  # (an expired record still in the index)
                    counts[_text(state)] = counts.get(_text(state), 0) + 1
        gauge = GaugeMetricFamily("porter_jobs", "Job records by state.", labels=["state"])
        for state, count in counts.items():
            gauge.add_metric([state], count)
        return gauge


def _labels_of(field: str) -> list[str]:
    return [str(v) for v in json.loads(field)]


def _counter(name: str, doc: str, labels: tuple[str, ...], raw: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for field, value in sorted((_text(k), float(v)) for k, v in raw.items()):
        family.add_metric(_labels_of(field), value)
    return family


def _histogram(name: str, doc: str, labels: tuple[str, ...], raw: dict) -> HistogramMetricFamily:
    """Cumulative buckets from the per-bucket counts stored by `_observe`."""
    series: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in raw.items():
        field, part = _text(key).rsplit("|", 1)
        series[field][part] = float(value)
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    for field, parts in sorted(series.items()):
        bounds = sorted({*BUCKETS, *(float(p) for p in parts if p not in ("count", "sum"))})
        buckets, total = [], 0.0
        for bound in bounds:
            total += parts.get(floatToGoString(bound), 0.0)
            if bound != float("inf"):
                buckets.append((floatToGoString(bound), total))
        buckets.append(("+Inf", parts.get("count", total)))
        family.add_metric(_labels_of(field), buckets, parts.get("sum", 0.0))
    return family


def _queue_gauges(lists: list[str], replies: list[Any]) -> Iterator[GaugeMetricFamily]:
    length = GaugeMetricFamily(
        "celery_queue_length", "Messages waiting in the queue.", labels=["queue_name"]
    )
    age = GaugeMetricFamily(
        "porter_queue_oldest_age_seconds",
        "Age of the oldest waiting message (0 if none).",
        labels=["queue_name"],
    )
    sizes: dict[str, int] = defaultdict(int)
    oldest: dict[str, float] = {}
    now = time.time()
    for i, sub in enumerate(lists):
        queue = sub.split(Channel.sep, 1)[0]
        size, last = replies[2 * i], replies[2 * i + 1]
        sizes[queue] += int(size or 0)
        sent = _sent_at(last) if last is not None else None
        if sent is not None:
            oldest[queue] = max(oldest.get(queue, 0.0), now - sent)
    for queue in QUEUES:
        length.add_metric([queue], sizes[queue])
        age.add_metric([queue], max(oldest.get(queue, 0.0), 0.0))
    yield length
    yield age


def _live_workers(raw: dict) -> dict[str, dict[str, Any]]:
    now, live = time.time(), {}
    for host, value in raw.items():
        try:
            info = json.loads(value)
        except ValueError:
            continue
        if now - float(info.get("seen", 0)) <= WORKER_TIMEOUT:
            live[_text(host)] = info
    return live


def _worker_gauges(raw: dict) -> Iterator[GaugeMetricFamily]:
    live = _live_workers(raw)
    docs = {
        "celery_workers": "Live workers consuming the queue.",
        "celery_active_worker_count": "Live workers consuming the queue (celery-exporter's name).",
        "celery_active_process_count": "Pool processes of the live workers of the queue.",
    }
    families = {n: GaugeMetricFamily(n, d, labels=["queue_name"]) for n, d in docs.items()}
    queues = sorted({*QUEUES, *(q for info in live.values() for q in info.get("queues", ()))})
    for queue in queues:
        serving = [info for info in live.values() if queue in info.get("queues", ())]
        families["celery_workers"].add_metric([queue], len(serving))
        families["celery_active_worker_count"].add_metric([queue], len(serving))
        processes = sum(int(info.get("concurrency") or 0) for info in serving)
        families["celery_active_process_count"].add_metric([queue], processes)
    yield from families.values()
    up = GaugeMetricFamily("celery_worker_up", "1 for each live worker.", labels=["hostname"])
    for host in sorted(live):
        up.add_metric([host], 1)
    yield up


def render(client: redis.Redis) -> tuple[bytes, str]:
    """The metrics in the Prometheus text format, and its content type (raises RedisError when
    Redis is unreachable: the scrape then fails, which Prometheus reports as `up == 0`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(client))
    return generate_latest(registry), CONTENT_TYPE_LATEST
