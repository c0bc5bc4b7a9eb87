"""Benchmark: how queued jobs recover from dead workers, measured with real processes.

A real redis-server (AOF on), moto's S3 server and `porter worker` processes on this machine
(`Servers` and `start_workers` from bench/run_distributed.py). The job is TP=2 → TP=4, s3 → s3,
of a torch_dist checkpoint written by megatron-core (bench/run_distributed.py's scaling shape,
bf16 weights, no optimizer state), big enough that a rank runs for a few seconds, so a kill lands
while it writes its file. Each scenario starts two fresh workers with empty source caches.

Scenarios:
1. An undisturbed run (the reference bytes).
2. `kill -9` of a whole worker (main process and pool child) while a rank writes, with the
   production settings (visibility timeout 12 h, heartbeat 5 s, stale after 30 s, reaper every
   10 s), then with short ones (0.5 / 3 / 1 s).
3. The same without the reaper (stale_after huge): the job stays RUNNING, for how long.
4. `kill -9` of the pool child only (what the OOM killer does).
5. A rank whose pool child is killed at every delivery: the job ends FAILED; the next job runs.
6. 50 tiny jobs submitted at once to two workers.

Usage: .venv/bin/python bench/run_recovery.py [--no-doc] [--keep] [--from-json PATH]
Writes the `recovery` section of docs/RELIABILITY.md; raw numbers in bench/out/recovery-*.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from run_distributed import (  # noqa: E402
    SCALING_SHAPE,
    Servers,
    porter_bin,
    start_workers,
    upload,
    versions,
)
from run_megatron_trtllm import machine  # noqa: E402

MiB = 1 << 20
SOURCE_TP, TP = 2, 4
# The reaper's settings (config/settings.py): production defaults, and short ones.
KNOBS = ("PORTER_HEARTBEAT_INTERVAL", "PORTER_STALE_AFTER", "PORTER_REAPER_INTERVAL")
PRODUCTION: dict[str, str] = {}
SHORT = dict(zip(KNOBS, ("0.5", "3", "1"), strict=True))
NO_REAPER = {"PORTER_STALE_AFTER": str(10**9)}  # no step ever looks stale: the reaper never acts
NO_REAPER_HOLD_MAX_S = 120
TINY_JOBS = 50
DOC = REPO / "docs" / "RELIABILITY.md"
START, END = "<!-- recovery -->", "<!-- /recovery -->"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# helpers


def with_settings(servers: Servers, overrides: dict[str, str]) -> Servers:
    """The same servers, with workers getting Porter's defaults for the reaper plus
    `overrides` (tests.cluster.worker_env sets short test values, removed here)."""
    env = {k: v for k, v in servers.env.items() if k not in KNOBS}
    return dataclasses.replace(servers, env={**env, **overrides})


def submit(servers: Servers, source: str, dest: str, tp: int = TP) -> str:
    cmd = [porter_bin(), "submit", "megatron-trtllm", source, dest, "--tp", str(tp)]
    proc = subprocess.run(cmd, env=servers.env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"porter submit failed: {proc.stderr.strip()}")
    return proc.stdout.splitlines()[0]


def wait_job(records: Any, job: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = records.get(job)
        if record and record["state"] in states:
            return record
        time.sleep(0.05)
    raise TimeoutError(f"{job} not {'/'.join(states)} after {timeout:.0f} s: {records.get(job)}")


def writing_rank(records: Any, job: str, timeout: float = 120) -> tuple[str, dict[str, Any]]:
    """(name, fields) of the first rank step seen writing its file (0 < done < total)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, f in records.steps(job):
            running = name.startswith("reshard:") and f.get("state") == "RUNNING"
            if running and 0 < f.get("done", 0) < f.get("total", 0):
                return name, f
        time.sleep(0.003)
    raise TimeoutError(f"no rank of {job} was seen writing")


def pid_of(fields: dict[str, Any]) -> int:
    """The pool process running a step (its record's `worker` is host:pid)."""
    return int(str(fields["worker"]).rsplit(":", 1)[1])


def digests(uri: str) -> dict[str, str]:
    """path → sha256 of the files listed in the manifest at `uri`."""
    from tasks.storage.store import open_store

    manifest = open_store(uri).get_json("manifest.json")
    if manifest is None:
        return {}
    return {f["path"]: f["sha256"] for f in manifest["files"]}


def ran_before(record: dict[str, Any], step: str) -> list[str]:
    """The other rank steps that the worker which re-ran `step` had finished before."""
    rerun = record["steps"][step]
    return sorted(
        n
        for n, s in record["steps"].items()
        if n.startswith("reshard:") and n != step and s.get("node") == rerun.get("node")
        if float(s.get("finished") or 1e18) <= float(rerun["started"])
    )


def started_between(record: dict[str, Any], step: str, killed: float) -> list[str]:
    """Rank steps that started after `step` was queued again (by the reaper, or at the kill)
    and before `step` started again: those it was queued behind."""
    again = float(record["steps"][step]["started"])
    queued = float(record["steps"][step].get("requeued") or killed)
    return sorted(
        n
        for n, s in record["steps"].items()
        if n.startswith("reshard:") and n != step and queued < float(s["started"]) < again
    )


def rank_summary(step: dict[str, Any]) -> dict[str, Any]:
    keys = ("deliveries", "bytes_read", "bytes_fetched", "bytes_cached", "bytes_written", "node")
    out = {k: step.get(k) for k in keys}
    out["seconds"] = float(step["finished"]) - float(step["started"])
    return out


class Run:
    """Two fresh workers (empty caches) with the given settings, for one scenario."""

    def __init__(self, servers: Servers, name: str, settings: dict[str, str]) -> None:
        from tasks.jobs.records import JobRecords

        self.servers = with_settings(servers, settings)
        self.name = name
        self.cluster, self.caches = start_workers(self.servers, 2, name)
        self.records = JobRecords(servers.redis_url)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster.stop()
        for cache in self.caches:
            shutil.rmtree(cache, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# scenarios


def undisturbed(servers: Servers, src: str) -> dict[str, Any]:
    with Run(servers, "undisturbed", PRODUCTION) as run:
        t0 = time.time()
        job = submit(run.servers, src, f"s3://{servers.bucket}/out/undisturbed")
        record = wait_job(run.records, job, ("SUCCEEDED", "FAILED"), 300)
    ranks = {n: rank_summary(s) for n, s in record["steps"].items() if n.startswith("reshard:")}
    return {
        "state": record["state"],
        "job_s": float(record["finished"]) - t0,
        "ranks": ranks,
        "digests": digests(f"s3://{servers.bucket}/out/undisturbed"),
    }


def kill_worker(servers: Servers, src: str, name: str, settings: dict[str, str]) -> dict[str, Any]:
    """kill -9 of the whole worker whose rank is writing; the job must finish on the other."""
    dest = f"s3://{servers.bucket}/out/{name}"
    with Run(servers, name, settings) as run:
        job = submit(run.servers, src, dest)
        step, fields = writing_rank(run.records, job)
        victim = run.cluster.worker_of(pid_of(fields))
        killed = time.time()
        run.cluster.stop_worker(victim, signal.SIGKILL)  # main process and pool child
        record = wait_job(run.records, job, ("SUCCEEDED", "FAILED"), 240)
    s = record["steps"][step]
    return {
        "settings": settings,
        "step": step,
        "killed_at_done": fields.get("done"),
        "total": fields.get("total"),
        "state": record["state"],
        "error": record["error"],
        "requeued_s": float(s["requeued"]) - killed if s.get("requeued") else None,
        "restarted_s": float(s["started"]) - killed,
        "succeeded_s": float(record["finished"]) - killed,
        "rerun": rank_summary(s),
        "killed_node": fields.get("node"),
        "rerun_node_ran": ran_before(record, step),
        "started_between": started_between(record, step, killed),
        "digests": digests(dest),
    }


def unacked(servers: Servers, task_id: str) -> dict[str, Any] | None:
    """The broker's unacknowledged copy of `task_id`: when it was delivered, and when kombu
    would put it back (delivery + visibility timeout)."""
    import redis

    from config.settings import Settings

    client = redis.Redis.from_url(servers.redis_url, decode_responses=True)
    for tag, raw in client.hgetall("unacked").items():
        if json.loads(raw)[0].get("headers", {}).get("id") == task_id:
            delivered = client.zscore("unacked_index", tag)
            timeout = Settings.from_env().visibility_timeout
            return {"delivered": delivered, "restore_at": delivered + timeout, "timeout": timeout}
    return None


def without_reaper(servers: Servers, src: str, hold_s: float) -> dict[str, Any]:
    """The same kill with the reaper unable to act: how long the job stays stuck."""
    dest = f"s3://{servers.bucket}/out/no-reaper"
    with Run(servers, "no-reaper", NO_REAPER) as run:
        job = submit(run.servers, src, dest)
        step, fields = writing_rank(run.records, job)
        victim = run.cluster.worker_of(pid_of(fields))
        killed = time.time()
        run.cluster.stop_worker(victim, signal.SIGKILL)
        time.sleep(max(0.0, killed + hold_s - time.time()))
        record = run.records.get(job)
        waited = time.time() - killed
        s = record["steps"][step]
        others = {
            n: x["state"]
            for n, x in record["steps"].items()
            if n.startswith("reshard:") and n != step
        }
        broker = unacked(servers, s["task_id"])
        cancel = subprocess.run(
            [porter_bin(), "cancel", job], env=run.servers.env, capture_output=True, text=True
        )
    return {
        "state": record["state"],
        "step": step,
        "step_state": s["state"],
        "deliveries": s.get("deliveries"),
        "heartbeat_age_s": time.time() - float(s["heartbeat"]),
        "waited_s": waited,
        "ranks": others,
        "unacked": broker,
        "killed": killed,
        "cancelled": cancel.returncode == 0,
    }


def kill_pool_child(servers: Servers, src: str) -> dict[str, Any]:
    dest = f"s3://{servers.bucket}/out/pool-child"
    with Run(servers, "pool-child", PRODUCTION) as run:
        job = submit(run.servers, src, dest)
        step, fields = writing_rank(run.records, job)
        killed = time.time()
        os.kill(pid_of(fields), signal.SIGKILL)
        record = wait_job(run.records, job, ("SUCCEEDED", "FAILED"), 300)
    s = record["steps"][step]
    return {
        "step": step,
        "state": record["state"],
        "error": record["error"],
        "restarted_s": float(s["started"]) - killed,
        "succeeded_s": float(record["finished"]) - killed,
        "rerun": rank_summary(s),
        "killed_node": fields.get("node"),
        "rerun_node_ran": ran_before(record, step),
        "started_between": started_between(record, step, killed),
        "digests": digests(dest),
    }


def kill_every_time(servers: Servers, src: str, tiny: str) -> dict[str, Any]:
    """Rank 1's pool process is killed at each of its deliveries (an OOM every time)."""
    dest = f"s3://{servers.bucket}/out/poison"
    with Run(servers, "poison", PRODUCTION) as run:
        job = submit(run.servers, src, dest)
        killed: dict[int, float] = {}
        deadline = time.monotonic() + 300
        while run.records.state(job) == "RUNNING" and time.monotonic() < deadline:
            f = dict(run.records.steps(job)).get("reshard:1", {})
            delivery = f.get("deliveries")
            if f.get("state") == "RUNNING" and delivery not in killed:
                try:
                    os.kill(pid_of(f), signal.SIGKILL)
                    killed[delivery] = time.time()
                except ProcessLookupError:
                    pass
            time.sleep(0.003)
        record = wait_job(run.records, job, ("FAILED", "SUCCEEDED"), 10)
        from tasks.storage.store import open_store

        published = open_store(dest).stat("manifest.json") is not None
        t0 = time.time()
        nxt = submit(run.servers, tiny, f"s3://{servers.bucket}/out/after-poison", tp=2)
        after = wait_job(run.records, nxt, ("SUCCEEDED", "FAILED"), 120)
    first = min(killed.values()) if killed else float("nan")
    return {
        "state": record["state"],
        "error": record["error"],
        "kills": len(killed),
        "deliveries": record["steps"]["reshard:1"].get("deliveries"),
        "failed_s": float(record["finished"]) - first,
        "published": published,
        "next_state": after["state"],
        "next_s": float(after["finished"]) - t0,
    }


def tiny_jobs(servers: Servers, tiny_local: Path, work: Path) -> dict[str, Any]:
    """TINY_JOBS tiny jobs (local → local, TP=2 → TP=2) submitted at once."""
    from config.celery_app import app
    from tasks.jobs import service
    from tasks.kinds.megatron_trtllm import ConvertSpec

    app.conf.broker_url = app.conf.result_backend = servers.redis_url
    with Run(servers, "tiny", PRODUCTION) as run:
        specs = [
            ConvertSpec(str(tiny_local), str(work / "tiny-out" / f"{i}"), tp=SOURCE_TP)
            for i in range(TINY_JOBS)
        ]
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            submitted = list(pool.map(lambda s: service.submit(s, run.records), specs))
        jobs = [job for job, created in submitted if created]
        done = [wait_job(run.records, j, ("SUCCEEDED", "FAILED"), 600) for j in jobs]
    wall = max(float(r["finished"]) for r in done) - t0
    deliveries = [s.get("deliveries", 0) for r in done for s in r["steps"].values()]
    manifests = 0
    for spec, record in zip(specs, done, strict=True):
        path = Path(spec.output) / "manifest.json"
        if path.exists() and json.loads(path.read_text())["job_id"] == record["id"]:
            manifests += 1
    return {
        "jobs": len(jobs),
        "distinct": len(set(jobs)),
        "succeeded": sum(r["state"] == "SUCCEEDED" for r in done),
        "wall_s": wall,
        "steps": len(deliveries),
        "deliveries": sum(deliveries),
        "redelivered_steps": sum(d != 1 for d in deliveries),
        "manifests": manifests,
    }


# ---------------------------------------------------------------------------------------------
# the checkpoint


def write_checkpoint(root: Path) -> dict[str, Any]:
    """torch_dist, training TP=2, bf16, bench/run_distributed.py's scaling shape."""
    import torch

    from converters.megatron.example import write_example_checkpoint

    s = SCALING_SHAPE
    same = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
            "kv_channels", "ffn_hidden_size", "max_position_embeddings")  # fmt: skip
    overrides = {name: getattr(s, name) for name in same} | {"padded_vocab_size": s.vocab_size}
    write_example_checkpoint(
        root, "llama", tp=SOURCE_TP, format="torch_dist", dtype=torch.bfloat16, overrides=overrides
    )
    return {
        "shape": dataclasses.asdict(s),
        "bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
        "files": sum(1 for p in root.rglob("*") if p.is_file()),
    }


# ---------------------------------------------------------------------------------------------
# driver


def measure(keep: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    parent = BENCH / "out"
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="recovery-", dir=parent))
    _say(f"work directory: {work}")
    res: dict[str, Any] = {"versions": versions(), "machine": machine()}
    res["date"] = dt.date.today().isoformat()
    servers = Servers(work)
    try:
        servers.start()
        res["checkpoint"] = write_checkpoint(work / "ckpt")
        src = f"s3://{servers.bucket}/ckpt"
        upload(work / "ckpt", src)
        tiny = work / "tiny"
        subprocess.run(
            [porter_bin(), "example", "megatron", str(tiny), "--tp", str(SOURCE_TP)],
            check=True, capture_output=True, cwd=REPO,
        )  # fmt: skip
        tiny_s3 = f"s3://{servers.bucket}/tiny"
        upload(tiny, tiny_s3)
        steps = [
            ("undisturbed", lambda: undisturbed(servers, src)),
            ("kill_production", lambda: kill_worker(servers, src, "kill-production", PRODUCTION)),
            ("kill_short", lambda: kill_worker(servers, src, "kill-short", SHORT)),
            ("no_reaper", lambda: without_reaper(servers, src, _hold(res))),
            ("pool_child", lambda: kill_pool_child(servers, src)),
            ("poison", lambda: kill_every_time(servers, src, tiny_s3)),
            ("tiny", lambda: tiny_jobs(servers, tiny, work)),
        ]
        for name, step in steps:
            t0 = time.perf_counter()
            try:
                res[name] = step()
            except Exception as exc:  # report what happened, go on with the next scenario
                res[name] = {"failed": f"{type(exc).__name__}: {exc}"[:2000]}
            res[name]["scenario_s"] = time.perf_counter() - t0
            _say(f"{name}: {json.dumps(res[name], default=str)[:600]}")
    finally:
        servers.stop()
        res["total_s"] = time.perf_counter() - t_start
        (parent / f"{work.name}.json").write_text(json.dumps(res, indent=1, default=str))
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return res


def _hold(res: dict[str, Any]) -> float:
    """How long to watch the job without a reaper: twice what the reaper needed from the kill
    to SUCCEEDED with the production settings (at most NO_REAPER_HOLD_MAX_S)."""
    took = res.get("kill_production", {}).get("succeeded_s") or 60.0
    return min(2 * took, NO_REAPER_HOLD_MAX_S)


# ---------------------------------------------------------------------------------------------
# the report


def _same(res: dict[str, Any], name: str) -> str:
    ref, got = res["undisturbed"].get("digests"), res[name].get("digests")
    if not ref or not got:
        return "no manifest to compare"
    return "identical" if got == ref else "**different**"


def _mb(n: Any) -> str:
    return f"{(n or 0) / MiB:.1f} MiB"


def _failed(r: dict[str, Any]) -> str | None:
    return f"the scenario did not finish: `{r['failed']}`" if "failed" in r else None


def _kill_line(res: dict[str, Any], name: str, label: str) -> str:
    r = res[name]
    if bad := _failed(r):
        return f"| {label} | {bad} | |"
    requeued = f"{r['requeued_s']:.1f} s" if r["requeued_s"] is not None else "not by the reaper"
    return (
        f"| {label} | {r['step']} killed at {_mb(r['killed_at_done'])} of {_mb(r['total'])} "
        f"written; the reaper re-queued it, the surviving worker re-ran it; job "
        f"**{r['state']}** | re-queued {requeued} after the kill, started again at "
        f"{r['restarted_s']:.1f} s{_behind(r)}, job SUCCEEDED at **{r['succeeded_s']:.1f} s**; deliveries "
        f"of the step: {r['rerun']['deliveries']}; {_refetch(res, r)}; output sha256 vs the "
        f"undisturbed run: {_same(res, name)} |"
    )


def _behind(r: dict[str, Any]) -> str:
    between = r.get("started_between") or []
    return f" (after {', '.join(between)}, queued before it)" if between else ""


def _refetch(res: dict[str, Any], r: dict[str, Any]) -> str:
    """Bytes the re-run fetched, against the undisturbed run of the same rank."""
    base = res["undisturbed"]["ranks"].get(r["step"], {})
    rerun = r["rerun"]
    ran = r.get("rerun_node_ran") or []
    before = f" (that worker had run {', '.join(ran)} before)" if ran else ""
    return (
        f"the re-run fetched {_mb(rerun['bytes_fetched'])} from S3 and found "
        f"{_mb(rerun['bytes_cached'])} in its worker's cache{before}; the undisturbed run of "
        f"that rank fetched {_mb(base.get('bytes_fetched'))}"
    )


def report(res: dict[str, Any]) -> str:
    m, v, ck = res["machine"], res["versions"], res["checkpoint"]
    u = res["undisturbed"]
    lines = [
        "## Recovery from dead workers (measured)",
        "",
        f"Measured {res['date']} by `bench/run_recovery.py` in {res['total_s'] / 60:.1f} minutes "
        f"on **{m['cores']} shared cores** ({m['cpu']}), {m['ram_gib']:.1f} GiB RAM; celery "
        f"{v['celery']}, redis-server {v['redis']} (AOF on), moto {v['moto']}. Everything ran "
        "on this one machine: redis-server, moto's S3 server, two `porter worker` processes "
        "(concurrency 1, fresh and with empty source caches for each scenario) and the client.",
        "",
        f"Job: TP={SOURCE_TP} → TP={TP}, s3 → s3 (moto), of a torch_dist checkpoint written by "
        f"megatron-core ({ck['files']} files, {_mb(ck['bytes'])}, bf16, no optimizer state; "
        "bench/run_distributed.py's scaling shape). Kills land while a rank writes its file "
        "(its progress record between 0 and its total). The visibility timeout is Porter's "
        "default, 12 h, in every scenario. *Production* reaper settings are the defaults: "
        "heartbeat every 5 s, stale after 30 s, reaper every 10 s; *short*: 0.5 / 3 / 1 s. "
        "Times are from the kill (wall clock; the job record's timestamps).",
        "",
    ]
    if bad := _failed(u):
        return "\n".join([*lines, f"Undisturbed run: {bad}", ""])
    slow = max(r["seconds"] for r in u["ranks"].values())
    lines += [
        f"Undisturbed run: {u['job_s']:.1f} s from submit to SUCCEEDED; rank steps took up to "
        f"{slow:.1f} s (fetch, convert, upload).",
        "",
        "| scenario | what happened | numbers |",
        "|---|---|---|",
        _kill_line(res, "kill_production", "`kill -9` of a whole worker, production settings"),
        _kill_line(res, "kill_short", "`kill -9` of a whole worker, short settings"),
    ]
    lines += [_no_reaper_line(res), _pool_child_line(res), _poison_line(res), _tiny_line(res), ""]
    lines += _notes(res)
    return "\n".join(lines) + "\n"


def _no_reaper_line(res: dict[str, Any]) -> str:
    r = res["no_reaper"]
    label = "the same kill **without the reaper** (stale_after = 10⁹ s), production otherwise"
    if bad := _failed(r):
        return f"| {label} | {bad} | |"
    took = res.get("kill_production", {}).get("succeeded_s")
    ratio = f" = {r['waited_s'] / took:.1f}× the reaper's recovery time" if took else ""
    broker = r["unacked"]
    if broker:
        left = broker["restore_at"] - r["killed"] - r["waited_s"]
        where = (
            f"its message was still unacknowledged in Redis: kombu restores it only "
            f"{broker['timeout'] / 3600:.0f} h (the visibility timeout) after its delivery, "
            f"{left / 3600:.2f} h after the moment we looked"
        )
    else:
        where = "its message was not found among the unacknowledged ones"
    states = ", ".join(f"{n} {st}" for n, st in sorted(r["ranks"].items()))
    return (
        f"| {label} | job still **{r['state']}** after {r['waited_s']:.0f} s{ratio}; "
        f"{r['step']} still recorded {r['step_state']} (last heartbeat {r['heartbeat_age_s']:.0f} "
        f"s old, deliveries {r['deliveries']}); {states} | {where}. "
        f"The job was then cancelled ({'ok' if r['cancelled'] else 'cancel failed'}) |"
    )


def _pool_child_line(res: dict[str, Any]) -> str:
    r = res["pool_child"]
    label = "`kill -9` of the pool child only (the OOM killer), production settings"
    if bad := _failed(r):
        return f"| {label} | {bad} | |"
    same = r["rerun"]["node"] == r["killed_node"]
    where = "the same worker (a new pool process)" if same else "the other worker"
    return (
        f"| {label} | {r['step']} was re-delivered (`task_reject_on_worker_lost`, no reaper "
        f"involved) and re-run by {where}; job **{r['state']}** | started again "
        f"{r['restarted_s']:.1f} s after the kill{_behind(r)}, job SUCCEEDED at **{r['succeeded_s']:.1f} s**; "
        f"deliveries of the step: {r['rerun']['deliveries']}; {_refetch(res, r)}; output sha256 "
        f"vs the undisturbed run: {_same(res, 'pool_child')} |"
    )


def _poison_line(res: dict[str, Any]) -> str:
    r = res["poison"]
    label = "rank 1's pool child killed at every delivery, production settings"
    if bad := _failed(r):
        return f"| {label} | {bad} | |"
    return (
        f"| {label} | job **{r['state']}**: “{r['error']}”; manifest published: "
        f"{'yes' if r['published'] else 'no'} | {r['kills']} kills, {r['deliveries']} "
        f"deliveries (the last one refused), FAILED **{r['failed_s']:.1f} s** after the first "
        f"kill; the next job (tiny, s3 → s3) {r['next_state']} in {r['next_s']:.1f} s |"
    )


def _tiny_line(res: dict[str, Any]) -> str:
    r = res["tiny"]
    label = f"{TINY_JOBS} tiny jobs submitted at once to 2 workers (local → local, TP=2 → TP=2)"
    if bad := _failed(r):
        return f"| {label} | {bad} | |"
    return (
        f"| {label} | {r['succeeded']} of {r['jobs']} SUCCEEDED ({r['distinct']} distinct ids), "
        f"{r['manifests']} manifests naming their job | **{r['wall_s']:.1f} s** from the first "
        f"submit to the last SUCCEEDED; {r['steps']} steps, {r['deliveries']} deliveries, "
        f"{r['redelivered_steps']} steps delivered more than once |"
    )


def _notes(res: dict[str, Any]) -> list[str]:
    out = ["Reading the numbers:", ""]
    kp, ks = res.get("kill_production", {}), res.get("kill_short", {})
    if "succeeded_s" in kp and "succeeded_s" in ks:
        out.append(
            f"- With the production settings the dead worker's rank waited "
            f"{kp['restarted_s']:.0f} s before running again: up to 5 s since its last heartbeat, "
            "30 s until it counts as stale, up to 10 s for the next reaper pass (one pass per "
            "10 s cluster-wide, under a Redis lock), a 1 s ping of the dead node, and a second "
            "missed ping one pass (10 s) later before the step is taken (a worker reconnecting "
            "after a Redis restart can miss one). With the "
            f"short settings it waited {ks['restarted_s']:.1f} s. Without the reaper it would "
            "wait for the visibility timeout (12 h)."
        )
    out.append(
        "- A re-run rank fetches again what the dead worker had fetched into its own cache "
        "(gone with the machine), except what its own worker already holds: with TP=2 → TP=4, "
        "target ranks 0 and 1 read the same source bytes (and every rank the whole replicated "
        "embedding), so a worker that ran one of them has the other's bytes cached. A re-run on "
        "a fresh machine would fetch about what the undisturbed run of that rank fetched."
    )
    if res.get("pool_child", {}).get("started_between"):
        out.append(
            "- After the pool child's death the step went to the back of the queue, behind "
            "the ranks already waiting: Celery's reject-on-worker-lost requeues through kombu's "
            "`_restore_at_beginning`, an LPUSH, and workers take messages from the other end "
            "(BRPOP). In a busy cluster an OOM-killed rank waits for everything queued before "
            "it. The reaper puts the steps it recovers first in line (RPUSH, `tasks/reaper.py`)."
        )
    out += [
        "- *deliveries* is the step's own counter in the job record (one per start of the "
        "step); it counts re-deliveries whatever caused them.",
        "- One run per scenario on a shared 2-core machine: repeated runs differ by seconds.",
        "- Not measured here, tested in `tests/test_redis_restart.py` (own redis-server, AOF "
        "with `appendfsync always`, SIGTERM and start again on the same port and directory): "
        "down 1 s while a rank writes progress, the progress writes fail and are logged and "
        "the step goes on; down 6 s across the end of a rank, the job still ends. Both "
        "SUCCEEDED with the same bytes as an undisturbed run.",
    ]
    return out


def write_section(path: Path, markdown: str) -> None:
    """Replace the text between START and END in `path` (appending the section if absent,
    creating the file with a title if missing); atomic."""
    block = f"{START}\n{markdown.strip()}\n{END}"
    text = path.read_text() if path.exists() else "# Reliability\n"
    i = text.find(START)
    if i >= 0:
        j = text.find(END, i)
        if j < 0:
            raise ValueError(f"{path}: {START} without {END}; fix the file by hand")
        text = text[:i] + block + text[j + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--no-doc", action="store_true", help="print the section only")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--from-json", type=Path, help="report an earlier run's results")
    a = ap.parse_args(argv)
    res = json.loads(a.from_json.read_text()) if a.from_json else measure(a.keep)
    text = report(res)
    if not a.no_doc:
        write_section(a.doc, text)
        _say(f"wrote {a.doc}")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
