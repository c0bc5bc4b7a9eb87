"""The embedded executor: runs a conversion's steps on this machine, ranks in parallel processes (or in this
process, one after another, with a single worker).

No servers: inspect → convert ranks (process pool, one rank per task) → config → publish, the same
steps the Celery tasks run. Rank processes report progress through a queue; the parent draws one
progress bar over bytes written. Nothing is published unless every rank succeeded; on failure the
job's files are removed from OUTPUT.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue as queue_module
import shutil
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
from tasks import steps
from tasks.jobs import ConvertSpec

log = logging.getLogger(__name__)
_progress_queue: Any = None


def _init_worker(progress_queue: Any, threads: int) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    import torch

    torch.set_num_threads(threads)


def _run_rank(spec_dict: dict, tag: str, rank: int) -> dict[str, Any]:
    def report(done: int, total: int) -> None:
        _progress_queue.put((rank, done, total))

    return steps.convert_rank_step(ConvertSpec.from_dict(spec_dict), tag, rank, report)


@dataclass
class Summary:
    """What a finished conversion did: for the closing summary and the API."""

    job_id: str
    output: str
    workers: int
    seconds: float
    bytes_read: int
    bytes_written: int
    ranks: list[dict[str, Any]] = field(default_factory=list)
    already_done: bool = False


def choose_workers(inspected: dict, requested: int | None, settings: Settings) -> int:
    """`requested`, or as many rank processes as the cores and the available RAM allow, and no more
    than the output size justifies (small conversions run in this process)."""
    ranks = len(inspected["ranks"])
    if requested is not None:
        if requested < 1:
            raise ConversionError(f"--workers must be at least 1 (got {requested})")
        return min(requested, ranks)
    per_rank = max(r["peak_bytes"] for r in inspected["ranks"]) + settings.process_overhead_bytes
    by_memory = int(psutil.virtual_memory().available * settings.memory_fraction) // per_rank
    by_size = sum(r["bytes_written"] for r in inspected["ranks"]) // settings.bytes_per_worker
    return max(1, min(ranks, os.cpu_count() or 1, by_memory, by_size))


class _ProgressDrain(threading.Thread):
    """Moves per-rank progress from the queue to a callback (bytes written, total bytes)."""

    def __init__(
        self, progress_queue: Any, total: int, on_progress: Callable[[int, int], None]
    ) -> None:
        super().__init__(daemon=True)
        self.queue, self.total, self.on_progress = progress_queue, total, on_progress
        self.done_by_rank: dict[int, int] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not (self.stopping.is_set() and self.queue.empty()):
            try:
                rank, done, _ = self.queue.get(timeout=0.1)
            except queue_module.Empty:
                continue
            self.done_by_rank[rank] = done
            self.on_progress(sum(self.done_by_rank.values()), self.total)


def run_conversion(
    spec: ConvertSpec,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    settings: Settings | None = None,
) -> Summary:
    """Convert `spec` on this machine; returns the summary or raises, leaving nothing published."""
    settings = settings or Settings.from_env()
    started = time.perf_counter()
    inspected = steps.inspect_source(spec)
    job, tag = inspected["job_id"], inspected["tag"]
    output = Path(spec.output)
    local_output = not spec.output.startswith("s3://")
    if local_output and output.exists() and not output.is_dir():
        raise ConversionError("OUTPUT exists and is not a directory", output)
    created_output = local_output and not output.exists()
    # A killed run of this very job left its finished ranks in OUTPUT: they are reused.
    manifest = steps.prepare_output(spec, job)
    if manifest is not None:
        written = sum(f["bytes"] for f in manifest["files"])
        return Summary(job, spec.output, 0, 0.0, 0, written, already_done=True)
    count = choose_workers(inspected, workers, settings)
    try:
        results = _convert_ranks(spec, tag, inspected, count, on_progress)
        config = steps.write_config_step(spec, tag, inspected)
        steps.publish_step(spec, job, tag, steps.source_summary(inspected), [*results, config])
    except BaseException as failure:
        try:
            steps.remove_outputs(spec, job)
        except Exception as cleanup:  # e.g. the same S3 outage: the first error is the one to see
            log.warning("could not remove the job's files from %s: %s", spec.output, cleanup)
            failure.add_note(f"its files in {spec.output} could not be removed: {cleanup}")
        if created_output:
            _remove_if_only_porter_files(output)
        raise
    return Summary(
        job_id=job,
        output=spec.output,
        workers=count,
        seconds=time.perf_counter() - started,
        bytes_read=sum(r["bytes_read"] for r in results),
        bytes_written=sum(r["bytes_written"] for r in results) + config["bytes_written"],
        ranks=results,
    )


def _remove_if_only_porter_files(output: Path) -> None:
    """Remove an OUTPUT directory this run created once nothing but Porter's own files remain."""
    if output.is_dir() and all(p.name.startswith(".porter-") for p in output.iterdir()):
        shutil.rmtree(output, ignore_errors=True)


def _convert_ranks(
    spec: ConvertSpec,
    tag: str,
    inspected: dict,
    workers: int,
    on_progress: Callable[[int, int], None] | None,
) -> list[dict[str, Any]]:
    if workers == 1:
        return _convert_ranks_here(spec, tag, inspected, on_progress)
    return _convert_ranks_in_pool(spec, tag, inspected, workers, on_progress)


def _convert_ranks_here(
    spec: ConvertSpec, tag: str, inspected: dict, on_progress: Callable[[int, int], None] | None
) -> list[dict[str, Any]]:
    """One worker: run the ranks one after another in this process (no start-up cost)."""
    total = sum(r["bytes_written"] for r in inspected["ranks"])
    results: list[dict[str, Any]] = []
    for rank in range(len(inspected["ranks"])):
        finished = sum(r["bytes_written"] for r in inspected["ranks"][:rank])

        def report(done: int, _: int, finished: int = finished) -> None:
            if on_progress:
                on_progress(finished + done, total)

        results.append(steps.convert_rank_step(spec, tag, rank, report))
    return results


def _convert_ranks_in_pool(
    spec: ConvertSpec,
    tag: str,
    inspected: dict,
    workers: int,
    on_progress: Callable[[int, int], None] | None,
) -> list[dict[str, Any]]:
    """Several workers: one spawned process per worker, each taking ranks from the pool."""
    # A fork server that has imported torch and Porter once: each worker then starts in milliseconds
    # instead of re-importing torch (about a second of CPU each), and without forking this process's
    # threads (the progress drain).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tasks.executors.local"])
    progress_queue = context.Queue()
    total = sum(r["bytes_written"] for r in inspected["ranks"])
    drain = _ProgressDrain(progress_queue, total, on_progress or (lambda done, total: None))
    drain.start()
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(progress_queue, threads)
    )
    try:
        futures = [
            pool.submit(_run_rank, spec.to_dict(), tag, r) for r in range(len(inspected["ranks"]))
        ]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in finished if f.exception() is not None]
        if failed:
            for future in futures:
                future.cancel()
            raise failed[0].exception()
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        drain.stopping.set()
        drain.join()
