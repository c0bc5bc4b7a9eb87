"""End to end on real Megatron checkpoints: the converted TensorRT-LLM checkpoint, run by a
tensor-parallel reference forward pass, reproduces the Megatron model's own logits."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tasks.executors.local import run_conversion
from tasks.kinds.megatron_trtllm import ConvertSpec
from tests.conftest import LAYOUTS, read_json
from tests.trtllm_reference import reference_logits

TOLERANCE = 1e-4


def convert(source: Path, output: Path, workers: int = 1, **options) -> Path:
    run_conversion(ConvertSpec(str(source), str(output), **options), workers=workers)
    return output


def assert_matches_megatron(output: Path, checkpoints) -> None:
    logits = reference_logits(output, checkpoints.tokens)
    vocab = checkpoints.logits.shape[-1]
    assert logits.shape == (checkpoints.tokens.numel(), vocab)
    diff = (logits - checkpoints.logits).abs().max().item()
    assert diff <= TOLERANCE, f"max abs diff {diff:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("family", ["llama", "gpt"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.dirname)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_logits_match_megatron(megatron, tmp_path, family, layout, tp):
    checkpoints = megatron(family)
    output = convert(checkpoints.paths[layout], tmp_path / "out", tp=tp)
    assert_matches_megatron(output, checkpoints)


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_pipeline_parallel_target(megatron, tmp_path, family):
    checkpoints = megatron(family)
    layout = LAYOUTS[1]  # legacy, training TP=2
    output = convert(checkpoints.paths[layout], tmp_path / "out", tp=2, pp=2)
    config = read_json(output / "config.json")
    assert config["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    assert sorted(p.name for p in output.glob("rank*.safetensors")) == [
        f"rank{r}.safetensors" for r in range(4)
    ]
    with safe_open(str(output / "rank2.safetensors"), framework="pt") as last_stage:
        names = set(last_stage.keys())
    assert "lm_head.weight" in names and "transformer.vocab_embedding.weight" not in names
    assert {n.split(".")[2] for n in names if n.startswith("transformer.layers.")} == {"0", "1"}
    assert_matches_megatron(output, checkpoints)


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_parallel_embedding(megatron, tmp_path, family):
    checkpoints = megatron(family)
    output = convert(checkpoints.paths[LAYOUTS[0]], tmp_path / "out", tp=4, parallel_embedding=True)
    vocab = checkpoints.logits.shape[-1]
    with safe_open(str(output / "rank3.safetensors"), framework="pt") as f:
        embedding = f.get_tensor("transformer.vocab_embedding.weight")
    assert embedding.shape[0] == -(-vocab // 4)
    assert read_json(output / "config.json")["use_parallel_embedding"] is True
    assert_matches_megatron(output, checkpoints)


def test_llama_structure_and_config(megatron, tmp_path):
    checkpoints = megatron("llama")
    output = convert(checkpoints.paths[LAYOUTS[1]], tmp_path / "out", tp=4)
    config = read_json(output / "config.json")
    assert config == config | {
        "architecture": "LlamaForCausalLM",
        "dtype": "float32",
        "vocab_size": 102,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_size": 8,
        "intermediate_size": 128,
        "hidden_act": "silu",
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": 10000.0,
        "attn_bias": False,
        "mlp_bias": False,
        "mapping": {"world_size": 4, "tp_size": 4, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    with safe_open(str(output / "rank1.safetensors"), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        dtypes = {f.get_tensor(name).dtype for name in f.keys()}
    assert dtypes == {torch.float32}
    assert shapes["transformer.vocab_embedding.weight"] == (102, 64)
    # ng=2 < T=4: two query heads and one (duplicated) KV head per rank.
    assert shapes["transformer.layers.0.attention.qkv.weight"] == ((2 + 2 * 1) * 8, 64)
    assert shapes["transformer.layers.3.attention.dense.weight"] == (64, 16)
    assert shapes["transformer.layers.0.mlp.fc.weight"] == (32, 64)
    assert shapes["transformer.layers.0.mlp.gate.weight"] == (32, 64)
    assert shapes["transformer.layers.0.mlp.proj.weight"] == (64, 32)
    assert shapes["lm_head.weight"] == (26, 64)  # 102 rows padded to 104, split in 4
    assert not any(name.endswith(".bias") for name in shapes)


def test_gpt_structure_tied_embeddings_and_vocab_padding(megatron, tmp_path):
    checkpoints = megatron("gpt")
    output = convert(checkpoints.paths[LAYOUTS[0]], tmp_path / "out", tp=4)
    config = read_json(output / "config.json")
    assert config["architecture"] == "GPTForCausalLM"
    assert config["hidden_act"] == "gelu"
    assert config["position_embedding_type"] == "learned_absolute"
    assert config["bias"] is True
    lm_heads = []
    for rank in range(4):
        with safe_open(str(output / f"rank{rank}.safetensors"), framework="pt") as f:
            lm_heads.append(f.get_tensor("lm_head.weight"))
            embedding = f.get_tensor("transformer.vocab_embedding.weight")
            assert f.get_tensor("transformer.layers.0.attention.qkv.bias").shape == (3 * 2 * 8,)
            assert f.get_tensor("transformer.position_embedding.weight").shape == (64, 64)
    head = torch.cat(lm_heads)
    assert head.shape == (100, 64)  # 98 rows padded to a multiple of 4
    assert torch.equal(head[:98], embedding)  # tied: lm_head is the word embedding
    assert torch.count_nonzero(head[98:]) == 0


def test_bfloat16_output(megatron, tmp_path):
    checkpoints = megatron("llama")
    output = convert(checkpoints.paths[LAYOUTS[1]], tmp_path / "out", tp=2, dtype="bfloat16")
    assert read_json(output / "config.json")["dtype"] == "bfloat16"
    with safe_open(str(output / "rank0.safetensors"), framework="pt") as f:
        assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.bfloat16}
    logits = reference_logits(output, checkpoints.tokens)
    assert (logits - checkpoints.logits).abs().max() < 0.1  # bf16 rounding, not a layout error
    fp32 = convert(checkpoints.paths[LAYOUTS[1]], tmp_path / "fp32", tp=2)
    with (
        safe_open(str(output / "rank1.safetensors"), "pt") as low,
        safe_open(str(fp32 / "rank1.safetensors"), "pt") as high,
    ):
        for name in low.keys():
            assert torch.equal(low.get_tensor(name), high.get_tensor(name).to(torch.bfloat16)), name


def test_transformer_engine_names_and_bf16_source(megatron, tmp_path):
    checkpoints = megatron("llama_te_bf16")
    source = next(iter(checkpoints.paths.values()))
    output = convert(source, tmp_path / "out", tp=4)
    assert read_json(output / "config.json")["dtype"] == "bfloat16"  # the checkpoint's own dtype
    logits = reference_logits(output, checkpoints.tokens)
    # The oracle ran the bf16 model in bf16 arithmetic; the reference forward runs in fp32.
    assert (logits - checkpoints.logits).abs().max() < 1e-2
    shard = torch.load(source / "iter_0000010/mp_rank_01/model_optim_rng.pt", weights_only=False)[
        "model"
    ]
    with safe_open(str(output / "rank3.safetensors"), framework="pt") as f:
        norm = f.get_tensor("transformer.layers.2.input_layernorm.weight")
        gate = f.get_tensor("transformer.layers.2.mlp.gate.weight")
    assert torch.equal(norm, shard["decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"])
    # Training rank 1 holds [gate_1; up_1] (64 rows each); target rank 3 of 4 takes the second half of up_1.
    assert torch.equal(gate, shard["decoder.layers.2.mlp.linear_fc1.weight"][96:128])


def test_manifest_lists_every_file_with_sha256(megatron, tmp_path):
    checkpoints = megatron("gpt")
    output = convert(checkpoints.paths[LAYOUTS[4]], tmp_path / "out", tp=2)
    manifest = read_json(output / "manifest.json")
    listed = {entry["path"]: entry for entry in manifest["files"]}
    on_disk = {p.name for p in output.iterdir()} - {"manifest.json"}
    assert set(listed) == on_disk == {"config.json", "rank0.safetensors", "rank1.safetensors"}
    for name, entry in listed.items():
        data = (output / name).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["source"]["format"] == "torch_dist"


def test_parallel_workers_give_identical_bytes(megatron, tmp_path):
    source = megatron("llama").paths[LAYOUTS[3]]
    one = convert(source, tmp_path / "one", tp=4, workers=1)
    two = convert(source, tmp_path / "two", tp=4, workers=2)
    for rank in range(4):
        name = f"rank{rank}.safetensors"
        assert (one / name).read_bytes() == (two / name).read_bytes()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.dirname)
def test_every_source_layout_gives_identical_bytes(megatron, tmp_path, layout):
    """Legacy TP/PP and torch_dist sources of the same weights convert to the same files."""
    checkpoints = megatron("gpt")
    reference = convert(checkpoints.paths[LAYOUTS[0]], tmp_path / "reference", tp=2)
    output = convert(checkpoints.paths[layout], tmp_path / "out", tp=2)
    for rank in range(2):
        name = f"rank{rank}.safetensors"
        assert (output / name).read_bytes() == (reference / name).read_bytes()


def test_resume_reuses_ranks_committed_by_a_killed_run(megatron, tmp_path):
    """Ranks finished before a hard kill are reused; what a killed run of another job left is removed."""
    from tasks.kinds import megatron_trtllm as steps

    source = megatron("llama").paths[LAYOUTS[1]]
    output = tmp_path / "out"
    spec = ConvertSpec(str(source), str(output), tp=2)
    first = steps.convert_rank_step(spec, steps.inspect_source(spec)["tag"], 0)  # then killed
    inode = (output / "rank0.safetensors").stat().st_ino
    other = ConvertSpec(str(source), str(output), tp=2, dtype="bfloat16")  # another job, killed
    steps.convert_rank_step(other, steps.inspect_source(other)["tag"], 1)
    ranks = run_conversion(spec, workers=1).fanned("reshard")
    assert ranks[0]["reused"] and ranks[0]["sha256"] == first["sha256"]
    assert (output / "rank0.safetensors").stat().st_ino == inode  # not converted again
    assert not ranks[1]["reused"] and ranks[1]["bytes_read"] > 0
    assert sorted(p.name for p in output.iterdir()) == [
        "config.json",
        "manifest.json",
        "rank0.safetensors",
        "rank1.safetensors",
    ]
    assert_matches_megatron(output, megatron("llama"))
