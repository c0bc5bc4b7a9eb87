"""The read-only status API (`porter serve`) as a real HTTP server on loopback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from converters.megatron.example import Layout
from tests.cluster import serve
from tests.test_distributed import upload


def get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def api(cluster):
    with serve(cluster.env) as base:
        yield base


def test_status_api_reports_jobs_and_steps(api, cluster, s3_env, megatron):
    assert get(f"{api}/healthz") == (200, {"redis": "ok"})
    upload(megatron("gpt").paths[Layout("legacy", 2, 1)], f"s3://{s3_env}/ckpt")
    result = cluster.porter(
        "submit", "megatron-trtllm", f"s3://{s3_env}/ckpt", f"s3://{s3_env}/out", "--tp", "2",
        "--wait",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = result.stdout.splitlines()[0]

    status, record = get(f"{api}/v1/jobs/{job}")
    assert status == 200
    assert record["state"] == "SUCCEEDED" and record["id"] == job
    assert set(record["steps"]) >= {"inspect", "reshard:0", "reshard:1", "config", "publish"}
    assert record["progress"]["bytes_done"] == record["progress"]["bytes_total"] > 0
    assert record["manifest_uri"] == f"s3://{s3_env}/out/manifest.json"

    status, rows = get(f"{api}/v1/jobs?state=SUCCEEDED")
    assert status == 200 and job in [r["id"] for r in rows]
    assert all(r["state"] == "SUCCEEDED" for r in rows)
    assert job not in [r["id"] for r in get(f"{api}/v1/jobs?state=FAILED")[1]]

    assert get(f"{api}/v1/jobs/no-such-job")[0] == 404
    status, spec = get(f"{api}/openapi.json")
    assert status == 200 and "/v1/jobs/{job}" in spec["paths"]
