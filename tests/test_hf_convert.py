"""Megatron → Hugging Face layout, checked by transformers itself: the converted directory, loaded
with `AutoModelForCausalLM.from_pretrained` on CPU, reproduces the Megatron model's own logits."""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from safetensors import safe_open

from converters.errors import ConversionError, NonFiniteWeights, UnsupportedModel
from converters.hf.config import generation_config, hf_config, shard_index
from converters.hf.convert import ShardResult, convert_shard
from converters.hf.families import family_for
from converters.hf.plan import HfTarget, hf_tensors, plan_shards
from converters.megatron.example import Layout, write_example_checkpoints
from converters.megatron.layout import SourceCheckpoint, open_checkpoint
from converters.model import ModelConfig
from converters.tensors import LazyTensor
from converters.torch_arrays import eager, torch_dtype
from converters.torch_arrays import materialize as as_torch
from converters.trtllm.config import trtllm_config
from converters.trtllm.convert import convert_rank
from converters.trtllm.plan import Target
from tests.conftest import LAYOUTS, Checkpoints
from tests.trtllm_reference import reference_logits

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4

# Llama-style variants of the `llama` fixture (their own weights and oracle logits).
VARIANTS: dict[str, tuple[Layout, dict]] = {
    # Qwen2's shape: QKV biases only; tied embeddings.
    "llama_qkv_bias_tied": (
        Layout("legacy", 2, 1),
        {"add_qkv_bias": True, "untie_embeddings_and_output_weights": False},
    ),
    # Biases on every linear layer: Llama's attention_bias + mlp_bias.
    "llama_all_biases": (Layout("torch_dist", 2, 1), {"add_bias_linear": True}),
}


@pytest.fixture(scope="session")
def variant(fixture_root: Path):
    """`variant(name)` → (checkpoint path, `Checkpoints`), written once per session."""

    def get(name: str) -> tuple[Path, Checkpoints]:
        layout, overrides = VARIANTS[name]
        root = fixture_root / f"hf-{name}"
        done = root / "oracle.pt"
        with FileLock(str(fixture_root / f"hf-{name}.lock")):
            if not done.exists():
                result = write_example_checkpoints(root, "llama", [layout], overrides=overrides)
                torch.save({"tokens": result.tokens, "logits": result.logits}, root / "oracle.tmp")
                (root / "oracle.tmp").replace(done)
        oracle = torch.load(done, weights_only=True)
        path = root / layout.dirname
        return path, Checkpoints("llama", {layout: path}, oracle["tokens"], oracle["logits"])

    return get


def write_hf(source: Path | SourceCheckpoint, output: Path, **options) -> list[ShardResult]:
    """Convert every shard, then write config.json, generation_config.json and (several shards)
    the index, as the job does."""
    checkpoint = open_checkpoint(source) if isinstance(source, Path) else source
    target = HfTarget(**options)
    output.mkdir(parents=True)
    results = [
        convert_shard(checkpoint, target, plan.index, output / plan.file)
        for plan in plan_shards(checkpoint, target)
    ]
    files = {
        "config.json": hf_config(checkpoint.config, target),
        "generation_config.json": generation_config(checkpoint.config),
    }
    if len(results) > 1:
        files["model.safetensors.index.json"] = shard_index(results)
    for name, data in files.items():
        (output / name).write_text(json.dumps(data, indent=2))
    return results


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits for `tokens`; every tensor must load (no missing or unexpected)."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    with torch.no_grad():
        return model(tokens[None]).logits[0]


def assert_matches(logits: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE):
    assert logits.shape == expected.shape
    diff = (logits - expected).abs().max().item()
    assert diff <= tolerance, f"max abs diff {diff:.3g} > {tolerance}"


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            found |= {name: f.get_tensor(name) for name in f.keys()}
    return found


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.dirname)
def test_logits_match_megatron(megatron, tmp_path, layout):
    checkpoints = megatron("llama")
    results = write_hf(checkpoints.paths[layout], tmp_path / "hf")
    assert [r.file for r in results] == ["model.safetensors"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["vocab_size"] == 102 and config["num_key_value_heads"] == 2
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert_matches(hf_logits(tmp_path / "hf", checkpoints.tokens), checkpoints.logits)


def test_tensor_names_and_model_order(megatron):
    checkpoint = open_checkpoint(megatron("llama").paths[LAYOUTS[1]])
    tensors = hf_tensors(checkpoint, HfTarget())
    names = [t.name for t in tensors]
    assert names[0] == "model.embed_tokens.weight"
    assert names[-2:] == ["model.norm.weight", "lm_head.weight"]
    assert names[1:10] == [
        f"model.layers.0.{n}.weight"
        for n in (
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "post_attention_layernorm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    shapes = {t.name: t.source.shape for t in tensors}
    assert shapes["model.layers.3.self_attn.q_proj.weight"] == (64, 64)
    assert shapes["model.layers.3.self_attn.k_proj.weight"] == (16, 64)
    assert shapes["model.layers.3.mlp.up_proj.weight"] == (128, 64)
    assert len(names) == 3 + 4 * 9


def test_gate_proj_is_the_activated_half_of_fc1(megatron):
    """Megatron's TP shard r of a gated fc1 is [gate_r; up_r]; HF's gate_proj is the activated half."""
    path = megatron("llama").paths[LAYOUTS[1]]
    shards = [
        torch.load(path / f"iter_0000010/mp_rank_0{r}/model_optim_rng.pt", weights_only=False)[
            "model"
        ]["decoder.layers.1.mlp.linear_fc1.weight"]
        for r in range(2)
    ]
    tensors = {t.name: t.source for t in hf_tensors(open_checkpoint(path), HfTarget())}
    gate = as_torch(tensors["model.layers.1.mlp.gate_proj.weight"])
    up = as_torch(tensors["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(gate, torch.cat([shards[0][:64], shards[1][:64]]))
    assert torch.equal(up, torch.cat([shards[0][64:], shards[1][64:]]))


def test_several_shards_give_identical_logits_and_a_consistent_index(megatron, tmp_path):
    checkpoints = megatron("llama")
    source = checkpoints.paths[LAYOUTS[3]]  # legacy TP2 PP2
    limit = 64 * 1024  # a q/up/down weight is 16-32 KiB in fp32: several per shard
    results = write_hf(source, tmp_path / "hf", max_shard_bytes=limit)
    count = len(results)
    assert count > 3
    assert [r.file for r in results] == [
        f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)
    ]
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    on_disk = {}
    for result in results:
        path = tmp_path / "hf" / result.file
        assert result.bytes_written == path.stat().st_size
        with safe_open(str(path), framework="pt") as f:
            sizes = {n: f.get_tensor(n).nbytes for n in f.keys()}
        assert sizes == result.tensors and sum(sizes.values()) <= limit
        on_disk |= dict.fromkeys(sizes, result.file)
    assert index["weight_map"] == on_disk
    assert index["metadata"]["total_size"] == sum(sum(r.tensors.values()) for r in results)
    plans = plan_shards(open_checkpoint(source), HfTarget(max_shard_bytes=limit))
    assert shard_index(plans) == index  # the plan alone gives the same index
    assert [p.tensors for p in plans] == [r.tensors for r in results]
    assert [p.bytes_read for p in plans] == [r.bytes_read for r in results]

    one = tmp_path / "one"
    write_hf(source, one)
    assert tensors_of(one).keys() == tensors_of(tmp_path / "hf").keys()
    logits = hf_logits(tmp_path / "hf", checkpoints.tokens)
    assert torch.equal(logits, hf_logits(one, checkpoints.tokens))
    assert_matches(logits, checkpoints.logits)


def test_bfloat16_output_is_fp32_output_rounded(megatron, tmp_path):
    checkpoints = megatron("llama")
    source = checkpoints.paths[LAYOUTS[4]]  # torch_dist
    write_hf(source, tmp_path / "bf16", dtype="bfloat16")
    write_hf(source, tmp_path / "fp32")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    low, high = tensors_of(tmp_path / "bf16"), tensors_of(tmp_path / "fp32")
    assert low.keys() == high.keys()
    for name, tensor in low.items():
        assert torch.equal(tensor, high[name].to(torch.bfloat16)), name
    # Loaded as fp32, bf16 weights only round the result.
    assert_matches(hf_logits(tmp_path / "bf16", checkpoints.tokens), checkpoints.logits, 0.1)


def test_vocab_size_trims_embedding_and_head(megatron, tmp_path):
    checkpoints = megatron("llama")
    vocab = int(checkpoints.tokens.max()) + 1
    assert vocab < 102
    write_hf(checkpoints.paths[LAYOUTS[2]], tmp_path / "hf", vocab_size=vocab)
    tensors = tensors_of(tmp_path / "hf")
    assert tensors["model.embed_tokens.weight"].shape == (vocab, 64)
    assert tensors["lm_head.weight"].shape == (vocab, 64)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == vocab
    logits = hf_logits(tmp_path / "hf", checkpoints.tokens)
    assert_matches(logits, checkpoints.logits[:, :vocab])


def test_vocab_size_above_the_checkpoint_rows_is_refused(megatron, tmp_path):
    checkpoint = open_checkpoint(megatron("llama").paths[LAYOUTS[0]])
    with pytest.raises(ConversionError, match=r"vocab_size=103 .* 102 vocab rows"):
        plan_shards(checkpoint, HfTarget(vocab_size=103))


def test_qkv_bias_only_and_tied_embeddings_is_qwen2(variant, tmp_path):
    path, checkpoints = variant("llama_qkv_bias_tied")
    write_hf(path, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    names = tensors_of(tmp_path / "hf").keys()
    assert "lm_head.weight" not in names
    assert "model.layers.2.self_attn.k_proj.bias" in names
    assert not any(n.endswith(("o_proj.bias", "mlp.up_proj.bias")) for n in names)
    assert_matches(hf_logits(tmp_path / "hf", checkpoints.tokens), checkpoints.logits)
    with pytest.raises(UnsupportedModel, match=r"LlamaForCausalLM cannot represent .*Qwen2"):
        family_for(open_checkpoint(path).config, "LlamaForCausalLM")


def test_biases_on_every_linear_layer_is_llama_with_biases(variant, tmp_path):
    path, checkpoints = variant("llama_all_biases")
    write_hf(path, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    names = tensors_of(tmp_path / "hf").keys()
    assert {"model.layers.0.self_attn.o_proj.bias", "model.layers.0.mlp.gate_proj.bias"} <= names
    assert_matches(hf_logits(tmp_path / "hf", checkpoints.tokens), checkpoints.logits)
    with pytest.raises(UnsupportedModel, match="Qwen2ForCausalLM cannot represent"):
        plan_shards(open_checkpoint(path), HfTarget(architecture="qwen2"))


class Patched:
    """A source with some tensors replaced (`patch(name, tensor)` returns the new one, made once)
    and optionally another config."""

    def __init__(
        self,
        source: SourceCheckpoint,
        patch: Callable[[str, LazyTensor], LazyTensor],
        config: ModelConfig | None = None,
    ) -> None:
        self._source, self._patch = source, patch
        self.config = config or source.config
        self._made: dict[str, LazyTensor] = {}

    def __getattr__(self, name: str):
        return getattr(self._source, name)

    def tensor(self, name: str) -> LazyTensor:
        if name not in self._made:
            self._made[name] = self._patch(name, self._source.tensor(name))
        return self._made[name]


def perturbed(source: SourceCheckpoint) -> Patched:
    """`source` with random biases and norm weights: the example models keep them at their
    initial values (zeros, ones), which hide a bias or norm put in the wrong place."""

    def patch(name: str, tensor: LazyTensor) -> LazyTensor:
        norm = "layernorm" in name or "layer_norm" in name
        if not (norm or name.endswith(".bias")):
            return tensor
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        noise = 0.3 * torch.randn(tensor.shape, generator=gen, dtype=torch_dtype(tensor.dtype))
        return eager(noise + 1 if norm else noise)

    return Patched(source, patch)


def assert_qkv_split_by_group(checkpoint: SourceCheckpoint, tensors: dict[str, LazyTensor]):
    """q/k/v_proj of layer 0, checked against Megatron's per-group [q heads, k, v] layout."""
    cfg = checkpoint.config
    ng, q, d = cfg.num_query_groups, cfg.heads_per_group, cfg.kv_channels
    for kind in ("weight", "bias"):
        name = f"decoder.layers.0.self_attention.linear_qkv.{kind}"
        if not checkpoint.has(name):
            continue
        fused = as_torch(checkpoint.tensor(name)).reshape(ng, q + 2, d, -1)
        expected = {"q": fused[:, :q], "k": fused[:, q], "v": fused[:, q + 1]}
        for p, rows in expected.items():
            got = as_torch(tensors[f"model.layers.0.self_attn.{p}_proj.{kind}"])
            assert torch.equal(got, rows.reshape(got.shape)), (p, kind)


@pytest.mark.parametrize("name", ["llama", "llama_qkv_bias_tied", "llama_all_biases"])
def test_random_biases_and_norms_match_the_tensorrt_llm_reference(
    megatron, variant, tmp_path, name
):
    """With every bias and norm weight random, transformers on the HF checkpoint computes what
    the independent TP=2 forward of tests/trtllm_reference computes on the TensorRT-LLM one."""
    if name == "llama":
        checkpoints = megatron(name)
        path = checkpoints.paths[LAYOUTS[1]]
    else:
        path, checkpoints = variant(name)
    source = perturbed(open_checkpoint(path))
    write_hf(source, tmp_path / "hf")
    trt, target = tmp_path / "trt", Target(tp=2)
    trt.mkdir()
    for rank in range(2):
        convert_rank(source, target, rank, trt / f"rank{rank}.safetensors")
    (trt / "config.json").write_text(json.dumps(trtllm_config(source.config, target)))
    expected = reference_logits(trt, checkpoints.tokens)
    logits = hf_logits(tmp_path / "hf", checkpoints.tokens)
    assert_matches(logits, expected)
    assert (expected - checkpoints.logits).abs().max() > 0.01  # the noise matters
    assert_qkv_split_by_group(source, {t.name: t.source for t in hf_tensors(source, HfTarget())})


def test_gpt_is_refused_naming_what_no_architecture_represents(megatron):
    checkpoint = open_checkpoint(megatron("gpt").paths[LAYOUTS[0]])
    with pytest.raises(UnsupportedModel) as refused:
        plan_shards(checkpoint, HfTarget())
    message = str(refused.value)
    for feature in ("LayerNorm", "learned_absolute position embeddings", "non-gated gelu MLP"):
        assert feature in message
    with pytest.raises(UnsupportedModel, match="unknown Hugging Face architecture 'GPT2'"):
        plan_shards(checkpoint, HfTarget(architecture="GPT2"))


def test_a_shard_size_below_the_largest_tensor_is_refused_naming_it(megatron):
    checkpoint = open_checkpoint(megatron("llama").paths[LAYOUTS[0]])
    # The largest are the MLP weights (128 × 64 × 4 bytes); the first is named.
    with pytest.raises(
        ConversionError,
        match=r"model\.layers\.0\.mlp\.gate_proj\.weight alone is 32768 bytes .* at least 32768",
    ):
        plan_shards(checkpoint, HfTarget(max_shard_bytes=32767))
    plans = plan_shards(checkpoint, HfTarget(max_shard_bytes=32768))
    assert len(plans) > 1 and max(p.bytes_written for p in plans) == 32768


def test_zero_centred_norm_weights_are_written_with_the_one_added(megatron, tmp_path):
    """apply_layernorm_1p stores gamma - 1; HF's RMSNorm multiplies by the weight itself."""
    source = open_checkpoint(megatron("llama").paths[LAYOUTS[0]])
    config = dataclasses.replace(source.config, apply_layernorm_1p=True)
    checkpoint = Patched(source, lambda name, tensor: tensor, config)
    convert_shard(checkpoint, HfTarget(), 0, tmp_path / "model.safetensors")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        norm = f.get_tensor("model.layers.1.post_attention_layernorm.weight")
        final = f.get_tensor("model.norm.weight")
    stored = as_torch(checkpoint.tensor("decoder.layers.1.pre_mlp_layernorm.weight"))
    assert torch.equal(norm, stored + 1)
    assert torch.equal(final, as_torch(checkpoint.tensor("decoder.final_layernorm.weight")) + 1)


def test_nonfinite_weights_are_listed_or_refused_by_their_hf_name(megatron, tmp_path):
    path = megatron("llama").paths[LAYOUTS[1]]
    poisoned = "decoder.layers.2.self_attention.linear_qkv.weight"

    def patch(name: str, tensor: LazyTensor) -> LazyTensor:
        if name != poisoned:
            return tensor
        data = as_torch(tensor)
        data[70, 3] = float("nan")  # group 1 (rows 48..95), its third query head
        return eager(data)

    checkpoint = Patched(open_checkpoint(path), patch)
    result = convert_shard(checkpoint, HfTarget(), 0, tmp_path / "model.safetensors")
    assert [(f["tensor"], f["count"]) for f in result.nonfinite] == [
        ("model.layers.2.self_attn.q_proj.weight", 1)
    ]
    with pytest.raises(NonFiniteWeights, match=r"model\.layers\.2\.self_attn\.q_proj\.weight"):
        convert_shard(checkpoint, HfTarget(nonfinite="error"), 0, tmp_path / "again.safetensors")


def test_generation_config_loads(megatron, tmp_path):
    cfg = open_checkpoint(megatron("llama").paths[LAYOUTS[0]]).config
    assert generation_config(cfg) == {}
    assert generation_config(cfg, eos_token_id=2) == {"eos_token_id": 2}
    (tmp_path / "generation_config.json").write_text(json.dumps(generation_config(cfg)))
    transformers.GenerationConfig.from_pretrained(tmp_path)
