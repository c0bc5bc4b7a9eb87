"""Megatron-core parameter names: the canonical set, their aliases, and how TP shards partition them.

Canonical names are the mcore names with *global* layer numbers and the un-fused norm names
(`input_layernorm`, `pre_mlp_layernorm`); readers translate what they find on disk into them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from converters.model import ModelConfig

# How Megatron splits a tensor over training TP ranks (spec §1, "Merging legacy TP shards").
Partition = Literal["rows", "cols", "gated_rows", "replicated"]


@dataclass(frozen=True)
class ParamKind:
    partition: Partition
    shape: Callable[[ModelConfig], tuple[int, ...]]


def _fc1_partition(cfg: ModelConfig) -> Partition:
    return "gated_rows" if cfg.gated_mlp else "rows"


GLOBAL_PARAMS: dict[str, ParamKind] = {
    "embedding.word_embeddings.weight": ParamKind("rows", lambda c: (c.vocab_size, c.hidden_size)),
    "embedding.position_embeddings.weight": ParamKind(
        "replicated", lambda c: (c.max_position_embeddings, c.hidden_size)
    ),
    "decoder.final_layernorm.weight": ParamKind("replicated", lambda c: (c.hidden_size,)),
    "decoder.final_layernorm.bias": ParamKind("replicated", lambda c: (c.hidden_size,)),
    "output_layer.weight": ParamKind("rows", lambda c: (c.vocab_size, c.hidden_size)),
}

# Per-layer parameters, keyed by the suffix after `decoder.layers.{i}.`.
LAYER_PARAMS: dict[str, ParamKind] = {
    "input_layernorm.weight": ParamKind("replicated", lambda c: (c.hidden_size,)),
    "input_layernorm.bias": ParamKind("replicated", lambda c: (c.hidden_size,)),
    "self_attention.linear_qkv.weight": ParamKind("rows", lambda c: (c.qkv_rows, c.hidden_size)),
    "self_attention.linear_qkv.bias": ParamKind("rows", lambda c: (c.qkv_rows,)),
    # qk_layernorm: one norm over each query / key head (size d), the same on every TP rank.
    "self_attention.q_layernorm.weight": ParamKind("replicated", lambda c: (c.kv_channels,)),
    "self_attention.q_layernorm.bias": ParamKind("replicated", lambda c: (c.kv_channels,)),
    "self_attention.k_layernorm.weight": ParamKind("replicated", lambda c: (c.kv_channels,)),
    "self_attention.k_layernorm.bias": ParamKind("replicated", lambda c: (c.kv_channels,)),
    "self_attention.linear_proj.weight": ParamKind(
        "cols", lambda c: (c.hidden_size, c.attention_width)
    ),
    "self_attention.linear_proj.bias": ParamKind("replicated", lambda c: (c.hidden_size,)),
    "pre_mlp_layernorm.weight": ParamKind("replicated", lambda c: (c.hidden_size,)),
    "pre_mlp_layernorm.bias": ParamKind("replicated", lambda c: (c.hidden_size,)),
    "mlp.linear_fc1.weight": ParamKind("rows", lambda c: (c.fc1_rows, c.hidden_size)),
    "mlp.linear_fc1.bias": ParamKind("rows", lambda c: (c.fc1_rows,)),
    "mlp.linear_fc2.weight": ParamKind("cols", lambda c: (c.hidden_size, c.ffn_hidden_size)),
    "mlp.linear_fc2.bias": ParamKind("replicated", lambda c: (c.hidden_size,)),
}

# Mixture-of-experts layers: the router (never TP-split), the shared experts (split like a dense
# MLP) and, below, the routed experts.
LAYER_PARAMS |= {
    "mlp.router.weight": ParamKind("replicated", lambda c: (c.num_experts, c.hidden_size)),
    "mlp.router.bias": ParamKind("replicated", lambda c: (c.num_experts,)),
    "mlp.router.expert_bias": ParamKind("replicated", lambda c: (c.num_experts,)),
    "mlp.shared_experts.linear_fc1.weight": ParamKind(
        "rows", lambda c: (c.shared_fc1_rows, c.hidden_size)
    ),
    "mlp.shared_experts.linear_fc1.bias": ParamKind("rows", lambda c: (c.shared_fc1_rows,)),
    "mlp.shared_experts.linear_fc2.weight": ParamKind(
        "cols", lambda c: (c.hidden_size, c.moe_shared_expert_intermediate_size or 0)
    ),
    "mlp.shared_experts.linear_fc2.bias": ParamKind("replicated", lambda c: (c.hidden_size,)),
    "mlp.shared_experts.gate_weight": ParamKind("replicated", lambda c: (1, c.hidden_size)),
}

# One routed expert, keyed by the suffix after `decoder.layers.{i}.mlp.experts.{e}.` where e is
# the *global* expert number (canonical names only; no checkpoint stores this form). Split over
# the expert TP group like a dense MLP (a gated fc1 by halves).
EXPERT_PARAMS: dict[str, ParamKind] = {
    "linear_fc1.weight": ParamKind("rows", lambda c: (c.expert_fc1_rows, c.hidden_size)),
    "linear_fc1.bias": ParamKind("rows", lambda c: (c.expert_fc1_rows,)),
    "linear_fc2.weight": ParamKind("cols", lambda c: (c.hidden_size, c.expert_ffn_hidden_size)),
    "linear_fc2.bias": ParamKind("replicated", lambda c: (c.hidden_size,)),
}

# How checkpoints store one local expert's parameter (suffixes after `decoder.layers.{i}.`):
# SequentialMLP `mlp.experts.local_experts.{j}.linear_fc1.weight`, TEGroupedMLP
# `mlp.experts.linear_fc1.weight{j}`; the legacy GroupedMLP packs them all (GROUPED_EXPERT_KEYS).
_SEQUENTIAL_EXPERT = re.compile(
    r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.(?:weight|bias))$"
)
_TE_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")
# Legacy GroupedMLP: [H, E_local·fc1_rows] and [E_local·F, H] (each expert transposed, [in, out]).
GROUPED_EXPERT_KEYS = {
    "linear_fc1.weight": "mlp.experts.weight1",
    "linear_fc2.weight": "mlp.experts.weight2",
}
# torch_dist: every layout under one key, experts stacked on the axis after the layer axis.
DIST_EXPERT_PREFIX = "mlp.experts.experts."

# Transformer Engine fuses the norms into the following linear layer (and torch_dist always
# stores them under these names).
FUSED_NORM_ALIASES: dict[str, str] = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}

_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_NAME = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$")


def is_ignored(key: str) -> bool:
    """Entries that carry no weights: Transformer Engine `_extra_state` (and its torch_dist shards)."""
    return "_extra_state" in key


def layer_suffix(suffix: str) -> str | None:
    """The canonical per-layer suffix for a stored one (resolving fused-norm aliases), or None."""
    suffix = FUSED_NORM_ALIASES.get(suffix, suffix)
    return suffix if suffix in LAYER_PARAMS else None


def parse_layer_key(key: str) -> tuple[int, str] | None:
    """(local layer index, canonical suffix) for a per-layer key, None for anything else."""
    match = _LAYER_KEY.match(key)
    if not match:
        return None
    suffix = layer_suffix(match.group(2))
    return (int(match.group(1)), suffix) if suffix else None


def split_layer_name(name: str) -> tuple[int, str] | None:
    """(layer, suffix) of a canonical per-layer name, None for a global one."""
    match = _LAYER_KEY.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def stored_suffixes(suffix: str) -> tuple[str, ...]:
    """The suffixes a checkpoint may store a canonical per-layer suffix under (fused-norm aliases)."""
    return (suffix, *(alias for alias, target in FUSED_NORM_ALIASES.items() if target == suffix))


def layer_name(layer: int, suffix: str) -> str:
    """The canonical name of a per-layer parameter."""
    return f"decoder.layers.{layer}.{suffix}"


def expert_name(layer: int, expert: int, param: str) -> str:
    """The canonical name of routed expert `expert` (global number)'s `param` ("linear_fc1.weight")."""
    return f"decoder.layers.{layer}.mlp.experts.{expert}.{param}"


def split_expert_name(name: str) -> tuple[int, int, str] | None:
    """(layer, global expert, param) of a canonical expert name, None for any other name."""
    match = _EXPERT_NAME.match(name)
    if not match or match.group(3) not in EXPERT_PARAMS:
        return None
    return int(match.group(1)), int(match.group(2)), match.group(3)


def parse_stored_expert(suffix: str) -> tuple[int | None, str] | None:
    """(local expert number, param) for a stored per-layer suffix naming one local expert
    (SequentialMLP or TEGroupedMLP), (None, param) for a legacy GroupedMLP packed weight, None
    for anything else."""
    if match := _SEQUENTIAL_EXPERT.match(suffix):
        return int(match.group(1)), match.group(2)
    if match := _TE_GROUPED_EXPERT.match(suffix):
        return int(match.group(3)), f"{match.group(1)}.{match.group(2)}"
    for param, key in GROUPED_EXPERT_KEYS.items():
        if suffix == key:
            return None, param
    return None


def is_moe_key(key: str) -> bool:
    """Whether a stored or canonical key belongs to a mixture-of-experts layer only (router,
    routed or shared experts): in a dense model's checkpoint such keys are unknown."""
    return any(part in key for part in (".mlp.router.", ".mlp.experts.", ".mlp.shared_experts."))


def param_kind(name: str) -> ParamKind:
    """The partition rule and expected shape of a canonical name."""
    if name in GLOBAL_PARAMS:
        return GLOBAL_PARAMS[name]
    if expert := split_expert_name(name):
        return EXPERT_PARAMS[expert[2]]
    match = _LAYER_KEY.match(name)
    if match and match.group(2) in LAYER_PARAMS:
        return LAYER_PARAMS[match.group(2)]
    raise KeyError(name)


def partition_of(name: str, cfg: ModelConfig) -> Partition:
    """How training TP splits the canonical tensor `name` (a gated fc1, dense, shared or routed
    expert, splits by halves)."""
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")) and ".mlp." in name:
        return _fc1_partition(cfg)
    return param_kind(name).partition


def expected_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The global shape `name` must have for a model with config `cfg`."""
    return param_kind(name).shape(cfg)
