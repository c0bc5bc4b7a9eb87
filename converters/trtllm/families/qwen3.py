"""Qwen3 family (`Qwen3ForCausalLM`, TensorRT-LLM's QWen model with `qwen_type` "qwen3"): a
Llama-style decoder without linear biases that normalises each query and key head
(`attention.q_layernorm` / `k_layernorm`, whole on every rank), with an explicit `head_size`."""

from __future__ import annotations

from typing import Any

from converters.model import ModelConfig
from converters.trtllm.families.base import ModelFamily, register
from converters.trtllm.families.llama import llama_style_reasons
from converters.trtllm.families.qwen2 import qwen_fields


@register
class Qwen3Family(ModelFamily):
    name = "qwen3"
    architecture = "Qwen3ForCausalLM"

    @classmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        found = llama_style_reasons(cfg)
        if not cfg.qk_layernorm:
            found.append("no qk-layernorm (Qwen3 always normalises query and key heads)")
        if cfg.add_bias_linear or cfg.add_qkv_bias:
            found.append("linear biases (QWenConfig sets attn_bias false for Qwen3)")
        return "; ".join(found) or None

    @classmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        return {**qwen_fields(cfg, "qwen3"), "qk_layernorm": True}
