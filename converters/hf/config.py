"""The JSON files beside the weights: `config.json`, `generation_config.json` and, for several
shards, `model.safetensors.index.json`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from converters.hf.families import family_for
from converters.hf.plan import HfTarget
from converters.model import ModelConfig


def hf_config(cfg: ModelConfig, target: HfTarget) -> dict[str, Any]:
    """`config.json` for `cfg` written as `target`."""
    family = family_for(cfg, target.architecture)
    dtype = target.output_dtype(cfg)
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        **family.config_fields(cfg),
        "vocab_size": target.output_vocab(cfg),
        "torch_dtype": dtype,  # transformers < 5 and most other loaders
        "dtype": dtype,  # transformers ≥ 5
    }


def generation_config(
    cfg: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> dict[str, Any]:
    """`generation_config.json`: the token ids when known (Megatron checkpoints do not record
    them, so by default an empty object, which `GenerationConfig.from_pretrained` loads)."""
    known = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    return {key: value for key, value in known.items() if value is not None}


def _fields(shard: Any) -> Mapping[str, Any]:
    return asdict(shard) if is_dataclass(shard) else shard


def shard_index(shards: Sequence[Any]) -> dict[str, Any]:
    """`model.safetensors.index.json` from the shards (`ShardPlan`s or `ShardResult`s, or their
    dicts): every tensor's file, and the total bytes of tensor data."""
    weight_map: dict[str, str] = {}
    total = 0
    for shard in map(_fields, shards):
        for name, nbytes in shard["tensors"].items():
            weight_map[name] = shard["file"]
            total += nbytes
    return {"metadata": {"total_size": total}, "weight_map": weight_map}
