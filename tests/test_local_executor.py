"""How the local executor sizes its worker pool."""

from __future__ import annotations

import pytest

from config.settings import Settings
from converters.errors import ConversionError
from tasks.executors.local import choose_workers

GIB = 2**30


def inspected(ranks: int, written_each: int, peak_each: int) -> list[tuple[int, int]]:
    """The (peak bytes, bytes written) of each rank step, as the Megatron kind's plan gives them."""
    return [(peak_each, written_each) for _ in range(ranks)]


def test_small_conversions_run_in_one_worker():
    assert choose_workers(inspected(8, 10 * 2**20, 2**20), None, Settings()) == 1


def test_large_conversions_use_the_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert choose_workers(inspected(8, 4 * GIB, 2**20), None, Settings()) == 8


def test_memory_bounds_the_pool(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    available = 100 * GIB

    class Memory:
        def __init__(self):
            self.available = available

    monkeypatch.setattr("psutil.virtual_memory", Memory)
    settings = Settings(memory_fraction=0.8, process_overhead_bytes=0)
    # 80 GiB usable / 30 GiB per rank → 2 processes, whatever the cores and output size say.
    assert choose_workers(inspected(8, 40 * GIB, 30 * GIB), None, settings) == 2


def test_requested_workers_are_capped_by_ranks_and_checked():
    assert choose_workers(inspected(2, GIB, GIB), 8, Settings()) == 2
    with pytest.raises(ConversionError, match="at least 1"):
        choose_workers(inspected(2, GIB, GIB), 0, Settings())
