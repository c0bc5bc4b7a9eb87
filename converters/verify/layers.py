"""Plain-torch reference layers, in float32: norms, rotary embeddings (with Llama-3.1 scaling),
causal attention with GQA, q/k norms and biases, gated and plain MLPs, and mixture-of-experts
routing. Both sides of a verification run these same functions on their own weights.

The arithmetic follows megatron-core 0.16 (what the source computes): RoPE as
`_apply_rotary_pos_emb_bshd` (non-interleaved, rotate-half over the first `rope_dim` dims, the rest
passes through; `inv_freq = 1 / base ** (arange(0, dim, 2) / dim)`; `_apply_scaling` for Llama 3.1),
RMSNorm as `torch.nn.RMSNorm`, the softmax scale `1 / sqrt(head_dim)`, gelu in its exact (erf)
form, and a gated MLP as `act(gate) * up`.

Weights come through `Get`: a function of a neutral local name ("q.weight", "norm.bias",
"experts.3.up.weight") that loads that tensor as float32 when it is called (None when the model
has none). A part holds one weight at a time and lets it go once used, so a layer never sits in
memory whole. A part's callers (the sides) decide which slice of the model "local" is: the whole
layer, or one tensor-parallel rank's heads and rows, whose partial outputs they then sum.
"""

from __future__ import annotations

import math as pymath
from collections.abc import Callable

import torch
import torch.nn.functional as F

from converters.verify.model_math import ModelMath, RopeScaling

Get = Callable[[str], torch.Tensor | None]
# Record an intermediate result of a part under a name ("q", "context", "expert 3", ...).
Record = Callable[[str, torch.Tensor], None]


def _no_record(name: str, value: torch.Tensor) -> None:
    pass


def linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None):
    """x @ weight.T (+ bias)."""
    assert weight is not None
    y = x @ weight.t()
    return y if bias is None else y + bias


def normalize(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, m: ModelMath
) -> torch.Tensor:
    """LayerNorm or RMSNorm over the last dimension, as `m` says."""
    assert weight is not None
    size = (x.shape[-1],)
    if m.norm_offset:
        weight = weight + m.norm_offset
    if m.norm == "LayerNorm":
        return F.layer_norm(x, size, weight, bias, m.eps)
    out = F.rms_norm(x, size, weight, m.eps)
    return out if bias is None else out + bias


def activation(x: torch.Tensor, m: ModelMath) -> torch.Tensor:
    if m.activation == "silu":
        return F.silu(x)
    if m.activation == "gelu":
        return F.gelu(x)
    if m.activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


def inv_freq(m: ModelMath) -> torch.Tensor:
    """The rotary frequencies of `m` (Llama-3.1 scaled when it says so)."""
    dim = m.rope_dim
    freqs = 1.0 / (m.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return freqs if m.rope_scaling is None else llama3_scaled(freqs, m.rope_scaling)


def llama3_scaled(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """megatron-core `RotaryEmbedding._apply_scaling` (= HF's "llama3" rope type)."""
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * pymath.pi / freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / s.factor, freqs)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of `t` [seq, heads, d] at positions 0..seq-1 over its first
    2·len(freqs) dims (rotate-half, non-interleaved); the other dims pass through."""
    dim = 2 * freqs.shape[0]
    angles = torch.outer(torch.arange(t.shape[0], dtype=torch.float32), freqs)
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]
    t_rot, t_pass = t[..., :dim], t[..., dim:]
    x1, x2 = torch.chunk(t_rot, 2, dim=-1)
    t_rot = t_rot * torch.cos(emb) + torch.cat((-x2, x1), dim=-1) * torch.sin(emb)
    return torch.cat((t_rot, t_pass), dim=-1)


def attention(
    get: Get, x: torch.Tensor, m: ModelMath, heads: int, groups: int, record: Record = _no_record
) -> torch.Tensor:
    """The attention part on `heads` query heads and `groups` KV heads (all of them, or one
    rank's): input norm, Q/K/V projections, q/k norms, rotary, causal softmax attention, and the
    output projection *without* its bias (added once, after tensor-parallel partial sums)."""
    seq, d = x.shape[0], m.head_dim
    a = normalize(x, get("norm.weight"), get("norm.bias"), m)
    q = linear(a, get("q.weight"), get("q.bias")).reshape(seq, heads, d)
    k = linear(a, get("k.weight"), get("k.bias")).reshape(seq, groups, d)
    v = linear(a, get("v.weight"), get("v.bias")).reshape(seq, groups, d)
    del a
    record("q", q)
    record("k", k)
    record("v", v)
    if m.qk_norm:
        q = normalize(q, get("q_norm.weight"), get("q_norm.bias"), m)
        k = normalize(k, get("k_norm.weight"), get("k_norm.bias"), m)
    if m.rope_dim:
        freqs = inv_freq(m)
        q, k = rotate(q, freqs), rotate(k, freqs)
    record("q (normed, rotated)", q)
    record("k (normed, rotated)", k)
    index = torch.arange(heads) // (heads // groups)
    scores = torch.einsum("qhd,khd->hqk", q, k[:, index]) / pymath.sqrt(d)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    context = torch.einsum("hqk,khd->qhd", probs, v[:, index])
    record("context", context)
    return linear(context.reshape(seq, heads * d), get("o.weight"))


def mlp(get: Get, h: torch.Tensor, m: ModelMath, record: Record = _no_record) -> torch.Tensor:
    """The dense MLP part (its norm, then the MLP) without the output projection's bias."""
    normed = normalize(h, get("norm.weight"), get("norm.bias"), m)
    return feed_forward(get, normed, m, record)


def feed_forward(
    get: Get, x: torch.Tensor, m: ModelMath, record: Record = _no_record, prefix: str = ""
) -> torch.Tensor:
    """act(gate(x)) * up(x) (gated) or act(fc(x)), then down, without down's bias."""
    if m.gated:
        gate = linear(x, get(prefix + "gate.weight"), get(prefix + "gate.bias"))
        record(prefix + "gate", gate)
        up = linear(x, get(prefix + "up.weight"), get(prefix + "up.bias"))
        record(prefix + "up", up)
        y = activation(gate, m) * up
        del gate, up
    else:
        fc = linear(x, get(prefix + "fc.weight"), get(prefix + "fc.bias"))
        record(prefix + "fc", fc)
        y = activation(fc, m)
        del fc
    return linear(y, get(prefix + "down.weight"))


def moe(get: Get, h: torch.Tensor, m: ModelMath, record: Record = _no_record) -> torch.Tensor:
    """A mixture-of-experts MLP part: norm, router, every expert on every token (so an expert no
    token picks is still compared), the top-k weighted sum, and the shared experts if any."""
    assert m.moe is not None
    normed = normalize(h, get("norm.weight"), get("norm.bias"), m)
    logits = linear(normed, get("router.weight"), get("router.bias"))
    record("router", logits)
    weights = route(logits, m)
    out = torch.zeros_like(h)
    for e in range(m.moe.experts):
        y = feed_forward(get, normed, m, prefix=f"experts.{e}.")
        record(f"expert {e}", y)
        out += weights[:, e : e + 1] * y
    if m.moe.shared_ffn:
        shared = feed_forward(get, normed, m, prefix="shared.")
        if m.moe.shared_gate:
            shared = torch.sigmoid(linear(normed, get("shared_gate.weight"))) * shared
        record("shared experts", shared)
        out += shared
    return out


def route(logits: torch.Tensor, m: ModelMath) -> torch.Tensor:
    """[seq, experts] routing weights: zero except the top-k experts of each token."""
    assert m.moe is not None
    k = m.moe.top_k
    if m.moe.pre_softmax:
        probs = torch.softmax(logits, dim=-1)
        top, index = torch.topk(probs, k, dim=-1)
    else:
        top, index = torch.topk(logits, k, dim=-1)
        top = torch.softmax(top, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, top)
