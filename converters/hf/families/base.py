"""The Hugging Face architecture interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from converters.model import ModelConfig


class HfFamily(ABC):
    """A Hugging Face architecture: which models it represents exactly and its `config.json` fields."""

    architecture: ClassVar[str]  # the class transformers instantiates, e.g. "LlamaForCausalLM"
    model_type: ClassVar[str]  # `config.json`'s "model_type", e.g. "llama"

    @classmethod
    @abstractmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        """Why this architecture cannot compute what `cfg` computes, or None when it can."""

    @classmethod
    @abstractmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        """The model's `config.json` fields (no dtype: that is the target's)."""

    @classmethod
    @abstractmethod
    def o_proj_bias(cls, cfg: ModelConfig) -> bool:
        """Whether the attention output projection (`o_proj`) has a bias tensor."""


FAMILIES: dict[str, type[HfFamily]] = {}


def register(family: type[HfFamily]) -> type[HfFamily]:
    """Class decorator: make an architecture available under its name."""
    FAMILIES[family.architecture] = family
    return family
