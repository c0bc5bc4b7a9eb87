"""Today's dense families in the Hugging Face layout, checked by transformers itself: Llama 3.1
(RoPE scaling), Qwen2 (QKV biases, tied embeddings) and Qwen3 (per-head q/k norms, explicit head
size), each written by megatron-core in every layout the readers distinguish. Their biases and
norm weights are random and their attention weights large enough that a misplaced bias or norm,
or a wrong rotary setting, moves the logits far beyond the tolerance."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.dtypes import FLOAT32
from converters.errors import CorruptCheckpoint, UnsupportedModel
from converters.hf.families import family_for
from converters.hf.plan import HfTarget, hf_tensors, plan_shards
from converters.megatron.args import model_config_from_args
from converters.megatron.layout import open_checkpoint
from converters.model import ModelConfig
from converters.torch_arrays import materialize as as_torch
from converters.trtllm.config import trtllm_config
from converters.trtllm.plan import Target, rank_tensors
from tests.conftest import HF_LAYOUTS
from tests.test_hf_convert import Patched, assert_matches, hf_logits, write_hf

transformers = pytest.importorskip("transformers")

# family → (architecture, model_type)
EXPECTED = {
    "llama31": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
FELT = 1e-3  # a change the fixture must feel: ten times the matching tolerance


def read_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def write_config(directory: Path, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def converted(megatron, tmp_path_factory):
    """`converted(family, layout)` → (HF directory, `Checkpoints`), converted once per module."""
    made: dict[tuple[str, object], Path] = {}

    def get(family: str, layout=HF_LAYOUTS[1]):
        checkpoints = megatron(family)
        if (family, layout) not in made:
            output = tmp_path_factory.mktemp(f"hf-{family}") / layout.dirname
            write_hf(checkpoints.paths[layout], output)
            made[family, layout] = output
        return made[family, layout], checkpoints

    return get


@pytest.mark.parametrize("layout", HF_LAYOUTS, ids=lambda layout: layout.dirname)
@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_logits_match_megatron(converted, family, layout):
    directory, checkpoints = converted(family, layout)
    config = read_config(directory)
    architecture, model_type = EXPECTED[family]
    assert config["architectures"] == [architecture] and config["model_type"] == model_type
    assert_matches(hf_logits(directory, checkpoints.tokens), checkpoints.logits)


def test_llama31_writes_the_llama3_rope_scaling_in_both_spellings(converted):
    config = read_config(converted("llama31")[0])
    assert config["rope_scaling"] == LLAMA3_SCALING
    assert config["rope_parameters"] == {**LLAMA3_SCALING, "rope_theta": 1e6}
    assert config["rope_theta"] == 1e6 and config["max_position_embeddings"] == 16384


def test_llama31_logits_feel_the_rope_scaling(converted, tmp_path):
    """Without the scaling in config.json transformers computes another model; with either
    spelling alone (v4's rope_scaling, v5's rope_parameters) it computes Megatron's."""
    directory, checkpoints = converted("llama31")
    config = read_config(directory)
    variants = {
        "unscaled": {
            **config,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": config["rope_theta"]},
        },
        "rope_scaling_only": {k: v for k, v in config.items() if k != "rope_parameters"},
        "rope_parameters_only": {**config, "rope_scaling": None},
    }
    for name, variant in variants.items():
        copy = tmp_path / name
        copy.mkdir()
        (copy / "model.safetensors").symlink_to(directory / "model.safetensors")
        write_config(copy, variant)
    unscaled = hf_logits(tmp_path / "unscaled", checkpoints.tokens)
    diff = (unscaled - checkpoints.logits).abs().max().item()
    assert diff > FELT, f"dropping RoPE scaling changes the logits by only {diff:.3g}"
    for name in ("rope_scaling_only", "rope_parameters_only"):
        assert_matches(hf_logits(tmp_path / name, checkpoints.tokens), checkpoints.logits)


def test_qwen3_head_size_and_qk_norms(converted, megatron):
    directory, _ = converted("qwen3")
    config = read_config(directory)
    assert config["head_dim"] == 16 and config["num_attention_heads"] * 16 != config["hidden_size"]
    assert config["attention_bias"] is False and config["tie_word_embeddings"] is False
    tensors = load_file(str(directory / "model.safetensors"))
    source = open_checkpoint(megatron("qwen3").paths[HF_LAYOUTS[3]])  # torch_dist: stacked norms
    for layer in range(4):
        for hf, mcore in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")):
            weight = tensors[f"model.layers.{layer}.self_attn.{hf}.weight"]
            stored = source.tensor(f"decoder.layers.{layer}.self_attention.{mcore}.weight")
            assert weight.shape == (16,) and torch.equal(weight, as_torch(stored))
            assert (weight - 1).abs().max() > 0.1  # random, not megatron-core's initial ones
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)
    assert tensors["model.layers.0.self_attn.o_proj.weight"].shape == (64, 128)
    assert not any(name.endswith(".bias") for name in tensors)


def test_qwen2_biases_and_tied_embeddings(converted):
    directory, _ = converted("qwen2")
    config = read_config(directory)
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 1e6
    tensors = load_file(str(directory / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    biases = {name for name in tensors if name.endswith(".bias")}
    assert biases == {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(4) for p in "qkv"}
    assert all(tensors[name].abs().max() > 0.1 for name in biases)  # random, not zeros


@pytest.mark.parametrize(
    ("family", "change"),
    [
        ("qwen3", "swap q_norm and k_norm"),
        ("qwen2", "zero q_proj.bias"),
        ("qwen2", "zero v_proj.bias"),
    ],
)
def test_the_fixtures_feel_a_misplaced_norm_or_bias(converted, tmp_path, family, change):
    """Why the writer randomises biases and norm weights: each wrong placement moves the logits."""
    directory, checkpoints = converted(family)
    tensors = load_file(str(directory / "model.safetensors"))
    attn = "model.layers.1.self_attn"
    if change == "swap q_norm and k_norm":
        q, k = tensors[f"{attn}.q_norm.weight"], tensors[f"{attn}.k_norm.weight"]
        tensors[f"{attn}.q_norm.weight"], tensors[f"{attn}.k_norm.weight"] = k, q
    else:
        name = f"{attn}.{change.split()[1]}"
        tensors[name] = torch.zeros_like(tensors[name])
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    write_config(broken, read_config(directory))
    diff = (hf_logits(broken, checkpoints.tokens) - checkpoints.logits).abs().max().item()
    assert diff > FELT, f"{change} changes the logits by only {diff:.3g}"


def test_tensorrt_llm_target_takes_qwen2_as_qwen2(megatron):
    """The TensorRT-LLM target writes these families too (tests/test_trtllm_families.py)."""
    source = open_checkpoint(megatron("qwen2").paths[HF_LAYOUTS[1]])
    names = [t.name for t in rank_tensors(source, Target(tp=2), 1)]
    assert "transformer.layers.0.attention.qkv.bias" in names
    assert "transformer.layers.0.attention.dense.bias" not in names
    assert trtllm_config(source.config, Target(tp=2))["architecture"] == "Qwen2ForCausalLM"


def test_architectures_refuse_what_they_cannot_compute(megatron):
    qwen3 = open_checkpoint(megatron("qwen3").paths[HF_LAYOUTS[0]]).config
    llama31 = open_checkpoint(megatron("llama31").paths[HF_LAYOUTS[0]]).config
    for architecture in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        with pytest.raises(UnsupportedModel, match=r"qk-layernorm .*Qwen3ForCausalLM is the exact"):
            family_for(qwen3, architecture)
    with pytest.raises(UnsupportedModel, match=r"Qwen3ForCausalLM cannot .*no qk-layernorm"):
        family_for(llama31, "qwen3")
    # Llama-3.1 scaling is rope config, which every Llama-style architecture reads.
    assert family_for(dataclasses.replace(qwen3, rope_scaling_factor=8.0)).model_type == "qwen3"
    assert family_for(llama31).model_type == "llama"


def test_stored_qk_norms_without_the_argument_are_refused(megatron):
    source = open_checkpoint(megatron("qwen3").paths[HF_LAYOUTS[2]])  # legacy PP2
    config = dataclasses.replace(source.config, qk_layernorm=False)
    with pytest.raises(UnsupportedModel, match=r"q_layernorm\.weight is stored but .*qk_layernorm"):
        plan_shards(Patched(source, lambda name, tensor: tensor, config), HfTarget())


def test_missing_qk_norms_are_named(megatron, tmp_path):
    path = megatron("qwen3").paths[HF_LAYOUTS[0]]
    source = open_checkpoint(path)
    tensors = {t.name: t for t in hf_tensors(source, HfTarget())}
    assert "model.layers.3.self_attn.k_norm.weight" in tensors
    # The same legacy TP1 file without the k norm of layer 3.
    file = path / "iter_0000010/mp_rank_00/model_optim_rng.pt"
    payload = torch.load(file, weights_only=False)
    del payload["model"]["decoder.layers.3.self_attention.k_layernorm.weight"]
    damaged = tmp_path / "damaged"
    (damaged / "iter_0000010/mp_rank_00").mkdir(parents=True)
    torch.save(payload, damaged / "iter_0000010/mp_rank_00/model_optim_rng.pt")
    (damaged / "latest_checkpointed_iteration.txt").write_text("10")
    assert open_checkpoint(damaged).config == source.config
    with pytest.raises(CorruptCheckpoint, match=r"missing parameter .*3\.self_attention\.k_layer"):
        plan_shards(open_checkpoint(damaged), HfTarget())


def _args(**changes) -> argparse.Namespace:
    base = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=8,
        padded_vocab_size=100,
        normalization="RMSNorm",
        swiglu=True,
        position_embedding_type="rope",
        add_bias_linear=False,
    )
    return argparse.Namespace(**{**base, **changes})


def _config(**changes) -> ModelConfig:
    return model_config_from_args(_args(**changes), FLOAT32, Path("model_optim_rng.pt"))


def test_rope_scaling_and_qk_layernorm_arguments():
    assert _config().rope_scaling_factor is None and _config().qk_layernorm is False
    assert _config(use_rope_scaling=True).rope_scaling_factor == 8.0  # Megatron-LM's default
    assert _config(use_rope_scaling=True, rope_scaling_factor=32).rope_scaling_factor == 32.0
    assert _config(rope_scaling=True).rope_scaling_factor == 8.0  # GPTModel's name for it
    assert _config(use_rope_scaling=False, rope_scaling_factor=4.0).rope_scaling_factor is None
    learned = _config(use_rope_scaling=True, position_embedding_type="learned_absolute")
    assert learned.rope_scaling_factor is None  # megatron-core scales rotary embeddings only
    assert _config(qk_layernorm=True, kv_channels=16).qk_layernorm is True
    with pytest.raises(CorruptCheckpoint, match="rope_scaling_factor"):
        _config(use_rope_scaling=True, rope_scaling_factor=0.0)
    with pytest.raises(UnsupportedModel, match="rope_scaling="):
        _config(rope_scaling={"rope_type": "yarn", "factor": 4.0})


@pytest.mark.parametrize(
    ("argument", "value", "feature"),
    [
        ("rotary_seq_len_interpolation_factor", 4.0, "linear RoPE position interpolation"),
        ("qk_l2_norm", True, "L2-normalised queries and keys"),
        ("rotary_interleaved", True, "interleaved rotary embeddings"),
    ],
)
def test_rotary_and_qk_variants_still_refused(argument, value, feature):
    with pytest.raises(UnsupportedModel, match=f"{feature} .*not supported"):
        _config(**{argument: value})


def test_configs_recorded_before_these_features_still_construct(megatron):
    recorded = open_checkpoint(megatron("qwen2").paths[HF_LAYOUTS[0]]).config.to_dict()
    del recorded["qk_layernorm"], recorded["rope_scaling_factor"]
    config = ModelConfig(**recorded)
    assert config.qk_layernorm is False and config.rope_scaling_factor is None
