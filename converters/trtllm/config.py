"""The TensorRT-LLM `config.json` of a converted checkpoint (spec §3)."""

from __future__ import annotations

from typing import Any

from converters.model import ModelConfig
from converters.trtllm import moe
from converters.trtllm.families import family_for
from converters.trtllm.plan import Target, check_features


def trtllm_config(cfg: ModelConfig, target: Target) -> dict[str, Any]:
    """`config.json` contents for `cfg` laid out as `target`."""
    check_features(cfg)
    family = family_for(cfg)
    return {
        "architecture": family.architecture,
        "dtype": target.output_dtype(cfg),
        "logits_dtype": "float32",
        # Megatron's padded vocab; TensorRT-LLM pads lm_head to a multiple of TP itself.
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_size": cfg.kv_channels,
        "intermediate_size": cfg.ffn_hidden_size,
        "norm_epsilon": cfg.norm_epsilon,
        "max_position_embeddings": cfg.max_position_embeddings,
        **family.config_fields(cfg),
        "use_parallel_embedding": target.parallel_embedding,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "mapping": {
            "world_size": target.world_size,
            "tp_size": target.tp,
            "pp_size": target.pp,
            **moe.mapping_fields(cfg, target.tp, target.moe_ep),
        },
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
