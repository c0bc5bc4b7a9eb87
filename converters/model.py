"""The hyper-parameters of a decoder-only transformer, independent of source and target formats."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

Normalization = Literal["LayerNorm", "RMSNorm"]
PositionEmbedding = Literal["learned_absolute", "rope"]
Activation = Literal["gelu", "silu"]


@dataclass(frozen=True)
class ModelConfig:
    """What a converter needs to know about a model (all sizes global, i.e. unsharded)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int  # padded vocabulary rows stored in the checkpoint
    max_position_embeddings: int
    normalization: Normalization
    norm_epsilon: float
    apply_layernorm_1p: bool
    activation: Activation
    gated_mlp: bool
    position_embedding_type: PositionEmbedding
    rotary_base: float
    rotary_percent: float
    tied_embeddings: bool
    add_bias_linear: bool
    add_qkv_bias: bool
    dtype: str  # "float32" | "float16" | "bfloat16": how the weights are stored
    # Newer features default to "absent", so configs recorded before them still construct.
    # qk_layernorm: a norm over each query and key head (Qwen3-style), weights of size d.
    qk_layernorm: bool = False
    # Llama-3.1 RoPE scaling (megatron-core's `_apply_scaling`): the factor, None when off.
    rope_scaling_factor: float | None = None

    @property
    def heads_per_group(self) -> int:
        """Query heads per KV group (q in the spec)."""
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused QKV weight: ng · (q + 2) · d."""
        return self.num_query_groups * (self.heads_per_group + 2) * self.kv_channels

    @property
    def attention_width(self) -> int:
        """Columns of the attention output projection: nh · d."""
        return self.num_attention_heads * self.kv_channels

    @property
    def fc1_rows(self) -> int:
        """Rows of the first MLP weight: 2F when gated, F otherwise."""
        return self.ffn_hidden_size * (2 if self.gated_mlp else 1)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)


# Llama-3.1 RoPE scaling as megatron-core applies it (`RotaryEmbedding._apply_scaling`): only the
# factor is configurable (`--rope-scaling-factor`); these are its fixed keyword defaults.
LLAMA3_ROPE_CONSTANTS: dict[str, float | int] = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The TensorRT-LLM name of a torch dtype ("bfloat16", ...)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; expected one of {', '.join(DTYPES)}")
