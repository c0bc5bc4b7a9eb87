"""Test oracle, MoE part: a TensorRT-LLM Mixtral-style MoE layer computed rank by rank.

What TensorRT-LLM does (`tensorrt_llm/layers/moe.py`, `mapping.py`; spec families-moe §2):
the router `mlp.router.weight` [E, H] is float32 and whole on every rank (`strict_dtype=True`);
its logits are taken in float32. `moe.normalization_mode` RENORMALIZE (1) takes the top-k logits
then a softmax over those k; NONE (0) takes a softmax over all experts then the top-k. The TP
group is split as moe_tp x moe_ep with `moe_ep_rank = tp_rank % moe_ep` (EP fastest) and
`moe_tp_rank = tp_rank // moe_ep`; EP rank k holds the contiguous experts
[k·E/moe_ep, (k+1)·E/moe_ep). `mlp.fc.weight` [E_local, 2·F/moe_tp, H] is `[up; gate]` (the second
half activated: swiglu), `mlp.proj.weight` [E_local, H, F/moe_tp]; each rank adds its experts'
partial outputs for the tokens routed to them, and an all-reduce over the TP group sums them.

Megatron computes the same routing (`moe_router_pre_softmax` false: top-k then softmax; true:
softmax then top-k), so a correct conversion reproduces the Megatron model's logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

NORMALIZATION_NONE, NORMALIZATION_RENORMALIZE = 0, 1


def _check(cond: bool, msg: str) -> None:
    from tests.trtllm_reference import ReferenceError

    if not cond:
        raise ReferenceError(msg)


def moe_geometry(cfg: dict) -> tuple[int, int]:
    """(moe_tp, moe_ep) from `config.json`'s mapping, checked against its `moe` section."""
    mapping = cfg["mapping"]
    tp = int(mapping.get("tp_size", 1))
    ep = int(mapping.get("moe_ep_size", 1))
    moe_tp = int(mapping.get("moe_tp_size", tp // ep))
    _check(moe_tp * ep == tp, f"moe_tp_size {moe_tp} x moe_ep_size {ep} != tp_size {tp}")
    moe = cfg["moe"]
    experts, ffn = int(moe["num_experts"]), int(cfg["intermediate_size"])
    _check(experts % ep == 0, f"num_experts {experts} not divisible by moe_ep_size {ep}")
    _check(ffn % moe_tp == 0, f"intermediate_size {ffn} not divisible by moe_tp_size {moe_tp}")
    _check(
        int(moe["normalization_mode"]) in (NORMALIZATION_NONE, NORMALIZATION_RENORMALIZE),
        f"normalization_mode {moe['normalization_mode']} is not modelled by the reference",
    )
    _check(
        cfg["hidden_act"] == "swiglu", f"MoE hidden_act must be 'swiglu', got {cfg['hidden_act']!r}"
    )
    return moe_tp, ep


def route(logits: torch.Tensor, top_k: int, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert indices), both [tokens, k], as TensorRT-LLM's normalisation mode says."""
    if mode == NORMALIZATION_RENORMALIZE:
        values, indices = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(values, dim=-1), indices
    weights, indices = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    return weights, indices


def moe_mlp(
    stage: list,
    pre: str,
    xs: list[torch.Tensor],
    cfg: dict,
    norm: Callable[[object, torch.Tensor], torch.Tensor],
    strict: bool,
) -> list[torch.Tensor]:
    """The residual streams after layer `pre`'s MoE block; `stage` holds each TP rank's file."""
    moe_tp, ep = moe_geometry(cfg)
    experts, top_k = int(cfg["moe"]["num_experts"]), int(cfg["moe"]["top_k"])
    mode = int(cfg["moe"]["normalization_mode"])
    h, ffn = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    local, ffn_l = experts // ep, ffn // moe_tp
    router_name = f"{pre}.mlp.router.weight"
    routers = []
    partials = []
    for r, f in enumerate(stage):
        _check(
            f.has(router_name) and f.tensors[router_name].dtype == torch.float32,
            f"rank{f.rank}: {router_name} must be stored as float32",
        )
        router = f.get(router_name, (experts, h))
        routers.append(f.tensors[router_name])
        m = norm(f, xs[r])
        weights, indices = route(m @ router.t(), top_k, mode)
        fc = f.get(f"{pre}.mlp.fc.weight", (local, 2 * ffn_l, h))
        proj = f.get(f"{pre}.mlp.proj.weight", (local, h, ffn_l))
        out = torch.zeros_like(m)
        first = (r % ep) * local
        for j in range(local):
            chosen = indices == first + j  # [tokens, k]
            rows = chosen.any(dim=-1)
            if not bool(rows.any()):
                continue
            y = m[rows] @ fc[j].t()
            up, gate = y[:, :ffn_l], y[:, ffn_l:]
            gain = (weights * chosen).sum(dim=-1)[rows, None]
            out[rows] += gain * ((F.silu(gate) * up) @ proj[j].t())
        partials.append(out)
    if strict:
        for r, router in enumerate(routers[1:], start=1):
            _check(torch.equal(routers[0], router), f"{router_name} differs on tp rank {r}")
    reduced = torch.stack(partials).sum(0)  # all-reduce over the TP group
    return [x + reduced for x in xs]
