"""What a model computes, independent of how its weights are stored: the description each side
of a verification (the Megatron source, the export) builds from its own configuration.

Fields that decide tensor shapes are compared before anything runs (a different model is refused,
naming the field); the others (norm epsilon, rotary settings, activation) only enter the
arithmetic, so an export whose config says something else shows up as a numeric difference in
the layer part that uses it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from converters.errors import ConversionError

Norm = Literal["LayerNorm", "RMSNorm"]
Act = Literal["silu", "gelu", "relu", "gelu_tanh"]


class ExportMismatch(ConversionError):
    """The export and the source are not the same model (a shape-deciding field differs)."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 rotary scaling (megatron-core's `_apply_scaling`, HF's "llama3" rope type)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class Moe:
    """A mixture-of-experts MLP: `experts` experts of `ffn` rows, top-`top_k` routing.

    `pre_softmax`: softmax over all experts, then top-k (TRT-LLM NONE, HF norm_topk_prob=False);
    otherwise top-k, then softmax over the chosen logits (RENORMALIZE, norm_topk_prob=True)."""

    experts: int
    top_k: int
    ffn: int
    pre_softmax: bool
    dense_layers: tuple[int, ...] = ()  # layers with a plain MLP (of the model's `ffn`)
    shared_ffn: int = 0  # shared experts' rows together (0: none), always applied
    shared_gate: bool = False  # a sigmoid gate on the shared experts' output


@dataclass(frozen=True)
class ModelMath:
    """The computation of a decoder-only transformer, as one side describes it."""

    layers: int
    hidden: int
    heads: int
    groups: int  # KV heads
    head_dim: int
    ffn: int
    vocab: int  # rows of the embedding table (an HF export may trim Megatron's padding)
    norm: Norm
    eps: float
    activation: Act
    gated: bool
    learned_positions: bool
    max_positions: int
    rope_base: float = 10000.0
    rope_dim: int = 0  # rotary dims of each head (0: no rotary embedding)
    rope_scaling: RopeScaling | None = None
    qk_norm: bool = False
    moe: Moe | None = None
    embed_scale: float = 1.0  # the embedding lookup times this (Gemma: sqrt(hidden))
    norm_offset: float = 0.0  # norms scale by weight + this (an HF Gemma stores w for 1 + w)

    @property
    def q_per_kv(self) -> int:
        return self.heads // self.groups

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer not in self.moe.dense_layers


# Fields that decide tensor shapes: a difference means another model, refused before any compute.
SHAPE_FIELDS = ("layers", "hidden", "heads", "groups", "head_dim", "ffn", "learned_positions")


def check_same_model(source: ModelMath, export: ModelMath, where: str) -> None:
    """Raise `ExportMismatch` naming every shape-deciding field that differs (and an export vocab
    larger than the source's): the export was made from another model."""
    diffs = [
        f"{name} {getattr(export, name)} in the export, {getattr(source, name)} in the source"
        for name in SHAPE_FIELDS
        if getattr(source, name) != getattr(export, name)
    ]
    if export.vocab > source.vocab:
        diffs.append(f"vocab {export.vocab} rows in the export, {source.vocab} in the source")
    if (source.moe is None) != (export.moe is None):
        what = "mixture-of-experts" if source.moe else "dense"
        diffs.append(f"the source is {what}, the export is not")
    elif source.moe and export.moe:
        for name in ("experts", "top_k", "ffn", "dense_layers", "shared_ffn"):
            a, b = getattr(export.moe, name), getattr(source.moe, name)
            if a != b:
                diffs.append(f"MoE {name} {a} in the export, {b} in the source")
    if diffs:
        raise ExportMismatch(
            "the export and the source are different models (shape mismatch): " + "; ".join(diffs),
            where,
        )


def describe(math: ModelMath) -> dict[str, Any]:
    """The description as plain JSON values (for reports)."""
    out: dict[str, Any] = {}
    for f in fields(math):
        value = getattr(math, f.name)
        out[f.name] = value.__dict__ if hasattr(value, "__dict__") else value
    return out
