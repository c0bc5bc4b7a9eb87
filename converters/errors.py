"""Errors raised by the converters. Each says which file is wrong, what is wrong and what to do."""

from __future__ import annotations

from pathlib import Path


class ConversionError(Exception):
    """Base class: a conversion cannot proceed. `path` names the file or directory at fault."""

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.reason = message  # what is wrong, without the path (to name another one instead)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class NotAMegatronCheckpoint(ConversionError):
    """The source is not a Megatron-LM checkpoint (or the expected files are missing)."""


class CorruptCheckpoint(ConversionError):
    """A checkpoint file cannot be read: truncated, corrupted or inconsistent with its siblings."""


class UnsafeCheckpoint(ConversionError):
    """A pickle references a global outside Porter's allow-list; nothing from it was executed."""


class UnsupportedModel(ConversionError):
    """The checkpoint uses a feature Porter does not convert (MoE, qk-layernorm, ...)."""


class IncompatibleParallelism(ConversionError):
    """The requested target parallelism does not fit the model (heads, groups, layers, ...)."""


class NonFiniteWeights(ConversionError):
    """A weight holds NaN or infinite values and the job asked to refuse them."""
