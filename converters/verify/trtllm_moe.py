"""Mixture-of-experts layers of a TensorRT-LLM export, computed as its ranks would: each rank
routes the tokens with its own fp32 copy of the router and computes the experts it holds (EP rank
= tp_rank % moe_ep_size, a contiguous block of experts) on its moe_tp slice of their rows
(`mlp.fc` [E_local, 2F/moe_tp, H] as [up; gate], `mlp.proj` [E_local, H, F/moe_tp]); the partial
sums are reduced as the all-reduce would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from converters.verify import layers
from converters.verify.files import BadExport, TensorFiles
from converters.verify.model_math import ModelMath, Moe
from converters.verify.side import Part, Trace

_MODES = {0: True, 1: False}  # ExpertScaleNormalizationMode NONE / RENORMALIZE → pre_softmax


def trtllm_moe(cfg: dict[str, Any], path: Path) -> Moe | None:
    """The experts a TensorRT-LLM `config.json` describes (`moe`, or the legacy flat keys)."""
    moe = cfg.get("moe") or {}
    experts = int(moe.get("num_experts") or cfg.get("moe_num_experts") or 0)
    if not experts:
        return None
    mode = int(moe.get("normalization_mode", cfg.get("moe_normalization_mode", 1)))
    if mode not in _MODES:
        raise BadExport(
            f"moe normalization_mode {mode} is not verified (0 NONE, 1 RENORMALIZE)", path
        )
    top_k = int(moe.get("top_k") or cfg.get("moe_top_k") or 0)
    return Moe(experts, top_k, int(cfg["intermediate_size"]), pre_softmax=_MODES[mode])


def moe_split(cfg: dict[str, Any], math: ModelMath, tp: int, path: Path) -> tuple[int, int]:
    """(moe_tp, moe_ep) of the mapping, checked against the experts and their rows."""
    mapping = cfg.get("mapping") or {}
    ep = int(mapping.get("moe_ep_size") or 1)
    moe_tp = int(mapping.get("moe_tp_size") or tp // ep)
    assert math.moe is not None
    if moe_tp * ep != tp or math.moe.experts % ep or math.moe.ffn % moe_tp:
        raise BadExport(
            f"mapping moe_tp_size={moe_tp} x moe_ep_size={ep} does not split {math.moe.experts} "
            f"experts of {math.moe.ffn} rows over tp_size={tp}",
            path,
        )
    return moe_tp, ep


def moe_part(
    files: list[TensorFiles],
    prefix: str,
    where: str,
    h: torch.Tensor,
    m: ModelMath,
    split: tuple[int, int],
) -> Part:
    """Layer `prefix`'s MoE block over the stage's rank files `files`."""
    assert m.moe is not None
    moe_tp, ep = split
    per_ep, rows = m.moe.experts // ep, m.moe.ffn // moe_tp
    experts: dict[int, torch.Tensor] = {}
    partials, router = [], None
    for rank, f in enumerate(files):
        normed = layers.normalize(h, f.get(f"{prefix}.post_layernorm.weight", (m.hidden,)), None, m)
        logits = normed @ f.get(f"{prefix}.mlp.router.weight", (m.moe.experts, m.hidden)).t()
        router = logits if router is None else router
        weights = layers.route(logits, m)
        first = (rank % ep) * per_ep
        partial = torch.zeros_like(h)
        for local in range(per_ep):
            fc = f.rows(f"{prefix}.mlp.fc.weight", local, 1)[0]  # [up; gate] of this rank's rows
            if fc.shape != (2 * rows, m.hidden):
                raise BadExport(f"{prefix}.mlp.fc.weight holds experts of shape {tuple(fc.shape)}, "
                                f"expected {(2 * rows, m.hidden)}", f.locations[f"{prefix}.mlp.fc.weight"])  # fmt: skip
            tensors = {"up.weight": fc[:rows], "gate.weight": fc[rows:]}
            tensors["down.weight"] = f.rows(f"{prefix}.mlp.proj.weight", local, 1)[0]
            y = layers.feed_forward(lambda key, t=tensors: t.get(key), normed, m)
            e = first + local
            experts[e] = y if e not in experts else experts[e] + y  # moe_tp partial sums
            partial += weights[:, e : e + 1] * y
        partials.append(partial)
    assert router is not None
    trace = {"router": Trace(router, f"{prefix}.mlp.router.weight in {where}")}
    for e in sorted(experts):
        ranks = [r for r in range(len(files)) if (r % ep) * per_ep <= e < (r % ep + 1) * per_ep]
        origin = f"{prefix}.mlp.fc / mlp.proj [{e - (ranks[0] % ep) * per_ep}] in rank(s) {ranks}"
        trace[f"expert {e}"] = Trace(experts[e], origin)
    return Part(torch.stack(partials).sum(0), trace, f"{prefix}.mlp.proj.weight in {where}")
