"""Write a synthetic Llama-like legacy Megatron-LM checkpoint (TP=1, PP=1, bf16) for benchmarks.

Random tensors under the real mcore parameter names and an `args` namespace with Megatron-LM's
argument names, saved the way Megatron-LM's training loop saves a legacy checkpoint:

    ROOT/latest_checkpointed_iteration.txt
    ROOT/iter_0000001/mp_rank_00/model_optim_rng.pt   # {"args", "checkpoint_version", "iteration", "model"}

Usage: python bench/synthetic_checkpoint.py ROOT [--layers N] [--hidden H] ... [--json]
The default shape is ≈ 1 GiB of bf16 weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

ITERATION = 1


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters of the synthetic Llama-like model."""

    num_layers: int = 9
    hidden_size: int = 2048
    num_attention_heads: int = 16
    num_query_groups: int = 4
    ffn_hidden_size: int = 5632
    vocab_size: int = 32000
    max_position_embeddings: int = 4096

    @property
    def kv_channels(self) -> int:
        """Head size d = h / nh."""
        return self.hidden_size // self.num_attention_heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """mcore parameter name → shape, in state-dict order."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        nh, ng = self.num_attention_heads, self.num_query_groups
        shapes: dict[str, tuple[int, ...]] = {
            "embedding.word_embeddings.weight": (self.vocab_size, h)
        }
        for i in range(self.num_layers):
            p = f"decoder.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (h,)
            # per query group: q query heads, then one k head, then one v head
            shapes[p + "self_attention.linear_qkv.weight"] = (ng * (nh // ng + 2) * d, h)
            shapes[p + "self_attention.linear_proj.weight"] = (h, nh * d)
            shapes[p + "pre_mlp_layernorm.weight"] = (h,)
            shapes[p + "mlp.linear_fc1.weight"] = (2 * f, h)  # [gate; up] (swiglu)
            shapes[p + "mlp.linear_fc2.weight"] = (h, f)
        shapes["decoder.final_layernorm.weight"] = (h,)
        shapes["output_layer.weight"] = (self.vocab_size, h)
        return shapes

    def nbytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of all weights in `dtype`."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return sum(itemsize * _numel(s) for s in self.tensor_shapes().values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def megatron_args(shape: ModelShape) -> argparse.Namespace:
    """Training arguments under Megatron-LM's names, as saved in a checkpoint's `args`."""
    return argparse.Namespace(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        group_query_attention=True,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.kv_channels,
        swiglu=True,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        apply_layernorm_1p=False,
        position_embedding_type="rope",
        rotary_base=10000,
        rotary_percent=1.0,
        max_position_embeddings=shape.max_position_embeddings,
        padded_vocab_size=shape.vocab_size,
        untie_embeddings_and_output_weights=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        params_dtype=torch.bfloat16,
        bf16=True,
        fp16=False,
    )


def state_dict(shape: ModelShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights (norms around 1, matrices with std 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, s in shape.tensor_shapes().items():
        t = torch.randn(s, generator=gen, dtype=torch.float32)
        t = 1.0 + 0.1 * t if len(s) == 1 else 0.02 * t
        out[name] = t.to(torch.bfloat16)
    return out


def write_checkpoint(root: Path, shape: ModelShape, seed: int = 0) -> Path:
    """Write the checkpoint under `root`; returns the path of the model_optim_rng.pt file."""
    rank_dir = root / f"iter_{ITERATION:07d}" / "mp_rank_00"
    rank_dir.mkdir(parents=True, exist_ok=True)
    path = rank_dir / "model_optim_rng.pt"
    ckpt = {
        "args": megatron_args(shape),
        "checkpoint_version": 3.0,
        "iteration": ITERATION,
        "model": state_dict(shape, seed),
    }
    torch.save(ckpt, path)
    (root / "latest_checkpointed_iteration.txt").write_text(f"{ITERATION}\n")
    return path


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """Command line: write the checkpoint, optionally print a JSON summary."""
    d = ModelShape()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--layers", type=int, default=d.num_layers)
    ap.add_argument("--hidden", type=int, default=d.hidden_size)
    ap.add_argument("--heads", type=int, default=d.num_attention_heads)
    ap.add_argument("--groups", type=int, default=d.num_query_groups)
    ap.add_argument("--ffn", type=int, default=d.ffn_hidden_size)
    ap.add_argument("--vocab", type=int, default=d.vocab_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    a = ap.parse_args(argv)
    shape = ModelShape(
        num_layers=a.layers,
        hidden_size=a.hidden,
        num_attention_heads=a.heads,
        num_query_groups=a.groups,
        ffn_hidden_size=a.ffn,
        vocab_size=a.vocab,
    )
    path = write_checkpoint(a.root, shape, a.seed)
    _fsync_tree(a.root)
    summary = {
        "shape": dataclasses.asdict(shape) | {"kv_channels": shape.kv_channels},
        "weight_bytes": shape.nbytes(),
        "file": str(path),
        "file_bytes": path.stat().st_size,
    }
    if a.json:
        json.dump(summary, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"wrote {path} ({summary['file_bytes'] / 2**30:.3f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
