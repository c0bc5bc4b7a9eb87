"""The GPU index file: layout field by field (independent parser), byte pin against PowerInfer's
exporter driving code, the reader and the summary."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from converters.powerinfer.errors import CorruptGpuIndex
from converters.powerinfer.gpuindex import read_gpu_index, summarize, write_gpu_index
from converters.powerinfer.select import select

N_FF = 40  # 40 int32 = 160 bytes: a multiple of 32; buckets below are not, so padding shows


def parse(data: bytes) -> dict:
    """A GGUF/PWRI parser written from the spec alone (only the types this file uses)."""
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        raw = data[pos : pos + n]
        pos += n
        return raw.decode()

    out: dict = {"magic": data[:4]}
    pos = 4
    out["version"], out["n_tensors"], out["n_kv"] = take("<I"), take("<Q"), take("<Q")
    out["kv"] = []
    for _ in range(out["n_kv"]):
        key, vtype = string(), take("<I")
        value = {4: lambda: take("<I"), 10: lambda: take("<Q"), 8: string}[vtype]()
        out["kv"].append((key, vtype, value))
    out["tensors"] = []
    for _ in range(out["n_tensors"]):
        name, n_dims = string(), take("<I")
        dims = [take("<Q") for _ in range(n_dims)]
        out["tensors"].append((name, dims, take("<I"), take("<Q")))
    out["infos_end"] = pos
    out["data_start"] = (pos + 31) // 32 * 32
    return out


def buckets_for(counts: list[int], seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    values = rng.permutation(len(counts) * N_FF).reshape(len(counts), N_FF).astype(np.float64)
    return values, select(values, counts)


def test_layout_field_by_field(tmp_path: Path) -> None:
    counts = [3, 0, N_FF, 17]
    _, buckets = buckets_for(counts)
    written = write_gpu_index(
        tmp_path / "m.gpuidx", buckets, n_ff=N_FF, vram_capacity=5 * 2**32 + 7
    )
    data = (tmp_path / "m.gpuidx").read_bytes()
    assert written.bytes == len(data)
    f = parse(data)
    assert f["magic"] == b"PWRI"
    assert (f["version"], f["n_tensors"], f["n_kv"]) == (3, 8, 3)
    assert f["kv"] == [
        ("general.architecture", 8, "generic.gpu_index"),
        ("generic.gpu_index.block_count", 4, 4),
        ("split.vram_capacity", 10, 5 * 2**32 + 7),
    ]
    names = [t[0] for t in f["tensors"]]
    assert names == [f"blk.{i}.{k}" for i in range(4) for k in ("gpu_idx", "gpu_bucket")]
    assert all(t[2] == 18 for t in f["tensors"])
    expected_offset = 0
    for (name, dims, _, offset), layer_kind in zip(f["tensors"], range(8), strict=True):
        layer, kind = divmod(layer_kind, 2)
        n = N_FF if kind == 0 else counts[layer]
        assert dims == [n], name
        assert offset == expected_offset and offset % 32 == 0, name
        start = f["data_start"] + offset
        arr = np.frombuffer(data, "<i4", count=n, offset=start)
        if kind == 0:
            assert arr.sum() == counts[layer] and set(np.unique(arr)) <= {0, 1}
            np.testing.assert_array_equal(np.flatnonzero(arr), buckets[layer])
        else:
            np.testing.assert_array_equal(arr, buckets[layer])
            assert (np.diff(arr) > 0).all()
        pad_end = start + (4 * n + 31) // 32 * 32
        assert data[start + 4 * n : pad_end] == b"\0" * (pad_end - start - 4 * n)
        expected_offset += (4 * n + 31) // 32 * 32
    assert data[f["infos_end"] : f["data_start"]] == b"\0" * (f["data_start"] - f["infos_end"])
    assert len(data) == f["data_start"] + expected_offset
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def powerinfer_exporter(
    output_path: Path, activations: list[torch.Tensor], solved: list[int], vram: int
) -> None:
    """PowerInfer's `export_split` as the spec describes it, on upstream gguf with code 18."""
    i32 = GGMLQuantizationType(18)  # PowerInfer's ggml numbers I32 as 18
    gguf_out = GGUFWriter(output_path, "generic.gpu_index")
    for i, (activation, count) in enumerate(zip(activations, solved, strict=True)):
        _, indices = torch.topk(activation, k=int(count))
        gpu_idx = torch.zeros_like(activation)
        gpu_idx[indices] = 1
        gpu_idx = gpu_idx.numpy().astype(np.int32)
        gguf_out.add_tensor(
            f"blk.{i}.gpu_idx", gpu_idx, raw_shape=gpu_idx.shape[::-1], raw_dtype=i32
        )
        gpu_bucket = np.sort(indices.numpy().astype(np.int32))
        gguf_out.add_tensor(
            f"blk.{i}.gpu_bucket", gpu_bucket, raw_shape=gpu_bucket.shape[::-1], raw_dtype=i32
        )
    gguf_out.add_block_count(len(activations))
    gguf_out.add_uint64("split.vram_capacity", vram)
    gguf_out.write_header_to_file()
    gguf_out.write_kv_data_to_file()
    gguf_out.write_tensors_to_file()
    gguf_out.close()
    with open(output_path, "r+b") as fout:
        fout.write(struct.pack("<I", int.from_bytes(b"PWRI", "little")))


def test_byte_for_byte_against_powerinfer_exporter(tmp_path: Path) -> None:
    counts = [8, 0, 24, N_FF, 16, 8, 0, 32, 8, 16, 24, 8]  # 12 layers
    values, buckets = buckets_for(counts, seed=3)  # distinct values: no ties
    write_gpu_index(tmp_path / "porter.gpuidx", buckets, n_ff=N_FF, vram_capacity=24 * 2**30)
    powerinfer_exporter(
        tmp_path / "ref.gpuidx", [torch.from_numpy(v) for v in values], counts, 24 * 2**30
    )
    assert (tmp_path / "porter.gpuidx").read_bytes() == (tmp_path / "ref.gpuidx").read_bytes()


def test_reader_round_trip_and_summary(tmp_path: Path) -> None:
    counts = [3, 0, N_FF, 17]
    values, buckets = buckets_for(counts)
    write_gpu_index(tmp_path / "m.gpuidx", buckets, n_ff=N_FF, vram_capacity=123)
    index = read_gpu_index(tmp_path / "m.gpuidx")
    assert index.magic == b"PWRI" and index.version == 3 and index.vram_capacity == 123
    assert list(index.kv) == [
        "general.architecture",
        "generic.gpu_index.block_count",
        "split.vram_capacity",
    ]
    for layer, entry in enumerate(index.layers):
        np.testing.assert_array_equal(entry.bucket, buckets[layer])
        assert entry.mask.sum() == counts[layer]
    rows = summarize(index, values)
    assert [r.gpu_neurons for r in rows] == counts
    assert rows[1].mass_share == 0.0 and rows[2].mass_share == pytest.approx(1.0)
    assert rows[0].mass_share == pytest.approx(values[0][buckets[0]].sum() / values[0].sum())
    assert summarize(index)[3].mass_share is None


def test_reader_rejects_bad_files(tmp_path: Path) -> None:
    _, buckets = buckets_for([8, 8])
    path = tmp_path / "m.gpuidx"
    write_gpu_index(path, buckets, n_ff=N_FF, vram_capacity=1)
    data = path.read_bytes()
    bad = tmp_path / "bad.gpuidx"
    for content, message in [
        (b"", "too short"),
        (b"XXXX" + data[4:], "magic"),
        (data[: len(data) - 40], "past the end"),
        (data[:60], "truncated"),
    ]:
        bad.write_bytes(content)
        with pytest.raises(CorruptGpuIndex, match=message) as err:
            read_gpu_index(bad)
        assert str(bad) in str(err.value)


def test_write_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "m.gpuidx"
    path.write_bytes(b"old")
    _, buckets = buckets_for([8])
    write_gpu_index(path, buckets, n_ff=N_FF, vram_capacity=1)
    assert read_gpu_index(path).layers[0].bucket.size == 8
    with pytest.raises(Exception, match="bucket"):
        write_gpu_index(path, [np.array([5, 1])], n_ff=N_FF, vram_capacity=2)
    assert read_gpu_index(path).vram_capacity == 1  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gpuidx"]
