"""Mixture-of-experts models in the Hugging Face layout, checked by transformers itself:
Mixtral (`MixtralForCausalLM`: every layer MoE, top-k renormalised) and Qwen3-MoE
(`Qwen3MoeForCausalLM`: q/k norms, `norm_topk_prob` from Megatron's `moe_router_pre_softmax`),
written by megatron-core in each layout the readers distinguish (TP, EP, torch_dist), converted,
loaded with `from_pretrained` (transformers 5 fuses the per-expert tensors as it loads them) and
run: the logits must be Megatron's own. Every expert and router has distinct random values, so a
swapped expert, gate/up or router moves the logits far past the tolerance. What these
architectures cannot compute is refused, naming the feature and the checkpoint."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from converters.errors import UnsupportedModel
from converters.hf.families import family_for
from converters.megatron.layout import open_checkpoint
from tasks.cli.main import main
from tests.test_bad_input import rewrite
from tests.test_hf_convert import assert_matches, hf_logits, tensors_of, write_hf

transformers = pytest.importorskip("transformers")

FELT = 1e-3
# fixture → (architecture, config fields it must have)
EXPECTED = {
    "mixtral": ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # The same model with its experts stored as TEGroupedMLP / the legacy GroupedMLP.
    "mixtral_te_grouped": ("MixtralForCausalLM", {"intermediate_size": 48}),
    "mixtral_legacy_grouped": ("MixtralForCausalLM", {"intermediate_size": 48}),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "moe_intermediate_size": 48, "norm_topk_prob": True, "head_dim": 16},
    ),
    "qwen3_moe_presoftmax": ("Qwen3MoeForCausalLM", {"norm_topk_prob": False}),
    "qwen3_moe_mixed": ("Qwen3MoeForCausalLM", {"mlp_only_layers": [0], "intermediate_size": 64}),
}


def _layouts(megatron, name):
    return sorted(megatron(name).paths, key=lambda layout: layout.dirname)


@pytest.fixture(scope="module")
def converted(megatron, tmp_path_factory):
    """`converted(name, layout)` → HF directory, converted once per module."""
    made = {}

    def get(name, layout):
        if (name, layout) not in made:
            out = tmp_path_factory.mktemp(f"hf-{name}") / layout.dirname
            write_hf(megatron(name).paths[layout], out)
            made[name, layout] = out
        return made[name, layout]

    return get


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_logits_match_megatron_from_every_layout(megatron, converted, name):
    checkpoints = megatron(name)
    architecture, fields = EXPECTED[name]
    for layout in _layouts(megatron, name):
        directory = converted(name, layout)
        config = transformers.AutoConfig.from_pretrained(directory)
        assert config.architectures == [architecture]
        assert {key: getattr(config, key) for key in fields} == fields
        assert_matches(hf_logits(directory, checkpoints.tokens), checkpoints.logits)


def test_mixtral_is_written_per_expert_as_the_hub_does(megatron, converted):
    layout = _layouts(megatron, "mixtral")[0]
    names = set(tensors_of(converted("mixtral", layout)))
    layer = "model.layers.1.block_sparse_moe"
    assert f"{layer}.gate.weight" in names
    assert {f"{layer}.experts.3.{w}.weight" for w in ("w1", "w2", "w3")} <= names
    assert not any(".mlp." in name for name in names)


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("mixtral", "swap w1 and w3 of expert 2 in layer 0"),
        ("mixtral", "swap experts 0 and 3 of layer 1"),
        ("qwen3_moe", "flip norm_topk_prob"),
    ],
)
def test_the_fixtures_feel_each_mistake(megatron, converted, tmp_path, name, change):
    checkpoints = megatron(name)
    broken = shutil.copytree(converted(name, _layouts(megatron, name)[0]), tmp_path / "broken")
    if change == "flip norm_topk_prob":
        config = json.loads((broken / "config.json").read_text())
        config["norm_topk_prob"] = not config["norm_topk_prob"]
        (broken / "config.json").write_text(json.dumps(config))
    else:
        path = broken / "model.safetensors"
        tensors = load_file(path)
        layer, pairs = (
            (0, [("experts.2.w1", "experts.2.w3")])
            if change.startswith("swap w1")
            else (1, [(f"experts.0.{w}", f"experts.3.{w}") for w in ("w1", "w2", "w3")])
        )
        for a, b in pairs:
            a = f"model.layers.{layer}.block_sparse_moe.{a}.weight"
            b = f"model.layers.{layer}.block_sparse_moe.{b}.weight"
            tensors[a], tensors[b] = tensors[b], tensors[a]
        save_file(tensors, path, metadata={"format": "pt"})
    diff = (hf_logits(broken, checkpoints.tokens) - checkpoints.logits).abs().max().item()
    assert diff > FELT, f"{change} changes the logits by only {diff:.3g}"


def test_softmax_before_top_k_without_qk_norms_is_refused(megatron, tmp_path, capsys):
    """Mixtral renormalises the top-k and Qwen3-MoE has q/k norms: no HF architecture here
    computes a pre-softmax router without them."""
    source = megatron("mixtral_presoftmax").paths[_layouts(megatron, "mixtral_presoftmax")[0]]
    out = tmp_path / "hf"
    assert main(["convert", "megatron-hf", str(source), str(out), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert str(source) in error and "softmax over all experts before the top-k" in error
    assert "no qk-layernorm" in error and not out.exists()


@pytest.mark.parametrize(
    ("argument", "value", "feature"),
    [
        ("moe_router_score_function", "sigmoid", "sigmoid router scores"),
        ("moe_router_enable_expert_bias", True, "router expert bias"),
        ("moe_router_topk_scaling_factor", 2.5, "top-k scaling"),
        ("moe_shared_expert_intermediate_size", 48, "shared experts"),
    ],
)
def test_routing_hugging_face_cannot_compute_is_refused(
    megatron, tmp_path, capsys, argument, value, feature
):
    """Refused before anything is written, naming the feature and the checkpoint."""
    layout = _layouts(megatron, "mixtral")[0]
    source = shutil.copytree(megatron("mixtral").paths[layout], tmp_path / "source")
    for path in source.rglob("model_optim_rng.pt"):
        rewrite(path, lambda payload: setattr(payload["args"], argument, value))
    out = tmp_path / "hf"
    assert main(["convert", "megatron-hf", str(source), str(out), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert str(source) in error and feature in error, error
    assert not out.exists()


def test_dense_architectures_refuse_experts(megatron):
    cfg = open_checkpoint(megatron("mixtral").paths[_layouts(megatron, "mixtral")[0]]).config
    for architecture in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        with pytest.raises(UnsupportedModel, match=r"mixture-of-experts layers"):
            family_for(cfg, architecture)
    assert family_for(cfg).architecture == "MixtralForCausalLM"
    dense = dataclasses.replace(cfg, num_experts=0, moe_router_topk=0)
    with pytest.raises(UnsupportedModel, match=r"no experts"):
        family_for(dense, "MixtralForCausalLM")


def test_shared_experts_are_refused(megatron, tmp_path, capsys):
    """Shared experts without a gate: Qwen2-MoE's shared expert always has one, and neither
    Mixtral nor Qwen3-MoE has shared experts."""
    checkpoints = megatron("moe_mixed_shared")
    source = checkpoints.paths[_layouts(megatron, "moe_mixed_shared")[0]]
    out = tmp_path / "hf"
    assert main(["convert", "megatron-hf", str(source), str(out), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert str(source) in error and "shared experts" in error and not out.exists()
