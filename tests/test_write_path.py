"""The streaming write path: the NaN/Inf check from exponent bits, written chunk by chunk, and
casts in bounded blocks give the same bytes and counts as whole-tensor torch operations."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from converters import dtypes
from converters.dtypes import BFLOAT16, FLOAT32, INT32, INT64, nonfinite_in
from converters.torch_arrays import from_torch, to_torch
from converters.trtllm import writer as writer_module
from converters.trtllm.convert import _blocks
from converters.trtllm.writer import SafetensorsWriter, TensorSpec

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _edge_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    values = [0.0, -0.0, 1.0, -1.0, info.max, -info.max, info.tiny, info.tiny / 4, -info.tiny / 4]
    special = [float("inf"), float("-inf"), float("nan")]
    return torch.tensor(values + special, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_nonfinite_from_exponent_bits_agrees_with_isfinite(dtype):
    edges = _edge_values(dtype)
    # NaNs with other payloads and the sign bit set: all still NaN
    uint = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    bits = edges.view(uint)
    payload_nans = (
        (bits[-1:] | 1).view(dtype),
        (bits[-1:] | (1 << (8 * dtype.itemsize - 1))).view(dtype),
    )
    randoms = torch.randn(10_000, dtype=torch.float64).mul(1e3).to(dtype)
    data = torch.cat([edges, *payload_nans, randoms])
    expected = int((~torch.isfinite(data)).sum())
    assert expected == 5
    ours = dtypes.named(str(dtype))
    raw = memoryview(data.view(torch.uint8).numpy())
    assert nonfinite_in(raw, ours) == expected
    assert nonfinite_in(memoryview(randoms.view(torch.uint8).numpy()), ours) == 0
    assert nonfinite_in(b"", ours) == 0


def test_integer_dtypes_have_no_nonfinite_values():
    assert nonfinite_in(torch.arange(-5, 5).view(torch.uint8).numpy(), INT64) == 0


def test_writer_counts_nonfinite_across_chunks_and_keeps_the_bytes(tmp_path, monkeypatch):
    """Chunks smaller than the tensor: every NaN/Inf is counted once (none split by a chunk edge),
    and the file and its sha256 are what one whole write gives."""
    monkeypatch.setattr(writer_module, "CHUNK_BYTES", 1001)  # not a multiple of 4 bytes
    data = np.random.default_rng(0).standard_normal((300, 7), dtype=np.float32)
    data[0, 0], data[150, 3], data[299, 6] = float("nan"), float("inf"), float("-inf")
    specs = [TensorSpec("a", (300, 7), FLOAT32), TensorSpec("b", (5,), INT32)]
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, specs) as writer:
        assert writer.write_rows("a", iter([data[:100], data[100:]]), check_nonfinite=True) == 3
        assert writer.write("b", np.arange(5, dtype=np.int32), check_nonfinite=True) == 0
        written = writer.close()
    assert written.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert written.bytes == path.stat().st_size


@pytest.mark.parametrize("add_one", [False, True])
def test_casts_in_row_blocks_equal_the_whole_tensor_cast(monkeypatch, add_one):
    from converters.trtllm import convert

    monkeypatch.setattr(convert, "CONVERT_BYTES", 64)  # several blocks of rows
    source = torch.randn(37, 9, dtype=torch.float32)
    strided = source[:, 2:7]  # a column slice: not contiguous
    for data in (source, strided):
        blocks = list(_blocks(from_torch(data)[0][:, :], FLOAT32, BFLOAT16, add_one))
        assert len(blocks) > 1 and all(b.flags.c_contiguous for b in blocks)
        whole = (data.float() + 1.0).to(torch.bfloat16) if add_one else data.to(torch.bfloat16)
        assert torch.equal(to_torch(np.concatenate(blocks), BFLOAT16), whole)
    # already contiguous in the output dtype: written from where it lies, no copy
    same, _ = from_torch(source.to(torch.bfloat16))
    [block] = list(_blocks(same, BFLOAT16, BFLOAT16, False))
    assert block is same
    copied = list(_blocks(same[:, 1:4], BFLOAT16, BFLOAT16, False))
    assert np.array_equal(np.concatenate(copied), same[:, 1:4])


def test_casts_round_as_torch_does():
    """Every bfloat16 and float16 value, and float32 values across the whole exponent range, cast
    between the three float types (and with the zero-centred +1) give torch's bits; NaN stays
    NaN (its payload may differ: torch itself gives different NaN bits by code path)."""
    rng = np.random.default_rng(0)
    every16 = np.arange(1 << 16, dtype=np.uint16)
    scales = rng.choice(np.array([1e-40, 1e-8, 1.0, 1e5, 1e38], dtype=np.float32), 1 << 18)
    with np.errstate(over="ignore"):  # some of the largest overflow: ±inf, also cast
        widest = rng.standard_normal(1 << 18, dtype=np.float32) * scales
    sources = {
        FLOAT32: widest,
        BFLOAT16: every16,
        dtypes.FLOAT16: every16.view(np.float16),
    }
    for src, values in sources.items():
        for dst in sources:
            for add_one in (False, True):
                ours = to_torch(dtypes.cast(values, src, dst, add_one), dst)
                theirs = to_torch(values, src)
                theirs = (theirs.float() + 1.0).to(ours.dtype) if add_one else theirs.to(ours.dtype)
                nan = torch.isnan(theirs)
                assert torch.equal(torch.isnan(ours), nan), (src, dst, add_one)
                bits = {2: torch.int16, 4: torch.int32}[ours.itemsize]  # -0.0 is not 0.0 here
                assert torch.equal(ours[~nan].view(bits), theirs[~nan].view(bits))
