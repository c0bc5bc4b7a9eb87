"""TensorRT-LLM model families, registered by name: each module says which models it takes and
which `config.json` fields it writes. The tensor names and re-shard rules are shared (plan.py)."""

from __future__ import annotations

from converters.errors import UnsupportedModel
from converters.trtllm.families.base import FAMILIES, ModelFamily, register
from converters.trtllm.families.gemma import GemmaFamily
from converters.trtllm.families.gpt import GPTFamily
from converters.trtllm.families.llama import LlamaFamily
from converters.trtllm.families.mixtral import MixtralFamily
from converters.trtllm.families.qwen2 import Qwen2Family
from converters.trtllm.families.qwen3 import Qwen3Family

__all__ = [
    "FAMILIES",
    "GPTFamily",
    "GemmaFamily",
    "LlamaFamily",
    "MixtralFamily",
    "ModelFamily",
    "Qwen2Family",
    "Qwen3Family",
    "family_for",
    "register",
]


def family_for(cfg) -> ModelFamily:
    """The registered family that accepts `cfg` (their acceptance rules do not overlap)."""
    reasons = []
    for family in FAMILIES.values():
        if family.mixture_of_experts != cfg.is_moe:
            continue
        reason = family.rejects(cfg)
        if reason is None:
            return family
        reasons.append(f"{family.name}: {reason}")
    raise UnsupportedModel("no TensorRT-LLM family fits this model (" + "; ".join(reasons) + ")")
