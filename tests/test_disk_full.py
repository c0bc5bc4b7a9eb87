"""Scratch disk full during a rank: the job fails with a message naming the file and the lack of
space, its scratch files are gone and nothing is published.

Two ways to run out of space, both real: a file-size limit on the process (RLIMIT_FSIZE: Python
ignores SIGXFSZ, so the write raises EFBIG), which works anywhere; and a small tmpfs mounted as
OUTPUT (ENOSPC), where this machine lets the test mount one (root in a container usually can).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from converters.megatron.example import Layout
from tasks.jobs.records import JobRecords
from tasks.storage.store import open_store
from tests.cluster import PORTER, Cluster, worker_env
from tests.test_distributed import wait_state

LEGACY_TP2 = Layout("legacy", 2, 1)
# Output ranks of the llama fixture at TP=4 are ~186 KB each; config.json under 1 KB.
LIMIT = 100_000
_DB = 10  # the Redis database of this module's own small cluster (the shared one uses 0)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def porter_convert(source: Path | str, output: Path, *args: str, limited: bool = False):
    return subprocess.run(
        [PORTER, "convert", "megatron-trtllm", str(source), str(output), "--tp", "4", *args],
        preexec_fn=_limit_file_size if limited else None,
        capture_output=True,
        text=True,
        timeout=120,
    )


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize("workers", ["1", "2"])
def test_file_size_limit_fails_porter_convert_clearly(megatron, tmp_path: Path, workers: str):
    """One worker (ranks in the `porter` process) and two (rank processes of a pool)."""
    source = megatron("llama").paths[LEGACY_TP2]
    out = tmp_path / "out"
    started = time.perf_counter()
    result = porter_convert(source, out, "--workers", workers, "--quiet", limited=True)
    seconds = time.perf_counter() - started
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()  # one line
    print(f"\n[disk] porter convert --workers {workers}, RLIMIT_FSIZE {LIMIT}: {seconds:.1f} s")
    assert line.startswith(f"porter: error: {out}/rank"), line
    assert "file too large" in line and "RLIMIT_FSIZE" in line, line
    assert f"{out}/.porter-tmp-" in line, line  # the scratch file that could not be written
    assert not out.exists(), leftovers(out)  # OUTPUT was created by the run: removed again


def test_file_size_limit_in_the_source_cache_fails_clearly(
    megatron, s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """From S3, each source object becomes a sparse cache file of its full size (~0.96 MB here):
    the first one outgrows the limit."""
    from tests.test_distributed import upload

    upload(megatron("llama").paths[LEGACY_TP2], f"s3://{s3_env}/ckpt")
    monkeypatch.setenv("PORTER_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = porter_convert(f"s3://{s3_env}/ckpt", out, "--quiet", limited=True)
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"porter: error: s3://{s3_env}/ckpt/iter_0000010/mp_rank_0"), line
    assert "file too large" in line and f"source cache file {tmp_path}/cache/" in line, line
    assert "PORTER_CACHE_DIR" in line and not out.exists(), line


def test_full_tmpfs_fails_porter_convert_clearly(megatron, tmp_path: Path):
    """OUTPUT is a 400 KiB tmpfs: two ranks fit, the third runs out of space."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        result = porter_convert(megatron("llama").paths[LEGACY_TP2], mount, "--workers", "1")
        assert result.returncode == 1, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"porter: error: {mount}/rank"), line
        assert "no space left on device" in line and f"{mount}/.porter-tmp-" in line, line
        assert leftovers(mount) == []  # finished ranks removed too: nothing published
        assert os.statvfs(mount).f_bfree == os.statvfs(mount).f_blocks  # all space back
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# --------------------------------------------------------------------------------------------
# A queued job: the worker runs under the file-size limit


@pytest.fixture(scope="module")
def limited_cluster(redis_url: str, moto_s3: str, tmp_path_factory):
    """Redis database `_DB` (its own queues) and one `porter worker` under RLIMIT_FSIZE, with
    its scratch directory (TMPDIR) of its own."""
    base = tmp_path_factory.mktemp("limited-cluster")
    for name in ("logs", "cache", "scratch"):
        (base / name).mkdir()
    url = redis_url.rsplit("/", 1)[0] + f"/{_DB}"
    cluster = Cluster(url, worker_env(url, moto_s3, base / "cache"), base / "logs", base / "cache")
    limited = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, {LIMIT})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    command = [sys.executable, "-c", limited, PORTER, "worker", "--queues", "cpu"]
    cluster.start_worker(
        command=[*command, "--concurrency", "1"], env={"TMPDIR": str(base / "scratch")}
    )
    cluster.scratch = base / "scratch"  # type: ignore[attr-defined]
    try:
        cluster.wait_for_workers(1)
        yield cluster
    finally:
        cluster.stop()


def test_file_size_limit_fails_a_queued_rank_clearly(
    limited_cluster: Cluster, s3_env: str, megatron
) -> None:
    """Local source (a shared path), S3 output: the rank is written to a scratch file under
    TMPDIR, which outgrows the limit."""
    source = megatron("llama").paths[LEGACY_TP2]
    started = time.perf_counter()
    result = limited_cluster.porter(
        "submit", "megatron-trtllm", str(source), f"s3://{s3_env}/out", "--tp", "4"
    )
    assert result.returncode == 0, result.stderr
    job = result.stdout.splitlines()[0]
    record = wait_state(JobRecords(limited_cluster.redis_url), job, ("FAILED", "SUCCEEDED"))
    print(f"\n[disk] queued job, worker under RLIMIT_FSIZE {LIMIT}: submit → FAILED "
          f"in {time.perf_counter() - started:.1f} s")  # fmt: skip
    assert record["state"] == "FAILED", record
    error = record["error"]
    assert error.startswith("reshard:"), error
    assert f"s3://{s3_env}/out/rank" in error and "file too large" in error, error
    assert f"{limited_cluster.scratch}/.porter-tmp-" in error, error  # type: ignore[attr-defined]
    out = open_store(f"s3://{s3_env}/out")
    assert out.stat("manifest.json") is None and out.list() == []
    time.sleep(0.5)  # the failing step's `finally` has run by the time the record says FAILED
    scratch = leftovers(limited_cluster.scratch)  # type: ignore[attr-defined]
    assert not [p for p in scratch if ".porter-" in p], scratch  # (pymp-*: the worker pool's)
    # The job's status names the file and the problem too.
    status = limited_cluster.porter("status", job, "--json")
    assert "file too large" in json.loads(status.stdout)["error"]
