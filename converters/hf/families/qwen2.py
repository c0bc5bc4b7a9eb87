"""Qwen2ForCausalLM: a Llama-style decoder whose only linear biases are on Q, K and V."""

from __future__ import annotations

from typing import Any

from converters.hf.families.base import HfFamily, register
from converters.hf.families.llama import llama_style_fields, llama_style_mismatches, no_qk_norm
from converters.model import ModelConfig


@register
class Qwen2Family(HfFamily):
    architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"

    @classmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        found = llama_style_mismatches(cfg) + no_qk_norm(cfg)
        if cfg.add_bias_linear:
            found.append("biases on o_proj and the MLP (Qwen2 has QKV biases only)")
        elif not cfg.add_qkv_bias:
            found.append("no QKV bias (Qwen2 always has one; LlamaForCausalLM is exact)")
        if cfg.num_attention_heads * cfg.kv_channels != cfg.hidden_size:
            # Qwen2Config declares no head_dim: its loaders derive hidden_size / heads.
            found.append(
                f"head size {cfg.kv_channels} ≠ hidden_size / num_attention_heads "
                f"({cfg.hidden_size}/{cfg.num_attention_heads})"
            )
        return "; ".join(found) or None

    @classmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        return qwen_fields(cfg)


def qwen_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The Llama-style fields, with the Qwen configs' sliding window switched off."""
    return {
        **llama_style_fields(cfg),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
    }
