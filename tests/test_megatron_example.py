"""Real Megatron checkpoints written by converters.megatron.example (needs megatron-core)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from converters.megatron.example import (
    FAMILIES,
    ExampleCheckpoints,
    Layout,
    write_example_checkpoint,
    write_example_checkpoints,
)

LAYOUTS = [
    Layout("legacy", 1, 1),
    Layout("legacy", 2, 1),
    Layout("legacy", 1, 2),
    Layout("legacy", 2, 2),
    Layout("torch_dist", 2, 1),
]
ITER = 10
SEQ = 12


@pytest.fixture(scope="module", params=["llama", "gpt"])
def example(request, tmp_path_factory) -> tuple[str, ExampleCheckpoints]:
    family = request.param
    root = tmp_path_factory.mktemp(f"mcore_{family}")
    return family, write_example_checkpoints(root, family, LAYOUTS, seq_len=SEQ)


def _load(path: Path) -> dict:
    # Test-only: the files reference megatron.core.enums.ModelType.
    return torch.load(path, weights_only=False, map_location="cpu")


def _rank_file(root: Path, tp_rank: int, pp_rank: int | None = None) -> Path:
    name = f"mp_rank_{tp_rank:02d}" if pp_rank is None else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return root / f"iter_{ITER:07d}" / name / "model_optim_rng.pt"


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_layout_dirname():
    assert Layout("legacy", 2, 1).dirname == "legacy_tp2_pp1"
    assert Layout("torch_dist", 2).dirname == "torch_dist_tp2_pp1"


def test_files_exist(example):
    _, ex = example
    assert set(ex.paths) == set(LAYOUTS)
    for layout, root in ex.paths.items():
        assert root.name == layout.dirname
        assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITER)
        iter_dir = root / f"iter_{ITER:07d}"
        if layout.format == "legacy":
            for t in range(layout.tp):
                for p in range(layout.pp):
                    assert _rank_file(root, t, p if layout.pp > 1 else None).is_file()
            assert len(list(iter_dir.glob("mp_rank_*"))) == layout.tp * layout.pp
        else:
            for name in ("metadata.json", "common.pt", ".metadata"):
                assert (iter_dir / name).is_file()
            assert list(iter_dir.glob("__*_*.distcp"))


def test_args_and_envelope(example):
    family, ex = example
    preset = FAMILIES[family]
    for layout in [Layout("legacy", 1, 1), Layout("legacy", 2, 2)]:
        ckpt = _load(_rank_file(ex.paths[layout], 0, 0 if layout.pp > 1 else None))
        assert ckpt["checkpoint_version"] == 3.0
        assert ckpt["iteration"] == ITER
        assert set(ckpt["optimizer"]) == {"state", "param_groups"}
        assert (
            ckpt["optimizer"]["state"][0]["exp_avg"].shape
            == next(iter(_tensors(ckpt["model"]).values())).shape
        )
        assert any(isinstance(v, torch.Tensor) for v in ckpt["rng_state"][0].values())
        args = ckpt["args"]
        for key in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "swiglu",
            "normalization",
            "norm_epsilon",
            "position_embedding_type",
            "padded_vocab_size",
            "untie_embeddings_and_output_weights",
            "add_bias_linear",
            "add_qkv_bias",
        ):
            assert getattr(args, key) == preset[key], key
        kv = preset["kv_channels"] or preset["hidden_size"] // preset["num_attention_heads"]
        assert args.kv_channels == kv
        assert args.group_query_attention == (family == "llama")
        assert args.tensor_model_parallel_size == layout.tp
        assert args.pipeline_model_parallel_size == layout.pp
        assert args.params_dtype == torch.float32 and not args.bf16 and not args.fp16
        assert args.num_experts is None and args.qk_layernorm is False
        assert type(args.model_type).__module__ == "megatron.core.enums"
        assert args.model_type.name == "encoder_or_decoder"


def test_legacy_names_and_shapes(example):
    family, ex = example
    hp = FAMILIES[family]
    model = _load(_rank_file(ex.paths[Layout("legacy", 1, 1)], 0))["model"]
    h, nh, ng = hp["hidden_size"], hp["num_attention_heads"], hp["num_query_groups"]
    d = hp["kv_channels"] or h // nh
    fc1_rows = hp["ffn_hidden_size"] * (2 if hp["swiglu"] else 1)
    assert model["embedding.word_embeddings.weight"].shape == (hp["padded_vocab_size"], h)
    assert model["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (
        (nh + 2 * ng) * d,
        h,
    )
    assert model["decoder.layers.0.mlp.linear_fc1.weight"].shape == (fc1_rows, h)
    assert model["decoder.layers.3.input_layernorm.weight"].shape == (h,)
    assert "decoder.final_layernorm.weight" in model
    assert ("output_layer.weight" in model) == hp["untie_embeddings_and_output_weights"]
    assert ("embedding.position_embeddings.weight" in model) == (family == "gpt")
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in model) == hp["add_qkv_bias"]
    assert ("decoder.layers.0.mlp.linear_fc2.bias" in model) == hp["add_bias_linear"]


def test_tp2_shards_reproduce_tp1(example):
    family, ex = example
    full = _tensors(_load(_rank_file(ex.paths[Layout("legacy", 1, 1)], 0))["model"])
    shards = [
        _tensors(_load(_rank_file(ex.paths[Layout("legacy", 2, 1)], r))["model"]) for r in (0, 1)
    ]
    assert set(shards[0]) == set(full) == set(shards[1])
    gated = FAMILIES[family]["swiglu"]
    for key, ref in full.items():
        a, b = shards[0][key], shards[1][key]
        if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
            merged = torch.cat([a, b], dim=1)
        elif "linear_fc1" in key and gated:  # each shard is [gate_r; up_r]
            a1, a2 = a.chunk(2)
            b1, b2 = b.chunk(2)
            merged = torch.cat([a1, b1, a2, b2])
        elif re.search(r"(word_embeddings|output_layer|linear_qkv|linear_fc1)\.", key):
            merged = torch.cat([a, b], dim=0)
        else:  # norms, position embeddings, row-parallel biases: replicated
            assert torch.equal(a, b), key
            merged = a
        assert torch.equal(merged, ref), key


def _renumber(state: dict[str, torch.Tensor], offset: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
        out[f"decoder.layers.{int(m[1]) + offset}.{m[2]}" if m else key] = value
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_pp2_stages_equal_pp1(example, tp):
    family, ex = example
    n = FAMILIES[family]["num_layers"]
    tied = not FAMILIES[family]["untie_embeddings_and_output_weights"]
    for t in range(tp):
        ref = _tensors(_load(_rank_file(ex.paths[Layout("legacy", tp, 1)], t))["model"])
        stages = [
            _tensors(_load(_rank_file(ex.paths[Layout("legacy", tp, 2)], t, p))["model"])
            for p in (0, 1)
        ]
        for stage in stages:
            layers = {int(m[1]) for k in stage if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
            assert layers == set(range(n // 2))
        assert "embedding.word_embeddings.weight" in stages[0]
        assert "embedding.word_embeddings.weight" not in stages[1]
        assert "decoder.final_layernorm.weight" in stages[1]
        assert "decoder.final_layernorm.weight" not in stages[0]
        assert "output_layer.weight" in stages[1]  # own copy, also when tied
        if tied:
            assert torch.equal(
                stages[1].pop("output_layer.weight"), ref["embedding.word_embeddings.weight"]
            )
        merged = {**stages[0], **_renumber(stages[1], n // 2)}
        assert set(merged) == set(ref)
        for key, value in ref.items():
            assert torch.equal(merged[key], value), key


def test_torch_dist(example):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    family, ex = example
    iter_dir = ex.paths[Layout("torch_dist", 2, 1)] / f"iter_{ITER:07d}"
    assert json.loads((iter_dir / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    common = _load(iter_dir / "common.pt")
    assert common["args"].tensor_model_parallel_size == 2
    assert common["args"].num_layers == FAMILIES[family]["num_layers"]
    assert common["iteration"] == ITER and common["checkpoint_version"] == 3.0

    meta = FileSystemReader(str(iter_dir)).read_metadata().state_dict_metadata
    full = _tensors(_load(_rank_file(ex.paths[Layout("legacy", 1, 1)], 0))["model"])
    n = FAMILIES[family]["num_layers"]
    want = {
        "decoder.layers.self_attention.linear_qkv.weight": "self_attention.linear_qkv.weight",
        "decoder.layers.mlp.linear_fc1.weight": "mlp.linear_fc1.weight",
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    }
    state = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in want}
    state["embedding.word_embeddings.weight"] = torch.empty_like(
        full["embedding.word_embeddings.weight"]
    )
    dcp_load(state, storage_reader=FileSystemReader(str(iter_dir)), no_dist=True)
    assert torch.equal(
        state["embedding.word_embeddings.weight"], full["embedding.word_embeddings.weight"]
    )
    for key, local in want.items():
        assert state[key].shape[0] == n
        for i in range(n):
            assert torch.equal(state[key][i], full[f"decoder.layers.{i}.{local}"]), (key, i)


def test_oracle_logits(example):
    family, ex = example
    vocab = FAMILIES[family]["padded_vocab_size"]
    assert ex.tokens.dtype == torch.int64 and ex.tokens.shape == (SEQ,)
    assert int(ex.tokens.min()) >= 0 and int(ex.tokens.max()) < vocab
    assert ex.logits.dtype == torch.float32 and ex.logits.shape == (SEQ, vocab)
    assert torch.isfinite(ex.logits).all()
    assert ex.logits.std() > 0


def _reference_forward(state: dict[str, torch.Tensor], hp: dict, tokens: torch.Tensor):
    """Plain-torch forward from the TP=1 state dict (documents Megatron's layouts)."""
    h, nh, ng = hp["hidden_size"], hp["num_attention_heads"], hp["num_query_groups"]
    d = hp["kv_channels"] or h // nh
    q_per_group = nh // ng
    eps = hp["norm_epsilon"]
    seq = tokens.numel()
    f = torch.nn.functional

    def norm(x, prefix):
        w = state[prefix + ".weight"]
        if hp["normalization"] == "RMSNorm":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
        return f.layer_norm(x, (h,), w, state[prefix + ".bias"], eps)

    def linear(x, prefix):
        return f.linear(x, state[prefix + ".weight"], state.get(prefix + ".bias"))

    x = state["embedding.word_embeddings.weight"][tokens]
    if hp["position_embedding_type"] == "learned_absolute":
        x = x + state["embedding.position_embeddings.weight"][:seq]
    else:
        inv = 1.0 / (hp["rotary_base"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        ang = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rope(t):  # t [heads, seq, d], rotate-half (GPT-NeoX) style
            t1, t2 = t.chunk(2, dim=-1)
            return t * cos + torch.cat([-t2, t1], -1) * sin

    for i in range(hp["num_layers"]):
        p = f"decoder.layers.{i}."
        y = norm(x, p + "input_layernorm")
        qkv = linear(y, p + "self_attention.linear_qkv").view(seq, ng, q_per_group + 2, d)
        q = qkv[:, :, :q_per_group].reshape(seq, nh, d).transpose(0, 1)
        k = qkv[:, :, q_per_group].transpose(0, 1).repeat_interleave(q_per_group, 0)
        v = qkv[:, :, q_per_group + 1].transpose(0, 1).repeat_interleave(q_per_group, 0)
        if hp["position_embedding_type"] == "rope":
            q, k = rope(q), rope(k)
        attn = f.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + linear(attn.transpose(0, 1).reshape(seq, nh * d), p + "self_attention.linear_proj")
        y = linear(norm(x, p + "pre_mlp_layernorm"), p + "mlp.linear_fc1")
        if hp["swiglu"]:
            a, b = y.chunk(2, dim=-1)
            y = f.silu(a) * b
        else:
            y = f.gelu(y)
        x = x + linear(y, p + "mlp.linear_fc2")
    x = norm(x, "decoder.final_layernorm")
    out = state.get("output_layer.weight", state["embedding.word_embeddings.weight"])
    return x @ out.T


def test_oracle_matches_saved_weights(example):
    family, ex = example
    state = _tensors(_load(_rank_file(ex.paths[Layout("legacy", 1, 1)], 0))["model"])
    ref = _reference_forward(state, FAMILIES[family], ex.tokens)
    torch.testing.assert_close(ref, ex.logits, atol=1e-4, rtol=1e-4)


def test_bf16_te_names_single_layout(tmp_path):
    path = write_example_checkpoint(
        tmp_path / "ckpt",
        "llama",
        tp=1,
        pp=2,
        format="legacy",
        dtype=torch.bfloat16,
        transformer_engine_names=True,
        overrides={"num_layers": 2},
        seq_len=8,
    )
    assert (path / "latest_checkpointed_iteration.txt").read_text() == str(ITER)
    ckpt = _load(_rank_file(path, 0, 0))
    assert ckpt["args"].bf16 and ckpt["args"].params_dtype == torch.bfloat16
    assert ckpt["args"].transformer_impl == "transformer_engine"
    model = ckpt["model"]
    assert model["decoder.layers.0.self_attention.linear_qkv.weight"].dtype == torch.bfloat16
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in model
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in model
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in model)
    assert "decoder.layers.0.self_attention.linear_qkv._extra_state" in model
    assert not any(k.startswith("decoder.layers.1.") for k in model)  # 2 layers over 2 stages
    assert math.isclose(ckpt["args"].norm_epsilon, 1e-5)


def test_megatron_missing_message(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("megatron") else real(name, *a),
    )
    with pytest.raises(RuntimeError, match=r"porter\[example\]"):
        write_example_checkpoints(tmp_path, "llama", [Layout("legacy")])


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_torch_dist_pp2_equals_legacy(tmp_path, family):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    layouts = [Layout("legacy", 1, 1), Layout("torch_dist", 1, 2)]
    ex = write_example_checkpoints(tmp_path, family, layouts, overrides={"num_layers": 2})
    full = _tensors(_load(_rank_file(ex.paths[layouts[0]], 0))["model"])
    iter_dir = ex.paths[layouts[1]] / f"iter_{ITER:07d}"
    assert _load(iter_dir / "common.pt")["args"].pipeline_model_parallel_size == 2
    meta = FileSystemReader(str(iter_dir)).read_metadata().state_dict_metadata
    names = {k for k in meta if "_extra_state" not in k}
    expected = {k for k in full if not k.startswith("decoder.layers.")}
    assert expected <= names
    state = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in names}
    dcp_load(state, storage_reader=FileSystemReader(str(iter_dir)), no_dist=True)
    for key in expected:
        assert torch.equal(state[key], full[key]), key
    qkv = state["decoder.layers.self_attention.linear_qkv.weight"]
    assert qkv.shape[0] == 2
    for i in range(2):
        assert torch.equal(qkv[i], full[f"decoder.layers.{i}.self_attention.linear_qkv.weight"])
