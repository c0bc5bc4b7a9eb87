"""The interface both sides of a verification implement (the Megatron source, each export format),
and what one part of a layer returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from converters.verify.model_math import ModelMath

LOGIT_ROWS = 4096  # vocab rows of the output layer held in float32 at once


@dataclass
class Trace:
    """An intermediate result of a part, in the global layout (all heads / all rows), with the
    stored tensors it comes from (`origin`); `pieces` > 1 when it was gathered from that many
    tensor-parallel ranks along `axis` (so the worst element names its rank)."""

    value: torch.Tensor
    origin: str = ""
    pieces: int = 1
    axis: int = 1
    first_rank: int = 0


@dataclass
class Part:
    """A part of a layer (attention, MLP, embedding, head): its output and its intermediates."""

    output: torch.Tensor
    trace: dict[str, Trace] = field(default_factory=dict)
    origin: str = ""  # the stored tensors the output comes from last (output projection, ...)


class Side(ABC):
    """One model of a verification, computing layer parts on given input hidden states."""

    math: ModelMath
    where: str  # the path to name in messages
    dtype: str  # how its weights are stored ("bfloat16", ...)

    @abstractmethod
    def embed(self, tokens: torch.Tensor) -> Part:
        """The input hidden states of layer 0 for `tokens` [seq] (positions 0..seq-1)."""

    @abstractmethod
    def attention(self, layer: int, x: torch.Tensor) -> Part:
        """What layer `layer`'s attention adds to the residual stream `x` [seq, hidden]."""

    @abstractmethod
    def mlp(self, layer: int, h: torch.Tensor) -> Part:
        """What layer `layer`'s MLP adds to the residual stream `h` (after the attention)."""

    @abstractmethod
    def head(self, x: torch.Tensor) -> Part:
        """Logits [seq, vocab] of the final norm and output layer on the last hidden states."""

    def layer_label(self, layer: int) -> str:
        """Where layer `layer` is stored (for messages), e.g. `transformer.layers.3 in rank1`."""
        return f"layer {layer}"

    def unused(self) -> list[str]:
        """Stored tensors no part has read (after a full run: names the model does not use)."""
        return []

    def close(self) -> None:  # noqa: B027 (a side with no open files has nothing to release)
        """Release open files."""


def gather(parts: list[torch.Tensor], axis: int) -> torch.Tensor:
    """Rank-local intermediates joined into the global layout along `axis`."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)


def rotary(norm: str, qk_norm: bool) -> str:
    """Where a normed, rotated query/key comes from: its norm (if any) and the rotary settings."""
    return (f"{norm} / " if qk_norm else "") + "rotary settings of config.json"
