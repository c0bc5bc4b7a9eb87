"""Zero-centred norms for the example writer: what Megatron computes with
`layernorm_zero_centered_gamma` (Megatron-LM's `--apply-layernorm-1p`), on CPU.

megatron-core computes the `+1` only in Transformer Engine's norms and Apex's FusedLayerNorm (the
local spec's torch norm asserts the switch is off), and neither runs here. `ZeroCentredNorm`
computes what they compute: the weight (and LayerNorm bias) start at 0 and the norm scales by
`1 + weight`. Its parameters are named as the local spec's, so the checkpoints are those of a
model trained with the switch on. Runs inside the spawned interpreter only.
"""

from __future__ import annotations

from typing import Any

import torch


class ZeroCentredNorm(torch.nn.Module):
    """RMSNorm or LayerNorm (per `config.normalization`) scaling by `1 + weight`."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__()
        self.shape = (hidden_size,)
        self.eps = eps
        self.rms = config.normalization == "RMSNorm"
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        if not self.rms:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.weight + 1
        if self.rms:
            return torch.nn.functional.rms_norm(x, self.shape, gamma, self.eps)
        return torch.nn.functional.layer_norm(x, self.shape, gamma, self.bias, self.eps)


def use_zero_centred_norms(layer_spec: Any) -> Any:
    """`layer_spec` (a local-spec transformer layer) with every norm zero-centred: input,
    pre-MLP and q/k norms, and the final norm (the block's module-level `LayerNormImpl`)."""
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.identity_op import IdentityOp

    layer = layer_spec.submodules
    layer.input_layernorm = ZeroCentredNorm
    layer.pre_mlp_layernorm = ZeroCentredNorm
    attention = layer.self_attention.submodules
    for name in ("q_layernorm", "k_layernorm"):
        if getattr(attention, name) is not IdentityOp:
            setattr(attention, name, ZeroCentredNorm)
    transformer_block.LayerNormImpl = ZeroCentredNorm
    return layer_spec
