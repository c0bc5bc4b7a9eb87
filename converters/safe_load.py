"""Load torch `.pt` files without executing pickled code, and without torch.

`load_pt` reads a torch.save archive with `converters.torch_zip`: tensors come back as
`StoredTensor` (described, read only when their `array()` is touched). The pickle may name only
inert globals (`converters.torch_pickle.ALLOWED`, torch's tensor rebuild functions, storage classes
and element types, reimplemented without torch); a caller may also name module prefixes whose
classes become inert stand-ins (`stubs`; the Megatron reader stubs `megatron.` classes, see
`converters.megatron.safe_load`): they are never imported or run. Any other global is refused by
name (`UnsafeCheckpoint`, all of them, sorted) and nothing is executed.

Before the pickle is read, the zip directory is checked (`torch_zip.check_torch_zip`): torch.save writes
every record uncompressed, so a compressed record (a zip bomb that would inflate in memory), a
record claiming more bytes than the file holds or a huge pickle is refused. Every tensor must lie
within its storage and claim no more bytes than it holds (`torch_zip.check_tensor_sizes`): an expanded
(stride-0) tensor of a few bytes claiming 10^12 elements would otherwise allocate terabytes when
converted.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from converters import torch_zip
from converters.errors import CorruptCheckpoint


def load_pt(
    path: Path, *, span: tuple[int, int] | None = None, stubs: Mapping[str, type] | None = None
) -> Any:
    """Load a torch `.pt` file (or the archive in bytes [start, end) of it) safely; tensors are
    `StoredTensor`s over the file, so only touched bytes are ever read.

    `stubs` maps a module prefix (e.g. ``"megatron."``) to an inert class that stands in for every
    global under it; without it, such globals are refused like any other."""
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpoint("file is missing", path)
    if path.stat().st_size == 0:
        raise CorruptCheckpoint("file is empty", path)
    return torch_zip.load(path, span=span, stubs=stubs)
