"""Megatron-LM training arguments (`args` in a checkpoint) → `ModelConfig`, refusing what Porter can't convert."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from converters.errors import NotAMegatronCheckpoint, UnsupportedModel
from converters.model import ModelConfig, dtype_name

_REQUIRED = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "padded_vocab_size",
)

# Features whose weights or math Porter does not convert: (argument, predicate, explanation).
_UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("num_experts", lambda v: v not in (None, 0, 1), "mixture-of-experts layers (MoE)"),
    ("qk_layernorm", bool, "qk-layernorm"),
    ("multi_latent_attention", bool, "multi-latent attention (MLA)"),
    ("rotary_interleaved", bool, "interleaved rotary embeddings"),
    ("squared_relu", bool, "squared-ReLU activation"),
    ("use_rope_scaling", bool, "RoPE scaling"),
    ("rope_scaling", bool, "RoPE scaling"),
    (
        "virtual_pipeline_model_parallel_size",
        lambda v: v not in (None, 1),
        "virtual pipeline stages",
    ),
    ("mtp_num_layers", lambda v: v not in (None, 0), "multi-token prediction layers"),
    (
        "num_layers_per_virtual_pipeline_stage",
        lambda v: v not in (None, 0),
        "virtual pipeline stages",
    ),
)


def _get(args: Any, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def model_config_from_args(args: Any, stored_dtype: torch.dtype, path: Path) -> ModelConfig:
    """Build the `ModelConfig` from a checkpoint's `args`; `path` names the file for errors."""
    if args is None or not hasattr(args, "__dict__"):
        raise NotAMegatronCheckpoint("no training `args` in the checkpoint", path)
    missing = [name for name in _REQUIRED if _get(args, name) is None]
    if missing:
        raise NotAMegatronCheckpoint(f"`args` lacks {', '.join(missing)}", path)
    for name, is_set, feature in _UNSUPPORTED:
        value = _get(args, name)
        if value is not None and is_set(value):
            raise UnsupportedModel(f"{feature} ({name}={value!r}) is not supported by Porter", path)

    heads = int(args.num_attention_heads)
    groups = (
        int(_get(args, "num_query_groups") or heads)
        if _get(args, "group_query_attention")
        else heads
    )
    hidden = int(args.hidden_size)
    normalization = _get(args, "normalization", "LayerNorm")
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise UnsupportedModel(f"normalization {normalization!r} is not supported", path)
    position = _get(args, "position_embedding_type", "learned_absolute")
    if position not in ("learned_absolute", "rope"):
        raise UnsupportedModel(f"position_embedding_type {position!r} is not supported", path)
    if heads % groups:
        raise UnsupportedModel(
            f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}", path
        )
    epsilon = _get(args, "norm_epsilon")
    if epsilon is None:
        epsilon = _get(args, "layernorm_epsilon", 1e-5)
    return ModelConfig(
        num_layers=int(args.num_layers),
        hidden_size=hidden,
        ffn_hidden_size=int(_get(args, "ffn_hidden_size") or 4 * hidden),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=int(_get(args, "kv_channels") or hidden // heads),
        vocab_size=int(args.padded_vocab_size),
        max_position_embeddings=int(
            _get(args, "max_position_embeddings") or _get(args, "seq_length") or 0
        ),
        normalization=normalization,
        norm_epsilon=float(epsilon),
        apply_layernorm_1p=bool(_get(args, "apply_layernorm_1p", False)),
        activation="silu" if _get(args, "swiglu", False) else "gelu",
        gated_mlp=bool(_get(args, "swiglu", False)),
        position_embedding_type=position,
        rotary_base=float(_get(args, "rotary_base", 10000) or 10000),
        rotary_percent=float(_get(args, "rotary_percent", 1.0) or 1.0),
        tied_embeddings=not bool(_get(args, "untie_embeddings_and_output_weights", False)),
        add_bias_linear=bool(_get(args, "add_bias_linear", True)),
        add_qkv_bias=bool(_get(args, "add_qkv_bias", False))
        or bool(_get(args, "add_bias_linear", True)),
        dtype=dtype_name(stored_dtype),
    )


def parallel_sizes(args: Any) -> tuple[int, int]:
    """(tensor, pipeline) parallel sizes the checkpoint was saved with, per its `args`."""
    tp = int(_get(args, "tensor_model_parallel_size", 1) or 1)
    pp = int(_get(args, "pipeline_model_parallel_size", 1) or 1)
    return tp, pp
