"""Qwen2 family (`Qwen2ForCausalLM`, TensorRT-LLM's QWen model with `qwen_type` "qwen2"): a
Llama-style decoder whose only linear biases are on Q, K and V (QWenDecoderLayer builds its
attention with `dense_bias=False` and its MLP with `mlp_bias`, false here)."""

from __future__ import annotations

from typing import Any

from converters.model import ModelConfig
from converters.trtllm.families.base import Biases, ModelFamily, register
from converters.trtllm.families.llama import llama_style_reasons, rope_fields


def qwen_fields(cfg: ModelConfig, qwen_type: str) -> dict[str, Any]:
    """The config fields TensorRT-LLM's `QWenConfig` reads, for a dense Qwen model."""
    return {
        "hidden_act": "silu",
        **rope_fields(cfg),
        "qwen_type": qwen_type,
        "attn_bias": qwen_type == "qwen2",  # Qwen2 has QKV biases, Qwen3 none
        "mlp_bias": False,
        "use_logn_attn": False,
        "seq_length": cfg.max_position_embeddings,
    }


@register
class Qwen2Family(ModelFamily):
    name = "qwen2"
    architecture = "Qwen2ForCausalLM"

    @classmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        found = llama_style_reasons(cfg)
        if cfg.qk_layernorm:
            found.append("qk-layernorm (Qwen2 has none; Qwen3ForCausalLM has them)")
        if cfg.add_bias_linear:
            found.append("dense and MLP biases (QWen's attention has no dense bias)")
        elif not cfg.add_qkv_bias:
            found.append("no QKV bias (Qwen2 always has one; LlamaForCausalLM is exact)")
        return "; ".join(found) or None

    @classmethod
    def biases(cls, cfg: ModelConfig) -> Biases:
        return Biases(qkv=True, dense=False, mlp=False)

    @classmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        return qwen_fields(cfg, "qwen2")
