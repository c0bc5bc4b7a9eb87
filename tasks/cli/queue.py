"""`porter submit|status|jobs|cancel|retry|worker`: the queued-jobs half of the command line.

Contract other tools rely on: `porter submit` prints the job id alone on the first line of stdout;
`--wait` exits 0 only if the job succeeded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

from converters.errors import ConversionError
from tasks.kinds import all_kinds, kind_named
from tasks.kinds.base import JobKind


def add_commands(commands: Any, kinds: Iterable[JobKind]) -> None:
    """Register the queue commands on the `porter` sub-command parser."""
    submit = commands.add_parser("submit", help="queue a conversion for the workers (Redis)")
    submit.add_argument(
        "--batch",
        dest="batch_file",
        metavar="FILE",
        help="queue every job spec of a YAML/JSON file (a list, or {jobs: [...]}); all are "
        "checked before any is queued; prints one id per line",
    )
    submit_kinds = submit.add_subparsers(dest="kind")
    for kind in kinds:
        sub = submit_kinds.add_parser(kind.name, help=kind.cli.help)
        kind.cli.add_arguments(sub, "submit")
        sub.add_argument("--wait", action="store_true", help="block until the job ends")

    status = commands.add_parser("status", help="state and per-step progress of a job")
    status.add_argument("job")
    status.add_argument("--json", action="store_true", help="the whole record as JSON")

    jobs = commands.add_parser("jobs", help="recent jobs")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--state", help="only jobs in this state (e.g. FAILED)")
    jobs.add_argument("--model", help="only jobs of this model (profile exports)")
    jobs.add_argument("--watch", action="store_true", help="a live table, until Ctrl-C")
    jobs.add_argument("--interval", type=float, default=2.0, help="--watch refresh (seconds)")

    cancel = commands.add_parser("cancel", help="stop a job; nothing of it is published")
    cancel.add_argument("job")

    retry = commands.add_parser("retry", help="re-run the failed steps of a job")
    retry.add_argument("job")
    retry.add_argument("--wait", action="store_true", help="block until the job ends")

    serve = commands.add_parser("serve", help="serve the HTTP API: jobs, hooks, metrics")
    serve.add_argument("--host", default="127.0.0.1", help="address (default loopback only)")
    serve.add_argument("--port", type=int, default=8080)

    worker = commands.add_parser("worker", help="run a Celery worker with Porter's settings")
    worker.add_argument("--queues", default="cpu", help="comma-separated: cpu, gpu (default cpu)")
    worker.add_argument(
        "--concurrency",
        type=int,
        help="task processes (default: cores); size by RAM ÷ `porter plan`'s per-rank peak",
    )
    worker.add_argument("--loglevel", default="INFO")


def _time(ts: Any) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(float(ts), datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _wait(job: str) -> int:
    """Follow `job` until it ends (through a Redis restart: a patient connection)."""
    from tqdm import tqdm

    from tasks.jobs import service

    records = service.connect()
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=job, file=sys.stderr)

    def update(record: dict[str, Any]) -> None:
        if kind_named(record["kind"]).progress_unit != "bytes":  # a count of steps
            bar.unit, bar.unit_scale = "step", False
        done, total = service.progress(record)
        bar.total = total
        bar.set_postfix_str(record["state"], refresh=False)
        bar.update(done - bar.n)

    try:
        record = service.wait(records, job, update)
    finally:
        bar.close()
    if record["state"] == "SUCCEEDED":
        print(f"{job}: SUCCEEDED, manifest {record.get('manifest_uri')}", file=sys.stderr)
        return 0
    print(f"porter: error: job {job} {record['state']}: {record['error']}", file=sys.stderr)
    return 1


def submit(args: argparse.Namespace) -> int:
    """`porter submit KIND ...` (one job) or `porter submit --batch FILE`."""
    from tasks.jobs import service

    if args.batch_file:
        if args.kind:
            raise ConversionError("give either --batch FILE or one job, not both")
        return submit_batch(args)
    if args.kind is None:
        raise ConversionError("porter submit: give a job kind (megatron-trtllm, ...) or --batch")
    spec = kind_named(args.kind).cli.spec_from_args(args)
    records = service.connect(interactive=True)
    job, created = service.submit(spec, records)
    print(job, flush=True)
    if not created:
        state = records.state(job)
        print(f"{job}: already submitted ({state}); nothing new queued", file=sys.stderr)
    return _wait(job) if args.wait else 0


def status(args: argparse.Namespace) -> int:
    from tasks.jobs import service

    record = service.get(service.connect(interactive=True), args.job)
    if args.json:
        print(json.dumps(record, indent=2, sort_keys=True, default=str))
        return 0
    done, total = service.progress(record)
    kind = kind_named(record["kind"])
    print(f"job {args.job}: {record['state']} (attempt {record.get('attempt', 0)})")
    try:
        described = kind.cli.describe(record["spec"])
    except (KeyError, TypeError, ValueError):  # a record not written by Porter's submit
        described = "(a spec its kind cannot read)"
    print(f"  {described}")
    print(f"  created {_time(record.get('created'))}, finished {_time(record.get('finished'))}")
    if total:
        print(f"  done {done}/{total} {kind.progress_unit} ({done / total:.0%})")
    if record.get("error"):
        print(f"  error: {record['error']}")
    if record.get("manifest_uri"):
        print(f"  manifest: {record['manifest_uri']}")
    print(f"  {'step':<12} {'state':<10} {'progress':>9} {'seconds':>8} {'deliv':>5}  detail")
    for name, step in record["steps"].items():
        shown = ""
        if step.get("total"):
            shown = f"{int(step.get('done', 0)) / int(step['total']):.0%}"
        if step.get("state") == "SUCCEEDED":
            shown = "100%"
        seconds = f"{float(step['seconds']):.2f}" if step.get("seconds") else ""
        detail = step.get("error") or step.get("refused") or (str(step.get("sha256", ""))[:16])
        print(
            f"  {name:<12} {step.get('state', ''):<10} {shown:>9} {seconds:>8} "
            f"{step.get('deliveries', 0):>5}  {detail}"
        )
    return 0


def submit_batch(args: argparse.Namespace) -> int:
    """`porter submit --batch FILE`: check every entry, then queue them all."""
    from tasks.jobs import service
    from tasks.jobs.batch import read_batch

    entries = read_batch(args.batch_file)
    records = service.connect(interactive=True)
    labelled = [(spec, {"trigger": "batch", **labels}) for spec, labels in entries]
    for job, created in service.submit_many(labelled, records):
        print(job, flush=True)
        if not created:
            print(f"{job}: already submitted; nothing new queued", file=sys.stderr)
    return 0


def _progress_cell(record: dict[str, Any]) -> str:
    """A job's progress for the table: the share done once it is planned, "-" before, "?" for a
    record its kind cannot read (one odd record must not take the whole table down)."""
    from tasks.jobs import service

    if record["state"] == "SUCCEEDED":
        return "100%"
    try:
        done, total = service.progress(record)
    except (ConversionError, KeyError, TypeError, ValueError):
        return "?"
    return f"{done / total:.0%}" if total else "-"


def _jobs_table(records: Any, args: argparse.Namespace) -> list[str]:
    """`porter jobs`: one row per recent job, columns as wide as their longest cell (job ids
    grow with the kind's name)."""
    header = ("job", "state", "progress", "created (UTC)", "output")
    rows = []
    for job in records.job_ids(args.limit):
        record = records.get(job)
        if record is None or (args.state and record["state"] != args.state):
            continue
        if args.model and record.get("model") != args.model:
            continue
        output = str(record["spec"].get("output", ""))
        created = _time(record.get("created"))
        rows.append((job, record["state"], _progress_cell(record), created, output))
    width = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
    return [
        f"{job:<{width[0]}}  {state:<{width[1]}}  {shown:>{width[2]}}  {created:<{width[3]}}  {out}"
        for job, state, shown, created, out in (header, *rows)
    ]


def jobs(args: argparse.Namespace) -> int:
    import time

    from tasks.jobs import service

    records = service.connect(interactive=True)
    if not args.watch:
        print("\n".join(_jobs_table(records, args)))
        return 0
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            stamp = _time(time.time())
            print(f"{clear}porter jobs --watch  {stamp} UTC  (Ctrl-C to stop)", flush=False)
            print("\n".join(_jobs_table(records, args)), flush=True)
            time.sleep(max(0.2, args.interval))
    except KeyboardInterrupt:
        return 0


def cancel(args: argparse.Namespace) -> int:
    from tasks.jobs import service

    result = service.cancel(service.connect(interactive=True), args.job)
    print(f"{args.job}: CANCELLED; removed {result['removed_files']} uncommitted file(s)")
    return 0


def retry(args: argparse.Namespace) -> int:
    from tasks.jobs import service

    records = service.connect(interactive=True)
    attempt = service.retry(records, args.job)
    print(f"{args.job}: queued again (attempt {attempt})", file=sys.stderr)
    return _wait(args.job) if args.wait else 0


def worker(args: argparse.Namespace) -> int:
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = sorted(set(queues) - {"cpu", "gpu"})
    if unknown or not queues:
        raise ConversionError(f"--queues takes cpu and/or gpu, got {args.queues!r}")
    argv = ["worker", f"--queues={','.join(queues)}", f"--loglevel={args.loglevel}"]
    argv.append(f"--hostname=porter-{'-'.join(queues)}-{os.getpid()}@%h")
    if args.concurrency is not None:
        argv.append(f"--concurrency={args.concurrency}")
    for kind in all_kinds().values():
        for phase in kind.phases:
            problem = phase.queue in queues and phase.requires and phase.requires()
            if problem:
                raise ConversionError(f"this machine {problem}")
    if "gpu" in queues:
        argv.append("--max-tasks-per-child=1")  # never reuse a process that initialised CUDA
    _warn_if_unrestricted()
    from config.celery_app import app

    app.worker_main(argv)
    return 0


def _warn_if_unrestricted() -> None:
    """One WARNING line at a worker's start when an allow-list is not set (nothing is silently
    open); logged before Celery sets up its logging, so with a handler of its own."""
    import logging

    from config.settings import Settings
    from tasks.jobs.locations import unrestricted

    problem = unrestricted(Settings.from_env())
    if problem:
        log = logging.getLogger("porter.worker")
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("[%(asctime)s: %(levelname)s] %(name)s: %(message)s")
        )
        log.addHandler(handler)
        log.propagate = False
        log.warning("%s", problem)
        log.removeHandler(handler)
        log.propagate = True


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tasks.triggers.api import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")
    return 0
