"""Start-up of the light `porter` commands: `porter --help`, `porter status JOB`, `porter jobs`
(wall time from process start to exit, median and best of --runs), against a redis-server this
script starts on a free loopback port; with --before DIR, the same commands run from another
checkout (e.g. a `git worktree` of an earlier commit) alternate with this one's. The row
`python -c pass` (the interpreter alone, with this virtualenv's site) is the floor, and
`python -c "import redis"` what `status` and `jobs` cannot avoid (the client they talk through).

Bytecode: an installed Porter runs from the .pyc files pip wrote, and a working tree caches them in
`__pycache__`; but with PYTHONDONTWRITEBYTECODE=1 (set in some sandboxes and CI images) an
editable install compiles every Porter module in every run (≈40 ms on an idle machine). By
default the commands run with bytecode cached (in a temporary PYTHONPYCACHEPREFIX, filled by one
untimed warm-up round, so no tree is written to); `--no-bytecode-cache` measures the other case.

Usage: python bench/run_cli_startup.py [--runs 10] [--before DIR] [--no-bytecode-cache]
Prints a markdown table, and a JSON summary as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--before", type=Path, help="another checkout to compare with")
    ap.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="compile Porter's sources in every run (PYTHONDONTWRITEBYTECODE=1)",
    )
    a = ap.parse_args(argv)
    server = shutil.which("redis-server")
    if not server:
        raise SystemExit("redis-server not found")
    port = _free_port()
    data = Path(tempfile.mkdtemp(prefix="porter-cli-bench-"))
    bytecode = {"PYTHONDONTWRITEBYTECODE": "1"}
    if not a.no_bytecode_cache:
        bytecode = {"PYTHONPYCACHEPREFIX": str(data / "pycache")}
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(data)],
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.5)
        from tasks.jobs.records import JobRecords

        records = JobRecords(url, ttl=600)
        job = f"megatron-trtllm-{uuid.uuid4().hex[:16]}"
        records.create(job, "megatron-trtllm", {"source": "/c", "output": "/o", "tp": 2, "pp": 1})
        records.finish(job, "SUCCEEDED")
        floors = {
            "python -c pass": ["-c", "pass"],
            'python -c "import redis"': ["-c", "import redis"],
        }
        commands = floors | {
            "porter --help": ["-m", "tasks.cli", "--help"],
            "porter status JOB": ["-m", "tasks.cli", "status", job],
            "porter jobs": ["-m", "tasks.cli", "jobs"],
        }
        trees = {"now": REPO} | ({"before": a.before.resolve()} if a.before else {})
        times: dict[tuple[str, str], list[float]] = {}
        base = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        for run in range(a.runs + 1):  # round 0: the untimed warm-up
            for label, args in commands.items():
                for tree, path in trees.items():
                    env = base | bytecode | {"PORTER_REDIS_URL": url, "PYTHONPATH": str(path)}
                    if label in floors and tree != "now":
                        continue
                    seconds = _timed([sys.executable, *args], path, env)
                    if run:
                        times.setdefault((label, tree), []).append(seconds)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(data, ignore_errors=True)
    print("| command | " + " | ".join(f"{t} median s | {t} best s" for t in trees) + " |")
    print("|---|" + "---:|---:|" * len(trees))
    for label in commands:
        cells = []
        for tree in trees:
            t = times.get((label, tree))
            cells += [f"{statistics.median(t):.3f}", f"{min(t):.3f}"] if t else ["", ""]
        print(f"| `{label}` | " + " | ".join(cells) + " |")
    summary = {
        f"{label} [{tree}]": {"median_s": statistics.median(t), "best_s": min(t), "runs": t}
        for (label, tree), t in times.items()
    }
    summary["bytecode_cached"] = not a.no_bytecode_cache
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
