"""The model-family interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from converters.model import ModelConfig


@dataclass(frozen=True)
class Biases:
    """Which bias tensors the TensorRT-LLM model expects (missing source biases are written as zeros)."""

    qkv: bool
    dense: bool
    mlp: bool


class ModelFamily(ABC):
    """A TensorRT-LLM architecture: what it accepts and the family-specific config fields."""

    name: ClassVar[str]
    architecture: ClassVar[str]
    # Families for mixture-of-experts models and those for dense ones never take each other's.
    mixture_of_experts: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        """Why this family cannot represent `cfg`, or None when it can."""

    @classmethod
    def biases(cls, cfg: ModelConfig) -> Biases:
        """The bias tensors this family's model has for `cfg` (none unless a family says so)."""
        return Biases(qkv=False, dense=False, mlp=False)

    @classmethod
    @abstractmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        """Family-specific `config.json` fields (activation, positions, bias flags, ...)."""


FAMILIES: dict[str, type[ModelFamily]] = {}


def register(family: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make a family available under its `name`."""
    FAMILIES[family.name] = family
    return family
