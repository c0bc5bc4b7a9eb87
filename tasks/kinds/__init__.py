"""Job kinds, registered by name: each module of `KIND_MODULES` declares one `JobKind` (its spec,
inspect step, phases and publish) and registers it. Executors, the reaper, metrics and the CLI
look kinds up here and contain no kind-specific code.

Adding a kind: write `tasks/kinds/<name>.py` (see `base.py`) and name it in `KIND_MODULES`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from tasks.jobs.checks import InvalidSpec
from tasks.kinds.base import JobKind

KIND_MODULES = (
    "tasks.kinds.megatron_trtllm",
    "tasks.kinds.megatron_hf",
    "tasks.kinds.powerinfer_index",
)
DEFAULT_KIND = "megatron-trtllm"  # a spec without `kind` (records and hooks of older releases)

_KINDS: dict[str, JobKind] = {}


def register(kind: JobKind) -> JobKind:
    """Register `kind` under its name (a kind module calls this once, at import)."""
    if kind.name in _KINDS and _KINDS[kind.name] is not kind:
        raise ValueError(f"job kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


@functools.cache
def _load() -> None:
    for module in KIND_MODULES:
        importlib.import_module(module)


def all_kinds() -> dict[str, JobKind]:
    """Every registered kind, by name, in `KIND_MODULES` order."""
    _load()
    return dict(_KINDS)


def kind_named(name: Any) -> JobKind:
    """The kind called `name`; InvalidSpec listing the known ones otherwise."""
    kinds = all_kinds()
    if not isinstance(name, str) or name not in kinds:
        raise InvalidSpec(f"unknown job kind {name!r:.60}; known: {', '.join(kinds)}")
    return kinds[name]


def kind_of(spec: Any) -> JobKind:
    """The kind of a job spec object."""
    return kind_named(spec.kind)
