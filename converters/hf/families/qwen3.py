"""Qwen3ForCausalLM: a Llama-style decoder without linear biases that normalises each query and
key head (`q_norm`, `k_norm`: Megatron's qk_layernorm), with an explicit head size."""

from __future__ import annotations

from typing import Any

from converters.hf.families.base import HfFamily, register
from converters.hf.families.llama import llama_style_mismatches
from converters.hf.families.qwen2 import qwen_fields
from converters.model import ModelConfig


@register
class Qwen3Family(HfFamily):
    architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"

    @classmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        found = llama_style_mismatches(cfg)
        if not cfg.qk_layernorm:
            found.append("no qk-layernorm (Qwen3 always normalises query and key heads)")
        if cfg.add_bias_linear or cfg.add_qkv_bias:
            # Qwen3's attention_bias would add q/k/v/o biases; its MLP has none.
            found.append("linear biases (Qwen3 as Porter writes it has none)")
        return "; ".join(found) or None

    @classmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        # llama_style_fields writes head_dim = kv_channels: Qwen3 heads need not be hidden / heads.
        return {**qwen_fields(cfg), "attention_bias": False}
