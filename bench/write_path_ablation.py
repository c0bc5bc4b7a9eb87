"""Which write-path change moves the conversion time: `convert_rank` of every TP rank of a
checkpoint, in one process (start-up excluded), with one change of `converters/trtllm` undone at a
time, variants interleaved round by round.

Variants:
  now          the write path as it is
  sum-check    NaN/Inf check by a float sum of each converted tensor (the earlier check), not
               the exponent bits of each chunk written
  one-chunk    a tensor is written, hashed and checked as one piece (CHUNK_BYTES = 1 TiB)
  no-writeback no early writeback (sync_file_range): all dirty pages wait for the closing fsync

Two changes measured this way were taken out again, their numbers not supporting them (see
docs/PERFORMANCE.md): letting the hashing thread fall up to 8 chunks behind the writer, and
`posix_fadvise(WILLNEED)` of the next tensor's source ranges (read-ahead).

Usage: python bench/write_path_ablation.py SRC OUT_DIR [--tp 4] [--rounds 5] [--cold]
  --cold: before each variant, drop the source file's pages from the page cache
  (posix_fadvise DONTNEED on the source files only), so reads come from the disk.
Prints a JSON summary (median and best seconds per variant) as its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from converters.dtypes import DType
from converters.megatron.layout import open_checkpoint
from converters.torch_arrays import torch_dtype
from converters.trtllm import convert, writer
from converters.trtllm.plan import Target


def _sum_check(data: memoryview, dtype: DType) -> int:
    """The earlier check: a float sum of the values, counted only when not finite."""
    if not dtype.is_floating_point or not len(data):
        return 0
    tensor = torch.frombuffer(data, dtype=torch_dtype(dtype))
    return 0 if bool(torch.isfinite(tensor.sum())) else int((~torch.isfinite(tensor)).sum())


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Undo one change of the write path while inside."""
    saved = (writer.CHUNK_BYTES, writer.WRITEBACK_BYTES, writer.nonfinite_in)
    try:
        if name == "sum-check":
            writer.CHUNK_BYTES = 1 << 40  # the sum ran over whole tensors
            writer.nonfinite_in = _sum_check
        elif name == "one-chunk":
            writer.CHUNK_BYTES = 1 << 40
        elif name == "no-writeback":
            writer.WRITEBACK_BYTES = 1 << 60
        elif name != "now":
            raise SystemExit(f"unknown variant {name}")
        yield
    finally:
        writer.CHUNK_BYTES, writer.WRITEBACK_BYTES, writer.nonfinite_in = saved


def _drop_cache(files: list[Path]) -> None:
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


VARIANTS = ("now", "sum-check", "one-chunk", "no-writeback")


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    a = ap.parse_args(argv)
    target = Target(tp=a.tp)
    files = open_checkpoint(a.source).files()
    times: dict[str, list[float]] = {v: [] for v in a.variants}
    digests: dict[str, list[str]] = {}
    for r in range(a.rounds):
        for name in a.variants:
            shutil.rmtree(a.out, ignore_errors=True)
            a.out.mkdir(parents=True)
            if a.cold:
                _drop_cache(files)
            os.sync()
            time.sleep(0.5)
            source = open_checkpoint(a.source)  # fresh mappings: no pages touched yet
            with variant(name):
                t0 = time.perf_counter()
                results = [
                    convert.convert_rank(source, target, rank, a.out / f"rank{rank}.safetensors")
                    for rank in range(a.tp)
                ]
                seconds = time.perf_counter() - t0
            del source
            times[name].append(seconds)
            digests.setdefault(name, [x.sha256 for x in results])
            assert digests[name] == [x.sha256 for x in results]
            print(f"round {r + 1} {name:<14} {seconds:6.2f} s", file=sys.stderr, flush=True)
    shutil.rmtree(a.out, ignore_errors=True)
    same = len({tuple(d) for d in digests.values()}) == 1
    summary = {
        name: {"median_s": statistics.median(t), "best_s": min(t), "runs": t}
        for name, t in times.items()
    }
    print(json.dumps({"cold": a.cold, "tp": a.tp, "same_bytes": same, "variants": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
