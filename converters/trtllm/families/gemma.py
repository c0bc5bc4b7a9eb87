"""Gemma family (`GemmaForCausalLM`, TensorRT-LLM's Gemma model): a Llama-style decoder with a
GeGLU MLP (`GatedMLP` with `hidden_act` "gelu_pytorch_tanh", HF's name, which TensorRT-LLM's
`GemmaConfig` copies verbatim), zero-centred RMSNorm weights stored `+1` (its Gemma converter adds
1.0 to every norm), a tied, unscaled embedding table (the runtime multiplies the lookup by
sqrt(hidden)) and `lm_head` written as its own copy. Only a declared Gemma (`--architecture
gemma`, converters/megatron/declare.py) is taken: the args cannot say it."""

from __future__ import annotations

from typing import Any

from converters.megatron.declare import undeclared
from converters.model import ModelConfig
from converters.trtllm.families.base import ModelFamily, register
from converters.trtllm.families.llama import rope_fields


@register
class GemmaFamily(ModelFamily):
    name = "gemma"
    architecture = "GemmaForCausalLM"

    @classmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        return undeclared(cfg, "gemma")

    @classmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        return {
            "hidden_act": "gelu_pytorch_tanh",
            **rope_fields(cfg),
            "attn_bias": False,
            "mlp_bias": False,
        }
