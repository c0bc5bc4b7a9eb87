"""Llama family: RMSNorm, rotary positions (full head), SwiGLU, optional GQA."""

from __future__ import annotations

from typing import Any

from converters.model import ModelConfig
from converters.trtllm.families.base import Biases, ModelFamily, register


@register
class LlamaFamily(ModelFamily):
    name = "llama"
    architecture = "LlamaForCausalLM"

    @classmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        if cfg.normalization != "RMSNorm":
            return "needs RMSNorm"
        if not (cfg.gated_mlp and cfg.activation == "silu"):
            return "needs a SwiGLU MLP"
        if cfg.position_embedding_type != "rope" or cfg.rotary_percent != 1.0:
            return "needs rotary embeddings over the whole head"
        return None

    @classmethod
    def biases(cls, cfg: ModelConfig) -> Biases:
        attention = cfg.add_qkv_bias or cfg.add_bias_linear
        return Biases(qkv=attention, dense=attention, mlp=cfg.add_bias_linear)

    @classmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        biases = cls.biases(cfg)
        return {
            "hidden_act": "silu",
            "position_embedding_type": "rope_gpt_neox",
            "rotary_base": cfg.rotary_base,
            "attn_bias": biases.qkv,
            "mlp_bias": biases.mlp,
        }
