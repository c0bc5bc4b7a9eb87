"""Mixtral family (`MixtralForCausalLM`, which TensorRT-LLM maps to its LLaMA model with a `moe`
config): a Llama-style decoder whose every MLP is a softmax-routed mixture of SwiGLU experts."""

from __future__ import annotations

from typing import Any

from converters.model import ModelConfig
from converters.trtllm import moe
from converters.trtllm.families.base import ModelFamily, register
from converters.trtllm.families.llama import llama_style_reasons, rope_fields


@register
class MixtralFamily(ModelFamily):
    name = "mixtral"
    architecture = "MixtralForCausalLM"
    mixture_of_experts = True

    @classmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        found = llama_style_reasons(cfg) + moe.moe_reasons(cfg)
        if cfg.add_qkv_bias:
            found.append("a QKV bias (add_qkv_bias)")
        return "; ".join(found) or None

    @classmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        return {
            # TensorRT-LLM's MoE is gated only with an explicit gated activation ("With our MoE
            # implementation, we must make it explicit", LLaMAConfig.from_hugging_face).
            "hidden_act": "swiglu",
            **rope_fields(cfg),
            "attn_bias": False,
            "mlp_bias": False,
            **moe.config_fields(cfg),
        }
