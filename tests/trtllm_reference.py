"""Test oracle: a float32 reference forward pass over a TensorRT-LLM checkpoint.

It reads ``config.json`` plus ``rank{N}.safetensors`` (spec §2/§3) and runs the model the way
TensorRT-LLM's tensor parallelism does: every TP rank computes its partial result from only its own
tensors, and the partials are combined like the engine's collectives would (all-reduce after the
row-parallel ``dense``/``mlp.proj``, all-gather of the ``lm_head`` columns, all-reduce of a
vocab-parallel embedding lookup).  Each rank also keeps its own copy of the residual stream and uses
its own copy of every replicated tensor, as a real engine would.

The arithmetic follows Megatron-core 0.16 so that a correct conversion reproduces the Megatron
model's logits:

* RoPE (``megatron/core/models/common/embeddings/rotary_pos_embedding.py`` and ``rope_utils.py``):
  ``inv_freq = 1 / base ** (arange(0, rot_dim, 2, float32) / rot_dim)``,
  ``freqs = outer(positions, inv_freq)``, ``emb = cat(freqs, freqs)``; applied to ``t[..., :rot_dim]``
  as ``t * cos(emb) + rotate_half(t) * sin(emb)`` with ``rotate_half([x1, x2]) = [-x2, x1]`` (the two
  halves of the *rotary* slice, not of the whole head); ``t[..., rot_dim:]`` passes through.
  ``rot_dim = int(head_size * rotary_percent)``.  TensorRT-LLM's ``rope_gpt_neox`` is the same
  non-interleaved rotate-half scheme on the first ``rotary_embedding_dim`` dims.
* RMSNorm: Megatron's local spec without Apex uses ``torch.nn.RMSNorm(hidden, eps)`` (see
  ``megatron/core/transformer/torch_norm.py``): ``x * rsqrt(mean(x**2) + eps) * weight``.
* gelu: ``TransformerConfig.activation_func`` defaults to ``F.gelu`` (exact erf form).  Note that
  Megatron's *fused* bias-gelu (``bias_activation_fusion=True``, the Megatron-LM training default
  ``--bias-gelu-fusion`` with ``add_bias_linear``) is the tanh approximation, and TensorRT-LLM's own
  ``functional.gelu`` is the tanh approximation too; pass ``gelu_approximate="tanh"`` to model that.
* Attention softmax scale ``1 / sqrt(head_size)`` (``DotProductAttention.softmax_scale``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from tests.trtllm_reference_moe import moe_mlp

__all__ = ["ReferenceError", "reference_logits"]


class ReferenceError(AssertionError):
    """The checkpoint is not a well-formed TensorRT-LLM checkpoint for its own config."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ReferenceError(msg)


class _RankFile:
    """One ``rank{N}.safetensors``: float32 tensors on demand, and a record of what was read."""

    def __init__(self, path: Path, rank: int) -> None:
        _check(path.is_file(), f"missing rank file {path}")
        self.path = path
        self.rank = rank
        self.tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                self.tensors[name] = f.get_tensor(name)
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        _check(name in self.tensors, f"rank{self.rank}: missing tensor {name!r} ({self.path})")
        t = self.tensors[name]
        self.used.add(name)
        _check(
            t.is_floating_point(),
            f"rank{self.rank}: tensor {name!r} has non-float dtype {t.dtype}",
        )
        if shape is not None:
            _check(
                tuple(t.shape) == tuple(shape),
                f"rank{self.rank}: tensor {name!r} has shape {tuple(t.shape)}, "
                f"expected {tuple(shape)}",
            )
        return t.to(torch.float32)

    def maybe(self, name: str, present: bool, shape: tuple[int, ...]) -> torch.Tensor | None:
        """A tensor whose presence the config decides (biases): required iff ``present``."""
        if present:
            return self.get(name, shape)
        _check(
            name not in self.tensors,
            f"rank{self.rank}: tensor {name!r} present but the config says there is none",
        )
        return None

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def _llama3_scaling(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3.1 frequency scaling, as megatron-core's ``RotaryEmbedding._apply_scaling`` (and HF's
    ``_compute_llama3_parameters``) compute it, from the four fields of ``rotary_scaling``."""
    for key in (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ):
        _check(key in scaling, f"rotary_scaling of type llama3 lacks {key!r}: {scaling}")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _rope(t: torch.Tensor, rot_dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """Megatron ``_apply_rotary_pos_emb_bshd`` (non-interleaved). ``t``: [seq, heads, d]."""
    seq = t.shape[0]
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    if scaling is not None:
        inv_freq = _llama3_scaling(inv_freq, scaling)
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)  # [seq, rot_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [seq, 1, rot_dim]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = torch.chunk(t_rot, 2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    t_rot = t_rot * torch.cos(emb) + rotated * torch.sin(emb)
    return torch.cat((t_rot, t_pass), dim=-1)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x @ w.t()
    return y if b is None else y + b


def _all_equal(tensors: list[torch.Tensor], what: str) -> None:
    for r, t in enumerate(tensors[1:], start=1):
        _check(
            torch.equal(tensors[0], t),
            f"replicated tensor {what!r} differs between tp rank 0 and tp rank {r}",
        )


def reference_logits(
    checkpoint_dir: Path,
    tokens: torch.Tensor,
    *,
    gelu_approximate: str = "none",
    strict: bool = True,
) -> torch.Tensor:
    """Run the model in a TensorRT-LLM checkpoint (config.json + rank{N}.safetensors) on `tokens`
    (int64 [seq]), computing as TensorRT-LLM's tensor parallelism does, and return float32 logits
    [seq, config.vocab_size].

    ``strict`` (default) also rejects rank files holding tensors the model does not use, replicated
    tensors that differ between TP ranks, and non-zero ``lm_head`` padding rows.
    """
    checkpoint_dir = Path(checkpoint_dir)
    cfg_path = checkpoint_dir / "config.json"
    _check(cfg_path.is_file(), f"missing {cfg_path}")
    cfg = json.loads(cfg_path.read_text())

    def need(key: str):
        _check(key in cfg, f"config.json lacks required field {key!r}")
        return cfg[key]

    arch = need("architecture")
    llama_style = (
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "MixtralForCausalLM",
        "GemmaForCausalLM",
    )
    _check(arch in ("GPTForCausalLM", *llama_style), f"unsupported architecture {arch!r}")
    is_llama = arch in llama_style
    moe = (cfg.get("moe") or {}).get("num_experts") and cfg["moe"]  # tests/trtllm_reference_moe.py
    qwen = arch.startswith("Qwen")
    # Gemma: GeGLU with tanh GELU; the runtime scales the embedding lookup by sqrt(hidden).
    gemma = arch == "GemmaForCausalLM"
    V = int(need("vocab_size"))
    h = int(need("hidden_size"))
    L = int(need("num_hidden_layers"))
    nh = int(need("num_attention_heads"))
    ng = int(cfg.get("num_key_value_heads") or nh)
    d = int(cfg.get("head_size") or h // nh)
    F_ = int(need("intermediate_size"))
    act_name = need("hidden_act")
    eps = float(cfg.get("norm_epsilon", 1e-5))
    pos_type = need("position_embedding_type")
    mapping = need("mapping")
    T = int(mapping.get("tp_size", 1))
    P = int(mapping.get("pp_size", 1))
    world = int(mapping.get("world_size", T * P))
    _check(world == T * P, f"mapping.world_size {world} != tp_size {T} * pp_size {P}")
    quant = cfg.get("quantization") or {}
    _check(
        quant.get("quant_algo") is None and quant.get("kv_cache_quant_algo") is None,
        f"quantized checkpoints are not supported by the reference: {quant}",
    )

    if is_llama:
        _check(pos_type == "rope_gpt_neox", f"Llama needs rope_gpt_neox, got {pos_type!r}")
        if gemma:
            _check(act_name == "gelu_pytorch_tanh", f"Gemma hidden_act is {act_name!r}")
        elif not moe:
            _check(act_name == "silu", f"Llama hidden_act must be 'silu', got {act_name!r}")
        gated = True
        attn_bias = bool(cfg.get("attn_bias", False))
        dense_bias = attn_bias and not qwen  # QWenDecoderLayer: Attention(dense_bias=False)
        mlp_bias = bool(cfg.get("mlp_bias", False))
        norm_bias = False
        if qwen:
            expected = arch.removesuffix("ForCausalLM").lower()
            _check(cfg.get("qwen_type") == expected, f"{arch} needs qwen_type {expected!r}")
        rope_scaling = cfg.get("rotary_scaling")
        if rope_scaling is not None:
            kind = rope_scaling.get("type", rope_scaling.get("rope_type"))
            _check(kind == "llama3", f"rotary_scaling type {kind!r} is not supported")
    else:
        _check(
            pos_type in ("learned_absolute", "rope_gpt_neox"),
            f"unsupported position_embedding_type {pos_type!r}",
        )
        gated = act_name in ("swiglu", "geglu")
        attn_bias = dense_bias = mlp_bias = bool(cfg.get("bias", True))
        norm_bias = True
        rope_scaling = None
        _check(cfg.get("rotary_scaling") is None, "GPT rotary_scaling is not supported")
    # Per-head query/key RMSNorm before RoPE (Qwen3's q_norm/k_norm, PretrainedConfig.qk_layernorm).
    qk_norm = arch == "Qwen3ForCausalLM" or bool(cfg.get("qk_layernorm", False))

    if act_name in ("silu", "swiglu"):

        def act(x):
            return F.silu(x)
    elif act_name in ("gelu", "geglu"):

        def act(x):
            return F.gelu(x, approximate=gelu_approximate)
    elif act_name == "gelu_pytorch_tanh":

        def act(x):
            return F.gelu(x, approximate="tanh")
    elif act_name == "relu":

        def act(x):
            return F.relu(x)
    else:
        raise ReferenceError(f"unsupported hidden_act {act_name!r}")

    rope = pos_type == "rope_gpt_neox"
    rot_dim = 0
    if rope:
        rot_dim = cfg.get("rotary_embedding_dim")
        if rot_dim is None:
            rot_dim = int(d * float(cfg.get("rotary_pct", 1.0)))
        rot_dim = int(rot_dim)
        _check(0 < rot_dim <= d and rot_dim % 2 == 0, f"bad rotary dim {rot_dim} (head {d})")
    rotary_base = float(cfg.get("rotary_base", 10000.0))

    # --- tensor-parallel geometry (spec §2) -------------------------------------------------------
    _check(nh % T == 0, f"num_attention_heads {nh} not divisible by tp_size {T}")
    _check(nh % ng == 0, f"num_attention_heads {nh} not divisible by num_key_value_heads {ng}")
    if ng >= T:
        _check(ng % T == 0, f"num_key_value_heads {ng} not divisible by tp_size {T}")
    else:
        _check(T % ng == 0, f"tp_size {T} not divisible by num_key_value_heads {ng}")
    nq_l = nh // T
    kv_l = max(1, ng // T)
    _check(nq_l % kv_l == 0, f"local query heads {nq_l} not a multiple of local kv heads {kv_l}")
    q_per_kv = nq_l // kv_l
    _check(moe or F_ % T == 0, f"intermediate_size {F_} not divisible by tp_size {T}")
    F_l = F_ // T
    _check(L % P == 0, f"num_hidden_layers {L} not divisible by pp_size {P}")
    L_p = L // P
    V_l = -(-V // T)  # ceil(V / T) rows of lm_head per rank

    tokens = torch.as_tensor(tokens)
    _check(tokens.dim() == 1, f"tokens must be 1-D [seq], got shape {tuple(tokens.shape)}")
    tokens = tokens.to(torch.int64)
    S = tokens.shape[0]
    _check(S > 0, "empty token sequence")
    _check(int(tokens.min()) >= 0 and int(tokens.max()) < V, "token id outside [0, vocab_size)")
    if pos_type == "learned_absolute":
        max_pos = int(need("max_position_embeddings"))
        _check(max_pos >= S, f"sequence length {S} > max_position_embeddings {max_pos}")

    files = [
        [_RankFile(checkpoint_dir / f"rank{p * T + r}.safetensors", p * T + r) for r in range(T)]
        for p in range(P)
    ]
    extra = sorted(
        f.name
        for f in checkpoint_dir.glob("rank*.safetensors")
        if f.name not in {f"rank{i}.safetensors" for i in range(world)}
    )
    _check(not extra, f"rank files beyond world_size {world}: {extra}")

    # --- embeddings (first stage) -----------------------------------------------------------------
    use_pe = bool(cfg.get("use_parallel_embedding", False))
    shard_dim = int(cfg.get("embedding_sharding_dim", 0))
    _check(shard_dim in (0, 1), f"embedding_sharding_dim must be 0 or 1, got {shard_dim}")

    def embed(name: str, rows: int, ids: torch.Tensor) -> list[torch.Tensor]:
        """Per-tp-rank result of an embedding lookup (identical on all ranks after collectives)."""
        stage0 = files[0]
        if not use_pe or T == 1:
            tabs = [f.get(name, (rows, h)) for f in stage0]
            return [tab[ids] for tab in tabs]
        if shard_dim == 0:
            rows_l = -(-rows // T)
            partials = []
            for r, f in enumerate(stage0):
                tab = f.get(name, (rows_l, h))
                lo = r * rows_l
                local = ids - lo
                inside = (local >= 0) & (local < rows_l)
                out = torch.zeros(ids.shape[0], h)
                out[inside] = tab[local[inside]]
                partials.append(out)
            total = torch.stack(partials).sum(0)  # all-reduce
            return [total.clone() for _ in range(T)]
        _check(h % T == 0, f"hidden_size {h} not divisible by tp_size {T} (sharding dim 1)")
        cols = [f.get(name, (rows, h // T))[ids] for f in stage0]
        full = torch.cat(cols, dim=-1)  # all-gather along hidden
        return [full.clone() for _ in range(T)]

    xs = embed("transformer.vocab_embedding.weight", V, tokens)
    if gemma:
        xs = [x * math.sqrt(h) for x in xs]
    if pos_type == "learned_absolute":
        pos = embed(
            "transformer.position_embedding.weight",
            int(need("max_position_embeddings")),
            torch.arange(S),
        )
        xs = [x + p for x, p in zip(xs, pos, strict=True)]

    def norm(f: _RankFile, prefix: str, x: torch.Tensor) -> torch.Tensor:
        w = f.get(f"{prefix}.weight", (h,))
        if norm_bias:
            b = f.get(f"{prefix}.bias", (h,))
            return F.layer_norm(x, (h,), w, b, eps)
        _check(not f.has(f"{prefix}.bias"), f"rank{f.rank}: unexpected {prefix}.bias for RMSNorm")
        return F.rms_norm(x, (h,), w, eps)

    def replicated(stage: list[_RankFile], name: str) -> None:
        if strict and all(f.has(name) for f in stage):
            _all_equal([f.tensors[name] for f in stage], name)

    causal = torch.ones(S, S, dtype=torch.bool).tril()
    scale = 1.0 / math.sqrt(d)
    qkv_rows = (nq_l + 2 * kv_l) * d

    # --- transformer layers, stage by stage --------------------------------------------------------
    for p in range(P):
        stage = files[p]
        for li in range(L_p):
            pre = f"transformer.layers.{li}"
            for name in (
                f"{pre}.input_layernorm.weight",
                f"{pre}.input_layernorm.bias",
                f"{pre}.post_layernorm.weight",
                f"{pre}.post_layernorm.bias",
                f"{pre}.attention.dense.bias",
                f"{pre}.attention.q_layernorm.weight",
                f"{pre}.attention.k_layernorm.weight",
                f"{pre}.mlp.proj.bias",
            ):
                replicated(stage, name)

            # attention
            partials, dense_b = [], []
            for r, f in enumerate(stage):
                a = norm(f, f"{pre}.input_layernorm", xs[r])
                w = f.get(f"{pre}.attention.qkv.weight", (qkv_rows, h))
                b = f.maybe(f"{pre}.attention.qkv.bias", attn_bias, (qkv_rows,))
                qkv = _linear(a, w, b)
                q = qkv[:, : nq_l * d].reshape(S, nq_l, d)
                k = qkv[:, nq_l * d : (nq_l + kv_l) * d].reshape(S, kv_l, d)
                v = qkv[:, (nq_l + kv_l) * d :].reshape(S, kv_l, d)
                if qk_norm:
                    q = F.rms_norm(q, (d,), f.get(f"{pre}.attention.q_layernorm.weight", (d,)), eps)
                    k = F.rms_norm(k, (d,), f.get(f"{pre}.attention.k_layernorm.weight", (d,)), eps)
                if rope:
                    q = _rope(q, rot_dim, rotary_base, rope_scaling)
                    k = _rope(k, rot_dim, rotary_base, rope_scaling)
                kv_idx = torch.arange(nq_l) // q_per_kv
                k = k[:, kv_idx]  # [S, nq_l, d]
                v = v[:, kv_idx]
                scores = torch.einsum("qhd,khd->hqk", q, k) * scale
                scores = scores.masked_fill(~causal, float("-inf"))
                probs = torch.softmax(scores, dim=-1)
                ctx = torch.einsum("hqk,khd->qhd", probs, v).reshape(S, nq_l * d)
                wd = f.get(f"{pre}.attention.dense.weight", (h, nq_l * d))
                partials.append(ctx @ wd.t())
                dense_b.append(f.maybe(f"{pre}.attention.dense.bias", dense_bias, (h,)))
            reduced = torch.stack(partials).sum(0)  # all-reduce
            xs = [
                x + reduced + (b if b is not None else 0.0)
                for x, b in zip(xs, dense_b, strict=True)
            ]

            if moe:  # every layer: TensorRT-LLM's decoder layers are all MoE or all dense
                post = f"{pre}.post_layernorm"
                xs = moe_mlp(stage, pre, xs, cfg, lambda f, x: norm(f, post, x), strict)  # noqa: B023
                continue

            # MLP
            partials, proj_b = [], []
            for r, f in enumerate(stage):
                m = norm(f, f"{pre}.post_layernorm", xs[r])
                wf = f.get(f"{pre}.mlp.fc.weight", (F_l, h))
                bf = f.maybe(f"{pre}.mlp.fc.bias", mlp_bias, (F_l,))
                y = act(_linear(m, wf, bf))
                if gated:
                    wg = f.get(f"{pre}.mlp.gate.weight", (F_l, h))
                    bg = f.maybe(f"{pre}.mlp.gate.bias", mlp_bias, (F_l,))
                    y = y * _linear(m, wg, bg)
                else:
                    _check(
                        not f.has(f"{pre}.mlp.gate.weight"),
                        f"rank{f.rank}: {pre}.mlp.gate.weight present but hidden_act "
                        f"{act_name!r} is not gated",
                    )
                wp = f.get(f"{pre}.mlp.proj.weight", (h, F_l))
                partials.append(y @ wp.t())
                proj_b.append(f.maybe(f"{pre}.mlp.proj.bias", mlp_bias, (h,)))
            reduced = torch.stack(partials).sum(0)  # all-reduce
            xs = [
                x + reduced + (b if b is not None else 0.0) for x, b in zip(xs, proj_b, strict=True)
            ]
        # pipeline send/recv: the residual stream moves to the next stage unchanged

    # --- final norm and lm_head (last stage) -------------------------------------------------------
    last = files[P - 1]
    replicated(last, "transformer.ln_f.weight")
    replicated(last, "transformer.ln_f.bias")
    cols = []
    for r, f in enumerate(last):
        y = norm(f, "transformer.ln_f", xs[r])
        w = f.get("lm_head.weight", (V_l, h))
        _check(not f.has("lm_head.bias"), f"rank{f.rank}: unexpected lm_head.bias")
        if strict:
            lo = r * V_l
            pad_from = max(0, min(V_l, V - lo))
            _check(
                bool((w[pad_from:] == 0).all()),
                f"rank{f.rank}: lm_head padding rows (beyond vocab_size {V}) are not zero",
            )
        cols.append(y @ w.t())
    logits = torch.cat(cols, dim=-1)[:, :V]  # all-gather over vocab, drop padding

    if strict:
        for stage in files:
            for f in stage:
                left = f.unused()
                _check(not left, f"rank{f.rank}: tensors not used by the model: {left}")
    return logits.contiguous()
