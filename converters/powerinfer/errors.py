"""Errors of the PowerInfer converter. Each names the file (or parameter) at fault and what to do.

They subclass `converters.errors.ConversionError`, so callers can catch every conversion failure
in one place.
"""

from __future__ import annotations

from converters.errors import ConversionError


class BadActivations(ConversionError):
    """The activation statistics cannot be used (base class of the specific cases below)."""


class MissingActivationLayer(BadActivations):
    """The directory has no `activation_<i>.pt` for some layer i (or none at all)."""


class BadActivationShape(BadActivations):
    """A layer's tensor is not 1-D, or layers disagree on n_ff."""


class BadActivationValues(BadActivations):
    """A layer's tensor has NaN, infinite or negative values, or a non-numeric dtype."""


class NotATensor(BadActivations):
    """The file unpickles (safely) to something other than a tensor."""


class InvalidSplitParameters(ConversionError):
    """Capacity, batch, threshold or explicit counts do not fit the model."""


class CorruptGpuIndex(ConversionError):
    """A GPU index file cannot be read: wrong magic, truncated, or inconsistent."""
