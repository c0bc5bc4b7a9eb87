"""Side by side: one `porter convert` command from this checkout and from an earlier one (a
`git worktree` of an earlier commit), interleaved round by round, each a fresh process: wall time
(start to exit), peak RssAnon of the process tree, and whether both wrote the same files (the
sha256 of every file their manifests list, `manifest.json` itself aside).

With --copy-bound, each round also runs bench/copy_bound.py (read every source `.pt` file, write
as many bytes as this checkout's weight files; the faster of two tries), row "copy bound".

Usage: python bench/ab_convert.py SRC --before DIR [--rounds 5] [--copy-bound] [--json PATH]
       -- KIND [ARGS...]
  e.g. ... -- megatron-hf --workers 1     or     ... -- megatron-trtllm --tp 4 --workers 1
Prints a markdown table, and a JSON summary as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from run_megatron_trtllm import BENCH, GIB, REPO, measure


def _hashes(out: Path) -> dict[str, str]:
    """{file: sha256} from a converted directory's manifest.json."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {f["path"]: f["sha256"] for f in manifest["files"]}


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--copy-bound", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        ap.error("give the conversion after --: -- KIND [ARGS...]")
    split = argv.index("--")
    a = ap.parse_args(argv[:split])
    command = argv[split + 1 :]
    trees = {"before": a.before.resolve(), "now": REPO}
    sources = sorted(str(p) for p in a.source.rglob("*.pt"))
    scratch = Path(tempfile.mkdtemp(prefix="porter-ab-"))
    rows = [*trees, *(["copy bound"] if a.copy_bound else [])]
    walls: dict[str, list[float]] = {t: [] for t in rows}
    peaks: dict[str, list[int]] = {t: [] for t in rows}
    hashes: dict[str, dict[str, str]] = {}
    try:
        for r in range(a.rounds):
            for tree, path in trees.items():
                out = scratch / tree
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, "-m", "tasks.cli", "convert", command[0], str(a.source)]
                cmd += [str(out), *command[1:], "--quiet"]
                m = measure(cmd, path, dict(os.environ, PYTHONPATH=str(path)))
                walls[tree].append(m.wall_s)
                peaks[tree].append(m.peak_anon)
                hashes[tree] = _hashes(out)
                print(f"round {r + 1} {tree:<6} {m.wall_s:6.2f} s", file=sys.stderr, flush=True)
            if a.copy_bound:
                weights = sorted((scratch / "now").glob("*.safetensors"))
                copy = [sys.executable, str(BENCH / "copy_bound.py"), str(scratch / "copy")]
                copy += ["--read", *sources, "--write-sizes"]
                copy += [str(p.stat().st_size) for p in weights]
                tries = []
                for _ in range(2):
                    shutil.rmtree(scratch / "copy", ignore_errors=True)
                    tries.append(measure(copy))
                best = min(tries, key=lambda t: t.wall_s)
                walls["copy bound"].append(best.wall_s)
                peaks["copy bound"].append(best.peak_anon)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    same = hashes["before"] == hashes["now"]
    print(f"`porter convert {' '.join(command)}` ({a.rounds} rounds; same files: {same})\n")
    print("| | wall s (median) | wall s (best) | peak RssAnon GiB |")
    print("|---|---:|---:|---:|")
    for tree in rows:
        w = walls[tree]
        print(
            f"| {tree} | {statistics.median(w):.2f} | {min(w):.2f} | {max(peaks[tree]) / GIB:.3f} |"
        )
    summary = {
        "command": command,
        "same_files": same,
        "files": hashes["now"],
        **{t: {"walls": walls[t], "peak_anon": max(peaks[t])} for t in rows},
    }
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
