"""Baseline: the full-materialisation path from a Megatron checkpoint to the Hugging Face layout.

What Megatron-LM's and Megatron-Bridge's checkpoint tools do in one process, without their
model-building machinery around it:

1. `torch.load` every rank file of a legacy checkpoint fully into memory (`weights_only=True`,
   `argparse.Namespace` allowed, no mmap);
2. merge the TP shards of every tensor in memory (`torch.cat`: vocab and QKV/fc1 rows, proj/fc2
   columns; a gated fc1 concatenates the ranks' gate halves, then their up halves; norms from
   rank 0);
3. make the HF tensors: QKV de-interleaved per query group into q/k/v_proj (`.contiguous()`),
   fc1 split into gate_proj / up_proj, renames;
4. `safetensors.torch.save_file(tensors, OUT/model.safetensors, metadata={"format": "pt"})`
   (no `fsync`), plus a `config.json` with LlamaConfig's fields.

Supports the Llama-style models of the benchmark (RMSNorm, SwiGLU, GQA, no biases, untied
embeddings, PP=1); anything else is refused. Prints a JSON summary with seconds per phase.

Usage: python bench/hf_materialise_baseline.py SOURCE_ROOT OUTPUT
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
ROWS = (
    "embedding.word_embeddings.weight",
    "output_layer.weight",
    "self_attention.linear_qkv.weight",
)
COLS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
GATED = "mlp.linear_fc1.weight"


def rank_files(root: Path) -> list[Path]:
    """The `model_optim_rng.pt` of every TP rank of a PP=1 legacy checkpoint, by rank."""
    it = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    it_dir = root / ("release" if it == "release" else f"iter_{int(it):07d}")
    dirs = sorted((int(m.group(1)), d) for d in it_dir.iterdir() if (m := _RANK_DIR.match(d.name)))
    if not dirs or [tp for tp, _ in dirs] != list(range(len(dirs))):
        raise SystemExit(f"{it_dir}: expected mp_rank_00 .. mp_rank_NN (PP=1)")
    return [d / "model_optim_rng.pt" for _, d in dirs]


def check_supported(args: argparse.Namespace) -> None:
    """Refuse what this baseline does not convert (it is a benchmark, not a converter)."""
    problems = []
    if args.normalization != "RMSNorm":
        problems.append(args.normalization)
    if not args.swiglu:
        problems.append("non-gated MLP")
    if args.add_bias_linear or args.add_qkv_bias:
        problems.append("biases")
    if not args.untie_embeddings_and_output_weights:
        problems.append("tied embeddings")
    if getattr(args, "pipeline_model_parallel_size", 1) != 1:
        problems.append("PP > 1")
    if problems:
        raise SystemExit(f"unsupported by this baseline: {', '.join(problems)}")


def merge(states: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The TP=1 state dict from the ranks' state dicts (a copy only where there are shards)."""
    tp = len(states)
    merged: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if not isinstance(first, torch.Tensor) or "_extra_state" in key:
            continue
        parts = [s[key] for s in states]
        suffix = m.group(2) if (m := _LAYER.match(key)) else key
        if tp == 1:
            merged[key] = first
        elif suffix in ROWS:
            merged[key] = torch.cat(parts, 0)
        elif suffix in COLS:
            merged[key] = torch.cat(parts, 1)
        elif suffix == GATED:
            halves = [p.chunk(2, 0) for p in parts]
            merged[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
        else:  # norms: replicated
            merged[key] = first
    return merged


def hf_tensors(sd: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM tensors (contiguous, as `save_file` requires) from the merged dict."""
    nh, ng = args.num_attention_heads, args.num_query_groups
    d, h = args.kv_channels, args.hidden_size
    per_group = nh // ng
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"]}
    for i in range(args.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = sd[src + "self_attention.linear_qkv.weight"].view(ng, per_group + 2, d, h)
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(nh * d, h).contiguous()
        out[dst + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(ng * d, h).contiguous()
        out[dst + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(ng * d, h).contiguous()
        out[dst + "self_attn.o_proj.weight"] = sd[src + "self_attention.linear_proj.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "pre_mlp_layernorm.weight"]
        gate, up = sd[src + "mlp.linear_fc1.weight"].chunk(2, 0)
        out[dst + "mlp.gate_proj.weight"] = gate
        out[dst + "mlp.up_proj.weight"] = up
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.linear_fc2.weight"]
    out["model.norm.weight"] = sd["decoder.final_layernorm.weight"]
    out["lm_head.weight"] = sd["output_layer.weight"]
    return out


def hf_config(args: argparse.Namespace) -> dict[str, Any]:
    """LlamaConfig's fields for the model (for reference; the benchmark compares tensors)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.padded_vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.ffn_hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_query_groups,
        "head_dim": args.kv_channels,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_epsilon,
        "max_position_embeddings": args.max_position_embeddings,
        "rope_theta": args.rotary_base,
        "tie_word_embeddings": False,
        "torch_dtype": str(args.params_dtype).removeprefix("torch."),
    }


def convert(source: Path, output: Path) -> dict[str, float]:
    """Run the baseline; returns seconds per phase."""
    from safetensors.torch import save_file

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    payloads = []
    with torch.serialization.safe_globals([argparse.Namespace]):
        for path in rank_files(source):
            payloads.append(torch.load(path, map_location="cpu", weights_only=True))
    args = payloads[0]["args"]
    states = [p.pop("model") for p in payloads]
    del payloads
    times["load"] = time.perf_counter() - t0
    check_supported(args)

    t0 = time.perf_counter()
    merged = merge(states)
    del states
    tensors = hf_tensors(merged, args)
    del merged
    times["convert"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
    (output / "config.json").write_text(json.dumps(hf_config(args), indent=2) + "\n")
    times["save"] = time.perf_counter() - t0
    return times


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="legacy checkpoint root (any TP, PP=1)")
    ap.add_argument("output", type=Path)
    a = ap.parse_args(argv)
    times = convert(a.source, a.output)
    print(json.dumps({"phase_seconds": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
