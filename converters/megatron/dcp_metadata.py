"""Read a `torch.distributed.checkpoint` `.metadata` file without torch and without running code.

`.metadata` is a pickle of DCP's `Metadata` dataclass (chunks of every tensor, where their bytes
are, the save plans). Porter never imports the classes it names: a restricted unpickler maps each
allow-listed global to an inert stand-in of ours below (plain classes holding the pickled fields;
`torch.Size` → a tuple of ints, a torch dtype → `converters.dtypes.DType`, enums, layouts and
other constants → `Constant`) and refuses any other global by name before anything runs.

The globals a real file references (torch 2.13, megatron-core 0.16.1; `pickletools.dis` of a
fixture): Metadata, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata,
TensorProperties, _MEM_FORMAT_ENCODING, MetadataIndex, StorageMeta, _StorageInfo, torch.Size,
torch.float32 (any dtype), torch.serialization._get_layout and, inside `all_local_plans`,
SavePlan, WriteItem, WriteItemType, TensorWriteData. Dataclasses arrive as NEWOBJ + BUILD (a
field dict; TensorProperties: a 5-tuple), enums as a call with their value.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path, PurePosixPath
from typing import Any

from converters import dtypes
from converters.errors import CorruptCheckpoint, UnsafeCheckpoint
from converters.megatron.safe_load import STUBBED_PREFIX, MegatronStub

__all__ = ["Constant", "Metadata", "TensorStorageMetadata", "read_dist_metadata"]

# `.metadata` lists every chunk (with optimizer state: hundreds of thousands); larger is refused.
MAX_METADATA_BYTES = 2**30


class Record:
    """An inert stand-in for one of DCP's dataclasses: the fields it was pickled with (BUILD sets
    them; a call sets them by position, in the dataclass's field order), the rest None."""

    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls) -> None:
        for name in cls._fields:  # class-level defaults: a field the pickle did not set is None
            setattr(cls, name, None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(self._fields):
            raise TypeError(f"{type(self).__name__} takes at most {len(self._fields)} fields")
        self.__dict__.update(zip(self._fields, args, strict=False), **kwargs)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({fields})"


class Metadata(Record):
    _fields = ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version")


class TensorStorageMetadata(Record):
    _fields = ("properties", "size", "chunks")


class BytesStorageMetadata(Record):
    pass


class ChunkStorageMetadata(Record):
    _fields = ("offsets", "sizes")


class MetadataIndex(Record):
    _fields = ("fqn", "offset", "index")


class StorageMeta(Record):
    _fields = ("checkpoint_id", "save_id", "load_id", "modules")


class StorageInfo(Record):
    _fields = ("relative_path", "offset", "length", "transform_descriptors")


class StoragePrefix(Record):
    _fields = ("prefix",)


class SavePlan(Record):
    _fields = ("items", "storage_data", "planner_data", "usable")


class WriteItem(Record):
    _fields = ("index", "type", "bytes_io_data", "tensor_data")


class TensorWriteData(Record):
    _fields = ("chunk", "properties", "size")


class BytesIOWriteData(Record):
    _fields = ("nbytes",)


class TensorProperties(Record):
    """DCP pickles these as a 5-tuple (dtype, layout, requires_grad, memory format, pinned);
    older torch as a field dict."""

    _fields = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == len(self._fields):
            state = dict(zip(self._fields, state, strict=True))
        if not isinstance(state, dict):
            raise TypeError(f"TensorProperties state is a {type(state).__name__}")
        self.__dict__.update(state)


class Constant:
    """An inert named value: an enum member (by its value), a layout, a memory format, or a
    torch dtype Porter does not convert."""

    def __init__(self, kind: str, value: Any) -> None:
        self.kind = kind
        self.value = value

    def __repr__(self) -> str:
        return f"{self.kind}({self.value!r})"


def _enum(kind: str) -> Any:
    return lambda value: Constant(kind, value)


_DCP = "torch.distributed.checkpoint"
_SHARDED = "torch.distributed._shard.sharded_tensor.metadata"  # older torch's TensorProperties
_STAND_INS: dict[tuple[str, str], Any] = {
    (f"{_DCP}.metadata", "Metadata"): Metadata,
    (f"{_DCP}.metadata", "TensorStorageMetadata"): TensorStorageMetadata,
    (f"{_DCP}.metadata", "BytesStorageMetadata"): BytesStorageMetadata,
    (f"{_DCP}.metadata", "ChunkStorageMetadata"): ChunkStorageMetadata,
    (f"{_DCP}.metadata", "TensorProperties"): TensorProperties,
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"): _enum("MEM_FORMAT_ENCODING"),
    (f"{_DCP}.metadata", "MetadataIndex"): MetadataIndex,
    (f"{_DCP}.metadata", "StorageMeta"): StorageMeta,
    (f"{_DCP}.filesystem", "_StorageInfo"): StorageInfo,
    (f"{_DCP}.filesystem", "_StoragePrefix"): StoragePrefix,
    (f"{_DCP}.planner", "SavePlan"): SavePlan,
    (f"{_DCP}.planner", "WriteItem"): WriteItem,
    (f"{_DCP}.planner", "WriteItemType"): _enum("WriteItemType"),
    (f"{_DCP}.planner", "TensorWriteData"): TensorWriteData,
    (f"{_DCP}.planner", "BytesIOWriteData"): BytesIOWriteData,
    (_SHARDED, "TensorProperties"): TensorProperties,
    (_SHARDED, "MEM_FORMAT_ENCODING"): _enum("MEM_FORMAT_ENCODING"),
    ("torch", "Size"): tuple,  # torch.Size(values): a plain tuple
    ("torch.serialization", "_get_layout"): lambda name: Constant("layout", name),
    ("collections", "OrderedDict"): collections.OrderedDict,
    # StorageMeta.checkpoint_id of torch's own `dcp.save(..., FileSystemWriter(path))` (Megatron
    # writes a str): a pure path, which has no methods that touch the file system.
    ("pathlib", "PosixPath"): PurePosixPath,
    ("pathlib", "PurePosixPath"): PurePosixPath,
}
# torch's other module-level constants a pickle may name (torch 2.13's `dir(torch)`): element
# types without a `DType` (kept as `Constant("dtype", name)`, refused where a weight has one),
# layouts and memory formats (`Constant("torch", name)`).
_OTHER_DTYPES = frozenset({
    "bit", "bits16", "bits1x8", "bits2x4", "bits4x2", "bits8", "cdouble", "cfloat", "chalf",
    "complex128", "complex32", "complex64", "float4_e2m1fn_x2", "float8_e4m3fn",
    "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "int1", "int2", "int3",
    "int4", "int5", "int6", "int7", "qint32", "qint8", "quint2x4", "quint4x2", "quint8", "uint1",
    "uint16", "uint2", "uint3", "uint32", "uint4", "uint5", "uint6", "uint64", "uint7",
})  # fmt: skip
_OTHER_CONSTANTS = frozenset({
    "_mkldnn", "jagged", "sparse_bsc", "sparse_bsr", "sparse_coo", "sparse_csc", "sparse_csr",
    "strided", "channels_last", "channels_last_3d", "contiguous_format",
    "legacy_contiguous_format", "preserve_format",
})  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """The C unpickler with `find_class` restricted to the stand-ins; refuses anything else by
    name (before anything from the file runs) and persistent ids."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        return _resolve(module, name, self._path)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpoint("the pickle uses persistent ids, which Porter refuses", self._path)


def _resolve(module: str, name: str, path: Path) -> Any:
    """The stand-in for global `module.name`; UnsafeCheckpoint naming it if there is none."""
    found = _STAND_INS.get((module, name))
    if found is not None:
        return found
    if module == "torch":
        try:
            return dtypes.named(name)
        except KeyError:
            if name in _OTHER_DTYPES:
                return Constant("dtype", name)
            if name in _OTHER_CONSTANTS:
                return Constant("torch", name)
    if module.startswith(STUBBED_PREFIX):
        return MegatronStub
    raise UnsafeCheckpoint(
        f"the pickle references {module}.{name}, which Porter does not load (it could run "
        "code); nothing from the file was executed",
        path,
    )


def read_dist_metadata(path: Path) -> Metadata:
    """Unpickle a torch.distributed.checkpoint `.metadata` file into the inert stand-ins."""
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpoint("file is missing (torch_dist checkpoints need it)", path)
    size = path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise CorruptCheckpoint(
            f"is {size} bytes; Porter reads checkpoint metadata of at most {MAX_METADATA_BYTES}",
            path,
        )
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except (UnsafeCheckpoint, CorruptCheckpoint):
        raise
    except Exception as exc:  # truncated or garbled pickle stream
        # the exception's text can hold bytes of the file ("invalid load key, 'x'"): its type only
        raise CorruptCheckpoint(
            f"cannot unpickle the checkpoint metadata ({type(exc).__name__})", path
        ) from exc
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpoint(
            f"holds a {type(metadata).__name__}, not torch.distributed.checkpoint Metadata", path
        )
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(
        metadata.storage_data, dict
    ):
        raise CorruptCheckpoint("metadata lacks state_dict_metadata or storage_data", path)
    return metadata
