"""Benchmark: a mixture-of-experts Megatron checkpoint to TensorRT-LLM with expert parallelism.

A synthetic Mixtral-like legacy checkpoint (≈ 1 GiB of bf16 weights, 8 experts per layer, saved at
training TP=2 as `mp_rank_00/01`) is converted to TP=4 with `--moe-ep 2` (moe_tp 2: each rank holds
4 experts, each split in two) by `porter convert` in a fresh process. Measured per round: wall time
and the process tree's peak anonymous memory (RssAnon, sampled every 20 ms), against the copy
bound (read every source byte, write and fsync the output's bytes: `bench/copy_bound.py`).
Targets (issue 13): peak memory < 0.6x the source, wall time within 2x the copy bound.

Usage: .venv/bin/python bench/run_megatron_trtllm_moe.py [--rounds 3] [--doc docs/PERFORMANCE.md]
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

import torch
from docs_section import replace_section
from run_megatron_trtllm import REPO, machine, measure

SECTION = "megatron-trtllm-moe"
GIB = 1 << 30
SHAPE = {
    "num_layers": 5,
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "num_query_groups": 4,
    "ffn_hidden_size": 5632,
    "num_experts": 8,
    "moe_ffn_hidden_size": 1536,
    "vocab_size": 32000,
}
SOURCE_TP, TARGET_TP, MOE_EP = 2, 4, 2


def _args() -> argparse.Namespace:
    s = SHAPE
    return argparse.Namespace(
        num_layers=s["num_layers"],
        hidden_size=s["hidden_size"],
        ffn_hidden_size=s["ffn_hidden_size"],
        num_attention_heads=s["num_attention_heads"],
        group_query_attention=True,
        num_query_groups=s["num_query_groups"],
        kv_channels=s["hidden_size"] // s["num_attention_heads"],
        swiglu=True,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        position_embedding_type="rope",
        rotary_base=10000,
        rotary_percent=1.0,
        max_position_embeddings=4096,
        padded_vocab_size=s["vocab_size"],
        untie_embeddings_and_output_weights=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        tensor_model_parallel_size=SOURCE_TP,
        pipeline_model_parallel_size=1,
        params_dtype=torch.bfloat16,
        bf16=True,
        num_experts=s["num_experts"],
        moe_router_topk=2,
        moe_ffn_hidden_size=s["moe_ffn_hidden_size"],
        moe_grouped_gemm=False,
        expert_model_parallel_size=1,
    )


def _rank_state(tp_rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One training-TP rank's shard of every tensor (random bf16 values)."""
    s, tp = SHAPE, SOURCE_TP
    h, nh, ng = s["hidden_size"], s["num_attention_heads"], s["num_query_groups"]
    d, fe = h // nh, s["moe_ffn_hidden_size"]

    def rand(*shape: int, norm: bool = False) -> torch.Tensor:
        t = torch.randn(shape, generator=gen)
        return (1.0 + 0.1 * t if norm else 0.02 * t).to(torch.bfloat16)

    state = {"embedding.word_embeddings.weight": rand(s["vocab_size"] // tp, h)}
    for i in range(s["num_layers"]):
        p = f"decoder.layers.{i}."
        state[p + "input_layernorm.weight"] = rand(h, norm=True)
        state[p + "self_attention.linear_qkv.weight"] = rand((nh + 2 * ng) * d // tp, h)
        state[p + "self_attention.linear_proj.weight"] = rand(h, nh * d // tp)
        state[p + "pre_mlp_layernorm.weight"] = rand(h, norm=True)
        state[p + "mlp.router.weight"] = rand(s["num_experts"], h)
        for e in range(s["num_experts"]):
            q = f"{p}mlp.experts.local_experts.{e}."
            state[q + "linear_fc1.weight"] = rand(2 * fe // tp, h)
            state[q + "linear_fc2.weight"] = rand(h, fe // tp)
    state["decoder.final_layernorm.weight"] = rand(h, norm=True)
    state["output_layer.weight"] = rand(s["vocab_size"] // tp, h)
    return state


def write_source(root: Path) -> list[Path]:
    """The TP=2 legacy checkpoint under `root`; returns its rank files."""
    gen = torch.Generator().manual_seed(13)
    files = []
    for tp_rank in range(SOURCE_TP):
        rank_dir = root / "iter_0000001" / f"mp_rank_{tp_rank:02d}"
        rank_dir.mkdir(parents=True)
        payload = {"args": _args(), "checkpoint_version": 3.0, "iteration": 1}
        payload["model"] = _rank_state(tp_rank, gen)
        torch.save(payload, rank_dir / "model_optim_rng.pt")
        files.append(rank_dir / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("1\n")
    return files


def run(scratch: Path, rounds: int) -> dict:
    load = [os.getloadavg()[0]]
    source = scratch / "source"
    files = write_source(source)
    source_bytes = sum(f.stat().st_size for f in files)
    porter = [str(REPO / ".venv/bin/porter"), "convert", "megatron-trtllm", str(source)]
    options = ["--tp", str(TARGET_TP), "--moe-ep", str(MOE_EP), "--quiet"]
    results: dict[str, list] = {"porter --workers 1": [], "porter --workers 2": [], "copy": []}
    out_sizes: list[int] = []
    for _ in range(rounds):
        for workers in (1, 2):
            out = scratch / "out"
            shutil.rmtree(out, ignore_errors=True)
            m = measure([*porter, str(out), *options, "--workers", str(workers)])
            results[f"porter --workers {workers}"].append((m.wall_s, m.peak_anon))
            out_sizes = [p.stat().st_size for p in sorted(out.glob("rank*.safetensors"))]
        copy_out = scratch / "copy"
        shutil.rmtree(copy_out, ignore_errors=True)
        copy_out.mkdir()
        cmd = [sys.executable, str(REPO / "bench/copy_bound.py"), str(copy_out), "--read"]
        m = measure([*cmd, *map(str, files), "--write-sizes", *map(str, out_sizes)])
        results["copy"].append((m.wall_s, m.peak_anon))
    config = json.loads((scratch / "out" / "config.json").read_text())
    return {
        "source_bytes": source_bytes,
        "output_bytes": sum(out_sizes),
        "mapping": config["mapping"],
        "moe": config["moe"],
        "runs": {k: [list(r) for r in v] for k, v in results.items()},
        "load": [*load, os.getloadavg()[0]],
    }


def report(res: dict, mach: dict) -> str:
    source = res["source_bytes"]
    copy = statistics.median(w for w, _ in res["runs"]["copy"])
    lines = [
        "## MoE: Megatron TP=2 → TensorRT-LLM TP=4, `--moe-ep 2`",
        "",
        f"Synthetic Mixtral-like legacy checkpoint, bf16, {source / GIB:.2f} GiB in 2 rank files: "
        f"{SHAPE['num_layers']} layers, hidden {SHAPE['hidden_size']}, {SHAPE['num_experts']} "
        f"experts of FFN {SHAPE['moe_ffn_hidden_size']} (top-2), vocab {SHAPE['vocab_size']}. "
        f"Output {res['output_bytes'] / GIB:.2f} GiB, mapping {res['mapping']}. Each target rank "
        "holds 4 experts, each the half of its source shard pair; the router is written fp32. "
        f"Machine: {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores; medians of "
        f"{len(res['runs']['copy'])} rounds, page cache warm (`bench/run_megatron_trtllm_moe.py`).",
        "",
        "| run | wall (s) | × copy bound | peak RssAnon | × source |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, runs in res["runs"].items():
        wall = statistics.median(w for w, _ in runs)
        peak = max(p for _, p in runs)
        label = "copy bound" if name == "copy" else name
        lines.append(
            f"| {label} | {wall:.2f} | {wall / copy:.2f} | {peak / 2**20:.0f} MiB | "
            f"{peak / source:.2f} |"
        )
    one = res["runs"]["porter --workers 1"]
    wall, peak = statistics.median(w for w, _ in one), max(p for _, p in one)
    load = ", ".join(f"{v:.1f}" for v in res.get("load", []))
    lines += [
        "",
        "| target (issue 13) | met | measured (--workers 1) |",
        "|---|---|---|",
        f"| peak memory < 0.6× the source | {'yes' if peak < 0.6 * source else '**no**'} | "
        f"{peak / source:.2f}× |",
        f"| within 2× of the copy bound | {'yes' if wall <= 2 * copy else '**no**'} | "
        f"{wall:.2f} s vs {copy:.2f} s ({wall / copy:.2f}×) |",
        "",
        f"- Load average (1 min) sampled during the runs: {load or '?'} on "
        f"{mach.get('cores', '?')} cores.",
        "- Wall times of each round (s): "
        + "; ".join(
            f"{'copy bound' if k == 'copy' else k}: {', '.join(f'{w:.2f}' for w, _ in v)}"
            for k, v in res["runs"].items()
        )
        + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scratch", type=Path, default=None)
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "PERFORMANCE.md")
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    ap.add_argument("--from-json", type=Path, help="re-render a --json file without running")
    a = ap.parse_args(argv)
    if a.from_json:
        res = json.loads(a.from_json.read_text())
        mach = res.pop("machine")
    else:
        scratch = Path(tempfile.mkdtemp(prefix="porter-moe-bench-", dir=a.scratch))
        try:
            res = run(scratch, a.rounds)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        mach = machine()
    if a.json:
        a.json.write_text(json.dumps({"machine": mach, **res}, indent=2))
    text = report(res, mach)
    print(text)
    replace_section(a.doc, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
