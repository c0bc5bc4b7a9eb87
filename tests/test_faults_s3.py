"""S3 faults, for real: a proxy in front of moto's server injects 500s, 503 SlowDown, connection
resets, truncated and short bodies and latency, or a persistent outage (tests/fault_proxy.py).

A conversion through the faults completes with the same bytes as `porter convert` from local
files (and the sha256s its manifest records); through an outage it fails with the S3 error and
publishes nothing. The numbers these tests print (`-s`) are the ones in docs/RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from converters.megatron.example import Layout
from converters.torch_arrays import materialize as as_torch
from tasks.executors.local import run_conversion
from tasks.jobs.records import JobRecords
from tasks.kinds.megatron_trtllm import ConvertSpec
from tasks.storage import sources
from tasks.storage.base import ArtifactError
from tasks.storage.store import open_store
from tests.cluster import Cluster, worker_env
from tests.fault_proxy import KINDS, FaultProxy, Faults
from tests.test_distributed import download, reference, upload, wait_state

LEGACY_TP2 = Layout("legacy", 2, 1)
# About one request in six gets a fault, every kind in turn (a seeded share: the same faults
# for the same sequence of requests); a request fails at most 3 times in a row, fewer than
# botocore's and Porter's attempts, so the job must complete.
MIXED = Faults(share=0.18, seed=6, latency=0.05, max_in_a_row=3)
# Faults that need no retry, besides latency: a cut error body (a 404 is known from its status).
SLACK = 3
# Each GET is cut once; its repetition gets through.
ONCE = {"every": 1, "max_in_a_row": 1, "methods": frozenset({"GET"})}
_DB = 9  # the Redis database of this module's own small cluster (the shared one uses 0)


@pytest.fixture(scope="module")
def proxy(moto_s3: str):
    with FaultProxy(moto_s3) as p:
        yield p


@pytest.fixture
def faulty(proxy: FaultProxy, s3_env: str, monkeypatch: pytest.MonkeyPatch) -> FaultProxy:
    """The proxy, with no faults configured and fresh counters; this test's boto3 clients go
    through it once `use(proxy)` is called (uploads of fixtures go straight to moto before)."""
    proxy.configure(Faults())
    proxy.outage = None
    proxy.reset_stats()
    return proxy


def use(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)


def check_output(uri: str, want: dict[str, bytes], tmp_path: Path) -> dict:
    """OUTPUT holds exactly `want` plus a manifest whose sha256s and sizes match the bytes."""
    got = download(uri, tmp_path / "got")
    manifest = json.loads(got.pop("manifest.json"))
    assert got == want  # byte-identical to `porter convert` of the local checkpoint
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == set(got)
    for name, data in got.items():
        assert listed[name]["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert listed[name]["bytes"] == len(data), name
    return manifest


def report(what: str, proxy: FaultProxy, seconds: float) -> None:
    s = proxy.stats
    print(
        f"\n[faults] {what}: {s.requests} requests, {s.injected} faults {dict(s.faults)}, "
        f"{s.retries} retried, outage {s.outage}, {s.wasted_bytes} of {s.body_bytes} body bytes "
        f"wasted, {seconds:.1f} s"
    )


# --------------------------------------------------------------------------------------------
# Faults on a share of requests: the conversion completes with the right bytes


def test_local_executor_completes_through_faults(
    faulty: FaultProxy, s3_env: str, megatron, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = megatron("llama").paths[LEGACY_TP2]
    upload(checkpoint, f"s3://{s3_env}/ckpt")
    want = reference(checkpoint, tmp_path, 4)
    use(faulty, monkeypatch)
    monkeypatch.setenv("PORTER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PORTER_FETCH_COALESCE_BYTES", "0")  # many small GETs: more to break
    faulty.configure(MIXED)
    started = time.perf_counter()
    spec = ConvertSpec(f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", tp=4)
    summary = run_conversion(spec, workers=1)
    seconds = time.perf_counter() - started
    report("local executor, TP=2 → TP=4, s3 → s3", faulty, seconds)
    stats = faulty.reset_stats()
    faulty.configure(Faults())
    check_output(f"s3://{s3_env}/out", want, tmp_path)
    assert summary.job_id and len(summary.fanned("reshard")) == 4
    assert stats.injected >= 10, stats
    assert set(stats.faults) == set(KINDS), stats
    assert stats.retries >= stats.injected - stats.faults["latency"] - SLACK, stats


def test_queued_job_completes_through_faults(
    faulty: FaultProxy, faulty_cluster: Cluster, s3_env: str, megatron, tmp_path: Path
) -> None:
    checkpoint = megatron("llama").paths[LEGACY_TP2]
    upload(checkpoint, f"s3://{s3_env}/ckpt")
    want = reference(checkpoint, tmp_path, 4)
    faulty.configure(MIXED)
    started = time.perf_counter()
    result = faulty_cluster.porter(
        "submit", "megatron-trtllm", f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "4",
        "--wait",
    )  # fmt: skip
    seconds = time.perf_counter() - started
    report("queued job, TP=2 → TP=4, s3 → s3, worker behind the proxy", faulty, seconds)
    stats = faulty.reset_stats()
    faulty.configure(Faults())
    assert result.returncode == 0, result.stderr + _logs(faulty_cluster)
    job = result.stdout.splitlines()[0]
    manifest = check_output(f"s3://{s3_env}/out", want, tmp_path)
    assert manifest["job_id"] == job
    record = JobRecords(faulty_cluster.redis_url).get(job)
    assert record["state"] == "SUCCEEDED"
    # Retried inside the steps: no step failed or was delivered twice.
    assert all(s["deliveries"] == 1 for s in record["steps"].values()), record["steps"]
    assert stats.injected >= 10, stats
    assert stats.retries >= stats.injected - stats.faults["latency"] - SLACK, stats


# --------------------------------------------------------------------------------------------
# Truncated bodies never become wrong bytes


@pytest.mark.parametrize("kind", ["truncate", "short", "bare"])
def test_cut_bodies_are_read_again_by_the_sparse_mirror(
    kind: str,
    faulty: FaultProxy,
    s3_env: str,
    megatron,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every other GET of a rank's byte ranges is cut short: with Content-Length announcing the
    full body (`truncate`), or delimited by the connection's end, which HTTP cannot tell from a
    complete body (`short`). The mirror holds exactly the source's bytes either way."""
    from converters.megatron.layout import open_checkpoint
    from converters.trtllm.plan import Target

    checkpoint = megatron("llama").paths[LEGACY_TP2]
    upload(checkpoint, f"s3://{s3_env}/ckpt")
    use(faulty, monkeypatch)
    faulty.configure(Faults(kinds=(kind,), **ONCE))
    source, stats = sources.open_source_for_rank(
        f"s3://{s3_env}/ckpt", Target(4), 1, tmp_path / "cache", coalesce_gap=0
    )
    got = faulty.reset_stats()
    faulty.configure(Faults())
    assert got.faults[kind] >= 10 and got.retries == got.faults[kind], got
    # Every byte range the mirror recorded equals the source file's bytes there.
    compared = 0
    for record in (tmp_path / "cache").glob("objects/*/*/ranges.json"):
        ranges = json.loads(record.read_text())
        relative = ranges["uri"].split("/ckpt/", 1)[1]
        original = (checkpoint / relative).read_bytes()
        mirrored = (record.parent / "data").read_bytes()
        assert len(mirrored) == len(original)
        for start, end in ranges["ranges"]:
            assert mirrored[start:end] == original[start:end], (relative, start, end)
            compared += end - start
    assert compared >= stats.bytes_fetched > 0
    # And the rank converts to the same tensors as from the local files.
    local = open_checkpoint(checkpoint)
    for name in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight"):
        if local.has(name):
            assert as_torch(source.tensor(name)).equal(as_torch(local.tensor(name)))


@pytest.mark.parametrize("kind", ["truncate", "short", "bare"])
def test_cut_bodies_in_whole_object_reads(
    kind: str, faulty: FaultProxy, s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Downloads (`get_file`: size and sha256), JSON reads (the recorded sha256) and ranged
    reads (Content-Range) of the store itself. A ranged body that announces no length at all
    (`bare`) can only be checked by a caller that knows the object's size: the store returns
    what arrived, a prefix, as it would at the end of the object (the sparse mirror reads on)."""
    data = bytes(range(256)) * 4096  # 1 MiB
    (tmp_path / "blob").write_bytes(data)
    store = open_store(f"s3://{s3_env}/x")
    store.put_file(tmp_path / "blob", "blob.bin")
    store.put_json_if_absent("m.json", {"files": list(range(2000))})
    use(faulty, monkeypatch)
    store = open_store(f"s3://{s3_env}/x")
    faulty.configure(Faults(kinds=(kind,), **ONCE))
    store.get_file("blob.bin", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data
    assert store.get_json("m.json") == {"files": list(range(2000))}
    for start in (0, 1000, len(data) - 10):
        got, want = store.read_range("blob.bin", start, 5000), data[start : start + 5000]
        assert got == want or (kind == "bare" and got and want.startswith(got))
    stats = faulty.reset_stats()
    faulty.configure(Faults())
    unnoticed = 3 if kind == "bare" else 0  # the three `bare` ranged reads above
    assert stats.faults[kind] >= 3 and stats.retries == stats.faults[kind] - unnoticed, stats


def test_cut_error_bodies_are_read_again(
    faulty: FaultProxy, s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GET's error response (404 for a manifest not there yet) whose XML body is cut halfway:
    botocore reads that body itself, outside its retries (seen failing a queued job's publish in
    CI through this proxy); the store asks again."""
    store = open_store(f"s3://{s3_env}/x")
    (tmp_path / "blob").write_bytes(b"x" * 1000)
    store.put_file(tmp_path / "blob", "blob.bin")  # the bucket exists; the manifest does not
    use(faulty, monkeypatch)
    store = open_store(f"s3://{s3_env}/x")
    faulty.configure(Faults(kinds=("truncate",), **ONCE))
    assert store.get_json("manifest.json") is None
    stats = faulty.reset_stats()
    faulty.configure(Faults())
    assert stats.faults["truncate"] >= 1 and stats.retries == stats.faults["truncate"], stats


def test_a_body_cut_short_every_time_fails_clearly(
    faulty: FaultProxy, s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "blob").write_bytes(b"x" * 100_000)
    open_store(f"s3://{s3_env}/x").put_file(tmp_path / "blob", "blob.bin")
    use(faulty, monkeypatch)
    store = open_store(f"s3://{s3_env}/x")
    faulty.configure(Faults(every=1, kinds=("short",), methods=frozenset({"GET"})))
    with pytest.raises(ArtifactError) as info:
        store.read_range("blob.bin", 0, 50_000)
    faulty.configure(Faults())
    message = str(info.value)
    assert store.uri("blob.bin") in message and "ended after 25000 of 50000 bytes" in message


# --------------------------------------------------------------------------------------------
# A persistent outage: FAILED with the S3 error, nothing published


def test_outage_fails_the_local_conversion_and_publishes_nothing(
    faulty: FaultProxy, s3_env: str, megatron, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(megatron("llama").paths[LEGACY_TP2], f"s3://{s3_env}/ckpt")
    use(faulty, monkeypatch)
    monkeypatch.setenv("PORTER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # fail within seconds
    faulty.outage = "503"
    spec = ConvertSpec(f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", tp=4)
    started = time.perf_counter()
    with pytest.raises(ArtifactError) as info:
        run_conversion(spec, workers=1)
    report("local executor, persistent 503 outage", faulty, time.perf_counter() - started)
    faulty.outage = None
    message = str(info.value)
    assert f"s3://{s3_env}/ckpt" in message and "HTTP 503" in message, message
    assert "after 2 retries" in message, message
    assert open_store(f"s3://{s3_env}/out").list() == []


def test_outage_from_a_rank_upload_on_reports_the_rank_error(
    faulty: FaultProxy, s3_env: str, megatron, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 is uploaded; the outage starts with rank 1's upload and lasts through cleanup."""
    upload(megatron("llama").paths[LEGACY_TP2], f"s3://{s3_env}/ckpt")
    use(faulty, monkeypatch)
    monkeypatch.setenv("PORTER_CACHE_DIR", str(tmp_path / "cache"))
    faulty.outage_from = ("500", lambda method, path: method == "PUT" and "rank1" in path)
    spec = ConvertSpec(f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", tp=4)
    try:
        with pytest.raises(ArtifactError) as info:
            run_conversion(spec, workers=1)
    finally:
        faulty.outage = faulty.outage_from = None
    message = str(info.value)
    assert message.startswith(f"s3://{s3_env}/out/rank1.safetensors: S3 PutObject failed"), message
    out = open_store(f"s3://{s3_env}/out")  # rank 0: whole, tagged, never published
    assert out.stat("manifest.json") is None and out.list() in (["rank0.safetensors"], [])


def test_outage_mid_job_fails_the_queued_job_and_publishes_nothing(
    faulty: FaultProxy, faulty_cluster: Cluster, s3_env: str, megatron, tmp_path: Path
) -> None:
    """The outage starts once the worker has read the source's metadata (the job is planned
    and its ranks are fetching), and lasts."""
    upload(megatron("llama").paths[LEGACY_TP2], f"s3://{s3_env}/ckpt")
    records = JobRecords(faulty_cluster.redis_url)
    faulty.configure(Faults(every=1, kinds=("latency",), latency=0.02))  # a slower S3
    result = faulty_cluster.porter(
        "submit", "megatron-trtllm", f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "4"
    )
    assert result.returncode == 0, result.stderr
    job = result.stdout.splitlines()[0]
    deadline = time.monotonic() + 60
    while not any(n.startswith("reshard:") for n, _ in records.steps(job)):
        assert time.monotonic() < deadline, records.get(job)
        time.sleep(0.01)
    faulty.outage = "reset"
    started = time.perf_counter()
    record = wait_state(records, job, ("FAILED", "SUCCEEDED"), timeout=120)
    report("queued job, connection resets from mid-job on", faulty, time.perf_counter() - started)
    print(record["error"])
    faulty.outage = None
    assert record["state"] == "FAILED", record
    error = record["error"]
    assert error.startswith("reshard:") and f"s3://{s3_env}/" in error, error
    assert "S3" in error and "Connection was closed" in error, error
    out = open_store(f"s3://{s3_env}/out")
    assert out.stat("manifest.json") is None
    # Whatever a finished rank uploaded is whole (its recorded sha256 holds) and unpublished.
    for key in out.list():
        art = out.stat(key)
        assert key.startswith("rank") and art.sha256 and art.tag, key
        out.get_file(key, tmp_path / "check" / key)


# --------------------------------------------------------------------------------------------
# A small cluster of this module's own: one worker whose S3 endpoint is the proxy


@pytest.fixture(scope="module")
def faulty_cluster(redis_url: str, moto_s3: str, proxy: FaultProxy, tmp_path_factory):
    """Redis database `_DB` (its own queues), one `porter worker` (two pool processes) that
    reaches S3 through the proxy; the client (`porter submit`) goes to moto directly."""
    base = tmp_path_factory.mktemp("faulty-cluster")
    (base / "logs").mkdir()
    (base / "cache").mkdir()
    url = redis_url.rsplit("/", 1)[0] + f"/{_DB}"
    env = worker_env(url, moto_s3, base / "cache")
    cluster = Cluster(url, env, base / "logs", base / "cache")
    cluster.start_worker(concurrency=2, env={"AWS_ENDPOINT_URL_S3": proxy.url})
    try:
        cluster.wait_for_workers(1)
        yield cluster
    finally:
        cluster.stop()


def _logs(cluster: Cluster) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in cluster.logs.iterdir())
