"""Megatron's use of the safe `.pt` loader (`converters.safe_load`).

Megatron's own classes pickled into a checkpoint (enums inside `args`, e.g.
`ModelType.encoder_or_decoder`) become inert `MegatronStub` objects: they are never imported or
run. Everything else follows the generic allow-list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from converters import safe_load

STUBBED_PREFIX = "megatron."


class MegatronStub:
    """Inert stand-in for a Megatron class found in a pickle (e.g. `ModelType.encoder_or_decoder`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"MegatronStub{self.args}"


def load_pt(path: Path, *, span: tuple[int, int] | None = None) -> Any:
    """`converters.safe_load.load_pt`, with every `megatron.` global stubbed by `MegatronStub`."""
    return safe_load.load_pt(path, span=span, stubs={STUBBED_PREFIX: MegatronStub})
