"""Consistency checks between a checkpoint's MoE arguments and the tensors it stores."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from converters.errors import CorruptCheckpoint
from converters.megatron import names
from converters.model import ModelConfig


class _Source(Protocol):
    config: ModelConfig

    def has(self, name: str) -> bool: ...


def check_moe_layer(source: _Source, where: Path) -> None:
    """Raise `CorruptCheckpoint` when `args` say mixture-of-experts but the first MoE layer has
    no router (or its expert 0 no weights): the arguments and the weights disagree."""
    cfg = source.config
    if not cfg.is_moe:
        return
    layer = next(layer for layer in range(cfg.num_layers) if cfg.is_moe_layer(layer))
    for name in (
        names.layer_name(layer, "mlp.router.weight"),
        names.expert_name(layer, 0, "linear_fc1.weight"),
    ):
        if not source.has(name):
            raise CorruptCheckpoint(
                f"`args` say mixture-of-experts (num_experts={cfg.num_experts}), but layer "
                f"{layer} stores no {name.split(f'.{layer}.', 1)[1]}",
                where,
            )
