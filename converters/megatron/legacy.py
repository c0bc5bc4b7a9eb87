"""Legacy Megatron checkpoints: one `model_optim_rng.pt` per (TP, PP) rank under `mp_rank_*` folders.

Files are opened lazily and memory-mapped: a tensor's shards are only loaded when a re-shard rule
materializes the part of them it needs, so a target rank touches only its share of the bytes (and
never the optimizer state stored in the same files).
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from converters.dtypes import DType, cast
from converters.errors import CorruptCheckpoint, NotAMegatronCheckpoint, UnsupportedModel
from converters.megatron import names
from converters.megatron.args import expert_parallel_sizes, model_config_from_args, parallel_sizes
from converters.megatron.moe_checks import check_moe_layer
from converters.megatron.rank_dirs import (
    MODEL_FILES,
    RankKey,
    find_rank_dirs,
    rank_dir_name,
    rank_key,
)
from converters.megatron.safe_load import load_pt
from converters.model import ModelConfig
from converters.tensors import Concat, FileRange, LazyTensor, concat, narrow
from converters.torch_zip import StoredTensor


def _narrowed(stored: StoredTensor, region: tuple[tuple[int, int, int], ...]) -> StoredTensor:
    """The stored tensor's view of `region` ((dim, start, length) slices, in order)."""
    shape, offset = list(stored.shape), stored.storage_offset
    for dim, start, length in region:
        offset += start * stored.stride[dim]
        shape[dim] = length
    return dataclasses.replace(stored, shape=tuple(shape), storage_offset=offset)


class _ShardFiles:
    """The rank files of one checkpoint, each loaded (memory-mapped) on first use and validated."""

    def __init__(self, dirs: dict[Any, Path]) -> None:
        self.dirs = dirs
        self.moe = True  # whether MoE keys are known (set from `args` before any model is read)
        self._models: dict[RankKey, tuple[Path, dict[str, Any]]] = {}
        self._payloads: dict[RankKey, dict[str, Any]] = {}

    def rekey(self, keys: dict[Any, RankKey]) -> None:
        """Name the files by (tp, pp, ep) once the args have told what their names mean."""
        self.dirs = {keys[k]: d for k, d in self.dirs.items()}
        self._payloads = {keys[k]: p for k, p in self._payloads.items()}

    def path(self, rank: RankKey) -> Path:
        folder = self.dirs[rank]
        for name in MODEL_FILES:
            if (folder / name).exists():
                return folder / name
        raise CorruptCheckpoint(f"no {MODEL_FILES[0]} in the rank directory", folder)

    def payload(self, rank: RankKey) -> dict[str, Any]:
        """The whole unpickled dict of a rank file (tensors described, not read)."""
        if rank not in self._payloads:
            path = self.path(rank)
            payload = load_pt(path)
            if not isinstance(payload, dict):
                raise NotAMegatronCheckpoint(
                    "not a Megatron checkpoint (no dict at the top level)", path
                )
            self._payloads[rank] = payload
        return self._payloads[rank]

    def model(self, rank: RankKey) -> tuple[Path, dict[str, Any]]:
        """(file, state dict) of a rank, with every key checked against the known names."""
        if rank not in self._models:
            path, payload = self.path(rank), self.payload(rank)
            if "model" not in payload:
                if "model0" in payload:
                    raise UnsupportedModel(
                        "virtual pipeline stages (model0, model1, ...) are not supported", path
                    )
                raise NotAMegatronCheckpoint("no `model` state dict in the file", path)
            state = payload["model"]
            unknown = sorted(
                k
                for k in state
                if not names.is_ignored(k)
                and (_canonical_local(k) is None or (not self.moe and names.is_moe_key(k)))
            )
            if unknown:
                raise UnsupportedModel(f"unknown parameter names: {', '.join(unknown)}", path)
            self._models[rank] = (path, state)
        return self._models[rank]


def _canonical_local(key: str) -> str | None:
    """Canonical name with the *local* layer number for a stored key, or None if unknown (a
    local expert's parameter: its stored name, which has no canonical form before EP is known)."""
    if key in names.GLOBAL_PARAMS:
        return key
    parsed = names.parse_layer_key(key)
    if parsed:
        return names.layer_name(*parsed)
    layer = names.split_layer_name(key)
    return key if layer and names.parse_stored_expert(layer[1]) else None


class _ShardTensor(LazyTensor):
    """One stored tensor of one rank file, opened only when materialized."""

    def __init__(
        self,
        files: _ShardFiles,
        rank: RankKey,
        key_candidates: tuple[str, ...],
        shape: tuple[int, ...],
        dtype: DType,
        region: tuple[tuple[int, int, int], ...] = (),
    ) -> None:
        self.files, self.rank, self.keys = files, rank, key_candidates
        self.full_shape, self.region = shape, region
        self.dtype = dtype
        sizes = list(shape)
        for dim, _, length in region:
            sizes[dim] = length
        self.shape = tuple(sizes)

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        self._check_narrow(dim, start, length)
        return _ShardTensor(
            self.files,
            self.rank,
            self.keys,
            self.full_shape,
            self.dtype,
            (*self.region, (dim, start, length)),
        )

    def _stored(self) -> tuple[Path, StoredTensor]:
        """(rank file, the stored tensor), checked against the expected shape."""
        path, state = self.files.model(self.rank)
        key = next((k for k in self.keys if k in state), None)
        if key is None:
            raise CorruptCheckpoint(f"missing parameter {self.keys[0]}", path)
        tensor = state[key]
        if not isinstance(tensor, StoredTensor):
            raise CorruptCheckpoint(f"{key} is not a tensor", path)
        if tensor.shape != self.full_shape:
            raise CorruptCheckpoint(
                f"{key} has shape {tensor.shape}, expected {self.full_shape} "
                "(shards disagree with each other or with `args`)",
                path,
            )
        return path, tensor

    def materialize(self) -> np.ndarray:
        _, tensor = self._stored()
        if tensor.dtype == self.dtype:
            return _narrowed(tensor, self.region).array()
        array = cast(tensor.array(), tensor.dtype, self.dtype)  # stored unlike the rest: cast
        for dim, start, length in self.region:
            array = narrow(array, dim, start, length)
        return array

    def file_ranges(self) -> list[FileRange]:
        """The bytes of the rank file that the region covers (all of the tensor if a cast reads
        the whole tensor)."""
        path, tensor = self._stored()
        span = (
            tensor if tensor.dtype != self.dtype else _narrowed(tensor, self.region)
        ).byte_range()
        if span is None:
            return []
        start, end = span
        return [(path, start, end - start)]

    @property
    def source_nbytes(self) -> int:
        return self.nbytes


class _GroupedExpert(_ShardTensor):
    """Expert j's [out, in] weight inside a legacy GroupedMLP packed weight (`weight1`
    [H, E_local·fc1_rows], `weight2` [E_local·F, H]), which megatron-core reads as
    `.view(E_local, in, out)`: expert j's contiguous [in, out] block, transposed."""

    def __init__(
        self,
        files: _ShardFiles,
        rank: RankKey,
        key: str,
        shape: tuple[int, ...],
        dtype: DType,
        expert: int,
        local_experts: int,
        region: tuple[tuple[int, int, int], ...] = (),
    ) -> None:
        super().__init__(files, rank, (key,), shape, dtype, region)
        self.expert, self.local_experts = expert, local_experts

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        self._check_narrow(dim, start, length)
        region = (*self.region, (dim, start, length))
        return _GroupedExpert(
            self.files,
            self.rank,
            self.keys[0],
            self.full_shape,
            self.dtype,
            self.expert,
            self.local_experts,
            region,
        )

    def _stored(self) -> tuple[Path, StoredTensor]:
        path, state = self.files.model(self.rank)
        key = self.keys[0]
        packed = state.get(key)
        out_size, in_size = self.full_shape
        expected = (in_size, self.local_experts * out_size)
        if key.endswith("weight2"):
            expected = (self.local_experts * in_size, out_size)
        if not isinstance(packed, StoredTensor) or packed.shape != expected:
            found = packed.shape if isinstance(packed, StoredTensor) else type(packed)
            raise CorruptCheckpoint(
                f"{key} is {found}, expected {expected} for {self.local_experts} local experts "
                "(GroupedMLP, [in, out])",
                path,
            )
        if packed.stride != (expected[1], 1):
            raise CorruptCheckpoint(f"{key} is not stored contiguously (GroupedMLP)", path)
        # megatron-core's `.view(E_local, in, out)[j]`, transposed: [out, in] over one [in, out] run
        expert = dataclasses.replace(
            packed,
            shape=(out_size, in_size),
            stride=(1, out_size),
            storage_offset=packed.storage_offset + self.expert * in_size * out_size,
        )
        return path, expert


class LegacyCheckpoint:
    """A legacy-format iteration directory (`iter_XXXXXXX/` or `release/`)."""

    format = "legacy"

    def __init__(self, iter_dir: Path) -> None:
        self.path = iter_dir
        numbered = find_rank_dirs(iter_dir)
        if not numbered:
            raise NotAMegatronCheckpoint("no mp_rank_* directories", iter_dir)
        self._files = _ShardFiles(numbered)
        first = self._files.payload(min(numbered))
        first_path = self._files.path(min(numbered))
        self.args = first.get("args")
        self.tp, self.pp = (
            parallel_sizes(self.args, first_path) if self.args is not None else (0, 0)
        )
        # Expert parallelism: each file holds its TP rank's dense weights (the same in every EP
        # copy) and its EP rank's experts, split over the expert TP group.
        self.ep, self.etp = (
            expert_parallel_sizes(self.args, first_path) if self.args is not None else (1, 0)
        )
        if self.args is not None and self.etp != self.tp:
            raise UnsupportedModel(
                f"expert_tensor_parallel_size={self.etp} differs from the tensor-parallel size "
                f"{self.tp} (MoE parallel folding), which Porter does not read from legacy "
                "checkpoints",
                first_path,
            )
        self._files.moe = getattr(self.args, "num_experts", None) not in (None, 0)
        self._files.rekey(self._check_rank_dirs(numbered))
        self.stage_layers = [self._count_layers(stage) for stage in range(self.pp)]
        dtype = self._stored_dtype(first_path)
        self.config: ModelConfig = model_config_from_args(self.args, dtype, first_path)
        self.args_path = first_path  # named by errors about the args
        if sum(self.stage_layers) != self.config.num_layers:
            raise CorruptCheckpoint(
                f"pipeline stages hold {self.stage_layers} layers, but args.num_layers="
                f"{self.config.num_layers}",
                iter_dir,
            )
        check_moe_layer(self, first_path)
        if self.config.num_experts % self.ep:
            raise CorruptCheckpoint(
                f"num_experts={self.config.num_experts} does not split over "
                f"expert_model_parallel_size={self.ep}",
                first_path,
            )

    def _check_rank_dirs(self, numbered: dict[tuple[int, ...], Path]) -> dict[Any, RankKey]:
        """{folder numbers: (tp, pp, ep)}, naming every folder of the (TP, PP, EP) grid that is
        missing (MoE parallel folding used to leave holes: Megatron-LM #4200) and every extra."""
        sizes = (self.pp, self.ep)
        keys = {n: rank_key(n, *sizes) for n in numbered}
        found = set(keys.values())
        grid = [
            (tp, pp, ep) for pp in range(self.pp) for ep in range(self.ep) for tp in range(self.tp)
        ]
        missing = [rank_dir_name(*rank, sizes) for rank in grid if rank not in found]
        said = f"args say TP={self.tp}, PP={self.pp}" + (f", EP={self.ep}" if self.ep > 1 else "")
        if missing:
            files = [f"{name}/{MODEL_FILES[0]}" for name in missing]
            raise CorruptCheckpoint(
                f"missing rank directory {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f": {', '.join(files)} ({said})",
                self.path / missing[0],
            )
        extra = sorted(str(numbered[n]) for n, key in keys.items() if key not in grid)
        if extra:
            raise CorruptCheckpoint(
                f"rank directories beyond the grid ({said}): {', '.join(extra)}", self.path
            )
        return keys  # type: ignore[return-value]

    def _count_layers(self, stage: int) -> int:
        _, state = self._files.model((0, stage, 0))
        layers = {parsed[0] for key in state if (parsed := names.parse_layer_key(key))}
        return len(layers)

    def _stored_dtype(self, path: Path) -> DType:
        _, state = self._files.model((0, 0, 0))
        for key, value in state.items():
            if (
                isinstance(value, StoredTensor)
                and value.dtype.is_floating_point
                and not names.is_ignored(key)
            ):
                return value.dtype
        raise NotAMegatronCheckpoint("the model state dict holds no tensors", path)

    @cached_property
    def _layer_offsets(self) -> list[int]:
        offsets, total = [], 0
        for count in self.stage_layers:
            offsets.append(total)
            total += count
        return offsets

    def files(self) -> list[Path]:
        """Every rank file of the checkpoint."""
        return [self._files.path(rank) for rank in sorted(self._files.dirs)]

    def _locate(self, name: str) -> tuple[int, int, tuple[str, ...]]:
        """(source stage, EP rank, stored key candidates) of a canonical name."""
        if name in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight"):
            return 0, 0, (name,)
        if name in names.GLOBAL_PARAMS:
            return self.pp - 1, 0, (name,)
        expert = names.split_expert_name(name)
        parsed = (expert[0], "") if expert else names.split_layer_name(name)
        if not parsed:
            raise KeyError(name)
        layer, suffix = parsed
        if not 0 <= layer < self.config.num_layers:
            raise KeyError(name)
        stage = max(s for s, offset in enumerate(self._layer_offsets) if offset <= layer)
        local = layer - self._layer_offsets[stage]
        if expert:
            _, number, param = expert
            if not 0 <= number < self.config.num_experts:
                raise KeyError(name)
            ep_rank, j = divmod(number, self.config.num_experts // self.ep)
            module, kind = param.rsplit(".", 1)
            stored = (f"mlp.experts.local_experts.{j}.{param}", f"mlp.experts.{module}.{kind}{j}")
            grouped = names.GROUPED_EXPERT_KEYS.get(param)
            stored += (grouped,) if grouped else ()
            return stage, ep_rank, tuple(names.layer_name(local, s) for s in stored)
        keys = tuple(names.layer_name(local, s) for s in names.stored_suffixes(suffix))
        return stage, 0, keys

    def _stored_key(self, name: str) -> tuple[RankKey, str | None]:
        """(file holding `name` on TP rank 0, the key it stores it under, or None)."""
        stage, ep_rank, keys = self._locate(name)
        _, state = self._files.model((0, stage, ep_rank))
        return (0, stage, ep_rank), next((key for key in keys if key in state), None)

    def has(self, name: str) -> bool:
        """Whether the checkpoint stores the canonical tensor `name`."""
        try:
            return self._stored_key(name)[1] is not None
        except KeyError:
            return False

    def tensor(self, name: str) -> LazyTensor:
        """The global (TP-merged) tensor `name`, lazily: nothing is read until materialized.
        A routed expert is read from the EP rank that owns it, one expert at a time."""
        (_, stage, ep_rank), key = self._stored_key(name)
        if key is None:
            keys = self._locate(name)[2]
            raise CorruptCheckpoint(
                f"missing parameter {keys[0]}", self._files.path((0, stage, ep_rank))
            )
        full = names.expected_shape(name, self.config)
        partition = names.partition_of(name, self.config)
        dim = 1 if partition == "cols" else 0
        shard_shape = list(full)
        if partition != "replicated":
            if full[dim] % self.tp:
                raise CorruptCheckpoint(
                    f"{key}: size {full[dim]} does not split over TP={self.tp}", self.path
                )
            shard_shape[dim] //= self.tp
        dtype = self.config.element_type
        expert = names.split_expert_name(name)
        grouped = expert is not None and key.endswith(tuple(names.GROUPED_EXPERT_KEYS.values()))

        def shard(tp: int) -> _ShardTensor:
            rank = (tp, stage, ep_rank)
            if grouped:
                local_experts = self.config.num_experts // self.ep
                j = expert[1] % local_experts
                return _GroupedExpert(
                    self._files, rank, key, tuple(shard_shape), dtype, j, local_experts
                )
            return _ShardTensor(self._files, rank, (key,), tuple(shard_shape), dtype)

        if partition == "replicated":
            return shard(0)
        if partition == "gated_rows":  # each shard is [gate_r; up_r]
            half = shard_shape[0] // 2
            gates = [shard(tp).narrow(0, 0, half) for tp in range(self.tp)]
            ups = [shard(tp).narrow(0, half, half) for tp in range(self.tp)]
            return Concat([concat(gates, 0), concat(ups, 0)], 0)
        return concat([shard(tp) for tp in range(self.tp)], dim)
