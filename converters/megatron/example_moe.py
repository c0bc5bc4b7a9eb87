"""Mixture-of-experts parts of the example writer: the MoE families, the TransformerConfig settings
that let megatron-core 0.16.1 run MoE on CPU, distinct values for every expert and router, and the
renames that emulate the grouped expert layouts on disk.

Kept apart from ``example`` / ``example_ranks`` (size); ``megatron`` is imported inside functions.
On CPU: the all-gather token dispatcher (the all-to-all one creates a CUDA stream) and
``moe_utils.te_general_gemm = None`` (referenced without Transformer Engine installed).
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import torch

# Settings every family leaves at these values (dense families: no experts).
MOE_DEFAULTS: dict[str, Any] = {
    "num_experts": None,
    "moe_router_topk": 2,
    "moe_ffn_hidden_size": None,
    "moe_router_pre_softmax": False,
    "moe_router_score_function": "softmax",
    "moe_router_enable_expert_bias": False,
    "moe_layer_freq": 1,
    "moe_shared_expert_intermediate_size": None,
    # How legacy files name the experts: "sequential" (SequentialMLP, what the model holds),
    # "te_grouped" (TEGroupedMLP: linear_fc1.weight{i}) or "legacy_grouped" (GroupedMLP:
    # weight1/weight2, transposed [in, out]). torch_dist files are the same for all three.
    "expert_layout": "sequential",
}


def moe_families(llama_style: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The MoE example families, built on the Llama-style dense settings `llama_style`."""
    # A Mixtral-style model: every layer MoE, 4 experts of FFN 48 (≠ ffn_hidden_size: fine-
    # grained), top-2, softmax after top-k. Weights large enough for routing to matter.
    mixtral = {
        **llama_style,
        "num_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "kv_channels": 8,
        "ffn_hidden_size": 64,
        "padded_vocab_size": 70,
        "num_experts": 4,
        "moe_router_topk": 2,
        "moe_ffn_hidden_size": 48,
    }
    return {
        "mixtral": mixtral,
        # Softmax before top-k (TensorRT-LLM's normalization mode NONE, HF norm_topk_prob=False).
        "mixtral_presoftmax": {**mixtral, "moe_router_pre_softmax": True},
        # Qwen3-MoE: q/k norms, explicit head size, top-k renormalised.
        "qwen3_moe": {**mixtral, "qk_layernorm": True, "kv_channels": 16, "rotary_base": 1000000},
        # DeepSeek / Qwen2-MoE-like: a dense first layer (moe_layer_freq list: torch_dist then
        # stores per-layer keys), shared experts of 2 x 32 (no gate).
        "moe_mixed_shared": {
            **mixtral,
            "num_layers": 3,
            "moe_layer_freq": [0, 1, 1],
            "moe_shared_expert_intermediate_size": 64,
        },
    }


_EXPERT_KEY = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.(.+)$")


def is_moe(hp: dict[str, Any]) -> bool:
    return bool(hp.get("num_experts"))


def moe_config_kwargs(hp: dict[str, Any], ep: int) -> dict[str, Any]:
    """TransformerConfig keyword arguments for the MoE settings of `hp` (none for a dense model)."""
    if not is_moe(hp):
        return {}
    return {
        "num_moe_experts": hp["num_experts"],
        "moe_router_topk": hp["moe_router_topk"],
        "moe_ffn_hidden_size": hp["moe_ffn_hidden_size"],
        "moe_router_pre_softmax": hp["moe_router_pre_softmax"],
        "moe_router_score_function": hp["moe_router_score_function"],
        "moe_router_enable_expert_bias": hp["moe_router_enable_expert_bias"],
        "moe_layer_freq": hp["moe_layer_freq"],
        "moe_shared_expert_intermediate_size": hp["moe_shared_expert_intermediate_size"],
        "moe_token_dispatcher_type": "allgather",
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
        "moe_grouped_gemm": False,
        "expert_model_parallel_size": ep,
    }


def moe_args(hp: dict[str, Any], ep: int) -> dict[str, Any]:
    """The MoE training arguments Megatron-LM's argparse stores (`num_experts=None` when dense)."""
    if not is_moe(hp):
        return {"num_experts": None}
    return {
        "num_experts": hp["num_experts"],
        "moe_router_topk": hp["moe_router_topk"],
        "moe_ffn_hidden_size": hp["moe_ffn_hidden_size"],
        "moe_grouped_gemm": hp["expert_layout"] != "sequential",
        "moe_use_legacy_grouped_gemm": hp["expert_layout"] == "legacy_grouped",
        "moe_router_pre_softmax": hp["moe_router_pre_softmax"],
        "moe_router_score_function": hp["moe_router_score_function"],
        "moe_router_enable_expert_bias": hp["moe_router_enable_expert_bias"],
        "moe_router_topk_scaling_factor": None,
        "moe_router_num_groups": None,
        "moe_router_group_topk": None,
        "moe_layer_freq": hp["moe_layer_freq"],
        "moe_shared_expert_intermediate_size": hp["moe_shared_expert_intermediate_size"],
        "moe_shared_expert_gate": False,
        "moe_token_dispatcher_type": "alltoall",  # what training used; conversion ignores it
        "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": None,
    }


def patch_cpu_moe() -> None:
    """megatron-core's router references Transformer Engine's GEMM when TE is absent."""
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None


@torch.no_grad()
def randomize_weights(
    model: torch.nn.Module, job: dict[str, Any], tp_rank: int, tp: int, ep_rank: int, ep: int
) -> None:
    """Give every weight (norms and biases aside) values that depend only on the seed and the
    parameter's *global* name (global expert number), split as Megatron splits them (a gated fc1:
    [gate_r; up_r] per TP rank), so every (tp, ep) layout holds the same model: megatron-core's
    own initialisation draws the dense weights after the local experts from one random stream,
    so they would differ with EP. Every expert and router gets distinct values."""
    hp = job["hp"]
    local_experts = hp["num_experts"] // ep
    for name, param in model.named_parameters():
        if "layernorm" in name or "layer_norm" in name or name.endswith(".bias"):
            continue
        global_name = name
        match = _EXPERT_KEY.match(name)
        if match:
            expert = ep_rank * local_experts + int(match.group(2))
            global_name = f"{match.group(1)}{expert}.{match.group(3)}"
        split = getattr(param, "tensor_model_parallel", False)
        dim = getattr(param, "partition_dim", 0) if split else 0
        shape = list(param.shape)
        shape[dim] *= tp if split else 1
        gen = torch.Generator().manual_seed(job["seed"] * 104729 + zlib.crc32(global_name.encode()))
        values = hp["init_method_std"] * torch.randn(shape, generator=gen)
        gated = hp["swiglu"] and "linear_fc1" in name
        if split and gated:
            values = torch.cat([half.chunk(tp, dim)[tp_rank] for half in values.chunk(2, dim)], dim)
        elif split:
            values = values.chunk(tp, dim)[tp_rank]
        param.copy_(values.to(param.dtype))


def grouped_expert_state(state: dict[str, Any], layout: str) -> dict[str, Any]:
    """A SequentialMLP state dict renamed as TEGroupedMLP (`linear_fc1.weight{i}`) or the legacy
    GroupedMLP (`weight1` [H, E_local·fc1_rows] and `weight2` [E_local·F, H], each the flat buffer
    of the experts' transposed [in, out] weights one after another)."""
    if layout == "sequential":
        return state
    out: dict[str, Any] = {}
    grouped: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        match = _EXPERT_KEY.match(key)
        if not match:
            out[key] = value
            continue
        prefix, index, rest = match.group(1), int(match.group(2)), match.group(3)
        if layout == "te_grouped":
            module, param = rest.rsplit(".", 1)
            out[f"{prefix}{module}.{param}{index}"] = value
        else:
            grouped.setdefault(prefix, {}).setdefault(index, {})[rest] = value
    for prefix, experts in grouped.items():
        # GroupedMLP reads weight1.view(E_local, H, fc1_rows) and weight2.view(E_local, F, H).
        order = sorted(experts)
        fc1 = torch.stack([experts[i]["linear_fc1.weight"].t() for i in order])
        fc2 = torch.stack([experts[i]["linear_fc2.weight"].t() for i in order])
        out[f"{prefix}weight1"] = fc1.contiguous().view(fc1.shape[1], -1)
        out[f"{prefix}weight2"] = fc2.contiguous().view(-1, fc2.shape[2])
    return out
