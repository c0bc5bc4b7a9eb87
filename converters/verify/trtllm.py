"""The TensorRT-LLM side: `config.json` + `rank{N}.safetensors`, computed as the ranks would.

Every tensor-parallel rank computes its partial result from its own slices only (its query heads,
its KV heads, its rows of the MLP), with its own copy of the replicated norms; the partial sums
of the row-parallel output projections are reduced as the engine's all-reduce would, and the
vocab-parallel embedding and the `lm_head` columns gathered. Pipeline stages hold their layers
under local numbers (`transformer.layers.0` of stage 1 is layer L/P)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from converters.verify import layers
from converters.verify.files import BadExport, TensorFiles
from converters.verify.model_math import ModelMath, RopeScaling
from converters.verify.side import LOGIT_ROWS, Part, Side, Trace, gather, rotary
from converters.verify.trtllm_moe import moe_part, moe_split, trtllm_moe

ARCHITECTURES = (
    "GPTForCausalLM",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "GemmaForCausalLM",
)
_ACTS = {"gelu_pytorch_tanh": ("gelu_tanh", False)}
_ACTS |= {"silu": ("silu", False), "swiglu": ("silu", True), "gelu": ("gelu", False)}
_ACTS |= {"geglu": ("gelu", True), "relu": ("relu", False), "gelu_new": ("gelu", False)}


@dataclass(frozen=True)
class _Biases:
    qkv: bool
    dense: bool
    mlp: bool
    norm: bool


def _need(cfg: dict[str, Any], key: str, path: Path) -> Any:
    if key not in cfg:
        raise BadExport(f"lacks the field {key!r}", path)
    return cfg[key]


def _rope_scaling(raw: Any, path: Path) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type") or raw.get("type")
    if kind != "llama3":
        raise BadExport(f"rotary_scaling of type {kind!r} is not verified (only llama3)", path)
    keys = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return RopeScaling(float(raw["factor"]), **{k: raw[k] for k in keys if k in raw})


def trtllm_math(cfg: dict[str, Any], path: Path) -> tuple[ModelMath, _Biases]:
    """What a TensorRT-LLM `config.json` says its model computes, and which biases it has."""
    arch = _need(cfg, "architecture", path)
    if arch not in ARCHITECTURES:
        raise BadExport(f"architecture {arch!r} is not verified ({', '.join(ARCHITECTURES)})", path)
    hidden, heads = (
        int(_need(cfg, "hidden_size", path)),
        int(_need(cfg, "num_attention_heads", path)),
    )
    head_dim = int(cfg.get("head_size") or hidden // heads)
    act = _need(cfg, "hidden_act", path)
    if act not in _ACTS:
        raise BadExport(f"hidden_act {act!r} is not verified", path)
    activation, gated = _ACTS[act]
    gpt = arch == "GPTForCausalLM"
    if not gpt:
        gated = True  # Llama-style models always have a gated MLP ("silu" means SwiGLU)
    positions = _need(cfg, "position_embedding_type", path)
    if positions not in ("learned_absolute", "rope_gpt_neox"):
        raise BadExport(f"position_embedding_type {positions!r} is not verified", path)
    rope_dim = 0
    if positions == "rope_gpt_neox":
        rope_dim = int(
            cfg.get("rotary_embedding_dim") or head_dim * float(cfg.get("rotary_pct", 1.0))
        )
    if gpt:
        bias = bool(cfg.get("bias", True))
        biases = _Biases(bias, bias, bias, True)
    else:
        attn = bool(cfg.get("attn_bias", False))
        dense = attn and arch != "Qwen2ForCausalLM"
        biases = _Biases(attn, dense, bool(cfg.get("mlp_bias", False)), False)
    moe = trtllm_moe(cfg, path)
    quant = cfg.get("quantization") or {}
    if quant.get("quant_algo") or quant.get("kv_cache_quant_algo"):
        raise BadExport(f"quantized exports are not verified ({quant})", path)
    math = ModelMath(
        layers=int(_need(cfg, "num_hidden_layers", path)),
        hidden=hidden,
        heads=heads,
        groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn=0 if moe else int(_need(cfg, "intermediate_size", path)),
        vocab=int(_need(cfg, "vocab_size", path)),
        norm="LayerNorm" if gpt else "RMSNorm",
        eps=float(cfg.get("norm_epsilon", 1e-5)),
        activation=activation,
        gated=gated,
        learned_positions=positions == "learned_absolute",
        max_positions=int(cfg.get("max_position_embeddings") or 0),
        rope_base=float(cfg.get("rotary_base", 10000.0)),
        rope_dim=rope_dim,
        rope_scaling=_rope_scaling(cfg.get("rotary_scaling"), path),
        qk_norm=bool(cfg.get("qk_layernorm", False)),
        moe=moe,
        # TensorRT-LLM's Gemma scales the embedding lookup at run time; its norms are stored +1
        embed_scale=hidden**0.5 if arch == "GemmaForCausalLM" else 1.0,
    )
    return math, biases


class TrtllmSide(Side):
    """A TensorRT-LLM checkpoint directory, computed rank by rank."""

    def __init__(self, directory: Path, cfg: dict[str, Any]) -> None:
        path = directory / "config.json"
        self.where, self.cfg = str(directory), cfg
        self.math, self.biases = trtllm_math(cfg, path)
        mapping = _need(cfg, "mapping", path)
        self.tp, self.pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
        world = self.tp * self.pp
        if int(mapping.get("world_size", world)) != world:
            raise BadExport(f"mapping.world_size is not tp_size x pp_size ({mapping})", path)
        m = self.math
        self.moe_split = moe_split(cfg, m, self.tp, path) if m.moe else (1, 1)
        for what, total, parts in (
            ("num_attention_heads", m.heads, self.tp),
            ("intermediate_size", m.ffn, self.tp),
            ("num_hidden_layers", m.layers, self.pp),
        ):
            if total % parts:
                raise BadExport(f"{what}={total} does not split over {parts} ranks", path)
        expected = {f"rank{r}.safetensors" for r in range(world)}
        extra = sorted(
            p.name for p in directory.glob("rank*.safetensors") if p.name not in expected
        )
        if extra:
            raise BadExport(f"rank files beyond world_size {world}: {', '.join(extra)}", directory)
        self.ranks = [TensorFiles.of([directory / f"rank{r}.safetensors"]) for r in range(world)]
        self.dtype = str(cfg.get("dtype", "float32"))
        self.heads_l = m.heads // self.tp
        self.groups_l = max(1, m.groups // self.tp)
        self.ffn_l = m.ffn // self.tp
        self.per_stage = m.layers // self.pp
        self.parallel_embedding = bool(cfg.get("use_parallel_embedding", False)) and self.tp > 1
        self.sharding_dim = int(cfg.get("embedding_sharding_dim", 0))

    # ── where things are ───────────────────────────────────────────────────────────────────
    def _stage(self, layer: int) -> tuple[list[TensorFiles], str, str]:
        """(the stage's rank files, the layer's local prefix, the files' names) of a layer."""
        stage, local = divmod(layer, self.per_stage)
        first = stage * self.tp
        files = self.ranks[first : first + self.tp]
        names = f"rank{first}" + (f"..rank{first + self.tp - 1}" if self.tp > 1 else "")
        return files, f"transformer.layers.{local}", f"{names}.safetensors"

    def layer_label(self, layer: int) -> str:
        _, prefix, files = self._stage(layer)
        return f"{prefix} in {files}"

    def _optional(self, f: TensorFiles, name: str, present: bool, shape: tuple[int, ...]):
        if present:
            return f.get(name, shape)
        if f.has(name):
            raise BadExport(
                f"tensor {name} is present, but config.json says there is none", self.where
            )
        return None

    # ── parts ──────────────────────────────────────────────────────────────────────────────
    def embed(self, tokens: torch.Tensor) -> Part:
        m = self.math
        x = self._lookup("transformer.vocab_embedding.weight", m.vocab, tokens) * m.embed_scale
        if m.learned_positions:
            x = x + self._lookup(
                "transformer.position_embedding.weight",
                m.max_positions,
                torch.arange(len(tokens)),
            )
        return Part(x, origin="transformer.vocab_embedding.weight in rank0.safetensors")

    def _lookup(self, name: str, rows: int, ids: torch.Tensor) -> torch.Tensor:
        """An embedding lookup on the first stage (vocab-parallel: reduced over the ranks)."""
        stage0, h = self.ranks[: self.tp], self.math.hidden
        if not self.parallel_embedding:
            f = stage0[0]
            f.shape(name)  # marks it read
            for other in stage0[1:]:
                other.used.add(name)
            return torch.cat([f.rows(name, int(i), 1) for i in ids])
        if self.sharding_dim == 1:
            cols = [torch.cat([f.rows(name, int(i), 1) for i in ids]) for f in stage0]
            return torch.cat(cols, dim=-1)
        per_rank = -(-rows // self.tp)
        out = torch.zeros(len(ids), h)
        for n, i in enumerate(ids):
            rank, local = divmod(int(i), per_rank)
            out[n] = stage0[rank].rows(name, local, 1)[0]
        for f in stage0:
            f.used.add(name)
        return out

    def attention(self, layer: int, x: torch.Tensor) -> Part:
        m, b = self.math, self.biases
        files, p, where = self._stage(layer)
        d, hq, hk = m.head_dim, self.heads_l, self.groups_l
        qkv_rows = (hq + 2 * hk) * d
        traces: dict[str, list[torch.Tensor]] = {}
        partials = []
        for f in files:
            cache: dict[str, torch.Tensor | None] = {}

            def fused(kind: str, f: TensorFiles = f, cache: dict = cache) -> torch.Tensor | None:
                if kind not in cache:
                    shape = (qkv_rows, m.hidden) if kind == "weight" else (qkv_rows,)
                    present = kind == "weight" or b.qkv
                    cache[kind] = self._optional(f, f"{p}.attention.qkv.{kind}", present, shape)
                return cache[kind]

            def get(key: str, f: TensorFiles = f, fused=fused) -> torch.Tensor | None:
                which, _, kind = key.partition(".")
                if which in ("q", "k", "v"):
                    t = fused(kind)
                    if t is None:
                        return None
                    start, rows = {"q": (0, hq), "k": (hq, hk), "v": (hq + hk, hk)}[which]
                    return t[start * d : (start + rows) * d]
                if which == "norm":
                    return self._optional(
                        f, f"{p}.input_layernorm.{kind}", kind == "weight" or b.norm, (m.hidden,)
                    )
                if which in ("q_norm", "k_norm"):
                    name = f"{p}.attention.{which[0]}_layernorm.{kind}"
                    return self._optional(f, name, m.qk_norm and (kind == "weight" or b.norm), (d,))
                if key == "o.weight":
                    return f.get(f"{p}.attention.dense.weight", (m.hidden, hq * d))
                raise KeyError(key)

            def record(name: str, value: torch.Tensor) -> None:
                traces.setdefault(name, []).append(value)

            partials.append(layers.attention(get, x, m, hq, hk, record))
        if not m.qk_norm:
            for f in files:  # a stored norm the config does not mention: refuse, never ignore
                self._optional(f, f"{p}.attention.q_layernorm.weight", False, (d,))
        out = torch.stack(partials).sum(0)  # the all-reduce after the row-parallel dense
        bias = self._optional(files[0], f"{p}.attention.dense.bias", b.dense, (m.hidden,))
        for f in files[1:]:
            self._optional(f, f"{p}.attention.dense.bias", b.dense, (m.hidden,))
        qkv = f"{p}.attention.qkv.weight" + (" / .bias" if b.qkv else "") + f" in {where}"
        origins = {
            "q": qkv,
            "k": qkv,
            "v": qkv,
            "q (normed, rotated)": rotary(f"{p}.attention.q_layernorm", m.qk_norm),
            "k (normed, rotated)": rotary(f"{p}.attention.k_layernorm", m.qk_norm),
            "context": f"attention over q, k, v of {where}",
        }
        trace = {
            name: self._gathered(name, values, origins[name]) for name, values in traces.items()
        }
        return Part(
            out if bias is None else out + bias, trace, f"{p}.attention.dense.weight in {where}"
        )

    def _gathered(self, name: str, values: list[torch.Tensor], origin: str) -> Trace:
        kv = name.startswith(("k", "v"))
        if kv and self.math.groups < self.tp:  # each KV head repeated over tp/groups ranks
            step = self.tp // self.math.groups
            values = values[::step]
            return Trace(gather(values, 1), origin, len(values), 1)
        return Trace(gather(values, 1), origin, len(values), 1)

    def mlp(self, layer: int, h: torch.Tensor) -> Part:
        m, b = self.math, self.biases
        files, p, where = self._stage(layer)
        if m.is_moe_layer(layer):
            return moe_part(files, p, where, h, m, self.moe_split)
        # TensorRT-LLM's `mlp.fc` is the activated input (Megatron's gate), `mlp.gate` the multiplier.
        stored = {"gate": "fc", "up": "gate", "fc": "fc"}
        traces: dict[str, list[torch.Tensor]] = {}
        partials = []
        for f in files:

            def get(key: str, f: TensorFiles = f) -> torch.Tensor | None:
                which, _, kind = key.partition(".")
                if which == "norm":
                    return self._optional(
                        f, f"{p}.post_layernorm.{kind}", kind == "weight" or b.norm, (m.hidden,)
                    )
                if which in stored:
                    shape = (self.ffn_l, m.hidden) if kind == "weight" else (self.ffn_l,)
                    return self._optional(
                        f, f"{p}.mlp.{stored[which]}.{kind}", kind == "weight" or b.mlp, shape
                    )
                if key == "down.weight":
                    return f.get(f"{p}.mlp.proj.weight", (m.hidden, self.ffn_l))
                raise KeyError(key)

            def record(name: str, value: torch.Tensor) -> None:
                traces.setdefault(name, []).append(value)

            partials.append(layers.mlp(get, h, m, record))
            if not m.gated:
                self._optional(f, f"{p}.mlp.gate.weight", False, (self.ffn_l, m.hidden))
        out = torch.stack(partials).sum(0)
        bias = self._optional(files[0], f"{p}.mlp.proj.bias", b.mlp, (m.hidden,))
        for f in files[1:]:
            self._optional(f, f"{p}.mlp.proj.bias", b.mlp, (m.hidden,))
        trace = {
            name: Trace(gather(v, -1), f"{p}.mlp.{stored[name]}.weight in {where}", len(v), -1)
            for name, v in traces.items()
        }
        return Part(out if bias is None else out + bias, trace, f"{p}.mlp.proj.weight in {where}")

    def head(self, x: torch.Tensor) -> Part:
        m, b = self.math, self.biases
        last = self.ranks[-self.tp :]
        vocab_l = -(-m.vocab // self.tp)
        columns, normed_first = [], None
        for f in last:
            normed = layers.normalize(
                x,
                f.get("transformer.ln_f.weight", (m.hidden,)),
                self._optional(f, "transformer.ln_f.bias", b.norm, (m.hidden,)),
                m,
            )
            normed_first = normed if normed_first is None else normed_first
            shape = f.shape("lm_head.weight")
            if shape != (vocab_l, m.hidden):
                raise BadExport(
                    f"tensor lm_head.weight has shape {shape}, expected {(vocab_l, m.hidden)}",
                    f.locations["lm_head.weight"],
                )
            for start in range(0, vocab_l, LOGIT_ROWS):
                rows = f.rows("lm_head.weight", start, min(LOGIT_ROWS, vocab_l - start))
                columns.append(normed @ rows.t())
        logits = torch.cat(columns, dim=-1)[:, : m.vocab]
        assert normed_first is not None
        files = f"rank{self.tp * (self.pp - 1)}..rank{self.tp * self.pp - 1}.safetensors"
        return Part(
            logits,
            {"final norm": Trace(normed_first, f"transformer.ln_f.weight in {files}")},
            f"lm_head.weight in {files}",
        )

    def unused(self) -> list[str]:
        return [f"rank{r}: {name}" for r, f in enumerate(self.ranks) for name in f.unused()]

    def close(self) -> None:
        for f in self.ranks:
            f.close()
