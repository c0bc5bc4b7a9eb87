"""Workers that die mid-job: the job still completes with the same bytes, or fails clearly.

The workers run with the production visibility timeout (12 h), so recovery from a dead worker
comes from the step heartbeats and the reaper (tasks/reaper.py), not from the broker.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

from converters.megatron.example import Layout
from tasks.jobs.records import JobRecords
from tasks.kinds import megatron_trtllm as steps
from tasks.kinds.megatron_trtllm import ConvertSpec
from tasks.storage.store import open_store
from tests.test_distributed import download, reference, submit, upload, wait_state

LEGACY_TP2 = Layout("legacy", 2, 1)


def running_step(records: JobRecords, job: str, prefix: str = "reshard:", timeout: float = 60):
    """(name, fields) of the first step of `job` seen RUNNING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, fields in records.steps(job):
            if name.startswith(prefix) and fields.get("state") == "RUNNING":
                return name, fields
        time.sleep(0.003)
    raise AssertionError(f"no {prefix} step of {job} was seen running")


def pid_of(fields: dict) -> int:
    return int(str(fields["worker"]).rsplit(":", 1)[1])


def assert_outputs(bucket: str, source, tmp_path, tp: int) -> None:
    got = download(f"s3://{bucket}/out", tmp_path / "got")
    manifest = got.pop("manifest.json")
    assert got == reference(source, tmp_path, tp), "output differs from an undisturbed run"
    assert b'"job_id"' in manifest


def test_kill_9_of_a_whole_worker_mid_rank_recovers_in_seconds(cluster, s3_env, megatron, tmp_path):
    source = megatron("llama").paths[LEGACY_TP2]
    upload(source, f"s3://{s3_env}/ckpt")
    records = JobRecords(cluster.redis_url)
    job = submit(cluster, f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "4")
    step, fields = running_step(records, job)
    victim = cluster.worker_of(pid_of(fields))
    killed_at = time.monotonic()
    cluster.stop_worker(victim, signal.SIGKILL)  # main process and pool child, no goodbye
    try:
        record = wait_state(records, job, ("SUCCEEDED", "FAILED"), timeout=60)
        recovered = time.monotonic() - killed_at
        assert record["state"] == "SUCCEEDED", record["error"]
        assert recovered < 30  # the visibility timeout is 12 h
        assert record["steps"][step]["deliveries"] == 2
        assert record["steps"][step]["node"] != fields["node"]
        assert_outputs(s3_env, source, tmp_path, 4)
        assert set(open_store(f"s3://{s3_env}/out").list()) == {
            *(f"rank{r}.safetensors" for r in range(4)),
            "config.json",
            "manifest.json",
        }
    finally:
        cluster.start_worker()
        cluster.wait_for_workers(2)


def test_kill_9_of_the_pool_child_only_is_redelivered(cluster, s3_env, megatron, tmp_path):
    """What the OOM killer does: the worker survives and hands the task back at once."""
    source = megatron("llama").paths[LEGACY_TP2]
    upload(source, f"s3://{s3_env}/ckpt")
    records = JobRecords(cluster.redis_url)
    job = submit(cluster, f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "4")
    step, fields = running_step(records, job)
    os.kill(pid_of(fields), signal.SIGKILL)  # the pool child only
    record = wait_state(records, job, ("SUCCEEDED", "FAILED"), timeout=60)
    assert record["state"] == "SUCCEEDED", record["error"]
    assert record["steps"][step]["deliveries"] == 2
    assert_outputs(s3_env, source, tmp_path, 4)


def test_a_rank_that_kills_its_worker_every_time_fails_the_job_not_the_queue(
    cluster, s3_env, megatron, tmp_path
):
    source = megatron("llama").paths[LEGACY_TP2]
    upload(source, f"s3://{s3_env}/ckpt")
    records = JobRecords(cluster.redis_url)
    # The workers are held while `porter submit` runs: a rank of this tiny model takes ~0.1 s,
    # and the job could be over before the command has exited and the watcher below begun.
    cluster.signal_workers(signal.SIGSTOP)
    try:
        job = submit(cluster, f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "4")
    finally:
        cluster.signal_workers(signal.SIGCONT)
    killed: set[float] = set()  # starts of rank 1 killed so far (one per delivery)
    seen: list[tuple] = []  # what the watcher saw, for the failure message
    deadline = time.monotonic() + 90
    # Supervised as in production: a pool wedged by the kills makes the watchdog stop its worker,
    # and the re-queued rank then needs a new one (unsupervised, the job could wait forever).
    with cluster.supervised():
        while (state := records.state(job)) in ("PENDING", "RUNNING") and (
            time.monotonic() < deadline
        ):
            fields = dict(records.steps(job)).get("reshard:1", {})
            if not seen or seen[-1] != (state, fields.get("state"), fields.get("started")):
                seen.append((state, fields.get("state"), fields.get("started")))
            # A killed delivery stays RUNNING in the record until the next one starts: key on
            # the start time, not on the delivery counter (counted before the new start is
            # recorded).
            if fields.get("state") == "RUNNING" and fields["started"] not in killed:
                with contextlib.suppress(ProcessLookupError):  # the OOM killer, each time
                    os.kill(pid_of(fields), signal.SIGKILL)
                killed.add(fields["started"])
            time.sleep(0.003)
    record = records.get(job)
    assert record["state"] == "FAILED", f"{seen}\n{state}\n{record}\n{cluster.log_tails()}"
    assert len(killed) == 3
    assert record["steps"]["reshard:1"]["deliveries"] == 4  # the fourth was refused
    assert "reshard:1" in record["error"] and "died 3 times" in record["error"]
    assert open_store(f"s3://{s3_env}/out").stat("manifest.json") is None
    # The queue is not poisoned: the next job goes through. Killed pool processes can wedge a
    # worker's pool (tasks/pool_watchdog.py); the watchdog then stops it and, as in production,
    # a supervisor starts a new one.
    upload(source, f"s3://{s3_env}/ckpt2")
    with cluster.supervised():
        try:
            result = cluster.porter(
                "submit", "megatron-trtllm", f"s3://{s3_env}/ckpt2", f"s3://{s3_env}/out2",
                "--tp", "2", "--wait", timeout=180,
            )  # fmt: skip
        except subprocess.TimeoutExpired as timeout:
            raise AssertionError(f"{timeout}\n{cluster.log_tails()}") from None
    assert result.returncode == 0, result.stderr


def _convert_rank0(spec: dict, tag: str) -> dict:
    return steps.convert_rank_step(ConvertSpec.from_dict(spec), tag, 0)


def test_duplicate_deliveries_of_a_rank_commit_one_output_with_the_same_bytes(
    s3_env, megatron, tmp_path
):
    """Two workers racing on the same rank (a late duplicate delivery) write the same object."""
    source = megatron("llama").paths[LEGACY_TP2]
    upload(source, f"s3://{s3_env}/ckpt")
    spec = ConvertSpec(f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", tp=2)
    tag = steps.inspect_source(spec)["tag"]
    context = multiprocessing.get_context("spawn")  # two processes, as two workers would be
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        results = list(pool.map(_convert_rank0, [spec.to_dict()] * 2, [tag] * 2))
    assert results[0]["sha256"] == results[1]["sha256"]
    store = open_store(f"s3://{s3_env}/out")
    assert store.list() == ["rank0.safetensors"]
    assert store.stat("rank0.safetensors").sha256 == results[0]["sha256"]
    late = steps.convert_rank_step(spec, tag, 0)  # after the fact: returns the committed one
    assert late["reused"] and late["sha256"] == results[0]["sha256"]


def test_fifty_jobs_at_once_all_complete_once(cluster, megatron, tmp_path, monkeypatch):
    from config.celery_app import app
    from tasks.jobs import service

    # This process imported the app before the cluster existed: point it at the cluster.
    monkeypatch.setattr(app.conf, "broker_url", cluster.redis_url)
    monkeypatch.setattr(app.conf, "result_backend", cluster.redis_url)
    source = megatron("gpt").paths[Layout("legacy", 1, 1)]
    records = JobRecords(cluster.redis_url)
    specs = [ConvertSpec(str(source), str(tmp_path / f"out{i}"), tp=1) for i in range(50)]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # all at once
        submitted = list(pool.map(lambda spec: service.submit(spec, records), specs))
    jobs = [job for job, created in submitted if created]
    assert len(set(jobs)) == 50
    done = [wait_state(records, job, ("SUCCEEDED", "FAILED"), timeout=180) for job in jobs]
    elapsed = time.monotonic() - started
    assert [r["state"] for r in done] == ["SUCCEEDED"] * 50, done[0]["error"]  # none lost
    for spec, record in zip(specs, done, strict=True):
        manifest = json.loads((Path(spec.output) / "manifest.json").read_text())
        assert manifest["job_id"] == record["id"]
        assert record["steps"]["reshard:0"]["deliveries"] == 1  # none duplicated
    print(f"50 jobs on 2 workers: {elapsed:.1f} s")
