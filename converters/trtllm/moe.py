"""Mixture-of-experts layers for the TensorRT-LLM target (Mixtral-style, `tensorrt_llm/layers/moe.py`).

Per rank (spec families-moe §2.1-2.3): `mlp.router.weight` [E, H] in float32 on every rank
("Router should never be quantized"; TensorRT-LLM builds it with `strict_dtype=True`);
`mlp.fc.weight` [E_local, 2·F/moe_tp, H] holding `[up; gate]` of each expert's moe-tp shard
(TensorRT-LLM's own converter: `concat([w3, w1])`; the second half is activated) and
`mlp.proj.weight` [E_local, H, F/moe_tp]. `--moe-ep E` splits the target TP group into
moe_tp = T / E and moe_ep = E with `moe_ep_rank = tp_rank % E`, `moe_tp_rank = tp_rank // E`
(`Mapping`), and expert-parallel rank k holds the contiguous experts [k·E_total/E, (k+1)·E_total/E).

Routing as Megatron computes it maps onto TensorRT-LLM's normalisation modes: softmax after the
top-k (`moe_router_pre_softmax` false) is RENORMALIZE (1), softmax over all experts before it is
NONE (0). Whatever else Megatron's router can do, TensorRT-LLM's Llama/QWen MoE cannot: refused.
"""

from __future__ import annotations

from converters.errors import IncompatibleParallelism
from converters.megatron import names
from converters.megatron.layout import SourceCheckpoint
from converters.model import ModelConfig
from converters.tensors import LazyTensor
from converters.trtllm import reshard

NORMALIZATION_NONE = 0  # ExpertScaleNormalizationMode.NONE: softmax over all, then top-k
NORMALIZATION_RENORMALIZE = 1  # top-k of the logits, then softmax over those k
ROUTER_DTYPE = "float32"


def moe_reasons(cfg: ModelConfig) -> list[str]:
    """Each routing or layout feature of `cfg` that TensorRT-LLM's Mixtral-style MoE cannot
    express, named with its Megatron argument (empty for a dense model)."""
    if not cfg.is_moe:
        return []
    found = []
    if cfg.moe_router_score_function != "softmax":
        found.append(
            f"{cfg.moe_router_score_function} router scores (moe_router_score_function="
            f"{cfg.moe_router_score_function!r}; TensorRT-LLM's MoE routes by softmax)"
        )
    if cfg.moe_router_enable_expert_bias:
        found.append("a router expert bias (moe_router_enable_expert_bias, aux-loss-free routing)")
    if cfg.moe_router_num_groups or cfg.moe_router_group_topk:
        found.append(
            f"group-limited routing (moe_router_num_groups={cfg.moe_router_num_groups}, "
            f"moe_router_group_topk={cfg.moe_router_group_topk})"
        )
    if cfg.moe_router_topk_scaling_factor not in (None, 1.0):
        found.append(
            f"top-k scaling (moe_router_topk_scaling_factor={cfg.moe_router_topk_scaling_factor})"
        )
    if cfg.moe_layer_pattern:
        found.append(
            f"dense and MoE layers mixed (moe_layer_freq, MoE layers {list(cfg.moe_layer_pattern)}; "
            "TensorRT-LLM's decoder layers are all MoE or all dense)"
        )
    if cfg.moe_shared_expert_intermediate_size:
        found.append(
            f"shared experts (moe_shared_expert_intermediate_size="
            f"{cfg.moe_shared_expert_intermediate_size}; only TensorRT-LLM's Qwen2-MoE has them, "
            "with a sigmoid gate and tensor names that differ between its versions)"
        )
    if cfg.add_bias_linear:
        found.append("expert and router biases (add_bias_linear)")
    if cfg.qk_layernorm:
        found.append(
            "qk-layernorm in a MoE model (Qwen3-MoE: TensorRT-LLM's QWen model sets its "
            "normalization_mode to NONE for qwen3_moe although Qwen3-MoE renormalises the "
            "top-k, and its Llama MoE has no q/k norms; refused rather than guessed)"
        )
    return found


def normalization_mode(cfg: ModelConfig) -> int:
    """TensorRT-LLM's `ExpertScaleNormalizationMode` for Megatron's softmax router."""
    return NORMALIZATION_NONE if cfg.moe_router_pre_softmax else NORMALIZATION_RENORMALIZE


def check_moe_split(cfg: ModelConfig, tp: int, moe_ep: int) -> None:
    """Raise `IncompatibleParallelism` unless the experts split over moe_tp x moe_ep = `tp`."""
    if moe_ep < 1 or tp % moe_ep:
        raise IncompatibleParallelism(
            f"--moe-ep {moe_ep} does not divide the target TP={tp} (moe_tp x moe_ep = TP)"
        )
    if not cfg.is_moe:
        if moe_ep != 1:
            raise IncompatibleParallelism(f"--moe-ep {moe_ep} needs a mixture-of-experts model")
        return
    if cfg.num_experts % moe_ep:
        raise IncompatibleParallelism(
            f"num_experts={cfg.num_experts} does not split over --moe-ep {moe_ep}"
        )
    moe_tp = tp // moe_ep
    if cfg.expert_ffn_hidden_size % moe_tp:
        raise IncompatibleParallelism(
            f"the expert FFN size {cfg.expert_ffn_hidden_size} does not split over "
            f"moe_tp = TP / moe_ep = {moe_tp}"
        )


def mapping_fields(cfg: ModelConfig, tp: int, moe_ep: int) -> dict[str, int]:
    """The MoE part of `config.json`'s `mapping` (TensorRT-LLM's defaults when dense)."""
    return {"moe_tp_size": tp // moe_ep, "moe_ep_size": moe_ep} if cfg.is_moe else {}


def config_fields(cfg: ModelConfig) -> dict:
    """`moe` (only the three keys every TensorRT-LLM version's MoeConfig accepts) and the
    expert FFN size as `intermediate_size`."""
    return {
        "intermediate_size": cfg.expert_ffn_hidden_size,
        "moe": {
            "num_experts": cfg.num_experts,
            "top_k": cfg.moe_router_topk,
            "normalization_mode": normalization_mode(cfg),
        },
    }


def rank_experts(cfg: ModelConfig, tp_rank: int, moe_ep: int) -> range:
    """Global numbers of the experts TP rank `tp_rank` holds (contiguous block of its EP rank)."""
    per_rank = cfg.num_experts // moe_ep
    ep_rank = tp_rank % moe_ep
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def moe_layer_tensors(
    source: SourceCheckpoint, layer: int, out: str, tp_rank: int, tp: int, moe_ep: int
) -> list[tuple[str, LazyTensor, str | None]]:
    """(name, lazy tensor, dtype or None for the target's) of layer `layer`'s router and experts
    on TP rank `tp_rank`; the expert stacks are joined per expert, so they stream one at a time."""
    cfg = source.config
    moe_tp, moe_tp_rank = tp // moe_ep, tp_rank // moe_ep
    fc, proj = [], []
    for expert in rank_experts(cfg, tp_rank, moe_ep):
        fc1 = source.tensor(names.expert_name(layer, expert, "linear_fc1.weight"))
        gate, up = reshard.gated_halves(fc1)
        fc.append(
            reshard.concat(
                [
                    reshard.split(up, 0, moe_tp_rank, moe_tp),
                    reshard.split(gate, 0, moe_tp_rank, moe_tp),
                ],
                0,
            )
        )
        fc2 = source.tensor(names.expert_name(layer, expert, "linear_fc2.weight"))
        proj.append(reshard.split(fc2, 1, moe_tp_rank, moe_tp))
    router = source.tensor(names.layer_name(layer, "mlp.router.weight"))
    return [
        (f"{out}.mlp.router.weight", router, ROUTER_DTYPE),
        (f"{out}.mlp.fc.weight", reshard.stack0(fc), None),
        (f"{out}.mlp.proj.weight", reshard.stack0(proj), None),
    ]
