"""MixtralForCausalLM: a Llama-style decoder without biases or q/k norms whose every MLP is a
mixture of experts (`block_sparse_moe.gate` router, experts `w1` gate / `w3` up / `w2` down) with
Megatron's default routing: top-k of the router logits, softmax over those k (Mixtral's softmax
over all experts renormalised over the top k is the same).

Written in the per-expert layout of the hub checkpoints; transformers 5 fuses the experts into
`mlp.experts.gate_up_proj` / `down_proj` as it loads them (its `conversion_mapping` "mixtral")."""

from __future__ import annotations

from typing import Any

from converters.hf.families.base import HfFamily, MoeNames, register
from converters.hf.families.llama import decoder_mismatches, llama_style_fields
from converters.model import ModelConfig


def routing_mismatches(cfg: ModelConfig) -> list[str]:
    """What Hugging Face's plain top-k softmax routers (Mixtral, Qwen3-MoE) cannot compute."""
    if not cfg.is_moe:
        return ["no experts (a dense model: LlamaForCausalLM, Qwen2/Qwen3ForCausalLM)"]
    found = []
    if cfg.moe_router_score_function != "softmax":
        found.append(f"{cfg.moe_router_score_function} router scores (needs softmax)")
    if cfg.moe_router_enable_expert_bias:
        found.append("a router expert bias (aux-loss-free balancing)")
    if cfg.moe_router_topk_scaling_factor not in (None, 1, 1.0):
        found.append(f"top-k scaling by {cfg.moe_router_topk_scaling_factor:g}")
    if cfg.moe_router_num_groups:
        found.append("group-limited routing")
    if cfg.moe_shared_expert_intermediate_size:
        found.append("shared experts")
    return found


def no_biases(cfg: ModelConfig) -> list[str]:
    if cfg.add_bias_linear or cfg.add_qkv_bias:
        return ["linear biases (none in this architecture's experts and attention)"]
    return []


def moe_fields(cfg: ModelConfig) -> dict[str, Any]:
    """Sizes, rope and routing fields the MoE architectures share."""
    return {
        **llama_style_fields(cfg),
        "num_experts_per_tok": cfg.moe_router_topk,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.0,
        "sliding_window": None,
    }


@register
class MixtralFamily(HfFamily):
    architecture = "MixtralForCausalLM"
    model_type = "mixtral"
    moe_names = MoeNames(block="block_sparse_moe", router="gate", gate="w1", up="w3", down="w2")

    @classmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        found = decoder_mismatches(cfg) + routing_mismatches(cfg) + no_biases(cfg)
        if cfg.qk_layernorm:
            found.append("qk-layernorm (Qwen3MoeForCausalLM has query/key norms)")
        if cfg.moe_router_pre_softmax:
            found.append(
                "softmax over all experts before the top-k, not renormalised (Mixtral "
                "renormalises; Qwen3MoeForCausalLM with norm_topk_prob=false does not)"
            )
        if cfg.is_moe and cfg.moe_layer_pattern and not all(cfg.moe_layer_pattern):
            found.append("dense layers between MoE layers (every Mixtral layer has experts)")
        return "; ".join(found) or None

    @classmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        return {
            **moe_fields(cfg),
            "intermediate_size": cfg.expert_ffn_hidden_size,
            "num_local_experts": cfg.num_experts,
            "router_jitter_noise": 0.0,
        }
