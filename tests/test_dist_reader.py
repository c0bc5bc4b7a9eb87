"""DistCheckpoint against a real torch_dist checkpoint written by megatron-core (TP=2) on CPU."""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import pickle
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from converters import dtypes
from converters.errors import (
    CorruptCheckpoint,
    NotAMegatronCheckpoint,
    UnsafeCheckpoint,
    UnsupportedModel,
)
from converters.megatron import dcp_metadata
from converters.megatron import dist as dist_mod
from converters.megatron.dist import DistCheckpoint, read_dist_metadata
from converters.torch_arrays import from_torch

pytest.importorskip("megatron.core")

TP = 2
NUM_LAYERS = 2
QKV = "decoder.layers.self_attention.linear_qkv.weight"
EXPECTED_KEYS = {
    "embedding.word_embeddings.weight": (100, 64),
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (2, 64),
    "decoder.layers.self_attention.linear_qkv.weight": (2, 96, 64),
    "decoder.layers.self_attention.linear_proj.weight": (2, 64, 64),
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": (2, 64),
    "decoder.layers.mlp.linear_fc1.weight": (2, 256, 64),
    "decoder.layers.mlp.linear_fc2.weight": (2, 64, 128),
    "decoder.final_layernorm.weight": (64,),
    "output_layer.weight": (100, 64),
}


# ----------------------------------------------------------------------------------------------
# Fixture: a real TP=2 megatron-core GPTModel saved as torch_dist, plus each rank's state_dict.
# ----------------------------------------------------------------------------------------------


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import TransformerConfig

    dist.init_process_group("gloo", rank=rank, world_size=TP)
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    mrandom.CudaRNGStatesTracker.fork = lambda self, *a, **k: contextlib.nullcontext()
    try:
        parallel_state.initialize_model_parallel(TP, 1)
        torch.manual_seed(1234)
        config = TransformerConfig(
            num_layers=NUM_LAYERS,
            hidden_size=64,
            num_attention_heads=8,
            num_query_groups=2,
            ffn_hidden_size=128,
            gated_linear_unit=True,
            activation_func=F.silu,
            normalization="RMSNorm",
            use_cpu_initialization=True,
            add_bias_linear=False,
            tensor_model_parallel_size=TP,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
        )
        model = GPTModel(
            config,
            get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=100,
            max_sequence_length=32,
            position_embedding_type="rope",
        )
        with torch.no_grad():  # distinct, non-trivial norm weights so a mix-up shows
            for name, param in model.named_parameters():
                if "layernorm" in name:
                    param.copy_(torch.randn_like(param))
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save(state, Path(out) / f"rank{rank}.pt")
        ckpt_dir = Path(out) / "iter_0000001"
        if rank == 0:
            ckpt_dir.mkdir()
        dist.barrier()
        args = argparse.Namespace(
            num_layers=NUM_LAYERS, hidden_size=64, tensor_model_parallel_size=TP
        )
        dist_checkpointing.save(
            model.sharded_state_dict() | {"args": args, "iteration": 1}, str(ckpt_dir)
        )
        dist.barrier()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("torch_dist")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=TP, join=True)
    shards = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(TP)]
    return {"dir": out / "iter_0000001", "shards": shards}


@pytest.fixture
def copy(real: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the checkpoint directory, for tests that damage it."""
    return Path(shutil.copytree(real["dir"], tmp_path / "ckpt"))


def _assert_same(got: np.ndarray, want: torch.Tensor, what: Any) -> None:
    """`got` holds exactly `want`'s bits, shape and element type."""
    want_bits, _ = from_torch(want)  # the array a reader returns (bf16 as uint16 bits)
    assert isinstance(got, np.ndarray), what
    assert got.shape == want_bits.shape and got.dtype == want_bits.dtype, what
    assert got.tobytes() == want_bits.tobytes(), what


def _trusted_metadata(path: Path) -> Any:
    """A `.metadata` this test session wrote itself (trusted), unpickled into torch's classes:
    the tests change it and pickle it back."""
    return pickle.loads(path.read_bytes())


def _mapping(array: np.ndarray) -> Any:
    """The object at the end of `array`'s `.base` chain (a memoryview's underlying object)."""
    base: Any = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def _merged(shards: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    """The stacked global tensor built from per-rank, per-layer legacy shards."""
    layers = []
    for i in range(NUM_LAYERS):
        if key.endswith("linear_qkv.layer_norm_weight"):
            layers.append(shards[0][f"decoder.layers.{i}.input_layernorm.weight"])
            continue
        if key.endswith("linear_fc1.layer_norm_weight"):
            layers.append(shards[0][f"decoder.layers.{i}.pre_mlp_layernorm.weight"])
            continue
        name = key.replace("decoder.layers.", f"decoder.layers.{i}.")
        parts = [s[name] for s in shards]
        if "linear_qkv" in key:
            layers.append(torch.cat(parts, 0))
        elif "linear_proj" in key or "linear_fc2" in key:
            layers.append(torch.cat(parts, 1))
        elif "linear_fc1" in key:  # each shard is [gate_r; up_r]
            halves = [p.chunk(2, 0) for p in parts]
            layers.append(torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0))
        else:
            raise AssertionError(key)
    return torch.stack(layers)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def test_keys_and_shapes(real: dict[str, Any]) -> None:
    ckpt = DistCheckpoint(real["dir"])
    assert set(ckpt.keys()) == set(EXPECTED_KEYS)
    for key, shape in EXPECTED_KEYS.items():
        assert ckpt.shape(key) == shape
        assert ckpt.tensor(key).shape == shape
        assert ckpt.dtype(key) is dtypes.FLOAT32
        assert ckpt.tensor(key).dtype is dtypes.FLOAT32
    with pytest.raises(KeyError):
        ckpt.shape("decoder.layers.self_attention.linear_proj._extra_state/shard_0_2")


def test_one_chunk_per_layer_per_tp_shard(real: dict[str, Any]) -> None:
    ckpt = DistCheckpoint(real["dir"])
    chunks = ckpt.tensor(QKV).chunks  # type: ignore[attr-defined]
    assert len(chunks) == NUM_LAYERS * TP
    assert sorted(c.offsets for c in chunks) == [(0, 0, 0), (0, 48, 0), (1, 0, 0), (1, 48, 0)]
    assert all(c.sizes == (1, 48, 64) for c in chunks)
    # Gated fc1: each rank stores its gate and up halves as separate chunks.
    assert len(ckpt.tensor("decoder.layers.mlp.linear_fc1.weight").chunks) == 2 * NUM_LAYERS * TP  # type: ignore[attr-defined]


def test_stacked_tensors_equal_merged_tp_shards(real: dict[str, Any]) -> None:
    ckpt = DistCheckpoint(real["dir"])
    shards = real["shards"]
    names = ckpt.keys()
    for key in names:
        got = ckpt.tensor(key).materialize()
        if key.startswith("decoder.layers."):
            want = _merged(shards, key)
        elif key == "decoder.final_layernorm.weight":
            want = shards[0][key]
            assert torch.equal(shards[1][key], want)
        else:  # vocab-parallel embedding / output layer
            want = torch.cat([s[key] for s in shards], 0)
        _assert_same(got, want, key)


def test_matches_torch_dcp_loader(real: dict[str, Any]) -> None:
    """Cross-check against torch.distributed.checkpoint's own reader (single process)."""
    import torch.distributed.checkpoint as dcp

    ckpt = DistCheckpoint(real["dir"])
    names = ckpt.keys()
    state = {k: torch.empty(ckpt.shape(k), dtype=getattr(torch, ckpt.dtype(k).name)) for k in names}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized"
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(real["dir"])), no_dist=True)
    for key in names:
        _assert_same(ckpt.tensor(key).materialize(), state[key], key)


def test_narrow_reads_only_overlapping_chunks(
    real: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = DistCheckpoint(real["dir"])
    full_lazy = ckpt.tensor(QKV)
    full = full_lazy.materialize()

    read: list[Any] = []
    real_read = dist_mod._read_chunk

    def spy(chunk: Any, key: str, dtype: dtypes.DType, loaded: dict) -> np.ndarray:
        read.append(chunk)
        return real_read(chunk, key, dtype, loaded)

    monkeypatch.setattr(dist_mod, "_read_chunk", spy)

    # Rows 8..24 of layer 1 lie inside TP shard 0: one chunk of four.
    region = full_lazy.index0(1).narrow(0, 8, 16)
    assert region.shape == (16, 64)
    assert region.source_nbytes < full_lazy.source_nbytes / 3
    assert np.array_equal(region.materialize(), full[1, 8:24])
    assert [c.offsets for c in read] == [(1, 0, 0)]
    assert sum(c.length for c in read) == region.source_nbytes

    # Rows 40..56 straddle both TP shards of layer 0: two chunks, each read once.
    read.clear()
    region = full_lazy.index0(0).narrow(0, 40, 16).narrow(1, 3, 5)
    assert np.array_equal(region.materialize(), full[0, 40:56, 3:8])
    assert sorted(c.offsets for c in read) == [(0, 0, 0), (0, 48, 0)]
    assert region.source_nbytes == sum(c.length for c in read)

    # An empty slice reads nothing.
    read.clear()
    empty = full_lazy.narrow(1, 10, 0)
    assert empty.source_nbytes == 0
    assert empty.materialize().shape == (2, 0, 64)
    assert read == []


def test_element_types_read_bit_exact(tmp_path: Path) -> None:
    """bfloat16 (as uint16 bits: NaN, ±inf, -0, subnormals kept), float16, int64 and a
    transposed (strided) chunk, saved by torch.distributed.checkpoint itself."""
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), -float("inf"), float("inf"), -0.0, 1e-40, 3.0e38])
    state = {
        "bf16": torch.cat([special, torch.randn(58, generator=g)]).reshape(8, 8).bfloat16(),
        "transposed": torch.randn(6, 10, generator=g).bfloat16().t(),
        "f16": torch.randn(3, 5, generator=g).half(),
        "i64": torch.arange(12).reshape(3, 4),
    }
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized"
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    (tmp_path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    ckpt = DistCheckpoint(tmp_path)
    for key, tensor in state.items():
        assert ckpt.dtype(key) is dtypes.named(str(tensor.dtype)), key
        _assert_same(ckpt.tensor(key).materialize(), tensor, key)
        _assert_same(ckpt.tensor(key).narrow(1, 1, 2).materialize(), tensor[:, 1:3], key)


def test_narrow_gated_fc1_and_row_parallel(real: dict[str, Any]) -> None:
    ckpt = DistCheckpoint(real["dir"])
    for key, dim in [
        ("decoder.layers.mlp.linear_fc1.weight", 0),
        ("decoder.layers.mlp.linear_fc2.weight", 1),
    ]:
        lazy = ckpt.tensor(key)
        full = lazy.materialize()
        size = lazy.shape[dim + 1]
        for start, length in [(0, size // 4), (size // 4, size // 2), (size - 7, 7)]:
            got = lazy.index0(1).narrow(dim, start, length).materialize()
            want = (
                full[1, start : start + length] if dim == 0 else full[1, :, start : start + length]
            )
            assert np.array_equal(got, want), (key, start, length)


def test_common_returns_args(real: dict[str, Any]) -> None:
    ckpt = DistCheckpoint(real["dir"])
    assert isinstance(ckpt.common["args"], argparse.Namespace)
    assert ckpt.common["args"].num_layers == NUM_LAYERS
    assert ckpt.common["args"].tensor_model_parallel_size == TP
    assert ckpt.common["iteration"] == 1


def test_real_metadata_read_into_stand_ins_holds_what_torch_reads(real: dict[str, Any]) -> None:
    """Every global of a real `.metadata` is allow-listed, and the inert stand-ins hold the same
    chunks, storage entries and element types as torch's own classes."""
    path = real["dir"] / ".metadata"
    md = read_dist_metadata(path)
    want = _trusted_metadata(path)
    assert isinstance(md, dcp_metadata.Metadata)
    assert md.state_dict_metadata.keys() == want.state_dict_metadata.keys()
    assert QKV in md.state_dict_metadata
    for key, entry in want.state_dict_metadata.items():
        got = md.state_dict_metadata[key]
        assert type(got).__name__ == type(entry).__name__, key
        if type(entry).__name__ != "TensorStorageMetadata":
            continue
        assert got.size == tuple(entry.size), key
        assert got.properties.dtype is dtypes.named(str(entry.properties.dtype)), key
        assert [(c.offsets, c.sizes) for c in got.chunks] == [
            (tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks
        ], key
    stored = {
        (i.fqn, i.offset and tuple(i.offset)): (s.relative_path, s.offset, s.length)
        for i, s in want.storage_data.items()
    }
    assert {
        (i.fqn, i.offset): (s.relative_path, s.offset, s.length) for i, s in md.storage_data.items()
    } == stored
    assert len(stored) > len(EXPECTED_KEYS)


def test_reading_tensors_imports_no_torch(real: dict[str, Any]) -> None:
    """A conversion process reads a torch_dist checkpoint (metadata, common.pt, every tensor)
    without importing torch."""
    script = (
        "import sys\n"
        "from converters.megatron.dist import DistCheckpoint\n"
        f"ckpt = DistCheckpoint({str(real['dir'])!r})\n"
        "assert ckpt.common['iteration'] == 1\n"
        "total = sum(int(ckpt.tensor(k).materialize().size) for k in ckpt.keys())\n"
        "print(total, sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    total = sum(int(np.prod(shape)) for shape in EXPECTED_KEYS.values())
    assert result.stdout.split() == [str(total), "[]"]


def test_region_inside_one_chunk_is_a_view_of_the_mapping(real: dict[str, Any]) -> None:
    ckpt = DistCheckpoint(real["dir"])
    lazy = ckpt.tensor(QKV)
    region = lazy.index0(1).narrow(0, 8, 16).narrow(1, 4, 32)  # inside TP shard 0 of layer 1
    assert len(region.inner.chunks) == 1  # type: ignore[attr-defined]
    got = region.materialize()
    assert isinstance(_mapping(got), mmap.mmap)  # no copy: a view of the mapped .distcp
    assert not got.flags.writeable
    whole = lazy.index0(1).narrow(0, 0, 48).materialize()  # the whole chunk: a view of it too
    assert isinstance(_mapping(whole), mmap.mmap) and np.shares_memory(got, whole)
    _assert_same(got, _merged(real["shards"], QKV)[1, 8:24, 4:36], QKV)
    # Straddling both TP shards: a new array of its own, filled from the two chunks.
    both = lazy.index0(1).narrow(0, 40, 16).materialize()
    assert isinstance(_mapping(both), np.ndarray)  # owns its memory (mapped by no file)
    assert both.flags.writeable and both.flags.c_contiguous
    assert not np.shares_memory(both, whole)


# ----------------------------------------------------------------------------------------------
# Safety and damaged checkpoints
# ----------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "inside-real-metadata"])
def test_malicious_metadata_is_refused(copy: Path, tmp_path: Path, nested: bool) -> None:
    marker = tmp_path / "pwned"
    payload: Any = _Payload(marker)
    if nested:
        md = _trusted_metadata(copy / ".metadata")
        md.planner_data = {"x": payload}
        payload = md
    (copy / ".metadata").write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpoint) as err:
        DistCheckpoint(copy)
    assert ".metadata" in str(err.value)
    assert "system" in str(err.value)  # the refused global (posix.system) is named
    assert not marker.exists()


def test_malicious_chunk_is_refused(copy: Path, tmp_path: Path) -> None:
    """A chunk's storage entry pointed at a code-running torch.save blob appended to its file."""
    marker = tmp_path / "pwned"
    blob = tmp_path / "blob.pt"
    torch.save({"x": _Payload(marker), "pad": torch.zeros(48 * 64)}, blob)  # as long as a chunk
    md = _trusted_metadata(copy / ".metadata")
    index = next(i for i in md.storage_data if i.fqn == QKV and i.offset)
    info = md.storage_data[index]
    data = copy / info.relative_path
    info.offset, info.length = data.stat().st_size, blob.stat().st_size
    with data.open("ab") as f:
        f.write(blob.read_bytes())
    (copy / ".metadata").write_bytes(pickle.dumps(md))
    ckpt = DistCheckpoint(copy)
    with pytest.raises(UnsafeCheckpoint, match="system") as err:
        ckpt.tensor(QKV).materialize()
    assert f"{data}: chunk of {QKV} at offsets {list(index.offset)}" in str(err.value)
    assert "nothing from the file was executed" in str(err.value)
    assert not marker.exists()


def test_truncated_distcp_is_reported_at_open(copy: Path) -> None:
    target = copy / "__0_0.distcp"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(CorruptCheckpoint, match="truncated") as err:
        DistCheckpoint(copy)
    assert "__0_0.distcp" in str(err.value)
    assert any(key in str(err.value) for key in EXPECTED_KEYS)


def test_truncated_after_open_is_reported_at_read(copy: Path) -> None:
    ckpt = DistCheckpoint(copy)
    chunk = max(ckpt.tensor(QKV).chunks, key=lambda c: c.offset)  # type: ignore[attr-defined]
    with chunk.file.open("r+b") as f:
        f.truncate(chunk.offset + 10)
    with pytest.raises(CorruptCheckpoint) as err:
        ckpt.tensor(QKV).materialize()
    assert chunk.file.name in str(err.value)
    assert QKV in str(err.value)


def test_chunk_not_matching_metadata(copy: Path) -> None:
    md = _trusted_metadata(copy / ".metadata")
    md.state_dict_metadata[QKV].properties.dtype = torch.float16
    (copy / ".metadata").write_bytes(pickle.dumps(md))
    ckpt = DistCheckpoint(copy)
    assert ckpt.dtype(QKV) is dtypes.FLOAT16
    with pytest.raises(CorruptCheckpoint, match="metadata says") as err:
        ckpt.tensor(QKV).index0(0).materialize()
    assert ".distcp" in str(err.value)
    assert QKV in str(err.value)
    assert "holds float32[1, 48, 64] but the metadata says float16[1, 48, 64]" in str(err.value)


def test_element_type_porter_does_not_convert(copy: Path) -> None:
    md = _trusted_metadata(copy / ".metadata")
    md.state_dict_metadata[QKV].properties.dtype = torch.float8_e4m3fn
    (copy / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UnsupportedModel, match=r"torch\.float8_e4m3fn") as err:
        DistCheckpoint(copy)
    assert QKV in str(err.value) and ".metadata" in str(err.value)


def _sizes_a_str(md: Any) -> None:
    md.state_dict_metadata[QKV].chunks[0].sizes = "48"


def _no_properties(md: Any) -> None:
    md.state_dict_metadata[QKV].properties = None


def _name_not_a_str(md: Any) -> None:
    md.state_dict_metadata[7] = md.state_dict_metadata.pop(QKV)


def _index_without_name(md: Any) -> None:
    index = next(i for i in md.storage_data if i.fqn == QKV and i.offset)
    md.storage_data[type(index)(None, index.offset)] = md.storage_data.pop(index)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_sizes_a_str, "a chunk size of .* is a str, not a list of integers"),
        (_no_properties, "has a dtype that is a NoneType, not a torch dtype"),
        (_name_not_a_str, "a tensor name is a int"),
        (_index_without_name, "no storage entry for the chunk of"),
    ],
)
def test_garbled_metadata_fields_are_refused(copy: Path, change: Any, reason: str) -> None:
    """Fields of the wrong type in a well-formed pickle: a CorruptCheckpoint naming .metadata
    (not a TypeError from deep inside the reader)."""
    md = _trusted_metadata(copy / ".metadata")
    change(md)
    (copy / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CorruptCheckpoint, match=reason) as err:
        DistCheckpoint(copy)
    assert ".metadata" in str(err.value)


def test_garbled_chunk_bytes(copy: Path) -> None:
    ckpt = DistCheckpoint(copy)
    chunk = ckpt.tensor(QKV).chunks[0]  # type: ignore[attr-defined]
    with chunk.file.open("r+b") as f:
        f.seek(chunk.offset)
        f.write(b"\0" * 64)
    with pytest.raises(CorruptCheckpoint) as err:
        ckpt.tensor(QKV).materialize()
    assert chunk.file.name in str(err.value)
    assert QKV in str(err.value)


def test_missing_distcp(copy: Path) -> None:
    (copy / "__1_1.distcp").unlink()
    with pytest.raises(CorruptCheckpoint, match="missing") as err:
        DistCheckpoint(copy)
    assert "__1_1.distcp" in str(err.value)


def test_missing_metadata(copy: Path) -> None:
    (copy / ".metadata").unlink()
    with pytest.raises(CorruptCheckpoint, match="missing") as err:
        DistCheckpoint(copy)
    assert ".metadata" in str(err.value)


def test_truncated_metadata(copy: Path) -> None:
    data = (copy / ".metadata").read_bytes()
    (copy / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint) as err:
        DistCheckpoint(copy)
    assert ".metadata" in str(err.value)


def test_not_a_torch_dist_directory(copy: Path, tmp_path: Path) -> None:
    with pytest.raises(NotAMegatronCheckpoint):
        DistCheckpoint(tmp_path / "nowhere")
    (copy / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(NotAMegatronCheckpoint, match="sharded_backend is not supported") as err:
        DistCheckpoint(copy)
    assert "metadata.json" in str(err.value)
    (copy / "metadata.json").unlink()
    with pytest.raises(NotAMegatronCheckpoint):
        DistCheckpoint(copy)


def test_storage_path_outside_directory_is_refused(copy: Path) -> None:
    md = _trusted_metadata(copy / ".metadata")
    for info in md.storage_data.values():
        info.relative_path = "../" + info.relative_path
    (copy / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UnsafeCheckpoint, match="outside"):
        DistCheckpoint(copy)
