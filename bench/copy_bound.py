"""Copy bound: read every source byte, then write (and fsync) as many bytes as a conversion writes.

No conversion can do less I/O than this, so its wall time is the floor for the benchmark.
Reads go through one reusable buffer (`readinto`), so the process holds only that buffer.

Usage: python bench/copy_bound.py OUTPUT_DIR --read FILE [FILE ...] --write-sizes N [N ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

BUFFER_BYTES = 16 << 20


def copy_bound(sources: list[Path], out_dir: Path, sizes: list[int]) -> dict[str, float]:
    """Read `sources` fully, write len(sizes) files of the given sizes into `out_dir`, fsync."""
    buf = bytearray(BUFFER_BYTES)
    view = memoryview(buf)
    t0 = time.perf_counter()
    read = 0
    for src in sources:
        with open(src, "rb", buffering=0) as f:
            while n := f.readinto(view):
                read += n
    t_read = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, size in enumerate(sizes):
        with open(out_dir / f"rank{i}.bin", "wb", buffering=0) as f:
            left = size
            while left:
                n = f.write(view[: min(left, BUFFER_BYTES)])
                left -= n
            os.fsync(f.fileno())
        written += size
    return {
        "read_bytes": read,
        "written_bytes": written,
        "read_s": t_read,
        "write_s": time.perf_counter() - t0 - t_read,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line; prints a JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("--read", type=Path, nargs="+", required=True)
    ap.add_argument("--write-sizes", type=int, nargs="+", required=True)
    a = ap.parse_args(argv)
    print(json.dumps(copy_bound(a.read, a.output, a.write_sizes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
