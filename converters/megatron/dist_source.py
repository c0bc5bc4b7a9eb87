"""A torch_dist checkpoint seen through canonical names: stacked layer tensors indexed per layer."""

from __future__ import annotations

from pathlib import Path

from converters.errors import CorruptCheckpoint, NotAMegatronCheckpoint, UnsupportedModel
from converters.megatron import names
from converters.megatron.args import (
    expert_parallel_sizes,
    model_config_from_args,
    parallel_sizes,
)
from converters.megatron.dist import DistCheckpoint
from converters.megatron.moe_checks import check_moe_layer
from converters.tensors import LazyTensor

_STACKED_PREFIX = "decoder.layers."


class DistSource:
    """Global tensors of a torch_dist iteration directory, by canonical (per-layer) name."""

    format = "torch_dist"

    def __init__(self, iter_dir: Path) -> None:
        self.path = iter_dir
        self._ckpt = DistCheckpoint(iter_dir)
        common_path = iter_dir / "common.pt"
        args = self._ckpt.common.get("args")
        if args is None:
            raise NotAMegatronCheckpoint("no training `args` in common.pt", common_path)
        self.tp, self.pp = parallel_sizes(args, common_path)
        # Informational: torch_dist tensors are global, whatever the expert parallelism.
        self.ep, self.etp = expert_parallel_sizes(args, common_path)
        self._check_keys()
        word = "embedding.word_embeddings.weight"
        if word not in self._ckpt:
            raise CorruptCheckpoint(f"missing parameter {word}", self._ckpt.metadata_path)
        self.config = model_config_from_args(args, self._ckpt.dtype(word), common_path)
        self.args_path = common_path  # named by errors about the args
        self._check_layers()
        self._check_moe_keys()
        check_moe_layer(self, common_path)

    def _check_moe_keys(self) -> None:
        if self.config.is_moe:
            return
        stray = sorted(key for key in self._ckpt.keys() if names.is_moe_key("." + key))
        if stray:
            raise UnsupportedModel(
                f"unknown parameter names: {', '.join(stray)} (mixture-of-experts tensors, but "
                "`args.num_experts` is unset)",
                self._ckpt.metadata_path,
            )

    def _check_keys(self) -> None:
        unknown = [
            key
            for key in self._ckpt.keys()
            if not names.is_ignored(key) and self._classify(key) is None
        ]
        if unknown:
            raise UnsupportedModel(
                f"unknown parameter names: {', '.join(sorted(unknown))}", self._ckpt.metadata_path
            )

    @staticmethod
    def _classify(key: str) -> str | None:
        """ "global", "stacked" or "layer" for a stored key, None when unknown. Routed experts
        are `[decoder.layers.{i}.]mlp.experts.experts.<param>`, experts stacked after layers."""
        if key in names.GLOBAL_PARAMS:
            return "global"
        if names.parse_layer_key(key) or _is_expert_suffix(names.split_layer_name(key)):
            return "layer"
        if key.startswith(_STACKED_PREFIX):
            suffix = key[len(_STACKED_PREFIX) :]
            if names.layer_suffix(suffix) or _is_expert_suffix((0, suffix)):
                return "stacked"
        return None

    def _check_layers(self) -> None:
        for key in self._ckpt.keys():
            if (
                self._classify(key) == "stacked"
                and self._ckpt.shape(key)[0] != self.config.num_layers
            ):
                raise CorruptCheckpoint(
                    f"{key} stacks {self._ckpt.shape(key)[0]} layers, but args.num_layers={self.config.num_layers}",
                    self._ckpt.metadata_path,
                )

    def files(self) -> list[Path]:
        """Every file of the iteration directory (metadata, common state, data files)."""
        return sorted(p for p in self.path.iterdir() if p.is_file())

    def _stored(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        """(stored key, indices into its leading axes: layer of a stacked key, then expert) for
        a canonical name."""
        if name in names.GLOBAL_PARAMS:
            return (name, ()) if name in self._ckpt else None
        if expert := names.split_expert_name(name):
            layer, number, param = expert
            if not 0 <= number < self.config.num_experts:
                raise KeyError(name)
            suffix = names.DIST_EXPERT_PREFIX + param
            if names.layer_name(layer, suffix) in self._ckpt:
                return names.layer_name(layer, suffix), (number,)
            if _STACKED_PREFIX + suffix in self._ckpt:
                return _STACKED_PREFIX + suffix, (layer, number)
            return None
        parsed = names.parse_layer_key(name)
        if parsed is None:
            raise KeyError(name)
        layer, suffix = parsed
        for stored in names.stored_suffixes(suffix):
            if names.layer_name(layer, stored) in self._ckpt:
                return names.layer_name(layer, stored), ()
            if _STACKED_PREFIX + stored in self._ckpt:
                return _STACKED_PREFIX + stored, (layer,)
        return None

    def has(self, name: str) -> bool:
        """Whether the checkpoint stores the canonical tensor `name`."""
        try:
            return self._stored(name) is not None
        except KeyError:
            return False

    def tensor(self, name: str) -> LazyTensor:
        """The global tensor `name`, lazily: only overlapping chunks are read when materialized
        (a routed expert: its own rows of the stacked expert tensor, whose fc1 is globally
        `[gate; up]`, as the canonical name wants)."""
        stored = self._stored(name)
        if stored is None:
            raise CorruptCheckpoint(f"missing parameter {name}", self._ckpt.metadata_path)
        key, indices = stored
        tensor = self._ckpt.tensor(key)
        expected = names.expected_shape(name, self.config)
        if len(tensor.shape) != len(indices) + len(expected) or any(
            i >= size for i, size in zip(indices, tensor.shape, strict=False)
        ):
            raise CorruptCheckpoint(
                f"{key} has shape {tuple(tensor.shape)}, expected {expected} per "
                + ("layer and expert" if len(indices) > 1 else "entry")
                + f" (indices {list(indices)}) from `args`",
                self._ckpt.metadata_path,
            )
        for index in indices:
            tensor = tensor.index0(index)
        if tuple(tensor.shape) != expected:
            raise CorruptCheckpoint(
                f"{key} has shape {tuple(tensor.shape)} per layer, expected {expected} from `args`",
                self._ckpt.metadata_path,
            )
        return tensor


def _is_expert_suffix(parsed: tuple[int, str] | None) -> bool:
    """Whether a per-layer suffix is torch_dist's routed-expert form."""
    if parsed is None or not parsed[1].startswith(names.DIST_EXPERT_PREFIX):
        return False
    return parsed[1][len(names.DIST_EXPERT_PREFIX) :] in names.EXPERT_PARAMS
