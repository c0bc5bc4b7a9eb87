"""The Megatron side of a verification: a layer's tensors merged from the checkpoint's TP shards
(through the readers in converters/megatron, reading only that layer's tensors), computed with
Megatron's own layouts: the fused QKV grouped per KV head ([q heads, k, v] for each group) and
the gated fc1 as [gate; up]. Nothing here shares code with the converters' re-shard rules: the
point is an independent computation of what the checkpoint means."""

from __future__ import annotations

import torch

from converters.errors import UnsupportedModel
from converters.megatron import names
from converters.megatron.layout import SourceCheckpoint
from converters.model import LLAMA3_ROPE_CONSTANTS, ModelConfig
from converters.torch_arrays import materialize
from converters.verify import layers
from converters.verify.model_math import ModelMath, Moe, RopeScaling
from converters.verify.side import LOGIT_ROWS, Part, Side, Trace


def _moe(cfg: ModelConfig) -> Moe | None:
    """The routed experts of `cfg` (None: dense), refusing routing the reference does not compute."""
    if not cfg.is_moe:
        return None
    refused = [
        what
        for what, present in (
            (
                f"{cfg.moe_router_score_function} router scores",
                cfg.moe_router_score_function != "softmax",
            ),
            ("a router expert bias", cfg.moe_router_enable_expert_bias),
            ("top-k scaling", cfg.moe_router_topk_scaling_factor not in (None, 1, 1.0)),
            ("group-limited routing", bool(cfg.moe_router_num_groups)),
        )
        if present
    ]
    if refused:
        raise UnsupportedModel(f"porter verify does not compute {', '.join(refused)} yet")
    return Moe(
        experts=cfg.num_experts,
        top_k=cfg.moe_router_topk,
        ffn=cfg.expert_ffn_hidden_size,
        pre_softmax=cfg.moe_router_pre_softmax,
        dense_layers=tuple(i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)),
        shared_ffn=cfg.moe_shared_expert_intermediate_size or 0,
        shared_gate=cfg.moe_shared_expert_gate,
    )


def source_math(cfg: ModelConfig) -> ModelMath:
    """What a Megatron model with `args` → `cfg` computes."""
    moe = _moe(cfg)
    rope = cfg.position_embedding_type == "rope"
    scaling = None
    if rope and cfg.rope_scaling_factor is not None:
        scaling = RopeScaling(cfg.rope_scaling_factor, **LLAMA3_ROPE_CONSTANTS)
    return ModelMath(
        layers=cfg.num_layers,
        hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        groups=cfg.num_query_groups,
        head_dim=cfg.kv_channels,
        # a model whose every layer has experts has no plain MLP (an HF Mixtral's
        # intermediate_size is its experts')
        ffn=0 if moe and not moe.dense_layers else cfg.ffn_hidden_size,
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
        moe=moe,
        embed_scale=cfg.embedding_multiplier or 1.0,
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
        return materialize(self.source.tensor(name)).to(torch.float32)

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
        return materialize(self.source.tensor(name)) if self.source.has(name) else None

    # ── parts ──────────────────────────────────────────────────────────────────────────────
    def embed(self, tokens: torch.Tensor) -> Part:
        words = self.source.tensor("embedding.word_embeddings.weight")
        x = torch.stack([materialize(words.narrow(0, int(t), 1))[0] for t in tokens])
        x = x.to(torch.float32) * self.math.embed_scale
        if self.math.learned_positions:
            positions = self.source.tensor("embedding.position_embeddings.weight")
            x = x + materialize(positions.narrow(0, 0, len(tokens))).to(torch.float32)
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

    def _fc1_half(self, name: str, half: int) -> torch.Tensor | None:
        """The gate (0) or up (1) half of a `[gate; up]` fc1 weight or bias."""
        if not self.source.has(name):
            return None
        fc1 = self.source.tensor(name)
        rows = fc1.shape[0] // 2
        return materialize(fc1.narrow(0, half * rows, rows)).float()

    def _feed_forward(self, key: str, fc1: str, fc2: str) -> torch.Tensor | None:
        """gate / up / fc / down of an MLP stored as `fc1` ([gate; up] when gated) and `fc2`."""
        which, _, kind = key.partition(".")
        if which in ("gate", "up"):
            return self._fc1_half(f"{fc1}.{kind}", 0 if which == "gate" else 1)
        if which == "fc":
            return self._read(f"{fc1}.{kind}")
        if which == "down" and kind == "weight":
            return self._read(f"{fc2}.weight")
        raise KeyError(key)

    def mlp(self, layer: int, h: torch.Tensor) -> Part:
        p = f"decoder.layers.{layer}"
        moe = self.math.is_moe_layer(layer)

        def get(key: str) -> torch.Tensor | None:
            which, _, rest = key.partition(".")
            if which == "norm":
                return self._norm(f"{p}.pre_mlp_layernorm.{rest}")
            if which == "router":
                return self._read(f"{p}.mlp.router.{rest}")
            if which == "experts":
                expert, _, inner = rest.partition(".")
                e = int(expert)
                return self._feed_forward(
                    inner,
                    names.expert_name(layer, e, "linear_fc1"),
                    names.expert_name(layer, e, "linear_fc2"),
                )
            if which == "shared":
                shared = f"{p}.mlp.shared_experts"
                return self._feed_forward(rest, f"{shared}.linear_fc1", f"{shared}.linear_fc2")
            if which == "shared_gate":
                return self._read(f"{p}.mlp.shared_experts.gate_weight")
            return self._feed_forward(key, f"{p}.mlp.linear_fc1", f"{p}.mlp.linear_fc2")

        trace: dict[str, Trace] = {}
        part = layers.moe if moe else layers.mlp
        out = part(get, h, self.math, _recorder(trace))
        bias = None if moe else self._read(f"{p}.mlp.linear_fc2.bias")
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
            chunks.append(normed @ materialize(table.narrow(0, start, rows)).float().t())
        return Part(torch.cat(chunks, dim=-1), {"final norm": Trace(normed)})


def _recorder(trace: dict[str, Trace]) -> layers.Record:
    def record(name: str, value: torch.Tensor) -> None:
        trace[name] = Trace(value)

    return record


def source_reads(source: SourceCheckpoint) -> list:
    """Every stored tensor a verification reads (for fetching a remote source's bytes first)."""
    wanted = list(names.GLOBAL_PARAMS)
    for layer in range(source.config.num_layers):
        wanted += [names.layer_name(layer, suffix) for suffix in names.LAYER_PARAMS]
        for expert in range(source.config.num_experts):
            wanted += [names.expert_name(layer, expert, param) for param in names.EXPERT_PARAMS]
    return [source.tensor(name) for name in wanted if source.has(name)]
