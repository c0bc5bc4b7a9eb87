"""converters.torch_zip against torch itself: archives written by torch.save and by megatron-core
read without torch, bit for bit; hostile archives refused with nothing executed or allocated."""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from converters import torch_zip
from converters.errors import CorruptCheckpoint, UnsafeCheckpoint
from converters.megatron import safe_load as megatron_safe_load
from converters.megatron.example import Layout
from converters.megatron.safe_load import MegatronStub
from converters.safe_load import load_pt
from converters.torch_zip import StoredTensor, load

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# The oracle: torch.load's tree, compared leaf by leaf
# ----------------------------------------------------------------------------------------------


def storage_bytes(tensor: torch.Tensor) -> bytes:
    """The whole storage of `tensor`, as bytes."""
    whole = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
    return whole.numpy().tobytes()


def assert_same_tensor(got: StoredTensor, ref: torch.Tensor, file: Path) -> None:
    ref = ref.detach()
    assert isinstance(got, StoredTensor), type(got)
    assert got.file == file
    assert f"torch.{got.dtype}" == str(ref.dtype)
    assert got.shape == tuple(ref.shape) and got.stride == ref.stride()
    assert got.storage_offset == ref.storage_offset()
    array = got.array()
    assert array.shape == tuple(ref.shape) and not array.flags.writeable
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ref.element_size()]
    expected = ref.view(bits).numpy() if ref.dtype != torch.bool else ref.numpy()
    np.testing.assert_array_equal(array.view(expected.dtype), expected)
    span = got.byte_range()
    if ref.numel() == 0:
        assert span is None and got.nbytes == 0
        return
    last = ref.storage_offset() + sum(
        (n - 1) * s for n, s in zip(ref.shape, ref.stride(), strict=True)
    )
    first, end = ref.storage_offset() * ref.element_size(), (last + 1) * ref.element_size()
    with open(file, "rb") as f:
        f.seek(span[0])
        on_disk = f.read(span[1] - span[0])
    assert on_disk == storage_bytes(ref)[first:end]
    assert got.nbytes == ref.numel() * ref.element_size()


def assert_same(got: Any, ref: Any, file: Path, at: str = "") -> None:
    """`got` (torch_zip.load) is `ref` (torch.load) with StoredTensor for each tensor."""
    if isinstance(ref, torch.Tensor):
        assert_same_tensor(got, ref, file)
    elif isinstance(ref, torch.dtype):
        assert f"torch.{got}" == str(ref), at
    elif isinstance(ref, dict):
        assert type(got) is type(ref) and list(got) == list(ref), at
        for key in ref:
            assert_same(got[key], ref[key], file, f"{at}/{key}")
    elif isinstance(ref, list | tuple):  # torch.Size reads as a tuple
        assert isinstance(got, tuple if isinstance(ref, tuple) else list) and len(got) == len(ref)
        for i, (g, r) in enumerate(zip(got, ref, strict=True)):
            assert_same(g, r, file, f"{at}/{i}")
    elif isinstance(ref, argparse.Namespace):
        assert isinstance(got, argparse.Namespace)
        assert_same(vars(got), vars(ref), file, at)
    elif isinstance(ref, io.BytesIO):
        assert got.getvalue() == ref.getvalue(), at
    elif isinstance(ref, np.ndarray):
        np.testing.assert_array_equal(got, ref)
    elif type(ref).__module__.startswith("megatron."):
        assert isinstance(got, MegatronStub), at
    else:
        assert got == ref and type(got) is type(ref), at


# ----------------------------------------------------------------------------------------------
# Archives written by torch.save
# ----------------------------------------------------------------------------------------------

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.bool]


def sample(dtype: torch.dtype) -> dict[str, Any]:
    """Every shape of tensor a checkpoint holds, in `dtype`."""
    base = torch.arange(-30, 30).to(dtype) if dtype != torch.bool else torch.arange(60) % 3 == 0
    grid = base[:48].reshape(6, 8)
    with_attribute = base[:5].clone()
    with_attribute.partition_dim = 0  # saved through _rebuild_from_type_v2
    return {
        "whole": base,
        "view_with_offset": base[7:19],  # shares base's storage, at an offset
        "transposed": grid.t(),
        "strided": grid[1::2, ::3],
        "scalar": base[5].clone().reshape(()),
        "scalar_view": base[9],  # 0-d, offset 9 into the shared storage
        "empty": base[:0],
        "empty_2d": torch.empty(0, 4, dtype=dtype),
        "param": torch.nn.Parameter(base[:6].clone(), requires_grad=False),
        "attribute": with_attribute,
        "nested": collections.OrderedDict(a=[grid[2], (grid[:, 1], {"k": base[40:]})]),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_save_archives_read_as_torch_reads_them(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "x.pt"
    tree = sample(dtype)
    tree["args"] = argparse.Namespace(params_dtype=dtype, fp16=False, layers=[1, 2], name="x")
    tree["sizes"] = torch.Size([2, 3])
    tree["extra"] = io.BytesIO(b"\x00te-extra-state\xff")
    tree["rng"] = np.random.RandomState(3).get_state()
    tree["misc"] = {"b": b"bytes", "e": b"", "s": {1, 2}, "f": 1.5, "n": None, "c": 1 + 2j}
    torch.save(tree, path)
    got = load_pt(path)
    assert_same(got, torch.load(path, weights_only=False), path)
    # one memory map per file, shared by every tensor of it
    assert got["whole"].array().base is got["transposed"].array().base


def test_load_reads_only_directory_headers_and_small_records(tmp_path: Path, monkeypatch) -> None:
    """The S3 mirror fetches the zip directory, the 30-byte local headers and the non-storage
    records only: load must read nothing else (tensor bytes are read when touched)."""
    path = tmp_path / "x.pt"
    torch.save({"w": torch.randn(64, 64), "b": torch.randn(64)}, path)
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        infos, directory = archive.infolist(), archive.start_dir
    allowed = [(directory, size)] + [(i.header_offset, i.header_offset + 30) for i in infos]
    records = torch_zip.check_torch_zip(path, path)
    allowed += [(r.offset, r.offset + r.nbytes) for n, r in records.items() if "/data/" not in n]
    reads: list[tuple[int, int]] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append((offset, offset + n))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(torch_zip.os, "pread", pread)
    got = load(path)
    assert reads and got["w"].shape == (64, 64)
    outside = [r for r in reads if not any(a <= r[0] and r[1] <= b for a, b in allowed)]
    assert outside == [], (outside, allowed)


def test_no_torch_in_a_process_that_loads_and_reads(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save(
        {"w": torch.arange(6, dtype=torch.bfloat16), "a": argparse.Namespace(d=torch.half)}, path
    )
    code = (
        "import sys; from pathlib import Path; from converters.safe_load import load_pt; "
        f"x = load_pt(Path({str(path)!r})); assert x['w'].array().tolist() == "
        f"{torch.arange(6, dtype=torch.bfloat16).view(torch.int16).tolist()}; "
        "assert x['a'].d.name == 'float16'; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------------------------
# Real Megatron checkpoints (megatron-core, session fixtures)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["llama", "llama_te_bf16"])
def test_legacy_rank_files_read_as_torch_reads_them(megatron, fixture: str) -> None:
    root = megatron(fixture).paths[Layout("legacy", 2, 1)]
    files = sorted(root.rglob("model_optim_rng.pt"))
    assert len(files) == 2
    for path in files:
        got = megatron_safe_load.load_pt(path)
        assert_same(got, torch.load(path, weights_only=False), path)


def test_torch_dist_chunks_read_with_a_span_as_torch_reads_them(megatron) -> None:
    iteration = next(megatron("llama").paths[Layout("torch_dist", 2, 1)].glob("iter_*"))
    common = iteration / "common.pt"
    assert_same(megatron_safe_load.load_pt(common), torch.load(common, weights_only=False), common)
    metadata = pickle.loads((iteration / ".metadata").read_bytes())  # trusted: this session's
    chunks = list(metadata.storage_data.values())
    assert chunks
    for info in chunks:
        file = iteration / info.relative_path
        with open(file, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        span = (info.offset, info.offset + info.length)
        got = megatron_safe_load.load_pt(file, span=span)
        ref = torch.load(io.BytesIO(blob), weights_only=True)
        if isinstance(ref, torch.Tensor):
            assert span[0] <= got.byte_range()[0] and got.byte_range()[1] <= span[1]
        assert_same(got, ref, file)


# ----------------------------------------------------------------------------------------------
# Hostile archives
# ----------------------------------------------------------------------------------------------


def rezip(source: Path, dest: Path, change=lambda name, data: data, deflate: str = "") -> None:
    """`source`'s records into `dest` (stored), each through `change`; `deflate` names one record
    to store compressed instead."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(dest, "w") as out:
        for info in original.infolist():
            method = zipfile.ZIP_DEFLATED if deflate and info.filename.endswith(deflate) else 0
            out.writestr(info.filename, change(info.filename, original.read(info)), method)


def test_rezipped_archive_still_reads(tmp_path: Path) -> None:
    """Control for the cases below: rezip alone keeps the archive loadable."""
    torch.save({"w": torch.arange(8.0)}, tmp_path / "a.pt")
    rezip(tmp_path / "a.pt", tmp_path / "b.pt")
    assert load(tmp_path / "b.pt")["w"].array().tolist() == list(range(8))


def test_compressed_record_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1000)}, tmp_path / "a.pt")
    for record in ("data.pkl", "data/0"):
        rezip(tmp_path / "a.pt", tmp_path / "b.pt", deflate=record)
        with pytest.raises(CorruptCheckpoint, match="is compressed"):
            load_pt(tmp_path / "b.pt")


def test_record_claiming_bytes_past_the_end_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
        directory = archive.start_dir
    at = data.index(b"PK\x01\x02", directory)
    while data[at + 46 : at + 46 + len(info.filename)] != info.filename.encode():
        at = data.index(b"PK\x01\x02", at + 4)
    data[at + 20 : at + 28] = (10**9).to_bytes(4, "little") * 2  # compressed and file sizes
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="past the end"):
        load_pt(path)


def test_truncated_storage_record_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.arange(1000.0)}, tmp_path / "a.pt")
    half = lambda name, data: data[: len(data) // 2] if "/data/" in name else data  # noqa: E731
    rezip(tmp_path / "a.pt", tmp_path / "b.pt", half)
    with pytest.raises(CorruptCheckpoint, match="w claims more elements than its storage record"):
        load_pt(tmp_path / "b.pt")


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    torch.save({"w": torch.arange(1000.0)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpoint, match=r"not a torch zip archive|zip directory"):
        load_pt(path)


class _Storage:
    def __init__(self, numel: int, kind: Any = torch.FloatStorage) -> None:
        self.numel, self.kind = numel, kind


class _View:
    """Pickles as torch.save pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride)."""

    def __init__(self, storage: _Storage, offset: int, size: Any, stride: Any) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", obj.kind, "0", "cpu", obj.numel)
        return None


def forge(
    path: Path, tree: Any, storage_bytes: bytes = bytes(64), order: bytes = b"little"
) -> None:
    """A torch.save archive of `tree` (with _View leaves over storage record 0) written as
    torch writes one."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(tree)
    writer = torch._C.PyTorchFileWriter(str(path))
    records = [("data.pkl", buf.getvalue()), ("byteorder", order), ("data/0", storage_bytes),
               ("version", b"3\n")]  # fmt: skip
    for name, data in records:
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()


def test_forged_archive_reads_as_torch_reads_it(tmp_path: Path) -> None:
    """Control: the forging helpers make archives torch and Porter both read."""
    path = tmp_path / "a.pt"
    forge(path, {"w": _View(_Storage(16), 2, (3, 4), (4, 1))})
    assert_same(load_pt(path), torch.load(path, weights_only=True), path)


@pytest.mark.parametrize(
    ("view", "message"),
    [
        (
            _View(_Storage(16), 0, (5, 4), (4, 1)),
            "w has shape .*reaching element 19 of a storage of 16",
        ),
        (_View(_Storage(16), 13, (4,), (1,)), "reaching element 16"),
        (_View(_Storage(16), 15, (2,), (-1,)), "negative"),
        (_View(_Storage(16), 0, (-4,), (1,)), "negative"),
        (_View(_Storage(16), -1, (4,), (1,)), "negative"),
        (_View(_Storage(16), 0, (4, 4), (1,)), "2 sizes but 1 strides"),
        (_View(_Storage(1), 0, (10**6, 10**6), (0, 0)), "expanded"),
        (_View(_Storage(10**12), 0, (10**12,), (1,)), "claims more elements than its storage"),
        (_View(_Storage(16, torch.DoubleStorage), 0, (16,), (1,)), "claims more elements"),
        (_View(_Storage(16), 0, (4.0,), (1,)), "not a sequence of integers"),
    ],
)
def test_views_outside_their_storage_are_refused(tmp_path: Path, view: _View, message: str) -> None:
    path = tmp_path / "a.pt"
    forge(path, {"w": view})
    with pytest.raises(CorruptCheckpoint, match=message) as info:
        load_pt(path)
    assert str(info.value).startswith(f"{path}: ")


def test_empty_views_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    forge(path, {"w": _View(_Storage(16), 16, (0, 4), (4, 1))})
    assert load_pt(path)["w"].array().shape == (0, 4)


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_unknown_globals_are_refused_by_name_with_nothing_executed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "a.pt"
    torch.save({"w": torch.zeros(2), "x": Payload(marker), "m": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(UnsafeCheckpoint, match="nothing from the file was executed") as info:
        load_pt(path)
    listed = str(info.value).split("references ")[1].split(", which")[0].split(", ")
    assert listed == sorted(listed) and "posix.system" in listed
    assert "torch.nn.modules.linear.Linear" in listed
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # control: the payload is live
    assert marker.exists()


def test_stubs_stand_in_for_their_prefix_only(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    torch.save({"x": Payload(tmp_path / "ran")}, path)
    stubbed = load_pt(path, stubs={"posix.": MegatronStub})
    assert isinstance(stubbed["x"], MegatronStub) and not (tmp_path / "ran").exists()
    with pytest.raises(UnsafeCheckpoint, match=r"posix\.system"):
        load_pt(path, stubs={"megatron.": MegatronStub})


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x02c__builtin__\nbytes\n\x8a\x05\x00\x00\x00\x00\x01\x85R.",  # bytes(2^32)
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n\x8a\x05\x00\x00\x00\x00"
        b"\x01\x85U\x01b\x87R.",  # _reconstruct(ndarray, (2^32,), b"b")
        b"\x80\x02cnumpy\nndarray\n\x8a\x05\x00\x00\x00\x00\x01\x85\x81.",  # NEWOBJ ndarray((2^32,))
    ],
    ids=["bytes", "numpy-reconstruct", "numpy-newobj"],
)
def test_allowed_globals_cannot_allocate_what_the_pickle_asks(tmp_path: Path, payload) -> None:
    path = tmp_path / "a.pt"
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", payload, len(payload))
    writer.write_end_of_file()
    with pytest.raises(CorruptCheckpoint, match="cannot read the pickle") as info:
        load_pt(path)
    assert "MemoryError" not in str(info.value)  # refused, not attempted


def test_big_endian_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    forge(path, {"w": _View(_Storage(16), 0, (16,), (1,))}, order=b"big")
    with pytest.raises(CorruptCheckpoint, match="big-endian"):
        load_pt(path)


def test_span_reads_one_of_several_archives_in_a_file(tmp_path: Path) -> None:
    blobs = []
    for i in range(2):
        buf = io.BytesIO()
        torch.save({"w": torch.arange(10.0) + i, "i": i}, buf)
        blobs.append(buf.getvalue())
    path = tmp_path / "two.distcp"
    path.write_bytes(b"junk" * 7 + blobs[0] + blobs[1])
    start = 28
    for blob in blobs:
        span = (start, start + len(blob))
        got = load_pt(path, span=span)
        assert_same(got, torch.load(io.BytesIO(blob), weights_only=True), path)
        assert span[0] < got["w"].record_offset < span[1]
        start += len(blob)
    with pytest.raises(CorruptCheckpoint, match="outside the"):
        load_pt(path, span=(28, path.stat().st_size + 1))
    with pytest.raises(CorruptCheckpoint, match="not a torch zip"):
        load_pt(path, span=(28, 28 + len(blobs[0]) - 10))  # the end record cut off


def test_module_imports_no_torch() -> None:
    code = (
        "import sys, converters.safe_load, converters.torch_zip; assert 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
