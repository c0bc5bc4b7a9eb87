"""LlamaForCausalLM: RMSNorm, rotary positions over the whole head (optionally with Llama-3.1
scaling), SwiGLU, optional GQA, and either no linear biases or biases on every linear layer
(`attention_bias` + `mlp_bias`)."""

from __future__ import annotations

from typing import Any

from converters.hf.families.base import HfFamily, register
from converters.model import LLAMA3_ROPE_CONSTANTS, ModelConfig


def llama_style_mismatches(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` from being a dense Llama-style decoder, one phrase per feature (empty when
    none)."""
    found = decoder_mismatches(cfg)
    if cfg.is_moe:
        found.append(
            "mixture-of-experts layers (MixtralForCausalLM or Qwen3MoeForCausalLM hold experts)"
        )
    return found


def decoder_mismatches(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` from being a Llama-style decoder (RMSNorm, full-head RoPE, SwiGLU),
    dense or not."""
    found = []
    if cfg.normalization != "RMSNorm":
        found.append(f"{cfg.normalization} (needs RMSNorm)")
    if cfg.position_embedding_type != "rope":
        found.append(f"{cfg.position_embedding_type} position embeddings (needs rotary)")
    elif cfg.rotary_percent != 1.0:
        found.append(f"rotary over {cfg.rotary_percent:g} of each head (needs the whole head)")
    if not (cfg.gated_mlp and cfg.activation == "silu"):
        mlp = f"gated {cfg.activation}" if cfg.gated_mlp else f"non-gated {cfg.activation}"
        found.append(f"a {mlp} MLP (needs SwiGLU)")
    return found


def no_qk_norm(cfg: ModelConfig) -> list[str]:
    """The refusal of an architecture without per-head query/key norms."""
    if cfg.qk_layernorm:
        return [
            "qk-layernorm (no query/key norms here; Qwen3ForCausalLM is the exact architecture)"
        ]
    return []


@register
class LlamaFamily(HfFamily):
    architecture = "LlamaForCausalLM"
    model_type = "llama"

    @classmethod
    def rejects(cls, cfg: ModelConfig) -> str | None:
        found = llama_style_mismatches(cfg) + no_qk_norm(cfg)
        if cfg.hidden_size % cfg.num_attention_heads:
            found.append(
                f"hidden_size={cfg.hidden_size} not divisible by num_attention_heads="
                f"{cfg.num_attention_heads} (LlamaConfig's validation requires it)"
            )
        if cfg.add_qkv_bias and not cfg.add_bias_linear:
            found.append(
                "a QKV bias without other linear biases (Llama's attention_bias also gives o_proj "
                "a bias; Qwen2ForCausalLM is the exact architecture)"
            )
        return "; ".join(found) or None

    @classmethod
    def o_proj_bias(cls, cfg: ModelConfig) -> bool:
        return cfg.add_bias_linear

    @classmethod
    def config_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        return {
            **llama_style_fields(cfg),
            "attention_bias": cfg.add_bias_linear,
            "mlp_bias": cfg.add_bias_linear,
            "pretraining_tp": 1,
        }


def llama_style_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The fields Llama-style architectures share (vocab_size: the checkpoint's padded rows)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_epsilon,
        "max_position_embeddings": cfg.max_position_embeddings,
        **rope_fields(cfg),
        "tie_word_embeddings": cfg.tied_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        # Megatron checkpoints do not record token ids: null rather than the classes' defaults.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def rope_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The rotary settings in both spellings: transformers ≥ 5 reads `rope_parameters`; older
    loaders (and vLLM, SGLang) `rope_theta` and `rope_scaling` (which transformers 5 also accepts,
    preferring it to `rope_parameters`: both say the same here)."""
    scaling = None
    if cfg.rope_scaling_factor is not None:
        scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            **LLAMA3_ROPE_CONSTANTS,
        }
    return {
        "rope_theta": cfg.rotary_base,
        "rope_scaling": scaling,
        "rope_parameters": {
            "rope_type": "default",
            **(scaling or {}),
            "rope_theta": cfg.rotary_base,
        },
    }
