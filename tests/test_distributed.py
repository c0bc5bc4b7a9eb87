"""Conversions as queued jobs: real redis-server, real `porter worker` processes, S3 over HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
from pathlib import Path

import pytest
import torch

from converters.megatron.example import Layout
from tasks.executors.local import run_conversion
from tasks.jobs.records import JobRecords
from tasks.kinds.megatron_trtllm import ConvertSpec
from tasks.storage.store import open_store

LEGACY_TP2 = Layout("legacy", 2, 1)


def upload(local: Path, uri: str) -> None:
    store = open_store(uri)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.put_file(path, path.relative_to(local).as_posix())


def download(uri: str, local: Path) -> dict[str, bytes]:
    store = open_store(uri)
    files = {}
    for key in store.list():
        store.get_file(key, local / key)
        files[key] = (local / key).read_bytes()
    return files


def reference(source: Path, tmp_path: Path, tp: int) -> dict[str, bytes]:
    """What `porter convert` (the local executor) writes for the same checkpoint."""
    out = tmp_path / f"reference-tp{tp}"
    run_conversion(ConvertSpec(str(source), str(out), tp=tp), workers=1)
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"}


def submit(cluster, source: str, output: str, *extra: str) -> str:
    result = cluster.porter("submit", "megatron-trtllm", source, output, *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0]


def wait_state(records: JobRecords, job: str, states: tuple[str, ...], timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = records.get(job)
        if record and record["state"] in states:
            return record
        time.sleep(0.05)
    raise AssertionError(f"job {job} did not reach {states}: {records.get(job)}")


def test_tp2_to_tp4_s3_to_s3_matches_porter_convert(cluster, s3_env, megatron, tmp_path):
    source = megatron("llama").paths[LEGACY_TP2]
    upload(source, f"s3://{s3_env}/ckpt")
    result = cluster.porter(
        "submit", "megatron-trtllm", f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "4",
        "--wait",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = result.stdout.splitlines()[0]
    assert job.startswith("megatron-trtllm-") and len(result.stdout.splitlines()) == 1

    got = download(f"s3://{s3_env}/out", tmp_path / "got")
    manifest = json.loads(got.pop("manifest.json"))
    assert got == reference(source, tmp_path, 4)  # byte-identical to `porter convert`
    assert manifest["job_id"] == job
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == set(got) == {f"rank{r}.safetensors" for r in range(4)} | {"config.json"}
    import hashlib

    for name, data in got.items():
        assert listed[name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert listed[name]["bytes"] == len(data)

    records = JobRecords(cluster.redis_url)
    record = records.get(job)
    assert record["state"] == "SUCCEEDED" and record["manifest_uri"].endswith("out/manifest.json")
    ranks = [record["steps"][f"reshard:{r}"] for r in range(4)]
    assert all(s["state"] == "SUCCEEDED" and s["deliveries"] == 1 for s in ranks)
    workers = {s["worker"] for s in ranks}
    assert len(workers) == 2, workers  # both workers took ranks
    # Each rank fetched its share of the weights, not the whole checkpoint (optimizer state too).
    object_bytes = sum(open_store(f"s3://{s3_env}/ckpt").stat(k).bytes for k in
                       open_store(f"s3://{s3_env}/ckpt").list())  # fmt: skip
    # A rank needs its share of the weights (fetched, or cached by an earlier rank on the same
    # worker), never the optimizer state stored in the same files.
    needed = [s["bytes_fetched"] + s["bytes_cached"] for s in ranks]
    assert all(0 < n < object_bytes / 4 for n in needed), (needed, object_bytes)
    assert 0 < sum(s["bytes_fetched"] for s in ranks) < object_bytes / 2

    status = cluster.porter("status", job, "--json")
    assert json.loads(status.stdout)["state"] == "SUCCEEDED"
    assert job in cluster.porter("jobs").stdout


def test_same_job_submitted_twice_concurrently_converts_once(cluster, s3_env, megatron):
    upload(megatron("gpt").paths[LEGACY_TP2], f"s3://{s3_env}/ckpt")
    args = ("submit", "megatron-trtllm", f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "2")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: cluster.porter(*args), range(3)))
    ids = {r.stdout.splitlines()[0] for r in results}
    assert len(ids) == 1, [r.stdout for r in results]
    assert sum("already submitted" in r.stderr for r in results) == 2
    job = ids.pop()
    records = JobRecords(cluster.redis_url)
    wait_state(records, job, ("SUCCEEDED",))
    again = cluster.porter(*args)  # after it finished: same id, nothing queued
    assert again.stdout.splitlines()[0] == job and "already submitted" in again.stderr
    record = records.get(job)
    assert record["attempt"] == 1
    assert [record["steps"][f"reshard:{r}"]["deliveries"] for r in range(2)] == [1, 1]
    assert records.job_ids().count(job) == 1


def _break_shard(checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of a TP=2 checkpoint whose second shard has a truncated MLP weight."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    [path] = broken.glob("*/mp_rank_01/model_optim_rng.pt")
    payload = torch.load(path, weights_only=False)
    key = next(k for k in payload["model"] if k.endswith("mlp.linear_fc1.weight"))
    payload["model"][key] = payload["model"][key][:-2].clone()
    torch.save(payload, path)
    return broken


def test_failing_rank_fails_the_job_and_retry_completes_it(cluster, s3_env, megatron, tmp_path):
    good = megatron("llama").paths[LEGACY_TP2]
    upload(_break_shard(good, tmp_path), f"s3://{s3_env}/ckpt")
    job = submit(cluster, f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "4")
    records = JobRecords(cluster.redis_url)
    record = wait_state(records, job, ("FAILED", "SUCCEEDED"))
    assert record["state"] == "FAILED"
    # The rank's own message: which file, what is wrong with it.
    assert record["error"].startswith("reshard:")
    assert "mp_rank_01" in record["error"] and "shape" in record["error"], record["error"]
    failed = [n for n, s in record["steps"].items() if s["state"] == "FAILED"]
    assert failed and all(n in ("reshard:2", "reshard:3") for n in failed)
    assert open_store(f"s3://{s3_env}/out").stat("manifest.json") is None
    status = cluster.porter("status", job)
    assert "FAILED" in status.stdout and "mp_rank_01" in status.stdout

    upload(good, f"s3://{s3_env}/ckpt")  # fix the source
    result = cluster.porter("retry", job, "--wait")
    assert result.returncode == 0, result.stderr
    record = records.get(job)
    assert record["state"] == "SUCCEEDED" and record["attempt"] == 2
    got = download(f"s3://{s3_env}/out", tmp_path / "got")
    manifest = json.loads(got.pop("manifest.json"))
    assert manifest["job_id"] == job
    assert got == reference(good, tmp_path, 4)


def test_tp1_single_rank_job(cluster, s3_env, megatron, tmp_path):
    source = megatron("gpt").paths[Layout("legacy", 1, 2)]
    upload(source, f"s3://{s3_env}/ckpt")
    result = cluster.porter(
        "submit", "megatron-trtllm", f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "1",
        "--wait",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = download(f"s3://{s3_env}/out", tmp_path / "got")
    assert set(got) == {"rank0.safetensors", "config.json", "manifest.json"}
    got.pop("manifest.json")
    assert got == reference(source, tmp_path, 1)


def test_submit_of_a_bad_source_fails_clearly(cluster, s3_env):
    result = cluster.porter(
        "submit",
        "megatron-trtllm",
        f"s3://{s3_env}/nothing-here",
        f"s3://{s3_env}/out",
        "--tp",
        "2",
    )
    assert result.returncode == 1 and result.stdout == ""
    assert f"s3://{s3_env}/nothing-here" in result.stderr


def test_cancel_mid_job_stops_the_ranks_and_publishes_nothing(cluster, s3_env, megatron, tmp_path):
    upload(megatron("llama").paths[LEGACY_TP2], f"s3://{s3_env}/ckpt")
    records = JobRecords(cluster.redis_url)
    job = submit(cluster, f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "8")
    # Freeze the workers as soon as the first rank starts, so the job is caught mid-way.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        steps = dict(records.steps(job))
        if any(n.startswith("reshard:") for n in steps):
            break
        time.sleep(0.002)
    cluster.signal_workers(signal.SIGSTOP)
    try:
        before = dict(records.steps(job))
        result = cluster.porter("cancel", job)
    finally:
        cluster.signal_workers(signal.SIGCONT)
    assert result.returncode == 0, result.stderr
    done_before = [
        n for n, s in before.items() if n.startswith("reshard:") and s.get("state") == "SUCCEEDED"
    ]
    if len(done_before) == 8:
        pytest.skip("the job finished before the workers could be frozen")
    time.sleep(2)  # let the workers notice: queued ranks are revoked, running ones stop
    record = records.get(job)
    assert record["state"] == "CANCELLED"
    ran = [n for n, s in record["steps"].items() if n.startswith("reshard:")]
    assert len(ran) < 8  # not every rank ran
    out = open_store(f"s3://{s3_env}/out")
    assert out.list() == []  # nothing published, nothing left behind
    assert cluster.porter("cancel", job).returncode == 1  # already ended


def test_engines_are_built_per_rank_on_the_gpu_queue(cluster, s3_env, megatron, tmp_path):
    """The engine chord with a stand-in for the TensorRT-LLM builder executable (no GPU here).

    The gpu worker is started as a plain Celery worker because `porter worker --queues gpu`
    refuses to start without TensorRT-LLM and a GPU (checked below)."""
    import sys

    refused = cluster.porter("worker", "--queues", "gpu", timeout=60)
    assert refused.returncode == 1 and "cannot build engines" in refused.stderr

    log = tmp_path / "builder.jsonl"
    fake = Path(__file__).with_name("fake_trtllm_build.py")
    celery = [sys.executable, "-m", "celery", "-A", "config.celery_app", "worker", "-Q", "gpu",
              "-c", "1", "--max-tasks-per-child=1", "-n", f"gpu-{tmp_path.name}@%h"]  # fmt: skip
    env = {"PORTER_TRTLLM_BUILD": f"{sys.executable} {fake}", "FAKE_TRTLLM_LOG": str(log)}
    gpu = cluster.start_worker(command=celery, env=env)
    try:
        cluster.wait_for_workers(3)
        upload(megatron("llama").paths[LEGACY_TP2], f"s3://{s3_env}/ckpt")
        job = submit(cluster, f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "2", "--engines")
        record = wait_state(JobRecords(cluster.redis_url), job, ("SUCCEEDED", "FAILED"))
    finally:
        cluster.stop_worker(gpu)
    assert record["state"] == "SUCCEEDED", record["error"]
    manifest = open_store(f"s3://{s3_env}/out").get_json("manifest.json")
    listed = {f["path"] for f in manifest["files"]}
    assert {"engines/rank0.engine", "engines/rank1.engine", "engines/config.json"} <= listed
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    ranks = sorted(int(c["argv"][c["argv"].index("--rank") + 1]) for c in calls)
    assert ranks == [0, 1]  # one build per rank, each once
    assert record["steps"]["engine:0"]["state"] == "SUCCEEDED"


def test_porter_convert_runs_the_same_steps_on_s3(s3_env, megatron, tmp_path, capsys):
    """The local executor takes s3:// in and out too (no servers), with the same bytes."""
    from tasks.cli.main import main

    source = megatron("llama").paths[LEGACY_TP2]
    upload(source, f"s3://{s3_env}/ckpt")
    code = main(["convert", "megatron-trtllm", f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out",
                 "--tp", "2", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    got = download(f"s3://{s3_env}/out", tmp_path / "got")
    assert json.loads(got.pop("manifest.json"))["spec"]["source"] == f"s3://{s3_env}/ckpt"
    assert got == reference(source, tmp_path, 2)
    # Again: already converted, nothing to do.
    assert main(["convert", "megatron-trtllm", f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out",
                 "--tp", "2", "--quiet"]) == 0  # fmt: skip
    assert "already converted" in capsys.readouterr().out
