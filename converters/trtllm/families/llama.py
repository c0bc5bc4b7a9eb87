"""Llama family: RMSNorm, rotary positions (full head, optionally with Llama-3.1 scaling), SwiGLU,
optional GQA."""

from __future__ import annotations

from typing import Any

from converters.model import LLAMA3_ROPE_CONSTANTS, ModelConfig
from converters.trtllm.families.base import Biases, ModelFamily, register


def llama_style_reasons(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` from being a Llama-style decoder (RMSNorm, full-head RoPE, SwiGLU)."""
    found = []
    if cfg.normalization != "RMSNorm":
        found.append("needs RMSNorm")
    if not (cfg.gated_mlp and cfg.activation == "silu"):
        found.append("needs a SwiGLU MLP")
    if cfg.position_embedding_type != "rope" or cfg.rotary_percent != 1.0:
        found.append("needs rotary embeddings over the whole head")
    return found


def rope_fields(cfg: ModelConfig) -> dict[str, Any]:
    """`rotary_base` and `rotary_scaling`: Megatron's Llama-3.1 scaling with all four llama3 fields
    (TensorRT-LLM passes HF's `rope_scaling` through; megatron-core fixes all but the factor).
    "type" is what TensorRT-LLM's `RotaryScalingType.from_string` reads, "rope_type" HF's name."""
    scaling = None
    if cfg.rope_scaling_factor is not None:
        scaling = {
            "type": "llama3",
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            **LLAMA3_ROPE_CONSTANTS,
        }
    return {
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": cfg.rotary_base,
        "rotary_scaling": scaling,
    }


@register
class LlamaFamily(ModelFamily):
    name = "llama"
    architecture = "LlamaForCausalLM"

    @classmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        found = llama_style_reasons(cfg)
        if cfg.qk_layernorm:
            found.append("qk-layernorm (Qwen3ForCausalLM has the query/key norms)")
        if cfg.add_qkv_bias and not cfg.add_bias_linear:
            found.append("a QKV bias without a dense bias (Qwen2ForCausalLM is exact)")
        return "; ".join(found) or None

    @classmethod
    def biases(cls, cfg: ModelConfig) -> Biases:
        attention = cfg.add_qkv_bias or cfg.add_bias_linear
        return Biases(qkv=attention, dense=attention, mlp=cfg.add_bias_linear)

    @classmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        biases = cls.biases(cfg)
        return {
            "hidden_act": "silu",
            **rope_fields(cfg),
            "attn_bias": biases.qkv,
            "mlp_bias": biases.mlp,
        }
