"""PowerInfer GPU-index exports as queued jobs: real redis-server, real workers, S3 over HTTP."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.errors import ConversionError
from converters.powerinfer.gpuindex import read_gpu_index
from converters.powerinfer.solver import solve
from tasks.cli.main import main
from tasks.jobs.records import JobRecords
from tasks.storage.store import open_store
from tests.test_distributed import download, upload, wait_state
from tests.test_powerinfer_cli import LAYERS, N_FF, write_activations  # 12 layers: > 10

BUDGETS = ["--vram-capacity", "4000000000", "--capacity", "4096",
           "--vram-capacity", "8000000000", "--capacity", "8192"]  # fmt: skip


@pytest.fixture
def activations(tmp_path) -> tuple[Path, np.ndarray]:
    directory = tmp_path / "activation"
    values = write_activations(directory, seed=11)
    (directory / "notes.txt").write_text("ignored")
    return directory, values


def test_index_job_s3_to_s3_equals_porter_convert(cluster, s3_env, activations, tmp_path):
    directory, values = activations
    upload(directory, f"s3://{s3_env}/acts")
    args = ("submit", "powerinfer-index", f"s3://{s3_env}/acts", f"s3://{s3_env}/idx", *BUDGETS)
    result = cluster.porter(*args, "--wait")
    assert result.returncode == 0, result.stderr
    job = result.stdout.splitlines()[0]
    assert job.startswith("powerinfer-index-")

    local = tmp_path / "local"
    assert main(["convert", "powerinfer-index", str(directory), str(local), *BUDGETS]) == 0
    got = download(f"s3://{s3_env}/idx", tmp_path / "got")
    names = {"gpu_index.4000000000.gpuidx", "gpu_index.8000000000.gpuidx"}
    assert set(got) == names | {f"{n}.porter.json" for n in names} | {"manifest.json"}
    for name in names:  # the same bytes as the local export; nothing intermediate left
        assert got[name] == (local / name).read_bytes()
        index = read_gpu_index(tmp_path / "got" / name)
        capacity = int(json.loads(got[f"{name}.porter.json"])["capacity"])
        assert [layer.bucket.size for layer in index.layers] == list(solve(values, capacity).counts)
        for layer, entry in enumerate(index.layers):
            hottest = np.argsort(-values[layer], kind="stable")[: entry.bucket.size]
            assert entry.bucket.tolist() == sorted(hottest.tolist())
    manifest = json.loads(got["manifest.json"])
    assert manifest["job_id"] == job and {f["path"] for f in manifest["files"]} == set(got) - {
        "manifest.json"
    }

    records = JobRecords(cluster.redis_url)
    record = records.get(job)
    assert record["state"] == "SUCCEEDED"
    assert {f"stats:{n}" for n in range(LAYERS)} | {f"topk:{n}" for n in range(LAYERS)} <= set(
        record["steps"]
    )
    again = cluster.porter(*args)  # same job: same id, nothing queued
    assert again.stdout.splitlines()[0] == job and "already submitted" in again.stderr


def test_bad_layer_fails_the_job_naming_the_object_and_retry_completes(
    cluster,
    s3_env,
    activations,
    tmp_path,
):
    directory, _ = activations
    upload(directory, f"s3://{s3_env}/acts")
    bad = tmp_path / "bad.pt"
    broken = torch.ones(N_FF)
    broken[5] = float("nan")
    torch.save(broken, bad)
    open_store(f"s3://{s3_env}/acts").put_file(bad, "activation_3.pt")
    args = ("submit", "powerinfer-index", f"s3://{s3_env}/acts", f"s3://{s3_env}/idx", *BUDGETS)
    job = cluster.porter(*args).stdout.splitlines()[0]
    records = JobRecords(cluster.redis_url)
    record = wait_state(records, job, ("FAILED", "SUCCEEDED"))
    assert record["state"] == "FAILED"
    assert f"s3://{s3_env}/acts/activation_3.pt" in record["error"] and "NaN" in record["error"]
    assert open_store(f"s3://{s3_env}/idx").list() == []  # nothing published, nothing left

    open_store(f"s3://{s3_env}/acts").put_file(directory / "activation_3.pt", "activation_3.pt")
    result = cluster.porter("retry", job, "--wait")
    assert result.returncode == 0, result.stderr
    assert open_store(f"s3://{s3_env}/idx").get_json("manifest.json")["job_id"] == job


def test_missing_layer_is_refused_at_submit(cluster, s3_env, activations):
    directory, _ = activations
    (directory / "activation_4.pt").unlink()
    upload(directory, f"s3://{s3_env}/acts")
    result = cluster.porter(
        "submit", "powerinfer-index", f"s3://{s3_env}/acts", f"s3://{s3_env}/idx", *BUDGETS
    )
    assert result.returncode == 1 and result.stdout == ""
    assert "activation_4.pt" in result.stderr and f"s3://{s3_env}/acts" in result.stderr


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"activations": "s3://bucket1/a", "output": "s3://bucket1/o", "budgets": [], "x": 1},
            "unknown",
        ),
        ({"activations": "s3://bucket1/a", "output": "s3://bucket1/o"}, "lacks budgets"),
        ({"activations": "s3://bucket1/a", "output": "s3://bucket1/../o", "budgets": []}, "'..'"),
        ({"activations": "/a\x00", "output": "/o", "budgets": []}, "NUL"),
        ({"activations": "/a", "output": "/o", "budgets": [{"vram_capacity": -1}]}, "range"),
        (
            {"activations": "/a", "output": "/o", "budgets": [{"vram_capacity": 1, "counts": 5}]},
            "counts",
        ),
        ({"activations": "/a", "output": "/o", "budgets": [], "batch": 0}, "batch"),
    ],
)
def test_malformed_index_specs_are_refused_clearly(data, message):
    from tasks.jobs.checks import InvalidSpec
    from tasks.kinds.powerinfer_index import IndexSpec

    with pytest.raises(InvalidSpec, match=re.escape(message)):
        IndexSpec.from_dict(data)


def test_an_absurdly_large_activation_object_is_refused_before_download(
    s3_env, tmp_path, monkeypatch
):
    from tasks.kinds import powerinfer_index as powerinfer_steps
    from tasks.kinds.powerinfer_index import IndexBudget, IndexSpec

    big = tmp_path / "activation_0.pt"
    big.write_bytes(b"\0" * 4096)
    open_store(f"s3://{s3_env}/acts").put_file(big, "activation_0.pt")
    monkeypatch.setattr(powerinfer_steps, "MAX_ACTIVATION_BYTES", 1024)
    monkeypatch.setenv("PORTER_CACHE_DIR", str(tmp_path / "cache"))
    spec = IndexSpec(f"s3://{s3_env}/acts", f"s3://{s3_env}/idx", (IndexBudget(1, capacity=256),))
    with pytest.raises(ConversionError, match="4096 bytes") as info:
        powerinfer_steps.layer_stats_step(spec, 0, "activation_0.pt")
    assert info.value.path == f"s3://{s3_env}/acts/activation_0.pt"
    assert not (tmp_path / "cache").exists()  # nothing was downloaded
