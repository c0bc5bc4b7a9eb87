"""Activation loading: numeric layer order, validation errors naming the file, no pickle execution."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.errors import ConversionError, CorruptCheckpoint, UnsafeCheckpoint
from converters.powerinfer.activations import load_activations
from converters.powerinfer.errors import (
    BadActivationShape,
    BadActivationValues,
    MissingActivationLayer,
    NotATensor,
)
from converters.powerinfer.gpuindex import read_gpu_index, write_gpu_index
from converters.powerinfer.select import select
from converters.powerinfer.solver import solve

N_FF = 512


def write_layers(directory: Path, n_layers: int, n_ff: int = N_FF) -> None:
    directory.mkdir(exist_ok=True)
    for i in range(n_layers):
        # layer-distinct: layer i's hottest neurons are a block starting at 16·i
        values = torch.zeros(n_ff, dtype=torch.float32)
        values[16 * i : 16 * i + 256] = torch.linspace(1000.0, 1.0, 256) + i
        torch.save(values, directory / f"activation_{i}.pt")


def test_more_than_ten_layers_keep_numeric_order(tmp_path: Path) -> None:
    write_layers(tmp_path / "act", 12)
    (tmp_path / "act" / "activation_x.pt").write_bytes(b"ignored")
    (tmp_path / "act" / "notes.txt").write_text("ignored")
    torch.save(torch.ones(3), tmp_path / "act" / "activation_3.pt.bak")
    acts = load_activations(tmp_path / "act")
    assert acts.values.shape == (12, N_FF) and acts.values.dtype == np.float32  # as stored
    assert [p.name for p in acts.files] == [f"activation_{i}.pt" for i in range(12)]
    split = solve(acts.values, 12 * 256)
    assert split.counts == (256,) * 12
    write_gpu_index(
        tmp_path / "m.gpuidx", select(acts.values, split.counts), n_ff=N_FF, vram_capacity=1
    )
    for i, layer in enumerate(read_gpu_index(tmp_path / "m.gpuidx").layers):
        np.testing.assert_array_equal(layer.bucket, np.arange(16 * i, 16 * i + 256))


def test_integer_counts_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    torch.save(torch.arange(8, dtype=torch.int64), tmp_path / "a" / "activation_0.pt")
    assert load_activations(tmp_path / "a").values.tolist() == [list(map(float, range(8)))]


def expect(directory: Path, error: type[ConversionError], file: str, message: str) -> None:
    with pytest.raises(error, match=message) as info:
        load_activations(directory)
    assert str(info.value).startswith(str(directory / file) if file else str(directory))


def test_missing_layer(tmp_path: Path) -> None:
    write_layers(tmp_path / "a", 12)
    os.remove(tmp_path / "a" / "activation_10.pt")
    expect(tmp_path / "a", MissingActivationLayer, "", "missing activation_10.pt")
    (tmp_path / "empty").mkdir()
    expect(tmp_path / "empty", MissingActivationLayer, "", "no activation_<i>.pt")
    with pytest.raises(MissingActivationLayer, match="the model has 13"):
        write_layers(tmp_path / "b", 12)
        load_activations(tmp_path / "b", n_layers=13)


def test_unequal_lengths(tmp_path: Path) -> None:
    write_layers(tmp_path / "a", 3)
    torch.save(torch.ones(256), tmp_path / "a" / "activation_2.pt")
    expect(
        tmp_path / "a",
        BadActivationShape,
        "activation_2.pt",
        "256 neurons.*activation_0.pt has 512",
    )


def test_two_dimensional(tmp_path: Path) -> None:
    write_layers(tmp_path / "a", 2)
    torch.save(torch.ones(2, 256), tmp_path / "a" / "activation_1.pt")
    expect(tmp_path / "a", BadActivationShape, "activation_1.pt", r"1-D.*\(2, 256\)")


@pytest.mark.parametrize(("value", "message"), [(float("nan"), "NaN"), (-1.0, "negative")])
def test_bad_values(tmp_path: Path, value: float, message: str) -> None:
    write_layers(tmp_path / "a", 2)
    bad = torch.ones(N_FF)
    bad[7] = value
    torch.save(bad, tmp_path / "a" / "activation_0.pt")
    expect(tmp_path / "a", BadActivationValues, "activation_0.pt", f"neuron 7.*{message}")


def test_non_tensor_pickle(tmp_path: Path) -> None:
    write_layers(tmp_path / "a", 2)
    torch.save({"counts": [1, 2]}, tmp_path / "a" / "activation_1.pt")
    expect(tmp_path / "a", NotATensor, "activation_1.pt", "found dict")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_reduce_payload_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    write_layers(tmp_path / "a", 2)
    torch.save(Payload(marker), tmp_path / "a" / "activation_1.pt")
    expect(tmp_path / "a", UnsafeCheckpoint, "activation_1.pt", "nothing")
    write_layers(tmp_path / "b", 2)
    with open(tmp_path / "b" / "activation_0.pt", "wb") as f:
        pickle.dump(Payload(marker), f)  # a bare pickle, not a torch zip
    expect(tmp_path / "b", CorruptCheckpoint, "activation_0.pt", "not a torch zip")
    assert not marker.exists()
