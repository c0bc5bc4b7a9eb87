"""Who may make workers read and write where (issue 15, items 5-7), against a hardened stack of
real processes: a redis-server with `requirepass`, a `porter worker` and `porter serve` with
location allow-lists and a job secret, moto's S3 server.

- Allow-lists (`tasks.jobs.locations`): every trigger is refused outside them with 403 naming the
  rule; path components, not strings; `//x` and `/./x` neither bypass them nor defeat dedup;
  the worker's plan step checks again; `porter serve` opens no job-changing call without them.
- Symlinks and file contents: a tracker linked to a secret never shows the secret; a tracker,
  iteration directory or rank file linked outside the allowed roots is refused.
- Redis writers: records are sealed by the submitter (PORTER_JOB_SECRET) and every step checks
  the seal; the notify task takes its URLs from the worker's profiles and the outcome from OUTPUT.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery

from converters.megatron.example import Layout
from tasks.jobs.records import JobRecords
from tasks.jobs.seals import seal
from tasks.triggers import schedules
from tasks.triggers.signing import HEADER, verify
from tests.cluster import NOTIFY_SECRET, Cluster, serve, start_redis, wait_until, worker_env
from tests.test_distributed import wait_state
from tests.test_triggers import Receiver, request, signed

PASSWORD = "test-redis-password"
JOB_SECRET = "test-job-secret"
TOKEN = "test-api-token"
HOOK_SECRET = "test-hook-secret"
SECRET_TEXT = "hunter2-the-secret-of-another-team"
PROFILE = "tiny"


@dataclass
class Stack:
    """The hardened stack: its client environment, the roots and a served API."""

    cluster: Cluster
    api: str
    sources: Path  # PORTER_ALLOWED_SOURCES
    outputs: Path  # PORTER_ALLOWED_OUTPUTS
    outside: Path  # neither
    checkpoint: Path  # a real Megatron checkpoint (GPT, legacy TP=1) under `sources`
    receiver: Receiver  # the profile's notify URL (in the worker's config)

    @property
    def url(self) -> str:
        return self.cluster.redis_url

    def submit(self, spec: dict, token: str = TOKEN) -> tuple[int, dict]:
        body = json.dumps({"kind": "megatron-trtllm", "tp": 1, **spec}).encode()
        return request(f"{self.api}/v1/jobs", body, {"Authorization": f"Bearer {token}"})

    def send(self, task: str, *args: object, task_id: str) -> None:
        """Put a task message on the `cpu` queue, as anyone who can write to Redis can."""
        client = Celery(broker=self.url)
        client.conf.task_serializer = "json"
        client.send_task(task, args=list(args), task_id=task_id, queue="cpu")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, moto_s3, megatron) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("hardened")
    for name in ("redis", "logs", "cache", "sources", "outputs", "outside"):
        (base / name).mkdir()
    checkpoint = base / "sources" / "team-a" / "gpt"
    shutil.copytree(megatron("gpt").paths[Layout("legacy", 1, 1)], checkpoint)
    (base / "outside" / "secret.txt").write_text(SECRET_TEXT + "\n")
    receiver = Receiver()
    config = base / "porter.toml"
    config.write_text(
        f'[profiles.{PROFILE}]\nnotify = ["{receiver.url}"]\n'
        f'output = "{base}/outputs/{{model}}/{{iteration}}/{{export}}"\n'
        f'[profiles.{PROFILE}.exports.tp1]\nkind = "megatron-trtllm"\ntp = 1\n'
    )
    proc, url = start_redis(base / "redis", password=PASSWORD)
    env = worker_env(url, moto_s3, base / "cache")
    del env["PORTER_ALLOW_ANY_LOCATION"]
    env.update(
        PORTER_ALLOWED_SOURCES=f"{base}/sources, s3://team-a-ckpts",
        PORTER_ALLOWED_OUTPUTS=f"{base}/outputs,s3://team-a-exports/serving",
        PORTER_JOB_SECRET=JOB_SECRET,
        PORTER_CONFIG=str(config),
        PORTER_API_TOKEN=TOKEN,
        PORTER_HOOK_SECRET=HOOK_SECRET,
    )
    cluster = Cluster(url, env, base / "logs", base / "cache")
    cluster.start_worker()
    try:
        cluster.wait_for_workers(1)
        with serve(env, base / "logs" / "serve.log") as api:
            yield Stack(
                cluster,
                api,
                base / "sources",
                base / "outputs",
                base / "outside",
                checkpoint,
                receiver,
            )
    finally:
        cluster.stop()
        receiver.server.shutdown()
        proc.terminate()
        proc.wait(10)
    assert SECRET_TEXT not in (base / "logs" / "serve.log").read_text()


def records(stack: Stack) -> JobRecords:
    return JobRecords(stack.url)


def new_job(stack: Stack, spec: dict, *, sealed: bool, **labels: object) -> str:
    """Write a job record straight into Redis (a Redis writer), sealed as the submit path seals
    it (with the job secret) or not; the submit path's allow-list checks are bypassed either way."""
    job = f"megatron-trtllm-{os.urandom(8).hex()}"
    spec = {"tp": 1, **spec}
    if sealed:
        labels["seal"] = seal(JOB_SECRET, job, "megatron-trtllm", spec, labels)
    records(stack).create(job, "megatron-trtllm", spec, output=spec["output"], **labels)
    return job


def raw_job(stack: Stack, spec: dict, *, sealed: bool, **labels: object) -> str:
    """`new_job`, and its plan message on the queue."""
    job = new_job(stack, spec, sealed=sealed, **labels)
    stack.send("porter.plan", job, task_id=f"{job}:plan:1")
    return job


# --- item 5: allow-lists -----------------------------------------------------------------------


def test_redis_needs_the_password_and_a_job_goes_through_it(stack):
    """AUTH in force (requirepass): no password, no access; the worker and submit use the URL's."""
    no_password = stack.url.replace(f":{PASSWORD}@", "")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(no_password).ping()
    status, answer = stack.submit(
        {"source": str(stack.checkpoint), "output": str(stack.outputs / "plain")}
    )
    assert status == 201, answer
    record = wait_state(records(stack), answer["id"], ("SUCCEEDED", "FAILED"))
    assert record["state"] == "SUCCEEDED", record
    assert record["seal"] and (stack.outputs / "plain" / "manifest.json").is_file()
    result = stack.cluster.porter("jobs", "--limit", "5")
    assert result.returncode == 0 and answer["id"] in result.stdout, result.stderr
    # the command line submits (and seals) through the password too
    cli = stack.cluster.porter(
        "submit", "megatron-trtllm", str(stack.checkpoint), str(stack.outputs / "cli"),
        "--tp", "1", "--wait",
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert records(stack).get(cli.stdout.split()[0])["seal"]


def test_other_spellings_of_a_location_are_the_same_job(stack):
    """`//x`, `/./x` and a trailing `/` are normalised before the job id is computed."""
    spec = {"source": str(stack.checkpoint), "output": str(stack.outputs / "spelt")}
    status, first = stack.submit(spec)
    assert status == 201, first
    for source, output in [
        (f"/{stack.checkpoint}/", f"/{stack.outputs}/./spelt"),
        (f"{stack.checkpoint.parent}/./gpt", f"{stack.outputs}//spelt/"),
    ]:
        status, again = stack.submit({"source": source, "output": output})
        assert (status, again["id"], again["created"]) == (200, first["id"], False), again
    wait_state(records(stack), first["id"], ("SUCCEEDED", "FAILED"))


@pytest.mark.parametrize(
    "field, where, rule",
    [
        ("output", "outside/new", "PORTER_ALLOWED_OUTPUTS"),
        ("output", "outputs-b/new", "PORTER_ALLOWED_OUTPUTS"),  # a string prefix, not a component
        ("output", "sources/team-a/out", "PORTER_ALLOWED_OUTPUTS"),
        ("output", "s3://team-b-exports/x", "PORTER_ALLOWED_OUTPUTS"),
        ("output", "s3://team-a-exports/serving-b", "PORTER_ALLOWED_OUTPUTS"),
        ("source", "outside", "PORTER_ALLOWED_SOURCES"),
        ("source", "outputs/team-a/gpt", "PORTER_ALLOWED_SOURCES"),
        ("source", "s3://team-b-ckpts/llama", "PORTER_ALLOWED_SOURCES"),
        ("source", "/etc", "PORTER_ALLOWED_SOURCES"),
    ],
)
def test_locations_outside_the_lists_are_403_naming_the_rule(stack, field, where, rule):
    base = stack.outside.parent
    location = where if where.startswith(("s3://", "/")) else f"{base}/{where}"
    spec = {"source": str(stack.checkpoint), "output": str(stack.outputs / "never")}
    count = records(stack).redis.zcard("porter:jobs")
    status, answer = stack.submit({**spec, field: location})
    assert status == 403, answer
    assert answer["rule"] == rule and rule in answer["detail"], answer
    assert records(stack).redis.zcard("porter:jobs") == count
    assert not (base / "outside" / "new").exists() and not (base / "outputs-b").exists()


def test_a_symlink_out_of_the_allowed_roots_is_refused_at_submit(stack):
    """A location inside a listed root that resolves elsewhere through a symlink is outside."""
    link = stack.outputs / "link-to-outside"
    link.symlink_to(stack.outside, target_is_directory=True)
    spec = {"source": str(stack.checkpoint), "output": f"{link}/new"}
    status, answer = stack.submit(spec)
    assert status == 403 and answer["rule"] == "PORTER_ALLOWED_OUTPUTS", answer
    assert not (stack.outside / "new").exists()


def test_every_trigger_is_refused_outside_the_lists(stack, tmp_path, monkeypatch):
    """Hooks (before anything is read at the checkpoint: an existing and a missing path get the
    same answer), CLI submit, batches and schedules."""
    url = f"{stack.api}/v1/hooks/training-complete"
    answers = []
    for checkpoint in (stack.outside, stack.outside / "no-such-dir"):
        body = json.dumps({"profile": PROFILE, "checkpoint": str(checkpoint)}).encode()
        status, answer = request(url, body, signed(body, HOOK_SECRET))
        assert status == 403 and answer["rule"] == "PORTER_ALLOWED_SOURCES", answer
        answers.append(answer["detail"].replace(str(checkpoint), "X"))
    assert answers[0] == answers[1]

    outside = str(stack.outside / "out")
    result = stack.cluster.porter(
        "submit", "megatron-trtllm", str(stack.checkpoint), outside, "--tp", "1"
    )
    assert result.returncode == 1 and "outside PORTER_ALLOWED_OUTPUTS" in result.stderr
    assert result.stdout == ""
    batch = tmp_path / "jobs.yaml"
    good = {"kind": "megatron-trtllm", "source": str(stack.checkpoint), "tp": 1}
    batch.write_text(
        f"- {json.dumps({**good, 'output': str(stack.outputs / 'batch')})}\n"
        f"- {json.dumps({**good, 'output': outside})}\n"
    )
    count = records(stack).redis.zcard("porter:jobs")
    result = stack.cluster.porter("submit", "--batch", str(batch))
    assert result.returncode == 1 and "outside PORTER_ALLOWED_OUTPUTS" in result.stderr
    assert records(stack).redis.zcard("porter:jobs") == count
    assert not (stack.outside / "out").exists()

    # schedules: refused when added, and a run (as a worker makes it) submits nothing
    add = ["schedule", "add", "nightly", "--every", "1h", "--profile", PROFILE, "--source"]
    result = stack.cluster.porter(*add, str(stack.outside))
    assert result.returncode == 1 and "outside PORTER_ALLOWED_SOURCES" in result.stderr
    for name in ("PORTER_ALLOWED_SOURCES", "PORTER_ALLOWED_OUTPUTS", "PORTER_CONFIG"):
        monkeypatch.setenv(name, stack.cluster.env[name])
    outcome = schedules.run_once("nightly", PROFILE, str(stack.outside), records(stack))
    assert "outside PORTER_ALLOWED_SOURCES" in outcome["error"], outcome
    assert records(stack).redis.zcard("porter:jobs") == count


def test_the_plan_step_checks_the_lists_again(stack):
    """A record whose spec points outside (a submitter with other lists, or none) fails in the
    worker before it reads or writes anything."""
    out = stack.outside / "planned"
    job = raw_job(stack, {"source": str(stack.checkpoint), "output": str(out)}, sealed=True)
    record = wait_state(records(stack), job, ("FAILED", "SUCCEEDED"))
    assert record["state"] == "FAILED" and "outside PORTER_ALLOWED_OUTPUTS" in record["error"]
    assert not out.exists()


def test_serve_opens_no_job_changing_call_without_both_lists(stack):
    env = {k: v for k, v in stack.cluster.env.items() if k != "PORTER_ALLOWED_OUTPUTS"}
    spec = json.dumps({"source": str(stack.checkpoint), "output": str(stack.outputs / "x")})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with serve(env) as base:
        status, answer = request(f"{base}/v1/jobs", spec.encode(), auth)
        assert status == 403 and "PORTER_ALLOWED_OUTPUTS" in answer["detail"], answer
        assert "PORTER_ALLOW_ANY_LOCATION=1" in answer["detail"]
        body = json.dumps({"profile": PROFILE, "checkpoint": str(stack.checkpoint)}).encode()
        hook = request(f"{base}/v1/hooks/training-complete", body, signed(body, HOOK_SECRET))
        assert hook[0] == 403, hook
        assert request(f"{base}/v1/jobs/x/retry", b"", auth)[0] == 403
        assert request(f"{base}/healthz")[0] == 200  # reads stay open
    with serve({**env, "PORTER_ALLOW_ANY_LOCATION": "1"}) as base:  # explicitly: anywhere
        status, answer = request(f"{base}/v1/jobs", b'{"kind": "megatron-trtllm"}', auth)
        assert status == 422, answer


# --- item 6: symlinks and file contents --------------------------------------------------------


def _linked_copy(stack: Stack, name: str) -> Path:
    copy = stack.sources / "team-a" / name
    shutil.copytree(stack.checkpoint, copy)
    return copy


def test_a_tracker_linked_to_a_secret_never_shows_it(stack):
    # inside the allowed roots (another team's file): read, refused as not a number, not quoted
    inside = _linked_copy(stack, "tracker-inside")
    secret = stack.sources / "team-b-secret.txt"
    secret.write_text(SECRET_TEXT + "\n")
    (inside / "latest_checkpointed_iteration.txt").unlink()
    (inside / "latest_checkpointed_iteration.txt").symlink_to(secret)
    status, answer = stack.submit({"source": str(inside), "output": str(stack.outputs / "t1")})
    assert status == 422 and "not a number" in answer["detail"], answer
    assert SECRET_TEXT[:8] not in json.dumps(answer)
    # outside them: refused for the link, before it is read
    outside = _linked_copy(stack, "tracker-outside")
    (outside / "latest_checkpointed_iteration.txt").unlink()
    (outside / "latest_checkpointed_iteration.txt").symlink_to(stack.outside / "secret.txt")
    status, answer = stack.submit({"source": str(outside), "output": str(stack.outputs / "t2")})
    assert status == 403 and answer["rule"] == "PORTER_ALLOWED_SOURCES", answer
    assert "latest_checkpointed_iteration.txt" in answer["detail"]
    assert SECRET_TEXT[:8] not in json.dumps(answer) and str(stack.outside) not in json.dumps(
        answer
    )


def test_the_tracker_is_never_quoted_by_the_local_readers(tmp_path, megatron):
    from converters.errors import NotAMegatronCheckpoint
    from tasks.storage import sources

    copy = tmp_path / "ckpt"
    shutil.copytree(megatron("gpt").paths[Layout("legacy", 1, 1)], copy)
    (copy / "latest_checkpointed_iteration.txt").write_text(SECRET_TEXT[:30])
    for read in (sources.source_identity, sources.latest_iteration):
        with pytest.raises(NotAMegatronCheckpoint) as info:
            read(str(copy))
        assert "not a number" in str(info.value) and SECRET_TEXT[:8] not in str(info.value)


@pytest.mark.parametrize("what", ["iteration directory", "rank file"])
def test_a_link_in_the_checkpoint_out_of_the_roots_is_refused(stack, what):
    copy = _linked_copy(stack, f"linked-{what.replace(' ', '-')}")
    elsewhere = stack.outside / f"moved-{what.replace(' ', '-')}"
    if what == "iteration directory":
        shutil.move(copy / "iter_0000010", elsewhere)
        (copy / "iter_0000010").symlink_to(elsewhere, target_is_directory=True)
    else:
        rank = copy / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
        shutil.move(rank, elsewhere)
        rank.symlink_to(elsewhere)
    output = stack.outputs / f"from-{copy.name}"
    status, answer = stack.submit({"source": str(copy), "output": str(output)})
    assert status == 403 and answer["rule"] == "PORTER_ALLOWED_SOURCES", answer
    assert str(elsewhere) not in answer["detail"]  # names the link, not where it points
    assert not output.exists()


# --- item 7: Redis writers ---------------------------------------------------------------------


def test_a_record_written_straight_into_redis_is_refused_before_storage(stack):
    spec = {"source": str(stack.checkpoint), "output": str(stack.outputs / "unsealed")}
    job = raw_job(stack, spec, sealed=False)
    record = wait_state(records(stack), job, ("FAILED", "SUCCEEDED"))
    assert record["state"] == "FAILED" and "not sealed" in record["error"], record
    assert not (stack.outputs / "unsealed").exists()

    # a sealed record copied to another id is refused the same way (the seal covers the id)
    spec = {"tp": 1, "source": str(stack.checkpoint), "output": str(stack.outputs / "moved")}
    job = f"megatron-trtllm-{os.urandom(8).hex()}"
    mac = seal(JOB_SECRET, "megatron-trtllm-0000000000000000", "megatron-trtllm", spec, {})
    records(stack).create(job, "megatron-trtllm", spec, output=spec["output"], seal=mac)
    stack.send("porter.plan", job, task_id=f"{job}:plan:1")
    record = wait_state(records(stack), job, ("FAILED", "SUCCEEDED"))
    assert record["state"] == "FAILED" and "not sealed" in record["error"], record
    assert not (stack.outputs / "moved").exists()


def test_a_step_sent_straight_to_the_broker_is_refused_before_storage(stack):
    """A rank step of an unsealed RUNNING job (its plan skipped) writes nothing."""
    output = stack.outputs / "rank-only"
    job = f"megatron-trtllm-{os.urandom(8).hex()}"
    spec = {"tp": 1, "source": str(stack.checkpoint), "output": str(output)}
    recs = records(stack)
    recs.create(job, "megatron-trtllm", spec, output=str(output))
    recs.start(job)
    recs.update(job, inspected={"job_id": job, "tag": f"{job}.0123456789abcdef", "ranks": [{}]})
    stack.send("porter.reshard", job, 0, task_id=f"{job}:reshard:0:1")
    record = wait_state(records(stack), job, ("FAILED", "SUCCEEDED"))
    assert record["state"] == "FAILED" and "not sealed" in record["error"], record
    assert not output.exists()


def test_notifications_go_only_to_the_profiles_urls_and_say_what_output_holds(stack):
    attacker = Receiver()
    try:
        # a forged, unsealed record that asks to be announced to the attacker: nothing is sent
        spec = {"source": str(stack.checkpoint), "output": str(stack.outputs / "forged")}
        forged = raw_job(stack, spec, sealed=False, profile=PROFILE)
        wait_state(records(stack), forged, ("FAILED", "SUCCEEDED"))
        client = redis.Redis.from_url(stack.url, decode_responses=True)
        client.hset(f"porter:job:{forged}", mapping={
            "state": "SUCCEEDED", "notify": json.dumps([attacker.url]),
            "manifest_uri": json.dumps("s3://attacker/manifest.json"),
        })  # fmt: skip
        _notify(stack, forged)
        # a sealed record claiming SUCCEEDED without a manifest of its own at OUTPUT
        output = stack.outputs / "never-converted"
        spec = {"tp": 1, "source": str(stack.checkpoint), "output": str(output)}
        job = new_job(stack, spec, sealed=True, profile=PROFILE)
        client.hset(f"porter:job:{job}", mapping={
            "state": "SUCCEEDED", "notify": json.dumps([attacker.url]),
            "manifest_uri": json.dumps("s3://attacker/manifest.json"),
        })  # fmt: skip
        assert _notify(stack, job)
        assert attacker.requests == []
        (headers, raw), *_ = stack.receiver.requests
        verify(NOTIFY_SECRET, headers[HEADER], raw, max_age=300)  # signed by the worker
        summary = json.loads(raw)
        assert summary["job"] == job and summary["state"] == "FAILED", summary
        assert summary["manifest_uri"] is None and summary["profile"] == PROFILE
        assert forged not in {json.loads(r)["job"] for _, r in stack.receiver.requests}
    finally:
        attacker.server.shutdown()


def _notify(stack: Stack, job: str) -> dict:
    """Run the notify task of `job` on the worker; its result (the outcome per URL)."""
    client = Celery(broker=stack.url, backend=stack.url)
    client.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    result = client.send_task("porter.notify", args=[job], task_id=f"{job}:notify:x", queue="cpu")
    return wait_until(lambda: result.ready() and (result.get() or {"": 0}), 60, "notify")


# --- the rules themselves (no servers) ---------------------------------------------------------


def test_allow_lists_match_whole_components_after_resolving(tmp_path):
    from tasks.jobs.locations import AllowList, normalise

    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "up").symlink_to(tmp_path, target_is_directory=True)
    allow = AllowList.parse("X", f"{tmp_path}/data/a/, s3://bucket/team-a")
    assert allow.admits(f"{tmp_path}/data/a") and allow.admits(f"{tmp_path}/data/a/new/x")
    assert not allow.admits(f"{tmp_path}/data/ab")
    assert not allow.admits(f"{tmp_path}/data/a/../b")  # '..' resolved before matching
    assert not allow.admits(f"{tmp_path}/data/a/up/elsewhere")  # through a symlink
    assert allow.admits("s3://bucket/team-a/x") and not allow.admits("s3://bucket/team-ab")
    assert not allow.admits("s3://bucket/") and not allow.admits("s3://other/team-a")
    assert AllowList.parse("X", " , ").roots is None  # not set: restricts nothing
    with pytest.raises(ValueError, match="not an absolute path"):
        AllowList.parse("X", "data/a")
    assert normalise("//data/./a//b/") == "/data/a/b" and normalise("s3://b/p/") == "s3://b/p"


@pytest.mark.parametrize("value, closed", [("0", True), ("false", True), ("1", False)])
def test_allow_any_location_is_read_as_a_boolean(monkeypatch, value, closed):
    """`bool("0")` is True: a '0' must not open the job-changing calls."""
    from config.settings import Settings
    from tasks.jobs.locations import write_routes_problem

    monkeypatch.delenv("PORTER_CONFIG", raising=False)
    monkeypatch.setenv("PORTER_ALLOW_ANY_LOCATION", value)
    assert (write_routes_problem(Settings.from_env()) is not None) == closed
