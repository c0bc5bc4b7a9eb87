"""Qwen3MoeForCausalLM: Qwen3's attention (per-head q/k norms, explicit head size, no biases) with
mixture-of-experts MLPs (`mlp.gate` router, experts `gate_proj` / `up_proj` / `down_proj`).
`norm_topk_prob` says whether the top-k probabilities are renormalised: Megatron's default
(top-k of the logits, then softmax over those k) is true, `moe_router_pre_softmax` false.
Dense layers between MoE layers (`moe_layer_freq`) are `mlp_only_layers` with a plain MLP of
`intermediate_size`.

Written in the per-expert layout of the hub checkpoints; transformers 5 fuses the experts into
`mlp.experts.gate_up_proj` / `down_proj` as it loads them (its `conversion_mapping` "qwen2_moe")."""

from __future__ import annotations

from typing import Any

from converters.hf.families.base import HfFamily, MoeNames, register
from converters.hf.families.llama import decoder_mismatches
from converters.hf.families.mixtral import moe_fields, no_biases, routing_mismatches
from converters.model import ModelConfig


@register
class Qwen3MoeFamily(HfFamily):
    architecture = "Qwen3MoeForCausalLM"
    model_type = "qwen3_moe"
    moe_names = MoeNames(
        block="mlp", router="gate", gate="gate_proj", up="up_proj", down="down_proj"
    )

    @classmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        found = decoder_mismatches(cfg) + routing_mismatches(cfg) + no_biases(cfg)
        if not cfg.qk_layernorm:
            found.append("no qk-layernorm (Qwen3-MoE always normalises query and key heads)")
        return "; ".join(found) or None

    @classmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        dense = [layer for layer in range(cfg.num_layers) if not cfg.is_moe_layer(layer)]
        return {
            **moe_fields(cfg),
            "intermediate_size": cfg.ffn_hidden_size,  # the dense layers' MLP
            "moe_intermediate_size": cfg.expert_ffn_hidden_size,
            "num_experts": cfg.num_experts,
            "norm_topk_prob": not cfg.moe_router_pre_softmax,
            "decoder_sparse_step": 1,
            "mlp_only_layers": dense,
            "attention_bias": False,
            "use_sliding_window": False,
        }
