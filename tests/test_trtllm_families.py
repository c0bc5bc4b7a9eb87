"""Today's dense families on the TensorRT-LLM target: Qwen2 (QKV bias, no dense bias), Qwen3
(per-head q/k norms, explicit head size) and Llama 3.1 (RoPE scaling), written by megatron-core,
converted to target TP 1/2/4 and run by the rank-emulating reference forward, which must
reproduce Megatron's own logits; so does StarCoder (multi-query GPT). Their biases and norms are random and their attention weights
large, so a misplaced bias or norm or a wrong rotary setting moves the logits far past 1e-4."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from converters.dtypes import FLOAT32
from converters.errors import UnsupportedModel
from converters.megatron.args import model_config_from_args
from tests.conftest import HF_LAYOUTS, LAYOUTS, read_json
from tests.test_conversion import assert_matches_megatron, convert
from tests.trtllm_reference import reference_logits

# family → (architecture, family-specific config fields)
EXPECTED = {
    "llama31": (
        "LlamaForCausalLM",
        {
            "attn_bias": False,
            "rotary_base": 1000000.0,
            "rotary_scaling": {
                "type": "llama3",
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        {"qwen_type": "qwen2", "attn_bias": True, "mlp_bias": False, "rotary_scaling": None},
    ),
    "qwen3": (
        "Qwen3ForCausalLM",
        {"qwen_type": "qwen3", "attn_bias": False, "qk_layernorm": True, "head_size": 16},
    ),
}
FELT = 1e-3  # a change the fixtures must feel: ten times the matching tolerance


@pytest.fixture(scope="module")
def converted(megatron, tmp_path_factory):
    """`converted(family, tp, layout)` → (output directory, `Checkpoints`), converted once."""
    made = {}

    def get(family: str, tp: int, layout=HF_LAYOUTS[1]):
        checkpoints = megatron(family)
        if (family, tp, layout) not in made:
            out = tmp_path_factory.mktemp(f"trt-{family}") / f"{layout.dirname}-tp{tp}"
            made[family, tp, layout] = convert(checkpoints.paths[layout], out, tp=tp)
        return made[family, tp, layout], checkpoints

    return get


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_logits_match_megatron(converted, family, tp):
    output, checkpoints = converted(family, tp)
    architecture, fields = EXPECTED[family]
    config = read_json(output / "config.json")
    assert config["architecture"] == architecture
    assert {key: config[key] for key in fields} == fields
    assert_matches_megatron(output, checkpoints)


@pytest.mark.parametrize("layout", HF_LAYOUTS, ids=lambda layout: layout.dirname)
@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_every_source_layout(converted, family, layout):
    output, checkpoints = converted(family, 2, layout)
    assert_matches_megatron(output, checkpoints)


def test_qwen2_has_qkv_bias_but_no_dense_bias(converted):
    output, _ = converted("qwen2", 2)
    with safe_open(str(output / "rank1.safetensors"), framework="pt") as f:
        names = set(f.keys())
        # rank 1 of 2: 4 query heads + its 1 KV group (of 2), head size 8
        assert f.get_slice("transformer.layers.0.attention.qkv.bias").get_shape() == [48]
    assert not any(n.endswith(("attention.dense.bias", "mlp.proj.bias")) for n in names)


def test_qwen3_norms_are_whole_on_every_rank(converted):
    output, _ = converted("qwen3", 4)
    norms = []
    for rank in range(4):
        with safe_open(str(output / f"rank{rank}.safetensors"), framework="pt") as f:
            norms.append(f.get_tensor("transformer.layers.1.attention.k_layernorm.weight"))
    assert norms[0].shape == (16,) and all((n == norms[0]).all() for n in norms)


def _edit_config(output, **changes) -> None:
    config = read_json(output / "config.json")
    config.update(changes)
    (output / "config.json").write_text(json.dumps(config))


def test_the_fixtures_feel_each_feature(converted, tmp_path):
    """Without the feature the reference's logits move by more than FELT: the checks can fail."""
    import shutil

    for family, changes in (
        ("llama31", {"rotary_scaling": None}),
        ("qwen3", {"architecture": "LlamaForCausalLM", "qk_layernorm": False}),
    ):
        output, checkpoints = converted(family, 2)
        copy = shutil.copytree(output, tmp_path / family)
        _edit_config(copy, **changes)
        logits = reference_logits(copy, checkpoints.tokens, strict=False)
        assert (logits - checkpoints.logits).abs().max().item() > FELT, family


# StarCoder (GPTBigCode): GPT with multi-query attention, converted as GPTForCausalLM (TensorRT-LLM
# maps GPTBigCodeForCausalLM to it) with the one KV head copied to every rank.
STARCODER_LAYOUTS = ("legacy_tp1_pp1", "legacy_tp1_pp2", "torch_dist_tp1_pp1")


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("layout", STARCODER_LAYOUTS)
def test_starcoder_multi_query_logits_match_megatron(megatron, tmp_path, layout, tp):
    checkpoints = megatron("starcoder")
    source = next(path for lay, path in checkpoints.paths.items() if lay.dirname == layout)
    output = convert(source, tmp_path / "out", tp=tp)
    config = read_json(output / "config.json")
    assert config["architecture"] == "GPTForCausalLM" and config["num_key_value_heads"] == 1
    assert_matches_megatron(output, checkpoints)
    kv = []
    for rank in range(tp):
        with safe_open(str(output / f"rank{rank}.safetensors"), framework="pt") as f:
            qkv = f.get_tensor("transformer.layers.2.attention.qkv.weight")
        assert qkv.shape[0] == (8 // tp + 2) * 8  # its query heads, one K and one V head of 8
        kv.append(qkv[-16:])
    assert all(torch.equal(kv[0], other) for other in kv)


@pytest.mark.parametrize(
    ("argument", "value", "feature"),
    [
        ("heterogeneous_layers_config_encoded_json", '{"block_configs": []}', "Nemotron-NAS"),
        ("heterogeneous_layers_config_path", "/ckpt/blocks.json", "Nemotron-NAS"),
        ("parallel_attention", True, "Falcon-style parallel attention"),
        ("new_decoder_architecture", True, "Falcon's new decoder architecture"),
    ],
)
def test_falcon_and_nemotron_nas_are_refused_by_name(megatron, argument, value, feature):
    """What the seed's exporter lists but a Megatron GPTModel cannot be: refused, naming the
    feature, the argument and the file (Porter would otherwise convert another model)."""
    path = next(megatron("llama").paths[LAYOUTS[0]].rglob("model_optim_rng.pt"))
    args = torch.load(path, weights_only=False, mmap=True)["args"]
    setattr(args, argument, value)
    with pytest.raises(UnsupportedModel, match=rf"{feature}.*{argument}.*not supported") as err:
        model_config_from_args(args, FLOAT32, path)
    assert str(path) in str(err.value)
