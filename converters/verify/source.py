"""The Megatron side of a verification: a layer's tensors merged from the checkpoint's TP shards
(through the readers in converters/megatron, reading only that layer's tensors), computed with
Megatron's own layouts: the fused QKV grouped per KV head ([q heads, k, v] for each group) and
the gated fc1 as [gate; up]. Nothing here shares code with the converters' re-shard rules: the
point is an independent computation of what the checkpoint means."""

from __future__ import annotations

import torch

from converters.megatron.layout import SourceCheckpoint
from converters.model import ModelConfig
from converters.verify import layers
from converters.verify.model_math import ModelMath, RopeScaling
from converters.verify.side import LOGIT_ROWS, Part, Side, Trace

_ROPE_CONSTANTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def source_math(cfg: ModelConfig) -> ModelMath:
    """What a Megatron model with `args` → `cfg` computes."""
    rope = cfg.position_embedding_type == "rope"
    scaling = None
    if rope and cfg.rope_scaling_factor is not None:
        scaling = RopeScaling(cfg.rope_scaling_factor, **_ROPE_CONSTANTS)
    return ModelMath(
        layers=cfg.num_layers,
        hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        groups=cfg.num_query_groups,
        head_dim=cfg.kv_channels,
        ffn=cfg.ffn_hidden_size,
        vocab=cfg.vocab_size,
        norm=cfg.normalization,
        eps=cfg.norm_epsilon,
        activation=cfg.activation,
        gated=cfg.gated_mlp,
        learned_positions=not rope,
        max_positions=cfg.max_position_embeddings,
        rope_base=cfg.rotary_base,
        rope_dim=int(cfg.kv_channels * cfg.rotary_percent) if rope else 0,
        rope_scaling=scaling,
        qk_norm=cfg.qk_layernorm,
    )


class MegatronSide(Side):
    """A Megatron checkpoint (any layout the readers open), one layer part at a time."""

    def __init__(self, source: SourceCheckpoint) -> None:
        self.source = source
        self.cfg = source.config
        self.math = source_math(self.cfg)
        self.where = str(source.path)
        self.dtype = self.cfg.dtype

    # ── tensors ────────────────────────────────────────────────────────────────────────────
    def _read(self, name: str) -> torch.Tensor | None:
        """The canonical tensor `name` as float32, None when the checkpoint has none."""
        if not self.source.has(name):
            return None
        return self.source.tensor(name).materialize().to(torch.float32)

    def _norm(self, name: str) -> torch.Tensor | None:
        weight = self._read(name)
        if weight is not None and name.endswith(".weight") and self.cfg.apply_layernorm_1p:
            weight = weight + 1.0  # stored zero-centred
        return weight

    def _qkv(self, layer: int, kind: str, which: str) -> torch.Tensor | None:
        """q, k or v rows of the fused QKV weight/bias: [ng, q + 2, d, ...] per KV group."""
        fused = self.source_tensor(f"decoder.layers.{layer}.self_attention.linear_qkv.{kind}")
        if fused is None:
            return None
        m = self.math
        grouped = fused.reshape(m.groups, m.q_per_kv + 2, m.head_dim, *fused.shape[1:])
        picked = {
            "q": grouped[:, : m.q_per_kv],
            "k": grouped[:, m.q_per_kv],
            "v": grouped[:, m.q_per_kv + 1],
        }[which]
        return picked.reshape(-1, *fused.shape[1:]).to(torch.float32)

    def source_tensor(self, name: str) -> torch.Tensor | None:
        """The stored tensor (merged over TP, in its stored dtype), None when absent."""
        return self.source.tensor(name).materialize() if self.source.has(name) else None

    # ── parts ──────────────────────────────────────────────────────────────────────────────
    def embed(self, tokens: torch.Tensor) -> Part:
        words = self.source.tensor("embedding.word_embeddings.weight")
        x = torch.stack([words.narrow(0, int(t), 1).materialize()[0] for t in tokens])
        x = x.to(torch.float32)
        if self.math.learned_positions:
            positions = self.source.tensor("embedding.position_embeddings.weight")
            x = x + positions.narrow(0, 0, len(tokens)).materialize().to(torch.float32)
        return Part(x)

    def attention(self, layer: int, x: torch.Tensor) -> Part:
        p = f"decoder.layers.{layer}"
        names = {
            "norm.weight": f"{p}.input_layernorm.weight",
            "norm.bias": f"{p}.input_layernorm.bias",
            "q_norm.weight": f"{p}.self_attention.q_layernorm.weight",
            "q_norm.bias": f"{p}.self_attention.q_layernorm.bias",
            "k_norm.weight": f"{p}.self_attention.k_layernorm.weight",
            "k_norm.bias": f"{p}.self_attention.k_layernorm.bias",
            "o.weight": f"{p}.self_attention.linear_proj.weight",
        }

        def get(key: str) -> torch.Tensor | None:
            which, _, kind = key.partition(".")
            if which in ("q", "k", "v"):
                return self._qkv(layer, kind, which)
            return self._norm(names[key]) if "norm" in key else self._read(names[key])

        trace: dict[str, Trace] = {}
        out = layers.attention(
            get, x, self.math, self.math.heads, self.math.groups, _recorder(trace)
        )
        bias = self._read(f"{p}.self_attention.linear_proj.bias")
        return Part(out if bias is None else out + bias, trace)

    def mlp(self, layer: int, h: torch.Tensor) -> Part:
        p = f"decoder.layers.{layer}"
        ffn = self.math.ffn

        def fc1_half(kind: str, half: int) -> torch.Tensor | None:
            name = f"{p}.mlp.linear_fc1.{kind}"
            if not self.source.has(name):
                return None
            return self.source.tensor(name).narrow(0, half * ffn, ffn).materialize().float()

        def get(key: str) -> torch.Tensor | None:
            which, _, kind = key.partition(".")
            if which == "norm":
                return self._norm(f"{p}.pre_mlp_layernorm.{kind}")
            if which == "gate":  # the activated half of [gate; up]
                return fc1_half(kind, 0)
            if which == "up":
                return fc1_half(kind, 1)
            if which == "fc":
                return self._read(f"{p}.mlp.linear_fc1.{kind}")
            if which == "down" and kind == "weight":
                return self._read(f"{p}.mlp.linear_fc2.weight")
            raise KeyError(key)

        trace: dict[str, Trace] = {}
        out = layers.mlp(get, h, self.math, _recorder(trace))
        bias = self._read(f"{p}.mlp.linear_fc2.bias")
        return Part(out if bias is None else out + bias, trace)

    def head(self, x: torch.Tensor) -> Part:
        normed = layers.normalize(
            x,
            self._norm("decoder.final_layernorm.weight"),
            self._norm("decoder.final_layernorm.bias"),
            self.math,
        )
        name = (
            "embedding.word_embeddings.weight"
            if self.cfg.tied_embeddings
            else "output_layer.weight"
        )
        table = self.source.tensor(name)
        chunks = []
        for start in range(0, table.shape[0], LOGIT_ROWS):
            rows = min(LOGIT_ROWS, table.shape[0] - start)
            chunks.append(normed @ table.narrow(0, start, rows).materialize().float().t())
        return Part(torch.cat(chunks, dim=-1), {"final norm": Trace(normed)})


def _recorder(trace: dict[str, Trace]) -> layers.Record:
    def record(name: str, value: torch.Tensor) -> None:
        trace[name] = Trace(value)

    return record


def source_reads(source: SourceCheckpoint) -> list:
    """Every stored tensor a verification reads (for fetching a remote source's bytes first)."""
    from converters.megatron import names

    wanted = list(names.GLOBAL_PARAMS)
    for layer in range(source.config.num_layers):
        wanted += [names.layer_name(layer, suffix) for suffix in names.LAYER_PARAMS]
    return [source.tensor(name) for name in wanted if source.has(name)]
