"""Benchmark: Megatron → Hugging Face layout with Porter, against the copy bound and against the
full-materialisation path, on a synthetic ≈1 GiB Llama-like bf16 checkpoint saved with training
TP=1 and, split from it, TP=2 (two rank files).

One run, in a scratch directory (deleted at the end):
  1. write the synthetic checkpoint (bench/synthetic_checkpoint.py, the TensorRT-LLM benchmark's)
     and its TP=2 variant (`write_tp_variant`: the same weights split the way Megatron's TP
     splits them), both fsynced;
  2. per round (--rounds, default 5), each as its own process, for each source in turn:
     `porter convert megatron-hf SRC OUT --workers 1 --quiet`, the copy bound
     (bench/copy_bound.py, sized by Porter's output; faster of two tries), `porter convert` with
     the default workers, `porter convert` with 300MB shards and `--workers 2`, and the
     full-materialisation baseline (bench/hf_materialise_baseline.py); for each: wall time and
     peak RssAnon summed over the process tree (sampled every 20 ms; the TensorRT-LLM
     benchmark's `measure`);
  3. measure the floor (a process that imports torch and builds `porter`'s parser: wall time,
     RssAnon) and, once per source, Porter's peak RssAnon with glibc returning freed blocks of
     1 MiB or more at once (`GLIBC_TUNABLES`), to say what the peak is made of;
  4. check every Porter output (and the TP=2 outputs against the TP=1 baseline) tensor by tensor
     (`safetensors.safe_open`, `torch.equal`);
  5. profile one `--workers 1` run per source (cProfile) to say where the time goes;
  6. write its section of docs/PERFORMANCE.md (bench/docs_section.py) and print the tables.

Reported wall time is the median over rounds (and the best), peak memory the maximum over rounds.
GB/s = output bytes (sum of the model*.safetensors files) / wall seconds, with GB = 1e9 bytes.

Usage: python bench/run_megatron_hf.py [--scratch DIR] [--rounds N] [--doc PATH] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from docs_section import replace_section
from run_megatron_trtllm import (
    GIB,
    Measured,
    _clear,
    _scratch_fs,
    _tool,
    machine,
    measure,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SOURCE_TPS = (1, 2)
SMALL_SHARDS, SMALL_SHARD_WORKERS = "300MB", 2
COPY, BASELINE = "copy bound", "full materialisation"
P1, PDEFAULT = "Porter --workers 1", "Porter, default workers"
PSHARDS = f"Porter --max-shard-size {SMALL_SHARDS} --workers {SMALL_SHARD_WORKERS}"
ROWS = (COPY, P1, PDEFAULT, PSHARDS, BASELINE)
PORTER_ARGS = {
    P1: ["--workers", "1"],
    PDEFAULT: [],
    PSHARDS: ["--max-shard-size", SMALL_SHARDS, "--workers", str(SMALL_SHARD_WORKERS)],
}
MMAP_THRESHOLD = "glibc.malloc.mmap_threshold=1048576"
# Issue 16's targets (they were 0.5x the baseline and 2x the copy bound)
BASELINE_RATIO, COPY_RATIO = 0.3, 1.5
_SUMMARY = re.compile(r"^([\d.]+) s, (\d+) worker\(s\)", re.MULTILINE)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the processes started inside (as `measure` inherits them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def largest_tensor(ckpt: dict[str, Any]) -> int:
    """Bytes of the model's largest tensor (bf16): the vocab embedding or output layer."""
    s = ckpt["shape"]
    return 2 * max(s["vocab_size"] * s["hidden_size"], 2 * s["ffn_hidden_size"] * s["hidden_size"])


def case(tp: int) -> str:
    """Name of a source: `TP=1` or `TP=2`."""
    return f"TP={tp}"


# ---------------------------------------------------------------------------------------------
# the TP=2 source


def write_tp_variant(src_root: Path, dst_root: Path, tp: int) -> list[Path]:
    """Write `src_root` (a TP=1, PP=1 legacy checkpoint) as training TP=`tp` under `dst_root`.

    Megatron's split: vocab embedding, output layer and QKV (whole query groups) by rows; proj and
    fc2 by columns; a gated fc1 gives each rank its share of the gate rows, then of the up rows;
    norms replicated. Each piece is cloned so that `torch.save` writes only its bytes.
    """
    import argparse as ap

    import torch

    it = (src_root / "latest_checkpointed_iteration.txt").read_text().strip()
    rel = Path(f"iter_{int(it):07d}")
    with torch.serialization.safe_globals([ap.Namespace]):
        ckpt = torch.load(
            src_root / rel / "mp_rank_00" / "model_optim_rng.pt",
            map_location="cpu",
            weights_only=True,
            mmap=True,
        )
    args = ap.Namespace(**vars(ckpt["args"]))
    args.tensor_model_parallel_size = tp
    rows = ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight")
    cols = ("linear_proj.weight", "linear_fc2.weight")
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for key, t in ckpt["model"].items():
        if key.endswith(rows):
            parts = t.chunk(tp, 0)
        elif key.endswith(cols):
            parts = t.chunk(tp, 1)
        elif key.endswith("linear_fc1.weight"):
            gate, up = (h.chunk(tp, 0) for h in t.chunk(2, 0))
            parts = tuple(torch.cat([g, u], 0) for g, u in zip(gate, up, strict=True))
        else:
            parts = (t,) * tp
        for r in range(tp):
            ranks[r][key] = parts[r].clone()
    paths = []
    for r, state in enumerate(ranks):
        path = dst_root / rel / f"mp_rank_{r:02d}" / "model_optim_rng.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {k: v for k, v in ckpt.items() if k != "model"}
        torch.save(payload | {"args": args, "model": state}, path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        paths.append(path)
    (dst_root / "latest_checkpointed_iteration.txt").write_text(f"{it}\n")
    return paths


# ---------------------------------------------------------------------------------------------
# comparing outputs


def weight_files(d: Path) -> list[Path]:
    """model.safetensors or model-0000i-of-0000N.safetensors of an HF output directory."""
    return sorted(d.glob("model*.safetensors"))


def output_bytes(d: Path) -> int:
    """Bytes of the weight files."""
    return sum(p.stat().st_size for p in weight_files(d))


def compare_outputs(a: Path, b: Path, a_name: str, b_name: str) -> tuple[int, list[str]]:
    """(tensors compared, differences) between two HF checkpoints' tensors, whatever their
    sharding: names, dtypes, shapes and values (`torch.equal`)."""
    import torch
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        found = {}
        for p in weight_files(d):
            with safe_open(p, "pt") as f:
                found |= dict.fromkeys(f.keys(), p)
        return found

    wa, wb = where(a), where(b)
    diffs = [f"{k} only in {a_name}" for k in sorted(wa.keys() - wb.keys())]
    diffs += [f"{k} only in {b_name}" for k in sorted(wb.keys() - wa.keys())]
    shared = sorted(wa.keys() & wb.keys())
    for k in shared:
        with safe_open(wa[k], "pt") as fa, safe_open(wb[k], "pt") as fb:
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            diffs.append(
                f"{k}: {a_name} {ta.dtype} {tuple(ta.shape)}, {b_name} {tb.dtype} {tuple(tb.shape)}"
            )
        elif not torch.equal(ta, tb):
            diffs.append(f"{k}: {int((ta != tb).sum())} of {ta.numel()} values differ")
    return len(shared), diffs


def compare_configs(porter: Path, baseline: Path) -> list[str]:
    """Shared `config.json` keys whose values differ (informational)."""
    a = json.loads((porter / "config.json").read_text())
    b = json.loads((baseline / "config.json").read_text())
    return [
        f"`{k}`: Porter {json.dumps(a[k])}, baseline {json.dumps(b[k])}"
        for k in sorted(a.keys() & b.keys())
        if a[k] != b[k]
    ]


# ---------------------------------------------------------------------------------------------
# where the time goes


def _entry(stats: pstats.Stats, func: str, file_end: str = "") -> tuple[float, float]:
    """(tottime, cumtime) summed over the profile entries of `func` in a file ending with
    `file_end` (builtins: file "~")."""
    tt = ct = 0.0
    for (file, _, name), (_, _, t, c, _) in stats.stats.items():  # type: ignore[attr-defined]
        if name == func and file.endswith(file_end):
            tt, ct = tt + t, ct + c
    return tt, ct


def _called_from(stats: pstats.Stats, func: str, caller: str, caller_file_end: str) -> float:
    """Cumulative time of `func` (a builtin) when called by `caller` in a file ending so."""
    total = 0.0
    for (_, _, name), (*_, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if name == func:
            for (file, _, cname), (_, _, _, ct) in callers.items():
                if cname == caller and file.endswith(caller_file_end):
                    total += ct
    return total


IMPORTS = "imports (torch, Porter's kinds; the CLI loads every kind)"
TOTAL = "total (under the profiler)"
CAST = "· read + cast (`write_converted`'s pieces: mapping the rank files, one TP part at a time)"
WRITE = "<method 'write' of '_io.BufferedWriter' objects>"
FINITE = "· NaN/inf check (exponent bits of each chunk written, `nonfinite_in`)"


def profile_buckets(stats: pstats.Stats) -> dict[str, float]:
    """Seconds of a profiled `porter convert megatron-hf` run, by where they go."""
    total = stats.total_tt  # type: ignore[attr-defined]
    imports = _entry(stats, "_find_and_load")[1]
    inspect = _entry(stats, "inspect_source", "megatron_hf.py")[1]
    step = _entry(stats, "convert_shard_step", "megatron_hf.py")[1]
    cast = _entry(stats, "converted", "convert.py")[1]  # write_converted's reader
    finite = _entry(stats, "nonfinite_in", "writer.py")[1]
    write = _called_from(stats, WRITE, "_emit", "writer.py")
    hashing = _entry(stats, "_emit", "writer.py")[1] - write - finite
    hashing += _entry(stats, "_hashed", "writer.py")[1]
    fsync = _called_from(stats, "<built-in method posix.fsync>", "close", "writer.py")
    tail = (
        _entry(stats, "write_config_step", "megatron_hf.py")[1]
        + _entry(stats, "publish_step", "outputs.py")[1]
    )
    return {
        IMPORTS: imports,
        "inspect + shard plan (metadata only)": inspect,
        "shard step": step,
        CAST: cast,
        FINITE: finite,
        "· `write` to the page cache": write,
        "· waiting for the sha256 thread": hashing,
        "· `fsync` of the shard": fsync,
        "· rest of the step": step - cast - finite - write - hashing - fsync,
        "config, generation config, manifest": tail,
        "rest (interpreter, argument parsing, ...)": total - imports - inspect - step - tail,
        TOTAL: total,
    }


def profile_porter(py: str, src: Path, out: Path, prof: Path) -> dict[str, float]:
    """cProfile one `porter convert megatron-hf --workers 1` run; seconds by where they go."""
    _clear(out)
    os.sync()
    time.sleep(1.0)
    cmd = [py, "-m", "cProfile", "-o", str(prof), "-m", "tasks.cli", "convert", "megatron-hf"]
    subprocess.run(
        [*cmd, str(src), str(out), "--workers", "1", "--quiet"],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    _clear(out)
    return profile_buckets(pstats.Stats(str(prof)))


# ---------------------------------------------------------------------------------------------
# the run


def run(scratch: Path, rounds: int) -> dict[str, Any]:
    """Everything but the report: returns the measurements and checks."""
    py, porter = sys.executable, _tool("porter")
    print(f"scratch: {scratch}", file=sys.stderr)
    srcs = {case(tp): scratch / f"src-tp{tp}" for tp in SOURCE_TPS}
    gen = subprocess.run(
        [py, str(BENCH / "synthetic_checkpoint.py"), str(srcs[case(1)]), "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    ckpt = json.loads(gen.stdout.strip().splitlines()[-1])
    for tp in SOURCE_TPS[1:]:
        write_tp_variant(srcs[case(1)], srcs[case(tp)], tp)
    source_files = {c: sorted(p for p in s.rglob("*.pt")) for c, s in srcs.items()}
    source_bytes = {c: sum(p.stat().st_size for p in fs) for c, fs in source_files.items()}
    plans = {
        c: subprocess.run(
            [porter, "plan", "megatron-hf", str(s)], check=True, capture_output=True, text=True
        ).stdout
        for c, s in srcs.items()
    }
    for c, plan in plans.items():
        print(f"{c}:\n{plan}", file=sys.stderr)

    samples: dict[str, dict[str, list[Measured]]] = {c: {} for c in srcs}
    out_bytes: dict[str, dict[str, int]] = {c: {} for c in srcs}
    out_files: dict[str, dict[str, int]] = {c: {} for c in srcs}
    in_process: dict[str, dict[str, list[float]]] = {c: {} for c in srcs}
    workers_used: dict[str, dict[str, int]] = {c: {} for c in srcs}
    phases: dict[str, list[dict[str, float]]] = {c: [] for c in srcs}
    keep = {
        (c, label): scratch / f"{c.replace('=', '')}-{i}"
        for c in srcs
        for i, label in enumerate(ROWS)
        if label != COPY
    }

    def record(c: str, label: str, m: Measured, out: Path | None) -> None:
        samples[c].setdefault(label, []).append(m)
        if out is not None:
            out_bytes[c][label] = output_bytes(out)
            out_files[c][label] = len(weight_files(out))
        if label in PORTER_ARGS and (found := _SUMMARY.search(m.stdout)):
            in_process[c].setdefault(label, []).append(float(found.group(1)))
            workers_used[c][label] = int(found.group(2))
        print(
            f"  {c} {label:<44} {m.wall_s:7.2f} s  peak anon {m.peak_anon / GIB:5.2f} GiB",
            file=sys.stderr,
        )

    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", file=sys.stderr)
        last_round = r == rounds - 1
        for c, src in srcs.items():
            for label, extra in PORTER_ARGS.items():
                out = keep[(c, label)]
                _clear(out)
                cmd = [porter, "convert", "megatron-hf", str(src), str(out), *extra, "--quiet"]
                record(c, label, measure(cmd), out)
                if label == P1:  # the copy bound needs the output sizes; run it next to it
                    sizes = [p.stat().st_size for p in weight_files(out)]
                    copy_out = scratch / "copy"
                    cmd = [py, str(BENCH / "copy_bound.py"), str(copy_out), "--read"]
                    cmd += [str(p) for p in source_files[c]]
                    cmd += ["--write-sizes", *map(str, sizes)]
                    tries = []  # the bound is a floor: the faster of two tries
                    for _ in range(2):
                        _clear(copy_out)
                        tries.append(measure(cmd))
                    m = min(tries, key=lambda t: t.wall_s)
                    record(c, COPY, m, None)
                    written = json.loads(m.stdout.strip().splitlines()[-1])["written_bytes"]
                    out_bytes[c][COPY] = written
                    _clear(copy_out)
                if not last_round:
                    _clear(out)
            out = keep[(c, BASELINE)]
            _clear(out)
            m = measure([py, str(BENCH / "hf_materialise_baseline.py"), str(src), str(out)])
            record(c, BASELINE, m, out)
            phases[c].append(json.loads(m.stdout.strip().splitlines()[-1])["phase_seconds"])
            if not last_round:
                _clear(out)

    # What `porter` does before converting: import torch, build the parser (every kind's module).
    imports = [
        measure([py, "-c", "import torch; from tasks.cli.main import build_parser; build_parser()"])
        for _ in range(3)
    ]
    torch_only = [measure([py, "-c", "import torch"]).wall_s for _ in range(3)]
    # Diagnosis of the memory above that floor: the same run with glibc returning every freed
    # block of 1 MiB or more to the kernel (by default it keeps blocks up to 32 MiB for reuse).
    malloc_diag = {}
    for c, src in srcs.items():
        out = scratch / "diag"
        _clear(out)
        with _env(GLIBC_TUNABLES=MMAP_THRESHOLD):
            cmd = [porter, "convert", "megatron-hf", str(src), str(out), "--workers", "1"]
            malloc_diag[c] = measure([*cmd, "--quiet"]).peak_anon
        _clear(out)
    checks: dict[str, dict[str, Any]] = {}
    ref = keep[(case(1), BASELINE)]
    for c in srcs:
        base = keep[(c, BASELINE)]
        for label in PORTER_ARGS:
            n, diffs = compare_outputs(keep[(c, label)], base, "Porter", "the baseline")
            checks[f"{c}: {label} vs the baseline"] = {"tensors": n, "diffs": diffs}
        if base != ref:
            n, diffs = compare_outputs(base, ref, c, case(1))
            checks[f"{c} baseline vs the {case(1)} baseline"] = {"tensors": n, "diffs": diffs}
    config_diffs = compare_configs(keep[(case(1), P1)], ref)
    profiles = {
        c: profile_porter(py, src, scratch / "profiled", scratch / f"{c}.prof")
        for c, src in srcs.items()
    }

    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for c in srcs:
        rows[c] = {}
        for label in ROWS:
            ms = samples[c][label]
            wall = statistics.median(m.wall_s for m in ms)
            peak = max(m.peak_anon for m in ms)
            rows[c][label] = {
                "wall_s": wall,
                "walls": [m.wall_s for m in ms],
                "gb_s": out_bytes[c][label] / wall / 1e9,
                "peak_anon": peak,
                "peak_ratio": peak / source_bytes[c],
                "output_bytes": out_bytes[c][label],
                "in_process_s": statistics.median(in_process[c][label])
                if label in in_process[c]
                else None,
                "workers": workers_used[c].get(label),
                "files": out_files[c].get(label),
            }
    return {
        "checkpoint": ckpt,
        "source_bytes": source_bytes,
        "source_files": {c: len(fs) for c, fs in source_files.items()},
        "plans": plans,
        "rows": rows,
        "checks": checks,
        "config_diffs": config_diffs,
        "baseline_phases": {
            c: {k: statistics.median(p[k] for p in ps) for k in ps[0]} for c, ps in phases.items()
        },
        "profiles": profiles,
        "rounds": rounds,
        "import_s": statistics.median(m.wall_s for m in imports),
        "import_anon": max(m.peak_anon for m in imports),
        "torch_import_s": statistics.median(torch_only),
        "malloc_diag": malloc_diag,
        "largest_tensor": largest_tensor(ckpt),
        "scratch_fs": _scratch_fs(scratch),
    }


# ---------------------------------------------------------------------------------------------
# the report


def table(res: dict[str, Any]) -> str:
    """Markdown table of the rows of every source."""
    lines = [
        "| source | | wall s (median) | wall s (min) | GB/s (median) | peak RssAnon GiB "
        "| peak RssAnon / source | wall / baseline |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c, rows in res["rows"].items():
        base = rows[BASELINE]["wall_s"]
        for label, r in rows.items():
            name = label
            if label == PDEFAULT and r["workers"] is not None:
                name += f" ({r['workers']})"
            lines.append(
                f"| {c} | {name} | {r['wall_s']:.2f} | {min(r['walls']):.2f} | {r['gb_s']:.3f} "
                f"| {r['peak_anon'] / GIB:.3f} | {r['peak_ratio']:.2f}× "
                f"| {r['wall_s'] / base:.2f} |"
            )
    return "\n".join(lines)


def targets(res: dict[str, Any]) -> list[tuple[str, str, bool, str]]:
    """(source, target, met, numbers) for each of the issue's targets, `--workers 1`."""
    out = []
    for c, rows in res["rows"].items():
        p1, base, copy = rows[P1], rows[BASELINE], rows[COPY]
        mine = {k: v for k, v in res["checks"].items() if k.startswith(f"{c}: ")}
        ndiff = sum(len(v["diffs"]) for v in mine.values())
        out.append(
            (
                c,
                "identical tensors to the baseline's",
                ndiff == 0,
                f"{len(mine)} Porter outputs × {next(iter(mine.values()))['tensors']} tensors, "
                + ("all equal" if ndiff == 0 else f"{ndiff} difference(s), listed below"),
            )
        )
        out.append(
            (
                c,
                "peak anonymous memory < 0.3× the source",
                p1["peak_ratio"] < 0.3,
                f"{p1['peak_anon'] / GIB:.3f} GiB = {p1['peak_ratio']:.2f}× "
                f"(baseline: {base['peak_anon'] / GIB:.3f} GiB = {base['peak_ratio']:.2f}×)",
            )
        )
        out.append(
            (
                c,
                f"wall time ≤ {BASELINE_RATIO}× the baseline's",
                p1["wall_s"] <= BASELINE_RATIO * base["wall_s"],
                f"median {p1['wall_s']:.2f} s vs {base['wall_s']:.2f} s "
                f"(ratio {p1['wall_s'] / base['wall_s']:.2f}); best {min(p1['walls']):.2f} s vs "
                f"{min(base['walls']):.2f} s (ratio {min(p1['walls']) / min(base['walls']):.2f})",
            )
        )
        out.append(
            (
                c,
                f"within {COPY_RATIO}× of the copy bound (median and best)",
                p1["wall_s"] <= COPY_RATIO * copy["wall_s"]
                and min(p1["walls"]) <= COPY_RATIO * min(copy["walls"]),
                f"median {p1['wall_s']:.2f} s vs {copy['wall_s']:.2f} s "
                f"(ratio {p1['wall_s'] / copy['wall_s']:.2f}); best {min(p1['walls']):.2f} s vs "
                f"{min(copy['walls']):.2f} s (ratio {min(p1['walls']) / min(copy['walls']):.2f})",
            )
        )
    return out


def report(res: dict[str, Any], mach: dict[str, Any], command: str, seconds: float) -> str:
    """The megatron-hf section of docs/PERFORMANCE.md."""
    s = res["checkpoint"]["shape"]
    rows = res["rows"]
    t1 = rows[case(1)]
    walls = "; ".join(
        f"{c} {label}: " + ", ".join(f"{w:.2f}" for w in r["walls"])
        for c, rs in rows.items()
        for label, r in rs.items()
    )
    startup = "; ".join(
        f"{c}: {r[P1]['wall_s'] - r[P1]['in_process_s']:.2f} s of {r[P1]['wall_s']:.2f} s"
        for c, r in rows.items()
        if r[P1]["in_process_s"] is not None
    )
    phases = "; ".join(
        f"{c}: `torch.load` {p['load']:.2f}, merge + split {p['convert']:.2f}, "
        f"`save_file` {p['save']:.2f}"
        for c, p in res["baseline_phases"].items()
    )
    prof_labels = list(next(iter(res["profiles"].values())))
    prof_lines = [
        "| | " + " | ".join(res["profiles"]) + " |",
        "|---|" + "---:|" * len(res["profiles"]),
        *(
            f"| {k} | " + " | ".join(f"{p[k]:.2f}" for p in res["profiles"].values()) + " |"
            for k in prof_labels
        ),
    ]
    tg = targets(res)
    lines = [
        "## Megatron → Hugging Face layout, ≈1 GiB bf16 Llama-like checkpoint (training TP=1 and TP=2)",
        "",
        f"Measured {dt.date.today().isoformat()} by `bench/run_megatron_hf.py` (median and best "
        f"wall time of {res['rounds']} rounds, maximum peak memory over the rounds; all rows of "
        f"both sources interleaved in one run of {seconds / 60:.1f} minutes). **Machine: this "
        f"sandbox, {mach['cores']} cores**; other work (test suites, builds of other sessions) may "
        "have been running on it at the same time, so treat single numbers as noisy "
        "(load average 1/5/15 min: "
        + " at the start, ".join("/".join(f"{x:.1f}" for x in la) for la in res["load"])
        + " at the end; the benchmark's own processes account for 1–2 of it).",
        "",
        table(res),
        "",
        "- **wall s**: from starting the process to its exit (interpreter start and imports "
        "included). **wall / baseline**: median wall over the full-materialisation row's.",
        "- **GB/s**: output bytes (the `model*.safetensors` files, "
        f"{t1[P1]['output_bytes'] / 1e9:.3f} GB) / wall s; GB = 10⁹ bytes.",
        "- **peak RssAnon**: anonymous resident memory (`RssAnon` in `/proc/PID/status`), summed "
        "over the process and all its descendants, sampled every 20 ms (the TensorRT-LLM "
        "benchmark's sampler); page-cache and memory-mapped file pages are not in it.",
        "- **source**: "
        + "; ".join(
            f"{c}: {res['source_files'][c]} rank file(s), {b:,} bytes ({b / GIB:.3f} GiB)"
            for c, b in res["source_bytes"].items()
        )
        + ".",
        f"- Wall times of each round (s): {walls}.",
        "- Like the TensorRT-LLM benchmark's copy bound, each round runs it twice and keeps the "
        "faster try (it is a floor; writes here are noisy).",
        f"- Baseline by phase (median s): {phases}.",
        "",
        "### Rows",
        "",
        "- **copy bound** (`bench/copy_bound.py`): read every source byte with `readinto` into "
        "one reusable 16 MiB buffer, then write as many bytes as Porter's weight files, `fsync`ed. "
        "No conversion can move fewer bytes.",
        "- **Porter** (`porter convert megatron-hf SRC OUT [--workers N] [--max-shard-size S] "
        "--quiet`): tensors streamed one at a time into the shard file, which is `fsync`ed; "
        "`config.json`, `generation_config.json` and `manifest.json` (sha256 of every file) "
        "written after. The default `--max-shard-size 5GB` gives one `model.safetensors`, so "
        "the default worker count is one process here (it is at most one per shard, and one per "
        "2 GiB of output, `PORTER_BYTES_PER_WORKER`); the "
        f"`{SMALL_SHARDS}` row splits the output into {t1[PSHARDS]['files']} "
        f"shard files to run {SMALL_SHARD_WORKERS} worker processes.",
        "- **full materialisation** (`bench/hf_materialise_baseline.py`): what Megatron-LM's and "
        "Megatron-Bridge's checkpoint tools do in one process: `torch.load` every rank file "
        "(`weights_only=True`, no mmap), merge the TP shards with `torch.cat`, split QKV "
        "into q/k/v_proj (`.contiguous()`) and fc1 into gate/up_proj, then "
        "`safetensors.torch.save_file` into one `model.safetensors` (no `fsync`) and a "
        "`config.json`.",
        "",
        "### Targets (`Porter --workers 1`)",
        "",
        "| source | target | met | numbers |",
        "|---|---|---|---|",
        *(f"| {c} | {t} | {'yes' if ok else '**no**'} | {n} |" for c, t, ok, n in tg),
        "",
        *verdict(res),
        "",
        "### Output check",
        "",
        "Tensor by tensor (`safetensors.safe_open` on every weight file, matched by name across "
        "shard files; names, dtypes, shapes, `torch.equal` on the values):",
        "",
    ]
    for name, chk in res["checks"].items():
        outcome = "all equal" if not chk["diffs"] else f"**{len(chk['diffs'])} difference(s)**"
        lines.append(f"- {name}: {chk['tensors']} tensors, {outcome}")
        lines += [f"  - {d}" for d in chk["diffs"][:20]]
    split_check = [v for k, v in res["checks"].items() if "baseline vs the" in k]
    if split_check and not any(v["diffs"] for v in split_check):
        lines += [
            "",
            "The TP=2 outputs also equal the TP=1 baseline's tensors: the TP=2 source holds the "
            "same model (the split in `write_tp_variant` is the one Porter and the baseline undo).",
        ]
    if res["config_diffs"]:
        lines += [
            "",
            "`config.json`, shared keys with other values (informational: the baseline's is a "
            "hand-written LlamaConfig subset):",
            "",
            *(f"- {d}" for d in res["config_diffs"]),
        ]
    lines += [
        "",
        "### Where the time goes",
        "",
        "cProfile of one `porter convert megatron-hf SRC OUT --workers 1 --quiet` per source "
        "(seconds, under the profiler's overhead). Buckets from the profile: cumulative time of "
        "the import machinery (`_find_and_load`), `inspect_source`, `convert_shard_step`, "
        "the pieces `write_converted` reads and casts, `nonfinite_in`, `write_config_step` + `publish_step`; `write` and `fsync` "
        "as called by the shard writer; the sha256 wait is the writer's `_emit` less its `write`:",
        "",
        *prof_lines,
        "",
        f"- Starting Python, importing torch and building `porter`'s parser (which imports "
        f"every job kind's module) takes {res['import_s']:.2f} s (median of 3), against "
        f"{res['torch_import_s']:.2f} s for `python -c 'import torch'`; the whole start-up "
        f"(and exit) outside `run_conversion` is {startup} (medians).",
        *reading(res),
        "",
        "### Memory",
        "",
        *memory_reading(res),
        "",
        "### Setup",
        "",
        f"- Machine: {mach['cores']} cores ({mach['cpu']}), {mach['ram_gib']:.1f} GiB RAM, "
        f"Linux {mach['kernel']}; Python {mach['python']}, torch {mach['torch']}, "
        f"safetensors {mach.get('safetensors', '?')}.",
        f"- Disk: scratch directory on {res['scratch_fs']}. Page cache **warm**: the sources are "
        "written and fsynced just before the runs and fit in RAM many times over, so reads come "
        "from memory; writes go to the page cache (Porter and the copy bound also wait for "
        "`fsync`, the baseline does not).",
        f"- Model: {s['num_layers']} layers, hidden {s['hidden_size']}, "
        f"{s['num_attention_heads']} heads, {s['num_query_groups']} query groups (GQA), head size "
        f"{s['kv_channels']}, FFN {s['ffn_hidden_size']} (SwiGLU), vocab {s['vocab_size']}, "
        "RMSNorm, RoPE, untied embeddings, no biases, bf16; legacy format, PP=1, random weights "
        "(`bench/synthetic_checkpoint.py`, as the TensorRT-LLM benchmark); the TP=2 source is "
        "the same weights split by `write_tp_variant`.",
        "- Output: `LlamaForCausalLM`, bf16 (the checkpoint's dtype), Megatron's vocab rows.",
        "",
        f"Reproduce (about {seconds / 60:.0f} minutes here):",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


def reading(res: dict[str, Any]) -> list[str]:
    """A short reading of the numbers, generated from them (no claim the numbers do not make)."""
    out = []
    for c, rows in res["rows"].items():
        p1, base, copy = rows[P1], rows[BASELINE], rows[COPY]
        prof = res["profiles"][c]
        io = sum(
            prof[k]
            for k in (
                "· `write` to the page cache",
                "· waiting for the sha256 thread",
                "· `fsync` of the shard",
            )
        )
        ins = p1["in_process_s"] or 0.0
        out.append(
            f"- {c}: Porter takes {p1['wall_s']:.2f} s (median), the copy bound "
            f"{copy['wall_s']:.2f} s, the baseline {base['wall_s']:.2f} s. "
            f"{p1['wall_s'] - ins:.2f} s of Porter's is spent outside `run_conversion` (start-up, "
            f"exit) and {ins:.2f} s in it. Under the profiler, imports take "
            f"{prof[IMPORTS]:.2f} s of {prof[TOTAL]:.2f} s, the shard step "
            f"{prof['shard step']:.2f} s, of which `write`, hashing waits and `fsync` "
            f"{io:.2f} s, reading + casting + merging "
            f"{prof[CAST]:.2f} s and the "
            f"NaN/inf check {prof[FINITE]:.2f} s. The baseline's "
            f"`save_file` ({res['baseline_phases'][c]['save']:.2f} s) does not `fsync`; it holds "
            f"{base['peak_ratio']:.2f}× the source in anonymous memory against Porter's "
            f"{p1['peak_ratio']:.2f}×."
        )
    return out


def verdict(res: dict[str, Any]) -> list[str]:
    """One line per missed target: the numbers and what the profile says costs the time."""
    lines = []
    for c, rows in res["rows"].items():
        p1, base, copy = rows[P1], rows[BASELINE], rows[COPY]
        startup = p1["wall_s"] - (p1["in_process_s"] or 0.0)
        conversion = p1["in_process_s"] or 0.0
        fsync = res["profiles"][c]["· `fsync` of the shard"]
        ph = res["baseline_phases"][c]
        if p1["wall_s"] > BASELINE_RATIO * base["wall_s"]:
            lines.append(
                f"- {c}, wall time vs the baseline: **missed** ({p1['wall_s']:.2f} s vs "
                f"{base['wall_s']:.2f} s, ratio {p1['wall_s'] / base['wall_s']:.2f}; {BASELINE_RATIO}× "
                f"would be {BASELINE_RATIO * base['wall_s']:.2f} s). Porter spends {startup:.2f} s outside "
                f"`run_conversion` (start-up, exit) and {conversion:.2f} s in it; both tools write the same "
                f"{p1['output_bytes'] / 1e9:.2f} GB through the page cache, Porter also "
                f"`fsync`s it ({fsync:.2f} s in the profile) and the baseline does not. The "
                f"baseline spends {ph['load']:.2f} s in `torch.load`, {ph['convert']:.2f} s "
                f"merging and splitting and {ph['save']:.2f} s in `save_file` (medians): "
                "what streaming can save is the load and the in-memory copies, not the writing. "
                f"Start-up aside on both sides, Porter's {conversion:.2f} s compares with the "
                f"baseline's {sum(ph.values()):.2f} s (ratio {conversion / sum(ph.values()):.2f})."
            )
        if p1["wall_s"] > COPY_RATIO * copy["wall_s"]:
            lines.append(
                f"- {c}, copy bound: **missed** ({p1['wall_s']:.2f} s vs {copy['wall_s']:.2f} s, "
                f"ratio {p1['wall_s'] / copy['wall_s']:.2f}). Porter's time outside "
                f"`run_conversion` alone ({startup:.2f} s) is {startup / copy['wall_s']:.1f}× the "
                f"copy bound; the time in it {conversion / copy['wall_s']:.1f}×."
            )
        if p1["peak_ratio"] >= 0.3:
            lines.append(
                f"- {c}, memory: **missed** ({p1['peak_anon'] / GIB:.3f} GiB = "
                f"{p1['peak_ratio']:.2f}×): see *Memory* below for what the peak is made of."
            )
    return lines or ["All targets met."]


def memory_reading(res: dict[str, Any]) -> list[str]:
    """Where Porter's peak anonymous memory goes (from the floor and the glibc diagnosis)."""
    floor, big = res["import_anon"], res["largest_tensor"]
    lines = [
        f"- Floor: a process that has imported torch and built `porter`'s parser holds "
        f"{floor / GIB:.3f} GiB of anonymous memory before reading any tensor. The largest "
        f"tensor (vocab embedding / output layer) is {big / GIB:.3f} GiB in bf16; a TP-sharded "
        "source's is written one TP part after another (`SafetensorsWriter.write_rows`), never "
        "joined in memory; a TP=1 source writes it straight from the memory-mapped file.",
    ]
    for c, rows in res["rows"].items():
        p1, src = rows[P1], res["source_bytes"][c]
        diag = res["malloc_diag"][c]
        lines.append(
            f"- {c}: peak {p1['peak_anon'] / GIB:.3f} GiB = {p1['peak_ratio']:.2f}× the source "
            f"(0.3× = {0.3 * src / GIB:.3f} GiB); {(p1['peak_anon'] - floor) / GIB:.3f} GiB above "
            f"the floor. One run with `GLIBC_TUNABLES={MMAP_THRESHOLD}` (glibc gives freed "
            f"blocks of ≥ 1 MiB back at once instead of keeping up to 32 MiB ones for reuse): "
            f"{diag / GIB:.3f} GiB = {diag / src:.2f}×."
        )
        if p1["peak_ratio"] >= 0.3:
            held = p1["peak_anon"] - floor - big
            lines.append(
                f"  - So the {c} peak is the floor ({floor / GIB:.3f} GiB) + the merged "
                f"embedding or output layer ({big / GIB:.3f} GiB) + {held / GIB:.3f} GiB of "
                f"other memory, {max(0, p1['peak_anon'] - diag) / GIB:.3f} GiB of which glibc "
                "gives back in the diagnosis run (freed merge buffers of earlier tensors, kept for "
                f"reuse). Floor + the largest merged tensor is already {(floor + big) / src:.2f}× "
                "the source. Below 0.3× with margin would take both: freeing those blocks, and "
                "writing a tensor whose TP shards are concatenated by rows (vocab embedding, "
                "output layer) shard by shard instead of through a `torch.cat` copy: in the "
                "safetensors layout its bytes are the shards' bytes in order."
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", type=Path, help="scratch parent directory (default: /tmp)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "PERFORMANCE.md")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--results", type=Path, help="also write the measurements here (JSON)")
    ap.add_argument(
        "--from-results", type=Path, help="measure nothing: report a --results file again"
    )
    a = ap.parse_args(argv)
    if a.from_results:
        res = json.loads(a.from_results.read_text())
        seconds = res["seconds"]
    else:
        parent = a.scratch or Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="porter-bench-hf-", dir=parent))
        started = time.perf_counter()
        load_before = os.getloadavg()
        try:
            res = run(scratch, a.rounds)
        finally:
            if not a.keep:
                _clear(scratch)
        seconds = time.perf_counter() - started
        res |= {"seconds": seconds, "load": [load_before, os.getloadavg()]}
        if a.results:
            a.results.write_text(json.dumps(res, indent=1))
    mach = machine()
    try:
        from importlib.metadata import version

        mach["safetensors"] = version("safetensors")
    except Exception:
        pass
    command = ".venv/bin/python bench/run_megatron_hf.py" + (
        f" --rounds {res['rounds']}" if res["rounds"] != 5 else ""
    )
    replace_section(a.doc, "megatron-hf", report(res, mach, command, seconds))
    print(table(res))
    print()
    for c, t, ok, n in targets(res):
        print(f"[{'met' if ok else 'NOT met'}] {c} {t}: {n}")
    for name, chk in res["checks"].items():
        print(f"check {name}: {chk['tensors']} tensors, {len(chk['diffs'])} difference(s)")
        for d in chk["diffs"]:
            print(f"  DIFF {d}")
    print()
    for c, prof in res["profiles"].items():
        print(f"profile {c}: " + ", ".join(f"{k} {v:.2f}" for k, v in prof.items()))
    print(f"\nwrote {a.doc} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
