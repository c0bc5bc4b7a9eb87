"""Verification, layer by layer: the same token ids through both models, one layer at a time.

For layer i both sides compute the attention on the same input hidden states (the source's), then
the MLP on the same post-attention states (the source's again), so each part is judged on its own
and a difference points at the part that has it; the source's output is carried forward. A side
holds one weight at a time (in float32), so the peak memory is a few tensors of one layer plus
the activations, whatever the model's size. The embedding comes first, the final norm and logits
last."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from converters.verify.compare import PartResult, auto_tolerance, compare_part
from converters.verify.model_math import check_same_model
from converters.verify.side import Part, Side


@dataclass
class StageResult:
    """A stage of the run: the embedding, one layer (its parts), or the head."""

    label: str  # "embedding", "layer 3", "final norm + logits"
    layer: int | None  # the checkpoint's 0-based layer number
    parts: list[PartResult]
    where: str = ""  # where the export stores it (e.g. "transformer.layers.1 in rank2..rank3")

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.parts)

    @property
    def max_abs(self) -> float:
        return max(p.max_abs for p in self.parts)

    @property
    def relative(self) -> float:
        return max(p.relative for p in self.parts)

    def failure(self) -> str | None:
        """A sentence naming this stage and the part that disagrees, None when it agrees."""
        bad = next((p for p in self.parts if not p.ok), None)
        if bad is None:
            return None
        where = f" ({self.where})" if self.where else ""
        text = (
            f"{self.label}{where}: {bad.part} differs, max abs {bad.max_abs:.3g}, "
            f"relative {bad.relative:.3g}"
        )
        if bad.first_bad:
            text += f"; first differing: {bad.first_bad}"
        elif bad.origin:
            text += f"; output of {bad.origin}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "layer": self.layer,
            "where": self.where,
            "ok": self.ok,
            "max_abs": self.max_abs,
            "relative": self.relative,
            "parts": [p.to_dict() for p in self.parts],
        }


@dataclass
class Report:
    """The outcome of a verification."""

    source: str
    export: str
    tokens: list[int]
    tolerance: float
    stages: list[StageResult] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # export tensors the model never read

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages) and not self.unused

    def failure(self) -> str | None:
        """The first failure, naming the layer and part; None when the export agrees."""
        for stage in self.stages:
            text = stage.failure()
            if text:
                return text
        if self.unused:
            shown = ", ".join(self.unused[:5]) + (" ..." if len(self.unused) > 5 else "")
            return f"the export holds tensors the model does not use: {shown}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "source": self.source,
            "export": self.export,
            "tokens": self.tokens,
            "tolerance": self.tolerance,
            "failure": self.failure(),
            "stages": [s.to_dict() for s in self.stages],
            "unused": self.unused,
        }


OnStage = Callable[[StageResult, int, int], None]  # (result, stages done, stages in all)


def random_tokens(count: int, vocab: int, seed: int) -> torch.Tensor:
    """`count` token ids in [0, vocab), the same for the same seed on every machine."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count,), generator=generator)


def check_inputs(source: Side, export: Side, tokens: int) -> None:
    """Refuse a pair that is not one model (naming the fields), or too many tokens."""
    check_same_model(source.math, export.math, export.where)
    if tokens < 1:
        raise ValueError(f"--tokens must be at least 1 (got {tokens})")
    if source.math.learned_positions and tokens > source.math.max_positions:
        raise ValueError(
            f"--tokens {tokens} is more than the model's {source.math.max_positions} positions"
        )


def verify(
    source: Side,
    export: Side,
    *,
    tokens: int = 16,
    seed: int = 0,
    tolerance: float | None = None,
    on_stage: OnStage | None = None,
    stop_at_first: bool = False,
) -> Report:
    """Run `tokens` seeded random token ids through both models, layer by layer (see the module
    docstring); `tolerance` None derives it from the dtypes."""
    check_inputs(source, export, tokens)
    tol = tolerance if tolerance is not None else auto_tolerance(source.dtype, export.dtype)
    ids = random_tokens(tokens, min(source.math.vocab, export.math.vocab), seed)
    report = Report(source.where, export.where, ids.tolist(), tol)
    total = source.math.layers + 2
    x = None

    def add(stage: StageResult) -> bool:
        report.stages.append(stage)
        if on_stage:
            on_stage(stage, len(report.stages), total)
        return stop_at_first and not stage.ok

    with torch.no_grad():
        s, e = source.embed(ids), export.embed(ids)
        if add(StageResult("embedding", None, [compare_part("embedding", e, s, tol)])):
            return report
        x = s.output
        for layer in range(source.math.layers):
            stage, x = verify_layer(source, export, layer, x, tol)
            if add(stage):
                return report
        s, e = source.head(x), export.head(x)
        vocab = export.math.vocab
        s.output = s.output[:, :vocab]  # an HF export may keep fewer (unpadded) vocab rows
        if "final norm" in s.trace and "final norm" in e.trace:
            norm = compare_part("final norm", _only(e, "final norm"), _only(s, "final norm"), tol)
        else:
            norm = None
        parts = ([norm] if norm else []) + [compare_part("logits", e, s, tol)]
        add(StageResult("final norm + logits", None, parts))
    report.unused = export.unused()
    return report


def verify_layer(
    source: Side, export: Side, layer: int, x: torch.Tensor, tolerance: float
) -> tuple[StageResult, torch.Tensor]:
    """Compare layer `layer` on input `x`; returns the result and the source's output."""
    s = source.attention(layer, x)
    e = export.attention(layer, x)
    attention = compare_part("attention", e, s, tolerance)
    h = x + s.output
    del s, e
    s = source.mlp(layer, h)
    e = export.mlp(layer, h)
    mlp = compare_part("MLP", e, s, tolerance)
    out = h + s.output
    stage = StageResult(f"layer {layer}", layer, [attention, mlp], export.layer_label(layer))
    return stage, out


def _only(part: Part, key: str) -> Part:
    trace = part.trace[key]
    return Part(trace.value, origin=trace.origin)


def forward_logits(side: Side, tokens: torch.Tensor) -> torch.Tensor:
    """The logits of one side's own forward pass (its output carried forward, layer by layer):
    what checks the reference layers against a model's own logits."""
    with torch.no_grad():
        x = side.embed(tokens).output
        for layer in range(side.math.layers):
            x = x + side.attention(layer, x).output
            x = x + side.mlp(layer, x).output
        return side.head(x).output
