"""`porter convert powerinfer-index` and `porter inspect`, end to end on files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.powerinfer.gpuindex import read_gpu_index
from converters.powerinfer.solver import solve
from tasks.cli.main import main

LAYERS, N_FF = 12, 1024


def write_activations(directory: Path, seed: int) -> np.ndarray:
    """`activation_<i>.pt` for LAYERS layers of N_FF neurons (later layers hotter); returns the
    values as saved (float32), in float64."""
    rng = np.random.default_rng(seed)
    values = rng.lognormal(mean=np.arange(LAYERS)[:, None] / 4, sigma=1.5, size=(LAYERS, N_FF))
    directory.mkdir()
    for layer in range(LAYERS):
        torch.save(
            torch.tensor(values[layer], dtype=torch.float32), directory / f"activation_{layer}.pt"
        )
    return values.astype(np.float32).astype(np.float64)


@pytest.fixture
def activations(tmp_path) -> tuple[Path, np.ndarray]:
    return tmp_path / "activation", write_activations(tmp_path / "activation", seed=7)


def convert(*args: str) -> int:
    return main(["convert", "powerinfer-index", *args])


def test_capacity_gives_the_optimal_split_and_hottest_neurons(activations, tmp_path):
    directory, values = activations
    output = tmp_path / "model.generated.gpuidx"
    assert (
        convert(str(directory), str(output), "--vram-capacity", "4000000000", "--capacity", "4096")
        == 0
    )
    index = read_gpu_index(output)
    expected = solve(values, 4096)
    assert [layer.bucket.size for layer in index.layers] == list(expected.counts)
    assert index.kv["split.vram_capacity"] == ("uint64", 4000000000)
    for layer, entry in enumerate(index.layers):  # blk.i comes from activation_i, hottest first
        hottest = np.argsort(-values[layer], kind="stable")[: entry.bucket.size]
        assert entry.bucket.tolist() == sorted(hottest.tolist())
    provenance = json.loads((tmp_path / "model.generated.gpuidx.porter.json").read_text())
    assert provenance["objective"] == pytest.approx(expected.objective)
    assert 0 < provenance["coverage"] < 1


def test_counts_skip_the_solver(activations, tmp_path):
    directory, _ = activations
    output = tmp_path / "idx"
    counts = [256 * (i % 3) for i in range(LAYERS)]
    assert (
        convert(
            str(directory),
            str(output),
            "--vram-capacity",
            "1",
            "--counts",
            ",".join(map(str, counts)),
        )
        == 0
    )
    assert [layer.bucket.size for layer in read_gpu_index(output).layers] == counts


def test_several_budgets_one_file_each_with_a_manifest(activations, tmp_path):
    directory, _ = activations
    output = tmp_path / "indices"
    args = [
        "--vram-capacity",
        "8000000000",
        "--vram-budget",
        "12582912",
        "--vram-capacity",
        "24000000000",
        "--vram-budget",
        "50331648",
    ]
    assert (
        convert(
            str(directory), str(output), *args, "--n-embd", "4096", "--weight-bytes", "2", "--gated"
        )
        == 0
    )
    manifest = json.loads((output / "manifest.json").read_text())
    files = {f["vram_capacity"]: f for f in manifest["files"]}
    assert set(files) == {8000000000, 24000000000}
    # 12 MiB / (3 · 4096 · 2 B) = 512 neurons; 48 MiB → 2048 neurons.
    assert files[8000000000]["capacity"] == 512 and files[24000000000]["capacity"] == 2048
    assert "n_embd=4096" in files[8000000000]["capacity_formula"]
    small = read_gpu_index(output / "gpu_index.8000000000.gpuidx")
    large = read_gpu_index(output / "gpu_index.24000000000.gpuidx")
    for a, b in zip(small.layers, large.layers, strict=True):  # threshold 0: more budget only adds
        assert set(a.bucket.tolist()) <= set(b.bucket.tolist())


def test_inspect_prints_counts_and_mass(activations, tmp_path, capsys):
    directory, values = activations
    output = tmp_path / "idx"
    assert convert(str(directory), str(output), "--vram-capacity", "1", "--capacity", "2048") == 0
    capsys.readouterr()
    assert main(["inspect", str(output), "--activations", str(directory)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    counts = solve(values, 2048).counts
    assert [int(r[2]) for r in rows] == list(counts)
    assert all(r[3].endswith("%") for r in rows if int(r[2]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vram-capacity", "1", "--capacity", "100"], "less than one batch"),
        (["--vram-capacity", "1", "--counts", "256,256"], "2 counts for a model with 12 layers"),
        (
            ["--vram-capacity", "1", "--vram-capacity", "2", "--capacity", "512"],
            "one --capacity per --vram-capacity",
        ),
        (["--vram-capacity", "1", "--vram-budget", "100000"], "needs --n-embd"),
    ],
)
def test_bad_parameters_are_one_clear_line(activations, tmp_path, capsys, args, message):
    directory, _ = activations
    output = tmp_path / "idx"
    assert convert(str(directory), str(output), *args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not output.exists()
