"""Job specs and content-derived job ids."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from converters.trtllm.plan import Target

FORMAT_VERSION = 1  # bump when the bytes Porter writes for the same input change


def porter_version() -> str:
    try:
        return version("porter")
    except PackageNotFoundError:  # running from a source tree
        return "0+source"


@dataclass(frozen=True)
class ConvertSpec:
    """A Megatron → TensorRT-LLM conversion: JSON-serialisable, the unit of work of a job."""

    source: str
    output: str
    tp: int
    pp: int = 1
    dtype: str | None = None
    parallel_embedding: bool = False
    kind: str = "megatron-trtllm"

    @property
    def target(self) -> Target:
        return Target(
            tp=self.tp, pp=self.pp, dtype=self.dtype, parallel_embedding=self.parallel_embedding
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ConvertSpec:
        return cls(**data)


def source_identity(files: list[Path]) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of every source file: changes whenever the checkpoint does."""
    identity = []
    for path in sorted(files):
        stat = path.stat()
        identity.append((str(path), stat.st_size, stat.st_mtime_ns))
    return identity


def job_id(spec: ConvertSpec, files: list[Path]) -> str:
    """Same spec (destination included) + same source files + same Porter format = same id."""
    payload = {
        "spec": spec.to_dict(),
        "source": source_identity(files),
        "format_version": FORMAT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{spec.kind}-{digest[:16]}"
