"""GPT family: LayerNorm, learned or rotary positions, biases, GELU or gated MLP."""

from __future__ import annotations

from typing import Any

from converters.model import ModelConfig
from converters.trtllm.families.base import Biases, ModelFamily, register

_GATED_ACT = {"silu": "swiglu", "gelu": "geglu"}


@register
class GPTFamily(ModelFamily):
    name = "gpt"
    architecture = "GPTForCausalLM"

    @classmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        found = [] if cfg.normalization == "LayerNorm" else ["needs LayerNorm"]
        if cfg.qk_layernorm:
            found.append("qk-layernorm (not written for GPTForCausalLM)")
        if cfg.rope_scaling_factor is not None:
            found.append("Llama-3.1 RoPE scaling (not written for GPTForCausalLM)")
        return "; ".join(found) or None

    @classmethod
    def biases(cls, cfg: ModelConfig) -> Biases:
        # TensorRT-LLM's GPT has one `bias` switch for every linear layer.
        bias = cfg.add_bias_linear or cfg.add_qkv_bias
        return Biases(qkv=bias, dense=bias, mlp=bias)

    @classmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        rope = cfg.position_embedding_type == "rope"
        return {
            "hidden_act": _GATED_ACT[cfg.activation] if cfg.gated_mlp else cfg.activation,
            "position_embedding_type": "rope_gpt_neox" if rope else "learned_absolute",
            "rotary_base": cfg.rotary_base,
            "rotary_pct": cfg.rotary_percent if rope else 0.0,
            "bias": cls.biases(cfg).qkv,
        }
