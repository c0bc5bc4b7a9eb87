"""An optional third opinion on a Hugging Face export: each layer computed by transformers' own
modules (its attention, rotary embedding, norms and MLP classes for the export's model type),
loaded with that layer's tensors only, so memory stays bounded as in a plain verification.
Used by `porter verify --cross-check` when transformers is installed; dense model types only
(transformers 5 fuses Mixtral/Qwen3-MoE experts when it loads a whole model, not per layer)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from converters.verify.files import BadExport
from converters.verify.hf import HfSide
from converters.verify.side import Part

DENSE_TYPES = ("llama", "qwen2", "qwen3")


def transformers_version() -> str | None:
    """The installed transformers' version, None when it is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    return str(transformers.__version__)


class TransformersSide(HfSide):
    """An HF export whose layers transformers computes (embedding rows and logits as HfSide)."""

    def __init__(self, directory: Path, cfg: dict[str, Any]) -> None:
        super().__init__(directory, cfg)
        if cfg["model_type"] not in DENSE_TYPES:
            raise BadExport(
                f"the transformers cross-check covers {', '.join(DENSE_TYPES)}, not "
                f"{cfg['model_type']!r}",
                directory,
            )
        import transformers

        self.config = transformers.AutoConfig.from_pretrained(directory)
        self.config._attn_implementation = "eager"
        model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(self.config)]
        self.modeling = sys.modules[model_class.__module__]
        self.prefix = model_class.__name__.removesuffix("ForCausalLM")
        self.where = f"{directory} (through transformers {transformers.__version__})"

    def _layer(self, layer: int) -> torch.nn.Module:
        """transformers' decoder layer `layer`, holding only that layer's tensors."""
        module = getattr(self.modeling, f"{self.prefix}DecoderLayer")(self.config, layer)
        prefix = f"model.layers.{layer}."
        names = [n for n in self.files.locations if n.startswith(prefix)]
        state = {n[len(prefix) :]: self.files.get(n) for n in names}
        module.load_state_dict(state, strict=True)
        return module.float().eval()

    def _rotary(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = getattr(self.modeling, f"{self.prefix}RotaryEmbedding")(config=self.config)
        return rotary(x[None], torch.arange(x.shape[0])[None])

    def attention(self, layer: int, x: torch.Tensor) -> Part:
        module, seq = self._layer(layer), x.shape[0]
        mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
        out, _ = module.self_attn(
            hidden_states=module.input_layernorm(x[None]),
            position_embeddings=self._rotary(x),
            attention_mask=mask,
        )
        return Part(out[0], origin=f"model.layers.{layer}.self_attn (transformers)")

    def mlp(self, layer: int, h: torch.Tensor) -> Part:
        module = self._layer(layer)
        out = module.mlp(module.post_attention_layernorm(h[None]))
        return Part(out[0], origin=f"model.layers.{layer}.mlp (transformers)")
