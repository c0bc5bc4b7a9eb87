"""Job records against a real redis-server."""

from __future__ import annotations

import time
import uuid

from tasks.jobs.records import JobRecords


def records(redis_url: str) -> JobRecords:
    return JobRecords(redis_url, ttl=60)


def own_database(redis_url: str) -> str:
    """A database of these tests' own: the RUNNING jobs they leave behind must not show in the
    metrics other tests scrape from the session's Redis (database 0)."""
    return redis_url.rsplit("/", 1)[0] + "/9"


def new_job() -> str:
    return f"megatron-trtllm-{uuid.uuid4().hex[:16]}"


def test_create_once_and_values_keep_their_types(redis_url):
    rec, job = records(own_database(redis_url)), new_job()
    assert rec.create(job, "megatron-trtllm", {"tp": 2}, output="s3://b/o")
    assert not rec.create(job, "megatron-trtllm", {"tp": 4})  # second submit: same record
    rec.step(job, "reshard:0", state="FAILED", error="123", sha256="0123", done=5)
    record = rec.get(job)
    assert record["spec"] == {"tp": 2} and record["attempt"] == 1 and record["output"] == "s3://b/o"
    step = record["steps"]["reshard:0"]
    assert step["error"] == "123" and step["sha256"] == "0123" and step["done"] == 5


def test_first_failure_wins_and_cancel_is_final(redis_url):
    rec, job = records(own_database(redis_url)), new_job()
    rec.create(job, "megatron-trtllm", {})
    rec.start(job)
    assert job in rec.running_jobs()
    assert rec.finish(job, "FAILED", "reshard:1: first")
    assert not rec.finish(job, "FAILED", "reshard:2: second")
    assert not rec.finish(job, "SUCCEEDED")
    assert rec.get(job)["error"] == "reshard:1: first" and job not in rec.running_jobs()
    other = new_job()
    rec.create(other, "megatron-trtllm", {})
    rec.start(other)
    rec.force_state(other, "CANCELLED", "by request")
    assert not rec.finish(other, "SUCCEEDED") and rec.state(other) == "CANCELLED"
    assert rec.redis.ttl(f"porter:job:{job}") > 0  # ended jobs expire


def test_stale_steps_are_those_without_a_recent_heartbeat(redis_url):
    rec, job = records(own_database(redis_url)), new_job()
    rec.create(job, "megatron-trtllm", {})
    rec.start(job)
    rec.step(job, "reshard:0", state="RUNNING", heartbeat=time.time() - 100)
    rec.step(job, "reshard:1", state="RUNNING", heartbeat=time.time())
    rec.step(job, "reshard:2", state="SUCCEEDED", heartbeat=time.time() - 100)
    stale = [(j, s) for j, s, _ in rec.stale_steps(30) if j == job]
    assert stale == [(job, "reshard:0")]


def test_index_forgets_expired_jobs(redis_url):
    rec, job = records(own_database(redis_url)), new_job()
    rec.create(job, "megatron-trtllm", {})
    assert job in rec.job_ids(1000)
    rec.redis.delete(f"porter:job:{job}")
    assert job not in rec.job_ids(1000)
    assert rec.redis.zscore("porter:jobs", job) is None


def test_a_finished_fan_out_without_its_chord_body_is_found(redis_url):
    from tasks.ops.reaper import stalled_chords

    rec, job = records(own_database(redis_url)), new_job()
    rec.create(job, "megatron-trtllm", {})
    rec.start(job)
    rec.update(job, inspected={"ranks": [{}, {}]})
    long_ago = time.time() - 100
    rec.step(job, "reshard:0", state="SUCCEEDED", finished=long_ago)
    assert (job, "porter.assemble", "config") not in stalled_chords(rec, 30)  # rank 1 missing
    rec.step(job, "reshard:1", state="SUCCEEDED", finished=time.time())
    assert (job, "porter.assemble", "config") not in stalled_chords(rec, 30)  # just finished
    rec.step(job, "reshard:1", state="SUCCEEDED", finished=long_ago)
    assert (job, "porter.assemble", "config") in stalled_chords(rec, 30)
    rec.step(job, "config", state="RUNNING")
    assert (job, "porter.assemble", "config") not in stalled_chords(rec, 30)  # the body started
    assert rec.mark_once(job, "repaired:config:1") and not rec.mark_once(job, "repaired:config:1")


def test_the_reaper_starts_a_stalled_chord_body_once(redis_url):
    """A real reaper pass sends the body of a stalled fan-out (the kind's own task name) to the
    cpu queue, once per attempt. (Before the house issue this path raised: `task_id` was not
    imported in the reaper and a local variable shadowed it.)"""
    import json

    from config.celery_app import make_app
    from config.settings import Settings
    from tasks.ops.reaper import reap

    url = redis_url.rsplit("/", 1)[0] + "/11"  # a database no worker of the session listens on
    settings = Settings(redis_url=url, stale_after=30, reaper_interval=1)
    app, rec, job = make_app(settings), records(url), new_job()
    rec.create(job, "powerinfer-index", {})
    rec.start(job)
    rec.update(job, inspected={"layers": ["a", "b"]})
    for layer in range(2):
        rec.step(job, f"stats:{layer}", state="SUCCEEDED", finished=time.time() - 100)
    sent = reap(app, rec, settings)
    assert sent == [f"{job}:solve-repair:1"]
    queued = [json.loads(m)["headers"] for m in rec.redis.lrange("cpu", 0, -1)]
    assert {"task": "porter.index.solve", "id": sent[0]}.items() <= queued[-1].items()
    rec.redis.delete("porter:reaper")  # the next pass's lock
    assert reap(app, rec, settings) == []  # repaired once
