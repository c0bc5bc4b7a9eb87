"""Triggers over real HTTP: `porter serve` on loopback, real Redis, real workers, moto's S3.

Signed training-complete hooks, Hugging Face webhooks, POST /v1/jobs, batches and notifications
received by a local HTTP receiver."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from converters.megatron.example import Layout
from tasks.triggers.signing import HEADER, sign, verify
from tests.cluster import NOTIFY_SECRET, PORTER, serve
from tests.test_distributed import upload

HOOK_SECRET = "test-hook-secret"
HF_SECRET = "test-hf-secret"
TOKEN = "test-api-token"
MAX_BODY = 4096


class Receiver:
    """A local HTTP server that records the notifications POSTed to it."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not self.path.endswith("/porter"):
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.requests.append((dict(self.headers), body))
                failing = len(receiver.requests) <= receiver.fail_first
                self.send_response(503 if failing else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/porter"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 60) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.requests)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def write_config(path: Path, bucket: str, notify: str) -> Path:
    path.write_text(
        f"""
[profiles.gpt-small]
output = "s3://{bucket}/exports/{{model}}/{{iteration}}/{{export}}"
notify = ["{notify}"]
huggingface = {{ repo = "acme/gpt-small", checkpoint = "s3://{bucket}/hub/{{revision}}" }}

[profiles.gpt-small.exports.tp1]
kind = "megatron-trtllm"
tp = 1

[profiles.gpt-small.exports.tp2]
kind = "megatron-trtllm"
tp = 2
"""
    )
    return path


@pytest.fixture
def service(cluster, s3_env, receiver, tmp_path) -> Iterator[str]:
    """`porter serve` on a free loopback port, with a profile writing to this test's bucket."""
    # the workers' own config: notify URLs come from the profile they know, not from the record
    config = write_config(cluster.config, s3_env, receiver.url)
    env = {
        **cluster.env,
        "PORTER_CONFIG": str(config),
        "PORTER_HOOK_SECRET": HOOK_SECRET,
        "PORTER_HF_WEBHOOK_SECRET": HF_SECRET,
        "PORTER_API_TOKEN": TOKEN,
        "PORTER_MAX_REQUEST_BYTES": str(MAX_BODY),
        "PORTER_HOOK_MAX_AGE": "60",
    }
    try:
        with serve(env, tmp_path / "serve.log") as base:
            yield base
    finally:
        config.write_text("")
    assert HOOK_SECRET not in (tmp_path / "serve.log").read_text()  # secrets are never logged


def job_count(cluster) -> int:
    return redis.Redis.from_url(cluster.redis_url).zcard("porter:jobs")


def signed(body: bytes, secret: str = HOOK_SECRET, at: float | None = None) -> dict[str, str]:
    return {HEADER: sign(secret, body, None if at is None else int(at))}


def wait_jobs(base: str, jobs: list[str], timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        records = [request(f"{base}/v1/jobs/{job}")[1] for job in jobs]
        if all(r["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") for r in records):
            return records
        assert time.monotonic() < deadline, [r["state"] for r in records]
        time.sleep(0.2)


def test_signed_hook_exports_every_profile_export_and_notifies(
    service, cluster, s3_env, megatron, receiver
):
    upload(megatron("gpt").paths[Layout("legacy", 2, 1)], f"s3://{s3_env}/ckpt")
    body = json.dumps({"profile": "gpt-small", "checkpoint": f"s3://{s3_env}/ckpt"}).encode()
    status, answer = request(f"{service}/v1/hooks/training-complete", body, signed(body))
    assert status == 202, answer
    assert answer["iteration"] == "10" and answer["replayed"] is False
    assert answer["checkpoint"] == f"s3://{s3_env}/ckpt/iter_0000010"
    assert [j["export"] for j in answer["jobs"]] == ["tp1", "tp2"]
    assert all(j["created"] for j in answer["jobs"])
    jobs = [j["job"] for j in answer["jobs"]]

    records = wait_jobs(service, jobs)
    assert [r["state"] for r in records] == ["SUCCEEDED", "SUCCEEDED"], records
    for record, export in zip(records, ["tp1", "tp2"], strict=True):
        expected = f"s3://{s3_env}/exports/gpt-small/10/{export}/manifest.json"
        assert record["manifest_uri"] == expected
        assert record["model"] == "gpt-small" and record["trigger"] == "hook:training-complete"

    # one signed notification per job, verifiable with the shared secret
    got = receiver.wait_for(2)
    assert len(got) == 2
    summaries = {}
    for headers, raw in got:
        verify(NOTIFY_SECRET, headers[HEADER], raw, max_age=300)
        summary = json.loads(raw)
        summaries[summary["job"]] = summary
        assert headers["X-Porter-Delivery"] == f"{summary['job']}:1"
    assert set(summaries) == set(jobs)
    assert {s["state"] for s in summaries.values()} == {"SUCCEEDED"}
    assert {s["export"] for s in summaries.values()} == {"tp1", "tp2"}
    assert all(s["manifest_uri"].endswith("/manifest.json") for s in summaries.values())

    # the same checkpoint announced again (a new signature, same content): no new job
    count = job_count(cluster)
    announce = {"profile": "gpt-small", "iteration": 10, "checkpoint": answer["checkpoint"]}
    body2 = json.dumps(announce).encode()
    status, again = request(f"{service}/v1/hooks/training-complete", body2, signed(body2))
    assert status == 202, again
    assert [j["job"] for j in again["jobs"]] == jobs
    assert not any(j["created"] for j in again["jobs"])
    assert job_count(cluster) == count
    assert [r["attempt"] for r in wait_jobs(service, jobs)] == [1, 1]


def test_healthz_checks_redis_and_the_profiles_buckets(service, cluster, s3_env, tmp_path):
    assert request(f"{service}/healthz") == (200, {"redis": "ok", f"s3:{s3_env}": "ok"})
    config = write_config(tmp_path / "missing.toml", "no-such-bucket-here", "http://127.0.0.1:9/")
    with serve({**cluster.env, "PORTER_CONFIG": str(config)}) as base:
        status, report = request(f"{base}/healthz")
    assert status == 503 and report["redis"] == "ok"
    assert report["s3:no-such-bucket-here"].startswith("unreachable")


def test_bad_missing_expired_or_replayed_signatures_create_no_job(service, cluster, s3_env):
    body = json.dumps({"profile": "gpt-small", "checkpoint": f"s3://{s3_env}/none"}).encode()
    url = f"{service}/v1/hooks/training-complete"
    count = job_count(cluster)
    cases = {
        "missing": {},
        "wrong secret": signed(body, "not-the-secret"),
        "expired": signed(body, at=time.time() - 3600),
        "from the future": signed(body, at=time.time() + 3600),
        "malformed": {HEADER: "v1=abc"},
        "other body": signed(body + b" "),
    }
    for case, headers in cases.items():
        status, answer = request(url, body, headers)
        assert status == 401, (case, answer)
        assert HOOK_SECRET not in json.dumps(answer)
    assert request(url, body, {HEADER: sign(HOOK_SECRET, body, int(time.time()) - 3600)})[0] == 401
    assert job_count(cluster) == count

    # a valid signature on a bad request: 422 naming the problem; the sender may fix and resend
    status, answer = request(url, body, signed(body))
    assert status == 422 and "none" in answer["detail"], answer
    bad = json.dumps({"profile": "no-such", "checkpoint": f"s3://{s3_env}/x"}).encode()
    status, answer = request(url, bad, signed(bad))
    assert status == 422 and "no export profile 'no-such'" in answer["detail"], answer
    assert job_count(cluster) == count


def test_replayed_hook_answers_the_first_result_and_submits_nothing(
    service, cluster, s3_env, megatron
):
    upload(megatron("gpt").paths[Layout("legacy", 1, 1)], f"s3://{s3_env}/ckpt")
    body = json.dumps({"profile": "gpt-small", "checkpoint": f"s3://{s3_env}/ckpt"}).encode()
    headers = signed(body)
    url = f"{service}/v1/hooks/training-complete"
    status, first = request(url, body, headers)
    assert status == 202 and first["replayed"] is False
    count = job_count(cluster)
    for _ in range(3):
        status, again = request(url, body, headers)
        assert status == 200 and again["replayed"] is True
        assert again["jobs"] == first["jobs"]
    assert job_count(cluster) == count
    wait_jobs(service, [j["job"] for j in first["jobs"]])


def test_oversize_bodies_get_413(service, cluster):
    big = b"{" + b" " * (MAX_BODY + 10) + b"}"
    count = job_count(cluster)
    assert request(f"{service}/v1/hooks/training-complete", big, signed(big))[0] == 413
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert request(f"{service}/v1/jobs", big, auth)[0] == 413
    # no Content-Length (chunked): counted as it arrives
    conn_body = iter([big[:2000], big[2000:]])
    req = urllib.request.Request(f"{service}/v1/jobs", data=conn_body, headers=auth)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 413
    assert job_count(cluster) == count


def test_post_jobs_needs_the_token_and_dedups(service, cluster, s3_env, megatron):
    upload(megatron("gpt").paths[Layout("legacy", 2, 1)], f"s3://{s3_env}/src")
    spec = {
        "kind": "megatron-trtllm",
        "source": f"s3://{s3_env}/src",
        "output": f"s3://{s3_env}/api-out",
        "tp": 2,
    }
    body = json.dumps(spec).encode()
    url = f"{service}/v1/jobs"
    assert request(url, body)[0] == 401
    assert request(url, body, {"Authorization": "Bearer wrong"})[0] == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, created = request(url, body, auth)
    assert status == 201 and created["created"] is True
    status, same = request(url, body, auth)
    assert status == 200 and same["id"] == created["id"] and same["created"] is False

    status, answer = request(url, json.dumps({**spec, "tp": 0}).encode(), auth)
    assert status == 422 and "tp" in answer["detail"]
    status, answer = request(url, json.dumps({**spec, "output": "relative/out"}).encode(), auth)
    assert status == 422 and "absolute" in answer["detail"]
    status, answer = request(url, json.dumps({**spec, "colour": "red"}).encode(), auth)
    assert status == 422 and "colour" in answer["detail"]

    (record,) = wait_jobs(service, [created["id"]])
    assert record["state"] == "SUCCEEDED"
    listed = request(f"{service}/v1/jobs?state=SUCCEEDED&limit=1000")[1]
    assert created["id"] in [r["id"] for r in listed]
    assert request(f"{service}/v1/jobs?model=gpt-small&limit=1000")[1] == [
        r for r in request(f"{service}/v1/jobs?limit=1000")[1] if r["model"] == "gpt-small"
    ]
    # a succeeded job cannot be cancelled or retried: 422 with the reason
    status, answer = request(f"{url}/{created['id']}/cancel", b"", auth)
    assert status == 422 and "already ended SUCCEEDED" in answer["detail"]
    assert request(f"{url}/{created['id']}/retry", b"", auth)[0] == 422
    assert request(f"{url}/nope/cancel", b"", auth)[0] == 404
    assert request(f"{url}/{created['id']}/cancel", b"")[0] == 401


def test_huggingface_webhook(service, cluster, s3_env, megatron):
    revision = "0123456789abcdef0123456789abcdef01234567"
    upload(megatron("gpt").paths[Layout("legacy", 1, 1)], f"s3://{s3_env}/hub/{revision}")
    payload = {
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {"type": "model", "name": "acme/gpt-small", "headSha": revision},
        "webhook": {"id": "x", "version": 3},
    }
    body = json.dumps(payload).encode()
    url = f"{service}/v1/hooks/huggingface"
    count = job_count(cluster)
    assert request(url, body)[0] == 401
    assert request(url, body, {"X-Webhook-Secret": "wrong"})[0] == 401
    assert job_count(cluster) == count
    headers = {"X-Webhook-Secret": HF_SECRET}
    status, answer = request(url, body, headers)
    assert status == 202, answer
    assert answer["revision"] == revision and len(answer["jobs"]) == 2
    records = wait_jobs(service, [j["job"] for j in answer["jobs"]])
    assert {r["state"] for r in records} == {"SUCCEEDED"}
    assert records[0]["manifest_uri"] == (
        f"s3://{s3_env}/exports/gpt-small/{revision[:12]}/tp1/manifest.json"
    )
    # the Hub replays the delivery: same ids, nothing new
    count = job_count(cluster)
    status, again = request(url, body, headers)
    assert [j["job"] for j in again["jobs"]] == [j["job"] for j in answer["jobs"]]
    assert not any(j["created"] for j in again["jobs"]) and job_count(cluster) == count
    # events Porter does not act on are acknowledged and ignored
    other = {**payload, "repo": {**payload["repo"], "name": "acme/unmapped"}}
    assert request(url, json.dumps(other).encode(), headers) == (200, {"ignored": True})
    discussion = {**payload, "event": {"action": "create", "scope": "discussion"}}
    assert request(url, json.dumps(discussion).encode(), headers) == (200, {"ignored": True})
    assert job_count(cluster) == count


def test_batch_with_an_invalid_entry_submits_nothing(cluster, s3_env, megatron, tmp_path):
    upload(megatron("gpt").paths[Layout("legacy", 2, 1)], f"s3://{s3_env}/src")
    good = {"source": f"s3://{s3_env}/src", "output": f"s3://{s3_env}/b1", "tp": 1}
    batch = tmp_path / "jobs.yaml"
    batch.write_text(
        "jobs:\n"
        f"  - {json.dumps({**good, 'kind': 'megatron-trtllm'})}\n"
        f"  - {json.dumps({**good, 'output': f's3://{s3_env}/b2', 'tp': 'two'})}\n"
        f"  - {json.dumps({**good, 'output': f's3://{s3_env}/b3', 'tp': 2})}\n"
    )
    count = job_count(cluster)
    result = cluster.porter("submit", "--batch", str(batch))
    assert result.returncode == 1
    assert str(batch) in result.stderr and "entry 2" in result.stderr
    assert "nothing was submitted" in result.stderr and result.stdout == ""
    assert job_count(cluster) == count

    # a source that does not exist is found before anything is queued, too
    batch.write_text(
        f"- {json.dumps(good)}\n- {json.dumps({**good, 'source': f's3://{s3_env}/missing'})}\n"
    )
    result = cluster.porter("submit", "--batch", str(batch))
    assert result.returncode == 1 and "missing" in result.stderr
    assert job_count(cluster) == count

    batch.write_text(
        f"- {json.dumps(good)}\n- {json.dumps({**good, 'output': f's3://{s3_env}/b3', 'tp': 2})}\n"
    )
    result = cluster.porter("submit", "--batch", str(batch))
    assert result.returncode == 0, result.stderr
    jobs = result.stdout.split()
    assert len(jobs) == 2 and len(set(jobs)) == 2
    assert job_count(cluster) == count + 2
    for job in jobs:
        assert cluster.porter("status", job, "--json").returncode == 0
    # watch shows both (one frame: the command is stopped after its first refresh)
    watch = subprocess.Popen(
        [PORTER, "jobs", "--watch", "--interval", "30"],
        env=cluster.env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    killer = threading.Timer(60, watch.kill)  # a start-up under load takes seconds, not a minute
    killer.start()
    frame = ""
    while not all(job in frame for job in jobs) and (line := watch.stdout.readline()):
        frame += line  # the first frame, read as it is printed
    killer.cancel()
    watch.terminate()
    watch.communicate(timeout=10)
    assert all(job in frame for job in jobs) and "progress" in frame


def test_notification_retries_then_delivers(receiver):
    from tasks.triggers.notify import NotifyFailed, deliver

    receiver.fail_first = 2
    payload = {"job": "j", "state": "FAILED", "error": "boom"}
    tries = deliver(receiver.url, payload, secret="s", attempts=4, backoff=0.05, delivery="j:1")
    assert tries == 3 and len(receiver.requests) == 3
    headers, raw = receiver.requests[-1]
    assert json.loads(raw) == payload
    verify("s", headers[HEADER], raw, max_age=60)

    receiver.fail_first = 100
    with pytest.raises(NotifyFailed, match="HTTP 503"):
        deliver(receiver.url, payload, secret="s", attempts=2, backoff=0.01, delivery="j:1")
    with pytest.raises(NotifyFailed, match="after 1 attempt"):  # a 404 is final
        deliver(receiver.url + "/x", payload, secret="s", attempts=3, backoff=0, delivery="j:1")
