"""Arithmetic on byte ranges ``[start, end)``: merge, subtract, coalesce, split, total."""

from __future__ import annotations

Range = tuple[int, int]  # [start, end)


def merge(ranges: list[Range]) -> list[Range]:
    """Sorted, non-overlapping ranges covering the same bytes (touching ranges joined)."""
    merged: list[list[int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def subtract(needed: list[Range], present: list[Range]) -> list[Range]:
    """The parts of merged `needed` not covered by merged `present`."""
    missing, i = [], 0
    for start, end in needed:
        while i < len(present) and present[i][1] <= start:
            i += 1
        j, cursor = i, start
        while j < len(present) and present[j][0] < end:
            if present[j][0] > cursor:
                missing.append((cursor, present[j][0]))
            cursor = max(cursor, present[j][1])
            j += 1
        if cursor < end:
            missing.append((cursor, end))
    return missing


def coalesce(ranges: list[Range], gap: int) -> list[Range]:
    """Join merged ranges whose gap is below `gap` (fewer GETs for a few unneeded bytes)."""
    joined: list[Range] = []
    for start, end in ranges:
        if joined and start - joined[-1][1] < gap:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return joined


def split(ranges: list[Range], size: int) -> list[Range]:
    """Cut ranges into pieces of at most `size` bytes."""
    return [(s, min(s + size, end)) for start, end in ranges for s in range(start, end, size)]


def total(ranges: list[Range]) -> int:
    return sum(end - start for start, end in ranges)
