"""The Hugging Face side: `config.json` + `model.safetensors` (or shards and their index), each
layer computed from its own tensors (`model.layers.{i}.…`), as transformers' Llama, Qwen2 and
Qwen3 models define them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from converters.verify import layers
from converters.verify.files import BadExport, TensorFiles
from converters.verify.model_math import ModelMath, Moe, RopeScaling
from converters.verify.side import LOGIT_ROWS, Part, Side, Trace, rotary

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gemma")
# Where a mixture-of-experts model keeps its block (under `model.layers.{i}.`), router and
# experts' gate / up / down projections.
MOE_NAMES = {
    "mixtral": ("block_sparse_moe", "gate", "w1", "w3", "w2"),
    "qwen3_moe": ("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
}
INDEX = "model.safetensors.index.json"
_ACTS = {"silu": "silu", "gelu": "gelu", "relu": "relu", "gelu_pytorch_tanh": "gelu_tanh"}


def _need(cfg: dict[str, Any], key: str, path: Path) -> Any:
    if cfg.get(key) is None:
        raise BadExport(f"lacks the field {key!r}", path)
    return cfg[key]


def _rope(cfg: dict[str, Any], path: Path) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) as transformers ≥ 5 reads them: `rope_scaling` when given (it overrides),
    else `rope_parameters`, else the v4 `rope_theta`."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise BadExport(f"rope type {kind!r} is not verified (default, llama3)", path)
    keys = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, RopeScaling(
        float(scaling["factor"]), **{k: scaling[k] for k in keys if k in scaling}
    )


def _moe(cfg: dict[str, Any], path: Path) -> Moe | None:
    """Mixtral (every layer, top-k renormalised) or Qwen3-MoE (`norm_topk_prob`, dense
    `mlp_only_layers`, `decoder_sparse_step`) experts; None for a dense model."""
    model_type = cfg["model_type"]
    if model_type not in MOE_NAMES:
        return None
    layers = int(_need(cfg, "num_hidden_layers", path))
    if model_type == "mixtral":
        experts, ffn = int(_need(cfg, "num_local_experts", path)), int(cfg["intermediate_size"])
        return Moe(experts, int(_need(cfg, "num_experts_per_tok", path)), ffn, pre_softmax=False)
    step = int(cfg.get("decoder_sparse_step") or 1)
    only_mlp = set(cfg.get("mlp_only_layers") or [])
    dense = tuple(i for i in range(layers) if i in only_mlp or (i + 1) % step)
    return Moe(
        experts=int(_need(cfg, "num_experts", path)),
        top_k=int(_need(cfg, "num_experts_per_tok", path)),
        ffn=int(_need(cfg, "moe_intermediate_size", path)),
        pre_softmax=not cfg.get("norm_topk_prob", False),
        dense_layers=dense,
    )


def hf_math(cfg: dict[str, Any], path: Path) -> ModelMath:
    """What a Hugging Face `config.json` of a Llama-style model says it computes."""
    model_type = _need(cfg, "model_type", path)
    if model_type not in MODEL_TYPES:
        raise BadExport(
            f"model_type {model_type!r} is not verified ({', '.join(MODEL_TYPES)})", path
        )
    hidden, heads = (
        int(_need(cfg, "hidden_size", path)),
        int(_need(cfg, "num_attention_heads", path)),
    )
    act = cfg.get("hidden_act", "silu")
    gemma = model_type == "gemma"  # scales by sqrt(hidden) and 1 + w; reads hidden_activation
    if gemma:
        act = cfg.get("hidden_activation") or act
    if act not in _ACTS:
        raise BadExport(f"hidden_act {act!r} is not verified", path)
    theta, scaling = _rope(cfg, path)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    moe = _moe(cfg, path)
    return ModelMath(
        layers=int(_need(cfg, "num_hidden_layers", path)),
        hidden=hidden,
        heads=heads,
        groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn=0 if moe and not moe.dense_layers else int(_need(cfg, "intermediate_size", path)),
        vocab=int(_need(cfg, "vocab_size", path)),
        norm="RMSNorm",
        eps=float(cfg.get("rms_norm_eps", 1e-6)),
        activation=_ACTS[act],
        gated=True,
        learned_positions=False,
        max_positions=int(cfg.get("max_position_embeddings") or 0),
        rope_base=theta,
        rope_dim=int(head_dim * float(cfg.get("partial_rotary_factor", 1.0))),
        rope_scaling=scaling,
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        moe=moe,
        embed_scale=hidden**0.5 if gemma else 1.0,
        norm_offset=1.0 if gemma else 0.0,
    )


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint: the index's, or `model.safetensors`."""
    index = directory / INDEX
    if not index.is_file():
        return [directory / "model.safetensors"]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BadExport(f"not a safetensors index: {exc}", index) from None
    names = sorted(set(weight_map.values()))
    for name in names:
        if "/" in name or name.startswith("."):
            raise BadExport(f"weight file {name!r} lies outside the checkpoint", index)
    return [directory / name for name in names]


class HfSide(Side):
    """A Hugging Face checkpoint directory, one layer's tensors at a time."""

    def __init__(self, directory: Path, cfg: dict[str, Any]) -> None:
        path = directory / "config.json"
        self.where, self.cfg = str(directory), cfg
        self.math = hf_math(cfg, path)
        self.files = TensorFiles.of(weight_files(directory))
        model_type = cfg["model_type"]
        attention_bias = bool(cfg.get("attention_bias", False))
        self.qkv_bias = attention_bias or model_type == "qwen2"
        self.o_bias = attention_bias and model_type != "qwen2"
        self.mlp_bias = bool(cfg.get("mlp_bias", False))
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        self.dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or self.files.dtype())

    def layer_label(self, layer: int) -> str:
        return f"model.layers.{layer}"

    def _get(self, name: str, present: bool, shape: tuple[int, ...]) -> torch.Tensor | None:
        if present:
            return self.files.get(name, shape)
        if self.files.has(name):
            raise BadExport(
                f"tensor {name} is present, but config.json says there is none", self.where
            )
        return None

    def embed(self, tokens: torch.Tensor) -> Part:
        name = "model.embed_tokens.weight"
        self._check_table(name)
        x = torch.cat([self.files.rows(name, int(t), 1) for t in tokens]) * self.math.embed_scale
        return Part(x, origin=name)

    def _check_table(self, name: str) -> None:
        shape = self.files.shape(name)
        expected = (self.math.vocab, self.math.hidden)
        if shape != expected:
            raise BadExport(f"tensor {name} has shape {shape}, expected {expected}", self.where)

    def attention(self, layer: int, x: torch.Tensor) -> Part:
        m, p = self.math, f"model.layers.{layer}"
        d, q_rows, kv_rows = m.head_dim, m.heads * m.head_dim, m.groups * m.head_dim

        def get(key: str) -> torch.Tensor | None:
            which, _, kind = key.partition(".")
            weight = kind == "weight"
            if which in ("q", "k", "v"):
                rows = q_rows if which == "q" else kv_rows
                shape = (rows, m.hidden) if weight else (rows,)
                return self._get(
                    f"{p}.self_attn.{which}_proj.{kind}", weight or self.qkv_bias, shape
                )
            if which == "norm":
                return self._get(f"{p}.input_layernorm.{kind}", weight, (m.hidden,))
            if which in ("q_norm", "k_norm"):
                return self._get(f"{p}.self_attn.{which}.{kind}", m.qk_norm and weight, (d,))
            if key == "o.weight":
                return self._get(f"{p}.self_attn.o_proj.weight", True, (m.hidden, q_rows))
            raise KeyError(key)

        trace: dict[str, Trace] = {}

        def record(name: str, value: torch.Tensor) -> None:
            which = name[0]
            origin = {
                "q": f"{p}.self_attn.{which}_proj",
                "k": f"{p}.self_attn.{which}_proj",
                "v": f"{p}.self_attn.{which}_proj",
                "q (normed, rotated)": rotary(f"{p}.self_attn.q_norm", m.qk_norm),
                "k (normed, rotated)": rotary(f"{p}.self_attn.k_norm", m.qk_norm),
                "context": f"attention over q, k, v of {p}",
            }[name]
            trace[name] = Trace(value, origin)

        out = layers.attention(get, x, m, m.heads, m.groups, record)
        if not m.qk_norm:
            self._get(f"{p}.self_attn.q_norm.weight", False, (d,))
        bias = self._get(f"{p}.self_attn.o_proj.bias", self.o_bias, (m.hidden,))
        return Part(out if bias is None else out + bias, trace, f"{p}.self_attn.o_proj.weight")

    def mlp(self, layer: int, h: torch.Tensor) -> Part:
        if self.math.is_moe_layer(layer):
            return self._moe(layer, h)
        m, p = self.math, f"model.layers.{layer}"

        def get(key: str) -> torch.Tensor | None:
            which, _, kind = key.partition(".")
            weight = kind == "weight"
            if which == "norm":
                return self._get(f"{p}.post_attention_layernorm.{kind}", weight, (m.hidden,))
            if which in ("gate", "up"):
                shape = (m.ffn, m.hidden) if weight else (m.ffn,)
                return self._get(f"{p}.mlp.{which}_proj.{kind}", weight or self.mlp_bias, shape)
            if key == "down.weight":
                return self._get(f"{p}.mlp.down_proj.weight", True, (m.hidden, m.ffn))
            raise KeyError(key)

        trace: dict[str, Trace] = {}

        def record(name: str, value: torch.Tensor) -> None:
            trace[name] = Trace(value, f"{p}.mlp.{name}_proj", 1, -1)

        out = layers.mlp(get, h, m, record)
        bias = self._get(f"{p}.mlp.down_proj.bias", self.mlp_bias, (m.hidden,))
        return Part(out if bias is None else out + bias, trace, f"{p}.mlp.down_proj.weight")

    def _moe(self, layer: int, h: torch.Tensor) -> Part:
        m, p = self.math, f"model.layers.{layer}"
        assert m.moe is not None
        block, router, *projections = MOE_NAMES[self.cfg["model_type"]]
        stored = dict(zip(("gate", "up", "down"), projections, strict=True))
        ffn, experts = m.moe.ffn, f"{p}.{block}.experts"

        def get(key: str) -> torch.Tensor | None:
            which, _, rest = key.partition(".")
            if which == "norm":
                return self._get(
                    f"{p}.post_attention_layernorm.{rest}", rest == "weight", (m.hidden,)
                )
            if which == "router":
                name = f"{p}.{block}.{router}.{rest}"
                return self._get(name, rest == "weight", (m.moe.experts, m.hidden))
            if which == "experts":
                e, _, inner = rest.partition(".")
                proj, _, kind = inner.partition(".")
                shape = (m.hidden, ffn) if proj == "down" else (ffn, m.hidden)
                return self._get(f"{experts}.{e}.{stored[proj]}.{kind}", kind == "weight", shape)
            raise KeyError(key)

        trace: dict[str, Trace] = {}

        def record(name: str, value: torch.Tensor) -> None:
            where = f"{p}.{block}.{router}" if name == "router" else f"{experts}.{name[7:]}"
            trace[name] = Trace(value, where)

        out = layers.moe(get, h, m, record)
        return Part(out, trace, f"{experts}.*.{stored['down']}.weight")

    def head(self, x: torch.Tensor) -> Part:
        m = self.math
        normed = layers.normalize(x, self._get("model.norm.weight", True, (m.hidden,)), None, m)
        name = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        self._check_table(name)
        if self.tied:
            self._get("lm_head.weight", False, (m.vocab, m.hidden))
        chunks = [
            normed @ self.files.rows(name, start, min(LOGIT_ROWS, m.vocab - start)).t()
            for start in range(0, m.vocab, LOGIT_ROWS)
        ]
        return Part(
            torch.cat(chunks, dim=-1), {"final norm": Trace(normed, "model.norm.weight")}, name
        )

    def unused(self) -> list[str]:
        return self.files.unused()

    def close(self) -> None:
        self.files.close()
