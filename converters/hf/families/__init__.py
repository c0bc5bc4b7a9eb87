"""Hugging Face architectures, registered by class name: each module says which models it
represents exactly and which `config.json` fields it writes. Tensor names are shared (plan.py)."""

from __future__ import annotations

from converters.errors import UnsupportedModel
from converters.hf.families.base import FAMILIES, HfFamily, register
from converters.hf.families.gemma import GemmaFamily
from converters.hf.families.llama import LlamaFamily
from converters.hf.families.mixtral import MixtralFamily
from converters.hf.families.qwen2 import Qwen2Family
from converters.hf.families.qwen3 import Qwen3Family
from converters.hf.families.qwen3_moe import Qwen3MoeFamily
from converters.model import ModelConfig

__all__ = [
    "FAMILIES",
    "GemmaFamily",
    "HfFamily",
    "LlamaFamily",
    "MixtralFamily",
    "Qwen2Family",
    "Qwen3Family",
    "Qwen3MoeFamily",
    "family_for",
    "register",
]


def family_for(cfg: ModelConfig, architecture: str | None = None) -> type[HfFamily]:
    """The architecture named `architecture` (class name or model_type), refusing it if it cannot
    represent `cfg` exactly; without a name, the one that can (their acceptance rules do not overlap)."""
    if architecture is not None:
        family = next(
            (f for f in FAMILIES.values() if architecture in (f.architecture, f.model_type)), None
        )
        if family is None:
            raise UnsupportedModel(
                f"unknown Hugging Face architecture {architecture!r}; known: {', '.join(FAMILIES)}"
            )
        reason = family.rejects(cfg)
        if reason is not None:
            raise UnsupportedModel(f"{family.architecture} cannot represent this model: {reason}")
        return family
    reasons = []
    for family in FAMILIES.values():
        reason = family.rejects(cfg)
        if reason is None:
            return family
        reasons.append(f"{family.architecture}: {reason}")
    raise UnsupportedModel(
        f"none of the Hugging Face architectures Porter writes ({', '.join(FAMILIES)}) computes "
        "what this model computes: " + "; ".join(reasons)
    )
