"""Find and open a Megatron checkpoint: follow `latest_checkpointed_iteration.txt`, detect the format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from converters.errors import NotAMegatronCheckpoint

if TYPE_CHECKING:  # finding and identifying a checkpoint needs no numpy; reading it does
    from converters.model import ModelConfig
    from converters.tensors import LazyTensor

LATEST_FILE = "latest_checkpointed_iteration.txt"
_MAX_TRACKER_BYTES = 64  # an iteration number or "release", plus whitespace
_MAX_METADATA_JSON_BYTES = 2**20


def iteration_dir_name(text: str, where: Path | str) -> str:
    """`iter_XXXXXXX` or `release` for the contents of `latest_checkpointed_iteration.txt`.

    Only ASCII digits or "release": anything else (`../../etc`, an absolute path, NUL bytes, a
    Unicode digit, a 5,000-digit number) is refused, so the tracker cannot point outside the
    checkpoint."""
    text = text.strip()
    if text == "release":
        return "release"
    if text.isascii() and text.isdigit() and len(text) <= 18:
        return f"iter_{int(text):07d}"
    raise NotAMegatronCheckpoint(  # never quotes the file: it may be a link to a secret
        "expected an iteration number or 'release', found something else (not a number)", where
    )


class SourceCheckpoint(Protocol):
    """What re-shard rules need from a source: the config and global tensors by canonical name."""

    path: Path
    format: str
    config: ModelConfig
    tp: int
    pp: int

    def has(self, name: str) -> bool: ...

    def tensor(self, name: str) -> LazyTensor: ...

    def files(self) -> list[Path]: ...


def resolve_iteration_dir(source: Path) -> Path:
    """The directory holding one iteration's files, following `latest_checkpointed_iteration.txt`."""
    source = Path(source)
    if not source.exists():
        raise NotAMegatronCheckpoint("no such file or directory", source)
    if not source.is_dir():
        raise NotAMegatronCheckpoint("expected a checkpoint directory, got a file", source)
    latest = source / LATEST_FILE
    if latest.is_file():
        with latest.open("rb") as f:
            raw = f.read(_MAX_TRACKER_BYTES + 1)
        if len(raw) > _MAX_TRACKER_BYTES:
            raise NotAMegatronCheckpoint(
                f"is longer than {_MAX_TRACKER_BYTES} bytes; expected an iteration number or "
                "'release'",
                latest,
            )
        name = iteration_dir_name(raw.decode("utf-8", "replace"), latest)
        target = source / name
        if not target.is_dir():
            raise NotAMegatronCheckpoint(f"points at {name}/, which does not exist", latest)
        return target
    return source


def detect_format(iter_dir: Path) -> str:
    """ "torch_dist" or "legacy" for an iteration directory; a clear error for anything else."""
    metadata = iter_dir / "metadata.json"
    if metadata.is_file():
        if metadata.stat().st_size > _MAX_METADATA_JSON_BYTES:
            raise NotAMegatronCheckpoint(
                f"is larger than {_MAX_METADATA_JSON_BYTES} bytes", metadata
            )
        try:
            backend = json.loads(metadata.read_text()).get("sharded_backend")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise NotAMegatronCheckpoint(f"unreadable metadata.json: {exc}", metadata) from exc
        if backend == "torch_dist":
            return "torch_dist"
        raise NotAMegatronCheckpoint(
            "its sharded_backend is not supported (only torch_dist)", metadata
        )
    if any(child.name.startswith("mp_rank_") and child.is_dir() for child in iter_dir.iterdir()):
        return "legacy"
    raise NotAMegatronCheckpoint(
        f"not a Megatron checkpoint: no {LATEST_FILE}, metadata.json or mp_rank_* directories",
        iter_dir,
    )


def open_checkpoint(source: Path, architecture: str | None = None) -> SourceCheckpoint:
    """Open a Megatron checkpoint (root, iteration directory, legacy or torch_dist) for reading;
    `architecture` declares what the args cannot say (converters/megatron/declare.py)."""
    from converters.megatron.declare import declare_source
    from converters.megatron.dist_source import DistSource
    from converters.megatron.legacy import LegacyCheckpoint

    iter_dir = resolve_iteration_dir(Path(source))
    checkpoint: SourceCheckpoint
    if detect_format(iter_dir) == "torch_dist":
        checkpoint = DistSource(iter_dir)
    else:
        checkpoint = LegacyCheckpoint(iter_dir)
    declare_source(checkpoint, architecture)
    return checkpoint
