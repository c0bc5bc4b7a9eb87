"""Legacy checkpoint folders `mp_rank_TT[_PPP][_EEE]`: what their numbers mean.

Megatron-LM `get_checkpoint_name` appends the PP rank when PP > 1 and the EP rank when expert
parallelism is on, so `mp_rank_00_001` is PP rank 1 *or* EP rank 1: only the stored args tell.
"""

from __future__ import annotations

import re
from pathlib import Path

MODEL_FILES = ("model_optim_rng.pt", "model_rng.pt")
# mp_rank_TT[_PPP][_EEE]: whether a single 3-digit part is the PP or the EP rank only the stored
# args tell (Megatron-LM `get_checkpoint_name`).
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
RankKey = tuple[int, int, int]  # (tp, pp, ep) ranks of one file


def is_rank_model_file(relative: str) -> bool:
    """Whether `relative` ("mp_rank_00_001/model_optim_rng.pt") names a rank's model file."""
    folder, _, name = relative.rpartition("/")
    return bool(_RANK_DIR.match(folder)) and name in MODEL_FILES


def find_rank_dirs(iter_dir: Path) -> dict[tuple[int, ...], Path]:
    """{the numbers in the name, e.g. (0,) or (1, 2): folder} for the `mp_rank_*` folders."""
    found = {}
    for child in iter_dir.iterdir():
        match = _RANK_DIR.match(child.name)
        if match and child.is_dir():
            found[tuple(int(g) for g in match.groups() if g is not None)] = child
    return found


def rank_dir_name(tp: int, pp: int, ep: int, sizes: tuple[int, int]) -> str:
    """`mp_rank_TT[_PPP][_EEE]` for ranks (tp, pp, ep) when PP and EP have `sizes`."""
    pp_size, ep_size = sizes
    return (
        f"mp_rank_{tp:02d}"
        + (f"_{pp:03d}" if pp_size > 1 else "")
        + (f"_{ep:03d}" if ep_size > 1 else "")
    )


def rank_key(numbers: tuple[int, ...], pp_size: int, ep_size: int) -> RankKey | None:
    """(tp, pp, ep) for the numbers of a folder name, per the PP and EP sizes; None when the
    name does not fit them."""
    parts = 1 + (pp_size > 1) + (ep_size > 1)
    if len(numbers) != parts:
        return None
    tp, rest = numbers[0], list(numbers[1:])
    pp = rest.pop(0) if pp_size > 1 else 0
    ep = rest.pop(0) if ep_size > 1 else 0
    return tp, pp, ep
