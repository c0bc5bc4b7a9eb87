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


def test_the_local_executor_runs_any_registered_kind(tmp_path):
    """The executor has no kind-specific code: a PowerInfer index job runs through the same phases
    (stats → solve → top-k → assemble → publish) and writes the bytes of the one-process export."""
    import json

    from tasks.cli.main import main
    from tasks.executors.local import run_conversion
    from tasks.kinds.powerinfer_index import IndexBudget, IndexSpec
    from tests.test_powerinfer_cli import LAYERS, write_activations

    activations = tmp_path / "activation"
    write_activations(activations, seed=5)
    budgets = (IndexBudget(4_000_000_000, capacity=4096), IndexBudget(8_000_000_000, capacity=8192))
    spec = IndexSpec(str(activations), str(tmp_path / "job"), budgets)
    progress: list[tuple[int, int]] = []
    summary = run_conversion(spec, on_progress=lambda done, total: progress.append((done, total)))
    assert len(summary.fanned("stats")) == len(summary.fanned("topk")) == LAYERS
    assert progress[-1] == (2 * LAYERS, 2 * LAYERS)  # in the kind's unit: per-layer steps

    args = ["--vram-capacity", "4000000000", "--capacity", "4096"]
    args += ["--vram-capacity", "8000000000", "--capacity", "8192"]
    assert (
        main(["convert", "powerinfer-index", str(activations), str(tmp_path / "one"), *args]) == 0
    )
    names = ["gpu_index.4000000000.gpuidx", "gpu_index.8000000000.gpuidx"]
    for name in names:
        assert (tmp_path / "job" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    manifest = json.loads((tmp_path / "job" / "manifest.json").read_text())
    assert manifest["job_id"] == summary.job_id
    listed = {f["path"] for f in manifest["files"]}
    assert listed == set(names) | {f"{n}.porter.json" for n in names}
    # the per-layer intermediates are gone; only what the manifest lists (and Porter's own
    # metadata files) remain
    left = {p.name for p in (tmp_path / "job").iterdir() if not p.name.startswith(".porter")}
    assert left == listed | {"manifest.json"}
