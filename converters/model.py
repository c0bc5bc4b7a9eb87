"""The hyper-parameters of a decoder-only transformer, independent of source and target formats."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from converters import dtypes
from converters.choices import DTYPE_NAMES
from converters.dtypes import DType

Normalization = Literal["LayerNorm", "RMSNorm"]
PositionEmbedding = Literal["learned_absolute", "rope"]
Activation = Literal["gelu", "silu", "gelu_tanh"]  # gelu_tanh: tanh-approximate GELU


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
    # Mixture of experts (`--num-experts`): 0 = dense. The expert MLPs use `activation` and
    # `gated_mlp` like the dense MLP, with `moe_ffn_hidden_size` (None: ffn_hidden_size).
    num_experts: int = 0
    moe_router_topk: int = 0
    moe_ffn_hidden_size: int | None = None
    moe_grouped_gemm: bool = False  # how the training stored experts (informational)
    moe_router_pre_softmax: bool = False  # softmax over all experts, then top-k (else top-k first)
    moe_router_score_function: str = "softmax"  # "softmax" | "sigmoid" | ...
    moe_router_enable_expert_bias: bool = False  # aux-loss-free bias added for the top-k choice
    moe_router_topk_scaling_factor: float | None = None
    moe_router_num_groups: int | None = None  # group-limited routing (DeepSeek)
    moe_router_group_topk: int | None = None
    # Which layers are MoE (1) or dense (0), one entry per layer; () = every layer when MoE.
    moe_layer_pattern: tuple[int, ...] = ()
    moe_shared_expert_intermediate_size: int | None = None  # all shared experts together
    moe_shared_expert_gate: bool = False  # sigmoid gate (`gate_weight` [1, H]) on their output
    # The architecture the user declared where the args cannot say it (converters/megatron/
    # declare.py): "gemma" = GeGLU (tanh GELU) and embeddings scaled by sqrt(hidden) at run time.
    architecture: str | None = None

    def __post_init__(self) -> None:
        # Configs read back from JSON carry lists.
        object.__setattr__(self, "moe_layer_pattern", tuple(self.moe_layer_pattern))

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
    def embedding_multiplier(self) -> float | None:
        """What the model multiplies the embedding lookup by (Gemma: sqrt(hidden)); None: 1."""
        return self.hidden_size**0.5 if self.architecture == "gemma" else None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_ffn_hidden_size(self) -> int:
        """F of one routed expert (fine-grained MoE: not ffn_hidden_size)."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def expert_fc1_rows(self) -> int:
        """Rows of one expert's first weight: 2F_e when gated, F_e otherwise."""
        return self.expert_ffn_hidden_size * (2 if self.gated_mlp else 1)

    @property
    def shared_fc1_rows(self) -> int:
        """Rows of the shared experts' first weight (0 without shared experts)."""
        size = self.moe_shared_expert_intermediate_size or 0
        return size * (2 if self.gated_mlp else 1)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether (global) layer `layer` has routed experts instead of a dense MLP."""
        if not self.is_moe:
            return False
        return not self.moe_layer_pattern or bool(self.moe_layer_pattern[layer])

    @property
    def element_type(self) -> DType:
        """The stored weights' element type."""
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

DTYPES: dict[str, DType] = {name: dtypes.named(name) for name in DTYPE_NAMES}


def dtype_name(dtype: DType) -> str:
    """The TensorRT-LLM name of an element type ("bfloat16", ...)."""
    if DTYPES.get(dtype.name) != dtype:
        raise ValueError(f"unsupported dtype {dtype}; expected one of {', '.join(DTYPES)}")
    return dtype.name
