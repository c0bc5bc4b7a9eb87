"""Proves the TensorRT-LLM reference oracle (tests/trtllm_reference.py) right, independently of Porter.

A small random model is run by a plain single-device implementation written here (full weights,
separate Q/K/V, RoPE written pair-by-pair), then the same weights are written as TensorRT-LLM
checkpoints split by hand per spec §2 (TP 1/2/4, PP 2, GQA KV duplication, parallel embedding,
padded lm_head) and the oracle must reproduce the plain logits.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.trtllm_reference import ReferenceError, reference_logits


@dataclass(frozen=True)
class Spec:
    arch: str  # "llama" | "gpt"
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_size: int
    ffn: int
    act: str  # llama: "silu"; gpt: "gelu" | "swiglu" | "geglu"
    pos: str  # "rope_gpt_neox" | "learned_absolute"
    rotary_pct: float = 1.0
    rotary_base: float = 10000.0
    bias: bool = False
    max_pos: int = 16
    eps: float = 1e-5

    @property
    def gated(self) -> bool:
        return self.arch == "llama" or self.act in ("swiglu", "geglu")

    @property
    def layernorm(self) -> bool:
        return self.arch == "gpt"


LLAMA_GQA = Spec("llama", 50, 64, 4, 8, 2, 8, 96, "silu", "rope_gpt_neox", rotary_base=500.0)
LLAMA_GQA_BIAS = Spec("llama", 50, 64, 2, 8, 2, 8, 96, "silu", "rope_gpt_neox", bias=True)
GPT_LEARNED = Spec(
    "gpt", 50, 48, 4, 4, 4, 12, 64, "gelu", "learned_absolute", bias=True, max_pos=10
)
GPT_ROPE_SWIGLU = Spec(
    "gpt", 50, 48, 2, 4, 4, 12, 64, "swiglu", "rope_gpt_neox", rotary_pct=0.5, bias=True
)
GPT_GEGLU_NOBIAS = Spec("gpt", 50, 48, 2, 4, 4, 12, 64, "geglu", "learned_absolute", max_pos=10)


# --------------------------------------------------------------------------------------------------
# Random model (full weights) and a plain single-device forward pass
# --------------------------------------------------------------------------------------------------


def make_model(s: Spec, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        fan_in = shape[-1]
        scale = 1.0 / math.sqrt(fan_in) if scale is None else scale
        return torch.randn(*shape, generator=g) * scale

    h, d, nh, ng, Fd = s.hidden, s.head_size, s.heads, s.kv_heads, s.ffn
    m: dict[str, torch.Tensor] = {"embed": rnd(s.vocab, h, scale=1.0)}
    if s.pos == "learned_absolute":
        m["pos"] = rnd(s.max_pos, h, scale=0.5)
    for i in range(s.layers):
        p = f"l{i}."
        m[p + "ln1.w"] = 1.0 + rnd(h, scale=0.1)
        m[p + "ln2.w"] = 1.0 + rnd(h, scale=0.1)
        if s.layernorm:
            m[p + "ln1.b"] = rnd(h, scale=0.1)
            m[p + "ln2.b"] = rnd(h, scale=0.1)
        m[p + "wq"] = rnd(nh * d, h)
        m[p + "wk"] = rnd(ng * d, h)
        m[p + "wv"] = rnd(ng * d, h)
        m[p + "wo"] = rnd(h, nh * d)
        m[p + "fc"] = rnd(Fd, h)
        if s.gated:
            m[p + "gate"] = rnd(Fd, h)
        m[p + "proj"] = rnd(h, Fd)
        if s.bias:
            for n, size in (("bq", nh * d), ("bk", ng * d), ("bv", ng * d), ("bo", h)):
                m[p + n] = rnd(size, scale=0.1)
            m[p + "bfc"] = rnd(Fd, scale=0.1)
            if s.gated:
                m[p + "bgate"] = rnd(Fd, scale=0.1)
            m[p + "bproj"] = rnd(h, scale=0.1)
    m["lnf.w"] = 1.0 + rnd(h, scale=0.1)
    if s.layernorm:
        m["lnf.b"] = rnd(h, scale=0.1)
    m["lm_head"] = rnd(s.vocab, h)
    return m


def plain_rope(x: torch.Tensor, rot_dim: int, base: float) -> torch.Tensor:
    """Pair (i, i + rot_dim/2) rotated by angle pos * base^(-2i/rot_dim); x: [seq, heads, d]."""
    out = x.clone()
    half = rot_dim // 2
    for pos in range(x.shape[0]):
        for i in range(half):
            theta = pos * base ** (-(2 * i) / rot_dim)
            c, sn = math.cos(theta), math.sin(theta)
            a, b = x[pos, :, i], x[pos, :, i + half]
            out[pos, :, i] = a * c - b * sn
            out[pos, :, i + half] = b * c + a * sn
    return out


def plain_logits(s: Spec, m: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    S, d, nh, ng = tokens.shape[0], s.head_size, s.heads, s.kv_heads

    def norm(x, w, b):
        if s.layernorm:
            mu = x.mean(-1, keepdim=True)
            var = ((x - mu) ** 2).mean(-1, keepdim=True)
            return (x - mu) / torch.sqrt(var + s.eps) * w + b
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + s.eps) * w

    def lin(x, w, b=None):
        return x @ w.t() + (0 if b is None else b)

    def act(x):
        if s.act in ("silu", "swiglu"):
            return x * torch.sigmoid(x)
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))

    x = m["embed"][tokens]
    if s.pos == "learned_absolute":
        x = x + m["pos"][:S]
    for i in range(s.layers):
        p = f"l{i}."
        a = norm(x, m[p + "ln1.w"], m.get(p + "ln1.b"))
        q = lin(a, m[p + "wq"], m.get(p + "bq")).view(S, nh, d)
        k = lin(a, m[p + "wk"], m.get(p + "bk")).view(S, ng, d)
        v = lin(a, m[p + "wv"], m.get(p + "bv")).view(S, ng, d)
        if s.pos == "rope_gpt_neox":
            rot = int(d * s.rotary_pct)
            q, k = plain_rope(q, rot, s.rotary_base), plain_rope(k, rot, s.rotary_base)
        ctx = torch.empty(S, nh, d)
        for head in range(nh):
            grp = head // (nh // ng)
            sc = q[:, head] @ k[:, grp].t() / math.sqrt(d)
            sc = sc + torch.full((S, S), float("-inf")).triu(1)
            ctx[:, head] = torch.softmax(sc, -1) @ v[:, grp]
        x = x + lin(ctx.reshape(S, nh * d), m[p + "wo"], m.get(p + "bo"))
        b2 = norm(x, m[p + "ln2.w"], m.get(p + "ln2.b"))
        y = act(lin(b2, m[p + "fc"], m.get(p + "bfc")))
        if s.gated:
            y = y * lin(b2, m[p + "gate"], m.get(p + "bgate"))
        x = x + lin(y, m[p + "proj"], m.get(p + "bproj"))
    x = norm(x, m["lnf.w"], m.get("lnf.b"))
    return x @ m["lm_head"].t()


# --------------------------------------------------------------------------------------------------
# Writing a TensorRT-LLM checkpoint by hand (spec §2 / §3)
# --------------------------------------------------------------------------------------------------


def _pad_rows(t: torch.Tensor, T: int) -> torch.Tensor:
    rows = -(-t.shape[0] // T) * T
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _qkv_for_rank(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Spec, T: int, r: int):
    """q: [nh*d, ...], k/v: [ng*d, ...] -> this rank's [Q_r; K_r; V_r]."""
    d, nh, ng = s.head_size, s.heads, s.kv_heads
    qh, kh, vh = q.unflatten(0, (nh, d)), k.unflatten(0, (ng, d)), v.unflatten(0, (ng, d))
    Q = qh[r * nh // T : (r + 1) * nh // T]
    if ng >= T:
        K, Vv = kh[r * ng // T : (r + 1) * ng // T], vh[r * ng // T : (r + 1) * ng // T]
    else:
        g = r * ng // T
        K, Vv = kh[g : g + 1], vh[g : g + 1]
    return torch.cat([Q, K, Vv]).flatten(0, 1)


def write_checkpoint(
    s: Spec,
    m: dict[str, torch.Tensor],
    out: Path,
    T: int = 1,
    P: int = 1,
    parallel_embedding: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    cfg = {
        "architecture": "LlamaForCausalLM" if s.arch == "llama" else "GPTForCausalLM",
        "dtype": dtype_name[dtype],
        "logits_dtype": "float32",
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_size": s.head_size,
        "intermediate_size": s.ffn,
        "hidden_act": s.act,
        "norm_epsilon": s.eps,
        "position_embedding_type": s.pos,
        "rotary_base": s.rotary_base,
        "max_position_embeddings": s.max_pos,
        "use_parallel_embedding": parallel_embedding,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "mapping": {"world_size": T * P, "tp_size": T, "pp_size": P},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    if s.arch == "llama":
        cfg.update(attn_bias=s.bias, mlp_bias=s.bias)
    else:
        cfg.update(rotary_pct=s.rotary_pct, bias=s.bias)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))

    Lp = s.layers // P
    for p in range(P):
        for r in range(T):
            t: dict[str, torch.Tensor] = {}

            def col(x, r=r):  # split on dim 0
                return x.chunk(T, 0)[r]

            def row(x, r=r):  # split on dim 1
                return x.chunk(T, 1)[r]

            if p == 0:
                for key, name in (("embed", "vocab_embedding"), ("pos", "position_embedding")):
                    if key in m:
                        w = m[key]
                        if parallel_embedding:
                            w = col(_pad_rows(w, T))
                        t[f"transformer.{name}.weight"] = w
            for li in range(Lp):
                src, dst = f"l{p * Lp + li}.", f"transformer.layers.{li}."
                t[dst + "input_layernorm.weight"] = m[src + "ln1.w"]
                t[dst + "post_layernorm.weight"] = m[src + "ln2.w"]
                if s.layernorm:
                    t[dst + "input_layernorm.bias"] = m[src + "ln1.b"]
                    t[dst + "post_layernorm.bias"] = m[src + "ln2.b"]
                t[dst + "attention.qkv.weight"] = _qkv_for_rank(
                    m[src + "wq"], m[src + "wk"], m[src + "wv"], s, T, r
                )
                t[dst + "attention.dense.weight"] = row(m[src + "wo"])
                t[dst + "mlp.fc.weight"] = col(m[src + "fc"])
                if s.gated:
                    t[dst + "mlp.gate.weight"] = col(m[src + "gate"])
                t[dst + "mlp.proj.weight"] = row(m[src + "proj"])
                if s.bias:
                    t[dst + "attention.qkv.bias"] = _qkv_for_rank(
                        m[src + "bq"], m[src + "bk"], m[src + "bv"], s, T, r
                    )
                    t[dst + "attention.dense.bias"] = m[src + "bo"]
                    t[dst + "mlp.fc.bias"] = col(m[src + "bfc"])
                    if s.gated:
                        t[dst + "mlp.gate.bias"] = col(m[src + "bgate"])
                    t[dst + "mlp.proj.bias"] = m[src + "bproj"]
            if p == P - 1:
                t["transformer.ln_f.weight"] = m["lnf.w"]
                if s.layernorm:
                    t["transformer.ln_f.bias"] = m["lnf.b"]
                t["lm_head.weight"] = col(_pad_rows(m["lm_head"], T))
            t = {k: v.to(dtype).contiguous() for k, v in t.items()}
            save_file(t, str(out / f"rank{p * T + r}.safetensors"))
    return out


def _tokens(s: Spec, n: int = 9, seed: int = 1) -> torch.Tensor:
    n = min(n, s.max_pos)
    return torch.randint(0, s.vocab, (n,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------

LAYOUTS = [
    pytest.param(1, 1, False, id="tp1"),
    pytest.param(2, 1, False, id="tp2"),
    pytest.param(4, 1, False, id="tp4"),
    pytest.param(2, 1, True, id="tp2-parallel-emb"),
    pytest.param(4, 1, True, id="tp4-parallel-emb"),
    pytest.param(1, 2, False, id="pp2"),
    pytest.param(2, 2, True, id="tp2-pp2-parallel-emb"),
]
SPECS = [
    pytest.param(LLAMA_GQA, id="llama-gqa"),
    pytest.param(LLAMA_GQA_BIAS, id="llama-gqa-bias"),
    pytest.param(GPT_LEARNED, id="gpt-learned-gelu"),
    pytest.param(GPT_ROPE_SWIGLU, id="gpt-rope50-swiglu"),
    pytest.param(GPT_GEGLU_NOBIAS, id="gpt-geglu-nobias"),
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("T,P,pe", LAYOUTS)
def test_oracle_matches_plain_forward(tmp_path: Path, spec: Spec, T: int, P: int, pe: bool):
    m = make_model(spec)
    tokens = _tokens(spec)
    expected = plain_logits(spec, m, tokens)
    ckpt = write_checkpoint(spec, m, tmp_path / "ckpt", T=T, P=P, parallel_embedding=pe)
    got = reference_logits(ckpt, tokens)
    assert got.dtype == torch.float32
    assert got.shape == (tokens.shape[0], spec.vocab)
    assert (got - expected).abs().max().item() <= 1e-5


def test_plain_forward_is_not_trivial():
    """Guard against a degenerate comparison: positions and layers matter."""
    spec = LLAMA_GQA
    m = make_model(spec)
    tokens = _tokens(spec)
    a = plain_logits(spec, m, tokens)
    assert a.std() > 0.1
    # RoPE is active: another rotary base changes the logits
    other = dataclasses.replace(spec, rotary_base=10000.0)
    assert (plain_logits(other, m, tokens) - a).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_upcast(tmp_path: Path, dtype: torch.dtype):
    spec = LLAMA_GQA
    m = make_model(spec)
    rounded = {k: v.to(dtype).to(torch.float32) for k, v in m.items()}
    tokens = _tokens(spec)
    ckpt = write_checkpoint(spec, m, tmp_path / "ckpt", T=2, dtype=dtype)
    got = reference_logits(ckpt, tokens)
    assert (got - plain_logits(spec, rounded, tokens)).abs().max().item() <= 1e-5


def _edit_rank(path: Path, edit) -> None:
    from safetensors.torch import load_file

    t = load_file(str(path))
    edit(t)
    save_file(t, str(path))


def test_swapping_qkv_between_ranks_changes_result(tmp_path: Path):
    from safetensors.torch import load_file

    spec = LLAMA_GQA
    m = make_model(spec)
    tokens = _tokens(spec)
    ckpt = write_checkpoint(spec, m, tmp_path / "ckpt", T=2)
    base = reference_logits(ckpt, tokens)
    name = "transformer.layers.0.attention.qkv.weight"
    w0 = load_file(str(ckpt / "rank0.safetensors"))[name]
    w1 = load_file(str(ckpt / "rank1.safetensors"))[name]
    _edit_rank(ckpt / "rank0.safetensors", lambda t: t.__setitem__(name, w1))
    _edit_rank(ckpt / "rank1.safetensors", lambda t: t.__setitem__(name, w0))
    swapped = reference_logits(ckpt, tokens)
    assert (swapped - base).abs().max().item() > 1e-2


def test_swapping_lm_head_between_ranks_changes_result(tmp_path: Path):
    from safetensors.torch import load_file

    spec = GPT_LEARNED
    m = make_model(spec)
    tokens = _tokens(spec)
    ckpt = write_checkpoint(spec, m, tmp_path / "ckpt", T=2)
    base = reference_logits(ckpt, tokens)
    w0 = load_file(str(ckpt / "rank0.safetensors"))["lm_head.weight"]
    w1 = load_file(str(ckpt / "rank1.safetensors"))["lm_head.weight"]
    _edit_rank(ckpt / "rank0.safetensors", lambda t: t.__setitem__("lm_head.weight", w1))
    _edit_rank(ckpt / "rank1.safetensors", lambda t: t.__setitem__("lm_head.weight", w0))
    swapped = reference_logits(ckpt, tokens)
    assert torch.allclose(swapped[:, :25], base[:, 25:]) and torch.allclose(
        swapped[:, 25:], base[:, :25]
    )


def test_kv_not_duplicated_is_rejected(tmp_path: Path):
    """TP=4 with ng=2 must hold one KV head per rank, not half of each or all of them."""
    spec = LLAMA_GQA
    m = make_model(spec)
    ckpt = write_checkpoint(spec, m, tmp_path / "ckpt", T=4)
    d, h = spec.head_size, spec.hidden
    name = "transformer.layers.0.attention.qkv.weight"
    for r in range(4):
        q = m["l0.wq"].unflatten(0, (8, d))[2 * r : 2 * r + 2].flatten(0, 1)
        bad = torch.cat([q, m["l0.wk"], m["l0.wv"]])  # all KV heads on every rank
        assert bad.shape == ((2 + 4) * d, h)
        _edit_rank(ckpt / f"rank{r}.safetensors", lambda t, bad=bad: t.__setitem__(name, bad))
    with pytest.raises(ReferenceError, match=r"qkv\.weight.* has shape"):
        reference_logits(ckpt, _tokens(spec))


def test_missing_tensor_is_rejected(tmp_path: Path):
    spec = GPT_LEARNED
    ckpt = write_checkpoint(spec, make_model(spec), tmp_path / "ckpt", T=2)
    _edit_rank(ckpt / "rank1.safetensors", lambda t: t.pop("transformer.layers.1.mlp.fc.bias"))
    with pytest.raises(ReferenceError, match=r"rank1: missing tensor .*mlp\.fc\.bias"):
        reference_logits(ckpt, _tokens(spec))


def test_bias_not_announced_by_config_is_rejected(tmp_path: Path):
    spec = LLAMA_GQA
    ckpt = write_checkpoint(spec, make_model(spec), tmp_path / "ckpt")
    name = "transformer.layers.0.attention.dense.bias"
    _edit_rank(ckpt / "rank0.safetensors", lambda t: t.__setitem__(name, torch.zeros(64)))
    with pytest.raises(ReferenceError, match="config says there is none"):
        reference_logits(ckpt, _tokens(spec))


def test_unused_tensor_is_rejected(tmp_path: Path):
    spec = LLAMA_GQA
    ckpt = write_checkpoint(spec, make_model(spec), tmp_path / "ckpt", T=1, P=2)
    # embeddings belong on the first stage only
    _edit_rank(
        ckpt / "rank1.safetensors",
        lambda t: t.__setitem__("transformer.vocab_embedding.weight", torch.zeros(50, 64)),
    )
    with pytest.raises(ReferenceError, match="not used by the model"):
        reference_logits(ckpt, _tokens(spec))
    assert reference_logits(ckpt, _tokens(spec), strict=False).shape == (9, 50)


def test_replicated_tensor_mismatch_is_rejected(tmp_path: Path):
    spec = GPT_LEARNED
    ckpt = write_checkpoint(spec, make_model(spec), tmp_path / "ckpt", T=2)
    name = "transformer.layers.0.input_layernorm.weight"
    _edit_rank(ckpt / "rank1.safetensors", lambda t: t.__setitem__(name, t[name] * 2))
    with pytest.raises(ReferenceError, match="differs between tp rank"):
        reference_logits(ckpt, _tokens(spec))


def test_nonzero_lm_head_padding_is_rejected(tmp_path: Path):
    spec = GPT_LEARNED  # vocab 50, TP 4 -> 13 rows per rank, 2 padding rows on rank 3
    ckpt = write_checkpoint(spec, make_model(spec), tmp_path / "ckpt", T=4)
    _edit_rank(
        ckpt / "rank3.safetensors",
        lambda t: t.__setitem__("lm_head.weight", torch.ones_like(t["lm_head.weight"])),
    )
    with pytest.raises(ReferenceError, match="padding rows"):
        reference_logits(ckpt, _tokens(spec))


def test_unsupported_tp_geometry_is_rejected(tmp_path: Path):
    spec = LLAMA_GQA  # nh=8 is not divisible by 3
    ckpt = write_checkpoint(spec, make_model(spec), tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mapping"] = {"world_size": 3, "tp_size": 3, "pp_size": 1}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ReferenceError, match="not divisible by tp_size"):
        reference_logits(ckpt, _tokens(spec))


def test_tanh_gelu_option_differs_from_exact(tmp_path: Path):
    spec = GPT_LEARNED
    m = make_model(spec)
    tokens = _tokens(spec)
    ckpt = write_checkpoint(spec, m, tmp_path / "ckpt")
    exact = reference_logits(ckpt, tokens)
    tanh = reference_logits(ckpt, tokens, gelu_approximate="tanh")
    assert 0 < (exact - tanh).abs().max().item() < 1e-1


# --------------------------------------------------------------------------------------------------
# Against a real megatron-core GPTModel (TP=1, one process, gloo): the oracle reproduces its logits
# --------------------------------------------------------------------------------------------------

# Runs in a subprocess so that the CPU patches (spec §5) and the process group stay out of pytest.
_MEGATRON_SCRIPT = r"""
import contextlib, json, sys
import torch, torch.nn.functional as F
torch.cuda.current_device = lambda: "cpu"
torch.cuda.synchronize = lambda *a, **k: None
import torch.distributed as dist
out_dir, cases = sys.argv[1], json.loads(sys.argv[2])
dist.init_process_group("gloo", store=dist.FileStore(out_dir + "/store", 1), rank=0, world_size=1)
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mrandom
parallel_state.initialize_model_parallel(1, 1)
mrandom.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig
for name, c in cases.items():
    torch.manual_seed(c["seed"])
    cfg = TransformerConfig(
        num_layers=c["layers"], hidden_size=c["hidden"], num_attention_heads=c["heads"],
        num_query_groups=c["kv_heads"], kv_channels=c["head_size"], ffn_hidden_size=c["ffn"],
        normalization=c["norm"], gated_linear_unit=c["gated"],
        activation_func={"silu": F.silu, "gelu": F.gelu}[c["act"]],
        add_bias_linear=c["bias"], use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, layernorm_epsilon=c["eps"], params_dtype=torch.float32,
        init_method_std=c["std"],
    )
    model = GPTModel(
        config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization=c["norm"]),
        vocab_size=c["vocab"], max_sequence_length=c["max_pos"], position_embedding_type=c["pos"],
        rotary_percent=c["rotary_pct"], rotary_base=c["rotary_base"],
        share_embeddings_and_output_weights=False,
    ).eval()
    with torch.no_grad():  # norms start at 1/0 and biases at 0: randomise them so they matter
        for pname, p in model.named_parameters():
            if "layernorm" in pname or pname.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.2)
    S = c["seq"]
    ids = torch.randint(0, c["vocab"], (1, S))
    mask = torch.ones(1, 1, S, S, dtype=torch.bool).triu(1)
    with torch.no_grad():
        logits = model(ids, torch.arange(S)[None], mask)[0].float()
    sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.save({"state_dict": sd, "tokens": ids[0], "logits": logits}, f"{out_dir}/{name}.pt")
"""

MEGATRON_CASES = {
    "llama": LLAMA_GQA,
    "gpt": GPT_LEARNED,
    "gpt_rope_swiglu": GPT_ROPE_SWIGLU,
}


def _megatron_case(s: Spec) -> dict:
    return {
        "seed": 7,
        "layers": s.layers,
        "hidden": s.hidden,
        "heads": s.heads,
        "kv_heads": s.kv_heads,
        "head_size": s.head_size,
        "ffn": s.ffn,
        "norm": "LayerNorm" if s.layernorm else "RMSNorm",
        "gated": s.gated,
        "act": "silu" if s.act in ("silu", "swiglu") else "gelu",
        "bias": s.bias,
        "eps": s.eps,
        "std": 0.5 / math.sqrt(s.hidden) * 4,
        "vocab": s.vocab,
        "max_pos": s.max_pos,
        "pos": "rope" if s.pos == "rope_gpt_neox" else "learned_absolute",
        "rotary_pct": s.rotary_pct,
        "rotary_base": s.rotary_base,
        "seq": min(9, s.max_pos),
    }


@pytest.fixture(scope="module")
def megatron_outputs(tmp_path_factory) -> Path:
    pytest.importorskip("megatron.core")
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("megatron")
    cases = {k: _megatron_case(s) for k, s in MEGATRON_CASES.items()}
    proc = subprocess.run(
        [sys.executable, "-c", _MEGATRON_SCRIPT, str(out), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _from_megatron(s: Spec, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron TP=1 state dict -> the plain full-weight model dict used above."""
    q, d, ng, h = s.heads // s.kv_heads, s.head_size, s.kv_heads, s.hidden
    m = {"embed": sd["embedding.word_embeddings.weight"], "lm_head": sd["output_layer.weight"]}
    if s.pos == "learned_absolute":
        m["pos"] = sd["embedding.position_embeddings.weight"]
    m["lnf.w"] = sd["decoder.final_layernorm.weight"]
    if s.layernorm:
        m["lnf.b"] = sd["decoder.final_layernorm.bias"]
    for i in range(s.layers):
        src, p = f"decoder.layers.{i}.", f"l{i}."
        m[p + "ln1.w"] = sd[src + "input_layernorm.weight"]
        m[p + "ln2.w"] = sd[src + "pre_mlp_layernorm.weight"]
        if s.layernorm:
            m[p + "ln1.b"] = sd[src + "input_layernorm.bias"]
            m[p + "ln2.b"] = sd[src + "pre_mlp_layernorm.bias"]
        qkv = sd[src + "self_attention.linear_qkv.weight"].view(ng, q + 2, d, h)
        m[p + "wq"] = qkv[:, :q].reshape(-1, h)
        m[p + "wk"] = qkv[:, q].reshape(-1, h)
        m[p + "wv"] = qkv[:, q + 1].reshape(-1, h)
        m[p + "wo"] = sd[src + "self_attention.linear_proj.weight"]
        fc1 = sd[src + "mlp.linear_fc1.weight"]
        if s.gated:
            m[p + "fc"], m[p + "gate"] = fc1.chunk(2, 0)
        else:
            m[p + "fc"] = fc1
        m[p + "proj"] = sd[src + "mlp.linear_fc2.weight"]
        if s.bias:
            qkv_b = sd[src + "self_attention.linear_qkv.bias"].view(ng, q + 2, d)
            m[p + "bq"] = qkv_b[:, :q].reshape(-1)
            m[p + "bk"] = qkv_b[:, q].reshape(-1)
            m[p + "bv"] = qkv_b[:, q + 1].reshape(-1)
            m[p + "bo"] = sd[src + "self_attention.linear_proj.bias"]
            fc1_b = sd[src + "mlp.linear_fc1.bias"]
            if s.gated:
                m[p + "bfc"], m[p + "bgate"] = fc1_b.chunk(2, 0)
            else:
                m[p + "bfc"] = fc1_b
            m[p + "bproj"] = sd[src + "mlp.linear_fc2.bias"]
    return {k: v.float().contiguous() for k, v in m.items()}


@pytest.mark.parametrize("name", list(MEGATRON_CASES))
def test_oracle_matches_megatron_core(tmp_path: Path, megatron_outputs: Path, name: str):
    spec = MEGATRON_CASES[name]
    saved = torch.load(megatron_outputs / f"{name}.pt", weights_only=True)
    expected, tokens = saved["logits"], saved["tokens"]
    assert expected.shape == (tokens.shape[0], spec.vocab) and expected.std() > 0.1
    m = _from_megatron(spec, saved["state_dict"])
    # the plain implementation is Megatron's model too
    assert (plain_logits(spec, m, tokens) - expected).abs().max().item() <= 5e-5
    for T, P, pe in ((1, 1, False), (2, 1, True), (4, 1, False), (2, 2, False)):
        ckpt = write_checkpoint(spec, m, tmp_path / f"tp{T}_pp{P}", T=T, P=P, parallel_embedding=pe)
        got = reference_logits(ckpt, tokens)
        assert (got - expected).abs().max().item() <= 5e-5, (T, P, pe)
