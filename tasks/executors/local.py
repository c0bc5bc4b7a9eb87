"""The embedded executor: runs a job of any registered kind on this machine, with no servers.

inspect → each phase: its fan-out steps (in parallel processes where the kind gives their cost,
else one after another in this process), then its `then` step → publish: the same step functions
the Celery tasks run. Fan-out processes report progress through a queue; the caller gets one
(done, total) stream, in the kind's unit. Nothing is published unless every step succeeded; on
failure the job's files are removed from OUTPUT.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue as queue_module
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from config.settings import Settings
from converters.errors import ConversionError
from tasks.jobs.outputs import prepare_output, publish_step, remove_outputs
from tasks.kinds import KIND_MODULES, kind_named, kind_of
from tasks.kinds.base import JobKind, Phase, StepContext

log = logging.getLogger(__name__)
_progress_queue: Any = None
OnProgress = Callable[[int, int], None]


def _init_worker(progress_queue: Any, threads: int) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    torch = sys.modules.get("torch")  # conversions compute without torch; a step that loads it
    if torch is not None:  # (porter verify) shares the cores as the pool does
        torch.set_num_threads(threads)


def _run_in_worker(
    kind_name: str, spec_dict: dict, record: dict, phase_index: int, index: int
) -> dict[str, Any]:
    """One fan-out step in a pool process (arguments are plain JSON-like values)."""
    kind = kind_named(kind_name)
    phase = kind.phases[phase_index]
    step = f"{phase.step}:{index}"

    def report(done: int, total: int) -> None:
        _progress_queue.put((step, done, total))

    ctx = StepContext(record["job"], kind.parse(spec_dict), record, lambda: {}, progress=report)
    return phase.run(ctx, index)


@dataclass
class Summary:
    """What a finished job did: for the closing summary and the API."""

    job_id: str
    output: str
    workers: int
    seconds: float
    bytes_read: int
    bytes_written: int
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # by step name
    already_done: bool = False

    def fanned(self, step: str) -> list[dict[str, Any]]:
        """The results of the fan-out steps `{step}:i`, in order of i."""
        found = [(name, r) for name, r in self.results.items() if name.startswith(f"{step}:")]
        return [r for _, r in sorted(found, key=lambda item: int(item[0].split(":")[1]))]


def choose_workers(costs: list[tuple[int, int]], requested: int | None, settings: Settings) -> int:
    """`requested`, or as many processes as the cores and the available RAM allow for steps of
    these (peak bytes, bytes written), and no more than the output size justifies (small jobs
    run in this process)."""
    if requested is not None:
        if requested < 1:
            raise ConversionError(f"--workers must be at least 1 (got {requested})")
        return max(1, min(requested, len(costs)))
    if not costs:
        return 1
    per_step = max(peak for peak, _ in costs) + settings.process_overhead_bytes
    by_memory = int(psutil.virtual_memory().available * settings.memory_fraction) // per_step
    by_size = sum(written for _, written in costs) // settings.bytes_per_worker
    return max(1, min(len(costs), os.cpu_count() or 1, by_memory, by_size))


class _Run:
    """One job's local run: its record (plan, remembered fields, step states) and progress."""

    def __init__(self, kind: JobKind, spec: Any, inspected: dict, on_progress: OnProgress | None):
        self.kind, self.spec = kind, spec
        self.record: dict[str, Any] = {"job": inspected["job_id"], "inspected": inspected}
        self.steps: dict[str, dict[str, Any]] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.on_progress = on_progress
        self.lock = threading.Lock()

    def context(self, progress: Callable[[int, int], None] | None = None) -> StepContext:
        job = self.record["job"]
        return StepContext(job, self.spec, self.record, lambda: self.results, progress=progress)

    def report(self, step: str, done: int | None = None, result: dict | None = None) -> None:
        with self.lock:
            entry = self.steps.setdefault(step, {})
            if done is not None:
                entry["done"] = done
            if result is not None:
                entry["state"] = "SUCCEEDED"
                self.results[step] = result
            if self.on_progress:
                record = {**self.record, "steps": self.steps}
                self.on_progress(*self.kind.progress(record))

    def run_step(self, step: str, work: Callable[[StepContext], dict[str, Any]]) -> None:
        ctx = self.context(lambda done, _total: self.report(step, done))
        self.report(step, result=work(ctx))


def run_conversion(
    spec: Any,
    workers: int | None = None,
    on_progress: OnProgress | None = None,
    settings: Settings | None = None,
) -> Summary:
    """Run the job `spec` on this machine; returns the summary or raises, leaving nothing
    published."""
    settings = settings or Settings.from_env()
    started = time.perf_counter()
    kind = kind_of(spec)
    inspected = kind.inspect(spec)
    job, tag = inspected["job_id"], inspected["tag"]
    output = Path(spec.output)
    local_output = not spec.output.startswith("s3://")
    if local_output and output.exists() and not output.is_dir():
        raise ConversionError("OUTPUT exists and is not a directory", output)
    created_output = local_output and not output.exists()
    # A killed run of this very job left its finished steps in OUTPUT: they are reused.
    manifest = prepare_output(spec, job)
    if manifest is not None:
        written = sum(f["bytes"] for f in manifest["files"])
        return Summary(job, spec.output, 0, 0.0, 0, written, already_done=True)
    run = _Run(kind, spec, inspected, on_progress)
    used = 1
    try:
        for phase in kind.active_phases(spec):
            used = max(used, _run_phase(run, phase, workers, settings))
            if phase.then is not None:
                run.run_step(phase.then.name, phase.then.run)
        ctx = run.context()
        summary = kind.source_summary(inspected)
        publish_step(spec, job, tag, summary, kind.published(ctx))
        if kind.after_publish:
            kind.after_publish(ctx)
    except BaseException as failure:
        try:
            remove_outputs(spec, job)
        except Exception as cleanup:  # e.g. the same S3 outage: the first error is the one to see
            log.warning("could not remove the job's files from %s: %s", spec.output, cleanup)
            failure.add_note(f"its files in {spec.output} could not be removed: {cleanup}")
        if created_output:
            _remove_if_only_porter_files(output)
        raise
    results = run.results.values()
    return Summary(
        job_id=job,
        output=spec.output,
        workers=used,
        seconds=time.perf_counter() - started,
        bytes_read=sum(int(r.get("bytes_read", 0)) for r in results),
        bytes_written=sum(int(r.get("bytes_written", 0)) for r in results),
        results=run.results,
    )


def _remove_if_only_porter_files(output: Path) -> None:
    """Remove an OUTPUT directory this run created once nothing but Porter's own files remain."""
    if output.is_dir() and all(p.name.startswith(".porter-") for p in output.iterdir()):
        shutil.rmtree(output, ignore_errors=True)


def _run_phase(run: _Run, phase: Phase, workers: int | None, settings: Settings) -> int:
    """Run `phase`'s fan-out steps; returns the number of worker processes used (1: this one)."""
    inspected = run.record["inspected"]
    count = phase.size(inspected)
    if phase.cost is None:
        costs, requested = [], 1
    else:
        costs, requested = [phase.cost(inspected, i) for i in range(count)], workers
    used = choose_workers(costs, requested, settings) if count else 1
    if used == 1:
        for index in range(count):
            run.run_step(f"{phase.step}:{index}", lambda ctx, i=index: phase.run(ctx, i))
        return 1
    _run_phase_in_pool(run, phase, count, used)
    return used


def _run_phase_in_pool(run: _Run, phase: Phase, count: int, workers: int) -> None:
    """Several workers: one spawned process per worker, each taking steps from the pool."""
    # A fork server that has imported Porter once: each worker then starts in milliseconds instead
    # of re-importing it, and without forking this process's threads (the progress drain).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tasks.executors.local", *KIND_MODULES])
    progress_queue = context.Queue()
    stopping = threading.Event()

    def drain() -> None:
        while not (stopping.is_set() and progress_queue.empty()):
            try:
                step, done, _ = progress_queue.get(timeout=0.1)
            except queue_module.Empty:
                continue
            run.report(step, done)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(progress_queue, threads)
    )
    phase_index = run.kind.phases.index(phase)
    spec_dict = run.spec.to_dict()
    try:
        futures = {
            pool.submit(
                _run_in_worker, run.kind.name, spec_dict, run.record, phase_index, i
            ): f"{phase.step}:{i}"
            for i in range(count)
        }
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in finished if f.exception() is not None]
        if failed:
            for future in futures:
                future.cancel()
            raise failed[0].exception()
        stopping.set()
        drainer.join()
        for future, step in futures.items():
            run.report(step, result=future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        stopping.set()
        drainer.join()
