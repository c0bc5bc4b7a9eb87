"""Megatron-LM training arguments (`args` in a checkpoint) → `ModelConfig`, refusing what Porter can't convert."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from converters.dtypes import DType
from converters.errors import CorruptCheckpoint, NotAMegatronCheckpoint, UnsupportedModel
from converters.model import ModelConfig, dtype_name

_REQUIRED = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "padded_vocab_size",
)

# Features whose weights or math Porter does not convert: (argument, predicate, explanation).
_UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("moe_mlp_glu_interleave_size", lambda v: v not in (None, 0), "block-interleaved GLU experts"),
    ("glu_linear_offset", lambda v: v not in (None, 0, 0.0), "a GLU linear offset"),
    ("activation_func_clamp_value", lambda v: v is not None, "clamped GLU activations"),
    ("moe_single_grouped_weight", bool, "experts stored as one grouped weight"),
    ("moe_use_upcycling", bool, "MoE upcycling"),
    ("qk_l2_norm", bool, "L2-normalised queries and keys"),
    # Nemotron-NAS: per-layer block configs (attention/FFN replaced or resized per layer).
    (
        "heterogeneous_layers_config_path",
        bool,
        "heterogeneous layers (Nemotron-NAS block configs)",
    ),
    (
        "heterogeneous_layers_config_encoded_json",
        bool,
        "heterogeneous layers (Nemotron-NAS block configs)",
    ),
    # Falcon: attention and MLP side by side on one normalised input (NeMo's Falcon config
    # and megatron-core's exporter name it so); megatron-core's GPT layers are sequential.
    ("parallel_attention", bool, "Falcon-style parallel attention and MLP"),
    ("new_decoder_architecture", bool, "Falcon's new decoder architecture"),
    ("multi_latent_attention", bool, "multi-latent attention (MLA)"),
    ("rotary_interleaved", bool, "interleaved rotary embeddings"),
    ("squared_relu", bool, "squared-ReLU activation"),
    (
        "rotary_seq_len_interpolation_factor",
        lambda v: v not in (None, 1, 1.0),
        "linear RoPE position interpolation",
    ),
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


# Sizes beyond this are not a model but a forged header (the largest real ones are ~10^6).
_MAX_SIZE = 2**40


def _get(args: Any, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


# Megatron-LM's own choices for these arguments: names that may be shown in an error.
_NORMALIZATIONS = ("LayerNorm", "RMSNorm", "LayerNorm1P")
_POSITIONS = ("learned_absolute", "rope", "mrope", "relative", "yarn", "none")


def _shown(value: Any, names: tuple[str, ...] = ()) -> str:
    """`value` (read from the checkpoint's `args`) for an error message: a number, boolean, None
    or one of `names` as it is, anything else by its type only: file contents are never quoted."""
    if value is None or isinstance(value, bool | int | float) or value in names:
        return f"{value!r:.40}"
    return f"a {type(value).__name__}"


def _size(args: Any, name: str, path: Path | None, default: Any = None, minimum: int = 1) -> int:
    """`args.<name>` (or `default` when unset or 0) as an int in [minimum, 2^40]; a clear error
    naming the argument otherwise (a forged `args` must not divide by zero or size a tensor)."""
    raw = _get(args, name)
    value = default if raw is None or (raw == 0 and not isinstance(raw, bool)) else raw
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise CorruptCheckpoint(f"`args.{name}` is {_shown(raw)}, not a positive integer", path)
    try:
        number = int(value)
    except ValueError:
        raise CorruptCheckpoint(f"`args.{name}` is {_shown(raw)}, not an integer", path) from None
    if not minimum <= number <= _MAX_SIZE:
        raise CorruptCheckpoint(
            f"`args.{name}`={number} is out of range ({minimum}..{_MAX_SIZE})", path
        )
    return number


def _number(args: Any, name: str, default: float, path: Path) -> float:
    value = _get(args, name)
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CorruptCheckpoint(f"`args.{name}` is {_shown(value)}, not a number", path) from None


def _rope_scaling_factor(args: Any, path: Path) -> float | None:
    """Megatron-LM's Llama-3.1 RoPE scaling (`--use-rope-scaling`, `--rope-scaling-factor`, default
    8): the factor, or None when off. `rope_scaling` is GPTModel's name for the same switch."""
    switch = _get(args, "rope_scaling")
    if switch is not None and not isinstance(switch, bool):
        raise UnsupportedModel(
            f"RoPE scaling given as rope_scaling={_shown(switch)} (only Megatron-LM's boolean "
            "use_rope_scaling / rope_scaling with rope_scaling_factor is understood)",
            path,
        )
    if not (_get(args, "use_rope_scaling") or switch):
        return None
    factor = _number(args, "rope_scaling_factor", 8.0, path)
    if not math.isfinite(factor) or factor <= 0:
        raise CorruptCheckpoint(
            f"`args.rope_scaling_factor` is {factor!r}, not a positive number", path
        )
    return factor


def _moe_layer_pattern(args: Any, layers: int, path: Path) -> tuple[int, ...]:
    """`moe_layer_freq` (int N: every N-th layer from layer 0, or a 0/1 list per layer) as a
    per-layer 0/1 tuple; () when every layer is MoE."""
    freq = _get(args, "moe_layer_freq", 1)
    if isinstance(freq, int) and not isinstance(freq, bool) and 1 <= freq <= _MAX_SIZE:
        pattern = tuple(int(i % freq == 0) for i in range(layers))
    elif isinstance(freq, list | tuple) and all(v in (0, 1) for v in freq):
        if len(freq) != layers:
            raise CorruptCheckpoint(
                f"`args.moe_layer_freq` lists {len(freq)} layers, args.num_layers={layers}", path
            )
        pattern = tuple(int(v) for v in freq)
    else:
        raise UnsupportedModel(
            f"`args.moe_layer_freq`={_shown(freq)} is neither a positive integer nor a 0/1 list",
            path,
        )
    return () if all(pattern) else pattern


def _moe_fields(args: Any, layers: int, path: Path) -> dict[str, Any]:
    """The mixture-of-experts fields of `ModelConfig` (none for a dense model)."""
    raw = _get(args, "num_experts")
    if raw in (None, 0):
        return {}
    experts = _size(args, "num_experts", path)
    shared = _get(args, "moe_shared_expert_intermediate_size")
    score = _get(args, "moe_router_score_function", "softmax")
    if not isinstance(score, str):
        raise CorruptCheckpoint(
            f"`args.moe_router_score_function` is {_shown(score)}, not a name", path
        )
    scaling = _get(args, "moe_router_topk_scaling_factor")
    groups = _get(args, "moe_router_num_groups")
    topk = _size(args, "moe_router_topk", path, default=2)
    if topk > experts:
        raise CorruptCheckpoint(f"moe_router_topk={topk} exceeds num_experts={experts}", path)
    return {
        "num_experts": experts,
        "moe_router_topk": topk,
        "moe_ffn_hidden_size": (
            _size(args, "moe_ffn_hidden_size", path) if _get(args, "moe_ffn_hidden_size") else None
        ),
        "moe_grouped_gemm": bool(_get(args, "moe_grouped_gemm", False)),
        "moe_router_pre_softmax": bool(_get(args, "moe_router_pre_softmax", False)),
        "moe_router_score_function": score,
        "moe_router_enable_expert_bias": bool(_get(args, "moe_router_enable_expert_bias", False)),
        "moe_router_topk_scaling_factor": (
            None if scaling is None else _number(args, "moe_router_topk_scaling_factor", 1.0, path)
        ),
        "moe_router_num_groups": None
        if groups in (None, 0)
        else _size(args, "moe_router_num_groups", path),
        "moe_router_group_topk": (
            None
            if _get(args, "moe_router_group_topk") in (None, 0)
            else _size(args, "moe_router_group_topk", path)
        ),
        "moe_layer_pattern": _moe_layer_pattern(args, layers, path),
        "moe_shared_expert_intermediate_size": (
            None
            if shared in (None, 0)
            else _size(args, "moe_shared_expert_intermediate_size", path)
        ),
        "moe_shared_expert_gate": bool(_get(args, "moe_shared_expert_gate", False)),
    }


def model_config_from_args(args: Any, stored_dtype: DType, path: Path) -> ModelConfig:
    """Build the `ModelConfig` from a checkpoint's `args`; `path` names the file for errors."""
    if args is None or not hasattr(args, "__dict__"):
        raise NotAMegatronCheckpoint("no training `args` in the checkpoint", path)
    missing = [name for name in _REQUIRED if _get(args, name) is None]
    if missing:
        raise NotAMegatronCheckpoint(f"`args` lacks {', '.join(missing)}", path)
    for name, is_set, feature in _UNSUPPORTED:
        value = _get(args, name)
        if value is not None and is_set(value):
            raise UnsupportedModel(
                f"{feature} ({name}={_shown(value)}) is not supported by Porter", path
            )

    heads = _size(args, "num_attention_heads", path)
    groups = (
        _size(args, "num_query_groups", path, default=heads)
        if _get(args, "group_query_attention")
        else heads
    )
    hidden = _size(args, "hidden_size", path)
    normalization = _get(args, "normalization", "LayerNorm")
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise UnsupportedModel(
            f"normalization {_shown(normalization, _NORMALIZATIONS)} is not supported", path
        )
    position = _get(args, "position_embedding_type", "learned_absolute")
    if position not in ("learned_absolute", "rope"):
        raise UnsupportedModel(
            f"position_embedding_type {_shown(position, _POSITIONS)} is not supported", path
        )
    if heads % groups:
        raise UnsupportedModel(
            f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}", path
        )
    epsilon_name = "norm_epsilon" if _get(args, "norm_epsilon") is not None else "layernorm_epsilon"
    try:
        dtype = dtype_name(stored_dtype)
    except ValueError as exc:
        raise UnsupportedModel(f"weights stored as {stored_dtype}: {exc}", path) from None
    layers = _size(args, "num_layers", path)
    return ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=_size(args, "ffn_hidden_size", path, default=4 * hidden),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=_size(args, "kv_channels", path, default=max(1, hidden // heads)),
        vocab_size=_size(args, "padded_vocab_size", path),
        max_position_embeddings=_size(
            args, "max_position_embeddings", path, default=_get(args, "seq_length") or 0, minimum=0
        ),
        normalization=normalization,
        norm_epsilon=_number(args, epsilon_name, 1e-5, path),
        # Megatron-LM core 0.16 saves `--apply-layernorm-1p` as layernorm_zero_centered_gamma.
        apply_layernorm_1p=bool(
            _get(args, "apply_layernorm_1p") or _get(args, "layernorm_zero_centered_gamma")
        ),
        activation="silu" if _get(args, "swiglu", False) else "gelu",
        gated_mlp=bool(_get(args, "swiglu", False)),
        position_embedding_type=position,
        rotary_base=_number(args, "rotary_base", 10000.0, path) or 10000.0,
        rotary_percent=_number(args, "rotary_percent", 1.0, path) or 1.0,
        tied_embeddings=not bool(_get(args, "untie_embeddings_and_output_weights", False)),
        add_bias_linear=bool(_get(args, "add_bias_linear", True)),
        add_qkv_bias=bool(_get(args, "add_qkv_bias", False))
        or bool(_get(args, "add_bias_linear", True)),
        dtype=dtype,
        qk_layernorm=bool(_get(args, "qk_layernorm", False)),
        # megatron-core scales only rotary embeddings (learned positions ignore the switch).
        rope_scaling_factor=_rope_scaling_factor(args, path) if position == "rope" else None,
        **_moe_fields(args, layers, path),
    )


def parallel_sizes(args: Any, path: Path | None = None) -> tuple[int, int]:
    """(tensor, pipeline) parallel sizes the checkpoint was saved with, per its `args`."""
    tp = _size(args, "tensor_model_parallel_size", path, default=1)
    pp = _size(args, "pipeline_model_parallel_size", path, default=1)
    return tp, pp


def expert_parallel_sizes(args: Any, path: Path | None = None) -> tuple[int, int]:
    """(expert parallel, expert tensor parallel) sizes per `args`; (1, TP) for a dense model.
    `expert_tensor_parallel_size` unset means the experts are split like the dense layers (TP)."""
    if _get(args, "num_experts") in (None, 0):
        return 1, parallel_sizes(args, path)[0]
    ep = _size(args, "expert_model_parallel_size", path, default=1)
    etp = _size(args, "expert_tensor_parallel_size", path, default=parallel_sizes(args, path)[0])
    return ep, etp
