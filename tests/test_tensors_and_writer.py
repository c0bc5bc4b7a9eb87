"""Lazy tensors, re-shard rules and the streaming safetensors writer, on small explicit tensors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors import safe_open

from converters.dtypes import FLOAT16, FLOAT32
from converters.errors import IncompatibleParallelism
from converters.model import ModelConfig
from converters.tensors import Concat, Eager, Zeros, narrow
from converters.torch_arrays import from_torch
from converters.trtllm import reshard
from converters.trtllm.writer import SafetensorsWriter, TensorSpec

CFG = ModelConfig(
    num_layers=1, hidden_size=4, ffn_hidden_size=8, num_attention_heads=8, num_query_groups=2,
    kv_channels=2, vocab_size=10, max_position_embeddings=16, normalization="RMSNorm",
    norm_epsilon=1e-5, apply_layernorm_1p=False, activation="silu", gated_mlp=True,
    position_embedding_type="rope", rotary_base=10000.0, rotary_percent=1.0, tied_embeddings=False,
    add_bias_linear=False, add_qkv_bias=False, dtype="float32",
)  # fmt: skip


class CountingEager(Eager):
    """An Eager leaf that records how many elements were materialized from it."""

    read = 0

    def narrow(self, dim, start, length):
        return CountingEager(narrow(self.array, dim, start, length), self.dtype)

    def materialize(self):
        CountingEager.read += self.array.size
        return self.array


def _eager(tensor: torch.Tensor) -> Eager:
    return Eager(*from_torch(tensor))


def test_concat_narrow_reads_only_overlapping_parts():
    parts = [np.arange(12.0, dtype=np.float32).reshape(3, 4) + 100 * i for i in range(4)]
    lazy = Concat([CountingEager(p, FLOAT32) for p in parts], 0)
    CountingEager.read = 0
    got = lazy.narrow(0, 4, 4).materialize()
    assert np.array_equal(got, np.concatenate(parts)[4:8])
    assert CountingEager.read == 16  # rows 4..7 live in parts 1 and 2 only
    assert lazy.narrow(1, 1, 2).materialize().shape == (12, 2)


def test_zero_padding_costs_no_reads():
    padded = reshard.pad_rows(_eager(torch.ones(5, 3)), 8)
    assert padded.shape == (8, 3)
    assert padded.source_nbytes == 5 * 3 * 4
    tail = padded.narrow(0, 6, 2)
    assert tail.source_nbytes == 0 and np.array_equal(tail.materialize(), np.zeros((2, 3)))


def _megatron_qkv(cfg: ModelConfig) -> torch.Tensor:
    """A QKV weight whose every row says what it is: group*1000 + kind*100 + head*10 + row."""
    q, d, h = cfg.heads_per_group, cfg.kv_channels, cfg.hidden_size
    rows = []
    for g in range(cfg.num_query_groups):
        for kind, count in ((0, q), (1, 1), (2, 1)):
            for head in range(count):
                for r in range(d):
                    rows.append(torch.full((h,), float(g * 1000 + kind * 100 + head * 10 + r)))
    return torch.stack(rows)


@pytest.mark.parametrize("parts", [1, 2, 4, 8])
def test_qkv_for_rank_follows_spec(parts):
    cfg, qkv = CFG, _megatron_qkv(CFG)
    q, d, ng, nh = (
        cfg.heads_per_group,
        cfg.kv_channels,
        cfg.num_query_groups,
        cfg.num_attention_heads,
    )
    for rank in range(parts):
        got = reshard.qkv_for_rank(_eager(qkv), cfg, rank, parts).materialize()[:, 0]
        heads = range(rank * nh // parts, (rank + 1) * nh // parts)
        groups = (
            range(rank * ng // parts, (rank + 1) * ng // parts)
            if ng >= parts
            else [rank * ng // parts]
        )
        expected = [(h // q) * 1000 + (h % q) * 10 + r for h in heads for r in range(d)]
        expected += [g * 1000 + 100 + r for g in groups for r in range(d)]
        expected += [g * 1000 + 200 + r for g in groups for r in range(d)]
        assert got.tolist() == [float(v) for v in expected]
        assert got.shape[0] == (nh // parts + 2 * max(1, ng // parts)) * d


def test_incompatible_tp_is_a_clear_error():
    with pytest.raises(
        IncompatibleParallelism, match="num_attention_heads=8 is not divisible by the target TP=3"
    ):
        reshard.check_attention_split(CFG, 3)
    six_groups = dataclasses.replace(CFG, num_attention_heads=12, num_query_groups=6)
    with pytest.raises(IncompatibleParallelism, match="num_query_groups=6"):
        reshard.check_attention_split(six_groups, 4)


def test_writer_round_trip_and_state_machine(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.float32)}
    arrays = {n: from_torch(t) for n, t in tensors.items()}
    specs = [TensorSpec(n, tuple(a.shape), dtype) for n, (a, dtype) in arrays.items()]
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, specs, {"format": "pt"}) as writer:
        with pytest.raises(RuntimeError, match="expected tensor a next"):
            writer.write("b", arrays["b"][0])
        writer.write("a", arrays["a"][0])
        with pytest.raises(RuntimeError, match="declared"):
            writer.write("b", arrays["b"][0][:3])
        with pytest.raises(RuntimeError, match="declared"):  # float64 bits for float32
            writer.write("b", arrays["b"][0].astype(np.float64))
        writer.write("b", arrays["b"][0])
        written = writer.close()
    assert written.bytes == path.stat().st_size
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)


def test_writer_refuses_to_finish_early(tmp_path):
    specs = [TensorSpec("a", (2,), FLOAT32), TensorSpec("b", (2,), FLOAT32)]
    writer = SafetensorsWriter(tmp_path / "y.safetensors", specs)
    writer.write("a", np.zeros(2, dtype=np.float32))
    with pytest.raises(RuntimeError, match="only 1 of 2"):
        writer.close()


def test_zeros_concat_dtype_mismatch_is_refused():
    with pytest.raises(ValueError, match="mixed dtypes"):
        Concat([_eager(torch.ones(2)), Zeros((2,), FLOAT16)], 0)


def test_writer_streams_a_tensor_in_row_blocks(tmp_path):
    """A merged vocab embedding is written part by part (never joined in memory): same bytes."""
    whole = np.random.default_rng(0).standard_normal((10, 4), dtype=np.float32)
    specs = [TensorSpec("e", (10, 4), FLOAT32)]
    with SafetensorsWriter(tmp_path / "parts.safetensors", specs) as writer:
        writer.write_rows("e", iter([whole[:3], whole[3:]]))
        parts = writer.close()
    with SafetensorsWriter(tmp_path / "whole.safetensors", specs) as writer:
        writer.write("e", whole)
        assert writer.close().sha256 == parts.sha256
    with SafetensorsWriter(tmp_path / "bad.safetensors", specs) as writer:
        with pytest.raises(RuntimeError, match="has 3 rows"):
            writer.write_rows("e", [whole[:3]])
        with pytest.raises(RuntimeError, match="only 0 of 1"):
            writer.close()
