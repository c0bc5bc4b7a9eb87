"""The Hugging Face architecture interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from converters.model import ModelConfig


@dataclass(frozen=True)
class MoeNames:
    """Where a mixture-of-experts architecture keeps its router and experts, per layer:
    `model.layers.{i}.{block}.{router}.weight` and `...{block}.experts.{e}.{gate|up|down}.weight`."""

    block: str
    router: str
    gate: str
    up: str
    down: str


class HfFamily(ABC):
    """A Hugging Face architecture: which models it represents exactly and its `config.json` fields."""

    architecture: ClassVar[str]  # the class transformers instantiates, e.g. "LlamaForCausalLM"
    model_type: ClassVar[str]  # `config.json`'s "model_type", e.g. "llama"
    moe_names: ClassVar[MoeNames | None] = None  # None: a dense architecture
    # Norms computing `1 + weight` (Gemma): zero-centred Megatron norms are written as stored.
    zero_centred_norms: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        """Why this architecture cannot compute what `cfg` computes, or None when it can."""

    @classmethod
    @abstractmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        """The model's `config.json` fields (no dtype: that is the target's)."""

    @classmethod
    def o_proj_bias(cls, cfg: ModelConfig) -> bool:
        """Whether the attention output projection (`o_proj`) has a bias tensor (none in most)."""
        return False


FAMILIES: dict[str, type[HfFamily]] = {}


def register(family: type[HfFamily]) -> type[HfFamily]:
    """Class decorator: make an architecture available under its name."""
    FAMILIES[family.architecture] = family
    return family
