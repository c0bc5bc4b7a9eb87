"""How two results are compared: maximum absolute and relative difference, the tolerance, and
the report of one part (which intermediate differs first, and on which rank)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from converters.verify.side import Part, Trace

# Relative tolerance when both sides hold the same values (fp32 arithmetic, summation order).
EXACT = 1e-4
# When the export rounded the source's weights to a narrower dtype: a few units of its rounding.
ROUNDED = {"bfloat16": 3e-2, "float16": 4e-3}
_FLOOR = 1e-6  # the reference magnitude below which differences are taken as absolute


def auto_tolerance(source_dtype: str, export_dtype: str) -> float:
    """The tolerance for an export stored as `export_dtype` of a source stored as `source_dtype`:
    exact when it holds the source's values (same dtype, or float32), else from its rounding."""
    if export_dtype in (source_dtype, "float32"):
        return EXACT
    return ROUNDED.get(export_dtype, ROUNDED["bfloat16"])


@dataclass(frozen=True)
class Diff:
    max_abs: float
    relative: float


def diff(export: torch.Tensor, source: torch.Tensor) -> Diff:
    """max |export - source|, and that over max(|source|) (NaN counts as infinitely far)."""
    if export.shape != source.shape:
        return Diff(float("inf"), float("inf"))
    delta = (export - source).abs()
    worst = float(delta.max()) if delta.numel() else 0.0
    if torch.isnan(delta).any():
        worst = float("inf")
    scale = max(float(source.abs().max()) if source.numel() else 0.0, _FLOOR)
    return Diff(worst, worst / scale)


@dataclass(frozen=True)
class PartResult:
    """One part of one layer: attention, MLP (or an expert), embedding, logits."""

    part: str
    max_abs: float
    relative: float
    ok: bool
    first_bad: str | None = None  # the first intermediate that differs, with its tensors
    origin: str | None = None  # the export tensors of the part's output

    def to_dict(self) -> dict:
        return asdict(self)


def _rank_of(e: Trace, s: torch.Tensor) -> str:
    """ ", worst on rank r" when the intermediate was gathered from several ranks."""
    if e.pieces <= 1 or e.value.shape != s.shape:
        return ""
    axis = e.axis % e.value.dim()
    delta = (e.value - s).abs()
    per_index = delta.transpose(0, axis).reshape(delta.shape[axis], -1).amax(dim=1)
    index = int(per_index.argmax())
    return f", worst on tp rank {index * e.pieces // delta.shape[axis]}"


def _must_match(key: str) -> bool:
    """Intermediates judged on their own: the router and every expert, whatever the routing
    (an expert no token picks cannot move the output, but it is wrong all the same)."""
    return key == "router" or key.startswith(("expert", "shared"))


def compare_part(name: str, export: Part, source: Part, tolerance: float) -> PartResult:
    """Compare a part's output (and its router and experts); on failure name the first of its
    intermediates (in the order they were computed) that differs beyond the tolerance, and where
    it came from. A part whose first difference is an expert is named after it."""
    d = diff(export.output, source.output)
    ok = d.relative <= tolerance
    first_bad = None
    for key, s in source.trace.items():
        e = export.trace.get(key)
        if e is None or (ok and not _must_match(key)):
            continue
        t = diff(e.value, s.value)
        if t.relative > tolerance:
            ok = False
            first_bad = f"{key} (relative {t.relative:.3g}; from {e.origin}{_rank_of(e, s.value)})"
            if key.startswith("expert"):
                name = f"{name}, {key}"
            break
    return PartResult(name, d.max_abs, d.relative, ok, first_bad, export.origin or None)
