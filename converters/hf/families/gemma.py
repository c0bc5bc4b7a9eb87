"""GemmaForCausalLM: RMSNorm scaling by `1 + weight` (the stored weight is Gemma's `w`, so a
zero-centred Megatron norm is written as stored), GeGLU with tanh-approximate GELU, embeddings
scaled by sqrt(hidden) inside the model, tied embeddings, explicit `head_dim`, MQA/GQA. Only a
declared Gemma (`--architecture gemma`, converters/megatron/declare.py) is taken."""

from __future__ import annotations

from typing import Any

from converters.hf.families.base import HfFamily, register
from converters.hf.families.llama import llama_style_fields
from converters.megatron.declare import undeclared
from converters.model import ModelConfig


@register
class GemmaFamily(HfFamily):
    architecture = "GemmaForCausalLM"
    model_type = "gemma"
    zero_centred_norms = True

    @classmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        return undeclared(cfg, "gemma")

    @classmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        return {
            **llama_style_fields(cfg),
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
        }
