"""Architectures the user declares because a Megatron-LM checkpoint cannot say them.

megatron-core's own exporter (`export/trtllm`) takes the model type from its caller for the same
reason. Megatron-LM's saved args record neither Gemma's GeGLU (only `swiglu`) nor its
sqrt(hidden) embedding scale, so `--architecture gemma` declares them; what the args do record
must agree, or the declaration is refused naming the argument and the file.

Gemma's norms: Gemma computes `x_hat * (1 + w)` and stores `w`. A Megatron checkpoint trained with
`layernorm_zero_centered_gamma` (Megatron-LM's `--apply-layernorm-1p`, what NeMo and
Megatron-Bridge set for Gemma) computes the same and stores the same `w`: Hugging Face's
GemmaForCausalLM gets the stored weight bit for bit, TensorRT-LLM `w + 1` (what its Gemma
converter writes). Without the switch the stored weight would be `1 + w` and the Hugging Face
export would have to round `stored - 1`; such a checkpoint is refused rather than rounded.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from converters.errors import UnsupportedModel

if TYPE_CHECKING:  # (annotations only: the command line checks DECLARABLE without torch)
    from converters.model import ModelConfig

DECLARABLE = ("gemma",)


def declaration_of(spec_architecture: str | None) -> str | None:
    """The declaration a job spec's `architecture` makes: "gemma" for megatron-trtllm's `gemma`
    and for megatron-hf's `GemmaForCausalLM` / `gemma`; None (decided from the args) otherwise."""
    return "gemma" if spec_architecture in ("gemma", "GemmaForCausalLM") else None


def undeclared(cfg: ModelConfig, architecture: str) -> str | None:
    """A family's refusal of a model not declared `architecture` (the args cannot say it)."""
    if cfg.architecture != architecture:
        return (
            f"not declared {architecture} (--architecture {architecture}; the args cannot say it)"
        )
    return None  # declare_architecture checked the rest against the args


def _gemma_contradictions(cfg: ModelConfig) -> list[str]:
    """The recorded arguments that contradict a Gemma declaration, each with its value."""
    found = []
    if cfg.gated_mlp and cfg.activation == "silu":
        found.append("swiglu=True (Gemma's MLP is GeGLU: gated tanh-GELU, not SiLU)")
    if cfg.normalization != "RMSNorm":
        found.append(f"normalization={cfg.normalization!r} (Gemma uses RMSNorm)")
    if not cfg.apply_layernorm_1p:
        found.append(
            "layernorm_zero_centered_gamma / apply_layernorm_1p unset (Gemma's norms are "
            "zero-centred: they scale by 1 + weight)"
        )
    if cfg.position_embedding_type != "rope" or cfg.rotary_percent != 1.0:
        found.append(
            f"position_embedding_type={cfg.position_embedding_type!r}, rotary_percent="
            f"{cfg.rotary_percent:g} (Gemma rotates the whole head)"
        )
    if cfg.rope_scaling_factor is not None:
        found.append("use_rope_scaling=True (Gemma has no RoPE scaling)")
    if cfg.add_bias_linear or cfg.add_qkv_bias:
        found.append("add_bias_linear / add_qkv_bias set (Gemma has no linear biases)")
    if not cfg.tied_embeddings:
        found.append("untie_embeddings_and_output_weights=True (Gemma ties them)")
    if cfg.qk_layernorm:
        found.append("qk_layernorm=True (Gemma v1 has no query/key norms)")
    if cfg.is_moe:
        found.append(f"num_experts={cfg.num_experts} (Gemma is dense)")
    return found


def declare_architecture(cfg: ModelConfig, architecture: str | None, path: Path) -> ModelConfig:
    """`cfg` as the declared `architecture` computes it (None: unchanged, decided from the args);
    `path` (the file holding the args) is named when the args contradict the declaration."""
    if architecture is None:
        return cfg
    if architecture not in DECLARABLE:
        raise UnsupportedModel(
            f"unknown declared architecture {architecture!r}; known: {', '.join(DECLARABLE)}"
        )
    found = _gemma_contradictions(cfg)
    if found:
        raise UnsupportedModel(
            "the checkpoint's args contradict the declared architecture gemma: " + "; ".join(found),
            path,
        )
    return replace(cfg, architecture="gemma", gated_mlp=True, activation="gelu_tanh")


def declare_source(source, architecture: str | None) -> None:
    """Apply `declare_architecture` to an open source checkpoint's `config` in place (the readers
    check tensor shapes against it: a non-gated fc1 is then refused naming its file)."""
    if architecture is None:
        return
    path = getattr(source, "args_path", None) or Path(source.path)
    source.config = declare_architecture(source.config, architecture, path)
