"""Benchmark: Porter's distributed mode (Celery workers on a real redis-server, S3 over HTTP from
moto's server) against the local executor (`porter convert`), on this machine.

1. Queue overhead. megatron-core's tiny example checkpoint (`porter example megatron DIR --tp 2`,
   Llama) converted TP=2 → TP=4 end to end through Redis and two workers (`porter submit --wait`)
   and with `porter convert`, local path → local path and s3 → s3. Every run writes a fresh DEST
   (so it really converts) and s3 runs start with empty source caches. One warm-up run of each
   kind is not counted; then --runs rounds, the four kinds interleaved.
2. Scaling. A ≈1 GiB legacy Megatron checkpoint (training TP=2: bf16 weights plus Adam's fp32
   moments, as Megatron-LM saves them) written by megatron-core (converters/megatron/example.py) in a
   Llama-like shape from bench/synthetic_checkpoint.py, uploaded to moto, converted to TP=4
   s3 → s3 with 1, 2 and 4 worker processes (concurrency 1 each; restarted between configurations,
   each with its own empty source cache, as separate machines would have), and with the same
   workers local path → local path.

For every run: the wall time of the client command; the job record's timings and per-rank bytes;
and the CPU seconds (user + system) that each group of processes used meanwhile: the client, the
workers, moto, redis-server, this script, and everything else on the machine (from /proc/stat),
which shows whether the cores were busy and with what. moto and redis-server run as their own
processes for that reason (moto as `ThreadedMotoServer`, as in the tests, request logging off).

Usage: .venv/bin/python bench/run_distributed.py [--runs N] [--keep] [--doc PATH]
Generated data goes under bench/out/ (git-ignored) and is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))  # tests.cluster: the same worker processes the tests start

from docs_section import replace_section  # noqa: E402
from run_megatron_trtllm import machine  # noqa: E402
from synthetic_checkpoint import ModelShape  # noqa: E402

from tests.cluster import Cluster, free_port, worker_env  # noqa: E402

SECTION = "distributed"
SOURCE_TP, TP = 2, 4
SCALING_WORKERS = (1, 2, 4)
OVERHEAD_WORKERS = 2
# ≈1 GiB of objects: ≈0.21 GiB of bf16 weights plus 8 bytes of Adam moments per parameter.
SCALING_SHAPE = ModelShape(num_layers=4, hidden_size=1024, ffn_hidden_size=2816)
# Test-only knobs of tests.cluster.worker_env: the benchmark runs with Porter's defaults.
_TEST_KNOBS = ("PORTER_UNACKED_RESTORE_INTERVAL", "PORTER_UNACKED_RESTORE_THROTTLE",
               "PORTER_PROGRESS_INTERVAL", "PORTER_FETCH_COALESCE_BYTES")  # fmt: skip
MiB, GiB = 1 << 20, 1 << 30
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours some request lines
_REQUEST = re.compile(r'"([A-Z]+) \S+ HTTP/[\d.]+" (\d{3})')  # werkzeug's request log line
KINDS = ("convert", "queue")
QUIET_WAIT_S = 120  # at most this long, before each scaling configuration, for an idle machine


def porter_bin() -> str:
    return str(Path(sys.executable).with_name("porter"))


# ---------------------------------------------------------------------------------------------
# CPU accounting


def _cpu(proc: psutil.Process, children: bool = True) -> float:
    """User + system CPU seconds of a live process (and its live children)."""
    procs = [proc]
    if children:
        with contextlib.suppress(psutil.Error):
            procs += proc.children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _busy() -> float:
    """CPU seconds all cores spent working (not idle, not waiting for I/O, not stolen by the
    hypervisor), since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def _steal() -> float:
    """CPU seconds the hypervisor gave to others while this machine wanted to run."""
    return getattr(psutil.cpu_times(), "steal", 0.0)


def wait_for_quiet(limit_s: float, busy_cores: float = 0.3, window_s: float = 3.0) -> float:
    """Wait (at most `limit_s`) until the machine is nearly idle: fewer than `busy_cores` cores
    busy over `window_s`. Other people's jobs on a shared machine would otherwise land in the
    measurements. Returns the seconds waited."""
    t0 = time.monotonic()
    while True:
        before = _busy()
        time.sleep(window_s)
        if (_busy() - before) / window_s < busy_cores or time.monotonic() - t0 > limit_s:
            return time.monotonic() - t0


def _waited_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class CpuMeter:
    """CPU seconds of named process groups over one interval; the client is the command run
    meanwhile (waited child of this process), `other` is the rest of the machine."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {name: [psutil.Process(p) for p in pids] for name, pids in groups.items()}
        self.known = {psutil.Process().pid}
        for procs in self.groups.values():
            for p in procs:
                self.known.add(p.pid)
                with contextlib.suppress(psutil.Error):
                    self.known.update(c.pid for c in p.children(recursive=True))

    @staticmethod
    def _all() -> dict[int, tuple[str, float]]:
        """pid → (short command line, CPU seconds) of every process now alive."""
        out = {}
        for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
            t, cmd = p.info["cpu_times"], p.info["cmdline"] or [p.info["name"] or "?"]
            if t is None:
                continue
            words = [Path(w).name if "/" in w else w for w in cmd[:4]]
            out[p.pid] = (" ".join(words)[:60], t.user + t.system)
        return out

    def _snapshot(self) -> dict[str, float]:
        snap = {name: sum(_cpu(p) for p in procs) for name, procs in self.groups.items()}
        me = psutil.Process().cpu_times()
        snap["bench"] = me.user + me.system
        snap["client"] = _waited_children()
        snap["busy"] = _busy()
        snap["steal"] = _steal()
        return snap

    def __enter__(self) -> CpuMeter:
        self.start = self._snapshot()
        self.start_all = self._all()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._snapshot()
        end_all = self._all()
        self.seconds = {k: end[k] - self.start[k] for k in end}
        mine = sum(v for k, v in self.seconds.items() if k not in ("busy", "steal"))
        self.seconds["other"] = max(0.0, self.seconds["busy"] - mine)
        # The largest other consumers still alive at the end (short-lived ones are missed).
        others: dict[str, float] = {}
        for pid, (cmd, cpu) in end_all.items():
            if pid in self.known:
                continue
            used = cpu - self.start_all.get(pid, (cmd, 0.0))[1]
            if used >= 0.5:
                others[cmd] = others.get(cmd, 0.0) + used
        self.others = dict(sorted(others.items(), key=lambda kv: -kv[1])[:3])


# ---------------------------------------------------------------------------------------------
# servers


@dataclasses.dataclass
class Servers:
    """redis-server and moto's S3 server, each its own process; `env` is what clients and
    workers get (tests.cluster.worker_env without its test-only knobs)."""

    work: Path
    redis: subprocess.Popen | None = None
    moto: subprocess.Popen | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    redis_url: str = ""
    bucket: str = ""
    moto_log: Path | None = None
    _log_offset: int = 0

    def start(self) -> None:
        (self.work / "redis").mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        port = free_port()
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        # As deploy/local/run.sh runs it: AOF on, loopback only, never evict.
        options = ["--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction"]
        cmd = [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.work / "redis"),
        ]
        self.redis = subprocess.Popen([*cmd, *options], stdout=subprocess.DEVNULL)
        self.redis_url = f"redis://127.0.0.1:{port}/0"

        s3_port = free_port()
        code = (
            "import logging, sys, threading\n"
            "from moto.server import ThreadedMotoServer\n"
            # one line per request (method, path, status) on stderr: counted per run
            "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
            "ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False)"
            ".start()\n"
            "threading.Event().wait()\n"
        )
        self.moto_log = self.work / "logs" / "moto.log"
        log = open(self.moto_log, "wb")  # noqa: SIM115
        self.moto = subprocess.Popen(
            [sys.executable, "-c", code, str(s3_port)], stdout=log, stderr=subprocess.STDOUT
        )
        endpoint = f"http://127.0.0.1:{s3_port}"
        env = worker_env(self.redis_url, endpoint, self.work / "cache")
        self.env = {k: v for k, v in env.items() if k not in _TEST_KNOBS}
        os.environ.update(self.env)  # this process's boto3 and redis clients too
        for k in _TEST_KNOBS:
            os.environ.pop(k, None)
        self._wait_ready()
        self.bucket = f"porter-bench-{uuid.uuid4().hex[:12]}"
        import boto3

        boto3.session.Session().client("s3").create_bucket(Bucket=self.bucket)

    def _wait_ready(self, timeout: float = 30) -> None:
        import boto3
        import redis

        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.redis_url)
        while True:
            try:
                client.ping()
                boto3.session.Session().client("s3").list_buckets()
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server or moto did not start: {exc}") from exc
                time.sleep(0.1)

    def moto_requests(self) -> dict[str, int]:
        """Requests moto answered since the last call, by "METHOD status" (206: ranged GET)."""
        with open(self.moto_log, "rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line being written is counted next time
        self._log_offset += end
        counts: dict[str, int] = {}
        for line in data[:end].decode(errors="replace").splitlines():
            m = _REQUEST.search(_ANSI.sub("", line))
            if m:
                key = f"{m.group(1)} {m.group(2)}"
                counts[key] = counts.get(key, 0) + 1
        return counts

    def pids(self) -> dict[str, list[int]]:
        return {"moto": [self.moto.pid], "redis": [self.redis.pid]}

    def stop(self) -> None:
        for proc in (self.moto, self.redis):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def start_workers(servers: Servers, count: int, name: str) -> tuple[Cluster, list[Path]]:
    """`count` fresh `porter worker --queues cpu --concurrency 1` processes, each with its own
    empty source cache (tests.cluster gives worker i the cache CACHE/worker-i)."""
    logs = servers.work / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    root = servers.work / "cache" / name
    caches = [root / f"worker-{i}" for i in range(count)]
    for cache in caches:
        _empty(cache)
    cluster = Cluster(servers.redis_url, dict(servers.env), logs, root)
    for _ in range(count):
        cluster.start_worker("cpu", 1)
    try:
        cluster.wait_for_workers(count)
    except TimeoutError:
        cluster.stop()
        tails = "\n".join(p.read_text(errors="replace")[-2000:] for p in logs.iterdir())
        raise RuntimeError(f"workers did not start:\n{tails}") from None
    return cluster, caches


def _empty(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def upload(local: Path, uri: str) -> int:
    """Put every file under `local` at the same relative key under `uri`; returns the bytes."""
    from tasks.storage.store import open_store

    store = open_store(uri)
    total = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.put_file(path, path.relative_to(local).as_posix())
        total += path.stat().st_size
    return total


def object_sizes(uri: str) -> dict[str, int]:
    from tasks.storage.store import open_store

    store = open_store(uri)
    return {key: store.stat(key).bytes for key in store.list()}


# ---------------------------------------------------------------------------------------------
# one run


def _run(
    cmd: list[str], env: dict[str, str], groups: dict[str, list[int]], servers: Servers
) -> dict[str, Any]:
    os.sync()  # no run pays for another's write-back
    time.sleep(0.5)
    servers.moto_requests()  # start counting here
    with CpuMeter(groups) as meter:
        t0, started = time.perf_counter(), time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
        wall, ended = time.perf_counter() - t0, time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return {
        "wall_s": wall,
        "started": started,  # wall clock, to line up with the job record's timestamps
        "ended": ended,
        "cpu": meter.seconds,
        "other_processes": meter.others,
        "requests": servers.moto_requests(),
        "stdout": proc.stdout,
    }


def run_convert(
    source: str, dest: str, servers: Servers, groups: dict[str, list[int]], cache: Path,
    workers: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`porter convert` (the local executor), with an empty source cache."""
    _empty(cache)
    cmd = [porter_bin(), "convert", "megatron-trtllm", source, dest, "--tp", str(TP), "--quiet"]
    if workers:
        cmd += ["--workers", str(workers)]
    res = _run(cmd, {**servers.env, "PORTER_CACHE_DIR": str(cache)}, groups, servers)
    res.pop("stdout")
    return res


def run_plan(
    source: str, servers: Servers, groups: dict[str, list[int]], cache: Path
) -> dict[str, Any]:
    """`porter plan` (metadata only, as the inspect step reads it), with an empty source cache."""
    _empty(cache)
    cmd = [porter_bin(), "plan", "megatron-trtllm", source, "--tp", str(TP)]
    return _run(cmd, {**servers.env, "PORTER_CACHE_DIR": str(cache)}, groups, servers)


def run_submit(
    source: str, dest: str, servers: Servers, groups: dict[str, list[int]], caches: list[Path]
) -> dict[str, Any]:
    """`porter submit --wait` through the queue, worker caches emptied first; adds the record."""
    from tasks.jobs.records import JobRecords

    for cache in caches:
        _empty(cache)
    cmd = [porter_bin(), "submit", "megatron-trtllm", source, dest, "--tp", str(TP), "--wait"]
    res = _run(cmd, servers.env, groups, servers)
    job = res.pop("stdout").splitlines()[0]
    record = JobRecords(servers.redis_url).get(job)
    if record is None or record["state"] != "SUCCEEDED":
        raise RuntimeError(f"job {job} did not succeed: {record}")
    res["job"] = job
    res["job_s"] = float(record["finished"]) - float(record["created"])
    res["queued_s"] = float(record["started"]) - float(record["created"])
    # the client's own part: start-up until the record exists, and job end until it exits
    res["before_s"] = float(record["created"]) - res["started"]
    res["after_s"] = res["ended"] - float(record["finished"])
    res["inspect_worker"] = record["steps"]["inspect"].get("worker")
    planned = {r["rank"]: r for r in record["inspected"]["ranks"]}
    res["source_bytes"] = record["inspected"]["source_bytes"]
    res["ranks"] = []
    for r in range(len(planned)):
        step = record["steps"][f"reshard:{r}"]
        res["ranks"].append(
            {
                "rank": r,
                "worker": step.get("worker"),
                "step_s": float(step["finished"]) - float(step["started"]),
                "convert_s": float(step.get("seconds") or 0.0),
                "bytes_fetched": int(step.get("bytes_fetched") or 0),
                "bytes_read": int(step.get("bytes_read") or 0),
                "planned_read": int(planned[r]["bytes_read"]),
                "bytes_written": int(step.get("bytes_written") or 0),
                "deliveries": int(step.get("deliveries") or 0),
                "sha256": step.get("sha256"),
            }
        )
    res["steps"] = {
        name: float(s["finished"]) - float(s["started"])
        for name, s in record["steps"].items()
        if s.get("finished") and s.get("started")
    }
    return res


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# part 1: queue overhead


def overhead(servers: Servers, work: Path, runs: int) -> dict[str, Any]:
    """Tiny TP=2 → TP=4 conversions, `porter convert` vs `porter submit --wait`."""
    src = work / "example-tp2"
    subprocess.run(
        [porter_bin(), "example", "megatron", str(src), "--tp", str(SOURCE_TP)],
        check=True, capture_output=True, cwd=REPO,
    )  # fmt: skip
    s3_src = f"s3://{servers.bucket}/example-tp2"
    src_bytes = upload(src, s3_src)
    cluster, caches = start_workers(servers, OVERHEAD_WORKERS, "overhead")
    groups = {**servers.pids(), "workers": [w.pid for w in cluster.workers]}
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        for i in range(runs + 1):  # run 0 is the warm-up
            for where in ("local", "s3"):
                for kind in KINDS:
                    name = f"{kind}-{where}-{i}"
                    if where == "local":
                        source, dest = str(src), str(work / "out" / name)
                    else:
                        source, dest = s3_src, f"s3://{servers.bucket}/out/{name}"
                    if kind == "convert":
                        res = run_convert(source, dest, servers, groups, work / "cache" / "convert")
                    else:
                        res = run_submit(source, dest, servers, groups, caches)
                    _say(f"  overhead {name:<16} {res['wall_s']:6.2f} s")
                    if i > 0:
                        samples.setdefault((kind, where), []).append(res)
    finally:
        cluster.stop()
    rows = {}
    for where in ("local", "s3"):
        conv, queue = samples[("convert", where)], samples[("queue", where)]
        rows[where] = {
            "convert": [r["wall_s"] for r in conv],
            "queue": [r["wall_s"] for r in queue],
            "job": [r["job_s"] for r in queue],
            "queued": [r["queued_s"] for r in queue],
            "before": [r["before_s"] for r in queue],
            "after": [r["after_s"] for r in queue],
            "rank_step": [statistics.median(x["step_s"] for x in r["ranks"]) for r in queue],
            "cpu_convert": _median_cpu(conv),
            "cpu_queue": _median_cpu(queue),
            "steps": _median_steps(queue),
            "requests": {
                kind: statistics.median(_requests(r) for r in runs_)
                for kind, runs_ in (("convert", conv), ("queue", queue))
            },
        }
    profile = profile_s3_convert(
        s3_src, f"s3://{servers.bucket}/out/profiled", work / "cache" / "p"
    )
    return {"rows": rows, "source_bytes": src_bytes, "runs": runs, "profile": profile}


def _median_steps(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds of each kind of step (reshard: the slowest rank of each run)."""
    out = {}
    for kind in ("inspect", "reshard", "config", "publish"):
        per_run = [
            max(v for name, v in s["steps"].items() if name.split(":")[0] == kind) for s in samples
        ]
        out[kind] = statistics.median(per_run)
    return out


def profile_s3_convert(source: str, dest: str, cache: Path) -> dict[str, Any]:
    """Run the local executor in this process under cProfile (s3 → s3, one worker): how much of
    it is spent constructing S3 stores (each makes a boto3 session and client)."""
    import cProfile
    import pstats

    from tasks.executors.local import run_conversion
    from tasks.kinds.megatron_trtllm import ConvertSpec

    _empty(cache)
    os.environ["PORTER_CACHE_DIR"] = str(cache)
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    run_conversion(ConvertSpec(source, dest, tp=TP), workers=1)
    profiler.disable()
    wall = time.perf_counter() - t0
    os.environ["PORTER_CACHE_DIR"] = str(cache.parent)
    stats = pstats.Stats(
        profiler
    ).stats  # (file, line, function) -> (cc, calls, tt, cumulative, callers)
    found = [
        (v[1], v[3])
        for (file, _, func), v in stats.items()
        if file.endswith(os.path.join("tasks", "storage", "store.py")) and func == "open_store"
    ]
    calls, seconds = found[0] if found else (0, 0.0)
    decode = sum(
        v[3]
        for (file, _, func), v in stats.items()
        if file.endswith(os.path.join("json", "decoder.py")) and func == "raw_decode"
    )
    return {
        "wall_s": wall,
        "open_store_calls": calls,
        "open_store_s": seconds,
        "json_decode_s": decode,
    }


def _median_cpu(samples: list[dict[str, Any]]) -> dict[str, float]:
    keys = samples[0]["cpu"].keys()
    return {k: statistics.median(s["cpu"][k] for s in samples) for k in keys}


# ---------------------------------------------------------------------------------------------
# part 2: scaling


def write_scaling_checkpoint(root: Path) -> dict[str, Any]:
    """The ≈1 GiB TP=2 legacy checkpoint (weights and optimizer state) by megatron-core."""
    import torch

    from converters.megatron.example import write_example_checkpoint

    s = SCALING_SHAPE
    overrides = {
        "num_layers": s.num_layers,
        "hidden_size": s.hidden_size,
        "num_attention_heads": s.num_attention_heads,
        "num_query_groups": s.num_query_groups,
        "kv_channels": s.kv_channels,
        "ffn_hidden_size": s.ffn_hidden_size,
        "padded_vocab_size": s.vocab_size,
        "max_position_embeddings": s.max_position_embeddings,
    }
    t0 = time.perf_counter()
    write_example_checkpoint(root, "llama", tp=SOURCE_TP, dtype=torch.bfloat16, overrides=overrides)
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*.pt")}
    return {
        "seconds": time.perf_counter() - t0,
        "files": files,
        "weight_bytes": s.nbytes(),
        "shape": dataclasses.asdict(s) | {"kv_channels": s.kv_channels},
    }


def get_probe(uri: str, key: str, size: int, count: int = 4) -> float:
    """Seconds per 16 MiB ranged GET of object `key` (spread over the object), as a rank does."""
    from tasks.storage.store import open_store

    store = open_store(uri)
    step = max(1, (size - 16 * MiB) // count)
    t0 = time.perf_counter()
    for i in range(count):
        store.read_range(key, min(i * step, size - 16 * MiB), 16 * MiB)
    return (time.perf_counter() - t0) / count


def scaling(servers: Servers, work: Path) -> dict[str, Any]:
    """TP=2 → TP=4 of the ≈1 GiB checkpoint with 1, 2 and 4 workers; s3 → s3 and local → local."""
    src = work / "ckpt-tp2"
    _say("writing the scaling checkpoint (megatron-core)")
    ckpt = write_scaling_checkpoint(src)
    s3_src = f"s3://{servers.bucket}/ckpt-tp2"
    groups = servers.pids()
    with CpuMeter(groups) as meter:
        t0 = time.perf_counter()
        uploaded = upload(src, s3_src)
        upload_s = time.perf_counter() - t0
    objects = object_sizes(s3_src)
    big = max(objects, key=objects.get)
    upload(work / "example-tp2", f"s3://{servers.bucket}/small")
    small_objects = object_sizes(f"s3://{servers.bucket}/small")
    small = max(small_objects, key=small_objects.get)
    probe = {
        "big_key_bytes": objects[big],
        "big_s": get_probe(s3_src, big, objects[big]),
        "small_key_bytes": small_objects[small],
        "small_get_s": _small_get(f"s3://{servers.bucket}/small", small, small_objects[small]),
    }
    _say(f"  uploaded {uploaded / GiB:.2f} GiB in {upload_s:.1f} s; probe {probe}")
    plan = run_plan(s3_src, servers, groups, work / "cache" / "plan")
    _say(f"  porter plan (s3, metadata only) {plan['wall_s']:.2f} s, {plan['requests']}")
    configs: dict[int, dict[str, Any]] = {}
    waited = {}
    for n in SCALING_WORKERS:
        waited[n] = wait_for_quiet(QUIET_WAIT_S)
        cluster, caches = start_workers(servers, n, f"scaling-{n}")
        g = {**groups, "workers": [w.pid for w in cluster.workers]}
        try:
            s3 = run_submit(s3_src, f"s3://{servers.bucket}/scaled/w{n}", servers, g, caches)
            _say(
                f"  scaling {n} worker(s) s3->s3     {s3['wall_s']:6.2f} s (job {s3['job_s']:.2f} s)"
            )
            local = run_submit(str(src), str(work / "out" / f"scaled-w{n}"), servers, g, caches)
            _say(f"  scaling {n} worker(s) local->local {local['wall_s']:6.2f} s")
        finally:
            cluster.stop()
        configs[n] = {"s3": s3, "local": local}
    groups_c = servers.pids()
    conv = run_convert(
        s3_src, f"s3://{servers.bucket}/scaled/convert", servers, groups_c, work / "cache" / "c"
    )
    _say(f"  porter convert s3->s3 (default workers) {conv['wall_s']:6.2f} s")
    return {
        "checkpoint": ckpt,
        "objects": objects,
        "object_bytes": sum(objects.values()),
        "upload_s": upload_s,
        "upload_cpu": meter.seconds,
        "probe": probe,
        "plan": plan,
        "configs": configs,
        "convert_s3": conv,
        "waited_s": waited,
    }


def _small_get(uri: str, key: str, size: int) -> float:
    from tasks.storage.store import open_store

    store = open_store(uri)
    n = min(size, 16 * MiB)
    t0 = time.perf_counter()
    for _ in range(4):
        store.read_range(key, 0, n)
    return (time.perf_counter() - t0) / 4


# ---------------------------------------------------------------------------------------------
# the report


def _fmt_cpu(cpu: dict[str, float], keys: tuple[str, ...]) -> str:
    return " / ".join(f"{cpu.get(k, 0.0):.1f}" for k in keys)


CPU_KEYS = ("client", "workers", "moto", "redis", "other")


def report(res: dict[str, Any], mach: dict[str, Any], command: str, total_s: float) -> str:
    ov, sc = res["overhead"], res.get("scaling")
    cores = mach["cores"]
    lines = [
        "## Distributed mode: queue overhead and scaling (Celery on Redis, S3 over HTTP via moto)",
        "",
        f"Measured {dt.date.today().isoformat()} by `bench/run_distributed.py` in "
        f"{total_s / 60:.1f} minutes. Machine: **{cores} cores** ({mach['cpu']}), "
        f"{mach['ram_gib']:.1f} GiB RAM, Linux {mach['kernel']}; Python {mach['python']}, "
        f"torch {mach['torch']}, celery {res['versions']['celery']}, "
        f"redis-server {res['versions']['redis']}, moto {res['versions']['moto']}, "
        f"boto3 {res['versions']['boto3']}. Everything — redis-server, moto's S3 server, the "
        "workers and the client — ran on this one machine, so the workers share its "
        f"{cores} cores with each other and with the S3 server.",
        "",
        "How to run: `" + command + "` (needs `redis-server` and the dev extras; "
        "writes this section).",
        "",
        "**CPU columns** are CPU seconds (user + system) used during the run by: the client "
        "command (`porter convert` and its rank processes, or `porter submit --wait`) / the "
        "worker processes (with their pool children) / moto's S3 server process / "
        "redis-server / *other*: every other process on the machine (from `/proc/stat`; "
        "other people's work on this shared machine included). "
        f"{cores} cores give at most {cores} CPU seconds per wall second.",
        "",
        "### Queue overhead: tiny conversion end to end",
        "",
        f"megatron-core's example Llama checkpoint (`porter example megatron DIR --tp 2`, "
        f"{ov['source_bytes'] / 1e6:.2f} MB with optimizer state), converted TP=2 → TP=4. "
        f"`porter convert` (local executor, no servers) against `porter submit --wait` through "
        f"redis-server and {OVERHEAD_WORKERS} workers (`porter worker --queues cpu "
        "--concurrency 1`, started once). Wall time of the command, from process start to "
        f"exit, median of {ov['runs']} runs each (after one uncounted warm-up run of each); "
        "every run writes a fresh DEST, and runs reading s3:// start with empty source caches.",
        "",
        "| source → DEST | `porter convert` s | `porter submit --wait` s | queue overhead s "
        "| submit: start-up → job created / job (created → finished) / finished → exit s "
        "| CPU convert | CPU queue |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for where, label in (("local", "local path → local path"), ("s3", "s3 → s3 (moto)")):
        r = ov["rows"][where]
        c, q = statistics.median(r["convert"]), statistics.median(r["queue"])
        lines.append(
            f"| {label} | {c:.2f} | {q:.2f} | {q - c:+.2f} "
            f"| {statistics.median(r['before']):.2f} / {statistics.median(r['job']):.2f} / "
            f"{statistics.median(r['after']):.2f} | {_fmt_cpu(r['cpu_convert'], CPU_KEYS)} "
            f"| {_fmt_cpu(r['cpu_queue'], CPU_KEYS)} |"
        )
    lines += ["", "All runs (s):", ""]
    for where in ("local", "s3"):
        r = ov["rows"][where]
        lines.append(
            f"- {where}: convert " + ", ".join(f"{x:.2f}" for x in r["convert"])
            + "; submit --wait " + ", ".join(f"{x:.2f}" for x in r["queue"])
            + "; job record " + ", ".join(f"{x:.2f}" for x in r["job"])
        )  # fmt: skip
    lines += [
        "",
        "Median seconds per job step (queue runs; *reshard*: the slowest rank of each run): "
        + "; ".join(
            f"{where}: " + ", ".join(f"{k} {v:.2f}" for k, v in ov["rows"][where]["steps"].items())
            for where in ("local", "s3")
        )
        + ".",
        "",
        f"Where a tiny s3 job's time goes: the same s3 → s3 conversion run in one process "
        f"(`run_conversion`, one worker) under cProfile took {ov['profile']['wall_s']:.2f} s, of "
        f"which {ov['profile']['open_store_s']:.2f} s were spent in "
        f"{ov['profile']['open_store_calls']} calls of `tasks.storage.store.open_store` (constructing "
        "S3 stores and their boto3 clients), and "
        f"{ov['profile']['json_decode_s']:.2f} s in JSON decoding (botocore reads its service "
        "models from JSON when it creates a session's first client).",
        "",
        "Requests moto answered per s3 → s3 run (median): `porter convert` "
        f"{ov['rows']['s3']['requests']['convert']:.0f}, `porter submit --wait` "
        f"{ov['rows']['s3']['requests']['queue']:.0f}.",
        "",
        "- *Queue overhead* is the difference of the medians. The submit columns split "
        "`porter submit --wait`'s wall time with the job record's timestamps (same machine "
        "clock): the client's start-up (Python, imports, listing the source) until it creates "
        "the record; the job itself, server side; and from the publish step's end until the "
        "client exits (`--wait` polls the record every 0.5 s). The first task started "
        + ", ".join(
            f"{statistics.median(ov['rows'][w]['queued']) * 1000:.0f} ms ({w})"
            for w in ("local", "s3")
        )
        + " after the record was created (median).",
    ]
    if sc:
        lines += scaling_report(sc, cores)
    lines.append("")
    return "\n".join(lines)


def _gets(r: dict[str, Any]) -> int:
    """Ranged GETs (status 206) moto answered during a run."""
    return r["requests"].get("GET 206", 0)


def _requests(r: dict[str, Any]) -> int:
    return sum(r["requests"].values())


def scaling_report(sc: dict[str, Any], cores: int) -> list[str]:
    ck = sc["checkpoint"]
    s = ck["shape"]
    ob = sc["object_bytes"]
    configs = sc["configs"]
    lines = [
        "",
        f"### Scaling: ≈{ob / GiB:.2f} GiB checkpoint, TP={SOURCE_TP} → TP={TP}, "
        "1, 2 and 4 workers",
        "",
        f"Legacy Megatron checkpoint written by megatron-core (`converters/megatron/example.py`, "
        f"{ck['seconds']:.0f} s), training TP={SOURCE_TP}: {len(ck['files'])} "
        f"`model_optim_rng.pt` objects, {ob:,} bytes in all, of which "
        f"{ck['weight_bytes'] / GiB:.3f} GiB are bf16 weights and the rest Adam's fp32 moments "
        "(plus args and RNG state). Shape (Llama-like, `bench/synthetic_checkpoint.py`'s "
        f"`ModelShape`): {s['num_layers']} layers, hidden {s['hidden_size']}, "
        f"{s['num_attention_heads']} heads, {s['num_query_groups']} query groups, FFN "
        f"{s['ffn_hidden_size']} (SwiGLU), vocab {s['vocab_size']}, untied embeddings. "
        f"Uploaded to moto in {sc['upload_s']:.1f} s ({ob / MiB / sc['upload_s']:.0f} MiB/s; "
        f"moto used {sc['upload_cpu']['moto']:.1f} CPU s of it). One run per configuration.",
        "",
        "Workers were restarted between configurations, each with its own empty source cache "
        "(as separate machines would be); ranks that run on the same worker share its cache. "
        f"Before each configuration the script waited for the machine to be nearly idle (at "
        f"most {QUIET_WAIT_S} s; waited "
        + ", ".join(f"{w:.0f} s" for w in sc["waited_s"].values())
        + "). "
        "Wall = `porter submit --wait` from start to exit; job = the record's created → "
        "finished; inspect = the metadata-only `inspect` step. *Rank steps* = each "
        "`reshard:r` step's started → finished (fetch + convert + upload + bookkeeping); "
        "*convert* = the part of it spent converting (the step's `seconds`). *GETs* = ranged "
        "GETs moto answered (HTTP 206) / all requests it answered during the run.",
        "",
        "| workers | source → DEST | wall s | job s | inspect s | rank steps: max / sum s "
        "| convert: sum s | GETs / requests | CPU client / workers / moto / redis / other "
        f"| busy cores (of {cores}) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for n, cfg in configs.items():
        for where, label in (("s3", "s3 → s3"), ("local", "local → local")):
            r = cfg[where]
            steps = [x["step_s"] for x in r["ranks"]]
            conv = sum(x["convert_s"] for x in r["ranks"])
            busy = r["cpu"]["busy"] / r["wall_s"]
            lines.append(
                f"| {n} | {label} | {r['wall_s']:.2f} | {r['job_s']:.2f} "
                f"| {r['steps'].get('inspect', 0.0):.2f} | {max(steps):.2f} / {sum(steps):.2f} "
                f"| {conv:.2f} | {_gets(r)} / {_requests(r)} | {_fmt_cpu(r['cpu'], CPU_KEYS)} "
                f"| {busy:.2f} |"
            )
    conv = sc["convert_s3"]
    lines += [
        "",
        f"For comparison, `porter convert` s3 → s3 on the same objects (local executor, default "
        f"workers, empty cache): {conv['wall_s']:.2f} s, {_gets(conv)} ranged GETs / "
        f"{_requests(conv)} requests, CPU {_fmt_cpu(conv['cpu'], CPU_KEYS)}.",
        "",
        "Bytes per target rank (s3 → s3): fetched from S3 (the step's `bytes_fetched`, "
        "for 1 / 2 / 4 workers) vs the rank's planned reads (`porter plan`'s *reads*, the "
        "record's inspected `bytes_read`) vs all the checkpoint's object bytes. With one "
        "worker, later ranks find bytes an earlier rank (or the inspect step) already put in "
        "that worker's cache, and fetch less.",
        "",
        "| rank | planned reads | fetched (1 / 2 / 4 workers) | most fetched / planned "
        "| most fetched / all objects |",
        "|---:|---:|---:|---:|---:|",
    ]
    first = next(iter(configs.values()))["s3"]
    for i, base in enumerate(first["ranks"]):
        fetched = [cfg["s3"]["ranks"][i]["bytes_fetched"] for cfg in configs.values()]
        lines.append(
            f"| {i} | {base['planned_read']:,} | "
            + " / ".join(f"{f:,}" for f in fetched)
            + f" | {max(fetched) / base['planned_read']:.3f} | {max(fetched) / ob:.3f} |"
        )  # fmt: skip
    total_f = [sum(x["bytes_fetched"] for x in cfg["s3"]["ranks"]) for cfg in configs.values()]
    lines += [
        f"| all | {sum(x['planned_read'] for x in first['ranks']):,} | "
        + " / ".join(f"{f:,}" for f in total_f)
        + f" | | {max(total_f) / ob:.3f} |",
        "",
        "Which worker ran which rank (pid of its pool process): "
        + "; ".join(
            f"{n} worker(s): "
            + ", ".join(f"r{x['rank']}→{x['worker'].rsplit(':', 1)[-1]}" for x in cfg["s3"]["ranks"])
            for n, cfg in configs.items()
        )
        + ".",
    ]  # fmt: skip
    digests = {
        tuple(x["sha256"] for x in r["ranks"]) for cfg in configs.values() for r in cfg.values()
    }
    lines += [
        "",
        "Output check: the rank files' sha256 (from the job records) are "
        + (
            f"the same in all {2 * len(configs)} runs ({len(configs)} worker counts, s3 and local)."
            if len(digests) == 1
            else f"**not** the same across runs ({len(digests)} different sets)."
        ),
    ]
    lines += where_time_goes(sc, cores)
    return lines


def where_time_goes(sc: dict[str, Any], cores: int) -> list[str]:
    """Observations computed from the measurements (no numbers that were not measured)."""
    configs, probe, plan = sc["configs"], sc["probe"], sc["plan"]
    ns = list(configs)
    s3 = {n: configs[n]["s3"] for n in ns}
    local = {n: configs[n]["local"] for n in ns}
    lines = [
        "",
        "#### Where the time goes",
        "",
        f"- **This machine has {cores} cores**, shared by the workers, moto, redis-server and the "
        "client (and by whatever else runs on it: the *other* column). More worker processes "
        f"than cores cannot add compute; {ns[-1]} workers on {cores} cores are not a scaling "
        "test of Porter, only of this box.",
        "- s3 → s3 wall time: "
        + ", ".join(f"{n} worker(s) {s3[n]['wall_s']:.1f} s" for n in ns)
        + "; local → local with the same workers: "
        + ", ".join(f"{local[n]['wall_s']:.1f} s" for n in ns)
        + ". The conversion itself (sum of the ranks' *convert*) is "
        + ", ".join(f"{sum(x['convert_s'] for x in s3[n]['ranks']):.1f} s" for n in ns)
        + " of the s3 runs.",
        "- moto's S3 server used "
        + ", ".join(
            f"{s3[n]['cpu']['moto']:.0f} CPU s in {s3[n]['wall_s']:.0f} s ({n} worker(s))"
            for n in ns
        )
        + f": it is the bottleneck here. Its cost per ranged GET grows with the object's size: "
        f"a 16 MiB range of the {probe['big_key_bytes'] / MiB:.0f} MiB rank object took "
        f"{probe['big_s']:.3f} s (mean of 4), a whole {probe['small_key_bytes'] / MiB:.2f} MiB "
        f"object {probe['small_get_s']:.3f} s. (For every GET, moto 5.2 builds the whole object "
        "as the response body — `FakeKey.value` reads it all, under the key's lock — and "
        "`_handle_range_header` then cuts the range from it.) So the s3 wall times here "
        "measure moto on this box, not S3.",
        "- Ranged GETs per job: "
        + ", ".join(f"{_gets(s3[n])} ({n} worker(s))" for n in ns)
        + ". The metadata-only `inspect` step took "
        + ", ".join(f"{s3[n]['steps'].get('inspect', 0.0):.1f} s" for n in ns)
        + f". `porter plan` on the s3 source (metadata only, what `inspect` reads; empty "
        f"cache) took {plan['wall_s']:.1f} s and {_gets(plan)} ranged GETs, moto "
        f"{plan['cpu']['moto']:.1f} CPU s: a legacy rank file's metadata (central directory, "
        "`data.pkl`, the local header of every storage record, optimizer state included) "
        "comes in many small GETs, and each pays moto's whole-object read. A rank step fetches "
        "the metadata again into its worker's cache when it is not there, so each additional "
        "worker repeats it.",
    ]
    split = []
    for n in ns:
        r = s3[n]
        same = [x["step_s"] for x in r["ranks"] if x["worker"] == r["inspect_worker"]]
        other = [x["step_s"] for x in r["ranks"] if x["worker"] != r["inspect_worker"]]
        part = f"{n} worker(s): on the worker that ran `inspect` " + (
            f"{max(same):.1f} s" if same else "none"
        )
        if other:
            part += f", on the others {max(other):.1f} s"
        split.append(part)
    lines.append(
        "- Slowest s3 rank step, by where it ran: " + "; ".join(split) + f". (`porter plan` "
        f"alone: {_gets(plan)} ranged GETs; jobs: "
        + ", ".join(f"{_gets(s3[n])} with {n} worker(s)" for n in ns)
        + ".)"
    )
    others: dict[str, float] = {}
    for cfg in configs.values():
        for r in cfg.values():
            for cmd, sec in r.get("other_processes", {}).items():
                others[cmd] = others.get(cmd, 0.0) + sec
    top = sorted(others.items(), key=lambda kv: -kv[1])[:3]
    other_total = sum(r["cpu"]["other"] for cfg in configs.values() for r in cfg.values())
    lines.append(
        f"- *other* CPU over all scaling runs: {other_total:.0f} s"
        + (
            "; the largest other processes alive at the end of a run: "
            + ", ".join(f"`{cmd}` {sec:.0f} s" for cmd, sec in top)
            if top
            else ""
        )
        + " (everything this benchmark did not start: kernel threads, other users' processes "
        "on this shared machine)." + f" CPU time stolen by the hypervisor over the same runs: "
        f"{sum(r['cpu'].get('steal', 0.0) for cfg in configs.values() for r in cfg.values()):.1f} s."
    )
    return lines


def versions() -> dict[str, str]:
    redis_v = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.split()
    redis_s = next((w[2:] for w in redis_v if w.startswith("v=")), "?")
    return {
        "celery": version("celery"),
        "moto": version("moto"),
        "boto3": version("boto3"),
        "redis": redis_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="counted runs per kind in part 1")
    ap.add_argument("--skip-scaling", action="store_true", help="part 1 only")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "PERFORMANCE.md")
    ap.add_argument("--no-doc", action="store_true", help="print results, leave the doc alone")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument(
        "--from-json", type=Path, help="only write the report from an earlier run's results"
    )
    a = ap.parse_args(argv)
    if a.from_json:
        res = json.loads(a.from_json.read_text())
    else:
        res = measure_all(a.runs, a.skip_scaling, a.keep)
    command = ".venv/bin/python bench/run_distributed.py" + (
        f" --runs {res['runs']}" if res["runs"] != 5 else ""
    )
    text = report(res, res["machine"], command, res["total_s"])
    if not a.no_doc:
        replace_section(a.doc, SECTION, text)
        _say(f"wrote {a.doc}")
    print(text)
    return 0


def measure_all(runs: int, skip_scaling: bool, keep: bool) -> dict[str, Any]:
    """Both parts; the results are also saved as bench/out/distributed-*.json."""
    t_start = time.perf_counter()
    parent = BENCH / "out"
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="distributed-", dir=parent))
    _say(f"work directory: {work}")
    servers = Servers(work)
    res: dict[str, Any] = {"versions": versions(), "machine": machine(), "runs": runs}
    try:
        servers.start()
        _say("part 1: queue overhead")
        res["waited_s"] = wait_for_quiet(QUIET_WAIT_S)
        res["overhead"] = overhead(servers, work, runs)
        if not skip_scaling:
            _say("part 2: scaling")
            res["scaling"] = scaling(servers, work)
    finally:
        servers.stop()
        res["total_s"] = time.perf_counter() - t_start
        # the raw numbers, next to (not inside) the work directory, which may be deleted
        (parent / f"{work.name}.json").write_text(json.dumps(res, indent=1, default=str))
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    raise SystemExit(main())
