"""Scheduled re-exports: real redis-server, a real `porter worker`, real `porter beat` processes.

This module runs its own Redis and worker (not the session's `cluster`): the worker must see a
`PORTER_CONFIG` with the test's export profile, and the session's workers (without one) would
otherwise take the scheduled runs from the shared `cpu` queue and fail them.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from converters.megatron.example import Layout
from tasks.jobs.records import JobRecords
from tasks.triggers import schedules
from tests.cluster import PORTER, Cluster, start_redis, wait_until, worker_env

LEGACY_TP1 = Layout("legacy", 1, 1)
LOCK_TIMEOUT = 3  # seconds: a standby takes over this long after the active beat died
PROFILE = "tiny"
CONFIG = f"""
[profiles.{PROFILE}]
[profiles.{PROFILE}.exports.trt1]
kind = "megatron-trtllm"
tp = 1
output = "{{checkpoint}}-{{export}}"
"""


class Scheduling:
    """A Redis, one worker (PORTER_CONFIG set) and helpers to run beats and the CLI."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.redis = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
        self.records = JobRecords(cluster.redis_url)
        self.beats: list[tuple[subprocess.Popen, Path]] = []

    def porter(self, *args: str) -> subprocess.CompletedProcess:
        return self.cluster.porter(*args, timeout=60)

    def start_beat(self) -> tuple[subprocess.Popen, Path]:
        log = self.cluster.logs / f"beat-{len(self.beats)}-{uuid.uuid4().hex[:6]}.log"
        proc = subprocess.Popen(
            [PORTER, "beat", "--max-interval", "0.5", "--lock-timeout", str(LOCK_TIMEOUT)],
            env=self.cluster.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.beats.append((proc, log))
        return proc, log

    def stop_beats(self, sig: int = signal.SIGTERM) -> None:
        for proc, _ in self.beats:
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
        for proc, _ in self.beats:
            proc.wait(20)
        self.beats.clear()

    def stats(self, name: str) -> dict[str, str]:
        return self.redis.hgetall(schedules.stats_key(name))

    def runs(self, name: str) -> list[dict[str, Any]]:
        """Recorded runs, oldest first."""
        return [json.loads(r) for r in reversed(self.redis.lrange(schedules.runs_key(name), 0, -1))]

    def add(self, name: str, source: Path, every: str) -> None:
        result = self.porter(
            "schedule", "add", name, "--every", every, "--profile", PROFILE, "--source", str(source)
        )
        assert result.returncode == 0, result.stderr

    def remove(self, name: str) -> None:
        self.porter("schedule", "remove", name)

    def wait_job(self, job: str, timeout: float = 60) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            record = self.records.get(job, steps=False)
            return record if record and record["state"] in ("SUCCEEDED", "FAILED") else None

        return wait_until(ended, timeout, f"job {job} to end")


def _sends(log: Path, name: str) -> int:
    """How many times the beat writing `log` sent schedule `name`."""
    text = log.read_text(errors="replace")
    return text.count(f"Sending due task {name} ")


def _active(beats: list[tuple[subprocess.Popen, Path]]) -> tuple[subprocess.Popen, Path] | None:
    """The beat that holds redbeat's lock (it logs so)."""
    holding = [b for b in beats if "beat: Acquired lock" in b[1].read_text(errors="replace")]
    return holding[0] if len(holding) == 1 else None


@pytest.fixture(scope="module")
def sched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scheduling]:
    base = tmp_path_factory.mktemp("schedules")
    for sub in ("logs", "cache", "redis"):
        (base / sub).mkdir()
    server, url = start_redis(base / "redis", "--save", "")
    (base / "porter.toml").write_text(CONFIG)
    env = worker_env(url, "http://127.0.0.1:9", base / "cache")  # S3 is not used here
    env["PORTER_CONFIG"] = str(base / "porter.toml")
    env["PORTER_SCHEDULE_MIN_INTERVAL"] = "1"  # these tests fire schedules every second or two
    cluster = Cluster(url, env, base / "logs", base / "cache")
    cluster.start_worker(concurrency=2)
    try:
        cluster.wait_for_workers(1)
        s = Scheduling(cluster)
        yield s
        s.stop_beats()
    finally:
        cluster.stop()
        server.terminate()
        server.wait(10)


@pytest.fixture
def training(megatron, tmp_path: Path) -> Path:
    """A training output root: latest_checkpointed_iteration.txt → iter_0000010 (TP=1)."""
    root = tmp_path / "run"
    shutil.copytree(megatron("llama").paths[LEGACY_TP1], root)
    return root


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def test_two_beats_fire_once_per_period_and_unchanged_checkpoint_is_skipped(sched, training):
    beats = [sched.start_beat(), sched.start_beat()]
    wait_until(lambda: _active(beats), 30, "a beat to take the lock")
    name = _name()
    sched.add(name, training, "2s")  # first run 2 s from now
    try:
        time.sleep(7.2)
        sched.stop_beats()
        sends = sorted(_sends(log, name) for _, log in beats)
        # 3 periods of 2 s in 7 s; two beats both sending would give about twice as many.
        assert sends[0] == 0 and 3 <= sends[1] <= 4, sends  # only the lock holder sent
        runs = wait_until(
            lambda: len(sched.runs(name)) == sends[1] and sched.runs(name), 30, "runs"
        )
        assert int(sched.stats(name)["runs"]) == len(runs)
        first, *later = runs
        assert first["iteration"] == "10" and len(first["submitted"]) == 1, first
        job = first["submitted"][0]
        for run in later:  # unchanged checkpoint: the same job, not created again
            assert run["submitted"] == [] and [s["job"] for s in run["skipped"]] == [job], run
            assert "error" not in run
        record = sched.wait_job(job)
        assert record["state"] == "SUCCEEDED", record
        assert record["trigger"] == f"schedule:{name}" and record["profile"] == PROFILE
        assert record["spec"]["output"] == f"{training}/iter_0000010-trt1"
        assert (training / "iter_0000010-trt1" / "manifest.json").is_file()
        assert job in {s["job"] for r in sched.runs(name)[1:] for s in r["skipped"]}
    finally:
        sched.stop_beats()
        sched.remove(name)


def test_new_iteration_gets_a_new_job_and_a_missing_tracker_is_recorded(sched, tmp_path, megatron):
    root = tmp_path / "run"
    root.mkdir()  # training has not written a checkpoint yet
    name = _name()
    sched.start_beat()
    sched.add(name, root, "1s")
    try:
        stats = wait_until(lambda: sched.stats(name).get("last_error"), 20, "a failed run")
        assert "latest_checkpointed_iteration.txt" in stats
        errors = int(sched.stats(name)["errors"])
        assert errors >= 1
        logs = "\n".join(p.read_text(errors="replace") for p in sched.cluster.logs.glob("worker-*"))
        failed = [line for line in logs.splitlines() if f"schedule {name}: run failed" in line]
        assert failed and all("WARNING/" in line for line in failed), failed  # routine: no ERROR

        source = megatron("llama").paths[LEGACY_TP1]
        shutil.copytree(source / "iter_0000010", root / "iter_0000010")
        (root / "latest_checkpointed_iteration.txt").write_text("10")
        first = wait_until(lambda: [r for r in sched.runs(name) if r.get("submitted")], 20, "a job")
        job10 = first[0]["submitted"][0]
        assert first[0]["iteration"] == "10"
        assert sched.wait_job(job10)["state"] == "SUCCEEDED"
        wait_until(lambda: sched.runs(name)[-1].get("skipped"), 10, "a run that skips iteration 10")

        shutil.copytree(source / "iter_0000010", root / "iter_0000020")
        (root / "latest_checkpointed_iteration.txt").write_text("20")
        new = wait_until(
            lambda: [r for r in sched.runs(name) if r.get("iteration") == "20"], 20, "iteration 20"
        )
        assert len(new[0]["submitted"]) == 1 and new[0]["submitted"][0] != job10, new[0]
        record = sched.wait_job(new[0]["submitted"][0])
        assert record["state"] == "SUCCEEDED" and record["iteration"] == "20"
        assert (root / "iter_0000020-trt1" / "manifest.json").is_file()
        created = [j for r in sched.runs(name) for j in r.get("submitted", [])]
        assert created == [job10, new[0]["submitted"][0]]  # one job per iteration, no more
        assert sched.cluster.workers[0].poll() is None  # failed runs did not hurt the worker
    finally:
        sched.stop_beats()
        sched.remove(name)


def test_standby_beat_takes_over_when_the_active_one_dies(sched, tmp_path):
    beats = [sched.start_beat(), sched.start_beat()]
    active = wait_until(lambda: _active(beats), 30, "a beat to take the lock")
    standby = next(b for b in beats if b is not active)
    name = _name()
    sched.add(name, tmp_path / "nothing-here", "1s")  # runs record an error; cheap
    try:
        wait_until(lambda: _sends(active[1], name) >= 2, 10, "the active beat to send")
        os.killpg(active[0].pid, signal.SIGKILL)  # no clean shutdown: the lock must expire
        active[0].wait(10)
        killed = time.monotonic()
        wait_until(lambda: _sends(standby[1], name) >= 2, LOCK_TIMEOUT + 8, "the standby to send")
        assert time.monotonic() - killed < LOCK_TIMEOUT + 6
        assert "beat: Acquired lock" in standby[1].read_text()
    finally:
        sched.stop_beats()
        sched.remove(name)


def test_cli_add_list_remove_and_bad_input(sched, tmp_path):
    name = _name()
    root = str(tmp_path / "run")

    def add(*extra: str, profile: str = PROFILE, source: str = root, cron: str = "0 3 * * *"):
        return ("schedule", "add", name, "--cron", cron, "--profile", profile, "--source", source,
                *extra)  # fmt: skip

    def parallel(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
        with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
            return list(pool.map(lambda c: sched.porter(*c), commands))

    bad = {
        "--cron '0 3 * *' must have 5 fields": add(cron="0 3 * *"),
        "bad hour '25'": add(cron="0 25 * * *"),
        "no export profile 'nope' (known: tiny)": add(profile="nope"),
        "must be s3://bucket/prefix or an absolute path": add(source="relative/run"),
        "not allowed with argument": add("--every", "1m"),  # argparse: exit 2
    }
    for message, result in zip(bad, parallel(*bad.values()), strict=True):
        assert result.returncode in (1, 2) and message in result.stderr, (message, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert not sched.redis.exists(schedules.entry_key(name))  # nothing stored

    added = sched.porter(*add())
    assert added.returncode == 0, added.stderr
    assert "no latest_checkpointed_iteration.txt" in added.stderr  # a hint, not an error
    try:
        listed, again = parallel(("schedule", "list"), add())
        row = next(line for line in listed.stdout.splitlines() if line.startswith(name))
        assert "cron 0 3 * * *" in row and PROFILE in row and root in row
        assert again.returncode == 1 and "already exists; --replace" in again.stderr
        replace = ("schedule", "add", name, "--every", "10m", "--profile", PROFILE, "--source",
                   root, "--replace")  # fmt: skip
        replaced = sched.porter(*replace)
        assert replaced.returncode == 0, replaced.stderr
        items = json.loads(sched.porter("schedule", "list", "--json").stdout)
        item = next(i for i in items if i["name"] == name)
        assert item["schedule"] == "every 10m" and item["source"] == root and item["runs"] == 0
    finally:
        removed = sched.porter("schedule", "remove", name)
    assert removed.returncode == 0, removed.stderr
    assert not sched.redis.exists(schedules.entry_key(name))
    listed, gone = parallel(("schedule", "list"), ("schedule", "remove", name))
    assert name not in listed.stdout
    assert gone.returncode == 1 and f"no schedule '{name}'" in gone.stderr


@pytest.mark.parametrize(
    ("text", "shown"),
    [("30", "every 30s"), ("90s", "every 90s"), ("10m", "every 10m"), ("2h", "every 2h"),
     ("1d", "every 1d"), ("1.5", "every 1.5s")],
)  # fmt: skip
def test_every_parses_units(text: str, shown: str) -> None:
    assert schedules.describe(schedules.parse_every(text, minimum=1)) == shown


@pytest.mark.parametrize("text", ["", "0s", "0.5", "10x", "-1m", "1 h 2"])
def test_every_rejects_bad_intervals(text: str) -> None:
    with pytest.raises(schedules.ScheduleError):
        schedules.parse_every(text, minimum=1)
