"""Porter's settings: one `Settings` object, from `PORTER_*` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    # Share of available RAM the local executor may plan to use for rank processes.
    memory_fraction: float = 0.8
    # Resident memory of an idle rank process (Python + torch), added to each rank's planned peak.
    process_overhead_bytes: int = 400 * 2**20
    # Output bytes that make an extra rank process worth its start-up (about a second of CPU).
    bytes_per_worker: int = 2 * 2**30

    @classmethod
    def from_env(cls) -> Settings:
        """Settings with the `PORTER_<FIELD NAME>` environment variables applied."""
        defaults = cls()
        return cls(
            memory_fraction=float(
                os.environ.get("PORTER_MEMORY_FRACTION", defaults.memory_fraction)
            ),
            process_overhead_bytes=int(
                os.environ.get("PORTER_PROCESS_OVERHEAD_BYTES", defaults.process_overhead_bytes)
            ),
            bytes_per_worker=int(
                os.environ.get("PORTER_BYTES_PER_WORKER", defaults.bytes_per_worker)
            ),
        )
